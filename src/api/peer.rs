//! The async client of another node's control API: what a node uses to
//! call its peers (prepare, fence, release, status...), on the node's own
//! runtime, with no blocking thread per call.
//!
//! One request per connection (HTTP/1.1, `Connection: close`): node-to-node
//! calls are rare (a handful per migration), so pooling would only add
//! state to get wrong across peer restarts. TLS and the bearer token are
//! the same [`ApiAuth`] the CLI's blocking client uses. Every call is
//! bounded by the caller's timeout, connect and TLS handshake included.
//!
//! Errors are a [`PeerError`] value, so callers match on the HTTP status
//! (404: no such thing there; 409: another migration) instead of parsing
//! strings.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpStream;

use crate::api_client::ApiAuth;

/// Largest answer read from a peer.
const MAX_ANSWER: usize = 64 << 20;

/// Why a call to a peer failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    /// The peer answered with an error status; `message` is its `error`.
    #[error("{message} (HTTP {status})")]
    Status { status: u16, message: String },
    /// No answer within the timeout.
    #[error("no answer from {addr} within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    /// Connecting, TLS, or the HTTP exchange failed.
    #[error("cannot reach {addr}: {why}")]
    Transport { addr: String, why: String },
    /// An answer that is not the JSON expected.
    #[error("bad answer from {addr}: {why}")]
    BadAnswer { addr: String, why: String },
}

impl PeerError {
    /// The HTTP status, when the peer answered with one.
    pub fn status(&self) -> Option<u16> {
        match self {
            PeerError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A peer node's API at `addr` (`HOST:PORT`).
#[derive(Clone)]
pub struct Peer {
    addr: String,
    auth: ApiAuth,
    timeout: Duration,
}

impl Peer {
    pub fn new(addr: &str, auth: &ApiAuth, timeout: Duration) -> Self {
        Self {
            addr: addr.to_owned(),
            auth: auth.clone(),
            timeout,
        }
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, PeerError> {
        self.call(Method::GET, path, None).await
    }

    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, PeerError> {
        let body = serde_json::to_vec(body).map_err(|e| PeerError::BadAnswer {
            addr: self.addr.clone(),
            why: format!("request does not serialise: {e}"),
        })?;
        self.call(Method::POST, path, Some(body)).await
    }

    /// `DELETE path`; any 2xx answer is success.
    pub async fn delete(&self, path: &str) -> Result<(), PeerError> {
        self.call::<serde_json::Value>(Method::DELETE, path, None)
            .await
            .map(drop)
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, PeerError> {
        let exchange = self.exchange(method, path, body);
        let (status, bytes) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| PeerError::Timeout {
                addr: self.addr.clone(),
                timeout: self.timeout,
            })??;
        if !status.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            return Err(PeerError::Status {
                status: status.as_u16(),
                message,
            });
        }
        let bytes = if bytes.is_empty() {
            Bytes::from_static(b"null")
        } else {
            bytes
        };
        serde_json::from_slice(&bytes).map_err(|e| PeerError::BadAnswer {
            addr: self.addr.clone(),
            why: e.to_string(),
        })
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), PeerError> {
        let transport = |why: String| PeerError::Transport {
            addr: self.addr.clone(),
            why,
        };
        let tcp = TcpStream::connect(&self.addr)
            .await
            .map_err(|e| transport(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.addr)
            .header(hyper::header::CONNECTION, "close");
        if let Some(t) = &self.auth.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| transport(e.to_string()))?;
        match &self.auth.tls {
            Some(cfg) => {
                let name =
                    crate::tls::server_name(&self.addr).map_err(|e| transport(e.to_string()))?;
                let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| transport(format!("TLS: {e}")))?;
                send(TokioIo::new(tls), req).await.map_err(transport)
            }
            None => send(TokioIo::new(tcp), req).await.map_err(transport),
        }
    }
}

/// One HTTP/1.1 exchange on `io`; the answer's body at most [`MAX_ANSWER`].
async fn send<I>(io: I, req: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes), String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|e| e.to_string());
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            driver.abort();
            return Err(e);
        }
    };
    let status = resp.status();
    let body = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    driver.abort();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refused_connection_and_a_silent_peer_are_told_apart() {
        // Nothing listens on a port just freed.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        let p = Peer::new(&addr, &ApiAuth::default(), Duration::from_secs(2));
        let e = p.get::<serde_json::Value>("/v1/node").await.unwrap_err();
        assert!(matches!(e, PeerError::Transport { .. }), "{e}");
        assert_eq!(e.status(), None);
        // A peer that accepts and never answers.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let hold = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(s);
        });
        let p = Peer::new(&addr, &ApiAuth::default(), Duration::from_millis(300));
        let e = p.get::<serde_json::Value>("/v1/node").await.unwrap_err();
        assert!(matches!(e, PeerError::Timeout { .. }), "{e}");
        hold.abort();
    }
}
