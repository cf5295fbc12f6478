//! A blocking HTTP/JSON client of a node's control API, used by the CLI and
//! by nodes talking to each other (from `spawn_blocking`).

use std::time::Duration;

use anyhow::{bail, Context};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A blocking client of a node's control API.
pub struct Api {
    base: String,
    agent: ureq::Agent,
}

impl Api {
    pub fn new(addr: &str) -> Self {
        let base = if addr.starts_with("http://") {
            addr.trim_end_matches('/').to_owned()
        } else {
            format!("http://{}", addr.trim_end_matches('/'))
        };
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5))
            .timeout(Duration::from_secs(120))
            .build();
        Self { base, agent }
    }

    pub fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> anyhow::Result<T> {
        let url = format!("{}{}", self.base, path);
        let req = self.agent.request(method, &url);
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
                bail!("{msg} (HTTP {code})");
            }
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
        let h = self.base.trim_start_matches("http://");
        h.rsplit_once(':').map(|(h, _)| h).unwrap_or(h)
    }
}
