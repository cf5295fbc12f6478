//! The control API: HTTP/JSON, what the CLI and other nodes talk to.
//!
//! | method | path                 | does                                 |
//! |--------|----------------------|--------------------------------------|
//! | GET    | /v1/node             | node name, addresses, version        |
//! | GET    | /v1/volumes          | every volume                         |
//! | POST   | /v1/volumes          | create `{name, size}`                |
//! | GET    | /v1/volumes/{name}   | one volume                           |
//! | DELETE | /v1/volumes/{name}   | delete (409 while clients attached)  |
//! | POST   | /v1/volumes/{name}/migrate | source: start a migration     |
//! | POST   | /v1/volumes/{name}/fence   | source: refuse writes, flush  |
//! | POST   | /v1/volumes/{name}/release | source: drop the handed-off copy |
//! | GET    | /v1/migrations             | every migration, every role, and the ended ones |
//! | POST   | /v1/migrations             | destination: prepare a clone  |
//! | GET    | /v1/migrations/{name}[?role=] | status, on either node (live or ended) |
//! | POST   | /v1/migrations/{name}/pause, /resume, /rate [?id=] | either node (the source asks the destination) |
//! | POST   | /v1/migrations/{name}/handoff | destination                |
//! | POST   | /v1/migrations/{name}/cancel  | either node: cancel, or roll back after handoff |
//! | POST   | /v1/migrations/{name}/rollback | destination: roll a handed-off migration back |
//! | GET    | /v1/migrations/{name}/written?id= | a fenced rollback source: regions written since handoff |
//! | GET    | /v1/migrations/{name}/regions[?cells=N] | destination: the region map in N cells (default 1024, at most 4096) |
//! | GET    | /v1/cluster/nodes    | cluster mode: every member, up or down (`node list`) |
//! | DELETE | /v1/cluster/nodes/{name} | cluster mode: forget a member that is down and owns nothing |
//! | GET    | /v1/cluster/volumes  | cluster mode: every volume of the directory, with its node |
//! | GET    | /v1/events[?token=] | server-sent events for the dashboard (at most 16 streams; 503 beyond) |
//! | GET    | /ui                 | the dashboard page (no token needed: it holds no data) |
//!
//! `regions` answers a [`RegionView`]: per cell, `code & 3` is 0 absent, 1
//! partly present, 2 present; `code & 4`: fetched on demand there; `code &
//! 8`: written by a client there since the handoff (see
//! [`crate::migrate::clone::cell`]). The dashboard, its event stream and
//! why `?token=` is accepted there: [`super::dashboard`].
//!
//! `GET /metrics`: the Prometheus text exposition ([`super::metrics`]).
//!
//! Errors are `{"error": "..."}` with a status from [`status_of`] (and
//! [`cluster_status`] for the cluster's errors), the one place errors
//! become HTTP statuses.
//!
//! Cluster mode (`serve --cluster-etcd`) changes four routes: `POST
//! /v1/volumes` writes the volume's directory record before the copy, and
//! with `on` naming another node forwards the request there; `GET
//! /v1/volumes/{name}` adds the record's node and generation, and asks the
//! owner for a volume held elsewhere; `DELETE` removes the record with the
//! copy (or forwards to the owner). `GET /v1/volumes` stays this node's
//! copies. In peer mode the `/v1/cluster/` routes answer 404 "not in a
//! cluster".
//!
//! Who may call it: the API listens on loopback unless the node has TLS
//! ([`TlsListener`]: every caller presents a certificate signed by the
//! node's CA, as other nodes do). With `--api-token-file`, every request
//! also carries `Authorization: Bearer TOKEN` ([`require_token`]); nodes
//! send the same token to each other. The one exception is `GET
//! /v1/events`, which may carry it as `?token=` instead (a browser's
//! EventSource cannot set headers); the dashboard's page and files are the
//! same constant bytes for everyone and need none. `/metrics` is no
//! exception: a Prometheus server scraping a node with a token sends it
//! (`authorization: {credentials_file: ...}` in its scrape config) and,
//! with TLS, a client certificate (`tls_config`). Bodies are JSON, at most
//! [`MAX_BODY`] bytes, and every field is validated before anything acts.

use std::sync::Arc;

use axum::extract::{rejection::JsonRejection, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::migration::{self, MigrationError};
use super::store::{RemoveMode, StoreError, Volume};
use super::{dashboard, NodeState};
use crate::api::types::{
    CancelRequest, CreateVolume, DropRequest, FenceRequest, HandoffRequest, MigrateRequest,
    MigrationState, MigrationStatus, NodeInfo, PrepareRequest, RateRequest, ReleaseRequest,
    RemoveQuery, RollbackRequest, StateQuery, StatusQuery, SteerQuery, VolumeInfo, WrittenSet,
};
use crate::migrate::clone::{RegionView, MAX_VIEW_CELLS};

/// Largest request body the API accepts.
const MAX_BODY: usize = 64 << 10;

pub fn router(state: Arc<NodeState>) -> Router {
    let auth = axum::middleware::from_fn_with_state(state.clone(), require_token);
    Router::new()
        .route("/v1/node", get(node_info))
        .route("/v1/volumes", get(list_volumes).post(create_volume))
        .route("/v1/volumes/{name}", get(show_volume).delete(remove_volume))
        .route("/v1/volumes/{name}/migrate", post(migrate))
        .route("/v1/volumes/{name}/fence", post(fence))
        .route("/v1/volumes/{name}/release", post(release))
        .route("/v1/migrations", get(list_migrations).post(prepare))
        .route("/v1/migrations/{name}", get(migration_status))
        .route("/v1/migrations/{name}/handoff", post(handoff))
        .route("/v1/migrations/{name}/state", get(migration_state))
        .route("/v1/migrations/{name}/cancel", post(cancel))
        .route("/v1/migrations/{name}/drop", post(drop_clone))
        .route("/v1/migrations/{name}/rollback", post(rollback))
        .route("/v1/migrations/{name}/written", get(written_set))
        .route("/v1/migrations/{name}/pause", post(pause))
        .route("/v1/migrations/{name}/resume", post(resume))
        .route("/v1/migrations/{name}/rate", post(set_rate))
        .route("/v1/migrations/{name}/regions", get(region_view))
        .route("/v1/cluster/nodes", get(cluster_nodes))
        .route(
            "/v1/cluster/nodes/{name}",
            axum::routing::delete(forget_node),
        )
        .route("/v1/cluster/volumes", get(cluster_volumes))
        .route("/v1/events", get(events))
        .route("/metrics", get(metrics))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .route_layer(auth)
        // After the token layer: the page holds no data (see `dashboard`).
        .route("/ui", get(dashboard::index))
        .route("/ui/dashboard.css", get(dashboard::css))
        .route("/ui/dashboard.js", get(dashboard::js))
        .with_state(state)
}

/// The token a request carries: its `Authorization: Bearer` header, or,
/// for `GET /v1/events` only (a browser's EventSource cannot set headers),
/// a `token` query parameter.
fn given_token(req: &axum::extract::Request) -> Option<String> {
    let header = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if let Some(t) = header {
        return Some(t.to_owned());
    }
    if req.method() != axum::http::Method::GET || req.uri().path() != "/v1/events" {
        return None;
    }
    axum::extract::Query::<EventsQuery>::try_from_uri(req.uri())
        .ok()
        .and_then(|axum::extract::Query(q)| q.token)
}

/// Refuses requests without the node's API token (when it has one).
pub async fn require_token(
    State(st): State<Arc<NodeState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(token) = &st.api_token {
        let given = given_token(&req).unwrap_or_default();
        // Constant time, so the token cannot be guessed byte by byte.
        use subtle::ConstantTimeEq;
        if !bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
            return ApiError(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API token (Authorization: Bearer ...)".into(),
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Most API connections served at once; more are closed at accept, so a
/// flood of API connections cannot take the file descriptors NBD needs.
pub const MAX_API_CONNECTIONS: usize = 256;
/// A client must send a request's headers within this time, and an idle
/// keep-alive connection is closed after it (slowloris).
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves the API on `listener` until `shutdown`, then lets requests in
/// progress finish. Unlike `axum::serve`, it bounds what a misbehaving
/// client can hold: [`MAX_API_CONNECTIONS`] and [`HEADER_READ_TIMEOUT`].
pub async fn serve<L: axum::serve::Listener>(
    mut listener: L,
    router: Router,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    use crate::nbd::server::stopped;
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_API_CONNECTIONS));
    let mut conns = tokio::task::JoinSet::new();
    let mut refusals = super::WarnThrottle::default();
    loop {
        let (io, _) = tokio::select! {
            c = listener.accept() => c,
            _ = stopped(&mut shutdown) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            if refusals.ready() {
                tracing::warn!("{MAX_API_CONNECTIONS} API connections open: refusing more");
            }
            continue;
        };
        let svc = hyper_util::service::TowerToHyperService::new(router.clone());
        let mut stop = shutdown.clone();
        conns.spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(io), svc);
            tokio::pin!(conn);
            let r = tokio::select! {
                r = conn.as_mut() => r,
                _ = stopped(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = r {
                tracing::debug!("API connection ended: {e}");
            }
        });
    }
    while conns.join_next().await.is_some() {}
}

/// The API's listener when the node has TLS: accepts TCP, runs the TLS
/// handshake (client certificate required) off the accept path, and hands
/// axum only connections that completed it. A client that stalls its
/// handshake is dropped after [`TLS_HANDSHAKE_TIMEOUT`] without holding up
/// anyone else; at most [`MAX_API_CONNECTIONS`] handshakes run at once.
pub struct TlsListener {
    local: std::net::SocketAddr,
    rx: tokio::sync::mpsc::Receiver<(
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        std::net::SocketAddr,
    )>,
    _accept: tokio::task::JoinHandle<()>,
}

/// How long an API client has to finish its TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl TlsListener {
    /// `acceptor` is read at each accept, so a reloaded TLS directory
    /// applies to the next connection (a `None` refuses connections).
    pub fn new(
        l: tokio::net::TcpListener,
        acceptor: tokio::sync::watch::Receiver<Option<tokio_rustls::TlsAcceptor>>,
    ) -> Self {
        let local = l.local_addr().expect("bound listener has an address");
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        // Handshakes in progress count against their own cap, so a flood
        // of clients that connect and stall cannot take every descriptor
        // for TLS_HANDSHAKE_TIMEOUT before `serve`'s cap applies.
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_API_CONNECTIONS));
        let accept = tokio::spawn(async move {
            let mut refusals = super::WarnThrottle::default();
            loop {
                let (sock, peer) = match l.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("API accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                    if refusals.ready() {
                        tracing::warn!(
                            "{MAX_API_CONNECTIONS} API TLS handshakes in progress: refusing more"
                        );
                    }
                    continue;
                };
                let Some(acceptor) = acceptor.borrow().clone() else {
                    continue;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await {
                        Ok(Ok(s)) => {
                            let _ = tx.send((s, peer)).await;
                        }
                        Ok(Err(e)) => tracing::info!(%peer, "API TLS handshake failed: {e}"),
                        Err(_) => tracing::info!(%peer, "API TLS handshake timed out"),
                    }
                });
            }
        });
        Self {
            local,
            rx,
            _accept: accept,
        }
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self._accept.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept task never ends while we hold its handle.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// An API error: status and message.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

/// The one mapping of errors to HTTP statuses.
pub fn status_of(e: &MigrationError) -> StatusCode {
    use crate::target::BlockError;
    match e {
        MigrationError::Store(e) => store_status(e),
        MigrationError::NotMigrating(_) => StatusCode::NOT_FOUND,
        MigrationError::Conflict(_) => StatusCode::CONFLICT,
        MigrationError::Invalid(_) => StatusCode::BAD_REQUEST,
        MigrationError::Peer(_) => StatusCode::BAD_GATEWAY,
        MigrationError::Block(BlockError::Unavailable(_)) => StatusCode::SERVICE_UNAVAILABLE,
        MigrationError::Block(BlockError::NoSpace) => StatusCode::INSUFFICIENT_STORAGE,
        MigrationError::Block(_) => StatusCode::INTERNAL_SERVER_ERROR,
        MigrationError::Cluster(e) => cluster_status(e),
    }
}

fn store_status(e: &StoreError) -> StatusCode {
    match e {
        StoreError::InvalidName(_) | StoreError::InvalidSize(_) => StatusCode::BAD_REQUEST,
        StoreError::AlreadyExists(_) | StoreError::Busy(..) | StoreError::Migrating(_) => {
            StatusCode::CONFLICT
        }
        StoreError::NotFound(_) => StatusCode::NOT_FOUND,
        StoreError::Block(crate::target::BlockError::NoSpace) => StatusCode::INSUFFICIENT_STORAGE,
        StoreError::Corrupt { .. }
        | StoreError::DirLocked { .. }
        | StoreError::Block(_)
        | StoreError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The one mapping of the cluster's errors to HTTP statuses.
pub fn cluster_status(e: &crate::cluster::ClusterError) -> StatusCode {
    use crate::cluster::ClusterError as E;
    match e {
        E::NotInCluster(_) | E::NoSuchVolume(_) | E::NoSuchNode(_) => StatusCode::NOT_FOUND,
        E::Unavailable(_) | E::NodeDown(_) | E::LeaseLost => StatusCode::SERVICE_UNAVAILABLE,
        E::NameTaken { .. }
        | E::MemberOfAnotherDir { .. }
        | E::OtherCluster { .. }
        | E::NoCluster { .. }
        | E::VolumeExists { .. }
        | E::Conflict(_) => StatusCode::CONFLICT,
        E::WrongNode(_) => StatusCode::MISDIRECTED_REQUEST,
        E::Corrupt { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        E::Forwarded { status, .. } => status
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::BAD_GATEWAY),
    }
}

impl From<crate::cluster::ClusterError> for ApiError {
    fn from(e: crate::cluster::ClusterError) -> Self {
        ApiError(cluster_status(&e), e.to_string())
    }
}

impl From<MigrationError> for ApiError {
    fn from(e: MigrationError) -> Self {
        ApiError(status_of(&e), e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        MigrationError::Store(e).into()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        // 400 for malformed JSON, 413 for too large, 415 without a JSON
        // content type, 422 for well-formed JSON of the wrong shape.
        ApiError(e.status(), format!("bad request body: {}", e.body_text()))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

pub(super) fn info(state: &NodeState, v: &Arc<Volume>) -> VolumeInfo {
    let t = v.table();
    VolumeInfo {
        name: v.name.clone(),
        size: v.size,
        table: t.target,
        allocated_bytes: v.target().allocated_bytes(),
        connections: v.connections(),
        uri: state
            .nbd_addr
            .map(|a| format!("{}://{a}/{}", state.nbd_scheme(), v.name)),
        vhost_user_socket: state
            .vhost
            .as_ref()
            .map(|x| x.path(&v.name).display().to_string()),
        fenced_to: t.fenced_to,
        fenced_for: t.fenced_for,
        outgoing: t.outgoing,
        release_pending: t.release_pending,
        node: None,
        generation: None,
    }
}

async fn node_info(State(s): State<Arc<NodeState>>) -> Json<NodeInfo> {
    Json(NodeInfo {
        name: s.name.clone(),
        id: s.id.clone(),
        api: s.advertised_api.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        nbd: s.nbd_addr.map(|a| a.to_string()),
        nbd_unix: s.nbd_unix.as_ref().map(|p| p.display().to_string()),
        dashboard_subscribers: s.dashboard.subscribers(),
        vhost_user_dir: s.vhost.as_ref().map(|x| x.dir().display().to_string()),
        #[cfg(feature = "cluster")]
        cluster: s.cluster.as_ref().map(|c| c.info()),
        #[cfg(not(feature = "cluster"))]
        cluster: None,
    })
}

async fn list_volumes(State(s): State<Arc<NodeState>>) -> Json<Vec<VolumeInfo>> {
    Json(s.store.list().iter().map(|v| info(&s, v)).collect())
}

async fn create_volume(
    State(s): State<Arc<NodeState>>,
    body: Result<Json<CreateVolume>, JsonRejection>,
) -> Result<(StatusCode, Json<VolumeInfo>), ApiError> {
    let Json(req) = body?;
    #[cfg(feature = "cluster")]
    if let Some(c) = &s.cluster {
        return cluster::create(&s, c, req).await;
    }
    if let Some(on) = &req.on {
        return Err(not_in_cluster(&s, &format!("volume create --on {on}")).into());
    }
    let store = s.store.clone();
    let v = tokio::task::spawn_blocking(move || store.create(&req.name, req.size))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok((StatusCode::CREATED, Json(info(&s, &v))))
}

async fn show_volume(
    State(s): State<Arc<NodeState>>,
    VolumeName(name): VolumeName,
) -> Result<Json<VolumeInfo>, ApiError> {
    #[cfg(feature = "cluster")]
    if let Some(c) = &s.cluster {
        return cluster::show(&s, c, &name).await.map(Json);
    }
    Ok(Json(info(&s, &s.store.get(&name)?)))
}

async fn remove_volume(
    State(s): State<Arc<NodeState>>,
    VolumeName(name): VolumeName,
    q: QueryResult<RemoveQuery>,
) -> Result<StatusCode, ApiError> {
    let q = query(q)?;
    #[cfg(feature = "cluster")]
    if let Some(c) = &s.cluster {
        return cluster::remove(&s, c, &name, q.force).await;
    }
    remove_local(&s, &name, q.force).await
}

/// `volume rm` of this node's copy (all of it in peer mode).
async fn remove_local(s: &Arc<NodeState>, name: &str, force: bool) -> Result<StatusCode, ApiError> {
    let vol = s.store.get(name)?;
    let live = migration::live_statuses(&vol);
    let store = s.store.clone();
    let mode = RemoveMode::Operator { force };
    tokio::task::spawn_blocking(move || store.remove_volume(&vol, mode))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    migration::record_removed(s, live);
    Ok(StatusCode::NO_CONTENT)
}

/// What a node outside a cluster answers to a cluster request.
fn not_in_cluster(s: &NodeState, what: &str) -> crate::cluster::ClusterError {
    let why = if cfg!(feature = "cluster") {
        "it was started without --cluster-etcd"
    } else {
        "this build has no cluster support (--features cluster)"
    };
    crate::cluster::ClusterError::NotInCluster(format!(
        "{what}: node {} is not in a cluster ({why})",
        s.name
    ))
}

async fn cluster_nodes(
    State(s): State<Arc<NodeState>>,
) -> Result<Json<Vec<crate::api::types::ClusterNode>>, ApiError> {
    #[cfg(feature = "cluster")]
    if let Some(c) = &s.cluster {
        return Ok(Json(c.node_list().await?));
    }
    Err(not_in_cluster(&s, "node list").into())
}

/// `DELETE /v1/cluster/nodes/{name}` (`node forget`): a member that is
/// down and owns nothing.
async fn forget_node(
    State(s): State<Arc<NodeState>>,
    VolumeName(name): VolumeName,
) -> Result<StatusCode, ApiError> {
    #[cfg(feature = "cluster")]
    if let Some(c) = &s.cluster {
        c.forget_member(&name).await?;
        return Ok(StatusCode::NO_CONTENT);
    }
    let _ = name;
    Err(not_in_cluster(&s, "node forget").into())
}

async fn cluster_volumes(
    State(s): State<Arc<NodeState>>,
) -> Result<Json<Vec<crate::api::types::ClusterVolume>>, ApiError> {
    #[cfg(feature = "cluster")]
    if let Some(c) = &s.cluster {
        return Ok(Json(c.volumes().await?));
    }
    Err(not_in_cluster(&s, "the cluster's volume list").into())
}

/// The volume routes in cluster mode: the directory record beside the
/// copy, and forwarding to the node a request is about.
#[cfg(feature = "cluster")]
mod cluster {
    use super::*;
    use crate::api::peer::{Peer, PeerError};
    use crate::api_client::encode_segment;
    use crate::cluster::{Cluster, ClusterError};

    /// A request forwarded to `node` failed there or on the way.
    fn forwarded(node: &str, e: PeerError) -> ApiError {
        ClusterError::Forwarded {
            node: node.to_owned(),
            status: e.status(),
            message: match e {
                PeerError::Status { message, .. } => message,
                other => other.to_string(),
            },
        }
        .into()
    }

    /// The directory gives `name` to this node, which has no copy of it
    /// (a create that crashed between its record and its copy, a copy
    /// removed by hand).
    fn missing_here(c: &Cluster, name: &str) -> ApiError {
        ApiError(
            StatusCode::NOT_FOUND,
            format!(
                "volume {name:?}: the cluster's directory says it is on this node ({}), which \
                 has no copy of it",
                c.name
            ),
        )
    }

    /// The API of live node `name`, or why there is none.
    async fn peer_of(s: &NodeState, c: &Cluster, name: &str) -> Result<Peer, ApiError> {
        match c.live_node(name).await? {
            // Two nodes advertising one address would forward to each
            // other without end.
            Some(n) if n.api == s.advertised_api => Err(ClusterError::WrongNode(format!(
                "node {name:?} advertises this node's API address {}: check --advertise-api",
                n.api
            ))
            .into()),
            Some(n) => Ok(Peer::new(&n.api, &s.peer_auth, s.source_timeout)),
            None if c.is_member(name).await? => Err(ClusterError::NodeDown(name.into()).into()),
            None => Err(ClusterError::NoSuchNode(name.into()).into()),
        }
    }

    /// `POST /v1/volumes`: on another node (`on`), forwarded there; here,
    /// the record first (create-only, under this node's lease), then the
    /// copy. A copy that cannot be made takes its record back with it.
    pub(super) async fn create(
        s: &Arc<NodeState>,
        c: &Arc<Cluster>,
        req: CreateVolume,
    ) -> Result<(StatusCode, Json<VolumeInfo>), ApiError> {
        if let Some(on) = req.on.as_deref().filter(|on| *on != c.name) {
            let on = on.to_owned();
            let peer = peer_of(s, c, &on).await?;
            let v: VolumeInfo = peer
                .post("/v1/volumes", &req)
                .await
                .map_err(|e| forwarded(&on, e))?;
            return Ok((StatusCode::CREATED, Json(v)));
        }
        crate::node::store::validate_name(&req.name)?;
        crate::node::store::validate_size(req.size)?;
        let _ops = c.directory_ops.lock().await;
        if s.store.get(&req.name).is_ok() {
            return Err(StoreError::AlreadyExists(req.name).into());
        }
        let rec = c.create_record(&req.name, req.size).await?;
        let store = s.store.clone();
        let (name, size, gen, lease) = (req.name.clone(), req.size, rec.generation, c.clock());
        let made =
            tokio::task::spawn_blocking(move || store.create_in_cluster(&name, size, gen, lease))
                .await
                .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        match made {
            Ok(v) => {
                let mut i = info(s, &v);
                i.node = Some(rec.owner);
                i.generation = Some(rec.generation);
                Ok((StatusCode::CREATED, Json(i)))
            }
            Err(e) => {
                // Only our own record (its id), read back at its revision.
                match c.record(&req.name).await {
                    Ok(Some((r, rev))) if r.id == rec.id => {
                        if let Err(d) = c.delete_record(&r, rev).await {
                            tracing::warn!(volume = %req.name, "record left without a copy: {d}");
                        }
                    }
                    Ok(_) => {}
                    Err(d) => tracing::warn!(volume = %req.name, "record left without a copy: {d}"),
                }
                Err(e.into())
            }
        }
    }

    /// `GET /v1/volumes/{name}`: this node's copy with the record's node
    /// and generation; a volume owned elsewhere, from its owner.
    pub(super) async fn show(
        s: &Arc<NodeState>,
        c: &Arc<Cluster>,
        name: &str,
    ) -> Result<VolumeInfo, ApiError> {
        let rec = c.record(name).await;
        match s.store.get(name) {
            Ok(v) => {
                let mut i = info(s, &v);
                match rec {
                    Ok(Some((r, _))) => {
                        i.node = Some(r.owner);
                        i.generation = Some(r.generation);
                    }
                    Ok(None) => {} // made in peer mode: not in the directory
                    Err(e) => tracing::warn!(volume = name, "showing without the record: {e}"),
                }
                Ok(i)
            }
            Err(StoreError::NotFound(_)) => match rec? {
                Some((r, _)) if r.owner != c.name => {
                    let peer = peer_of(s, c, &r.owner).await?;
                    let path = format!("/v1/volumes/{name}");
                    peer.get(&path).await.map_err(|e| forwarded(&r.owner, e))
                }
                Some(_) => Err(missing_here(c, name)),
                None => Err(ClusterError::NoSuchVolume(name.into()).into()),
            },
            Err(e) => Err(e.into()),
        }
    }

    /// `POST /v1/volumes/{name}/migrate` in cluster mode: a cluster
    /// volume here migrates to the node named by `to` (its address from
    /// the directory); one owned elsewhere is asked of its owner; a
    /// peer-mode volume here migrates by address, as in peer mode.
    pub(super) async fn migrate(
        s: &Arc<NodeState>,
        c: &Arc<Cluster>,
        name: &str,
        mut req: MigrateRequest,
    ) -> Result<MigrationStatus, ApiError> {
        let here = s.store.get(name);
        // A cluster copy here that the directory gives to another node (a
        // stale copy) is not the volume: ask its owner, as from a node
        // without a copy.
        let owner_elsewhere = match &here {
            Ok(v) if v.table().generation > 0 => c
                .record(name)
                .await?
                .map(|(r, _)| r.owner)
                .filter(|o| *o != c.name),
            _ => None,
        };
        if let Some(owner) = owner_elsewhere {
            let peer = peer_of(s, c, &owner).await?;
            let path = format!("/v1/volumes/{}/migrate", encode_segment(name));
            return peer
                .post(&path, &req)
                .await
                .map_err(|e| forwarded(&owner, e));
        }
        match here {
            Ok(v) if v.table().generation == 0 => Ok(migration::migrate(s, name, req, None).await?),
            Ok(_) => {
                let to = req.to.clone();
                if to == c.name {
                    return Err(ApiError(
                        StatusCode::CONFLICT,
                        format!("volume {name:?} is on node {to} already; name another node"),
                    ));
                }
                req.to = match c.live_node(&to).await? {
                    Some(n) => n.api,
                    None if c.is_member(&to).await? => {
                        return Err(ClusterError::NodeDown(to).into())
                    }
                    None => {
                        return Err(ApiError(
                            StatusCode::NOT_FOUND,
                            format!(
                                "no node named {to:?} in the cluster: in cluster mode `--to` \
                                 takes a node name (`dlsm node list`)"
                            ),
                        ))
                    }
                };
                Ok(migration::migrate(s, name, req, Some(to)).await?)
            }
            Err(StoreError::NotFound(_)) => match c.record(name).await? {
                Some((r, _)) if r.owner != c.name => {
                    let peer = peer_of(s, c, &r.owner).await?;
                    let path = format!("/v1/volumes/{}/migrate", encode_segment(name));
                    peer.post(&path, &req)
                        .await
                        .map_err(|e| forwarded(&r.owner, e))
                }
                Some(_) => Err(missing_here(c, name)),
                None => Err(ClusterError::NoSuchVolume(name.into()).into()),
            },
            Err(e) => Err(e.into()),
        }
    }

    /// `POST /v1/migrations/{name}/handoff` on a node without the volume:
    /// asked of the destination the directory records.
    pub(super) async fn handoff_elsewhere(
        s: &Arc<NodeState>,
        c: &Arc<Cluster>,
        name: &str,
        req: &HandoffRequest,
    ) -> Result<MigrationStatus, ApiError> {
        let Some((r, _)) = c.record(name).await? else {
            return Err(ClusterError::NoSuchVolume(name.into()).into());
        };
        let Some(m) = r.migration.filter(|m| m.to != c.name) else {
            return Err(MigrationError::NotMigrating(name.to_owned()).into());
        };
        let peer = peer_of(s, c, &m.to).await?;
        let path = format!("/v1/migrations/{}/handoff", encode_segment(name));
        peer.post(&path, req).await.map_err(|e| forwarded(&m.to, e))
    }

    /// `DELETE /v1/volumes/{name}`: at the owner, the checks, then the
    /// record, then the copy; a volume owned elsewhere is removed by its
    /// owner; a copy the directory does not give this node, only the copy.
    ///
    /// The record goes before the copy, by compare-and-swap on the record
    /// read here: a claim that moved the volume meanwhile (a handoff or a
    /// takeover by a migration's destination, which may still need this
    /// copy's regions) makes the delete fail and the copy stays. The other
    /// order could delete the copy and then fail on the record, leaving a
    /// volume in the directory whose data is gone. Writes are held from
    /// just before the delete: no write is acknowledged for a volume whose
    /// record may be gone, and a copy left behind (a crash, a failed
    /// delete of the files) is an orphan, held at startup.
    pub(super) async fn remove(
        s: &Arc<NodeState>,
        c: &Arc<Cluster>,
        name: &str,
        force: bool,
    ) -> Result<StatusCode, ApiError> {
        let ops = c.directory_ops.lock().await;
        // Not confirmed in the cluster (etcd unreachable, or one that does
        // not hold this node's cluster): what the directory says cannot be
        // trusted to decide what a copy here is.
        if !c.lease_valid_now() {
            return Err(ClusterError::LeaseLost.into());
        }
        let rec = c.record(name).await?;
        crate::crash::pause("rm-after-read").await;
        let here = s.store.get(name).is_ok();
        match rec {
            Some((r, _)) if !here && r.owner != c.name => {
                drop(ops); // not held while another node works
                let peer = peer_of(s, c, &r.owner).await?;
                let path = format!("/v1/volumes/{name}?force={force}");
                peer.delete(&path)
                    .await
                    .map_err(|e| forwarded(&r.owner, e))?;
                Ok(StatusCode::NO_CONTENT)
            }
            Some((r, rev)) if r.owner == c.name => {
                let moved = || {
                    ApiError(
                        StatusCode::CONFLICT,
                        format!(
                            "volume {name:?}'s record changed while it was being removed (moved \
                             by a migration?): nothing was removed; look again (`volume show \
                             {name}`)"
                        ),
                    )
                };
                let Ok(vol) = s.store.get(name) else {
                    return match c.delete_record(&r, rev).await {
                        Ok(()) => Ok(StatusCode::NO_CONTENT),
                        Err(ClusterError::Conflict(_)) => Err(moved()),
                        Err(e) => Err(e.into()),
                    };
                };
                // Refused (clients attached, a migration needs this copy):
                // nothing changed.
                s.store
                    .check_removable(&vol, RemoveMode::Operator { force })?;
                // Not held, or held by an earlier `volume rm` that did not
                // finish: this one may hold and lift it.
                let unconfirmed = format!(
                    "writes refused: volume {name} is being removed and the cluster's \
                     directory did not confirm the removal of its record (run `volume rm \
                     {name}` again)"
                );
                // If another hold is in place (not re-confirmed yet, say),
                // it stays, and it refuses writes as well as this one would.
                vol.fence.swap_cluster_hold(
                    |h| h.is_none_or(|h| h == REMOVING || h == unconfirmed),
                    Some(REMOVING.into()),
                    false,
                );
                let is_ours = |h: Option<&str>| h == Some(REMOVING);
                match c.delete_record(&r, rev).await {
                    Ok(()) => {}
                    // Not applied: the record changed (a claim, a migration
                    // recorded meanwhile). The copy stays, writable again.
                    Err(ClusterError::Conflict(_)) => {
                        // Unless something else held it meanwhile.
                        vol.fence.swap_cluster_hold(is_ours, None, false);
                        return Err(moved());
                    }
                    // Perhaps applied: the copy stays held, reads too (the
                    // name may be made again elsewhere), until a retry
                    // finds out.
                    Err(e) => {
                        vol.fence
                            .swap_cluster_hold(is_ours, Some(unconfirmed), true);
                        return Err(e.into());
                    }
                }
                // The record is gone: the copy goes whoever attached since.
                if let Err(e) = remove_local(s, name, true).await {
                    if s.store.get(name).is_err() {
                        // Out of the store; only its files' deletion failed
                        // (what is left is cleaned at the next start).
                        return Err(e);
                    }
                    vol.fence.hold_stale(format!(
                        "writes refused: volume {name}'s record was removed from the cluster but \
                         removing this copy failed ({}); it is an orphan (`volume rm {name}` \
                         again deletes it)",
                        e.1
                    ));
                    return Err(e);
                }
                Ok(StatusCode::NO_CONTENT)
            }
            // This node's copy is the source of a migration whose
            // destination now owns the volume: the owner may still need
            // its regions, so not even --force deletes it here (the old
            // order, before the directory existed, could not tell).
            Some((r, _))
                if here
                    && r.owner != c.name
                    && r.migration
                        .as_ref()
                        .is_some_and(|m| m.from == c.name && source_of(s, name, &m.id)) =>
            {
                Err(ApiError(
                    StatusCode::CONFLICT,
                    format!(
                        "volume {name:?} was handed off to node {} (generation {}), which still \
                         copies from this node's copy; the copy is released when that migration \
                         completes. To delete the volume, run `volume rm {name}` on {}",
                        r.owner, r.generation, r.owner
                    ),
                ))
            }
            // This node is the destination of the migration the directory
            // records, not handed off yet: its clone may claim the volume
            // at any moment (a handoff, a takeover), and removing the copy
            // could then delete the new owner's copy. A cancel clears the
            // directory first, so the clone can never claim, then drops it.
            Some((r, _))
                if here
                    && r.owner != c.name
                    && r.migration
                        .as_ref()
                        .is_some_and(|m| m.to == c.name && unclaimed_clone_of(s, name, &m.id)) =>
            {
                Err(ApiError(
                    StatusCode::CONFLICT,
                    format!(
                        "volume {name:?} is migrating here from node {} (not handed off yet), \
                         and this copy may take the volume over at any moment: cancel the \
                         migration instead (`dlsm migration cancel {name}`, here or on {}), \
                         which makes sure it never does and then drops this copy",
                        r.owner, r.owner
                    ),
                ))
            }
            // A copy the directory does not give this node (made in peer
            // mode, or stale): only the copy.
            _ => remove_local(s, name, force).await,
        }
    }
}

/// Whether this node's copy of `name` is the source of migration `id`.
#[cfg(feature = "cluster")]
fn source_of(s: &NodeState, name: &str, id: &str) -> bool {
    s.store
        .get(name)
        .is_ok_and(|v| v.table().outgoing.is_some_and(|o| o.id == id))
}

/// Whether this node's copy of `name` is migration `id`'s clone, not
/// handed off yet (the only copy that can claim the volume for it).
#[cfg(feature = "cluster")]
fn unclaimed_clone_of(s: &NodeState, name: &str, id: &str) -> bool {
    s.store.get(name).is_ok_and(|v| {
        v.clone_target()
            .is_some_and(|c| c.migration_id() == id && !c.is_handed_off())
    })
}

/// The cluster hold a volume is under while `volume rm` deletes its record.
#[cfg(feature = "cluster")]
const REMOVING: &str = "writes refused: volume is being removed";

/// A request body that may be left out (the defaults then apply); when it
/// is there it must be JSON of the right shape, and a bad one gets the same
/// JSON errors as every other body (400 malformed, 422 wrong shape).
fn optional_body<T: Default + serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) || body.trim_ascii() == b"null" {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        let status = if e.is_data() {
            StatusCode::UNPROCESSABLE_ENTITY
        } else {
            StatusCode::BAD_REQUEST
        };
        ApiError(status, format!("bad request body: {e}"))
    })
}

/// A volume name taken from the URL path and checked before any handler
/// sees it: a name outside the allowed set is a 400, never a lookup (so no
/// encoding trick can reach another volume or a path on disk).
pub struct VolumeName(pub String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for VolumeName {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        let Path(name) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
        super::store::validate_name(&name)?;
        Ok(VolumeName(name))
    }
}

async fn migrate(
    State(s): State<Arc<NodeState>>,
    VolumeName(name): VolumeName,
    body: Result<Json<MigrateRequest>, JsonRejection>,
) -> Result<Json<MigrationStatus>, ApiError> {
    let Json(req) = body?;
    if let Some(rs) = req.region_size {
        if rs < 4096 || !rs.is_power_of_two() || rs > 64 << 20 {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("region size {rs} must be a power of two between 4 KiB and 64 MiB"),
            ));
        }
    }
    #[cfg(feature = "cluster")]
    if let Some(c) = &s.cluster {
        return cluster::migrate(&s, c, &name, req).await.map(Json);
    }
    if crate::cli::args::is_node_name(&req.to) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "--to {:?} is a node name, which only a node in a cluster resolves: give the \
                 destination's API address, HOST:PORT",
                req.to
            ),
        ));
    }
    Ok(Json(migration::migrate(&s, &name, req, None).await?))
}

async fn fence(
    State(s): State<Arc<NodeState>>,
    VolumeName(name): VolumeName,
    body: Result<Json<FenceRequest>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(req) = body?;
    migration::fence(&s, &name, &req.to, &req.id, req.generation).await?;
    Ok(Json(serde_json::json!({ "fenced": name })))
}

async fn release(
    State(s): State<Arc<NodeState>>,
    VolumeName(name): VolumeName,
    body: Result<Json<ReleaseRequest>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(req) = body?;
    migration::release(&s, &name, &req).await?;
    Ok(Json(serde_json::json!({ "released": name })))
}

async fn migration_state(
    State(s): State<Arc<NodeState>>,
    VolumeName(name): VolumeName,
    q: QueryResult<StateQuery>,
) -> Result<Json<MigrationState>, ApiError> {
    let q = query(q)?;
    Ok(Json(migration::migration_state(&s, &name, &q.id)))
}

async fn cancel(
    State(s): State<Arc<NodeState>>,
    VolumeName(name): VolumeName,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let req = optional_body::<CancelRequest>(&body)?;
    Ok(Json(migration::cancel_anywhere(&s, &name, req).await?))
}

async fn rollback(
    State(s): State<Arc<NodeState>>,
    VolumeName(name): VolumeName,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let req = optional_body::<RollbackRequest>(&body)?;
    Ok(Json(migration::rollback(&s, &name, req).await?))
}

async fn written_set(
    State(s): State<Arc<NodeState>>,
    VolumeName(name): VolumeName,
    q: QueryResult<StateQuery>,
) -> Result<Json<WrittenSet>, ApiError> {
    let q = query(q)?;
    Ok(Json(migration::written_set(&s, &name, &q.id)?))
}

async fn drop_clone(
    State(s): State<Arc<NodeState>>,
    VolumeName(name): VolumeName,
    body: Result<Json<DropRequest>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(req) = body?;
    migration::drop_clone(&s, &name, &req.id, req.generation).await?;
    Ok(Json(serde_json::json!({ "dropped": name })))
}

async fn prepare(
    State(s): State<Arc<NodeState>>,
    body: Result<Json<PrepareRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<MigrationStatus>), ApiError> {
    let Json(req) = body?;
    Ok((
        StatusCode::CREATED,
        Json(migration::prepare(&s, req).await?),
    ))
}

async fn list_migrations(State(s): State<Arc<NodeState>>) -> Json<Vec<MigrationStatus>> {
    Json(migration::list(&s).await)
}

type QueryResult<T> = Result<axum::extract::Query<T>, axum::extract::rejection::QueryRejection>;

fn query<T>(q: QueryResult<T>) -> Result<T, ApiError> {
    q.map(|axum::extract::Query(q)| q)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))
}

async fn migration_status(
    State(s): State<Arc<NodeState>>,
    VolumeName(name): VolumeName,
    q: QueryResult<StatusQuery>,
) -> Result<Json<MigrationStatus>, ApiError> {
    let q = query(q)?;
    Ok(Json(
        migration::status_in_role(&s, &name, q.role.as_deref()).await?,
    ))
}

async fn handoff(
    State(s): State<Arc<NodeState>>,
    VolumeName(name): VolumeName,
    body: axum::body::Bytes,
) -> Result<Json<MigrationStatus>, ApiError> {
    let req = optional_body::<HandoffRequest>(&body)?;
    #[cfg(feature = "cluster")]
    if let (Some(c), Err(StoreError::NotFound(_))) = (&s.cluster, s.store.get(&name)) {
        return cluster::handoff_elsewhere(&s, c, &name, &req)
            .await
            .map(Json);
    }
    Ok(Json(migration::handoff(&s, &name, req).await?))
}

async fn pause(
    State(s): State<Arc<NodeState>>,
    VolumeName(name): VolumeName,
    q: QueryResult<SteerQuery>,
) -> Result<Json<MigrationStatus>, ApiError> {
    let q = query(q)?;
    let st = migration::steer(&s, &name, migration::Steer::Pause, q.id.as_deref()).await?;
    Ok(Json(st))
}

async fn resume(
    State(s): State<Arc<NodeState>>,
    VolumeName(name): VolumeName,
    q: QueryResult<SteerQuery>,
) -> Result<Json<MigrationStatus>, ApiError> {
    let q = query(q)?;
    let st = migration::steer(&s, &name, migration::Steer::Resume, q.id.as_deref()).await?;
    Ok(Json(st))
}

/// `GET /metrics`: reads the store and `/proc/self` off the async workers.
async fn metrics(State(s): State<Arc<NodeState>>) -> Result<Response, ApiError> {
    let text =
        tokio::task::spawn_blocking(move || s.metrics.render(super::metrics::Snapshot::of(&s)))
            .await
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            super::metrics::CONTENT_TYPE,
        )],
        text,
    )
        .into_response())
}

async fn set_rate(
    State(s): State<Arc<NodeState>>,
    VolumeName(name): VolumeName,
    q: QueryResult<SteerQuery>,
    body: Result<Json<RateRequest>, JsonRejection>,
) -> Result<Json<MigrationStatus>, ApiError> {
    let q = query(q)?;
    let Json(req) = body?;
    let what = migration::Steer::Rate(req.rate);
    Ok(Json(
        migration::steer(&s, &name, what, q.id.as_deref()).await?,
    ))
}

/// Query of `GET /v1/migrations/{name}/regions`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionsQuery {
    /// Cells wanted (default 1024; at most 4096, and at most one per
    /// region).
    #[serde(default)]
    pub cells: Option<usize>,
}

async fn region_view(
    State(s): State<Arc<NodeState>>,
    VolumeName(name): VolumeName,
    q: QueryResult<RegionsQuery>,
) -> Result<Json<RegionView>, ApiError> {
    let cells = query(q)?.cells.unwrap_or(dashboard::EVENT_CELLS);
    if cells == 0 || cells > MAX_VIEW_CELLS {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("cells={cells}: between 1 and {MAX_VIEW_CELLS}"),
        ));
    }
    let clone = s
        .store
        .get(&name)?
        .clone_target()
        .ok_or_else(|| MigrationError::NotMigrating(name.clone()))?;
    // Off the async workers: a huge volume's view reads its whole map.
    let view = tokio::task::spawn_blocking(move || clone.region_view(cells))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(view))
}

/// Query of `GET /v1/events`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// The API token, for a browser (checked by [`require_token`]).
    #[serde(default)]
    pub token: Option<String>,
}

async fn events(State(s): State<Arc<NodeState>>, q: QueryResult<EventsQuery>) -> Response {
    if let Err(e) = query(q) {
        return e.into_response();
    }
    match dashboard::subscribe(&s) {
        Ok(sub) => sub.into_response(),
        Err(dashboard::Busy) => dashboard::busy_response(),
    }
}
