//! Racklet OS update agent (on the device). This first piece reports what
//! booted: the slot and root hash from the kernel command line and the image
//! version from os-release. Updates, the D-Bus API and the health gate follow.

pub mod error;
pub mod status;
