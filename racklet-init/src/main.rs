//! `/init` of the Racklet OS initramfs; all logic lives in the library.

use std::panic;
use std::sync::Mutex;

use racklet_init::{fail, run, Fatal, InitError};

/// The last panic, as one line, for the fatal message.
static PANIC_MESSAGE: Mutex<Option<String>> = Mutex::new(None);

fn main() {
    // A panic is reported like any other failure: one FATAL line, then a
    // reboot. The hook records it instead of printing a second message.
    panic::set_hook(Box::new(|info| {
        let line = info.to_string().replace('\n', ": ");
        if let Ok(mut message) = PANIC_MESSAGE.lock() {
            *message = Some(line);
        }
    }));
    let fatal = match panic::catch_unwind(run) {
        Ok(Ok(never)) => match never {},
        Ok(Err(fatal)) => fatal,
        Err(_) => {
            let message = PANIC_MESSAGE
                .lock()
                .ok()
                .and_then(|mut message| message.take())
                .unwrap_or_else(|| "panic".to_string());
            Fatal::early(InitError::Internal(message))
        }
    };
    fail(&fatal)
}
