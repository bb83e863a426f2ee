//! What a build produced, as the builder writes it to `manifest.json` and the
//! publisher and update agent read it back.
//!
//! The manifest names every artifact with its size and sha256 (of the bytes as
//! shipped and, for compressed artifacts, of the bytes once decompressed — the
//! latter is what ends up on the slot partition), the slot's dm-verity root
//! hash, and every package that went into the root file system.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::layout::{Arch, Slot};

/// Bumped when a field changes meaning; readers refuse versions they do not know.
pub const BUILD_MANIFEST_SCHEMA: u32 = 1;
pub const BUILD_MANIFEST_FILE: &str = "manifest.json";
pub const IMAGE_NAME: &str = "racklet-os";

#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("{file}: not a valid build manifest: {source}")]
    Parse {
        file: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{file}: manifest schema {found} is not supported; expected {expected}")]
    Schema {
        file: String,
        found: u32,
        expected: u32,
    },
    #[error("{file}: no artifact of kind {kind}")]
    MissingArtifact { file: String, kind: String },
}

/// How an artifact is stored in `update/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Zstd,
}

/// What an artifact is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ArtifactKind {
    /// The read-only root file system (erofs), written to a slot's root partition.
    RootFilesystem,
    /// The dm-verity superblock and hash tree, written to a slot's verity partition.
    VerityHashTree,
    /// The Unified Kernel Image for one slot (its command line names the slot).
    KernelImage { slot: Slot },
}

/// (No `deny_unknown_fields` here: serde cannot combine it with the flattened kind.)
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// File name under `update/` (flat: no `/`).
    pub name: String,
    #[serde(flatten)]
    pub kind: ArtifactKind,
    pub compression: Compression,
    pub size: u64,
    pub sha256: String,
    pub uncompressed_size: u64,
    pub uncompressed_sha256: String,
}

/// The dm-verity parameters of the root file system.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerityInfo {
    pub root_hash: String,
    pub salt: String,
    pub hash_algorithm: String,
    pub data_block_size: u32,
    pub hash_block_size: u32,
    pub data_blocks: u64,
}

/// Where k3s in the image came from: the pinned official release, a labelled
/// stand-in used by tests, or not included.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", deny_unknown_fields)]
pub enum K3sProvenance {
    Official {
        version: String,
        url: String,
        sha256: String,
    },
    StandIn {
        name: String,
        sha256: String,
    },
    Absent,
}

/// One Debian binary package in the root file system.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageRecord {
    pub name: String,
    pub version: String,
    pub architecture: String,
    pub sha256: String,
}

/// A file the build wrote that is not an update artifact (the disk image).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputFile {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// Partition geometry the image was laid out with (bytes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionSizes {
    pub esp: u64,
    pub root: u64,
    pub verity: u64,
    pub data: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildManifest {
    pub schema: u32,
    pub image_name: String,
    pub variant: String,
    pub arch: Arch,
    pub version: String,
    /// SOURCE_DATE_EPOCH the build used for every timestamp.
    pub source_date_epoch: u64,
    pub kernel_version: String,
    /// The kernel command line of slot A's UKI (slot B differs only in `racklet.slot`).
    pub kernel_cmdline: String,
    pub verity: VerityInfo,
    pub k3s: K3sProvenance,
    pub partitions: PartitionSizes,
    /// systemd units that must be active before an update is committed.
    pub required_units: Vec<String>,
    pub artifacts: Vec<Artifact>,
    pub outputs: Vec<OutputFile>,
    pub packages: Vec<PackageRecord>,
}

impl BuildManifest {
    /// Parse and check the schema version; `file` names the source in errors.
    pub fn from_json(file: &str, bytes: &[u8]) -> Result<BuildManifest, ManifestError> {
        let manifest: BuildManifest =
            serde_json::from_slice(bytes).map_err(|source| ManifestError::Parse {
                file: file.to_string(),
                source,
            })?;
        if manifest.schema != BUILD_MANIFEST_SCHEMA {
            return Err(ManifestError::Schema {
                file: file.to_string(),
                found: manifest.schema,
                expected: BUILD_MANIFEST_SCHEMA,
            });
        }
        Ok(manifest)
    }

    /// Pretty JSON with a trailing newline; field order is fixed by the struct, so
    /// the bytes are a pure function of the value.
    pub fn to_json(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("manifest serializes");
        bytes.push(b'\n');
        bytes
    }

    pub fn artifact(&self, kind: ArtifactKind) -> Option<&Artifact> {
        self.artifacts.iter().find(|artifact| artifact.kind == kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BuildManifest {
        BuildManifest {
            schema: BUILD_MANIFEST_SCHEMA,
            image_name: IMAGE_NAME.into(),
            variant: "qemu-x86_64".into(),
            arch: Arch::X86_64,
            version: "0.1.0".into(),
            source_date_epoch: 1,
            kernel_version: "6.1.0-28-cloud-amd64".into(),
            kernel_cmdline: "ro racklet.slot=a".into(),
            verity: VerityInfo {
                root_hash: "00".repeat(32),
                salt: "11".repeat(32),
                hash_algorithm: "sha256".into(),
                data_block_size: 4096,
                hash_block_size: 4096,
                data_blocks: 10,
            },
            k3s: K3sProvenance::StandIn {
                name: "k3s-stand-in".into(),
                sha256: "22".repeat(32),
            },
            partitions: PartitionSizes {
                esp: 1,
                root: 2,
                verity: 3,
                data: 4,
            },
            required_units: vec!["containerd.service".into()],
            artifacts: vec![Artifact {
                name: "uki-b.efi".into(),
                kind: ArtifactKind::KernelImage { slot: Slot::B },
                compression: Compression::None,
                size: 5,
                sha256: "33".repeat(32),
                uncompressed_size: 5,
                uncompressed_sha256: "33".repeat(32),
            }],
            outputs: vec![],
            packages: vec![],
        }
    }

    #[test]
    fn round_trips_and_finds_artifacts() {
        let manifest = sample();
        let bytes = manifest.to_json();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.contains("\"kind\": \"kernel-image\""), "{text}");
        assert!(text.contains("\"kind\": \"stand-in\""), "{text}");
        let back = BuildManifest::from_json("manifest.json", &bytes).unwrap();
        assert_eq!(back, manifest);
        assert!(back
            .artifact(ArtifactKind::KernelImage { slot: Slot::B })
            .is_some());
        assert!(back.artifact(ArtifactKind::RootFilesystem).is_none());
    }

    #[test]
    fn refuses_unknown_schema_and_fields() {
        let mut manifest = sample();
        manifest.schema = 99;
        let error = BuildManifest::from_json("m.json", &manifest.to_json()).unwrap_err();
        assert!(error.to_string().contains("schema 99"), "{error}");
        let mut value: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        value["surprise"] = serde_json::json!(1);
        let error =
            BuildManifest::from_json("m.json", &serde_json::to_vec(&value).unwrap()).unwrap_err();
        assert!(error.to_string().contains("surprise"), "{error}");
    }
}
