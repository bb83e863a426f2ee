//! `racklet-image`: a thin CLI over the image-builder library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use image_builder::build::{BuildOptions, K3sChoice};
use image_builder::lock::{self, LockFile, Requested};
use image_builder::mirror::Mirrors;
use image_builder::recipe::Recipe;
use image_builder::variant::Variant;
use image_builder::{BuildError, Result};

#[derive(Parser)]
#[command(
    name = "racklet-image",
    version,
    about = "Build Racklet OS images from pinned inputs"
)]
struct Cli {
    /// The project's top directory (holds variants/, packages/, kernel-config/).
    #[arg(long, global = true, default_value = ".")]
    project: PathBuf,
    /// Print a JSON result on stdout for scripts.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
    },
}

/// Files the builder creates get their modes from the packages or from the
/// builder, never from the user's umask (reproducible builds).
const BUILD_UMASK: libc::mode_t = 0o022;

fn main() -> ExitCode {
    // SAFETY: umask only sets the process's file mode creation mask.
    unsafe { libc::umask(BUILD_UMASK) };
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RACKLET_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(&cli) {
        Ok(value) => {
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&value).expect("json"));
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            let mut source = std::error::Error::source(&error);
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({"ok": false, "error": error.to_string()})
                );
            }
            ExitCode::from(error.exit_code() as u8)
        }
    }
}

fn load_recipes(cli: &Cli, variant: &Variant) -> Result<Vec<Recipe>> {
    variant
        .recipes
        .iter()
        .map(|name| Recipe::load(&cli.project, name))
        .collect()
}

fn run(cli: &Cli) -> Result<serde_json::Value, BuildError> {
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
        Command::Verify { directory } => {
            let report = image_builder::verify::verify_build(directory)?;
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
        } => {
            let manifest = image_builder::build::build(&BuildOptions {
                project_root: cli.project.clone(),
                variant: variant.clone(),
                output_root: output.clone(),
                binaries_dir: binaries.clone(),
                init_binary: init.clone(),
                k3s: *k3s,
                source_date_epoch: *source_date_epoch,
            })?;
            Ok(serde_json::json!({
                "ok": true,
                "output": output.join(variant),
                "version": manifest.version,
                "verity_root_hash": manifest.verity.root_hash,
            }))
        }
    }
}
