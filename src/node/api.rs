//! The control API: HTTP/JSON, what the CLI and other nodes talk to.
//!
//! | method | path                 | does                                 |
//! |--------|----------------------|--------------------------------------|
//! | GET    | /v1/node             | node name, addresses, version        |
//! | GET    | /v1/volumes          | every volume                         |
//! | POST   | /v1/volumes          | create `{name, size}`                |
//! | GET    | /v1/volumes/{name}   | one volume                           |
//! | DELETE | /v1/volumes/{name}   | delete (409 while clients attached)  |
//!
//! Errors are `{"error": "..."}` with a status from [`status_of`], the one
//! place store errors become HTTP statuses.

use std::sync::Arc;

use axum::extract::{rejection::JsonRejection, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::store::{StoreError, TargetSpec, Volume};
use super::NodeState;

/// Largest request body the API accepts.
const MAX_BODY: usize = 64 << 10;

pub fn router(state: Arc<NodeState>) -> Router {
    Router::new()
        .route("/v1/node", get(node_info))
        .route("/v1/volumes", get(list_volumes).post(create_volume))
        .route("/v1/volumes/{name}", get(show_volume).delete(remove_volume))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// An API error: status and message.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

/// The one mapping of store errors to HTTP statuses.
pub fn status_of(e: &StoreError) -> StatusCode {
    match e {
        StoreError::InvalidName(_) | StoreError::InvalidSize(_) => StatusCode::BAD_REQUEST,
        StoreError::AlreadyExists(_) | StoreError::Busy(..) => StatusCode::CONFLICT,
        StoreError::NotFound(_) => StatusCode::NOT_FOUND,
        StoreError::Block(crate::target::BlockError::NoSpace) => StatusCode::INSUFFICIENT_STORAGE,
        StoreError::Corrupt { .. } | StoreError::Block(_) | StoreError::Io { .. } => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError(status_of(&e), e.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("bad request body: {}", e.body_text()),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

/// What the API says about a node.
#[derive(Debug, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub version: String,
    pub nbd: Option<String>,
    pub nbd_unix: Option<String>,
}

/// What the API says about a volume.
#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct VolumeInfo {
    pub name: String,
    pub size: u64,
    pub table: TargetSpec,
    pub allocated_bytes: u64,
    pub connections: usize,
    /// `nbd://HOST:PORT/NAME`, when the node listens on TCP.
    pub uri: Option<String>,
}

/// Body of `POST /v1/volumes`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    pub name: String,
    pub size: u64,
}

fn info(state: &NodeState, v: &Arc<Volume>) -> VolumeInfo {
    VolumeInfo {
        name: v.table.name.clone(),
        size: v.table.size,
        table: v.table.target.clone(),
        allocated_bytes: v.target.allocated_bytes(),
        connections: v.connections(),
        uri: state
            .nbd_addr
            .map(|a| format!("nbd://{a}/{}", v.table.name)),
    }
}

async fn node_info(State(s): State<Arc<NodeState>>) -> Json<NodeInfo> {
    Json(NodeInfo {
        name: s.name.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        nbd: s.nbd_addr.map(|a| a.to_string()),
        nbd_unix: s.nbd_unix.as_ref().map(|p| p.display().to_string()),
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
    let store = s.store.clone();
    let v = tokio::task::spawn_blocking(move || store.create(&req.name, req.size))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok((StatusCode::CREATED, Json(info(&s, &v))))
}

async fn show_volume(
    State(s): State<Arc<NodeState>>,
    Path(name): Path<String>,
) -> Result<Json<VolumeInfo>, ApiError> {
    Ok(Json(info(&s, &s.store.get(&name)?)))
}

async fn remove_volume(
    State(s): State<Arc<NodeState>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let store = s.store.clone();
    tokio::task::spawn_blocking(move || store.remove(&name))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(StatusCode::NO_CONTENT)
}
