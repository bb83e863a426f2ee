//! The build pipeline. Each step's output is the next step's only input:
//!
//! variant.toml -> lock -> cache -> root tree -> erofs -> verity -> initramfs ->
//! UKIs (command line holds the root hash) -> ESP + GPT -> disk.img, update/*,
//! manifest.json.
//!
//! Everything is written under a temporary directory beside the output and
//! renamed into `build/<variant>/` only when complete.

use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};

use os_format::gpt::{
    GptDisk, Guid, PartitionSpec, ATTRIBUTE_GROWFS, ATTRIBUTE_READ_ONLY, ATTRIBUTE_REQUIRED,
};
use os_format::layout::{self, Slot};
use os_format::manifest::{
    Artifact, ArtifactKind, BuildManifest, Compression, K3sProvenance, OutputFile, PackageRecord,
    VerityInfo, BUILD_MANIFEST_FILE, BUILD_MANIFEST_SCHEMA, IMAGE_NAME,
};
use os_format::verity;
use sha2::{Digest, Sha256};

use crate::compose::{self, ComposeInput, K3sInput};
use crate::error::{BuildError, Result};
use crate::esp::EspContents;
use crate::fetch::{sha256_file, Cache, Pinned};
use crate::inputs::{self, CachedPackage};
use crate::lock::{LockFile, PackageSet, Requested};
use crate::recipe::{Recipe, UpstreamRecipe, K3S_RECIPE, K3S_STAND_IN_RECIPE};
use crate::variant::{K3sPolicy, Variant};
use crate::{bootloader, disk, esp, filesystem, initramfs, kernel, progress, uki, unpack};

pub const DISK_IMAGE: &str = "disk.img";
pub const UPDATE_DIR: &str = "update";
pub const SBOM_FILE: &str = "sbom.cdx.json";
pub const ROOT_ARTIFACT: &str = "root.erofs.zst";
pub const VERITY_ARTIFACT: &str = "verity.img.zst";
const MIB: u64 = 1024 * 1024;
/// Space before the first and after the last partition (GPT + alignment).
const DISK_MARGIN_BYTES: u64 = MIB;
/// The root is already LZ4HC-compressed inside erofs; higher levels gain little and cost time.
const ZSTD_LEVEL: i32 = 3;

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

/// Read and check what goes into the image for the update agent.
fn update_trust(options: &BuildOptions, variant: &Variant) -> Result<compose::UpdateTrust> {
    let root_json = match &options.update_trust.root_json {
        Some(path) => {
            let bytes = std::fs::read(path).map_err(BuildError::io(path))?;
            let root: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(|error| BuildError::Config {
                    file: path.clone(),
                    message: format!("not JSON: {error}"),
                })?;
            if root["signed"]["_type"] != "root" {
                return Err(BuildError::Config {
                    file: path.clone(),
                    message: "not a signed TUF root (expected signed._type = \"root\")".into(),
                });
            }
            Some(bytes)
        }
        None => None,
    };
    let pick = |cli: &Option<String>,
                from_variant: &Option<String>,
                key: &str|
     -> Result<Option<String>> {
        let value = cli.clone().or_else(|| from_variant.clone());
        if let Some(value) = &value {
            let url = url::Url::parse(value).map_err(|error| BuildError::ConfigKey {
                file: variant.file.clone(),
                key: format!("update.{key}"),
                message: format!("'{value}' is not a URL: {error}"),
            })?;
            if !variant.update.allow_insecure_http
                && os_format::update_manifest::is_insecure_remote_url(url.scheme(), url.host_str())
            {
                return Err(BuildError::ConfigKey {
                    file: variant.file.clone(),
                    key: format!("update.{key}"),
                    message: format!(
                        "'{value}' is plain http:// to another machine, which the image's agent refuses; expected https://, or [update] allow_insecure_http = true in the variant"
                    ),
                });
            }
        }
        Ok(value)
    };
    let trust = compose::UpdateTrust {
        root_json,
        metadata_url: pick(
            &options.update_trust.metadata_url,
            &variant.update.metadata_url,
            "metadata_url",
        )?,
        targets_url: pick(
            &options.update_trust.targets_url,
            &variant.update.targets_url,
            "targets_url",
        )?,
        allow_insecure_http: variant.update.allow_insecure_http,
    };
    if trust.root_json.is_none() {
        tracing::warn!("no TUF root given (run `make keys`); this image cannot verify updates until one is configured");
    }
    Ok(trust)
}

fn k3s_recipe(options: &BuildOptions, variant: &Variant) -> Result<Option<UpstreamRecipe>> {
    let name = match (variant.k3s, options.k3s) {
        (K3sPolicy::Required, K3sChoice::Default | K3sChoice::Official) => K3S_RECIPE,
        (K3sPolicy::Optional, K3sChoice::Official) => K3S_RECIPE,
        (K3sPolicy::Required | K3sPolicy::Optional, K3sChoice::StandIn) => K3S_STAND_IN_RECIPE,
        (K3sPolicy::Optional | K3sPolicy::Absent, K3sChoice::Default | K3sChoice::None) => {
            return Ok(None)
        }
        (K3sPolicy::Required, K3sChoice::None) => return Err(BuildError::ConfigKey {
            file: variant.file.clone(),
            key: "k3s".into(),
            message:
                "is \"required\", so K3S=none cannot build it; use K3S=stand-in for a test build"
                    .into(),
        }),
        (K3sPolicy::Absent, K3sChoice::Official | K3sChoice::StandIn) => {
            return Err(BuildError::ConfigKey {
                file: variant.file.clone(),
                key: "k3s".into(),
                message: "is \"absent\"; this variant does not take k3s".into(),
            })
        }
    };
    UpstreamRecipe::load(&options.project_root, name).map(Some)
}

fn resolve_k3s(
    options: &BuildOptions,
    variant: &Variant,
    cache: &Cache,
) -> Result<Option<K3sInput>> {
    let Some(recipe) = k3s_recipe(options, variant)? else {
        return Ok(None);
    };
    if let Some(file) = &recipe.file {
        let binary = options
            .project_root
            .join(crate::recipe::PACKAGES_DIR)
            .join(file);
        let (sha256, _) = sha256_file(&binary)?;
        return Ok(Some(K3sInput {
            recipe,
            binary,
            sha256,
        }));
    }
    let asset = recipe.asset(variant.arch)?.clone();
    cache.ensure_all(&[Pinned {
        what: format!("{} {} for {}", recipe.name, recipe.version, variant.arch),
        url: asset.url.clone(),
        sha256: asset.sha256.clone(),
        size: None,
        gone_hint: None,
    }])?;
    Ok(Some(K3sInput {
        binary: cache.blob_path(&asset.sha256),
        sha256: asset.sha256,
        recipe,
    }))
}

fn derive_guid(parts: &[&[u8]]) -> Guid {
    let mut seed = Vec::new();
    for part in parts {
        seed.extend_from_slice(&(part.len() as u64).to_le_bytes());
        seed.extend_from_slice(part);
    }
    Guid::derive(&seed)
}

/// zstd-compress `input` into `output` (with a frame checksum), counting progress on `bar`.
fn compress(input: &Path, output: &Path, bar: &indicatif::ProgressBar) -> Result<()> {
    let reader = std::fs::File::open(input).map_err(BuildError::io(input))?;
    let writer = std::fs::File::create(output).map_err(BuildError::io(output))?;
    let mut encoder =
        zstd::stream::write::Encoder::new(writer, ZSTD_LEVEL).map_err(BuildError::io(output))?;
    encoder
        .include_checksum(true)
        .map_err(BuildError::io(output))?;
    let mut reader = bar.wrap_read(BufReader::with_capacity(1 << 20, reader));
    std::io::copy(&mut reader, &mut encoder).map_err(BuildError::io(output))?;
    encoder
        .finish()
        .map_err(BuildError::io(output))?
        .flush()
        .map_err(BuildError::io(output))
}

fn artifact(
    name: &str,
    kind: ArtifactKind,
    compression: Compression,
    shipped: &Path,
    raw: &Path,
) -> Result<Artifact> {
    let (sha256, size) = sha256_file(shipped)?;
    let (uncompressed_sha256, uncompressed_size) = if shipped == raw {
        (sha256.clone(), size)
    } else {
        sha256_file(raw)?
    };
    Ok(Artifact {
        name: name.to_string(),
        kind,
        compression,
        size,
        sha256,
        uncompressed_size,
        uncompressed_sha256,
    })
}

/// A CycloneDX 1.5 SBOM of the image's packages (and k3s).
fn cyclonedx(manifest: &BuildManifest) -> serde_json::Value {
    let mut components: Vec<serde_json::Value> = manifest
        .packages
        .iter()
        .map(|package| {
            serde_json::json!({
                "type": "library",
                "name": package.name,
                "version": package.version,
                "purl": format!("pkg:deb/debian/{}@{}?arch={}&distro=bookworm", package.name, package.version, package.architecture),
                "hashes": [{"alg": "SHA-256", "content": package.sha256}],
            })
        })
        .collect();
    match &manifest.k3s {
        K3sProvenance::Official {
            version,
            url,
            sha256,
        } => components.push(serde_json::json!({
            "type": "application", "name": "k3s", "version": version,
            "externalReferences": [{"type": "distribution", "url": url}],
            "hashes": [{"alg": "SHA-256", "content": sha256}],
        })),
        K3sProvenance::StandIn { name, sha256 } => components.push(serde_json::json!({
            "type": "application", "name": name, "version": "stand-in",
            "description": "test stand-in for k3s; not k3s",
            "hashes": [{"alg": "SHA-256", "content": sha256}],
        })),
        K3sProvenance::Absent => {}
    }
    serde_json::json!({
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "version": 1,
        "serialNumber": format!("urn:uuid:{}", Guid::derive(manifest.verity.root_hash.as_bytes())),
        "metadata": {
            "timestamp": format_rfc3339(manifest.source_date_epoch),
            "component": {"type": "operating-system", "name": manifest.image_name, "version": manifest.version},
        },
        "components": components,
    })
}

/// Seconds since the epoch as RFC 3339 UTC (whole seconds).
pub fn format_rfc3339(seconds: u64) -> String {
    let days = seconds / 86_400;
    let rest = seconds % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Run the whole build; returns the manifest written to `build/<variant>/manifest.json`.
pub fn build(options: &BuildOptions) -> Result<BuildManifest> {
    let mut variant = Variant::load(&options.project_root, &options.variant)?;
    if let Some(version) = &options.version {
        if crate::variant::parse_version(version).is_none() {
            return Err(BuildError::Config {
                file: variant.file.clone(),
                message: format!("--version {version}: expected MAJOR.MINOR.PATCH"),
            });
        }
        variant.version = version.clone();
    }
    for recipe in &options.extra_recipes {
        if !variant.recipes.contains(recipe) {
            variant.recipes.push(recipe.clone());
        }
    }
    let update_trust = update_trust(options, &variant)?;
    let recipes: Vec<Recipe> = variant
        .recipes
        .iter()
        .map(|name| Recipe::load(&options.project_root, name))
        .collect::<Result<_>>()?;
    let lock_path = variant.lock_file(&options.project_root);
    let lock = LockFile::load(&lock_path, &variant.name)?;
    lock.check_matches(&lock_path, &Requested::of(&variant, &recipes))?;
    let kernel_requirements = kernel::requirements_path(&options.project_root, &variant.name);
    let source_date_epoch = options
        .source_date_epoch
        .unwrap_or_else(|| variant.version_epoch());
    let cache = Cache::from_environment();
    let k3s = resolve_k3s(options, &variant, &cache)?;
    let packages = inputs::fetch_packages(&lock, &cache)?;
    // Every kernel package with a /boot/config-* is checked (the metapackage has none).
    let mut kernels_checked = 0;
    for kernel_package in inputs::in_set(&packages, PackageSet::Kernel) {
        if kernel::check_package_config(
            &kernel_requirements,
            &kernel_package.path,
            &kernel_package.locked.name,
        )? {
            kernels_checked += 1;
        }
    }
    if kernels_checked != 1 {
        return Err(BuildError::Other(format!(
            "{}: expected exactly one kernel package with a /boot/config-* in the lock, found {kernels_checked}",
            lock_path.display()
        )));
    }

    std::fs::create_dir_all(&options.output_root).map_err(BuildError::io(&options.output_root))?;
    let work = tempfile::Builder::new()
        .prefix(&format!(".{}.work-", variant.name))
        .tempdir_in(&options.output_root)
        .map_err(BuildError::io(&options.output_root))?;
    let root = work.path().join("root");
    let kernel_dir = work.path().join("kernel");
    let boot_tree = work.path().join("boot");
    let out = work.path().join("out");
    let update = out.join(UPDATE_DIR);
    for directory in [&root, &boot_tree, &update] {
        std::fs::create_dir_all(directory).map_err(BuildError::io(directory))?;
    }

    // 1. Root tree.
    let input = ComposeInput {
        project_root: &options.project_root,
        variant: &variant,
        recipes: &recipes,
        root_packages: inputs::in_set(&packages, PackageSet::Root),
        kernel_packages: inputs::in_set(&packages, PackageSet::Kernel),
        binaries_dir: &options.binaries_dir,
        k3s: k3s.clone(),
        source_date_epoch,
        update_trust,
    };
    tracing::info!(variant = %variant.name, packages = input.root_packages.len(), "composing the root file system");
    let kernel_files = compose::compose(&input, &cache.stage_dir(), &root, &kernel_dir)?;
    for package in inputs::in_set(&packages, PackageSet::Boot) {
        unpack::unpack_deb(&package.path, &boot_tree)?;
    }

    // 2. Initramfs (before the root is sealed: the modules come from the tree).
    let modules_dir = root.join(compose::MODULES_DIR).join(&kernel_files.version);
    let read_text = |name: &str| -> Result<String> {
        let path = modules_dir.join(name);
        std::fs::read_to_string(&path).map_err(BuildError::io(path))
    };
    let module_order = kernel::module_closure(
        &read_text("modules.dep")?,
        &read_text("modules.builtin")?,
        &variant.kernel.initramfs_modules,
    )?;
    let initramfs_bytes = initramfs::build(
        &options.init_binary,
        &root,
        &kernel_files.version,
        &module_order,
        source_date_epoch,
    )?;
    let initramfs_path = work.path().join("initramfs.cpio");
    std::fs::write(&initramfs_path, &initramfs_bytes).map_err(BuildError::io(&initramfs_path))?;
    let stub = uki::stub_path(&root, variant.arch);
    let stub_copy = work.path().join("stub.efi");
    std::fs::copy(&stub, &stub_copy).map_err(BuildError::io(&stub))?;
    let os_release_path = work.path().join("os-release");
    std::fs::write(&os_release_path, compose::os_release(&variant, &k3s))
        .map_err(BuildError::io(&os_release_path))?;
    let mut boot_contents = EspContents::new();
    bootloader::add_boot_files(
        &mut boot_contents,
        &variant,
        &options.project_root,
        &root,
        &boot_tree,
        kernel_files.device_tree_dir.as_deref(),
        source_date_epoch,
    )?;

    // 3. /var moves to the data partition; erofs + dm-verity for the rest.
    let initial_var = work.path().join("var");
    std::fs::rename(root.join("var"), &initial_var).map_err(BuildError::io(root.join("var")))?;
    std::fs::create_dir(root.join("var")).map_err(BuildError::io(root.join("var")))?;
    compose::clamp_times(&root, source_date_epoch)?;
    let data_image = work.path().join("data.ext4");
    let partitions = variant.partition_bytes();
    let data_uuid = derive_guid(&[
        b"racklet-data-fs",
        variant.name.as_bytes(),
        &source_date_epoch.to_le_bytes(),
    ]);
    filesystem::make_data_ext4(
        &initial_var,
        &data_image,
        partitions.data,
        data_uuid,
        source_date_epoch,
    )?;
    let spinner = progress::stage_spinner("making the erofs root file system");
    let root_image = work.path().join("root.erofs");
    let root_uuid = derive_guid(&[
        b"racklet-root-fs",
        variant.name.as_bytes(),
        variant.version.as_bytes(),
        &source_date_epoch.to_le_bytes(),
    ]);
    filesystem::make_erofs(&root, &root_image, root_uuid, source_date_epoch)?;
    spinner.finish_and_clear();
    let (root_sha256, root_size) = sha256_file(&root_image)?;
    if root_size > partitions.root {
        return Err(BuildError::ConfigKey {
            file: variant.file.clone(),
            key: "partitions.root".into(),
            message: format!(
                "the root file system is {} MiB; the slot holds {} MiB",
                root_size.div_ceil(MIB),
                partitions.root / MIB
            ),
        });
    }
    let root_digest: [u8; 32] = hex::decode(&root_sha256)
        .expect("hex")
        .try_into()
        .expect("32 bytes");
    let salt = verity::salt_from_content_digest(&root_digest);
    let verity_uuid = derive_guid(&[b"racklet-verity", &root_digest]);
    let verity_image = work.path().join("verity.img");
    let bar = progress::bytes_bar(root_size, "computing the dm-verity tree");
    let tree = {
        let data = BufReader::with_capacity(
            1 << 20,
            std::fs::File::open(&root_image).map_err(BuildError::io(&root_image))?,
        );
        let hash_out = std::io::BufWriter::new(
            std::fs::File::create(&verity_image).map_err(BuildError::io(&verity_image))?,
        );
        verity::build_hash_tree_with_progress(
            data,
            root_size,
            &salt,
            verity_uuid.0,
            hash_out,
            &mut |done| bar.set_position(done),
        )
        .map_err(|error| BuildError::Format(error.into()))?
    };
    bar.finish_and_clear();
    let root_hash_hex = verity::root_hash_to_hex(&tree.root_hash);
    tracing::info!(root_hash = %root_hash_hex, size = root_size, "root file system sealed");

    // 4. One UKI per slot.
    let mut ukis = Vec::new();
    for slot in Slot::ALL {
        let cmdline =
            os_format::cmdline::slot_cmdline(&variant.kernel.cmdline, slot, &tree.root_hash)
                .map_err(|error| BuildError::ConfigKey {
                    file: variant.file.clone(),
                    key: "kernel.cmdline".into(),
                    message: error.to_string(),
                })?;
        let cmdline_path = work.path().join(format!("cmdline-{}", slot.name()));
        std::fs::write(&cmdline_path, &cmdline).map_err(BuildError::io(&cmdline_path))?;
        let output = update.join(format!("uki-{}.efi", slot.name()));
        uki::assemble(
            variant.arch,
            &uki::UkiParts {
                stub: &stub_copy,
                os_release: &os_release_path,
                cmdline: &cmdline_path,
                kernel: &kernel_files.image,
                initrd: &initramfs_path,
            },
            &output,
            source_date_epoch,
        )?;
        ukis.push((slot, output, cmdline));
    }

    // 5. ESP: boot loader + slot A's UKI (slot B is empty in a fresh image).
    let mut esp_contents = boot_contents;
    esp_contents.insert(
        bootloader::uki_path(Slot::A),
        std::fs::read(&ukis[0].1).map_err(BuildError::io(&ukis[0].1))?,
    );
    let esp_image = work.path().join("esp.img");
    let esp_volume_id = u32::from_le_bytes(tree.root_hash[..4].try_into().expect("4 bytes"));
    esp::write_esp(
        &esp_image,
        partitions.esp,
        esp_volume_id,
        &esp_contents,
        source_date_epoch,
    )?;

    // 6. GPT + disk image.
    let disk_guid = derive_guid(&[b"racklet-disk", variant.name.as_bytes(), &tree.root_hash]);
    let specs = vec![
        PartitionSpec {
            name: layout::ESP_PARTITION_NAME.into(),
            type_guid: layout::ESP_TYPE,
            unique_guid: derive_guid(&[b"racklet-esp", &disk_guid.0]),
            size_bytes: Some(partitions.esp),
            attributes: ATTRIBUTE_REQUIRED,
        },
        PartitionSpec {
            name: Slot::A.root_partition_name().into(),
            type_guid: variant.arch.root_type(),
            unique_guid: layout::root_partition_uuid(&tree.root_hash),
            size_bytes: Some(partitions.root),
            attributes: ATTRIBUTE_READ_ONLY,
        },
        PartitionSpec {
            name: Slot::A.verity_partition_name().into(),
            type_guid: variant.arch.root_verity_type(),
            unique_guid: layout::verity_partition_uuid(&tree.root_hash),
            size_bytes: Some(partitions.verity),
            attributes: ATTRIBUTE_READ_ONLY,
        },
        PartitionSpec {
            name: Slot::B.root_partition_name().into(),
            type_guid: variant.arch.root_type(),
            unique_guid: layout::empty_partition_uuid(&disk_guid, Slot::B.root_partition_name()),
            size_bytes: Some(partitions.root),
            attributes: ATTRIBUTE_READ_ONLY,
        },
        PartitionSpec {
            name: Slot::B.verity_partition_name().into(),
            type_guid: variant.arch.root_verity_type(),
            unique_guid: layout::empty_partition_uuid(&disk_guid, Slot::B.verity_partition_name()),
            size_bytes: Some(partitions.verity),
            attributes: ATTRIBUTE_READ_ONLY,
        },
        PartitionSpec {
            name: layout::DATA_PARTITION_NAME.into(),
            type_guid: layout::VAR_TYPE,
            unique_guid: derive_guid(&[b"racklet-data", &disk_guid.0]),
            size_bytes: Some(partitions.data),
            attributes: ATTRIBUTE_GROWFS,
        },
    ];
    let disk_size = DISK_MARGIN_BYTES * 2
        + partitions.esp
        + 2 * (partitions.root + partitions.verity)
        + partitions.data;
    let table = GptDisk::plan(disk_guid, disk_size, &specs)
        .map_err(|error| BuildError::Format(error.into()))?;
    let disk_path = out.join(DISK_IMAGE);
    let bar = progress::bytes_bar(
        partitions.esp + root_size + tree.hash_device_size_bytes + partitions.data,
        "writing disk.img",
    );
    disk::write_disk(
        &disk_path,
        &table,
        &[
            (layout::ESP_PARTITION_NAME, &esp_image),
            (Slot::A.root_partition_name(), &root_image),
            (Slot::A.verity_partition_name(), &verity_image),
            (layout::DATA_PARTITION_NAME, &data_image),
        ],
        &bar,
    )?;
    bar.finish_and_clear();

    // 7. Update artifacts.
    let bar = progress::bytes_bar(
        root_size + tree.hash_device_size_bytes,
        "compressing update artifacts",
    );
    let root_artifact = update.join(ROOT_ARTIFACT);
    let verity_artifact = update.join(VERITY_ARTIFACT);
    compress(&root_image, &root_artifact, &bar)?;
    compress(&verity_image, &verity_artifact, &bar)?;
    bar.finish_and_clear();
    let mut artifacts = vec![
        artifact(
            ROOT_ARTIFACT,
            ArtifactKind::RootFilesystem,
            Compression::Zstd,
            &root_artifact,
            &root_image,
        )?,
        artifact(
            VERITY_ARTIFACT,
            ArtifactKind::VerityHashTree,
            Compression::Zstd,
            &verity_artifact,
            &verity_image,
        )?,
    ];
    // The UKIs ship zstd-compressed (an arm64 kernel is an uncompressed
    // Image: 37 MB of UKI become 11); update/uki-<slot>.efi stays as built.
    for (slot, path, _) in &ukis {
        let name = format!("uki-{}.efi.zst", slot.name());
        let shipped = update.join(&name);
        compress(path, &shipped, &indicatif::ProgressBar::hidden())?;
        artifacts.push(artifact(
            &name,
            ArtifactKind::KernelImage { slot: *slot },
            Compression::Zstd,
            &shipped,
            path,
        )?);
    }
    let (disk_sha256, disk_size_written) = sha256_file(&disk_path)?;

    // 8. Manifest and SBOM.
    let mut package_records: Vec<PackageRecord> = packages
        .iter()
        .filter(|package| {
            package.locked.set != PackageSet::Boot
                || variant.boot.packages.contains(&package.locked.name)
        })
        .map(|CachedPackage { locked, .. }| PackageRecord {
            name: locked.name.clone(),
            version: locked.version.clone(),
            architecture: locked.architecture.clone(),
            sha256: locked.sha256.clone(),
        })
        .collect();
    package_records.sort();
    let manifest = BuildManifest {
        schema: BUILD_MANIFEST_SCHEMA,
        image_name: IMAGE_NAME.into(),
        variant: variant.name.clone(),
        arch: variant.arch,
        version: variant.version.clone(),
        source_date_epoch,
        kernel_version: kernel_files.version.clone(),
        kernel_cmdline: ukis[0].2.clone(),
        verity: VerityInfo {
            root_hash: root_hash_hex,
            salt: hex::encode(&salt),
            hash_algorithm: verity::ALGORITHM.into(),
            data_block_size: verity::VERITY_BLOCK_SIZE as u32,
            hash_block_size: verity::VERITY_BLOCK_SIZE as u32,
            data_blocks: tree.superblock.data_blocks,
        },
        k3s: match &k3s {
            None => K3sProvenance::Absent,
            Some(k3s) if k3s.recipe.file.is_some() => K3sProvenance::StandIn {
                name: k3s.recipe.name.clone(),
                sha256: k3s.sha256.clone(),
            },
            Some(k3s) => K3sProvenance::Official {
                version: k3s.recipe.version.clone(),
                url: k3s.recipe.asset(variant.arch)?.url.clone(),
                sha256: k3s.sha256.clone(),
            },
        },
        partitions,
        required_units: variant.health.required_units.clone(),
        artifacts,
        outputs: vec![OutputFile {
            name: DISK_IMAGE.into(),
            size: disk_size_written,
            sha256: disk_sha256,
        }],
        packages: package_records,
    };
    let manifest_path = out.join(BUILD_MANIFEST_FILE);
    std::fs::write(&manifest_path, manifest.to_json()).map_err(BuildError::io(&manifest_path))?;
    let sbom_path = out.join(SBOM_FILE);
    let mut sbom = serde_json::to_vec_pretty(&cyclonedx(&manifest)).expect("json");
    sbom.push(b'\n');
    std::fs::write(&sbom_path, sbom).map_err(BuildError::io(&sbom_path))?;

    // 9. Into place: the old build (if any) is replaced only now.
    let destination = options.output_root.join(&variant.name);
    if destination.exists() {
        let old = work.path().join("previous");
        std::fs::rename(&destination, &old).map_err(BuildError::io(&destination))?;
    }
    std::fs::rename(&out, &destination).map_err(BuildError::io(&destination))?;
    let digest = Sha256::digest(manifest.to_json());
    tracing::info!(output = %destination.display(), manifest_sha256 = %hex::encode(digest), "build complete");
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_whole_seconds() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(1_704_067_200), "2024-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(951_782_400 + 3661), "2000-02-29T01:01:01Z");
    }
}
