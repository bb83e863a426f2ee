//! The `racklet-update` command line: `daemon` runs the agent; every other
//! command talks to it over D-Bus (`org.racklet.Update1`) and reads its typed
//! replies (`status`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::daemon::{Agent, Paths};
use crate::dbus::{call_error, remote_error, Update1Proxy};
use crate::error::AgentError;
use crate::fetcher::FetcherLaunch;
use crate::status::{
    render_status, ActionReply, ApplyStarted, CheckReport, InstallDone, StatusReport,
};

#[derive(Parser)]
#[command(
    name = "racklet-update",
    version,
    about = "Racklet OS A/B update agent"
)]
pub struct Cli {
    /// Print JSON for scripts.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
        /// Install from a copy of the published repository in this directory
        /// (its metadata/ and targets/, e.g. on a USB stick), checked with
        /// this node's trusted TUF state like the network repository.
        #[arg(long, value_name = "DIR")]
        from: Option<PathBuf>,
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
    /// Serve one download for the daemon on stdin/stdout, without privilege
    /// (systemd starts this as racklet-update-fetch@.service; see
    /// update_agent::fetcher).
    #[command(hide = true)]
    Fetcher,
}

#[derive(clap::Args)]
pub struct DaemonArgs {
    /// The ESP's mount point.
    #[arg(long, default_value = crate::boot_control::ESP_MOUNT)]
    esp: PathBuf,
    /// The disk with the slots (default: the disk the booted slot runs from).
    #[arg(long)]
    disk: Option<PathBuf>,
    #[arg(long, default_value = crate::state::STATE_DIR)]
    state_dir: PathBuf,
    #[arg(long, default_value = crate::tuf::TUF_DATASTORE_DIR)]
    tuf_datastore: PathBuf,
    /// The TUF root the image trusts first.
    #[arg(long)]
    tuf_root: Option<PathBuf>,
    #[arg(long, default_value = crate::status::PROC_CMDLINE)]
    cmdline: PathBuf,
    #[arg(long, default_value = crate::status::OS_RELEASE)]
    os_release: PathBuf,
    #[arg(long, default_value = crate::config::CONFIG_PATH)]
    config: PathBuf,
    #[arg(long, default_value = crate::config::IMAGE_DEFAULTS_PATH)]
    config_defaults: PathBuf,
    /// Ask the unprivileged fetcher on this socket for every download
    /// (racklet-update-fetch.socket); without it, each download starts
    /// `racklet-update fetcher` with the daemon's own privileges.
    #[arg(long)]
    fetcher_socket: Option<PathBuf>,
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
        paths.fetcher = FetcherLaunch::from_socket_option(self.fetcher_socket.as_deref());
        if self.no_time_sync {
            paths.timesyncd_unit = PathBuf::from("/nonexistent");
        }
        paths
    }
}

async fn proxy() -> Result<Update1Proxy<'static>, AgentError> {
    let connection = zbus::Connection::system()
        .await
        .map_err(AgentError::dbus("connecting to the system bus"))?;
    Update1Proxy::new(&connection).await.map_err(remote_error)
}

/// A reply of the daemon, as the type it is.
fn parse_reply<T: DeserializeOwned>(method: &str, text: &str) -> Result<T, AgentError> {
    serde_json::from_str(text).map_err(|error| AgentError::Remote {
        message: format!("the daemon's {method} reply is not what this CLI reads: {error}"),
    })
}

fn print_json<T: Serialize>(value: &T) {
    println!("{}", serde_json::to_string_pretty(value).expect("json"));
}

fn print_reply(json: bool, method: &str, text: &str) -> Result<(), AgentError> {
    let reply: ActionReply = parse_reply(method, text)?;
    if json {
        print_json(&reply);
    } else {
        println!("{}", reply.message);
    }
    Ok(())
}

/// Run one command (the daemon, or a request to it).
pub async fn run(cli: &Cli) -> Result<(), AgentError> {
    match &cli.command {
        Command::Daemon(args) => run_daemon(args).await,
        Command::Fetcher => {
            crate::fetcher::serve(std::io::stdin(), std::io::stdout()).await;
            Ok(())
        }
        Command::Status => {
            let text = proxy().await?.status().await.map_err(remote_error)?;
            let report: StatusReport = parse_reply("Status", &text)?;
            if cli.json {
                print_json(&report);
            } else {
                print!("{}", render_status(&report));
            }
            Ok(())
        }
        Command::Check => {
            let text = proxy().await?.check().await.map_err(call_error("Check"))?;
            let report: CheckReport = parse_reply("Check", &text)?;
            if cli.json {
                print_json(&report);
            } else {
                println!("{}", report.message);
                if let Some(start) = report.wave_start {
                    println!("this node (seed {}) may start at {start}", report.seed);
                }
            }
            Ok(())
        }
        Command::Apply {
            version,
            allow_downgrade,
            reboot,
            no_wait,
            from,
        } => {
            let proxy = proxy().await?;
            // Subscribed before the call, so the end of a quick install is
            // not missed (None: the bus refused the match; polled then).
            let changes = if *no_wait {
                None
            } else {
                proxy.receive_changed().await.ok()
            };
            let version = version.as_deref().unwrap_or("");
            let text = match from {
                Some(copy) => {
                    // The daemon runs elsewhere (its own working directory).
                    let copy = std::path::absolute(copy).map_err(|source| AgentError::Io {
                        path: copy.clone(),
                        source,
                    })?;
                    proxy
                        .apply_from(&copy.to_string_lossy(), version, *allow_downgrade, *reboot)
                        .await
                        .map_err(call_error("ApplyFrom"))?
                }
                None => proxy
                    .apply(version, *allow_downgrade, *reboot)
                    .await
                    .map_err(call_error("Apply"))?,
            };
            let started: ApplyStarted = parse_reply("Apply", &text)?;
            if *no_wait {
                if cli.json {
                    print_json(&started);
                } else {
                    println!("installing {}", started.version);
                }
                return Ok(());
            }
            wait_for_install(&proxy, changes, &started.version, cli.json).await
        }
        Command::Cancel => {
            let text = proxy()
                .await?
                .cancel()
                .await
                .map_err(call_error("Cancel"))?;
            print_reply(cli.json, "Cancel", &text)
        }
        Command::Rollback { reboot } => {
            let text = proxy()
                .await?
                .rollback(*reboot)
                .await
                .map_err(call_error("Rollback"))?;
            print_reply(cli.json, "Rollback", &text)
        }
        Command::MarkGood => {
            let text = proxy()
                .await?
                .mark_good()
                .await
                .map_err(call_error("MarkGood"))?;
            print_reply(cli.json, "MarkGood", &text)
        }
        Command::MarkBad { reason, reboot } => {
            let proxy = proxy().await?;
            let text = proxy
                .mark_bad(reason)
                .await
                .map_err(call_error("MarkBad"))?;
            print_reply(cli.json, "MarkBad", &text)?;
            if *reboot {
                crate::dbus::reboot_via_logind().await?;
            }
            Ok(())
        }
    }
}

/// How often the progress bar is updated while an install runs.
const PROGRESS_POLL: Duration = Duration::from_millis(300);

/// Show a progress bar until the install ends; fail if it failed. The
/// agent's `Changed` signal (`changes`) ends a wait at once: the end of an
/// install is seen when it happens, not at the next poll.
async fn wait_for_install(
    proxy: &Update1Proxy<'_>,
    mut changes: Option<crate::dbus::ChangedStream>,
    version: &semver::Version,
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
                let text = proxy.status().await.map_err(remote_error)?;
                let status: StatusReport = parse_reply("Status", &text)?;
                let still_starting = operation == "idle" && status.state.last_error.is_none();
                if operation == "installed" || operation == "trying" {
                    bar.finish_and_clear();
                    let done = InstallDone {
                        ok: true,
                        version: version.clone(),
                        operation,
                        message: format!("{version} installed; the next boot tries it once"),
                    };
                    if json {
                        println!("{}", serde_json::to_string(&done).expect("json"));
                    } else {
                        println!("{}", done.message);
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
        match changes.as_mut() {
            Some(stream) => {
                let mut stream = std::pin::pin!(stream);
                let ended =
                    tokio::time::timeout(PROGRESS_POLL, crate::tuf::next_item(stream.as_mut()))
                        .await;
                if let Ok(None) = ended {
                    // The bus closed the subscription: poll.
                    changes = None;
                }
            }
            None => tokio::time::sleep(PROGRESS_POLL).await,
        }
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
    let _connection = crate::dbus::serve(Arc::clone(&agent)).await?;
    let gate = Arc::clone(&agent);
    tokio::spawn(async move {
        let result = if trying {
            gate.run_health_gate().await
        } else {
            gate.confirm_boot_when_healthy().await
        };
        if let Err(error) = result {
            tracing::error!(%error, "health gate could not complete");
        }
    });
    let config = agent.config().await;
    if let Some(listen) = config.metrics_listen {
        let metrics_agent = Arc::clone(&agent);
        tokio::spawn(async move {
            if let Err(error) = crate::metrics::serve_agent(listen, metrics_agent).await {
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
            crate::metrics::write_agent_textfile(&timer).await;
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
    agent
        .stopping
        .store(true, std::sync::atomic::Ordering::SeqCst);
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn a_reply_of_another_shape_is_an_error_naming_the_method() {
        let error = parse_reply::<ActionReply>("Rollback", "{\"started\": true}").unwrap_err();
        assert!(
            error.to_string().contains("the daemon's Rollback reply"),
            "{error}"
        );
        let reply: ActionReply =
            parse_reply("Cancel", "{\"message\": \"nothing to cancel\"}").unwrap();
        assert_eq!(reply.message, "nothing to cancel");
    }
}
