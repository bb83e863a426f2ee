//! Racklet OS node settings: what `racklet/settings.toml` on the ESP says,
//! applied at every boot (`racklet-node apply`, racklet-node.service) and
//! shown by `racklet-node status`. The format is os-format's
//! ([`os_format::settings`]); see docs/settings.md.

pub mod apply;
pub mod cli;
pub mod cloud_init;
pub mod error;
pub mod factory_reset;
pub mod plan;
pub mod status;
