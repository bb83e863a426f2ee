//! The build's stages, in order. Each takes what the earlier stages produced
//! (typed, never a loose path or value picked up on the way) and returns what
//! it made; everything is written under the `WorkDir`.

use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};

use os_format::gpt::{
    GptDisk, Guid, PartitionSpec, ATTRIBUTE_GROWFS, ATTRIBUTE_READ_ONLY, ATTRIBUTE_REQUIRED,
};
use os_format::layout::{self, Arch, Slot};
use os_format::manifest::{
    Artifact, ArtifactKind, BuildManifest, Compression, K3sProvenance, OutputFile, PackageRecord,
    PartitionSizes, VerityInfo, BUILD_MANIFEST_FILE, BUILD_MANIFEST_SCHEMA, IMAGE_NAME,
};
use os_format::verity::{self, RootHash, VerityTree};

use super::{
    BuildOptions, K3sChoice, DISK_IMAGE, ROOT_ARTIFACT, SBOM_FILE, UPDATE_DIR, VERITY_ARTIFACT,
};
use crate::compose::{self, ComposeInput, K3sInput, KernelFiles};
use crate::error::{BuildError, Result};
use crate::esp::EspContents;
use crate::fetch::{sha256_file, Cache, Pinned};
use crate::inputs::{self, CachedPackage};
use crate::lock::{LockFile, PackageSet, Requested};
use crate::recipe::{Recipe, UpstreamRecipe, K3S_RECIPE, K3S_STAND_IN_RECIPE};
use crate::variant::{K3sPolicy, Variant};
use crate::{bootloader, disk, esp, filesystem, initramfs, kernel, progress, uki, unpack};

const MIB: u64 = 1024 * 1024;
/// Space before the first and after the last partition (GPT + alignment).
const DISK_MARGIN_BYTES: u64 = MIB;
/// The root is already LZ4HC-compressed inside erofs; higher levels gain little and cost time.
const ZSTD_LEVEL: i32 = 3;

/// The temporary directory beside the output a build is made in; `out/` is
/// what is renamed into place at the end.
pub(crate) struct WorkDir {
    directory: tempfile::TempDir,
}

impl WorkDir {
    pub(crate) fn create(output_root: &Path, variant_name: &str) -> Result<WorkDir> {
        std::fs::create_dir_all(output_root).map_err(BuildError::io(output_root))?;
        let directory = tempfile::Builder::new()
            .prefix(&format!(".{variant_name}.work-"))
            .tempdir_in(output_root)
            .map_err(BuildError::io(output_root))?;
        let work = WorkDir { directory };
        let update = work.update_dir();
        std::fs::create_dir_all(&update).map_err(BuildError::io(&update))?;
        Ok(work)
    }

    /// `name` in the work directory (intermediate files).
    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.directory.path().join(name)
    }

    /// What becomes `<output_root>/<variant>/`.
    pub(crate) fn out_dir(&self) -> PathBuf {
        self.path("out")
    }

    /// `update/` in the output: the UKIs and the compressed update artifacts.
    fn update_dir(&self) -> PathBuf {
        self.out_dir().join(UPDATE_DIR)
    }
}

/// Everything the image is made from, checked against the lock and present in the cache.
pub(crate) struct ResolvedInputs {
    project_root: PathBuf,
    /// Our cargo binaries for the variant's architecture.
    binaries_dir: PathBuf,
    /// The static racklet-init for the variant's architecture.
    init_binary: PathBuf,
    /// With the requested version and extra recipes applied.
    pub(crate) variant: Variant,
    recipes: Vec<Recipe>,
    update_trust: compose::UpdateTrust,
    k3s: Option<K3sInput>,
    /// Every package of the lock, its .deb in the cache.
    packages: Vec<CachedPackage>,
    /// The cache's directory of unpacked package stages.
    stage_dir: PathBuf,
    source_date_epoch: u64,
}

/// The root tree as composed, ready to seal, and what was taken from it before.
pub(crate) struct ComposedRoot {
    /// The root file system's tree, its /var moved out and its times clamped.
    tree: PathBuf,
    /// /var as composed: the data partition's first contents.
    initial_var: PathBuf,
    /// The variant's boot packages, unpacked (firmware, U-Boot).
    boot_tree: PathBuf,
    kernel: KernelFiles,
    /// The initramfs (racklet-init and the modules it loads, from the tree).
    initramfs: PathBuf,
}

/// The root as erofs and its dm-verity hash tree.
pub(crate) struct SealedRoot {
    erofs_image: PathBuf,
    erofs_size: u64,
    verity_image: PathBuf,
    salt: Vec<u8>,
    tree: VerityTree,
}

/// One slot's Unified Kernel Image.
pub(crate) struct Uki {
    slot: Slot,
    /// `update/uki-<slot>.efi` in the output.
    path: PathBuf,
    /// The kernel command line inside it (with the root hash).
    cmdline: String,
}

/// One UKI per slot, in [`Slot::ALL`] order.
pub(crate) struct Ukis {
    by_slot: Vec<Uki>,
}

impl Ukis {
    /// Slot A's: the one a fresh disk boots.
    fn slot_a(&self) -> &Uki {
        &self.by_slot[0]
    }
}

/// The ESP's file system image: the boot loader and slot A's UKI.
pub(crate) struct EspImage {
    path: PathBuf,
}

/// `disk.img` in the output, as the manifest records it.
pub(crate) struct DiskImage {
    size: u64,
    sha256: String,
}

/// The update artifacts written to `update/`, as the manifest lists them.
pub(crate) struct Artifacts {
    shipped: Vec<Artifact>,
}

/// Load the variant (with the options applied), its recipes and lock, and make
/// every pinned input present in the cache.
pub(crate) fn resolve_inputs(options: &BuildOptions) -> Result<ResolvedInputs> {
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
    // The SBOM's timestamp: an epoch past what it can say fails now, not at the end.
    rfc3339(source_date_epoch)?;
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
    Ok(ResolvedInputs {
        project_root: options.project_root.clone(),
        binaries_dir: options.binaries_dir.clone(),
        init_binary: options.init_binary.clone(),
        variant,
        recipes,
        update_trust,
        k3s,
        packages,
        stage_dir: cache.stage_dir(),
        source_date_epoch,
    })
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

/// Compose the root tree and build the initramfs from it (its modules come
/// from the tree); then move /var out (it goes to the data partition) and
/// clamp the times of what is left.
pub(crate) fn compose_root(inputs: &ResolvedInputs, work: &WorkDir) -> Result<ComposedRoot> {
    let variant = &inputs.variant;
    let source_date_epoch = inputs.source_date_epoch;
    let tree = work.path("root");
    let boot_tree = work.path("boot");
    for directory in [&tree, &boot_tree] {
        std::fs::create_dir_all(directory).map_err(BuildError::io(directory))?;
    }
    let input = ComposeInput {
        project_root: &inputs.project_root,
        variant,
        recipes: &inputs.recipes,
        root_packages: inputs::in_set(&inputs.packages, PackageSet::Root),
        kernel_packages: inputs::in_set(&inputs.packages, PackageSet::Kernel),
        binaries_dir: &inputs.binaries_dir,
        k3s: inputs.k3s.clone(),
        source_date_epoch,
        update_trust: inputs.update_trust.clone(),
    };
    tracing::info!(variant = %variant.name, packages = input.root_packages.len(), "composing the root file system");
    let kernel = compose::compose(&input, &inputs.stage_dir, &tree, &work.path("kernel"))?;
    for package in inputs::in_set(&inputs.packages, PackageSet::Boot) {
        unpack::unpack_deb(&package.path, &boot_tree)?;
    }

    let modules_dir = tree.join(compose::MODULES_DIR).join(&kernel.version);
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
        &inputs.init_binary,
        &tree,
        &kernel.version,
        &module_order,
        source_date_epoch,
    )?;
    let initramfs = work.path("initramfs.cpio");
    std::fs::write(&initramfs, &initramfs_bytes).map_err(BuildError::io(&initramfs))?;

    let var = tree.join("var");
    let initial_var = work.path("var");
    std::fs::rename(&var, &initial_var).map_err(BuildError::io(&var))?;
    std::fs::create_dir(&var).map_err(BuildError::io(&var))?;
    compose::clamp_times(&tree, source_date_epoch)?;
    Ok(ComposedRoot {
        tree,
        initial_var,
        boot_tree,
        kernel,
        initramfs,
    })
}

/// The composed tree as erofs, and its dm-verity hash tree (salted from the
/// erofs image's content, so equal roots get equal hashes).
pub(crate) fn seal_root(
    inputs: &ResolvedInputs,
    composed: &ComposedRoot,
    work: &WorkDir,
) -> Result<SealedRoot> {
    let variant = &inputs.variant;
    let source_date_epoch = inputs.source_date_epoch;
    let spinner = progress::stage_spinner("making the erofs root file system");
    let erofs_image = work.path("root.erofs");
    let root_uuid = derive_guid(&[
        b"racklet-root-fs",
        variant.name.as_bytes(),
        variant.version.as_bytes(),
        &source_date_epoch.to_le_bytes(),
    ]);
    filesystem::make_erofs(&composed.tree, &erofs_image, root_uuid, source_date_epoch)?;
    spinner.finish_and_clear();
    let (erofs_sha256, erofs_size) = sha256_file(&erofs_image)?;
    let slot_size = variant.partition_bytes().root;
    if erofs_size > slot_size {
        return Err(BuildError::ConfigKey {
            file: variant.file.clone(),
            key: "partitions.root".into(),
            message: format!(
                "the root file system is {} MiB; the slot holds {} MiB",
                erofs_size.div_ceil(MIB),
                slot_size / MIB
            ),
        });
    }
    let erofs_digest: [u8; 32] = hex::decode(&erofs_sha256)
        .expect("hex")
        .try_into()
        .expect("32 bytes");
    let salt = verity::salt_from_content_digest(&erofs_digest);
    let verity_uuid = verity::hash_device_uuid(&erofs_digest);
    let verity_image = work.path("verity.img");
    let bar = progress::bytes_bar(erofs_size, "computing the dm-verity tree");
    let tree = {
        let data = BufReader::with_capacity(
            1 << 20,
            std::fs::File::open(&erofs_image).map_err(BuildError::io(&erofs_image))?,
        );
        let hash_out = std::io::BufWriter::new(
            std::fs::File::create(&verity_image).map_err(BuildError::io(&verity_image))?,
        );
        verity::build_hash_tree_with_progress(
            data,
            erofs_size,
            &salt,
            verity_uuid.0,
            hash_out,
            &mut |done| bar.set_position(done),
        )
        .map_err(|error| BuildError::Format(error.into()))?
    };
    bar.finish_and_clear();
    tracing::info!(root_hash = %verity::root_hash_to_hex(&tree.root_hash), size = erofs_size, "root file system sealed");
    Ok(SealedRoot {
        erofs_image,
        erofs_size,
        verity_image,
        salt,
        tree,
    })
}

/// One UKI per slot: the stub and kernel from the composed root, its
/// initramfs, and a command line naming the slot and the sealed root's hash.
pub(crate) fn build_ukis(
    inputs: &ResolvedInputs,
    composed: &ComposedRoot,
    sealed: &SealedRoot,
    work: &WorkDir,
) -> Result<Ukis> {
    let variant = &inputs.variant;
    let stub = uki::stub_path(&composed.tree, variant.arch);
    let stub_copy = work.path("stub.efi");
    std::fs::copy(&stub, &stub_copy).map_err(BuildError::io(&stub))?;
    let os_release = work.path("os-release");
    std::fs::write(&os_release, compose::os_release(variant, &inputs.k3s))
        .map_err(BuildError::io(&os_release))?;
    let mut by_slot = Vec::new();
    for slot in Slot::ALL {
        let cmdline =
            os_format::cmdline::slot_cmdline(&variant.kernel.cmdline, slot, &sealed.tree.root_hash)
                .map_err(|error| BuildError::ConfigKey {
                    file: variant.file.clone(),
                    key: "kernel.cmdline".into(),
                    message: error.to_string(),
                })?;
        let cmdline_path = work.path(&format!("cmdline-{}", slot.name()));
        std::fs::write(&cmdline_path, &cmdline).map_err(BuildError::io(&cmdline_path))?;
        let path = work.update_dir().join(format!("uki-{}.efi", slot.name()));
        uki::assemble(
            variant.arch,
            &uki::UkiParts {
                stub: &stub_copy,
                os_release: &os_release,
                cmdline: &cmdline_path,
                kernel: &composed.kernel.image,
                initrd: &composed.initramfs,
            },
            &path,
            inputs.source_date_epoch,
        )?;
        by_slot.push(Uki {
            slot,
            path,
            cmdline,
        });
    }
    Ok(Ukis { by_slot })
}

/// The ESP: the boot loader (from the composed root and the boot packages)
/// and slot A's UKI; slot B is empty in a fresh image.
pub(crate) fn write_esp_image(
    inputs: &ResolvedInputs,
    composed: &ComposedRoot,
    sealed: &SealedRoot,
    ukis: &Ukis,
    work: &WorkDir,
) -> Result<EspImage> {
    let variant = &inputs.variant;
    let mut contents = EspContents::new();
    bootloader::add_boot_files(
        &mut contents,
        variant,
        &inputs.project_root,
        &composed.tree,
        &composed.boot_tree,
        composed.kernel.device_tree_dir.as_deref(),
        inputs.source_date_epoch,
    )?;
    let slot_a = &ukis.slot_a().path;
    contents.insert(
        bootloader::uki_path(Slot::A),
        std::fs::read(slot_a).map_err(BuildError::io(slot_a))?,
    );
    let path = work.path("esp.img");
    let volume_id = u32::from_le_bytes(sealed.tree.root_hash[..4].try_into().expect("4 bytes"));
    esp::write_esp(
        &path,
        variant.partition_bytes().esp,
        volume_id,
        &contents,
        inputs.source_date_epoch,
    )?;
    Ok(EspImage { path })
}

/// `disk.img`: the data partition made from the composed /var, then the GPT
/// and the ESP, slot A's root and verity and the data partition copied in
/// (slot B is empty).
pub(crate) fn write_disk_image(
    inputs: &ResolvedInputs,
    composed: &ComposedRoot,
    sealed: &SealedRoot,
    esp: &EspImage,
    work: &WorkDir,
) -> Result<DiskImage> {
    let variant = &inputs.variant;
    let partitions = variant.partition_bytes();
    let data_image = work.path("data.ext4");
    let data_uuid = derive_guid(&[
        b"racklet-data-fs",
        variant.name.as_bytes(),
        &inputs.source_date_epoch.to_le_bytes(),
    ]);
    filesystem::make_data_ext4(
        &composed.initial_var,
        &data_image,
        partitions.data,
        data_uuid,
        inputs.source_date_epoch,
    )?;
    let root_hash = &sealed.tree.root_hash;
    let disk_guid = derive_guid(&[b"racklet-disk", variant.name.as_bytes(), root_hash]);
    let table = partition_table(variant.arch, &partitions, root_hash, disk_guid)?;
    let path = work.out_dir().join(DISK_IMAGE);
    let bar = progress::bytes_bar(
        partitions.esp + sealed.erofs_size + sealed.tree.hash_device_size_bytes + partitions.data,
        "writing disk.img",
    );
    disk::write_disk(
        &path,
        &table,
        &[
            (layout::ESP_PARTITION_NAME, &esp.path),
            (Slot::A.root_partition_name(), &sealed.erofs_image),
            (Slot::A.verity_partition_name(), &sealed.verity_image),
            (layout::DATA_PARTITION_NAME, &data_image),
        ],
        &bar,
    )?;
    bar.finish_and_clear();
    let (sha256, size) = sha256_file(&path)?;
    Ok(DiskImage { size, sha256 })
}

/// The GPT of a fresh disk, planned: ESP, slot A's root and verity (PARTUUIDs
/// from the root hash), slot B's (empty: PARTUUIDs from the disk GUID), data;
/// a margin of [`DISK_MARGIN_BYTES`] before and after.
pub(crate) fn partition_table(
    arch: Arch,
    partitions: &PartitionSizes,
    root_hash: &RootHash,
    disk_guid: Guid,
) -> Result<GptDisk> {
    // A slot's root and verity partitions; only their PARTUUIDs differ between slots.
    let slot_partitions = |slot: Slot, root_guid: Guid, verity_guid: Guid| {
        [
            PartitionSpec {
                name: slot.root_partition_name().into(),
                type_guid: arch.root_type(),
                unique_guid: root_guid,
                size_bytes: Some(partitions.root),
                attributes: ATTRIBUTE_READ_ONLY,
            },
            PartitionSpec {
                name: slot.verity_partition_name().into(),
                type_guid: arch.root_verity_type(),
                unique_guid: verity_guid,
                size_bytes: Some(partitions.verity),
                attributes: ATTRIBUTE_READ_ONLY,
            },
        ]
    };
    let [root_a, verity_a] = slot_partitions(
        Slot::A,
        layout::root_partition_uuid(root_hash),
        layout::verity_partition_uuid(root_hash),
    );
    let [root_b, verity_b] = slot_partitions(
        Slot::B,
        layout::empty_partition_uuid(&disk_guid, Slot::B.root_partition_name()),
        layout::empty_partition_uuid(&disk_guid, Slot::B.verity_partition_name()),
    );
    let esp = PartitionSpec {
        name: layout::ESP_PARTITION_NAME.into(),
        type_guid: layout::ESP_TYPE,
        unique_guid: derive_guid(&[b"racklet-esp", &disk_guid.0]),
        size_bytes: Some(partitions.esp),
        attributes: ATTRIBUTE_REQUIRED,
    };
    let data = PartitionSpec {
        name: layout::DATA_PARTITION_NAME.into(),
        type_guid: layout::VAR_TYPE,
        unique_guid: derive_guid(&[b"racklet-data", &disk_guid.0]),
        size_bytes: Some(partitions.data),
        attributes: ATTRIBUTE_GROWFS,
    };
    let specs = [esp, root_a, verity_a, root_b, verity_b, data];
    let disk_size = DISK_MARGIN_BYTES * 2
        + partitions.esp
        + 2 * (partitions.root + partitions.verity)
        + partitions.data;
    GptDisk::plan(disk_guid, disk_size, &specs).map_err(|error| BuildError::Format(error.into()))
}

/// The update artifacts: the sealed root's erofs and verity images and the
/// UKIs, zstd-compressed into `update/` (the UKIs also stay there as built).
pub(crate) fn compress_artifacts(
    sealed: &SealedRoot,
    ukis: &Ukis,
    work: &WorkDir,
) -> Result<Artifacts> {
    let update = work.update_dir();
    let bar = progress::bytes_bar(
        sealed.erofs_size + sealed.tree.hash_device_size_bytes,
        "compressing update artifacts",
    );
    let root_artifact = update.join(ROOT_ARTIFACT);
    let verity_artifact = update.join(VERITY_ARTIFACT);
    compress(&sealed.erofs_image, &root_artifact, &bar)?;
    compress(&sealed.verity_image, &verity_artifact, &bar)?;
    bar.finish_and_clear();
    let mut shipped = vec![
        artifact(
            ROOT_ARTIFACT,
            ArtifactKind::RootFilesystem,
            Compression::Zstd,
            &root_artifact,
            &sealed.erofs_image,
        )?,
        artifact(
            VERITY_ARTIFACT,
            ArtifactKind::VerityHashTree,
            Compression::Zstd,
            &verity_artifact,
            &sealed.verity_image,
        )?,
    ];
    // The UKIs ship zstd-compressed (an arm64 kernel is an uncompressed
    // Image: 37 MB of UKI become 11); update/uki-<slot>.efi stays as built.
    for uki in &ukis.by_slot {
        let name = format!("uki-{}.efi.zst", uki.slot.name());
        let compressed = update.join(&name);
        compress(&uki.path, &compressed, &indicatif::ProgressBar::hidden())?;
        shipped.push(artifact(
            &name,
            ArtifactKind::KernelImage { slot: uki.slot },
            Compression::Zstd,
            &compressed,
            &uki.path,
        )?);
    }
    Ok(Artifacts { shipped })
}

/// `manifest.json` and the SBOM, written to the output; returns the manifest.
pub(crate) fn write_manifest(
    inputs: &ResolvedInputs,
    composed: &ComposedRoot,
    sealed: &SealedRoot,
    ukis: &Ukis,
    disk: DiskImage,
    artifacts: Artifacts,
    work: &WorkDir,
) -> Result<BuildManifest> {
    let variant = &inputs.variant;
    let mut package_records: Vec<PackageRecord> = inputs
        .packages
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
        source_date_epoch: inputs.source_date_epoch,
        kernel_version: composed.kernel.version.clone(),
        kernel_cmdline: ukis.slot_a().cmdline.clone(),
        verity: VerityInfo {
            root_hash: verity::root_hash_to_hex(&sealed.tree.root_hash),
            salt: hex::encode(&sealed.salt),
            hash_algorithm: verity::ALGORITHM.into(),
            data_block_size: verity::VERITY_BLOCK_SIZE as u32,
            hash_block_size: verity::VERITY_BLOCK_SIZE as u32,
            data_blocks: sealed.tree.superblock.data_blocks,
        },
        k3s: match &inputs.k3s {
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
        partitions: variant.partition_bytes(),
        required_units: variant.health.required_units.clone(),
        artifacts: artifacts.shipped,
        outputs: vec![OutputFile {
            name: DISK_IMAGE.into(),
            size: disk.size,
            sha256: disk.sha256,
        }],
        packages: package_records,
    };
    let out = work.out_dir();
    let manifest_path = out.join(BUILD_MANIFEST_FILE);
    std::fs::write(&manifest_path, manifest.to_json()).map_err(BuildError::io(&manifest_path))?;
    let sbom_path = out.join(SBOM_FILE);
    let mut sbom = serde_json::to_vec_pretty(&cyclonedx(&manifest)?).expect("json");
    sbom.push(b'\n');
    std::fs::write(&sbom_path, sbom).map_err(BuildError::io(&sbom_path))?;
    Ok(manifest)
}

fn derive_guid(parts: &[&[u8]]) -> Guid {
    Guid::derive_from_parts(parts)
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
fn cyclonedx(manifest: &BuildManifest) -> Result<serde_json::Value> {
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
    Ok(serde_json::json!({
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "version": 1,
        "serialNumber": format!("urn:uuid:{}", Guid::derive(manifest.verity.root_hash.as_bytes())),
        "metadata": {
            "timestamp": rfc3339(manifest.source_date_epoch)?,
            "component": {"type": "operating-system", "name": manifest.image_name, "version": manifest.version},
        },
        "components": components,
    }))
}

/// Seconds since the epoch as RFC 3339 UTC, whole seconds (`2024-01-01T00:00:00Z`).
fn rfc3339(seconds: u64) -> Result<String> {
    let timestamp = i64::try_from(seconds)
        .ok()
        .and_then(|seconds| jiff::Timestamp::from_second(seconds).ok())
        .ok_or_else(|| {
            BuildError::Other(format!(
                "source date epoch {seconds} is after {}, the latest time the SBOM can state",
                jiff::Timestamp::MAX
            ))
        })?;
    Ok(format!("{timestamp:.0}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_whole_seconds() {
        assert_eq!(rfc3339(0).unwrap(), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_704_067_200).unwrap(), "2024-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400 + 3661).unwrap(), "2000-02-29T01:01:01Z");
        assert_eq!(rfc3339(253_402_207_200).unwrap(), "9999-12-30T22:00:00Z");
    }

    #[test]
    fn rfc3339_refuses_an_epoch_past_year_9999() {
        for seconds in [253_402_300_800, u64::MAX] {
            let error = rfc3339(seconds).unwrap_err().to_string();
            assert!(error.contains(&seconds.to_string()), "{error}");
        }
    }

    const SIZES: PartitionSizes = PartitionSizes {
        esp: 64 * MIB,
        root: 512 * MIB,
        verity: 8 * MIB,
        data: 256 * MIB,
    };
    /// Its halves differ: they become slot A's two PARTUUIDs.
    const ROOT_HASH: RootHash = *b"0123456789abcdefghijklmnopqrstuv";
    const DISK_GUID: Guid = Guid([0x11; 16]);

    fn planned(arch: Arch) -> GptDisk {
        partition_table(arch, &SIZES, &ROOT_HASH, DISK_GUID).expect("plans")
    }

    #[test]
    fn partition_table_lays_out_esp_both_slots_and_data() {
        let table = planned(Arch::X86_64);
        let (root, verity) = (layout::ROOT_X86_64_TYPE, layout::ROOT_VERITY_X86_64_TYPE);
        let entries: Vec<(&str, Guid, u64, u64)> = table
            .partitions
            .iter()
            .map(|entry| {
                (
                    entry.name.as_str(),
                    entry.type_guid,
                    entry.size_bytes(),
                    entry.attributes,
                )
            })
            .collect();
        assert_eq!(
            entries,
            [
                ("esp", layout::ESP_TYPE, SIZES.esp, ATTRIBUTE_REQUIRED),
                ("root-a", root, SIZES.root, ATTRIBUTE_READ_ONLY),
                ("verity-a", verity, SIZES.verity, ATTRIBUTE_READ_ONLY),
                ("root-b", root, SIZES.root, ATTRIBUTE_READ_ONLY),
                ("verity-b", verity, SIZES.verity, ATTRIBUTE_READ_ONLY),
                ("data", layout::VAR_TYPE, SIZES.data, ATTRIBUTE_GROWFS),
            ]
        );
        assert!(
            table
                .partitions
                .windows(2)
                .all(|pair| pair[0].last_lba + 1 == pair[1].first_lba),
            "in disk order, one after the other: {:?}",
            table.partitions
        );
    }

    #[test]
    fn partition_table_takes_the_arch_root_types() {
        let table = planned(Arch::Aarch64);
        for slot in Slot::ALL {
            let (_, root) = table.find_by_name(slot.root_partition_name()).unwrap();
            let (_, verity) = table.find_by_name(slot.verity_partition_name()).unwrap();
            assert_eq!(root.type_guid, layout::ROOT_AARCH64_TYPE);
            assert_eq!(verity.type_guid, layout::ROOT_VERITY_AARCH64_TYPE);
        }
    }

    #[test]
    fn partition_table_names_slot_a_by_root_hash_and_slot_b_empty() {
        let table = planned(Arch::X86_64);
        let unique = |name: &str| table.find_by_name(name).unwrap().1.unique_guid;
        assert_eq!(table.disk_guid, DISK_GUID);
        assert_eq!(
            unique(Slot::A.root_partition_name()),
            layout::root_partition_uuid(&ROOT_HASH)
        );
        assert_eq!(
            unique(Slot::A.verity_partition_name()),
            layout::verity_partition_uuid(&ROOT_HASH)
        );
        for name in [
            Slot::B.root_partition_name(),
            Slot::B.verity_partition_name(),
        ] {
            assert_eq!(unique(name), layout::empty_partition_uuid(&DISK_GUID, name));
        }
        assert_eq!(unique("esp"), derive_guid(&[b"racklet-esp", &DISK_GUID.0]));
        assert_eq!(
            unique("data"),
            derive_guid(&[b"racklet-data", &DISK_GUID.0])
        );
        let other_disk =
            partition_table(Arch::X86_64, &SIZES, &ROOT_HASH, Guid([0x22; 16])).unwrap();
        let other = |name: &str| other_disk.find_by_name(name).unwrap().1.unique_guid;
        assert_eq!(
            other(Slot::A.root_partition_name()),
            unique(Slot::A.root_partition_name()),
            "slot A's PARTUUIDs follow the root, not the disk"
        );
        assert_ne!(
            other(Slot::B.root_partition_name()),
            unique(Slot::B.root_partition_name())
        );
    }

    #[test]
    fn partition_table_disk_is_the_partitions_and_a_mib_each_side() {
        let table = planned(Arch::X86_64);
        assert_eq!(
            table.disk_size_bytes,
            2 * MIB + SIZES.esp + 2 * (SIZES.root + SIZES.verity) + SIZES.data
        );
        let (_, esp) = table.find_by_name("esp").unwrap();
        let (_, data) = table.find_by_name("data").unwrap();
        assert_eq!(esp.offset_bytes(), MIB);
        assert_eq!(
            data.offset_bytes() + data.size_bytes(),
            table.disk_size_bytes - MIB
        );
    }

    #[test]
    fn partition_table_reports_a_table_that_does_not_plan() {
        let no_esp = PartitionSizes { esp: 0, ..SIZES };
        assert!(matches!(
            partition_table(Arch::X86_64, &no_esp, &ROOT_HASH, DISK_GUID),
            Err(BuildError::Format(_))
        ));
    }
}
