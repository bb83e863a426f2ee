//! Tests only: a throwaway CA certificate, made at run time with `openssl`
//! (no certificate or key lives in the repository).

use std::process::Command;

/// A fresh self-signed CA certificate (PEM, ending in a newline); its key is
/// deleted with the temporary directory.
pub(crate) fn throwaway_ca_pem() -> String {
    let directory = tempfile::tempdir().unwrap();
    let certificate = directory.path().join("ca.pem");
    let status = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=racklet-node-test-ca", "-keyout"])
        .arg(directory.path().join("ca.key"))
        .arg("-out")
        .arg(&certificate)
        .output()
        .expect("openssl runs (the tests make a throwaway CA with it)");
    assert!(status.status.success(), "openssl req failed: {status:?}");
    std::fs::read_to_string(certificate).unwrap()
}
