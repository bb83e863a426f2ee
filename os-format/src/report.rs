//! How every Racklet program prints an error: its message and then each cause
//! once. Our errors and some of our dependencies' put their cause's text into
//! their own message as well as returning it from `source()`; a cause whose
//! text the message before it already holds is skipped, so nothing is printed
//! twice ("nothing to do: nothing to do").

use std::error::Error;

/// The messages of `error` and of its causes, outermost first, each cause
/// only when the message before it does not already contain it.
pub(crate) fn causes(error: &(dyn Error + 'static)) -> Vec<String> {
    let mut messages = vec![error.to_string()];
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        let said = messages.last().is_some_and(|last| last.contains(&text));
        if !said && !text.is_empty() {
            messages.push(text);
        }
        source = cause.source();
    }
    messages
}

/// `causes` on one line, joined by ": " (JSON output, D-Bus errors, logs).
pub fn one_line(error: &(dyn Error + 'static)) -> String {
    causes(error).join(": ")
}

/// `causes` for a person on a terminal: `error: <message>` and one
/// `  caused by: <cause>` line for each cause, each line ending in a newline.
pub fn for_people(error: &(dyn Error + 'static)) -> String {
    let causes = causes(error);
    let mut text = format!("error: {}\n", causes[0]);
    for cause in &causes[1..] {
        text.push_str(&format!("  caused by: {cause}\n"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer {
        message: String,
        source: Option<Box<Layer>>,
    }

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.message)
        }
    }

    impl Error for Layer {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.source
                .as_deref()
                .map(|layer| layer as &(dyn Error + 'static))
        }
    }

    fn layer(message: &str, source: Option<Layer>) -> Layer {
        Layer {
            message: message.into(),
            source: source.map(Box::new),
        }
    }

    #[test]
    fn a_cause_the_message_already_holds_is_printed_once() {
        let io = layer("No such file or directory (os error 2)", None);
        let error = layer(
            "/etc/racklet/update.toml: cannot read: No such file or directory (os error 2)",
            Some(io),
        );
        assert_eq!(
            causes(&error),
            ["/etc/racklet/update.toml: cannot read: No such file or directory (os error 2)"]
        );
    }

    #[test]
    fn causes_not_in_the_message_follow_it_in_order() {
        let root = layer("connection refused", None);
        let middle = layer("error sending request", Some(root));
        let error = layer("cannot fetch https://repo/1.root.json", Some(middle));
        assert_eq!(
            one_line(&error),
            "cannot fetch https://repo/1.root.json: error sending request: connection refused"
        );
    }

    #[test]
    fn people_read_the_message_then_each_cause_on_its_own_line() {
        let root = layer("connection refused", None);
        let error = layer("cannot fetch https://repo/1.root.json", Some(root));
        assert_eq!(
            for_people(&error),
            "error: cannot fetch https://repo/1.root.json\n  caused by: connection refused\n"
        );
    }

    #[test]
    fn a_cause_held_by_a_skipped_cause_is_skipped_too() {
        let root = layer("disk full", None);
        let middle = layer("write failed: disk full", Some(root));
        let error = layer("installing 2.0.0: write failed: disk full", Some(middle));
        assert_eq!(
            causes(&error),
            ["installing 2.0.0: write failed: disk full"]
        );
    }
}
