//! Racklet OS node settings: what `racklet/settings.toml` on the ESP says,
//! applied at every boot (`racklet-node apply`, racklet-node.service) and
//! shown by `racklet-node status`. The format is os-format's
//! ([`os_format::settings`]); see docs/settings.md.

pub(crate) mod apply;
pub mod cli;
pub(crate) mod cloud_init;
pub(crate) mod error;
pub(crate) mod factory_reset;
pub(crate) mod plan;
pub(crate) mod status;
#[cfg(test)]
pub(crate) mod test_ca;
