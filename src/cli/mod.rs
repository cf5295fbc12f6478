//! The `dlsm` command line: `serve` runs a node; every other command is a
//! thin client of a node's control API (`--api`, or `DLSM_API`).
//!
//! Errors reach the user as one line on stderr and a non-zero exit.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand};
use serde::Serialize;

use crate::api_client::{seg, Api, ApiAuth};

use crate::migrate::{MigrationStatus, Phase};
use crate::nbd::client::{NbdAddr, NbdClient};
use crate::node::api::{CreateVolume, NodeInfo, VolumeInfo};
use crate::node::migration::{CancelRequest, HandoffRequest, MigrateRequest, RateRequest};
use crate::node::{Node, NodeConfig};
use crate::size::{format_size, parse_size};

#[derive(Parser, Debug)]
#[command(
    name = "dlsm",
    version,
    about = "Decoupled live storage migration: volumes served over NBD"
)]
pub struct Cli {
    /// The node's control API address (for `serve`: where to listen).
    #[arg(
        long,
        global = true,
        env = "DLSM_API",
        default_value = "127.0.0.1:7450"
    )]
    pub api: String,
    /// TLS directory (QEMU/libnbd x509 layout: ca-cert.pem, server-cert.pem,
    /// server-key.pem, client-cert.pem, client-key.pem). For `serve`: NBD
    /// clients must use TLS and API clients must present a certificate.
    /// For other commands: how to reach a node that has TLS.
    #[arg(long, global = true, env = "DLSM_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// File holding the API token. For `serve`: every API request must carry
    /// it (and the node sends it to other nodes). For other commands: sent.
    #[arg(long, global = true, env = "DLSM_API_TOKEN_FILE")]
    pub api_token_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a storage node.
    Serve {
        /// Directory holding this node's volumes.
        #[arg(long)]
        data_dir: PathBuf,
        /// NBD over TCP.
        #[arg(long, default_value = "127.0.0.1:10809")]
        listen: String,
        /// NBD over a UNIX socket as well.
        #[arg(long)]
        listen_unix: Option<PathBuf>,
        /// This node's name.
        #[arg(long)]
        node: Option<String>,
        /// Seconds a request needing an unreachable migration source waits
        /// before failing with EIO.
        #[arg(long, default_value_t = 30)]
        source_timeout: u64,
        /// Seconds an NBD client may take over its whole handshake (TLS
        /// included) before it is dropped, so clients that connect and
        /// stall cannot pile up.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
        handshake_timeout: u64,
        /// Most NBD connections served at once (TCP and UNIX together);
        /// more are closed at accept. 0: the open-file limit less 1,024
        /// kept for the node's own files and connections.
        #[arg(long, default_value_t = 0)]
        max_connections: usize,
        /// Serve the API in plain HTTP on a non-loopback address. Anyone who
        /// can reach it can create, delete and migrate volumes: only for
        /// isolated test networks.
        #[arg(long)]
        insecure_api: bool,
        /// The NBD address other nodes are told to reach this node's exports
        /// by, when it differs from --listen (NAT, a proxy, a wildcard
        /// listener).
        #[arg(long)]
        advertise_nbd: Option<String>,
        /// The API address other nodes are told to reach this node by, when
        /// it differs from --api.
        #[arg(long)]
        advertise_api: Option<String>,
        /// Fault injection for tests: milliseconds added to every read from
        /// a migration source.
        #[arg(long, default_value_t = 0, hide = true)]
        inject_origin_delay_ms: u64,
    },
    /// Manage volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Migrate a volume from this node (--api) to another, live.
    Migrate {
        name: String,
        /// The destination node's API address.
        #[arg(long)]
        to: String,
        /// Region size, e.g. 64K (default), 1M.
        #[arg(long, value_parser = parse_size)]
        region_size: Option<u64>,
        /// Background copy limit in bytes per second (e.g. 100M).
        #[arg(long, value_parser = parse_size)]
        rate: Option<u64>,
        /// Keep the source copy (fenced) after completion instead of deleting it.
        #[arg(long)]
        keep_source: bool,
        /// Wait until hydration completes, showing progress.
        #[arg(long)]
        wait: bool,
        #[arg(long)]
        json: bool,
    },
    /// Inspect and steer migrations.
    #[command(subcommand)]
    Migration(MigrationCmd),
    /// Run the demonstration: a live migration between two nodes on loopback.
    Demo {
        /// Keep serving after the demo until Ctrl-C.
        #[arg(long)]
        hold: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum MigrationCmd {
    /// Show a migration's progress (on either node).
    Status {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Hand the volume off now (on the destination).
    Handoff {
        name: String,
        /// The source is dead: take ownership without fencing it.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Cancel a migration that was not handed off yet (on the source): the
    /// destination drops its copy and the volume stays here, writable.
    Cancel {
        name: String,
        /// The destination is gone for good: forget the migration without
        /// its answer (its copy, should it return, is refused by this node).
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Pause the background copy (on-demand fetches go on).
    Pause {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Resume the background copy.
    Resume {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Change the background copy limit (bytes/s; 0 = none).
    SetRate {
        name: String,
        #[arg(value_parser = parse_size)]
        rate: u64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum VolumeCmd {
    /// Create a volume (empty, or filled from a raw image file).
    Create {
        name: String,
        /// Size, e.g. 512M, 10G, 1T (default with --from: the file's size).
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Raw image to copy into the new volume.
        #[arg(long)]
        from: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// List volumes.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one volume.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a volume and its data. Refused while NBD clients are attached
    /// or while a migration needs this copy (the source of a migration, or
    /// its destination), unless --force.
    Rm {
        name: String,
        /// Remove it anyway, destroying what depends on it: on a migration
        /// source, every region the destination has not copied yet; on a
        /// destination after handoff, every write made there since; on a
        /// destination before handoff, only the clone (the source keeps the
        /// volume, and cancels the migration with `migration cancel`).
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
}

/// Entry point of the binary.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // rustls warns about every gnutls client (QEMU, libnbd) that sends an
    // IP address as SNI; that is harmless and would flood the log.
    let default_log = if matches!(cli.command, Command::Serve { .. }) {
        "info,rustls=error"
    } else {
        "warn,rustls=error"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_log)),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let token = match &cli.api_token_file {
        Some(p) => Some(ApiAuth::read_token(p)?),
        None => None,
    };
    if !matches!(cli.command, Command::Serve { .. }) {
        let tls = match &cli.tls_dir {
            Some(d) => Some(crate::tls::TlsConfig::load_client(d)?),
            None => None,
        };
        let auth = ApiAuth {
            tls: tls.as_ref().map(|t| t.client.clone()),
            token,
        };
        return client_command(cli, auth, tls);
    }
    match cli.command {
        Command::Serve {
            data_dir,
            listen,
            listen_unix,
            node,
            source_timeout,
            handshake_timeout,
            max_connections,
            inject_origin_delay_ms,
            insecure_api,
            advertise_nbd,
            advertise_api,
        } => {
            let name = node.unwrap_or_else(|| {
                nix::unistd::gethostname()
                    .map(|h| h.to_string_lossy().into_owned())
                    .unwrap_or_else(|_| "node".into())
            });
            let cfg = NodeConfig {
                data_dir,
                listen: Some(listen),
                listen_unix,
                api: cli.api,
                name,
                source_timeout: Duration::from_secs(source_timeout),
                inject_origin_delay: Duration::from_millis(inject_origin_delay_ms),
                handshake_timeout: Duration::from_secs(handshake_timeout),
                max_connections,
                tls: match &cli.tls_dir {
                    Some(d) => Some(crate::tls::TlsConfig::load_node(d)?),
                    None => None,
                },
                api_token: token,
                insecure_api,
                advertise_nbd,
                advertise_api,
            };
            runtime()?.block_on(serve(cfg))
        }
        _ => unreachable!("client commands are handled above"),
    }
}

/// Every command but `serve`: a client of a node's API.
fn client_command(
    cli: Cli,
    auth: ApiAuth,
    tls: Option<crate::tls::TlsConfig>,
) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { .. } => unreachable!("serve is not a client command"),
        Command::Volume(cmd) => {
            let nbd_tls = tls.map(|t| t.connector());
            volume(&Api::with_auth(&cli.api, &auth), cmd, nbd_tls.as_ref())
        }
        Command::Migrate {
            name,
            to,
            region_size,
            rate,
            keep_source,
            wait,
            json,
        } => {
            let api = Api::with_auth(&cli.api, &auth);
            let req = MigrateRequest {
                to: to.clone(),
                region_size,
                rate,
                keep_source,
            };
            let s: MigrationStatus =
                api.post(&format!("/v1/volumes/{}/migrate", seg(&name)?), &req)?;
            if !wait {
                return print_status(&s, json);
            }
            if !json {
                println!("{name}: prepared on {to}, serving there now; waiting for hydration");
            }
            wait_for(&Api::with_auth(&to, &auth), &name, json)
        }
        Command::Migration(cmd) => migration(&Api::with_auth(&cli.api, &auth), cmd),
        Command::Demo { hold } => runtime()?.block_on(crate::demo::run(hold)),
    }
}

/// Raises the soft open-file limit to the hard one: each NBD or API
/// connection is a descriptor, and a soft limit of 1024 (a common default)
/// would make the node refuse clients long before memory runs short.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!("open-file limit raised from {soft} to {hard}"),
            Err(e) => tracing::warn!("cannot raise the open-file limit from {soft}: {e}"),
        },
        Ok((soft, _)) => tracing::info!("open-file limit {soft}"),
        Err(e) => tracing::warn!("cannot read the open-file limit: {e}"),
    }
}

async fn serve(cfg: NodeConfig) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    raise_fd_limit();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let node = Node::start(cfg).await?;
    // One machine-readable line so scripts and tests learn the bound ports.
    println!(
        "dlsm node {} ready nbd={} api={}",
        node.state.name,
        node.state
            .nbd_addr
            .map(|a| a.to_string())
            .unwrap_or_default(),
        node.api_addr
    );
    // SIGHUP reloads the TLS directory (a new CRL, renewed certificates)
    // without dropping a single connection; by default it would kill the
    // node.
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break }
            _ = hup.recv() => match node.reload_tls() {
                Ok(true) => tracing::info!("SIGHUP: TLS directory reloaded; new connections use it"),
                Ok(false) => tracing::info!("SIGHUP: this node has no TLS directory to reload"),
                Err(e) => tracing::error!("SIGHUP: TLS directory not reloaded, the old material stays in force: {e}"),
            },
        }
    }
    node.shutdown(Duration::from_secs(30)).await;
    Ok(())
}

fn print_status(s: &MigrationStatus, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(s)?);
        return Ok(());
    }
    let pct = if s.regions_total > 0 {
        100.0 * s.regions_present as f64 / s.regions_total as f64
    } else {
        0.0
    };
    println!(
        "volume:      {} ({} of the migration, peer {})",
        s.volume, s.role, s.peer
    );
    println!(
        "phase:       {:?}{}",
        s.phase,
        if s.paused { " (paused)" } else { "" }
    );
    if let Some(why) = &s.stalled {
        println!("stalled:     {why}");
    }
    println!(
        "regions:     {}/{} present ({pct:.1}%), {} each",
        s.regions_present,
        s.regions_total,
        format_size(s.region_size)
    );
    println!(
        "bytes:       on demand {}, background {}, skipped (zero) {}",
        format_size(s.bytes_on_demand),
        format_size(s.bytes_background),
        format_size(s.bytes_skipped)
    );
    let limit = if s.rate_limit == 0 {
        "unlimited".to_string()
    } else {
        format!("{}/s", format_size(s.rate_limit))
    };
    println!("rate:        {}/s (limit {limit})", format_size(s.rate));
    if let Some(eta) = s.eta_seconds {
        println!("eta:         {eta:.0} s");
    }
    if let Some(e) = &s.last_error {
        println!("last error:  {e}");
    }
    Ok(())
}

/// Polls the destination until the migration completes or fails.
fn wait_for(api: &Api, name: &str, json: bool) -> anyhow::Result<()> {
    let bar = (!json).then(|| {
        let b = indicatif::ProgressBar::new(1);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} regions  {msg}",
            )
            .expect("valid template"),
        );
        b
    });
    loop {
        let s: MigrationStatus = api.get(&format!("/v1/migrations/{}", seg(name)?))?;
        if let Some(b) = &bar {
            b.set_length(s.regions_total.max(1));
            b.set_position(s.regions_present);
            b.set_message(format!(
                "{:?} {}/s{}",
                s.phase,
                format_size(s.rate),
                s.last_error
                    .as_deref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            ));
        } else {
            println!("{}", serde_json::to_string(&s)?);
        }
        match s.phase {
            Phase::Complete => {
                if let Some(b) = &bar {
                    b.finish_with_message("complete");
                    print_status(&s, false)?;
                }
                return Ok(());
            }
            Phase::Failed => bail!(
                "migration of {name} failed: {}",
                s.last_error.unwrap_or_default()
            ),
            _ => std::thread::sleep(Duration::from_millis(if json { 1000 } else { 200 })),
        }
    }
}

fn migration(api: &Api, cmd: MigrationCmd) -> anyhow::Result<()> {
    let (s, json): (MigrationStatus, bool) = match cmd {
        MigrationCmd::Cancel { name, force, json } => {
            let r: serde_json::Value = api.post(
                &format!("/v1/migrations/{}/cancel", seg(&name)?),
                &CancelRequest { force },
            )?;
            if json {
                return print_json(&r);
            }
            println!("migration of {name} cancelled: the volume stays on this node");
            return Ok(());
        }
        MigrationCmd::Status { name, json } => {
            (api.get(&format!("/v1/migrations/{}", seg(&name)?))?, json)
        }
        MigrationCmd::Handoff { name, force, json } => (
            api.post(
                &format!("/v1/migrations/{}/handoff", seg(&name)?),
                &HandoffRequest { force, id: None },
            )?,
            json,
        ),
        MigrationCmd::Pause { name, json } => (
            api.post(&format!("/v1/migrations/{}/pause", seg(&name)?), &())?,
            json,
        ),
        MigrationCmd::Resume { name, json } => (
            api.post(&format!("/v1/migrations/{}/resume", seg(&name)?), &())?,
            json,
        ),
        MigrationCmd::SetRate { name, rate, json } => (
            api.post(
                &format!("/v1/migrations/{}/rate", seg(&name)?),
                &RateRequest { rate },
            )?,
            json,
        ),
    };
    print_status(&s, json)
}

fn print_json(v: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn print_volumes(vols: &[VolumeInfo]) {
    println!(
        "{:<24} {:>10} {:>10} {:>5}  URI",
        "NAME", "SIZE", "ALLOCATED", "CONNS"
    );
    for v in vols {
        println!(
            "{:<24} {:>10} {:>10} {:>5}  {}",
            v.name,
            format_size(v.size),
            format_size(v.allocated_bytes),
            v.connections,
            v.uri.as_deref().unwrap_or("-")
        );
    }
}

/// `nbd_tls`: how to reach the node's NBD listener for `create --from`.
fn volume(
    api: &Api,
    cmd: VolumeCmd,
    nbd_tls: Option<&tokio_rustls::TlsConnector>,
) -> anyhow::Result<()> {
    match cmd {
        VolumeCmd::Create {
            name,
            size,
            from,
            json,
        } => {
            let file_len = match &from {
                Some(p) => Some(
                    std::fs::metadata(p)
                        .with_context(|| format!("cannot read {}", p.display()))?
                        .len(),
                ),
                None => None,
            };
            let size = match (size, file_len) {
                (Some(s), Some(f)) if s < f => {
                    bail!(
                        "--size {s} is smaller than {} ({f} bytes)",
                        from.unwrap().display()
                    )
                }
                (Some(s), _) => s,
                (None, Some(f)) => f.div_ceil(512) * 512,
                (None, None) => bail!("give --size (or --from FILE)"),
            };
            let v: VolumeInfo = api.post(
                "/v1/volumes",
                &CreateVolume {
                    name: name.clone(),
                    size,
                },
            )?;
            if let Some(path) = from {
                let node: NodeInfo = api.get("/v1/node")?;
                let nbd = node
                    .nbd
                    .ok_or_else(|| anyhow!("the node has no TCP NBD listener"))?;
                let nbd = match nbd.rsplit_once(':') {
                    Some(("0.0.0.0" | "[::]", port)) => format!("{}:{port}", api.host()),
                    _ => nbd,
                };
                let uploaded = runtime()?.block_on(upload(
                    &path,
                    &nbd.parse().map_err(|e: String| anyhow!(e))?,
                    &name,
                    nbd_tls,
                ));
                if let Err(e) = uploaded {
                    let _ = api.delete(&format!("/v1/volumes/{}", seg(&name)?));
                    return Err(e.context(format!(
                        "upload of {} failed; volume removed",
                        path.display()
                    )));
                }
            }
            let v: VolumeInfo = api.get(&format!("/v1/volumes/{}", seg(&v.name)?))?;
            if json {
                print_json(&v)
            } else {
                println!("created {} ({})", v.name, format_size(v.size));
                Ok(())
            }
        }
        VolumeCmd::List { json } => {
            let vols: Vec<VolumeInfo> = api.get("/v1/volumes")?;
            if json {
                print_json(&vols)
            } else {
                print_volumes(&vols);
                Ok(())
            }
        }
        VolumeCmd::Show { name, json } => {
            let v: VolumeInfo = api.get(&format!("/v1/volumes/{}", seg(&name)?))?;
            if json {
                print_json(&v)
            } else {
                print_volumes(&[v]);
                Ok(())
            }
        }
        VolumeCmd::Rm { name, force, json } => {
            let force = if force { "?force=true" } else { "" };
            api.delete(&format!("/v1/volumes/{}{force}", seg(&name)?))?;
            if json {
                print_json(&serde_json::json!({ "removed": name }))
            } else {
                println!("removed {name}");
                Ok(())
            }
        }
    }
}

/// Copies a raw image into a volume over NBD, skipping all-zero blocks
/// (the new volume reads zero there already).
async fn upload(
    path: &std::path::Path,
    addr: &NbdAddr,
    name: &str,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> anyhow::Result<()> {
    const CHUNK: usize = 1 << 20;
    const IN_FLIGHT: usize = 8;
    let client = NbdClient::connect_with(addr, name, tls).await?;
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut tasks = tokio::task::JoinSet::new();
    let mut offset = 0u64;
    loop {
        let mut buf = vec![0u8; CHUNK];
        let mut n = 0;
        while n < CHUNK {
            let r = file.read(&mut buf[n..])?;
            if r == 0 {
                break;
            }
            n += r;
        }
        if n == 0 {
            break;
        }
        buf.truncate(n);
        if buf.iter().any(|b| *b != 0) {
            if tasks.len() >= IN_FLIGHT {
                tasks.join_next().await.expect("non-empty")??;
            }
            let c = client.clone();
            let at = offset;
            tasks.spawn(async move { c.write(at, &buf, false).await });
        }
        offset += n as u64;
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    client.flush().await?;
    client.disconnect().await?;
    Ok(())
}
