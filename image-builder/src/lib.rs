//! Racklet OS image builder: variant -> pinned inputs -> root file system ->
//! erofs + dm-verity -> UKIs -> ESP + GPT -> `disk.img`, `update/*`, `manifest.json`.

pub mod cli;
pub mod error;
pub mod fetch;
pub mod lock;
pub mod mirror;
pub mod progress;
pub mod recipe;
pub mod repo;
pub mod variant;

pub use error::{BuildError, Result};
pub mod bootloader;
pub mod build;
pub mod compose;
pub mod disk;
pub mod esp;
pub mod filesystem;
pub mod flash;
pub mod host_tool;
pub mod initramfs;
pub mod inputs;
pub mod kernel;
pub mod provision;
pub(crate) mod sparse;
pub mod uki;
pub mod unpack;
pub mod verify;
