//! Errors of the shared format crate. Each module has its own typed error; this
//! enum gathers them for callers that handle "any format problem" at once.

use thiserror::Error;

pub use crate::cmdline::CmdlineError;
pub use crate::gpt::GptError;
pub use crate::manifest::ManifestError;
pub use crate::verity::VerityError;

#[derive(Debug, Error)]
pub enum FormatError {
    #[error(transparent)]
    Gpt(#[from] GptError),
    #[error(transparent)]
    Verity(#[from] VerityError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Cmdline(#[from] CmdlineError),
}
