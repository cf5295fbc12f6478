//! A blocking HTTP/JSON client of a node's control API, used by the CLI
//! (nodes call each other with the async [`crate::api::peer`] client).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// How a caller proves who it is to a node's API: a client certificate
/// (over TLS) and/or a bearer token. The same for the CLI and for nodes
/// calling each other.
#[derive(Clone, Default)]
pub struct ApiAuth {
    /// TLS client configuration; with it, the API is reached over `https`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Sent as `Authorization: Bearer TOKEN`.
    pub token: Option<String>,
}

impl std::fmt::Debug for ApiAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiAuth")
            .field("tls", &self.tls.is_some())
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl ApiAuth {
    /// Reads a token file: one line, surrounding whitespace ignored.
    pub fn read_token(path: &std::path::Path) -> anyhow::Result<String> {
        let t = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read API token file {}", path.display()))?;
        let t = t.trim();
        if t.len() < 16 || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
            bail!(
                "API token in {} must be one line of at least 16 printable characters",
                path.display()
            );
        }
        Ok(t.to_owned())
    }
}

/// A volume name as one URL path segment. Names are checked against the
/// node's rules first (so `..` or `a/b` never become a different path) and
/// then percent-encoded, so `x?y` cannot end the path early.
pub fn seg(name: &str) -> anyhow::Result<String> {
    crate::node::store::validate_name(name)?;
    Ok(encode_segment(name))
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn encode_segment(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A node answered with an HTTP error status: the status as a value (so a
/// caller can tell "refused" from "unreachable"), and the node's message.
#[derive(Debug, thiserror::Error)]
#[error("{message} (HTTP {status})")]
pub struct HttpStatus {
    pub status: u16,
    pub message: String,
}

/// The HTTP status a failed call got, if the node answered at all.
pub fn status_of(e: &anyhow::Error) -> Option<u16> {
    e.downcast_ref::<HttpStatus>().map(|h| h.status)
}

/// A blocking client of a node's control API.
pub struct Api {
    base: String,
    agent: ureq::Agent,
    token: Option<String>,
}

impl Api {
    /// A client with no credentials (plain HTTP, no token).
    pub fn new(addr: &str) -> Self {
        Self::with_auth(addr, &ApiAuth::default())
    }

    /// A client presenting `auth`.
    pub fn with_auth(addr: &str, auth: &ApiAuth) -> Self {
        Self::with_timeout(addr, auth, Duration::from_secs(120))
    }

    /// A client presenting `auth` whose every call gives up after
    /// `timeout` (node-to-node calls use the node's `--source-timeout`).
    pub fn with_timeout(addr: &str, auth: &ApiAuth, timeout: Duration) -> Self {
        let addr = addr.trim_end_matches('/');
        let base = if addr.starts_with("http://") || addr.starts_with("https://") {
            addr.to_owned()
        } else if auth.tls.is_some() {
            format!("https://{addr}")
        } else {
            format!("http://{addr}")
        };
        let mut agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5).min(timeout))
            .timeout(timeout);
        if let Some(tls) = &auth.tls {
            agent = agent.tls_config(tls.clone());
        }
        Self {
            base,
            agent: agent.build(),
            token: auth.token.clone(),
        }
    }

    pub fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> anyhow::Result<T> {
        let url = format!("{}{}", self.base, path);
        let mut req = self.agent.request(method, &url);
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let resp = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        let text = match resp {
            Ok(r) => r.into_string()?,
            Err(ureq::Error::Status(code, r)) => {
                let body = r.into_string().unwrap_or_default();
                let msg = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
                    .unwrap_or(body);
                return Err(HttpStatus {
                    status: code,
                    message: msg,
                }
                .into());
            }
            Err(e) if self.base.starts_with("http://") => bail!(
                "cannot reach the node API at {}: {e} (if the node runs with --tls-dir, \
                 give --tls-dir here too)",
                self.base
            ),
            Err(e) => bail!("cannot reach the node API at {}: {e}", self.base),
        };
        let text = if text.is_empty() {
            "null".to_owned()
        } else {
            text
        };
        serde_json::from_str(&text).with_context(|| format!("bad answer from {url}"))
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.call("GET", path, None::<&()>)
    }
    pub fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> anyhow::Result<T> {
        self.call("POST", path, Some(body))
    }
    pub fn delete(&self, path: &str) -> anyhow::Result<()> {
        self.call::<serde_json::Value>("DELETE", path, None::<&()>)
            .map(drop)
    }
    /// Host part of the API address (to reach a node listening on 0.0.0.0).
    pub fn host(&self) -> &str {
        let h = self
            .base
            .trim_start_matches("http://")
            .trim_start_matches("https://");
        h.rsplit_once(':').map(|(h, _)| h).unwrap_or(h)
    }
}
