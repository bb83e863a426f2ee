//! Racklet OS update agent (on the device): decides which update applies,
//! writes it into the inactive slot, switches the boot slot for one try, and
//! commits or rolls back after the health gate. `main.rs` is a thin CLI over
//! this library; decisions are pure functions, IO stays at the edges.

pub mod boot_control;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dbus;
pub mod delta;
pub mod download;
pub mod error;
pub mod fetcher;
pub mod health;
pub mod install;
pub(crate) mod mapping;
pub mod metrics;
pub mod policy;
pub(crate) mod rauc;
pub mod slots;
pub mod state;
pub mod status;
pub mod transition;
pub mod tuf;
pub mod tuf_workflow;
