//! `dlsm serve`: runs a node until SIGTERM or SIGINT. SIGHUP rereads the
//! TLS directory (new connections use it; none is dropped), which is what
//! `systemctl reload` sends (`packaging/dlsm.service`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;

use super::args;
use crate::node::{Node, NodeConfig};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Directory holding this node's volumes.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// NBD over TCP: the address to listen on, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:10809", value_parser = args::host_port)]
    pub listen: String,
    /// NBD over a UNIX socket as well.
    #[arg(long)]
    pub listen_unix: Option<PathBuf>,
    /// This node's name, one word (default: the host name).
    #[arg(long, value_parser = args::node_name)]
    pub node: Option<String>,
    /// Seconds a request needing an unreachable migration source waits
    /// before failing with EIO.
    #[arg(long, default_value_t = 30)]
    pub source_timeout: u64,
    /// Seconds an NBD client may take over its whole handshake (TLS
    /// included) before it is dropped, so clients that connect and
    /// stall cannot pile up.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub handshake_timeout: u64,
    /// Most NBD connections served at once (TCP and UNIX together);
    /// more are closed at accept. 0: the open-file limit less 1,024
    /// kept for the node's own files and connections.
    #[arg(long, default_value_t = 0)]
    pub max_connections: usize,
    /// Serve the API in plain HTTP on a non-loopback address. Anyone who
    /// can reach it can create, delete and migrate volumes: only for
    /// isolated test networks.
    #[arg(long)]
    pub insecure_api: bool,
    /// The NBD address other nodes are told to reach this node's exports
    /// by, HOST:PORT, when it differs from --listen (NAT, a proxy, a
    /// wildcard listener).
    #[arg(long, value_parser = args::host_port)]
    pub advertise_nbd: Option<String>,
    /// The API address other nodes are told to reach this node by,
    /// HOST:PORT, when it differs from --api.
    #[arg(long, value_parser = args::api_addr)]
    pub advertise_api: Option<String>,
    /// Serve every volume as a vhost-user-blk backend too, at the UNIX
    /// socket DIR/NAME (QEMU: -chardev socket,path=DIR/NAME plus
    /// -device vhost-user-blk-pci, with shared guest memory).
    #[arg(long)]
    pub vhost_user_dir: Option<PathBuf>,
    /// Queues each vhost-user-blk device offers, one worker thread each
    /// (default: the number of CPUs).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub vhost_user_queues: Option<u16>,
    /// Cluster mode: join the cluster kept in etcd at these client URLs
    /// (`http://HOST:PORT`, `https://...` with --tls-dir's client
    /// certificate), comma-separated. etcd then decides who owns each
    /// volume; the node registers as --node under a lease. Needs a build
    /// with `--features cluster`.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub cluster_etcd: Vec<String>,
    /// Cluster mode: seconds of this node's etcd lease. It is renewed
    /// every (TTL - margin) / 4; a node that cannot renew shows down
    /// after the TTL.
    #[arg(long, default_value_t = crate::cluster::DEFAULT_LEASE_TTL,
          value_parser = clap::value_parser!(u64).range(2..=3600))]
    pub cluster_lease_ttl: u64,
    /// Fault injection for tests: milliseconds added to every read from
    /// a migration source.
    #[arg(long, default_value_t = 0, hide = true)]
    pub inject_origin_delay_ms: u64,
    /// Fault injection for tests: abort the process the first time it
    /// passes this crash point (see `dlsm::crash`).
    #[arg(long, hide = true)]
    pub crash_at: Option<String>,
    /// Fault injection for tests: wait at this pause point, `NAME:MS`
    /// (see `dlsm::crash`).
    #[arg(long, hide = true)]
    pub pause_at: Option<String>,
}

/// `dlsm serve`: `api` is where the API listens, `tls_dir` and `token`
/// what it demands of callers.
pub fn run(
    a: ServeArgs,
    api: &str,
    tls_dir: Option<&Path>,
    token: Option<String>,
) -> anyhow::Result<()> {
    if let Some(p) = &a.crash_at {
        crate::crash::arm(p);
    }
    if let Some(p) = &a.pause_at {
        crate::crash::arm_pause(p).map_err(anyhow::Error::msg)?;
    }
    if !a.cluster_etcd.is_empty() && !cfg!(feature = "cluster") {
        anyhow::bail!("{}", crate::cluster::NO_CLUSTER_BUILD);
    }
    if let Some(bad) = a.cluster_etcd.iter().find(|e| e.trim().is_empty()) {
        anyhow::bail!("--cluster-etcd {bad:?}: give etcd client URLs, e.g. http://127.0.0.1:2379");
    }
    let cluster = (!a.cluster_etcd.is_empty()).then(|| crate::cluster::ClusterConfig {
        endpoints: a.cluster_etcd.clone(),
        lease_ttl: Duration::from_secs(a.cluster_lease_ttl),
        tls_dir: tls_dir.map(Path::to_owned),
    });
    let name = a.node.unwrap_or_else(|| {
        nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "node".into())
    });
    let cfg = NodeConfig {
        data_dir: a.data_dir,
        listen: Some(a.listen),
        listen_unix: a.listen_unix,
        api: api.to_owned(),
        name,
        source_timeout: Duration::from_secs(a.source_timeout),
        inject_origin_delay: Duration::from_millis(a.inject_origin_delay_ms),
        handshake_timeout: Duration::from_secs(a.handshake_timeout),
        max_connections: a.max_connections,
        tls: match tls_dir {
            Some(d) => Some(crate::tls::TlsConfig::load_node(d)?),
            None => None,
        },
        api_token: token,
        insecure_api: a.insecure_api,
        advertise_nbd: a.advertise_nbd,
        advertise_api: a.advertise_api,
        vhost_user: a.vhost_user_dir.map(|dir| crate::node::VhostUserConfig {
            dir,
            num_queues: a
                .vhost_user_queues
                .map(usize::from)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        }),
        cluster,
    };
    super::runtime()?.block_on(serve(cfg))
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
