//! The node daemon (`dlsm serve`): owns a data directory's volumes, serves
//! them over NBD (TCP and UNIX sockets) and answers the control API, which
//! also serves the dashboard ([`dashboard`]).
//!
//! Lifecycle: [`Node::start`] opens the store, binds every listener and
//! spawns the accept loops; [`Node::shutdown`] stops accepting, lets every
//! connection finish its in-flight requests, and flushes every volume. The
//! node never exits with unflushed acknowledged writes when shut down this
//! way; after a crash, the data files and tables are whatever the page cache
//! had written, which is what NBD's FLUSH/FUA contract allows.

pub mod api;
pub mod cluster_migration;
pub mod dashboard;
pub mod fence;
pub mod history;
pub mod metrics;
pub mod migration;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::nbd::server::{serve_connection, stopped, Export, ExportRegistry, HandshakePolicy};
use store::VolumeStore;

/// How a node is started.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    /// NBD over TCP (`HOST:PORT`; port 0 picks one).
    pub listen: Option<String>,
    /// NBD over a UNIX socket.
    pub listen_unix: Option<PathBuf>,
    /// Control API (`HOST:PORT`).
    pub api: String,
    /// The node's name, reported by the API.
    pub name: String,
    /// How long requests wait for an unreachable migration source.
    pub source_timeout: Duration,
    /// Fault injection (tests only): latency added to every origin read.
    pub inject_origin_delay: Duration,
    /// How long an NBD client may take over its handshake.
    pub handshake_timeout: Duration,
    /// Most NBD connections (TCP and UNIX together) served at once; more
    /// are closed at accept. 0: the open-file limit less
    /// [`RESERVED_DESCRIPTORS`].
    pub max_connections: usize,
    /// TLS for NBD (required of every client, both listeners), for the API,
    /// and for this node's own outgoing connections.
    pub tls: Option<crate::tls::TlsConfig>,
    /// Bearer token every API request must carry (and that this node sends
    /// to other nodes).
    pub api_token: Option<String>,
    /// Allow a plain-HTTP API on a non-loopback address (isolated test
    /// networks only).
    pub insecure_api: bool,
    /// The NBD address other nodes are told to use (default: the bound
    /// `listen` address).
    pub advertise_nbd: Option<String>,
    /// The API address other nodes are told to use (default: the bound
    /// `api` address).
    pub advertise_api: Option<String>,
    /// Serve every volume as a vhost-user-blk backend too, at `DIR/NAME`.
    pub vhost_user: Option<VhostUserConfig>,
    /// Cluster mode: join the cluster at these etcd endpoints (`None`:
    /// peer mode). Needs a build with the `cluster` feature.
    pub cluster: Option<crate::cluster::ClusterConfig>,
}

/// The vhost-user-blk export (`--vhost-user-dir`).
#[derive(Debug, Clone)]
pub struct VhostUserConfig {
    /// Where the sockets live (one per volume, named after it).
    pub dir: PathBuf,
    /// Queues each device offers (`num-queues` in QEMU may ask fewer).
    pub num_queues: usize,
}

/// Descriptors kept back from NBD clients when `max_connections` is 0:
/// volume files, region maps, the API's 256 connections and 256 TLS
/// handshakes, and this node's own connections to migration sources.
pub const RESERVED_DESCRIPTORS: usize = 1024;

/// The NBD connection cap `max_connections` means (0: derived from the
/// open-file limit, so that clients can never take the descriptors the
/// node needs for itself).
fn connection_cap(max_connections: usize) -> usize {
    if max_connections > 0 {
        return max_connections;
    }
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024);
    let soft = usize::try_from(soft).unwrap_or(usize::MAX);
    soft.saturating_sub(RESERVED_DESCRIPTORS).max(64)
}

/// Lets a warning through at most once a minute, for warnings a flood of
/// connections would otherwise repeat once per connection.
#[derive(Default)]
pub(crate) struct WarnThrottle(Option<tokio::time::Instant>);

impl WarnThrottle {
    /// Whether to log now.
    pub(crate) fn ready(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        if self.0.is_some_and(|t| now - t < Duration::from_secs(60)) {
            return false;
        }
        self.0 = Some(now);
        true
    }
}

/// Serves the store's volumes as NBD exports.
struct Registry(Arc<VolumeStore>);

impl ExportRegistry for Registry {
    fn list(&self) -> Vec<(String, String)> {
        self.0
            .list()
            .iter()
            .map(|v| (v.name.clone(), format!("dlsm volume, {} bytes", v.size)))
            .collect()
    }

    fn open(&self, name: &str) -> Option<Export> {
        // `NAME@origin:ID` is how the destination of migration ID reads
        // its source: read-only (a destination never writes its origin),
        // not counted as a client (so the source can tell when its last
        // real client leaves), and served only while ID is this volume's
        // outgoing migration: a clone left over from an older or abandoned
        // migration gets "no such export", never this incarnation's data.
        if let Some((vol, rest)) = name.split_once(store::ORIGIN_MARK) {
            let (id, generation) = store::parse_origin(rest);
            let v = self.0.get(vol).ok()?;
            // Cluster mode: a link from behind this copy's generation is
            // stale, whatever its migration id.
            if generation.is_some_and(|g| g < v.table().generation) {
                debug!(export = name, "origin link refused: stale generation");
                return None;
            }
            // A rollback clone not handed off yet: its local file is this
            // node's copy from migration `id`, which the destination of
            // `id` still reads the regions it lacks from (it wrote none
            // of those, so the copy is current for every one of them).
            if let (
                Some(c),
                store::TargetSpec::Clone {
                    rollback_of: Some(base),
                    handed_off: false,
                    ..
                },
            ) = (v.clone_target(), v.table().target)
            {
                if base.id == id && !c.is_handed_off() {
                    return Some(Export {
                        name: name.to_owned(),
                        description: format!("dlsm volume {vol}, origin link (rollback base)"),
                        target: c.local(),
                        read_only: true,
                        bulk_reads: true,
                        guard: Box::new(()),
                    });
                }
            }
            if v.table().outgoing.is_none_or(|o| o.id != id) {
                debug!(
                    export = name,
                    "origin link refused: not this volume's outgoing migration"
                );
                return None;
            }
            return Some(Export {
                name: name.to_owned(),
                description: format!("dlsm volume {vol}, origin link"),
                target: v.target(),
                read_only: true,
                // Only the origin link: a guest's own reads keep the cache.
                bulk_reads: true,
                guard: Box::new(()),
            });
        }
        let v = self.0.get(name).ok()?;
        Some(Export {
            name: v.name.clone(),
            description: format!("dlsm volume, {} bytes", v.size),
            target: v.gated_target(),
            read_only: false,
            bulk_reads: false,
            guard: Box::new(v.connection_guard()),
        })
    }
}

/// The node's cluster membership, as the clones' migration hooks reach
/// it: set once the node has joined, which is after the store opened (and
/// made those hooks). Never set in peer mode.
pub type ClusterSlot = Arc<std::sync::OnceLock<ClusterHandle>>;
#[cfg(feature = "cluster")]
pub type ClusterHandle = Arc<crate::cluster::Cluster>;
/// A build without the `cluster` feature has no membership to hold.
#[cfg(not(feature = "cluster"))]
pub type ClusterHandle = std::convert::Infallible;

/// What the API handlers share.
pub struct NodeState {
    pub name: String,
    /// This node's identity (`DATA_DIR/node-id`, made once).
    pub id: String,
    pub store: Arc<VolumeStore>,
    pub nbd_addr: Option<SocketAddr>,
    pub nbd_unix: Option<PathBuf>,
    pub api_addr: SocketAddr,
    /// The NBD address other nodes reach this node's exports by.
    pub advertised_nbd: Option<String>,
    /// The API address other nodes reach this node by.
    pub advertised_api: String,
    /// How long a call to another node may take (`--source-timeout`).
    pub source_timeout: Duration,
    /// What this node presents when it calls another node's API.
    pub peer_auth: crate::api_client::ApiAuth,
    /// The token incoming API requests must carry, if any.
    pub api_token: Option<String>,
    /// How the migrations this node took part in ended (persisted).
    pub history: history::History,
    /// The dashboard's event streams and their producer.
    pub dashboard: dashboard::Dashboard,
    /// The registry `GET /metrics` renders, and the NBD server's instruments.
    pub metrics: Arc<metrics::NodeMetrics>,
    /// The vhost-user-blk sockets, when the node serves them.
    pub vhost: Option<Arc<crate::vhost::VhostExports>>,
    /// Cluster mode: this node's membership and the directory (`None`:
    /// peer mode).
    #[cfg(feature = "cluster")]
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

impl NodeState {
    /// `nbds` when clients must use TLS (the scheme libnbd and QEMU know).
    pub fn nbd_scheme(&self) -> &'static str {
        if self.peer_auth.tls.is_some() {
            "nbds"
        } else {
            "nbd"
        }
    }
}

/// A running node.
pub struct Node {
    pub state: Arc<NodeState>,
    pub api_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
    /// Where the TLS material came from, for [`Node::reload_tls`].
    tls_dir: Option<PathBuf>,
    /// The acceptor every new NBD and API connection takes (`None`: no TLS).
    acceptor: watch::Sender<Option<tokio_rustls::TlsAcceptor>>,
}

impl Node {
    /// Opens the data directory and starts serving.
    pub async fn start(cfg: NodeConfig) -> anyhow::Result<Node> {
        std::fs::create_dir_all(&cfg.data_dir)
            .with_context(|| format!("cannot create data dir {}", cfg.data_dir.display()))?;
        let api = TcpListener::bind(&cfg.api)
            .await
            .with_context(|| format!("cannot listen for the API on {}", cfg.api))?;
        let api_addr = api.local_addr()?;
        if !api_addr.ip().is_loopback() && cfg.tls.is_none() {
            if !cfg.insecure_api {
                anyhow::bail!(
                    "the API would listen on {api_addr}, which is not loopback: give --tls-dir \
                     (API clients must then present a certificate signed by its CA), or listen \
                     on 127.0.0.1; an API open to the network would let anyone drive this node"
                );
            }
            warn!(api = %api_addr, "--insecure-api: anyone who can reach this address can drive this node");
        }
        let peer_auth = crate::api_client::ApiAuth {
            tls: cfg.tls.as_ref().map(|t| t.client.clone()),
            token: cfg.api_token.clone(),
        };
        let cluster_slot = ClusterSlot::default();
        let env = store::CloneEnv {
            source_timeout: cfg.source_timeout,
            origin_connections: 4,
            origin_read_delay: cfg.inject_origin_delay,
            origin_tls: cfg.tls.as_ref().map(|t| t.connector()),
            hooks: migration::hooks_factory(
                cfg.advertise_api
                    .clone()
                    .unwrap_or_else(|| api_addr.to_string()),
                cfg.source_timeout,
                peer_auth.clone(),
                cluster_slot.clone(),
            ),
        };
        let store = Arc::new(
            VolumeStore::open(&cfg.data_dir, env)
                .with_context(|| format!("cannot open data dir {}", cfg.data_dir.display()))?,
        );
        // Cluster mode: no write is acknowledged until ownership is
        // re-confirmed with the cluster (below, before the API serves). A
        // migration's hold (a restart mid-migration) is a slot of its own,
        // lifted by what the destination answers, not by the cluster.
        if cfg.cluster.is_some() {
            for v in store.list() {
                v.fence.hold_cluster(CLUSTER_HOLD.into());
            }
        } else {
            // A cluster copy on a node started without its cluster: nothing
            // here can say whether it is still the volume (another node may
            // own it since), and writes would be bound to no lease.
            for v in store.list().iter().filter(|v| v.table().generation > 0) {
                let g = v.table().generation;
                warn!(volume = %v.name, generation = g, "a cluster copy on a node not in a cluster: held");
                v.fence.hold_stale(format!(
                    "writes and reads refused: volume {} is a cluster volume (generation {g}) \
                     and this node was started without --cluster-etcd; start it in its cluster",
                    v.name
                ));
            }
        }
        let (shutdown, shutdown_rx) = watch::channel(false);
        let registry: Arc<dyn ExportRegistry> = Arc::new(Registry(store.clone()));
        let (acceptor, acceptor_rx) = watch::channel(cfg.tls.as_ref().and_then(|t| t.acceptor()));
        let mut tasks = JoinSet::new();
        let cap = connection_cap(cfg.max_connections);
        info!(max_connections = cap, "NBD connection cap");
        let slots = Arc::new(Semaphore::new(cap));
        let node_metrics = Arc::new(metrics::NodeMetrics::default());

        let mut nbd_addr = None;
        if let Some(listen) = &cfg.listen {
            let l = TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen for NBD on {listen}"))?;
            nbd_addr = Some(l.local_addr()?);
            tasks.spawn(accept_loop(
                NbdListener::Tcp(l),
                registry.clone(),
                cfg.handshake_timeout,
                acceptor_rx.clone(),
                slots.clone(),
                node_metrics.nbd(),
                shutdown_rx.clone(),
            ));
        }
        if let Some(path) = &cfg.listen_unix {
            // A socket file left by a previous run would make bind fail.
            if path.exists() {
                std::fs::remove_file(path)
                    .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
            }
            let l = UnixListener::bind(path)
                .with_context(|| format!("cannot listen for NBD on {}", path.display()))?;
            tasks.spawn(accept_loop(
                NbdListener::Unix(l),
                registry.clone(),
                cfg.handshake_timeout,
                acceptor_rx.clone(),
                slots.clone(),
                node_metrics.nbd(),
                shutdown_rx.clone(),
            ));
        }
        if cfg.listen.is_none() && cfg.listen_unix.is_none() {
            anyhow::bail!("no NBD listener: give --listen or --listen-unix");
        }
        let vhost = match &cfg.vhost_user {
            Some(v) => {
                let exports = Arc::new(
                    crate::vhost::VhostExports::new(
                        &v.dir,
                        v.num_queues,
                        tokio::runtime::Handle::current(),
                    )
                    .with_context(|| {
                        format!("cannot use {} for vhost-user sockets", v.dir.display())
                    })?,
                );
                tasks.spawn(follow_volumes(
                    exports.clone(),
                    store.clone(),
                    shutdown_rx.clone(),
                ));
                Some(exports)
            }
            None => None,
        };
        let id = store::node_id(&cfg.data_dir)
            .with_context(|| format!("cannot read the node id in {}", cfg.data_dir.display()))?;
        let advertised_nbd = cfg
            .advertise_nbd
            .clone()
            .or_else(|| nbd_addr.map(|a| a.to_string()));
        let advertised_api = cfg
            .advertise_api
            .clone()
            .unwrap_or_else(|| api_addr.to_string());
        // After the store took the directory's lock: a `nodes/NAME` with
        // this directory's id can then only be our own previous run.
        #[cfg(feature = "cluster")]
        let dir_cluster = store::cluster_id(&cfg.data_dir)?;
        #[cfg(feature = "cluster")]
        let cluster = match &cfg.cluster {
            Some(c) => Some(
                crate::cluster::Cluster::join(
                    c,
                    crate::cluster::NodeRecord {
                        v: 1,
                        name: cfg.name.clone(),
                        dir_id: id.clone(),
                        nbd: advertised_nbd.clone(),
                        api: advertised_api.clone(),
                        vhost_user_dir: vhost.as_ref().map(|x| x.dir().display().to_string()),
                        version: env!("CARGO_PKG_VERSION").into(),
                        host: nix::unistd::gethostname()
                            .map(|h| h.to_string_lossy().into_owned())
                            .unwrap_or_default(),
                        data_dir: std::fs::canonicalize(&cfg.data_dir)
                            .unwrap_or_else(|_| cfg.data_dir.clone())
                            .display()
                            .to_string(),
                    },
                    dir_cluster.as_deref(),
                )
                .await
                .map_err(|e| match e {
                    crate::cluster::ClusterError::NoCluster { ref ours } => anyhow::anyhow!(
                        "{e}. If it is the cluster's etcd, restored from a backup made before \
                         the cluster had an id, put the id back: etcdctl put /dlsm/v1/cluster \
                         '{{\"v\":1,\"id\":\"{ours}\",\"created\":\"restored\"}}'. \
                         Otherwise point --cluster-etcd at the etcd of cluster {ours}"
                    ),
                    crate::cluster::ClusterError::OtherCluster { ref ours, .. } => {
                        anyhow::anyhow!(
                            "{e}: point --cluster-etcd at the etcd of cluster {ours}. If that \
                             etcd is lost for good and this node must join the other cluster, \
                             delete {} (its cluster volumes are then held as orphans, never \
                             served)",
                            cfg.data_dir.join(store::CLUSTER_ID).display()
                        )
                    }
                    e => anyhow::Error::new(e),
                })
                .context("cannot join the cluster")?,
            ),
            None => None,
        };
        // The first join records the cluster (after it: a crash before
        // this line joins the same etcd again and records it then).
        #[cfg(feature = "cluster")]
        if let (Some(c), None) = (&cluster, &dir_cluster) {
            if let Err(e) = store::set_cluster_id(&cfg.data_dir, &c.id) {
                c.leave().await;
                return Err(anyhow::Error::new(e).context("cannot record the cluster's id"));
            }
        }
        #[cfg(feature = "cluster")]
        if let Some(c) = &cluster {
            let _ = cluster_slot.set(c.clone());
            if let Err(e) = adopt(c, &store).await {
                c.leave().await; // down at once, not after the TTL
                return Err(anyhow::Error::new(e)
                    .context("cannot re-confirm this node's volumes with the cluster"));
            }
            // A lost lease replaced: a volume whose record no longer names
            // this node (changed or deleted meanwhile) takes no more writes.
            let st = store.clone();
            c.on_rebound(Box::new(move |owned: &[(String, u64)]| {
                for v in st.list() {
                    let ours = owned
                        .iter()
                        .any(|(n, g)| *n == v.name && *g == v.table().generation);
                    // A clone not handed off owns nothing yet: its handoff
                    // is a compare-and-swap under the new lease.
                    let arriving = v.clone_target().is_some_and(|c| !c.is_handed_off());
                    if v.fence.is_lease_bound() && !ours && !arriving {
                        warn!(volume = %v.name, "the cluster's directory no longer gives this volume to this node: writes refused");
                        v.fence.hold_stale(format!(
                            "writes refused: the cluster's directory no longer gives volume {} \
                             to this node (found when its lease was replaced); this copy is stale \
                             (`volume rm` deletes it)",
                            v.name
                        ));
                    }
                }
            }));
        }
        #[cfg(not(feature = "cluster"))]
        if cfg.cluster.is_some() {
            anyhow::bail!("{}", crate::cluster::NO_CLUSTER_BUILD);
        }
        let state = Arc::new(NodeState {
            name: cfg.name.clone(),
            id,
            store,
            nbd_addr,
            nbd_unix: cfg.listen_unix.clone(),
            api_addr,
            advertised_nbd,
            advertised_api,
            source_timeout: cfg.source_timeout,
            peer_auth,
            api_token: cfg.api_token.clone(),
            history: history::History::open(&cfg.data_dir),
            dashboard: dashboard::Dashboard::new(shutdown_rx.clone()),
            metrics: node_metrics,
            vhost,
            #[cfg(feature = "cluster")]
            cluster,
        });
        migration::resume_all(&state);
        let router = api::router(state.clone());
        let api_shutdown = shutdown_rx.clone();
        if cfg.tls.is_some() {
            tasks.spawn(api::serve(
                api::TlsListener::new(api, acceptor_rx.clone()),
                router,
                api_shutdown,
            ));
        } else {
            tasks.spawn(api::serve(api, router, api_shutdown));
        }
        info!(node = %cfg.name, nbd = ?nbd_addr, unix = ?cfg.listen_unix, api = %api_addr, "node started");
        Ok(Node {
            state,
            api_addr,
            shutdown,
            tasks,
            tls_dir: cfg.tls.as_ref().map(|t| t.dir.clone()),
            acceptor,
        })
    }

    /// Reads the TLS directory again (`SIGHUP`): new NBD and API
    /// connections are then verified against the new CA and CRL and shown
    /// the new server certificate; established ones keep their session.
    /// On any error the old material stays in force. This node's own
    /// outgoing connections keep the material it started with. Returns
    /// whether there was TLS to reload.
    pub fn reload_tls(&self) -> Result<bool, crate::tls::TlsError> {
        let Some(dir) = &self.tls_dir else {
            return Ok(false);
        };
        let fresh = crate::tls::TlsConfig::load_node(dir)?;
        self.acceptor.send_replace(fresh.acceptor());
        Ok(true)
    }

    /// Stops accepting, waits for connections to finish their in-flight
    /// requests (at most `grace`), then flushes every volume.
    pub async fn shutdown(mut self, grace: Duration) {
        let _ = self.shutdown.send(true);
        let drained = tokio::time::timeout(grace, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!("connections still busy after {grace:?}; closing them");
            self.tasks.abort_all();
        }
        self.state.store.flush_all().await;
        // Only now, with nothing left to acknowledge: down at once.
        #[cfg(feature = "cluster")]
        if let Some(c) = &self.state.cluster {
            c.leave().await;
        }
        if let Some(p) = &self.state.nbd_unix {
            let _ = std::fs::remove_file(p);
        }
        info!("node stopped, volumes flushed");
    }
}

/// Startup in cluster mode: rebinds the records this node owns to its new
/// lease and binds their fences to it; a cluster copy (its table has a
/// generation) whose record names another node stays held (stale: never
/// written, `volume rm` deletes it); a copy made in peer mode (generation
/// 0) is served as before, whatever the directory says of its name.
#[cfg(feature = "cluster")]
async fn adopt(
    c: &Arc<crate::cluster::Cluster>,
    store: &VolumeStore,
) -> Result<(), crate::cluster::ClusterError> {
    // Lifts only the cluster's own startup hold: a migration's hold (set
    // when the store opened) waits for the destination's answer.
    let lift = |v: &store::Volume| {
        if v.fence.held_by_cluster().as_deref() == Some(CLUSTER_HOLD) {
            v.fence.release_cluster_hold();
        }
    };
    let owned = c.rebind_owned(c.lease()).await?;
    for v in store.list() {
        let g = v.table().generation;
        // The destination of a cluster migration, not handed off yet (or
        // handed off in the directory, the table not told before a
        // crash): it takes writes only through its handoff, whose
        // compare-and-swap re-checks the record, so it is served while the
        // directory still records its migration to this node.
        if let Some(cl) = v.clone_target().filter(|cl| !cl.is_handed_off() && g > 0) {
            match c.record(&v.name).await? {
                Some((r, _))
                    if r.migration
                        .as_ref()
                        .is_some_and(|m| m.id == cl.migration_id() && m.to == c.name) =>
                {
                    v.fence.bind_lease(c.clock());
                    lift(&v);
                }
                other => {
                    warn!(volume = %v.name, "stale clone: the cluster's directory no longer records its migration to this node");
                    v.fence.hold_stale(format!(
                        "writes refused: the cluster's directory no longer records migration {} \
                         of volume {} to this node{}; this copy is stale",
                        cl.migration_id(),
                        v.name,
                        other.map_or(String::new(), |(r, _)| format!(
                            " (it is on node {}, generation {})",
                            r.owner, r.generation
                        ))
                    ));
                }
            }
            continue;
        }
        match owned.iter().find(|(n, _)| *n == v.name) {
            Some((_, rg)) if *rg == g => {
                v.fence.bind_lease(c.clock());
                lift(&v);
                continue;
            }
            // Ours in the directory, but of another generation (a
            // restored directory, an etcd restored from a backup): stale,
            // the operator decides.
            Some((_, rg)) => {
                warn!(volume = %v.name, local = g, record = rg, "stale copy: the directory's record of this volume has another generation");
                v.fence.hold_stale(format!(
                    "writes refused: this copy of volume {} is of generation {g}, the \
                     cluster's directory gives it to this node at generation {rg}; this copy \
                     is stale",
                    v.name
                ));
                continue;
            }
            None => {}
        }
        match c.record(&v.name).await? {
            Some((r, _)) if v.table().generation == 0 => {
                warn!(volume = %v.name, owner = %r.owner, "a peer-mode volume shares its name with a cluster volume; serving it as before");
                lift(&v);
            }
            Some((r, _)) => {
                warn!(volume = %v.name, owner = %r.owner, "stale copy: the cluster gives this volume to another node");
                v.fence.hold_stale(format!(
                    "writes refused: the cluster's directory gives volume {} to node {} \
                     (generation {}); this copy is stale",
                    v.name, r.owner, r.generation
                ));
            }
            // A cluster copy whose record is gone (deleted behind this
            // node's back, an etcd restored from an older backup): nothing
            // confirms it is ours, and the name may be created elsewhere.
            None if v.table().generation > 0 => {
                warn!(volume = %v.name, "orphan copy: made in the cluster, but the directory has no record of it");
                v.fence.hold_stale(format!(
                    "writes refused: volume {} was made in the cluster (generation {}) but the \
                     cluster's directory has no record of it; this copy is an orphan \
                     (`volume rm` deletes it)",
                    v.name,
                    v.table().generation
                ));
            }
            None => lift(&v),
        }
    }
    Ok(())
}

/// The hold every volume starts under in cluster mode, until [`adopt`].
const CLUSTER_HOLD: &str = "writes held: re-confirming ownership with the cluster";

/// Keeps a vhost-user socket for every volume, until shutdown.
async fn follow_volumes(
    exports: Arc<crate::vhost::VhostExports>,
    store: Arc<VolumeStore>,
    shutdown: watch::Receiver<bool>,
) {
    let mut changes = store.watch_volumes();
    let mut stop = shutdown;
    loop {
        changes.borrow_and_update();
        let (e, vols) = (exports.clone(), store.list());
        // Opening and closing sockets joins threads: not on a runtime worker.
        let _ = tokio::task::spawn_blocking(move || e.sync(&vols)).await;
        tokio::select! {
            _ = stopped(&mut stop) => break,
            r = changes.changed() => if r.is_err() { break },
        }
    }
    let _ = tokio::task::spawn_blocking(move || exports.stop_all()).await;
}

/// A listening NBD socket.
enum NbdListener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// An accepted NBD connection.
enum Accepted {
    Tcp(tokio::net::TcpStream, std::net::SocketAddr),
    Unix(tokio::net::UnixStream),
}

impl NbdListener {
    async fn accept(&self) -> std::io::Result<Accepted> {
        match self {
            NbdListener::Tcp(l) => l.accept().await.map(|(s, p)| Accepted::Tcp(s, p)),
            NbdListener::Unix(l) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
        }
    }
}

/// Accepts connections until shutdown, then waits for them to finish. A
/// connection holds one of `slots` (shared by every listener of the node)
/// for its lifetime; one accepted with none left is closed at once.
async fn accept_loop(
    l: NbdListener,
    registry: Arc<dyn ExportRegistry>,
    handshake_timeout: Duration,
    acceptor: watch::Receiver<Option<tokio_rustls::TlsAcceptor>>,
    slots: Arc<Semaphore>,
    metrics: Arc<metrics::NbdMetrics>,
    shutdown: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    let mut stop = shutdown.clone();
    let mut refusals = WarnThrottle::default();
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            r = l.accept() => match r {
                Ok(conn) => {
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        if refusals.ready() {
                            warn!("NBD connection cap reached: closing new connections (--max-connections)");
                        }
                        drop(conn);
                        continue;
                    };
                    let reg = registry.clone();
                    let sd = shutdown.clone();
                    let m = metrics.clone();
                    // The acceptor in force now: a SIGHUP reload applies
                    // from the next connection on.
                    let hs = HandshakePolicy {
                        tls: acceptor.borrow().clone(),
                        timeout: handshake_timeout,
                    };
                    conns.spawn(async move {
                        let _slot = slot;
                        let (peer, r) = match conn {
                            Accepted::Tcp(sock, peer) => {
                                let _ = sock.set_nodelay(true);
                                let peer = peer.to_string();
                                (peer.clone(), serve_connection(sock, reg, hs, sd, peer, m).await)
                            }
                            Accepted::Unix(sock) => {
                                ("unix".to_string(), serve_connection(sock, reg, hs, sd, "unix".into(), m).await)
                            }
                        };
                        if let Err(e) = r {
                            debug!(%peer, "connection ended: {e}");
                        }
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    while conns.join_next().await.is_some() {}
}
