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

/// What went wrong when no node's API answered: named after the problem
/// (nothing listening, the NBD port, TLS on one side only), not after the
/// transport error that revealed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreachable {
    /// Nothing listens there (connection refused).
    Refused,
    /// The address is a node's NBD port: it greeted with `NBDMAGIC`.
    NbdPort,
    /// The API uses TLS and this client spoke plain HTTP.
    NeedsTls,
    /// The API is plain HTTP and this client spoke TLS.
    NoTls,
    /// Anything else: a timeout, a reset, a failed TLS handshake, DNS.
    Other,
}

/// A call that got no answer from a node's API.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiUnreachable {
    pub kind: Unreachable,
    pub message: String,
}

/// Whether a failed call may succeed if tried again unchanged: nothing
/// answered, or the node answered with a 5xx status (a node restarting, a
/// peer of it unreachable). A refusal (4xx) or a wrong address (the NBD
/// port, TLS on one side only) is not.
pub fn is_transient(e: &anyhow::Error) -> bool {
    if let Some(u) = e.downcast_ref::<ApiUnreachable>() {
        return matches!(u.kind, Unreachable::Refused | Unreachable::Other);
    }
    status_of(e).is_some_and(|s| s >= 500)
}

/// What a server sent first when [`probe`] spoke to it.
#[derive(Debug, PartialEq, Eq)]
enum Speaks {
    Nbd,
    Tls,
    Http,
}

/// Connects to `addr` once more, sends a plain HTTP request and reads the
/// first bytes back, to tell what listens there: an NBD server greets
/// first with `NBDMAGIC`, a TLS server answers plain text with an alert
/// record (`0x15 0x03 ..`), an HTTP server with `HTTP/`. Bounded by
/// `timeout`; `None` when nothing conclusive came back.
fn probe(addr: &str, timeout: std::time::Duration) -> Option<Speaks> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let sa = addr.to_socket_addrs().ok()?.next()?;
    let mut s = std::net::TcpStream::connect_timeout(&sa, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.set_write_timeout(Some(timeout)).ok()?;
    // An NBD server may close before reading this; its greeting is read
    // below either way.
    let _ = s.write_all(b"GET /v1/node HTTP/1.0\r\n\r\n");
    let mut buf = [0u8; 8];
    let mut n = 0;
    while n < buf.len() {
        match s.read(&mut buf[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    let got = &buf[..n];
    if got == b"NBDMAGIC" {
        Some(Speaks::Nbd)
    } else if got.len() >= 2 && matches!(got[0], 0x15 | 0x16) && got[1] == 0x03 {
        Some(Speaks::Tls)
    } else if got.starts_with(b"HTTP/") {
        Some(Speaks::Http)
    } else {
        None
    }
}

/// Whether a transport error's cause is a refused connection.
fn refused(e: &ureq::Transport) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        src = s.source();
    }
    false
}

/// Whether a transport error is a timeout (then probing would only wait
/// as long again).
fn timed_out(e: &ureq::Transport) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
            ) {
                return true;
            }
        }
        src = s.source();
    }
    false
}

/// A blocking client of a node's control API.
pub struct Api {
    base: String,
    agent: ureq::Agent,
    token: Option<String>,
    /// The command-line flag that named this address (`--api`, `--to`),
    /// for error messages; `None` for node-to-node calls.
    flag: Option<&'static str>,
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
            flag: None,
        }
    }

    /// Names the command-line flag the address came from, so an error can
    /// say which flag to fix.
    pub fn from_flag(mut self, flag: &'static str) -> Self {
        self.flag = Some(flag);
        self
    }

    /// The address as given (`HOST:PORT`, without the scheme).
    pub fn addr(&self) -> &str {
        self.base
            .trim_start_matches("http://")
            .trim_start_matches("https://")
    }

    /// Whether calls go over TLS.
    pub fn is_tls(&self) -> bool {
        self.base.starts_with("https://")
    }

    /// Turns a transport error (no HTTP answer) into an error that names
    /// the problem.
    fn unreachable(&self, e: ureq::Transport) -> ApiUnreachable {
        let addr = self.addr().trim_end_matches('/');
        let (kind, message) = if refused(&e) {
            (
                Unreachable::Refused,
                format!("no dlsm node listening at {addr} (connection refused)"),
            )
        } else if matches!(
            e.kind(),
            ureq::ErrorKind::Dns | ureq::ErrorKind::InvalidUrl | ureq::ErrorKind::UnknownScheme
        ) || timed_out(&e)
        {
            (
                Unreachable::Other,
                format!("cannot reach the node API at {}: {e}", self.base),
            )
        } else {
            match probe(addr, Duration::from_secs(2)) {
                Some(Speaks::Nbd) => (
                    Unreachable::NbdPort,
                    format!(
                        "{addr} answered with the NBD protocol, not the HTTP API; {}",
                        match self.flag {
                            Some(f) => format!("is {f} pointing at the NBD port?"),
                            None => "is that the node's NBD port rather than its API?".into(),
                        }
                    ),
                ),
                Some(Speaks::Tls) if !self.is_tls() => (
                    Unreachable::NeedsTls,
                    format!(
                        "the node API at {addr} uses TLS and this call was plain HTTP: give \
                         --tls-dir DIR (or DLSM_TLS_DIR) with a client certificate the node's \
                         CA signed"
                    ),
                ),
                Some(Speaks::Http) if self.is_tls() => (
                    Unreachable::NoTls,
                    format!(
                        "the node API at {addr} is plain HTTP (the node runs without \
                         --tls-dir) and this call used TLS: leave out --tls-dir (and \
                         DLSM_TLS_DIR)"
                    ),
                ),
                _ => (
                    Unreachable::Other,
                    format!("cannot reach the node API at {}: {e}", self.base),
                ),
            }
        };
        ApiUnreachable { kind, message }
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
            Err(ureq::Error::Transport(e)) => return Err(self.unreachable(e).into()),
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
        let h = self.addr();
        h.rsplit_once(':').map(|(h, _)| h).unwrap_or(h)
    }
}
