//! `remote`: another node's export, reached with the NBD client.
//!
//! A small pool of connections (default 4), each pipelining many requests,
//! used round-robin. A connection that fails is dropped and re-made on next
//! use. Every operation retries with exponential backoff (50 ms doubling to
//! 2 s) while the origin is unreachable, for at most `timeout`; then it
//! fails with [`BlockError::Unavailable`] (EIO to NBD clients). So when the
//! origin dies, only requests that need it wait; when it returns, they and
//! later ones succeed without anyone reconnecting by hand.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::Mutex;

use super::{BlockError, BlockResult, BlockTarget, Capabilities, Extent};
use crate::bufpool::IoBuf;
use crate::nbd::client::{ClientError, NbdAddr, NbdClient};
use crate::nbd::server::MAX_PAYLOAD;

/// A pool of NBD connections to one export.
pub struct RemoteTarget {
    addr: NbdAddr,
    export: String,
    size: u64,
    slots: Vec<Mutex<Option<NbdClient>>>,
    next: AtomicUsize,
    timeout: Duration,
    closed: std::sync::atomic::AtomicBool,
    /// Fault injection for tests: extra latency before every origin read.
    read_delay: Duration,
    /// TLS for every connection to the origin.
    tls: Option<tokio_rustls::TlsConnector>,
}

impl RemoteTarget {
    /// A target for an origin whose size is known (from the volume's
    /// table). It connects lazily, so a node can restart while its origin
    /// is down.
    pub fn lazy(
        addr: NbdAddr,
        export: &str,
        size: u64,
        connections: usize,
        timeout: Duration,
    ) -> Self {
        Self {
            addr,
            export: export.to_owned(),
            size,
            slots: (0..connections.max(1)).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
            timeout,
            closed: Default::default(),
            read_delay: Duration::ZERO,
            tls: None,
        }
    }

    /// Connects with TLS (STARTTLS, mutual certificates).
    pub fn with_tls(mut self, tls: Option<tokio_rustls::TlsConnector>) -> Self {
        self.tls = tls;
        self
    }

    /// Adds `delay` before every origin read (fault injection in tests).
    pub fn with_read_delay(mut self, delay: Duration) -> Self {
        self.read_delay = delay;
        self
    }

    /// Drops every connection and refuses further use (the migration that
    /// needed this origin is complete).
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        for s in &self.slots {
            if let Ok(mut g) = s.try_lock() {
                *g = None;
            }
        }
    }

    /// A live client from the pool, connecting if the slot is empty.
    async fn client(&self, bulk: bool) -> Result<NbdClient, ClientError> {
        // Slot 0 is kept for urgent requests (a guest waiting on a fetch)
        // when there is more than one: bulk copies queue on the others, so
        // an urgent reply never waits behind megabytes of background data
        // on the same connection.
        let n = self.slots.len();
        let i = match (bulk, n) {
            (_, 1) => 0,
            (false, _) => 0,
            (true, _) => 1 + self.next.fetch_add(1, Ordering::Relaxed) % (n - 1),
        };
        let mut slot = self.slots[i].lock().await;
        if let Some(c) = slot.as_ref() {
            if !c.is_dead() {
                return Ok(c.clone());
            }
        }
        let c = tokio::time::timeout(
            Duration::from_secs(5),
            NbdClient::connect_with(&self.addr, &self.export, self.tls.as_ref()),
        )
        .await
        .map_err(|_| ClientError::Io("connect timed out".into()))??;
        if c.size() != self.size {
            return Err(ClientError::Protocol(format!(
                "origin size changed from {} to {}",
                self.size,
                c.size()
            )));
        }
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Runs `op` on a pooled client, retrying transport failures with
    /// backoff until the timeout. Errors the server itself returns are final.
    async fn retry<T, F, Fut>(&self, what: &str, op: F) -> BlockResult<T>
    where
        F: Fn(NbdClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        self.retry_on(false, what, op).await
    }

    async fn retry_on<T, F, Fut>(&self, bulk: bool, what: &str, op: F) -> BlockResult<T>
    where
        F: Fn(NbdClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let deadline = Instant::now() + self.timeout;
        let mut backoff =
            crate::retry::Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        loop {
            if self.closed.load(Ordering::SeqCst) {
                return Err(BlockError::Unavailable("origin link closed".into()));
            }
            let r = match self.client(bulk).await {
                // A link that silently stops delivering (cable cut, peer
                // frozen) never errors: bound each attempt by the time left,
                // then give the connection up so the next attempt makes a
                // new one.
                Ok(c) => {
                    let left = deadline
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_secs(1));
                    match tokio::time::timeout(left, op(c.clone())).await {
                        Ok(r) => r,
                        Err(_) => {
                            let why = format!("no reply from the origin within {left:?}");
                            c.mark_dead(&why);
                            Err(ClientError::Io(why))
                        }
                    }
                }
                Err(e) => Err(e),
            };
            match r {
                Ok(v) => return Ok(v),
                Err(ClientError::Server { errno, message }) => {
                    return Err(BlockError::Unavailable(format!(
                        "origin {}/{} refused {what}: errno {errno} {message}",
                        self.addr, self.export
                    )))
                }
                Err(e) => {
                    if Instant::now() + backoff.peek() > deadline {
                        return Err(BlockError::Unavailable(format!(
                            "origin {}/{} unreachable for {:?}: {e}",
                            self.addr, self.export, self.timeout
                        )));
                    }
                    tracing::debug!(origin = %self.addr, "{what} failed, retrying: {e}");
                    backoff.wait().await;
                }
            }
        }
    }

    /// Reads `len` bytes (at most the NBD maximum) into a fresh buffer
    /// aligned for `O_DIRECT`, without the copy [`RemoteTarget::read_into`] makes. `bulk` requests
    /// (background copies) stay off the connection kept for urgent ones.
    pub async fn read_vec(&self, offset: u64, len: u32, bulk: bool) -> BlockResult<IoBuf> {
        super::check_range(offset, len as u64, self.size)?;
        if len > MAX_PAYLOAD {
            return Err(BlockError::Invalid(format!("origin read of {len} bytes")));
        }
        if !self.read_delay.is_zero() {
            tokio::time::sleep(self.read_delay).await;
        }
        self.retry_on(bulk, "read", |c| async move {
            c.read_aligned(offset, len).await
        })
        .await
    }

    /// Reads into `buf`, splitting requests at the NBD maximum.
    pub async fn read_into(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        if !self.read_delay.is_zero() {
            tokio::time::sleep(self.read_delay).await;
        }
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(MAX_PAYLOAD as usize);
            let at = offset + done as u64;
            let data = self
                .retry("read", |c| async move { c.read(at, n as u32).await })
                .await?;
            buf[done..done + n].copy_from_slice(&data);
            done += n;
        }
        Ok(())
    }
}

#[async_trait]
impl BlockTarget for RemoteTarget {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: false,
            trim: false,
            write_zeroes: false,
            fast_zero: false,
            block_status: true,
            cache: false,
        }
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        super::check_range(offset, buf.len() as u64, self.size)?;
        self.read_into(offset, buf).await
    }

    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> BlockResult<()> {
        super::check_range(offset, data.len() as u64, self.size)?;
        self.retry("write", |c| async move { c.write(offset, data, fua).await })
            .await
    }

    async fn flush(&self) -> BlockResult<()> {
        self.retry("flush", |c| async move { c.flush().await })
            .await
    }

    async fn block_status(&self, offset: u64, len: u64) -> BlockResult<Vec<Extent>> {
        super::check_range(offset, len, self.size)?;
        let len = len.min(u32::MAX as u64 & !4095).max(1) as u32;
        self.retry("block status", |c| async move {
            if c.has_block_status() {
                c.block_status(offset, len).await
            } else {
                Ok(vec![Extent { len, flags: 0 }])
            }
        })
        .await
    }
}

#[async_trait]
impl super::Origin for RemoteTarget {
    async fn read_into(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        RemoteTarget::read_into(self, offset, buf).await
    }
    async fn read_vec(&self, offset: u64, len: u32, bulk: bool) -> BlockResult<IoBuf> {
        RemoteTarget::read_vec(self, offset, len, bulk).await
    }
    async fn block_status(&self, offset: u64, len: u64) -> BlockResult<Vec<Extent>> {
        BlockTarget::block_status(self, offset, len).await
    }
    fn close(&self) {
        RemoteTarget::close(self)
    }
}
