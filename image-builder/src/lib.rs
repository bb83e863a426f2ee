//! Racklet OS image builder: variant -> pinned inputs -> root file system ->
//! erofs + dm-verity -> UKIs -> ESP + GPT -> `disk.img`, `update/*`, `manifest.json`.

pub mod error;
pub mod fetch;
pub mod lock;
pub mod mirror;
pub mod progress;
pub mod recipe;
pub mod variant;

pub use error::{BuildError, Result};
