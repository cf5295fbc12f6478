//! The node's etcd client: one `etcd_client::Client` per endpoint, pinned to
//! the last endpoint that answered.
//!
//! Why not one client over every endpoint: etcd-client's balanced channel
//! picks an endpoint at random per call and neither retries nor evicts a
//! dead one, and a stopped (SIGSTOP) member holds its calls until they time
//! out. So each call here goes to the pinned endpoint under its own
//! [`tokio::time::timeout`]; on an error or a timeout it moves to the next
//! endpoint, and the one that answers becomes the pinned one. Clients ask
//! with `require_leader`, so a member cut off in a minority answers "no
//! leader" at once instead of after etcd's 7 s request timeout.
//!
//! After a failed call the endpoint's client is dropped and the next call
//! connects afresh, so a member that comes back is used at once.
//!
//! A call that timed out may still have been applied: callers make their
//! writes compare-and-swap transactions and read back after a failure
//! (see [`super::directory`]).

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use super::ClusterError;

/// Bounds one call (one endpoint) unless the caller gives its own.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// etcd, as the node reaches it.
pub struct Etcd {
    endpoints: Vec<String>,
    /// Lazily made per endpoint (`Client::connect` makes no request).
    clients: Vec<Mutex<Option<Client>>>,
    /// Index of the endpoint to try first.
    pinned: AtomicUsize,
    tls: Option<TlsOptions>,
}

impl Etcd {
    /// The endpoints (at least one) and, for `https://` ones, the TLS
    /// directory (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`).
    pub fn new(
        endpoints: &[String],
        tls_dir: Option<&std::path::Path>,
    ) -> Result<Etcd, ClusterError> {
        if endpoints.is_empty() {
            return Err(ClusterError::Unavailable(
                "no etcd endpoint given (--cluster-etcd URL[,URL...])".into(),
            ));
        }
        let wants_tls = endpoints.iter().any(|e| e.starts_with("https://"));
        let tls = match (wants_tls, tls_dir) {
            (false, _) => None,
            (true, None) => {
                return Err(ClusterError::Unavailable(
                    "https:// etcd endpoints need --tls-dir (ca-cert.pem, client-cert.pem, \
                     client-key.pem)"
                        .into(),
                ))
            }
            (true, Some(dir)) => {
                let read = |f: &str| {
                    std::fs::read(dir.join(f)).map_err(|e| {
                        ClusterError::Unavailable(format!(
                            "cannot read {} for etcd TLS: {e}",
                            dir.join(f).display()
                        ))
                    })
                };
                Some(
                    TlsOptions::new()
                        .ca_certificate(Certificate::from_pem(read("ca-cert.pem")?))
                        .identity(Identity::from_pem(
                            read("client-cert.pem")?,
                            read("client-key.pem")?,
                        )),
                )
            }
        };
        Ok(Etcd {
            endpoints: endpoints.to_vec(),
            clients: endpoints.iter().map(|_| Mutex::new(None)).collect(),
            pinned: AtomicUsize::new(0),
            tls,
        })
    }

    /// The endpoint calls go to first.
    pub fn pinned(&self) -> &str {
        &self.endpoints[self.pinned.load(Ordering::Relaxed) % self.endpoints.len()]
    }

    fn options(&self) -> ConnectOptions {
        let o = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            // Headers only: not a bound on streams; ours is the timeout around each call.
            .with_timeout(CALL_TIMEOUT)
            .with_require_leader(true)
            // etcd refuses pings more often than 5 s (--grpc-keepalive-min-time)
            // or on a connection without a stream (GOAWAY too_many_pings).
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(3))
            .with_keep_alive_while_idle(false);
        match &self.tls {
            Some(t) => o.with_tls(t.clone()),
            None => o,
        }
    }

    async fn client(&self, i: usize) -> Result<Client, String> {
        if let Some(c) = self.clients[i].lock().expect("etcd client lock").clone() {
            return Ok(c);
        }
        let c = tokio::time::timeout(
            CALL_TIMEOUT,
            Client::connect([self.endpoints[i].as_str()], Some(self.options())),
        )
        .await
        .map_err(|_| format!("no connection within {CALL_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
        *self.clients[i].lock().expect("etcd client lock") = Some(c.clone());
        Ok(c)
    }

    /// The JSON record at `key` and its `mod_revision`, if the key exists
    /// (a linearizable read, under [`CALL_TIMEOUT`]). `what` names the read
    /// in errors.
    pub async fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        key: &str,
    ) -> Result<Option<(T, i64)>, ClusterError> {
        let k = key.to_owned();
        let r = self
            .call(what, CALL_TIMEOUT, move |mut c| {
                let k = k.clone();
                async move { c.get(k, None).await }
            })
            .await?;
        match r.kvs().first() {
            Some(kv) => Ok(Some((
                super::member::parse(key, kv.value())?,
                kv.mod_revision(),
            ))),
            None => Ok(None),
        }
    }

    /// Runs `f` on the pinned endpoint, then on each other one in turn
    /// until one answers, each try bounded by `timeout`. `what` names the
    /// call in the error. etcd's own refusals (a failed compare is not
    /// one: a transaction answers it) are errors too and move on, so a
    /// member without a leader is skipped; the last error is returned.
    pub async fn call<T, F, Fut>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: F,
    ) -> Result<T, ClusterError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let n = self.endpoints.len();
        let first = self.pinned.load(Ordering::Relaxed) % n;
        let mut errors = Vec::new();
        for k in 0..n {
            let i = (first + k) % n;
            let ep = &self.endpoints[i];
            let c = match self.client(i).await {
                Ok(c) => c,
                Err(e) => {
                    errors.push(format!("{ep}: {e}"));
                    continue;
                }
            };
            match tokio::time::timeout(timeout, f(c)).await {
                Ok(Ok(v)) => {
                    if k > 0 {
                        tracing::info!(endpoint = %ep, "etcd: now using this endpoint");
                    }
                    self.pinned.store(i, Ordering::Relaxed);
                    return Ok(v);
                }
                // The member answered, refusing ("no leader" during an
                // election): it is alive, keep its connection and the pin.
                Ok(Err(e)) if member_answered(&e) => {
                    errors.push(format!("{ep}: {e}"));
                    continue;
                }
                Ok(Err(e)) => errors.push(format!("{ep}: {e}")),
                Err(_) => errors.push(format!("{ep}: no answer within {timeout:?}")),
            }
            // No answer: a fresh connection next time (a channel whose
            // connection failed may keep failing, or back off, after the
            // member is back, and a hung one keeps hanging), and the next
            // call starts elsewhere: a hung member would cost every call
            // its whole timeout before the others are tried (a lease
            // renewal cannot afford that twice). Only if no other call has
            // moved the pin meanwhile.
            *self.clients[i].lock().expect("etcd client lock") = None;
            let _ =
                self.pinned
                    .compare_exchange(i, (i + 1) % n, Ordering::Relaxed, Ordering::Relaxed);
        }
        Err(ClusterError::Unavailable(format!(
            "{what}: {}",
            errors.join("; ")
        )))
    }
}

/// Whether `e` is the member's own answer (etcd's errors read
/// "etcdserver: ..."), not a failure to reach it.
fn member_answered(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().starts_with("etcdserver:"))
}
