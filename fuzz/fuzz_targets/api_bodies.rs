//! The control API against hostile request bodies, through the real axum
//! router and a real volume store: the first byte picks the route, the
//! rest is the body. Every answer must be a status with a JSON error or a
//! success, never a panic; nothing may be created from an invalid body.
#![no_main]
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request};
use dlsm::node::store::{CloneEnv, RemoveMode, VolumeStore};
use dlsm::node::{api, migration, NodeState};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

struct Env {
    rt: tokio::runtime::Runtime,
    state: Arc<NodeState>,
    _dir: tempfile::TempDir,
}

fn env() -> &'static Env {
    static ENV: std::sync::OnceLock<Env> = std::sync::OnceLock::new();
    ENV.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let env = CloneEnv {
            source_timeout: Duration::from_millis(100),
            origin_connections: 1,
            origin_read_delay: Duration::ZERO,
            origin_tls: None,
            hooks: migration::hooks_factory(
                "127.0.0.1:1".into(),
                Duration::from_millis(100),
                Default::default(),
                Default::default(),
            ),
        };
        let store = Arc::new(VolumeStore::open(dir.path(), env).unwrap());
        let state = Arc::new(NodeState {
            name: "fuzz".into(),
            id: "0123456789abcdef".into(),
            store,
            nbd_addr: None,
            nbd_unix: None,
            api_addr: "127.0.0.1:1".parse().unwrap(),
            advertised_nbd: None,
            advertised_api: "127.0.0.1:1".into(),
            source_timeout: Duration::from_millis(100),
            peer_auth: Default::default(),
            api_token: None,
            history: dlsm::node::history::History::in_memory(),
            // No shutdown signal (its sender is dropped): event streams,
            // which no route here opens, would end at once.
            dashboard: dlsm::node::dashboard::Dashboard::new(tokio::sync::watch::channel(false).1),
            metrics: Default::default(),
            vhost: None,
        });
        Env {
            rt,
            state,
            _dir: dir,
        }
    })
}

const ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/volumes"),
    ("POST", "/v1/migrations"),
    ("POST", "/v1/migrations/fz/rate"),
    ("POST", "/v1/migrations/fz/pause"),
    ("POST", "/v1/volumes/fz/release"),
    ("POST", "/v1/volumes/fz/fence"),
    ("POST", "/v1/migrations/fz/cancel"),
    ("POST", "/v1/migrations/fz/drop"),
    ("POST", "/v1/migrations/fz/handoff"),
    ("GET", "/v1/volumes/fz"),
];

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let (method, path) = ROUTES[sel as usize % ROUTES.len()];
    let env = env();
    let body = body.to_vec();
    env.rt.block_on(async {
        let req = Request::builder()
            .method(Method::from_bytes(method.as_bytes()).unwrap())
            .uri(path)
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap();
        let resp = api::router(env.state.clone()).oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        if !status.is_success() {
            let v: serde_json::Value = serde_json::from_slice(&bytes).expect("errors are JSON");
            assert!(v["error"].is_string(), "error without a message: {v}");
        }
        // Keep the store small: remove whatever a valid body created.
        for v in env.state.store.list() {
            let _ = env
                .state
                .store
                .remove(&v.name, RemoveMode::Operator { force: true });
        }
    });
});
