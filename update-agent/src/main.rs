//! `racklet-update`: a thin CLI over the update-agent library. `daemon` runs
//! the agent; every other command talks to it over D-Bus (`org.racklet.Update1`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use update_agent::daemon::{Agent, Paths};
use update_agent::dbus::{remote_error, Update1Proxy};
use update_agent::error::AgentError;
use update_agent::status::{render_status, StatusReport};

#[derive(Parser)]
#[command(
    name = "racklet-update",
    version,
    about = "Racklet OS A/B update agent"
)]
struct Cli {
    /// Print JSON for scripts.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Booted slot, both slots' versions and states, last check, pending update.
    Status,
    /// Is there an update for this node, and when may it start (waves)?
    Check,
    /// Write an update into the inactive slot (and reboot into it with --reboot).
    Apply {
        /// Install this version rather than what the policy picks.
        #[arg(long)]
        version: Option<String>,
        /// Allow --version to be lower than the running version.
        #[arg(long)]
        allow_downgrade: bool,
        /// Reboot into the new slot once it is written.
        #[arg(long)]
        reboot: bool,
        /// Return once the install has started, without waiting.
        #[arg(long)]
        no_wait: bool,
    },
    /// Undo an apply that has not rebooted yet.
    Cancel,
    /// Boot the other slot next, if it holds a good version.
    Rollback {
        #[arg(long)]
        reboot: bool,
    },
    /// Commit the booted try by hand (what a passing health gate does).
    MarkGood,
    /// Mark the booted slot bad by hand; the other slot boots next.
    MarkBad {
        /// Why (kept in status).
        #[arg(long, default_value = "marked bad by hand")]
        reason: String,
        #[arg(long)]
        reboot: bool,
    },
    /// Run the agent (systemd starts this as racklet-update.service).
    Daemon(Box<DaemonArgs>),
}

#[derive(clap::Args)]
struct DaemonArgs {
    /// The ESP's mount point.
    #[arg(long, default_value = update_agent::boot_control::ESP_MOUNT)]
    esp: PathBuf,
    /// The disk with the slots (default: the disk the booted slot runs from).
    #[arg(long)]
    disk: Option<PathBuf>,
    #[arg(long, default_value = update_agent::state::STATE_DIR)]
    state_dir: PathBuf,
    #[arg(long, default_value = update_agent::tuf::TUF_DATASTORE_DIR)]
    tuf_datastore: PathBuf,
    /// The TUF root the image trusts first.
    #[arg(long)]
    tuf_root: Option<PathBuf>,
    #[arg(long, default_value = update_agent::status::PROC_CMDLINE)]
    cmdline: PathBuf,
    #[arg(long, default_value = update_agent::status::OS_RELEASE)]
    os_release: PathBuf,
    #[arg(long, default_value = update_agent::config::CONFIG_PATH)]
    config: PathBuf,
    #[arg(long, default_value = update_agent::config::IMAGE_DEFAULTS_PATH)]
    config_defaults: PathBuf,
    /// Tests: write this file instead of rebooting.
    #[arg(long, hide = true)]
    reboot_marker: Option<PathBuf>,
    /// Tests: do not wait for systemd-timesyncd (the build-time floor still applies).
    #[arg(long, hide = true)]
    no_time_sync: bool,
    /// Tests: no timer; only act on D-Bus requests.
    #[arg(long, hide = true)]
    no_timer: bool,
}

impl DaemonArgs {
    fn paths(&self) -> Paths {
        let mut paths = Paths::system();
        paths.esp = self.esp.clone();
        paths.disk = self.disk.clone();
        paths.state_dir = self.state_dir.clone();
        paths.tuf_datastore = self.tuf_datastore.clone();
        if let Some(root) = &self.tuf_root {
            paths.image_tuf_root = root.clone();
        }
        paths.cmdline = self.cmdline.clone();
        paths.os_release = self.os_release.clone();
        paths.config = self.config.clone();
        paths.config_defaults = self.config_defaults.clone();
        paths.reboot_marker = self.reboot_marker.clone();
        if self.no_time_sync {
            paths.timesyncd_unit = PathBuf::from("/nonexistent");
        }
        paths
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RACKLET_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: logs and CI output stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let result = runtime.block_on(run(&cli));
    // A blocking writer still running (it was told to stop) must not hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(5));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprint!("{}", os_format::report::for_people(&error));
            if cli.json {
                let error = os_format::report::one_line(&error);
                println!("{}", serde_json::json!({"ok": false, "error": error}));
            }
            ExitCode::from(error.exit_code())
        }
    }
}

async fn proxy() -> Result<Update1Proxy<'static>, AgentError> {
    let connection = zbus::Connection::system()
        .await
        .map_err(AgentError::dbus("connecting to the system bus"))?;
    Update1Proxy::new(&connection).await.map_err(remote_error)
}

fn parse_json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or(serde_json::Value::String(text.to_string()))
}

fn print_message(json: bool, text: &str) {
    let value = parse_json(text);
    if json {
        println!("{}", serde_json::to_string_pretty(&value).expect("json"));
    } else if let Some(message) = value.get("message").and_then(|m| m.as_str()) {
        println!("{message}");
    } else {
        println!("{text}");
    }
}

async fn run(cli: &Cli) -> Result<(), AgentError> {
    match &cli.command {
        Command::Daemon(args) => run_daemon(args).await,
        Command::Status => {
            let text = proxy().await?.status().await.map_err(remote_error)?;
            if cli.json {
                let value = parse_json(&text);
                println!("{}", serde_json::to_string_pretty(&value).expect("json"));
            } else {
                let report: StatusReport =
                    serde_json::from_str(&text).map_err(|error| AgentError::Remote {
                        message: format!("the daemon's status is not a status document: {error}"),
                    })?;
                print!("{}", render_status(&report));
            }
            Ok(())
        }
        Command::Check => {
            let text = proxy().await?.check().await.map_err(remote_error)?;
            let value = parse_json(&text);
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&value).expect("json"));
            } else {
                println!("{}", value["message"].as_str().unwrap_or(&text));
                if let Some(start) = value["wave_start"].as_str() {
                    println!("this node (seed {}) may start at {start}", value["seed"]);
                }
            }
            Ok(())
        }
        Command::Apply {
            version,
            allow_downgrade,
            reboot,
            no_wait,
        } => {
            let proxy = proxy().await?;
            let text = proxy
                .apply(version.as_deref().unwrap_or(""), *allow_downgrade, *reboot)
                .await
                .map_err(remote_error)?;
            let started = parse_json(&text);
            let version = started["version"].as_str().unwrap_or("?").to_string();
            if *no_wait {
                print_message(cli.json, &text);
                return Ok(());
            }
            wait_for_install(&proxy, &version, cli.json).await
        }
        Command::Cancel => {
            let text = proxy().await?.cancel().await.map_err(remote_error)?;
            print_message(cli.json, &text);
            Ok(())
        }
        Command::Rollback { reboot } => {
            let text = proxy()
                .await?
                .rollback(*reboot)
                .await
                .map_err(remote_error)?;
            print_message(cli.json, &text);
            Ok(())
        }
        Command::MarkGood => {
            let text = proxy().await?.mark_good().await.map_err(remote_error)?;
            print_message(cli.json, &text);
            Ok(())
        }
        Command::MarkBad { reason, reboot } => {
            let proxy = proxy().await?;
            let text = proxy.mark_bad(reason).await.map_err(remote_error)?;
            print_message(cli.json, &text);
            if *reboot {
                update_agent::dbus::reboot_via_logind().await?;
            }
            Ok(())
        }
    }
}

/// Show a progress bar until the install ends; fail if it failed.
async fn wait_for_install(
    proxy: &Update1Proxy<'_>,
    version: &str,
    json: bool,
) -> Result<(), AgentError> {
    let bar = if json {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:24} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        bar
    };
    loop {
        // Properties are fetched fresh (not from zbus's cache) each round.
        let operation = proxy.operation().await.map_err(remote_error)?;
        let (bytes, total) = proxy.progress().await.map_err(remote_error)?;
        bar.set_length(total);
        bar.set_position(bytes);
        bar.set_message(format!("{operation} {version}"));
        match operation.as_str() {
            "writing" | "verifying" => {}
            _ => {
                // The agent may not have left idle yet right after Apply.
                let status = parse_json(&proxy.status().await.map_err(remote_error)?);
                let still_starting = operation == "idle" && status["state"]["last_error"].is_null();
                if operation == "installed" || operation == "trying" {
                    bar.finish_and_clear();
                    let message = format!("{version} installed; the next boot tries it once");
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"ok": true, "version": version, "operation": operation, "message": message})
                        );
                    } else {
                        println!("{message}");
                    }
                    return Ok(());
                }
                if !still_starting {
                    bar.finish_and_clear();
                    let last_error = proxy.last_error().await.map_err(remote_error)?;
                    return Err(AgentError::Remote {
                        message: if last_error.is_empty() {
                            format!("install of {version} ended in {operation}")
                        } else {
                            last_error
                        },
                    });
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The first retry after a failed check.
const RETRY_AFTER_FAILED_CHECK: Duration = Duration::from_secs(30);

/// A random delay in [0, limit) from the kernel's random source.
fn jitter(limit: Duration) -> Duration {
    if limit.is_zero() {
        return Duration::ZERO;
    }
    // No randomness (which getrandom(2) on Linux always has): no jitter.
    let random = getrandom::u64().unwrap_or(0);
    Duration::from_millis(random % limit.as_millis().max(1) as u64)
}

async fn run_daemon(args: &DaemonArgs) -> Result<(), AgentError> {
    let agent = Arc::new(Agent::open(args.paths())?);
    tracing::info!(slot = %agent.booted.slot, version = %agent.booted.version, seed = agent.seed, "racklet-update daemon starting");
    let trying = agent.start().await?;
    let _connection = update_agent::dbus::serve(Arc::clone(&agent)).await?;
    if trying {
        let gate = Arc::clone(&agent);
        tokio::spawn(async move {
            if let Err(error) = gate.run_health_gate().await {
                tracing::error!(%error, "health gate could not complete");
            }
        });
    }
    let config = agent.config().await;
    if let Some(listen) = config.metrics_listen {
        let metrics_agent = Arc::clone(&agent);
        tokio::spawn(async move {
            if let Err(error) = update_agent::metrics::serve_agent(listen, metrics_agent).await {
                tracing::error!(%error, %listen, "metrics endpoint stopped");
            }
        });
    }
    let timer = Arc::clone(&agent);
    let no_timer = args.no_timer;
    let timer_task = tokio::spawn(async move {
        if no_timer {
            return;
        }
        let first = timer.config().await;
        tokio::time::sleep(jitter(first.check_jitter())).await;
        // A failed check (no network yet after a boot, server away) is retried
        // after 30 s, doubling up to the check interval.
        let mut retry = RETRY_AFTER_FAILED_CHECK;
        loop {
            let checked = timer.tick().await;
            update_agent::metrics::write_agent_textfile(&timer).await;
            let config = timer.config().await;
            let wait = if checked {
                retry = RETRY_AFTER_FAILED_CHECK;
                config.check_interval() + jitter(config.check_jitter())
            } else {
                let wait = retry.min(config.check_interval());
                retry = (retry * 2).min(config.check_interval());
                wait
            };
            // An installed update waiting for the maintenance window: wake when
            // it opens (a window shorter than the interval would be missed).
            let wait = match timer.next_automatic_reboot().await {
                Some(at) => {
                    let until = jiff::Timestamp::now().duration_until(at);
                    wait.min(
                        Duration::try_from(until).unwrap_or(Duration::ZERO)
                            + Duration::from_secs(1),
                    )
                }
                None => wait,
            };
            tokio::time::sleep(wait).await;
        }
    });
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| AgentError::Io {
        path: PathBuf::from("SIGTERM"),
        source,
    })?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("stopping");
    timer_task.abort();
    if agent.is_busy().await {
        // An install in flight stops; its slot stays unbootable and the next start says so.
        agent
            .progress
            .cancel
            .store(true, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}
