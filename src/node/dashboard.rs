//! The dashboard: `GET /ui`, one page per node with its volumes and
//! migrations and a live region map per migration, drawn from `GET
//! /v1/events`, a stream of server-sent events.
//!
//! ```text
//!  browser ──GET /ui──────────► index.html, dashboard.css, dashboard.js (in the binary)
//!  browser ──GET /v1/events───► Subscription ◄── watch(latest frame) ◄── producer task
//!                                 (≤ MAX_SUBSCRIBERS)                    every EVENT_INTERVAL:
//!                                                                          volumes, region views,
//!                                                                          migrations (own task)
//! ```
//!
//! **What it owns.** The page's three files (`src/node/ui/`, embedded with
//! `include_str!`: no build step, nothing fetched from elsewhere), the
//! event stream and the one producer task behind it. An event is one JSON
//! object ([`DashboardEvent`]): the node's migrations (what `GET
//! /v1/migrations` returns), its volumes (`GET /v1/volumes`) and, for each
//! clone on this node, its [`RegionView`] in [`EVENT_CELLS`] cells.
//!
//! **Cost, and when there is none.** The producer runs only while a
//! stream is open: the first subscriber starts it, and it stops at the
//! first tick that finds none left (and at node shutdown). It builds each
//! frame once, serialised once, whatever the number of subscribers, and
//! hands it over through a `watch` channel: a subscriber holds only the
//! latest frame, never a queue, so a slow reader costs one frame of memory
//! (and what hyper buffers for its socket) and the others do not wait for
//! it. A client that stops reading but keeps its connection open keeps
//! its slot until TCP gives up on it: the cap bounds what that costs. With nobody watching the node does
//! nothing for the dashboard but the data path's lock-free flags (see
//! [`crate::migrate::clone::RegionView`]).
//!
//! **What it must never do.** Take a lock the data path waits on for more
//! than a moment: region views read the map a cell at a time (its lock,
//! never a region lock or the write turn), off the async workers. Block the
//! API: the migration list asks each outgoing migration's destination and
//! may take up to `--source-timeout` when one is unreachable, so it runs in
//! its own task; a frame waits for it at most [`LIST_WAIT`] and otherwise
//! goes out with the previous list (and its age), so the region maps keep
//! moving when a peer is slow. Outlive its reader or the node: a stream
//! ends when the client goes away (hyper drops it at the next write that
//! fails), at node shutdown (the API's shutdown watch; a graceful HTTP
//! shutdown would otherwise wait for a response that never ends), and after
//! [`STALL`] without a frame; EventSource reconnects by itself.
//!
//! **Authentication.** The page is the same constant bytes for everyone
//! and holds no node data, so `/ui` and its files need no token. The data
//! comes from `/v1/events`, which with `--api-token-file` needs the token
//! like every API call; a browser's EventSource cannot set an
//! `Authorization` header, so for `GET /v1/events` alone the token may come
//! as `?token=` ([`super::api::require_token`]). The page takes it from its
//! own URL (`/ui#token=...`, a fragment, which the browser never sends; or
//! `?token=`), keeps it in the tab's sessionStorage, removes it from the
//! address bar, and sends it on the stream's URL. The risk: a token in a
//! URL can end up in a proxy's or a browser's history; the node never logs
//! request URLs, the page sends no Referer (`Referrer-Policy: no-referrer`)
//! and loads nothing from elsewhere (`Content-Security-Policy`), and with
//! TLS the URL is encrypted like everything else. Only `GET /v1/events`
//! accepts it, and that call changes nothing.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::NodeState;
use crate::api::types::MigrationStatus;
use crate::api::types::VolumeInfo;
use crate::migrate::clone::RegionView;
use crate::nbd::server::stopped;

/// Most event streams open at once on a node; more get 503.
pub const MAX_SUBSCRIBERS: usize = 16;
/// How often a frame is built while someone watches.
pub const EVENT_INTERVAL: Duration = Duration::from_millis(500);
/// Cells of each region view in an event.
pub const EVENT_CELLS: usize = 1024;
/// How long a frame waits for a fresh migration list.
pub const LIST_WAIT: Duration = Duration::from_millis(300);
/// A stream that has had no frame for this long ends (the producer is
/// gone); the browser reconnects and starts a new one.
pub const STALL: Duration = Duration::from_secs(10);

/// One event of `GET /v1/events`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DashboardEvent {
    /// The node's name.
    pub node: String,
    /// The API address other nodes reach this node by.
    pub api: String,
    /// When the frame was built, ms since the Unix epoch.
    pub at_ms: u64,
    /// Event streams open on this node.
    pub subscribers: usize,
    /// Every migration, as `GET /v1/migrations` returns it.
    pub migrations: Vec<MigrationStatus>,
    /// How old `migrations` is, ms (`None`: no list yet): the list asks
    /// each outgoing migration's destination, which may be slow.
    pub migrations_age_ms: Option<u64>,
    /// Every volume, as `GET /v1/volumes` returns it.
    pub volumes: Vec<VolumeInfo>,
    /// A region view of every clone on this node.
    pub regions: Vec<RegionView>,
}

/// The node's dashboard hub (in [`NodeState`]).
pub struct Dashboard {
    slots: Arc<Semaphore>,
    /// The latest frame (`None` while no producer runs).
    frames: watch::Sender<Option<Arc<str>>>,
    /// The producer, if one runs; taken under this lock both to start one
    /// and to decide to stop, so a subscriber never finds a producer that
    /// is about to stop without it.
    producer: Mutex<Option<JoinHandle<()>>>,
    shutdown: watch::Receiver<bool>,
}

impl Dashboard {
    /// `shutdown`: the node's; streams and the producer end when it is set.
    pub fn new(shutdown: watch::Receiver<bool>) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(MAX_SUBSCRIBERS)),
            frames: watch::Sender::new(None),
            producer: Mutex::new(None),
            shutdown,
        }
    }

    /// Event streams open now.
    pub fn subscribers(&self) -> usize {
        MAX_SUBSCRIBERS - self.slots.available_permits()
    }

    /// Whether a producer task runs (tests: nothing runs unwatched).
    pub fn producing(&self) -> bool {
        self.producer
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|h| !h.is_finished())
    }
}

/// An open event stream: a slot of [`MAX_SUBSCRIBERS`] and a view of the
/// latest frame, both given back when it is dropped.
pub struct Subscription {
    frames: watch::Receiver<Option<Arc<str>>>,
    shutdown: watch::Receiver<bool>,
    started: bool,
    _slot: OwnedSemaphorePermit,
}

/// Every stream slot is taken.
#[derive(Debug)]
pub struct Busy;

/// Opens an event stream, starting the producer if none runs.
pub fn subscribe(state: &Arc<NodeState>) -> Result<Subscription, Busy> {
    let d = &state.dashboard;
    let slot = d.slots.clone().try_acquire_owned().map_err(|_| Busy)?;
    let mut producer = d.producer.lock().unwrap();
    let frames = d.frames.subscribe();
    if producer.as_ref().is_none_or(|h| h.is_finished()) {
        *producer = Some(tokio::spawn(produce(state.clone())));
    }
    Ok(Subscription {
        frames,
        shutdown: d.shutdown.clone(),
        started: false,
        _slot: slot,
    })
}

impl Subscription {
    /// The next frame: the current one first, if there is one, then each
    /// new one. `None`: the node shuts down, or no frame came for
    /// [`STALL`].
    pub async fn next(&mut self) -> Option<Arc<str>> {
        if !self.started {
            self.started = true;
            if let Some(f) = self.frames.borrow_and_update().clone() {
                return Some(f);
            }
        }
        let deadline = tokio::time::Instant::now() + STALL;
        loop {
            tokio::select! {
                _ = stopped(&mut self.shutdown) => return None,
                _ = tokio::time::sleep_until(deadline) => return None,
                r = self.frames.changed() => {
                    r.ok()?;
                    if let Some(f) = self.frames.borrow_and_update().clone() {
                        return Some(f);
                    }
                }
            }
        }
    }

    /// The `text/event-stream` response: one unnamed event per frame.
    pub fn into_response(self) -> Response {
        let stream = futures_util::stream::unfold(self, |mut sub| async move {
            let frame = sub.next().await?;
            let event = Event::default().data(&*frame);
            Some((Ok::<_, Infallible>(event), sub))
        });
        let mut r = Sse::new(stream).into_response();
        let h = r.headers_mut();
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        // Proxies that buffer would hold events back.
        h.insert("x-accel-buffering", HeaderValue::from_static("no"));
        r
    }
}

/// The answer to an event stream asked for while every slot is taken.
pub fn busy_response() -> Response {
    let msg = format!(
        "{MAX_SUBSCRIBERS} dashboard event streams are open on this node: close one and retry"
    );
    let mut r = (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(serde_json::json!({ "error": msg })),
    )
        .into_response();
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    r
}

/// The producer: a frame every [`EVENT_INTERVAL`] while anyone
/// subscribes; see the module doc.
async fn produce(state: Arc<NodeState>) {
    let d = &state.dashboard;
    let mut stop = d.shutdown.clone();
    let mut tick = tokio::time::interval(EVENT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut listing: Option<JoinHandle<Vec<MigrationStatus>>> = None;
    let mut migrations: Option<(Arc<Vec<MigrationStatus>>, Instant)> = None;
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            _ = tick.tick() => {}
        }
        {
            let mut p = d.producer.lock().unwrap();
            if d.frames.receiver_count() == 0 {
                // Nobody watches: stop, leaving no stale frame for the
                // next subscriber.
                d.frames.send_replace(None);
                *p = None;
                break;
            }
        }
        let h = listing.get_or_insert_with(|| {
            let st = state.clone();
            tokio::spawn(async move { super::migration::list(&st).await })
        });
        if let Ok(done) = tokio::time::timeout(LIST_WAIT, h).await {
            listing = None;
            if let Ok(l) = done {
                migrations = Some((Arc::new(l), Instant::now()));
            }
        }
        let st = state.clone();
        let list = migrations.clone();
        let frame = tokio::task::spawn_blocking(move || build_frame(&st, list)).await;
        match frame {
            Ok(f) => {
                d.frames.send_replace(Some(f));
            }
            Err(e) => tracing::warn!("dashboard frame failed: {e}"),
        }
    }
    if let Some(h) = listing {
        h.abort();
    }
}

/// One frame, serialised (on a blocking thread: region views read every
/// clone's map).
fn build_frame(
    state: &NodeState,
    migrations: Option<(Arc<Vec<MigrationStatus>>, Instant)>,
) -> Arc<str> {
    let vols = state.store.list();
    let ev = DashboardEvent {
        node: state.name.clone(),
        api: state.advertised_api.clone(),
        at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        subscribers: state.dashboard.subscribers(),
        migrations_age_ms: migrations
            .as_ref()
            .map(|(_, at)| at.elapsed().as_millis() as u64),
        migrations: migrations.map(|(l, _)| l.to_vec()).unwrap_or_default(),
        volumes: vols.iter().map(|v| super::api::info(state, v)).collect(),
        regions: vols
            .iter()
            .filter_map(|v| v.clone_target())
            .map(|c| c.region_view(EVENT_CELLS))
            .collect(),
    };
    serde_json::to_string(&ev)
        .expect("a dashboard event serialises")
        .into()
}

/// The page's files, served from the binary.
pub mod assets {
    pub const INDEX_HTML: &str = include_str!("ui/index.html");
    pub const CSS: &str = include_str!("ui/dashboard.css");
    pub const JS: &str = include_str!("ui/dashboard.js");
}

/// What every page file is served with: nothing may be loaded or sent
/// elsewhere, no Referer leaves the page, nothing is cached.
fn page_file(content_type: &'static str, body: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
             img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// `GET /ui`.
pub async fn index() -> Response {
    page_file("text/html; charset=utf-8", assets::INDEX_HTML)
}

/// `GET /ui/dashboard.css`.
pub async fn css() -> Response {
    page_file("text/css; charset=utf-8", assets::CSS)
}

/// `GET /ui/dashboard.js`.
pub async fn js() -> Response {
    page_file("text/javascript; charset=utf-8", assets::JS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::{Node, NodeConfig};

    async fn node(dir: &std::path::Path) -> Node {
        Node::start(NodeConfig {
            data_dir: dir.to_owned(),
            listen: Some("127.0.0.1:0".into()),
            listen_unix: None,
            api: "127.0.0.1:0".into(),
            name: "t".into(),
            source_timeout: Duration::from_secs(2),
            inject_origin_delay: Duration::ZERO,
            handshake_timeout: Duration::from_secs(10),
            max_connections: 64,
            tls: None,
            api_token: None,
            insecure_api: false,
            advertise_nbd: None,
            advertise_api: None,
            vhost_user: None,
            cluster: None,
        })
        .await
        .unwrap()
    }

    fn at_ms(frame: &str) -> u64 {
        serde_json::from_str::<DashboardEvent>(frame).unwrap().at_ms
    }

    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_producer_runs_only_while_someone_watches_and_streams_end_at_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let node = node(dir.path()).await;
        let st = node.state.clone();
        assert!(!st.dashboard.producing(), "nobody watches yet");
        let mut a = subscribe(&st).unwrap();
        let b = subscribe(&st).unwrap();
        assert!(st.dashboard.producing());
        assert_eq!(st.dashboard.subscribers(), 2);
        let first = a.next().await.expect("a frame");
        let second = a.next().await.expect("another frame");
        assert!(at_ms(&second) > at_ms(&first));
        // Everybody leaves: the producer stops within a tick or two.
        drop((a, b));
        assert_eq!(st.dashboard.subscribers(), 0);
        until("the producer stops", || !st.dashboard.producing()).await;
        // The next subscriber starts it again, and is not handed the
        // frame from before.
        let mut c = subscribe(&st).unwrap();
        assert!(st.dashboard.producing());
        let fresh = c.next().await.expect("a frame");
        assert!(at_ms(&fresh) > at_ms(&second));
        // The node's shutdown ends the stream and the producer.
        let reader = tokio::spawn(async move { while c.next().await.is_some() {} });
        tokio::time::timeout(
            Duration::from_secs(10),
            node.shutdown(Duration::from_secs(30)),
        )
        .await
        .expect("shutdown does not wait for the stream");
        tokio::time::timeout(Duration::from_secs(2), reader)
            .await
            .expect("the stream ended")
            .unwrap();
        until("the producer stops at shutdown", || {
            !st.dashboard.producing()
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streams_beyond_the_cap_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let node = node(dir.path()).await;
        let st = node.state.clone();
        let open: Vec<_> = (0..MAX_SUBSCRIBERS)
            .map(|_| subscribe(&st).unwrap())
            .collect();
        assert!(matches!(subscribe(&st), Err(Busy)));
        assert_eq!(busy_response().status(), StatusCode::SERVICE_UNAVAILABLE);
        drop(open);
        assert!(subscribe(&st).is_ok());
        node.shutdown(Duration::from_secs(5)).await;
    }
}
