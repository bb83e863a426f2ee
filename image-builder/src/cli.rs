//! `racklet-image`'s command line: the clap types and what each command does.
//! The binary parses a [`Cli`], sets up logging, calls [`run`] and prints the
//! result (with `--json`) or the error.

use std::collections::HashMap;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use os_format::update_manifest::{parse_version, Wave};
use tough::schema::RoleType;

use crate::build::{BuildOptions, K3sChoice};
use crate::lock::{self, LockFile, Requested};
use crate::mirror::Mirrors;
use crate::recipe::Recipe;
use crate::repo::keys::{parse_role, parse_role_count, KeyDirectory, RoleKeyCount};
use crate::variant::Variant;
use crate::{BuildError, Result};

#[derive(Parser)]
#[command(
    name = "racklet-image",
    version,
    about = "Build Racklet OS images from pinned inputs"
)]
pub struct Cli {
    /// The project's top directory (holds variants/, packages/, kernel-config/).
    #[arg(long, global = true, default_value = ".")]
    pub project: PathBuf,
    /// Print a JSON result on stdout for scripts.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Resolve the variant's Debian packages with apt and pin them in its lock file.
    Lock {
        #[arg(long)]
        variant: String,
    },
    /// Check a build directory against its manifest: files, GPT, DPS UUIDs, dm-verity of slot A.
    Verify {
        /// The build directory (build/<variant>).
        directory: PathBuf,
    },
    /// Build disk.img, update/ and manifest.json under <output>/<variant>/.
    Build {
        #[arg(long)]
        variant: String,
        /// Where build results go.
        #[arg(long, default_value = "build")]
        output: PathBuf,
        /// Directory holding our binaries (racklet-update...) built for the variant's arch.
        #[arg(long)]
        binaries: PathBuf,
        /// The static racklet-init for the variant's arch.
        #[arg(long)]
        init: PathBuf,
        /// Which k3s goes in: the variant's default, the official pin, the labelled stand-in, or none.
        #[arg(long, value_enum, default_value = "default")]
        k3s: K3sChoice,
        /// Timestamp for every file (default: $SOURCE_DATE_EPOCH, else derived from the version).
        #[arg(long, env = "SOURCE_DATE_EPOCH")]
        source_date_epoch: Option<u64>,
        /// Build this version (MAJOR.MINOR.PATCH) instead of the variant's.
        #[arg(long = "image-version")]
        image_version: Option<String>,
        /// Add these recipes (packages/<name>.toml) after the variant's.
        #[arg(long = "extra-recipe")]
        extra_recipes: Vec<String>,
        /// The signed TUF root.json the image trusts (e.g. <keys>/root.json).
        #[arg(long)]
        tuf_root: Option<PathBuf>,
        /// Where nodes fetch TUF metadata (overrides the variant's [update] metadata_url).
        #[arg(long)]
        metadata_url: Option<String>,
        /// Where nodes fetch targets (overrides the variant's [update] targets_url).
        #[arg(long)]
        targets_url: Option<String>,
    },
    /// Development signing keys and the signed TUF root.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Add a build (its update artifacts and an entry in the update manifest) to a TUF repository.
    ///
    /// Offline use: the repository directory (its metadata/ and targets/) copied as it is,
    /// e.g. to a USB stick, installs on a node with `racklet-update apply --from DIR`,
    /// verified like the network repository; refresh it first (`repo refresh`) if its
    /// timestamp would expire before it is used.
    Publish {
        /// The build directory (build/<variant>).
        #[arg(long)]
        build: PathBuf,
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        keys: KeysArgs,
        /// A rollout wave, SEED_BELOW@TIME (RFC 3339, or +N[h|d] from now), e.g. 512@+0h 2048@+2d.
        /// Nodes draw a seed in 0..2048; the last wave must reach 2048. None: every node at once.
        #[arg(long = "wave")]
        waves: Vec<String>,
        /// Ceiling for nodes taking this entry (default: this version).
        #[arg(long)]
        max_version: Option<String>,
        /// Replace a published version whose rollout has not started yet.
        #[arg(long)]
        replace: bool,
        #[command(flatten)]
        expiries: ExpiryArgs,
        /// Publish delta patches to this version from the N newest earlier versions
        /// of the variant whose targets the repository holds (0: no deltas).
        #[arg(long, value_name = "N", default_value_t = os_format::delta::DEFAULT_DELTA_SOURCES)]
        delta_sources: usize,
        /// zstd level of the delta patches (1-19; higher is slower, a few % smaller).
        #[arg(long, value_name = "LEVEL", default_value_t = crate::repo::delta::DEFAULT_PATCH_LEVEL,
              value_parser = clap::value_parser!(i32).range(1..=19))]
        delta_level: i32,
    },
    /// Write a disk image to a card (a whole-disk block device) with progress,
    /// then read it back and compare. Refuses a disk the host uses (mounted,
    /// swap, the disk it runs from) and one smaller than the image.
    Flash {
        /// The image: build/<variant>/disk.img (provisioned or not).
        #[arg(long)]
        disk: PathBuf,
        /// The card, e.g. /dev/sdX or /dev/mmcblk0 (the whole disk).
        #[arg(long)]
        device: PathBuf,
    },
    /// Write a node's settings (racklet/settings.toml, docs/settings.md) into
    /// the ESP of a disk image or flashed card, validated first, nothing mounted.
    Provision {
        /// The disk image (build/<variant>/disk.img) or the card's device.
        #[arg(long)]
        disk: PathBuf,
        /// A settings file (racklet/settings.toml's format).
        #[arg(
            long,
            conflicts_with = "inventory",
            required_unless_present = "inventory"
        )]
        settings: Option<PathBuf>,
        /// A rack inventory: [common] settings and one [nodes.NAME] table per node.
        #[arg(long, requires = "node")]
        inventory: Option<PathBuf>,
        /// The node of --inventory to provision.
        #[arg(long, requires = "inventory")]
        node: Option<String>,
    },
    /// Maintain a published repository.
    Repo {
        #[command(subcommand)]
        command: RepoCommand,
    },
}

#[derive(clap::Args)]
pub struct RepoArgs {
    /// The repository directory (metadata/ and targets/).
    #[arg(long, default_value = "build/repo")]
    pub repo: PathBuf,
    /// Act as if it were this time (RFC 3339); for tests.
    #[arg(long, hide = true)]
    pub now: Option<String>,
}

#[derive(clap::Args)]
pub struct KeysArgs {
    /// The key directory (keys/, roots/, root.json).
    #[arg(long = "keys", env = "RACKLET_KEYS")]
    pub keys_dir: PathBuf,
}

#[derive(clap::Args)]
pub struct ExpiryArgs {
    #[arg(long, default_value_t = 90)]
    pub targets_expiry_days: u32,
    #[arg(long, default_value_t = 30)]
    pub snapshot_expiry_days: u32,
    #[arg(long, default_value_t = 7)]
    pub timestamp_expiry_days: u32,
}

impl ExpiryArgs {
    fn expiries(&self) -> crate::repo::Expiries {
        crate::repo::Expiries {
            targets_days: self.targets_expiry_days,
            snapshot_days: self.snapshot_expiry_days,
            timestamp_days: self.timestamp_expiry_days,
        }
    }
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Generate ed25519 keys for the four TUF roles and sign root version 1.
    Generate {
        /// Where the keys go (keep it outside any git work tree).
        #[arg(long)]
        dir: PathBuf,
        /// Keys and threshold per role, ROLE=KEYS/THRESHOLD (default 1/1 each), e.g. root=3/2.
        #[arg(long = "role-keys")]
        role_keys: Vec<String>,
        #[arg(long, default_value_t = 365)]
        root_expiry_days: u32,
        /// Act as if it were this time (RFC 3339); for tests.
        #[arg(long, hide = true)]
        now: Option<String>,
    },
    /// Sign root version N+1 with new keys for the given roles (default: root),
    /// cross-signed by the current root keys so nodes follow the rotation.
    /// Needs only the root keys: run it where they are kept (offline), then
    /// `keys export` the result to the publishing key directory.
    RotateRoot {
        /// The key directory holding the root keys.
        #[arg(long)]
        dir: PathBuf,
        /// Roles whose keys are replaced.
        #[arg(long = "rotate-role", default_values_t = ["root".to_string()])]
        roles: Vec<String>,
        #[arg(long = "role-keys")]
        role_keys: Vec<String>,
        #[arg(long, default_value_t = 365)]
        root_expiry_days: u32,
        #[arg(long, hide = true)]
        now: Option<String>,
    },
    /// Copy the signed roots and the targets, snapshot and timestamp private
    /// keys (never a root key) from the key directory holding the root keys
    /// to a publishing key directory, which `publish` and `repo` then use;
    /// keys the newest root no longer lists move to its retired/.
    Export {
        /// The key directory holding the root keys (where `keys generate`
        /// and `keys rotate-root` ran).
        #[arg(long)]
        dir: PathBuf,
        /// The publishing key directory (created when missing).
        #[arg(long)]
        to: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum RepoCommand {
    /// List every published version and each role's expiry.
    List {
        #[command(flatten)]
        repo: RepoArgs,
    },
    /// Re-sign targets, snapshot and timestamp with new expiry dates (no new build).
    Refresh {
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        keys: KeysArgs,
        #[command(flatten)]
        expiries: ExpiryArgs,
    },
    /// Warn about roles that expire within --warn-days; fail if one has expired.
    CheckExpiry {
        #[command(flatten)]
        repo: RepoArgs,
        #[arg(long, default_value_t = 3)]
        warn_days: u32,
    },
    /// Load the repository from its first root, check every signature, expiry and target.
    Validate {
        #[command(flatten)]
        repo: RepoArgs,
    },
    /// Set the ceiling of every entry of a variant (an emergency pull-back when lowered).
    SetMaxVersion {
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        keys: KeysArgs,
        #[arg(long)]
        variant: String,
        #[arg(long)]
        max_version: String,
        #[command(flatten)]
        expiries: ExpiryArgs,
    },
}

fn parse_now(now: &Option<String>) -> Result<jiff::Timestamp> {
    match now {
        None => Ok(jiff::Timestamp::now()),
        Some(text) => text.parse().map_err(|error| {
            BuildError::repository(
                format!("--now {text}"),
                format!("not an RFC 3339 time: {error}"),
            )
        }),
    }
}

/// `SEED@TIME` where TIME is RFC 3339 or `+N[h|d]` from `now`.
fn parse_wave(value: &str, now: jiff::Timestamp) -> Result<Wave> {
    let bad = |message: String| BuildError::repository(format!("--wave {value}"), message);
    let (seed, time) = value
        .split_once('@')
        .ok_or_else(|| bad("expected SEED_BELOW@TIME".into()))?;
    let start = if let Some(relative) = time.strip_prefix('+') {
        let (number, unit) = relative.split_at(relative.len().saturating_sub(1));
        let number: i64 = number
            .parse()
            .map_err(|_| bad(format!("'{time}': expected +N followed by h or d")))?;
        let hours = match unit {
            "h" => number,
            "d" => number * 24,
            _ => return Err(bad(format!("'{time}': expected +N followed by h or d"))),
        };
        crate::repo::keys::whole_seconds(now + jiff::SignedDuration::from_hours(hours))
    } else {
        time.parse()
            .map_err(|error| bad(format!("'{time}' is not an RFC 3339 time: {error}")))?
    };
    Wave::parse(&format!("{seed}@{start}")).map_err(bad)
}

fn role_counts(values: &[String]) -> Result<HashMap<RoleType, RoleKeyCount>> {
    values.iter().map(|value| parse_role_count(value)).collect()
}

fn load_recipes(cli: &Cli, variant: &Variant) -> Result<Vec<Recipe>> {
    variant
        .recipes
        .iter()
        .map(|name| Recipe::load(&cli.project, name))
        .collect()
}

/// Carry out `cli`'s command. Without `--json` a command prints its result
/// for people on stdout; the value returned is its result for scripts (the
/// binary prints it with `--json`).
pub fn run(cli: &Cli) -> Result<serde_json::Value> {
    match &cli.command {
        Command::Lock { variant } => {
            let variant = Variant::load(&cli.project, variant)?;
            let recipes = load_recipes(cli, &variant)?;
            let requested = Requested::of(&variant, &recipes);
            let mirrors = Mirrors::from_system()?;
            let path = variant.lock_file(&cli.project);
            let lock: LockFile = lock::resolve(&variant, &requested, &mirrors, &path)?;
            tracing::info!(packages = lock.package.len(), file = %path.display(), "lock written");
            Ok(serde_json::json!({"ok": true, "lock": path, "packages": lock.package.len()}))
        }
        Command::Flash { disk, device } => {
            let report = crate::flash::flash(disk, device)?;
            if !cli.json {
                println!(
                    "{}: wrote {} ({} bytes, {} of them data) in {:.0} s and read it back: sha256 {} matches",
                    report.device.display(),
                    report.image.display(),
                    report.bytes,
                    report.data_bytes,
                    report.seconds,
                    report.sha256
                );
            }
            Ok(serde_json::to_value(report).expect("json"))
        }
        Command::Provision {
            disk,
            settings,
            inventory,
            node,
        } => {
            use crate::provision;
            let settings = match (settings, inventory, node) {
                (Some(file), _, _) => provision::settings_from_file(file)?,
                (None, Some(inventory), Some(node)) => {
                    provision::settings_from_inventory(inventory, node)?
                }
                _ => unreachable!("clap requires --settings or --inventory with --node"),
            };
            let report = provision::provision(disk, &settings)?;
            if !cli.json {
                println!(
                    "{}: wrote {} ({} bytes, sha256 {}) on the ESP at byte {}: hostname {}, k3s role {}, wave seed {}",
                    report.disk.display(),
                    report.file,
                    report.bytes,
                    report.sha256,
                    report.esp_offset,
                    report.hostname.as_deref().unwrap_or("(derived on the node)"),
                    report.kubernetes_role,
                    report
                        .wave_seed
                        .map(|seed| seed.to_string())
                        .unwrap_or_else(|| "(drawn on the node)".into()),
                );
            }
            Ok(serde_json::to_value(report).expect("json"))
        }
        Command::Verify { directory } => {
            let report = crate::verify::verify_build(directory)?;
            if !cli.json {
                println!(
                    "{}: ok ({} files match the manifest; slot A root partition {} and verity partition {} verify against {})",
                    directory.display(),
                    report.files_checked,
                    report.root_partition,
                    report.verity_partition,
                    report.verity_root_hash
                );
            }
            Ok(serde_json::to_value(report).expect("json"))
        }
        Command::Build {
            variant,
            output,
            binaries,
            init,
            k3s,
            source_date_epoch,
            image_version,
            extra_recipes,
            tuf_root,
            metadata_url,
            targets_url,
        } => {
            let manifest = crate::build::build(&BuildOptions {
                project_root: cli.project.clone(),
                variant: variant.clone(),
                output_root: output.clone(),
                binaries_dir: binaries.clone(),
                init_binary: init.clone(),
                k3s: *k3s,
                source_date_epoch: *source_date_epoch,
                version: image_version.clone(),
                extra_recipes: extra_recipes.clone(),
                update_trust: crate::build::UpdateTrustOptions {
                    root_json: tuf_root.clone(),
                    metadata_url: metadata_url.clone(),
                    targets_url: targets_url.clone(),
                },
            })?;
            Ok(serde_json::json!({
                "ok": true,
                "output": output.join(variant),
                "version": manifest.version,
                "verity_root_hash": manifest.verity.root_hash,
            }))
        }
        Command::Keys { command } => match command {
            KeysCommand::Generate {
                dir,
                role_keys,
                root_expiry_days,
                now,
            } => {
                let keys = KeyDirectory::new(dir);
                let report =
                    keys.generate(&role_counts(role_keys)?, parse_now(now)?, *root_expiry_days)?;
                eprintln!("{}", crate::repo::keys::DEVELOPMENT_KEYS_WARNING);
                if !cli.json {
                    println!(
                        "keys and root version {} written to {}",
                        report.root_version,
                        report.directory.display()
                    );
                }
                Ok(serde_json::to_value(report).expect("json"))
            }
            KeysCommand::RotateRoot {
                dir,
                roles,
                role_keys,
                root_expiry_days,
                now,
            } => {
                let keys = KeyDirectory::new(dir);
                let roles: Vec<RoleType> = roles
                    .iter()
                    .map(|role| parse_role(role))
                    .collect::<Result<_>>()?;
                let report = keys.rotate_root(
                    &roles,
                    &role_counts(role_keys)?,
                    parse_now(now)?,
                    *root_expiry_days,
                )?;
                if !cli.json {
                    println!(
                        "root version {} signed by the old and the new root keys; copy it to the publishing key directory with `racklet-image keys export --dir {} --to <publishing keys>` (unless that is this directory) and publish it with `racklet-image repo refresh`",
                        report.root_version,
                        dir.display()
                    );
                }
                Ok(serde_json::to_value(report).expect("json"))
            }
            KeysCommand::Export { dir, to } => {
                let report = KeyDirectory::new(dir).export(&KeyDirectory::new(to))?;
                if report.root_keys_in_destination > 0 {
                    tracing::warn!(
                        "{} holds {} root private key(s); routine publishing does not use them: keep them only where `keys rotate-root` runs",
                        to.display(),
                        report.root_keys_in_destination
                    );
                }
                if !cli.json {
                    let list = |names: &[String]| {
                        if names.is_empty() {
                            "none".to_string()
                        } else {
                            names.join(", ")
                        }
                    };
                    println!(
                        "{}: root version {} (roots copied: {}), keys copied: {}, keys retired: {}; publish with --keys {}",
                        report.to.display(),
                        report.root_version,
                        list(&report.roots_copied.iter().map(u64::to_string).collect::<Vec<_>>()),
                        list(&report.keys_copied),
                        list(&report.keys_retired),
                        report.to.display()
                    );
                }
                Ok(serde_json::to_value(report).expect("json"))
            }
        },
        Command::Publish {
            build,
            repo,
            keys,
            waves,
            max_version,
            replace,
            expiries,
            delta_sources,
            delta_level,
        } => {
            let now = parse_now(&repo.now)?;
            let waves = waves
                .iter()
                .map(|wave| parse_wave(wave, now))
                .collect::<Result<Vec<_>>>()?;
            let max_version = max_version
                .as_deref()
                .map(parse_version)
                .transpose()
                .map_err(|error| BuildError::repository("--max-version", error.to_string()))?;
            let report = crate::repo::publish(&crate::repo::PublishOptions {
                build_dir: build.clone(),
                repo_dir: repo.repo.clone(),
                keys: KeyDirectory::new(&keys.keys_dir),
                now,
                waves,
                max_version,
                replace: *replace,
                expiries: expiries.expiries(),
                delta_sources: *delta_sources,
                delta_level: *delta_level,
            })?;
            if !cli.json {
                println!(
                    "published {} {} to {} (metadata version {}, timestamp expires {}) in {:.1} s",
                    report.variant,
                    report.version,
                    report.repository.display(),
                    report.metadata_version,
                    report.timestamp_expires,
                    report.seconds
                );
                for line in crate::repo::delta::report_lines(&report.deltas) {
                    println!("  {line}");
                }
            }
            Ok(serde_json::to_value(report).expect("json"))
        }
        Command::Repo { command } => run_repo(cli, command),
    }
}

fn run_repo(cli: &Cli, command: &RepoCommand) -> Result<serde_json::Value> {
    match command {
        RepoCommand::List { repo } => {
            let listing = crate::repo::list(&repo.repo, parse_now(&repo.now)?, 3)?;
            if !cli.json {
                println!("{}:", listing.repository.display());
                for role in &listing.roles {
                    println!(
                        "  {:10} version {:4} expires {} ({})",
                        role.role, role.version, role.expires, role.state
                    );
                }
                if listing.updates.is_empty() {
                    println!("  nothing published");
                }
                for update in &listing.updates {
                    let waves = if update.waves.is_empty() {
                        "all nodes at once".to_string()
                    } else {
                        update
                            .waves
                            .iter()
                            .map(|wave| format!("<{} from {}", wave.seed_below, wave.start))
                            .collect::<Vec<_>>()
                            .join(", ")
                    };
                    println!(
                        "  {} {} ({}) max_version {} published {} waves: {}",
                        update.variant,
                        update.version,
                        update.arch.as_str(),
                        update.max_version,
                        update.published,
                        waves
                    );
                }
            }
            Ok(serde_json::to_value(listing).expect("json"))
        }
        RepoCommand::Refresh {
            repo,
            keys,
            expiries,
        } => {
            let value = crate::repo::refresh(
                &repo.repo,
                &KeyDirectory::new(&keys.keys_dir),
                parse_now(&repo.now)?,
                expiries.expiries(),
            )?;
            if !cli.json {
                println!(
                    "{}: re-signed as metadata version {}; timestamp expires {}",
                    repo.repo.display(),
                    value["metadata_version"],
                    value["timestamp_expires"].as_str().unwrap_or("")
                );
            }
            Ok(value)
        }
        RepoCommand::CheckExpiry { repo, warn_days } => {
            let roles = crate::repo::check_expiry(&repo.repo, parse_now(&repo.now)?, *warn_days)?;
            for role in &roles {
                if !cli.json {
                    println!("{:10} expires {} ({})", role.role, role.expires, role.state);
                }
                if role.state == "expires-soon" {
                    tracing::warn!(role = %role.role, expires = %role.expires, "expires within {warn_days} days; run `racklet-image repo refresh`");
                }
            }
            let expired: Vec<&str> = roles
                .iter()
                .filter(|role| role.state == "expired")
                .map(|role| role.role.as_str())
                .collect();
            if !expired.is_empty() {
                return Err(BuildError::repository(
                    repo.repo.display().to_string(),
                    format!("expired metadata: {}; nodes refuse it; run `racklet-image repo refresh` (for root: `keys rotate-root` where the root keys are kept, then `keys export` to the publishing key directory)", expired.join(", ")),
                ));
            }
            Ok(serde_json::json!({"ok": true, "roles": roles}))
        }
        RepoCommand::Validate { repo } => {
            let report = crate::repo::validate(&repo.repo)?;
            if !cli.json {
                println!(
                    "{}: valid (root version {}, {} targets, {} bytes, {} published versions, {} deltas)",
                    report.repository.display(),
                    report.root_version,
                    report.targets_checked,
                    report.target_bytes,
                    report.updates,
                    report.deltas
                );
            }
            Ok(serde_json::to_value(report).expect("json"))
        }
        RepoCommand::SetMaxVersion {
            repo,
            keys,
            variant,
            max_version,
            expiries,
        } => {
            let max_version = parse_version(max_version)
                .map_err(|error| BuildError::repository("--max-version", error.to_string()))?;
            let value = crate::repo::set_max_version(
                &repo.repo,
                &KeyDirectory::new(&keys.keys_dir),
                variant,
                &max_version,
                parse_now(&repo.now)?,
                expiries.expiries(),
            )?;
            if !cli.json {
                println!("{variant}: max_version is now {max_version}");
            }
            Ok(value)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }
}
