//! Compose the root file system tree from pinned packages, our binaries and
//! declared configuration. What Debian's maintainer scripts would do is done
//! here, in the declared steps listed in docs/packages.md:
//!
//! 1. merged-/usr skeleton, then every root package unpacked in name order;
//! 2. the kernel package unpacked; its image and config moved out of the root
//!    (they go into the UKI), `depmod` run for its modules;
//! 3. users and groups: base-passwd's master files, then `systemd-sysusers --root`;
//! 4. alternatives from the recipes (`/etc/alternatives/<name>` links);
//! 5. units from the recipes enabled with `systemctl --root`;
//! 6. the CA bundle concatenated as update-ca-certificates would;
//! 7. `ldconfig -r` for native images (Debian's loader searches the multiarch
//!    directories without a cache, so foreign-arch images skip it);
//! 8. our binaries, recipe files, k3s, os-release, machine-id, fstab, then
//!    `systemd-sysusers --root` again for the users our recipes declare;
//! 9. every timestamp clamped to SOURCE_DATE_EPOCH.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use os_format::layout::Arch;

use crate::error::{BuildError, Result};
use crate::inputs::CachedPackage;
use crate::recipe::{parse_mode, Recipe, RecipeFile, UpstreamRecipe, PACKAGES_DIR};
use crate::unpack;
use crate::variant::Variant;

const BASE_PASSWD_MASTER: &str = "usr/share/base-passwd/passwd.master";
const BASE_GROUP_MASTER: &str = "usr/share/base-passwd/group.master";
const OS_RELEASE: &str = "usr/lib/os-release";
const CA_CERTIFICATES_DIR: &str = "usr/share/ca-certificates";
const CA_BUNDLE: &str = "etc/ssl/certs/ca-certificates.crt";
pub const MODULES_DIR: &str = "usr/lib/modules";
const KERNEL_VERSION_FILE: &str = "version";
const DEVICE_TREE_DIR: &str = "dtbs";
const HOSTNAME: &str = "racklet";

/// k3s (or its stand-in) as it goes into the image.
#[derive(Clone, Debug)]
pub struct K3sInput {
    pub recipe: UpstreamRecipe,
    pub binary: PathBuf,
    pub sha256: String,
}

pub struct ComposeInput<'a> {
    pub project_root: &'a Path,
    pub variant: &'a Variant,
    pub recipes: &'a [Recipe],
    pub root_packages: Vec<&'a CachedPackage>,
    pub kernel_packages: Vec<&'a CachedPackage>,
    /// Directory holding our cargo binaries for the variant's architecture.
    pub binaries_dir: &'a Path,
    pub k3s: Option<K3sInput>,
    pub source_date_epoch: u64,
    pub update_trust: UpdateTrust,
}

/// What the update agent in the image trusts and where it looks.
#[derive(Clone, Debug, Default)]
pub struct UpdateTrust {
    /// The signed TUF root.json (the first trust anchor), if keys exist.
    pub root_json: Option<Vec<u8>>,
    pub metadata_url: Option<String>,
    pub targets_url: Option<String>,
    /// The variant's `update.allow_insecure_http`.
    pub allow_insecure_http: bool,
}

/// The agent's image defaults (TOML): URLs and the units the health gate needs.
pub fn update_defaults(variant: &Variant, trust: &UpdateTrust) -> String {
    let quote = |value: &str| serde_json::to_string(value).expect("a JSON string is a TOML string");
    let mut text =
        String::from("# Written by the image builder. Override in /etc/racklet/update.toml.\n");
    if let Some(url) = &trust.metadata_url {
        text.push_str(&format!("metadata_url = {}\n", quote(url)));
    }
    if let Some(url) = &trust.targets_url {
        text.push_str(&format!("targets_url = {}\n", quote(url)));
    }
    if trust.allow_insecure_http {
        text.push_str("# The variant allows plain http:// to its update server (variant.toml).\nallow_insecure_http = true\n");
    }
    text.push_str("\n[health]\nrequired_units = [");
    text.push_str(
        &variant
            .health
            .required_units
            .iter()
            .map(|unit| quote(unit))
            .collect::<Vec<_>>()
            .join(", "),
    );
    text.push_str("]\n");
    text
}

/// The kernel pieces that leave the root for the UKI and the ESP.
#[derive(Clone, Debug)]
pub struct KernelFiles {
    pub version: String,
    pub image: PathBuf,
    pub config: PathBuf,
    /// `usr/lib/linux-image-<version>` (device trees), arm64 only.
    pub device_tree_dir: Option<PathBuf>,
}

/// Run a host tool the composition uses; a missing one names its Debian package.
fn run(command: &mut Command) -> Result<()> {
    let program = command.get_program().to_string_lossy().into_owned();
    let package = match program.as_str() {
        "depmod" => "kmod",
        "systemd-sysusers" | "systemctl" => "systemd",
        "ldconfig" => "libc-bin",
        _ => "coreutils",
    };
    crate::host_tool::run(command, &program, package).map(drop)
}

fn write_file(path: &Path, contents: impl AsRef<[u8]>, mode: u32) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(BuildError::io(parent))?;
    }
    if path.is_symlink() {
        std::fs::remove_file(path).map_err(BuildError::io(path))?;
    }
    std::fs::write(path, contents).map_err(BuildError::io(path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(BuildError::io(path))
}

fn symlink(target: &str, link: &Path) -> Result<()> {
    if let Some(parent) = link.parent() {
        std::fs::create_dir_all(parent).map_err(BuildError::io(parent))?;
    }
    if link.symlink_metadata().is_ok() {
        std::fs::remove_file(link).map_err(BuildError::io(link))?;
    }
    std::os::unix::fs::symlink(target, link).map_err(BuildError::io(link))
}

/// Build the root tree at `root` (an empty directory); the kernel's files go to `kernel_dir`.
/// Bumped whenever the Debian stage's output would change for the same inputs.
const DEBIAN_STAGE_FORMAT: &str = "racklet-debian-stage-1";

/// The content key of the Debian stage (steps 1-4 and 6 above): the builder
/// itself, the packages, the recipes, the architecture and the time stamp.
/// Our binaries are not part of it, so changing them reuses the stage.
pub fn debian_stage_key(input: &ComposeInput) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(DEBIAN_STAGE_FORMAT);
    let builder = std::env::current_exe().map_err(BuildError::io("current executable"))?;
    let mut file = std::fs::File::open(&builder).map_err(BuildError::io(&builder))?;
    std::io::copy(&mut file, &mut hasher).map_err(BuildError::io(&builder))?;
    for package in input
        .root_packages
        .iter()
        .chain(input.kernel_packages.iter())
    {
        hasher.update(package.locked.sha256.as_bytes());
    }
    for recipe in input.recipes {
        let path = crate::recipe::recipe_path(input.project_root, &recipe.name);
        hasher.update(std::fs::read(&path).map_err(BuildError::io(&path))?);
    }
    hasher.update(input.variant.arch.as_str());
    for directory in &input.variant.kernel.omit_modules {
        hasher.update(format!("omit {directory}\n"));
    }
    hasher.update(input.source_date_epoch.to_le_bytes());
    Ok(hex::encode(hasher.finalize()))
}

/// The Debian stage, from the stage cache when its key is there: the tree is
/// copied (`cp -a`, ownership and modes kept) instead of unpacked again.
pub fn debian_stage(
    input: &ComposeInput,
    stage_dir: &Path,
    root: &Path,
    kernel_dir: &Path,
) -> Result<KernelFiles> {
    let key = debian_stage_key(input)?;
    let cached = stage_dir.join(format!("debian-{key}"));
    let copy = |from: &Path, to: &Path| -> Result<()> {
        std::fs::create_dir_all(to).map_err(BuildError::io(to))?;
        run(Command::new("cp")
            .arg("-a")
            .arg("--reflink=auto")
            .arg(format!("{}/.", from.display()))
            .arg(to))
    };
    if cached.join("complete").is_file() {
        tracing::info!(stage = %cached.display(), "Debian stage from the cache");
        copy(&cached.join("root"), root)?;
        copy(&cached.join("kernel"), kernel_dir)?;
    } else {
        compose_debian(input, root, kernel_dir)?;
        std::fs::create_dir_all(stage_dir).map_err(BuildError::io(stage_dir))?;
        let temporary = tempfile::Builder::new()
            .prefix(".debian-")
            .tempdir_in(stage_dir)
            .map_err(BuildError::io(stage_dir))?;
        copy(root, &temporary.path().join("root"))?;
        copy(kernel_dir, &temporary.path().join("kernel"))?;
        std::fs::write(temporary.path().join("complete"), &key)
            .map_err(BuildError::io(temporary.path()))?;
        let staged = temporary.keep();
        if std::fs::rename(&staged, &cached).is_err() {
            // Another build stored the same stage meanwhile.
            let _ = std::fs::remove_dir_all(&staged);
        }
        prune_stages(stage_dir, KEPT_DEBIAN_STAGES);
    }
    kernel_files(kernel_dir, root)
}

/// How many Debian stages (about 0.5 GB each) the cache keeps.
const KEPT_DEBIAN_STAGES: usize = 4;

/// Remove all but the `keep` most recently stored Debian stages.
fn prune_stages(stage_dir: &Path, keep: usize) {
    let mut stages: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(stage_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("debian-"))
        .filter_map(|entry| Some((entry.metadata().ok()?.modified().ok()?, entry.path())))
        .collect();
    stages.sort();
    let excess = stages.len().saturating_sub(keep);
    for (_, path) in stages.into_iter().take(excess) {
        tracing::debug!(stage = %path.display(), "pruning an old Debian stage");
        let _ = std::fs::remove_dir_all(path);
    }
}

/// Steps 1-4 and 6: everything that comes from Debian alone.
pub fn compose_debian(input: &ComposeInput, root: &Path, kernel_dir: &Path) -> Result<KernelFiles> {
    unpack::prepare_tree(root, input.variant.arch == Arch::X86_64)?;
    let total = input.root_packages.len() + input.kernel_packages.len();
    let bar = crate::progress::bytes_bar(total as u64, "unpacking packages");
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:32} [{bar:30}] {pos}/{len}")
            .expect("template"),
    );
    for package in input
        .root_packages
        .iter()
        .chain(input.kernel_packages.iter())
    {
        unpack::unpack_deb(&package.path, root).map_err(|error| BuildError::Package {
            what: format!("{} {}", package.locked.name, package.locked.version),
            message: error.to_string(),
        })?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let kernel = move_kernel_out(root, kernel_dir)?;
    let depmod = || {
        run(Command::new("depmod")
            .arg("-b")
            .arg(root)
            .arg(&kernel.version))
    };
    depmod()?;
    if !input.variant.kernel.omit_modules.is_empty() {
        omit_modules(input.variant, &root.join(MODULES_DIR).join(&kernel.version))?;
        depmod()?;
    }
    create_users(root, input.source_date_epoch)?;
    for recipe in input.recipes {
        for alternative in &recipe.alternatives {
            let target = root.join(alternative.path.trim_start_matches('/'));
            if target.symlink_metadata().is_err() {
                return Err(BuildError::ConfigKey {
                    file: crate::recipe::recipe_path(input.project_root, &recipe.name),
                    key: "alternatives.path".into(),
                    message: format!("{} is not in the image", alternative.path),
                });
            }
            let chosen = format!("/etc/alternatives/{}", alternative.name);
            symlink(
                &alternative.path,
                &root.join(chosen.trim_start_matches('/')),
            )?;
            symlink(
                &chosen,
                &root.join(alternative.link.trim_start_matches('/')),
            )?;
        }
    }
    write_ca_bundle(root)?;
    Ok(kernel)
}

/// Steps 5 and 7-9: our binaries, k3s and configuration on top of the Debian stage.
pub fn compose(
    input: &ComposeInput,
    stage_dir: &Path,
    root: &Path,
    kernel_dir: &Path,
) -> Result<KernelFiles> {
    let kernel = debian_stage(input, stage_dir, root, kernel_dir)?;
    install_binaries(input, root)?;
    install_k3s(input, root)?;
    write_system_files(input, root)?;
    // Users our recipes declare (e.g. racklet-update, sshd): in the image,
    // so that units, D-Bus policies and the ESP's mount name them from the
    // first boot on.
    run_sysusers(root, input.source_date_epoch)?;
    enable_units(input, root)?;
    if native_arch() == Some(input.variant.arch) {
        run(Command::new("ldconfig").arg("-X").arg("-r").arg(root))?;
    }
    // Nothing of the build host's package management belongs in the image.
    for leftover in [
        "var/cache/ldconfig/aux-cache",
        "var/lib/dpkg",
        "etc/ld.so.cache~",
    ] {
        let path = root.join(leftover);
        if path.is_dir() {
            std::fs::remove_dir_all(&path).map_err(BuildError::io(&path))?;
        } else if path.symlink_metadata().is_ok() {
            std::fs::remove_file(&path).map_err(BuildError::io(&path))?;
        }
    }
    clamp_times(root, input.source_date_epoch)?;
    Ok(kernel)
}

fn native_arch() -> Option<Arch> {
    match std::env::consts::ARCH {
        "x86_64" => Some(Arch::X86_64),
        "aarch64" => Some(Arch::Aarch64),
        _ => None,
    }
}

fn move_kernel_out(root: &Path, kernel_dir: &Path) -> Result<KernelFiles> {
    let boot = root.join("boot");
    let mut version = None;
    for entry in std::fs::read_dir(&boot).map_err(BuildError::io(&boot))? {
        let name = entry
            .map_err(BuildError::io(&boot))?
            .file_name()
            .to_string_lossy()
            .into_owned();
        if let Some(found) = name.strip_prefix("vmlinuz-") {
            if version.replace(found.to_string()).is_some() {
                return Err(BuildError::Other(format!(
                    "{}: more than one kernel; expected exactly one kernel package in the lock",
                    boot.display()
                )));
            }
        }
    }
    let version = version.ok_or_else(|| {
        BuildError::Other(format!(
            "{}: no vmlinuz-*; the kernel package did not unpack a kernel",
            boot.display()
        ))
    })?;
    std::fs::create_dir_all(kernel_dir).map_err(BuildError::io(kernel_dir))?;
    let image = kernel_dir.join("vmlinuz");
    let config = kernel_dir.join("config");
    std::fs::rename(boot.join(format!("vmlinuz-{version}")), &image)
        .map_err(BuildError::io(&image))?;
    std::fs::rename(boot.join(format!("config-{version}")), &config)
        .map_err(BuildError::io(&config))?;
    std::fs::remove_dir_all(&boot).map_err(BuildError::io(&boot))?;
    std::fs::create_dir(&boot).map_err(BuildError::io(&boot))?;
    let device_trees = root.join(format!("usr/lib/linux-image-{version}"));
    if device_trees.is_dir() {
        let destination = kernel_dir.join(DEVICE_TREE_DIR);
        std::fs::rename(&device_trees, &destination).map_err(BuildError::io(&destination))?;
    }
    let version_file = kernel_dir.join(KERNEL_VERSION_FILE);
    std::fs::write(&version_file, &version).map_err(BuildError::io(&version_file))?;

    kernel_files(kernel_dir, root)
}

/// Remove the variant's `kernel.omit_modules` (and what needs them) from
/// `modules_dir`, whose modules.dep lists every module; depmod runs again after.
fn omit_modules(variant: &Variant, modules_dir: &Path) -> Result<()> {
    let modules_dep = modules_dir.join("modules.dep");
    let text = std::fs::read_to_string(&modules_dep).map_err(BuildError::io(&modules_dep))?;
    let omitted = crate::kernel::omitted_modules(
        &text,
        &variant.kernel.omit_modules,
        &variant.kernel.initramfs_modules,
        &variant.file,
    )?;
    for module in &omitted {
        let path = modules_dir.join(module);
        std::fs::remove_file(&path).map_err(BuildError::io(&path))?;
    }
    // The listed directories go whole (one may lie inside another).
    for directory in &variant.kernel.omit_modules {
        let path = modules_dir.join(directory.trim_end_matches('/'));
        match std::fs::remove_dir_all(&path) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                return Err(BuildError::Io {
                    path,
                    source: error,
                })
            }
            _ => {}
        }
    }
    tracing::info!(
        modules = omitted.len(),
        directories = ?variant.kernel.omit_modules,
        "kernel modules left out (kernel.omit_modules and the modules that need them)"
    );
    Ok(())
}

/// The kernel pieces in `kernel_dir` as `move_kernel_out` left them.
fn kernel_files(kernel_dir: &Path, root: &Path) -> Result<KernelFiles> {
    let version_file = kernel_dir.join(KERNEL_VERSION_FILE);
    let version = std::fs::read_to_string(&version_file).map_err(BuildError::io(&version_file))?;
    if !root.join(MODULES_DIR).join(&version).is_dir() {
        return Err(BuildError::Other(format!(
            "kernel {version} has no modules under /{MODULES_DIR}"
        )));
    }
    let device_tree_dir = kernel_dir.join(DEVICE_TREE_DIR);
    Ok(KernelFiles {
        version,
        image: kernel_dir.join("vmlinuz"),
        config: kernel_dir.join("config"),
        device_tree_dir: device_tree_dir.is_dir().then_some(device_tree_dir),
    })
}

fn create_users(root: &Path, source_date_epoch: u64) -> Result<()> {
    let passwd = std::fs::read_to_string(root.join(BASE_PASSWD_MASTER))
        .map_err(BuildError::io(root.join(BASE_PASSWD_MASTER)))?;
    let group = std::fs::read_to_string(root.join(BASE_GROUP_MASTER))
        .map_err(BuildError::io(root.join(BASE_GROUP_MASTER)))?;
    write_file(&root.join("etc/passwd"), &passwd, 0o644)?;
    write_file(&root.join("etc/group"), &group, 0o644)?;
    // Every account locked: there are no passwords in an image.
    let days = source_date_epoch / 86_400;
    let shadow: String = passwd
        .lines()
        .filter_map(|line| line.split(':').next())
        .map(|user| format!("{user}:*:{days}:0:99999:7:::\n"))
        .collect();
    let gshadow: String = group
        .lines()
        .filter_map(|line| line.split(':').next())
        .map(|name| format!("{name}:*::\n"))
        .collect();
    write_file(&root.join("etc/shadow"), shadow, 0o640)?;
    write_file(&root.join("etc/gshadow"), gshadow, 0o640)?;
    let shadow_gid = group
        .lines()
        .find(|line| line.starts_with("shadow:"))
        .and_then(|line| line.split(':').nth(2))
        .and_then(|gid| gid.parse::<u32>().ok());
    if let Some(gid) = shadow_gid {
        for file in ["etc/shadow", "etc/gshadow"] {
            std::os::unix::fs::lchown(root.join(file), Some(0), Some(gid))
                .map_err(BuildError::io(root.join(file)))?;
        }
    }
    run_sysusers(root, source_date_epoch)
}

/// `systemd-sysusers --root`: the users and groups that `usr/lib/sysusers.d`
/// declares, added to the image's files (run for Debian's packages, then
/// again for our recipes' files, so that no user is left for the first boot).
fn run_sysusers(root: &Path, source_date_epoch: u64) -> Result<()> {
    run(Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.display()))
        .env("SOURCE_DATE_EPOCH", source_date_epoch.to_string()))?;
    // sysusers leaves backups of the files it changed.
    for backup in ["etc/passwd-", "etc/group-", "etc/shadow-", "etc/gshadow-"] {
        let _ = std::fs::remove_file(root.join(backup));
    }
    Ok(())
}

fn write_ca_bundle(root: &Path) -> Result<()> {
    let directory = root.join(CA_CERTIFICATES_DIR);
    if !directory.is_dir() {
        return Ok(());
    }
    let mut certificates = Vec::new();
    collect_files(&directory, &mut certificates)?;
    certificates.retain(|path| path.extension().is_some_and(|extension| extension == "crt"));
    certificates.sort();
    let mut bundle = Vec::new();
    for certificate in &certificates {
        let mut text = std::fs::read(certificate).map_err(BuildError::io(certificate))?;
        if !text.ends_with(b"\n") {
            text.push(b'\n');
        }
        bundle.extend_from_slice(&text);
    }
    write_file(&root.join(CA_BUNDLE), &bundle, 0o644)?;
    // The same bundle on the read-only root: racklet-node adds the card's
    // [trust] certificates to this one, and a removed certificate goes.
    let image_bundle = os_format::settings::IMAGE_CA_BUNDLE_PATH.trim_start_matches('/');
    write_file(&root.join(image_bundle), &bundle, 0o644)
}

fn collect_files(directory: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(directory).map_err(BuildError::io(directory))? {
        let path = entry.map_err(BuildError::io(directory))?.path();
        if path.is_dir() && !path.is_symlink() {
            collect_files(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

fn install_recipe_file(project_root: &Path, root: &Path, file: &RecipeFile) -> Result<()> {
    let source = project_root.join(PACKAGES_DIR).join(&file.source);
    let bytes = std::fs::read(&source).map_err(BuildError::io(&source))?;
    write_file(
        &root.join(file.target.trim_start_matches('/')),
        bytes,
        parse_mode(&file.mode).expect("validated"),
    )
}

fn install_binaries(input: &ComposeInput, root: &Path) -> Result<()> {
    for recipe in input.recipes {
        for binary in &recipe.binaries {
            let source = input.binaries_dir.join(binary);
            let bytes = std::fs::read(&source).map_err(|error| BuildError::Package {
                what: format!("our binary `{binary}`"),
                message: format!(
                    "{}: {error}; expected it built for {} (the Makefile runs cargo build --target {})",
                    source.display(),
                    input.variant.arch,
                    input.variant.arch.rust_target()
                ),
            })?;
            write_file(&root.join("usr/bin").join(binary), bytes, 0o755)?;
        }
        for file in &recipe.files {
            install_recipe_file(input.project_root, root, file)?;
        }
        for link in &recipe.links {
            symlink(&link.target, &root.join(link.path.trim_start_matches('/')))?;
        }
    }
    Ok(())
}

fn install_k3s(input: &ComposeInput, root: &Path) -> Result<()> {
    let Some(k3s) = &input.k3s else {
        return Ok(());
    };
    let bytes = std::fs::read(&k3s.binary).map_err(BuildError::io(&k3s.binary))?;
    write_file(
        &root.join(k3s.recipe.install.trim_start_matches('/')),
        bytes,
        0o755,
    )?;
    for file in &k3s.recipe.files {
        install_recipe_file(input.project_root, root, file)?;
    }
    Ok(())
}

/// The os-release fields that say what an image is.
pub fn os_release(variant: &Variant, k3s: &Option<K3sInput>) -> String {
    let k3s_line = match k3s {
        Some(k3s) if k3s.recipe.file.is_some() => format!(
            "RACKLET_K3S=\"STAND-IN {} (not k3s; for tests only)\"\n",
            k3s.recipe.name
        ),
        Some(k3s) => format!(
            "RACKLET_K3S=\"{} {}\"\n",
            k3s.recipe.name, k3s.recipe.version
        ),
        None => "RACKLET_K3S=\"absent\"\n".to_string(),
    };
    format!(
        "PRETTY_NAME=\"Racklet OS {version} ({name})\"\n\
         NAME=\"Racklet OS\"\n\
         ID=racklet\n\
         ID_LIKE=debian\n\
         VERSION=\"{version}\"\n\
         VERSION_ID={version}\n\
         IMAGE_ID={image}\n\
         IMAGE_VERSION={version}\n\
         VARIANT_ID={name}\n\
         ARCHITECTURE={arch}\n\
         {k3s_line}",
        version = variant.version,
        name = variant.name,
        image = os_format::manifest::IMAGE_NAME,
        arch = variant.arch,
    )
}

fn write_system_files(input: &ComposeInput, root: &Path) -> Result<()> {
    write_file(
        &root.join(OS_RELEASE),
        os_release(input.variant, &input.k3s),
        0o644,
    )?;
    symlink("../usr/lib/os-release", &root.join("etc/os-release"))?;
    write_file(
        &root.join(os_format::layout::IMAGE_UPDATE_DEFAULTS),
        update_defaults(input.variant, &input.update_trust),
        0o644,
    )?;
    if let Some(root_json) = &input.update_trust.root_json {
        write_file(
            &root.join(os_format::layout::IMAGE_TUF_ROOT),
            root_json,
            0o644,
        )?;
    }
    // Empty: systemd generates the machine ID on first boot (read-only root:
    // it is kept on a tmpfs until /etc is writable, see docs/disk-layout.md).
    write_file(&root.join("etc/machine-id"), "", 0o444)?;
    write_file(&root.join("etc/hostname"), format!("{HOSTNAME}\n"), 0o644)?;
    write_file(
        &root.join("etc/hosts"),
        format!("127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n::1\tlocalhost ip6-localhost ip6-loopback\n"),
        0o644,
    )?;
    write_file(
        &root.join("etc/fstab"),
        "# Racklet OS. The root is the dm-verity device the initramfs opened, read-only.\n\
         # <file system>                  <mount point> <type> <options>                          <dump> <pass>\n\
         tmpfs                            /tmp          tmpfs  mode=1777,nosuid,nodev,size=50%    0      0\n\
         # /var: the data partition. The initramfs mounts it (and the /etc overlay kept\n\
         # on it); systemd formats it if it was wiped and grows it to its partition.\n\
         PARTLABEL=data                   /var          ext4   rw,noatime,x-systemd.makefs,x-systemd.growfs 0 2\n\
         # The ESP: root's, and writable by the update agent's group (the agent\n\
         # runs as racklet-update, not root); nobody else may read it.\n\
         PARTLABEL=esp                    /efi          vfat   uid=0,gid=racklet-update,fmask=0117,dmask=0007,noauto,x-systemd.automount,x-systemd.idle-timeout=60 0 2\n",
        0o644,
    )?;
    // /var/run and /var/lock point into /run, as systemd's tmpfiles.d/var.conf
    // wants; some package left them as directories, which would hide /run's
    // sockets (D-Bus clients look for /var/run/dbus/system_bus_socket).
    for (link, target) in [("var/run", "../run"), ("var/lock", "../run/lock")] {
        let path = root.join(link);
        if path.is_dir() && !path.is_symlink() {
            std::fs::remove_dir_all(&path).map_err(BuildError::io(&path))?;
        }
        if !path.is_symlink() {
            symlink(target, &path)?;
        }
    }
    for directory in ["efi", "sysroot", "var", "tmp"] {
        std::fs::create_dir_all(root.join(directory))
            .map_err(BuildError::io(root.join(directory)))?;
    }
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))
        .map_err(BuildError::io(root.join("tmp")))?;
    Ok(())
}

/// The unit that gates `boot-complete.target` on the variant's required units:
/// systemd-bless-boot (systemd-boot's counting) removes a try counter only once
/// boot-complete.target is reached, so a boot whose required units fail is
/// never blessed and the boot loader falls back.
pub fn health_gate_unit(required_units: &[String]) -> String {
    let units = required_units.join(" ");
    format!(
        "# Generated by the image builder from the variant's [health] required_units.\n\
         [Unit]\n\
         Description=Racklet health gate: required units are active\n\
         Wants={units}\n\
         After={units}\n\
         Before=boot-complete.target\n\
         \n\
         [Service]\n\
         Type=oneshot\n\
         RemainAfterExit=yes\n\
         ExecStart=/usr/bin/systemctl is-active --quiet {units}\n\
         \n\
         [Install]\n\
         RequiredBy=boot-complete.target\n\
         WantedBy=multi-user.target\n"
    )
}

pub const HEALTH_GATE_UNIT: &str = "racklet-health-gate.service";

fn enable_units(input: &ComposeInput, root: &Path) -> Result<()> {
    write_file(
        &root.join("usr/lib/systemd/system").join(HEALTH_GATE_UNIT),
        health_gate_unit(&input.variant.health.required_units),
        0o644,
    )?;
    let mut units: Vec<&str> = input
        .recipes
        .iter()
        .flat_map(|recipe| recipe.enable.iter().map(String::as_str))
        .collect();
    units.push(HEALTH_GATE_UNIT);
    if input.k3s.is_some() {
        units.push("k3s.service");
    }
    let mut command = Command::new("systemctl");
    command
        .arg(format!("--root={}", root.display()))
        // Units only: a package's SysV script beside its unit (openssh-server's
        // /etc/init.d/ssh) would have systemctl run update-rc.d, which the
        // image does not have (and systemd never runs such a script when a
        // unit of that name exists).
        .env("SYSTEMCTL_SKIP_SYSV", "1")
        .arg("enable")
        .args(&units);
    run(&mut command)?;
    run(Command::new("systemctl")
        .arg(format!("--root={}", root.display()))
        .arg("set-default")
        .arg("multi-user.target"))
}

/// Set every mtime in the tree to SOURCE_DATE_EPOCH (symlinks included).
pub fn clamp_times(root: &Path, source_date_epoch: u64) -> Result<()> {
    let mut stack = vec![root.to_path_buf()];
    set_times(root, source_date_epoch)?;
    while let Some(directory) = stack.pop() {
        for entry in std::fs::read_dir(&directory).map_err(BuildError::io(&directory))? {
            let entry = entry.map_err(BuildError::io(&directory))?;
            let path = entry.path();
            if entry.file_type().map_err(BuildError::io(&path))?.is_dir() {
                stack.push(path.clone());
            }
            set_times(&path, source_date_epoch)?;
        }
    }
    Ok(())
}

fn set_times(path: &Path, seconds: u64) -> Result<()> {
    let time = rustix::fs::Timespec {
        tv_sec: i64::try_from(seconds).map_err(|_| {
            BuildError::Other(format!("{}: time {seconds} out of range", path.display()))
        })?,
        tv_nsec: 0,
    };
    let times = rustix::fs::Timestamps {
        last_access: time,
        last_modification: time,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        path,
        &times,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|errno| BuildError::io(path)(errno.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The image's `/usr/lib/racklet/update.toml` for the variant as checked
    /// in, with its own URLs.
    fn defaults_of(name: &str) -> toml::Table {
        let project_root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let variant = Variant::load(&project_root, name).unwrap();
        let trust = UpdateTrust {
            root_json: None,
            metadata_url: variant.update.metadata_url.clone(),
            targets_url: variant.update.targets_url.clone(),
            allow_insecure_http: variant.update.allow_insecure_http,
        };
        toml::from_str(&update_defaults(&variant, &trust)).unwrap()
    }

    #[test]
    fn only_the_qemu_variants_allow_plain_http_in_the_image() {
        for name in ["qemu-x86_64", "qemu-aarch64"] {
            let defaults = defaults_of(name);
            assert_eq!(
                defaults["allow_insecure_http"].as_bool(),
                Some(true),
                "{name}: {defaults}"
            );
            assert!(defaults["metadata_url"]
                .as_str()
                .unwrap()
                .starts_with("http://10.0.2.100/"));
        }
        let rpi4 = defaults_of("rpi4");
        assert!(!rpi4.contains_key("allow_insecure_http"), "{rpi4}");
        assert!(rpi4["metadata_url"]
            .as_str()
            .unwrap()
            .starts_with("https://"));
    }
}
