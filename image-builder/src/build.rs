//! The build pipeline, in typed stages (`stages`), each returning what the
//! later ones take:
//!
//! variant.toml + lock -> `ResolvedInputs` (pinned inputs in the cache) ->
//! `ComposedRoot` (root tree, initramfs) -> `SealedRoot` (erofs + dm-verity)
//! -> `Ukis` (command lines hold the root hash) -> `EspImage` -> `DiskImage`
//! (GPT) -> `Artifacts` (update/*) -> manifest.json and the SBOM.
//!
//! Everything is written under a temporary directory beside the output and
//! renamed into `build/<variant>/` only when complete.

use std::path::PathBuf;

use os_format::manifest::BuildManifest;
use sha2::{Digest, Sha256};

use crate::error::{BuildError, Result};

mod stages;

pub const DISK_IMAGE: &str = "disk.img";
pub const UPDATE_DIR: &str = "update";
pub const SBOM_FILE: &str = "sbom.cdx.json";
pub const ROOT_ARTIFACT: &str = "root.erofs.zst";
pub const VERITY_ARTIFACT: &str = "verity.img.zst";

/// Which k3s the user asked for (`K3S=` in the Makefile).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum K3sChoice {
    /// What the variant says: the official pin if required, nothing if optional.
    Default,
    Official,
    StandIn,
    None,
}

#[derive(Clone, Debug)]
pub struct BuildOptions {
    pub project_root: PathBuf,
    pub variant: String,
    /// `build/`: the result goes to `<output_root>/<variant>/`.
    pub output_root: PathBuf,
    /// Our cargo binaries for the variant's architecture.
    pub binaries_dir: PathBuf,
    /// The static racklet-init for the variant's architecture.
    pub init_binary: PathBuf,
    pub k3s: K3sChoice,
    pub source_date_epoch: Option<u64>,
    /// Build this version instead of the variant's `version`.
    pub version: Option<String>,
    /// Recipes added after the variant's (tests: e.g. a failing health check).
    pub extra_recipes: Vec<String>,
    /// What the image trusts for updates.
    pub update_trust: UpdateTrustOptions,
}

/// The TUF root and URLs embedded into the image (command line over variant).
#[derive(Clone, Debug, Default)]
pub struct UpdateTrustOptions {
    pub root_json: Option<PathBuf>,
    pub metadata_url: Option<String>,
    pub targets_url: Option<String>,
}

/// Run the whole build; returns the manifest written to `build/<variant>/manifest.json`.
pub fn build(options: &BuildOptions) -> Result<BuildManifest> {
    let inputs = stages::resolve_inputs(options)?;
    let work = stages::WorkDir::create(&options.output_root, &inputs.variant.name)?;
    let composed = stages::compose_root(&inputs, &work)?;
    let sealed = stages::seal_root(&inputs, &composed, &work)?;
    let ukis = stages::build_ukis(&inputs, &composed, &sealed, &work)?;
    let esp = stages::write_esp_image(&inputs, &composed, &sealed, &ukis, &work)?;
    let disk = stages::write_disk_image(&inputs, &composed, &sealed, &esp, &work)?;
    let artifacts = stages::compress_artifacts(&sealed, &ukis, &work)?;
    let manifest =
        stages::write_manifest(&inputs, &composed, &sealed, &ukis, disk, artifacts, &work)?;

    // Into place: the old build (if any) is replaced only now.
    let destination = options.output_root.join(&inputs.variant.name);
    if destination.exists() {
        let old = work.path("previous");
        std::fs::rename(&destination, &old).map_err(BuildError::io(&destination))?;
    }
    std::fs::rename(work.out_dir(), &destination).map_err(BuildError::io(&destination))?;
    let digest = Sha256::digest(manifest.to_json());
    tracing::info!(output = %destination.display(), manifest_sha256 = %hex::encode(digest), "build complete");
    Ok(manifest)
}
