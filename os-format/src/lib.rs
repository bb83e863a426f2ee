//! The contract shared by the image builder and the update agent.
//!
//! Pure and IO-free apart from `Read`/`Write`/`Seek`: everything both sides of an
//! update must agree on lives here, once.

pub mod boot_state;
pub mod cmdline;
pub mod delta;
pub mod error;
pub mod gpt;
pub mod layout;
pub mod manifest;
pub mod report;
pub mod settings;
pub mod update_manifest;
pub mod verity;

pub use error::FormatError;
