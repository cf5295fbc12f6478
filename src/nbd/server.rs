//! The NBD server: handshake, option haggling and the transmission phase of
//! one connection.
//!
//! The server knows nothing about volumes or nodes: it asks an
//! [`ExportRegistry`] for exports by name and talks to each through the
//! [`BlockTarget`] trait. It owns per-connection concurrency:
//!
//! * the *reader* (the task that called [`serve_connection`]) reads and
//!   validates requests, answering malformed ones itself, and spawns one task
//!   per valid request so that many are in flight and replies go out in
//!   whatever order they complete;
//! * replies go through a [`ReplySink`]: whoever finishes a request queues
//!   its reply and, if no one is writing, becomes the writer and drains the
//!   queue in one batch. A request served inline by the reader is answered
//!   with no task switch at all; under load, replies coalesce into few
//!   syscalls.
//!
//! Memory per connection is bounded: requests in flight hold permits of a
//! byte budget ([`IN_FLIGHT_BUDGET`]), so a client that pipelines faster than
//! the target completes is simply not read from. A client that breaks the
//! protocol (bad magic, truncated frame) is disconnected; requests it already
//! sent run to completion. Nothing a client sends can panic the server.
//!
//! Metrics: every connection records into the node's [`NbdMetrics`] (open
//! connections; per command requests, bytes, errors by errno and latency),
//! with atomic adds only (see [`crate::node::metrics`]): no lock, except
//! once per node lifetime for each new kind of error.
//!
//! Shutdown: when the `shutdown` signal fires, the reader stops taking new
//! requests, in-flight ones complete and their replies are sent, then the
//! connection closes.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

use super::proto::{self, cmd_flags, errno, opt, rep, tflags, ClientOption, Command, Request};
use crate::bufpool::IoBuf;
use crate::node::metrics::NbdMetrics;
use crate::target::{BlockError, BlockTarget, Extent, ZeroFlags};

/// Largest READ or WRITE payload accepted (advertised as the maximum block size).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Preferred block size advertised to clients.
pub const PREFERRED_BLOCK: u32 = 4096;
/// Bytes of request payload a single connection may have in flight.
pub const IN_FLIGHT_BUDGET: u32 = 64 << 20;
/// Smallest cost charged against the budget per request.
const MIN_REQUEST_COST: u32 = 16 << 10;
/// Option data larger than this is refused (`ERR_TOO_BIG`) without parsing.
const MAX_OPTION_DATA: u32 = 64 << 10;
/// Option data larger than this is treated as an attack: disconnect.
const MAX_OPTION_SKIP: u32 = 16 << 20;
/// How long a client may take over the whole handshake (TLS included)
/// unless the node says otherwise: QEMU's NBD server's default too. A real
/// client needs a few round trips; anything slower is holding a slot.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Reads at least this large are sent sparsely (holes as `OFFSET_HOLE`).
const SPARSE_READ_MIN: u32 = 64 << 10;

/// Reads this large, on an export with [`Export::bulk_reads`], are bulk
/// copies (a destination's background batches are 4 MiB; its on-demand
/// fetches of 64 KiB regions stay buffered and keep readahead).
pub const BULK_READ_MIN: u32 = 1 << 20;

/// An export handed to a connection.
pub struct Export {
    pub name: String,
    pub description: String,
    pub target: Arc<dyn BlockTarget>,
    pub read_only: bool,
    /// Large reads (at least [`BULK_READ_MIN`] bytes) go through
    /// [`BlockTarget::read_bulk`], around the page cache where the target
    /// can: for a migration's origin link, whose bulk reads are a one-time
    /// sweep of cold data that caching would only churn.
    pub bulk_reads: bool,
    /// Held for the connection's lifetime; dropping it tells the owner the
    /// connection ended (the node counts connections per volume with it).
    pub guard: Box<dyn Send + Sync>,
}

/// Where the server finds exports. Implemented by the node.
pub trait ExportRegistry: Send + Sync + 'static {
    /// Names and descriptions of every export, for `NBD_OPT_LIST`.
    fn list(&self) -> Vec<(String, String)>;
    /// The export called `name`, or `None` if there is none.
    fn open(&self, name: &str) -> Option<Export>;
}

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("handshake timed out")]
    Timeout,
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
}

impl From<proto::ProtoError> for ConnError {
    fn from(e: proto::ProtoError) -> Self {
        ConnError::Protocol(e.to_string())
    }
}

/// What the handshake settled.
struct Negotiated {
    export: Export,
    structured: bool,
    base_allocation: bool,
}

/// A byte stream the server can serve: anything full-duplex that splits
/// into independently owned halves for the transmission phase (where one
/// task reads requests while others write replies).
pub trait NbdStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type Read: AsyncRead + Unpin + Send + 'static;
    type Write: AsyncWrite + Unpin + Send + 'static;
    fn into_halves(self) -> (Self::Read, Self::Write);
}

impl NbdStream for tokio::net::TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    fn into_halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

impl NbdStream for tokio::net::UnixStream {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;
    fn into_halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

impl NbdStream for tokio::io::DuplexStream {
    type Read = tokio::io::ReadHalf<Self>;
    type Write = tokio::io::WriteHalf<Self>;
    fn into_halves(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
}

impl<S: NbdStream> NbdStream for tokio_rustls::server::TlsStream<S> {
    type Read = tokio::io::ReadHalf<Self>;
    type Write = tokio::io::WriteHalf<Self>;
    fn into_halves(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
}

/// The stream during the handshake: reads buffered, writes batched (every
/// reply is flushed before the server waits for the client again).
type Haggle<S> = BufReader<BufWriter<S>>;

fn haggle<S: AsyncRead + AsyncWrite>(s: S) -> Haggle<S> {
    BufReader::with_capacity(16 << 10, BufWriter::with_capacity(16 << 10, s))
}

/// Where a connection stands on TLS during option haggling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TlsState {
    /// The node has no TLS: STARTTLS is refused with `ERR_POLICY`.
    Off,
    /// The node requires TLS and the client has not started it: everything
    /// but STARTTLS and ABORT is refused with `ERR_TLS_REQD`.
    Required,
    /// TLS is up.
    Active,
}

/// What every client must get through before it reaches an export.
#[derive(Clone)]
pub struct HandshakePolicy {
    /// With an acceptor, the connection must upgrade with
    /// `NBD_OPT_STARTTLS` before anything else, and the client must present
    /// a certificate the acceptor trusts (see [`crate::tls`]).
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// The whole handshake, from the greeting to the end of option
    /// haggling, TLS included, must finish within this; then the
    /// connection is dropped. The transmission phase has no such limit.
    pub timeout: Duration,
}

impl HandshakePolicy {
    /// Plain text, [`DEFAULT_HANDSHAKE_TIMEOUT`].
    pub fn plain() -> Self {
        HandshakePolicy {
            tls: None,
            timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }
}

/// How option haggling ended.
enum Haggled {
    /// The client sent ABORT (or left during a shutdown).
    Left,
    /// The client asked for STARTTLS and got its ACK.
    StartTls,
    Attach(Negotiated),
}

/// Serves one client connection until it disconnects, breaks the protocol,
/// does not finish its handshake as `policy` demands, or `shutdown`
/// becomes true. The connection counts as open in `metrics` throughout,
/// and its requests are recorded there.
pub async fn serve_connection<S: NbdStream>(
    stream: S,
    registry: Arc<dyn ExportRegistry>,
    policy: HandshakePolicy,
    mut shutdown: watch::Receiver<bool>,
    peer: String,
    metrics: Arc<NbdMetrics>,
) -> Result<(), ConnError> {
    let _open = metrics.connection();
    // One deadline for the whole handshake, TLS included: a client that
    // dribbles bytes cannot hold a connection slot forever.
    let deadline = tokio::time::Instant::now() + policy.timeout;
    let state = if policy.tls.is_some() {
        TlsState::Required
    } else {
        TlsState::Off
    };
    let mut io = haggle(stream);
    let first = bounded(deadline, &mut shutdown, async {
        let no_zeroes = greet(&mut io).await?;
        Ok((
            no_zeroes,
            options(&mut io, &*registry, state, no_zeroes).await?,
        ))
    })
    .await?;
    match first {
        Some((_, Haggled::Attach(n))) => attached(io, n, shutdown, &peer, metrics).await,
        Some((no_zeroes, Haggled::StartTls)) => {
            // `options` only ACKs STARTTLS in TlsState::Required, which
            // only exists with an acceptor; still, no panics on this path.
            let Some(acceptor) = policy.tls else {
                return Err(ConnError::Protocol(
                    "STARTTLS without TLS configured".into(),
                ));
            };
            // The client must wait for our ACK before its ClientHello; bytes
            // already buffered mean it did not.
            if !io.buffer().is_empty() {
                return Err(ConnError::Protocol("data sent after STARTTLS".into()));
            }
            let raw = io.into_inner().into_inner();
            let second = bounded(deadline, &mut shutdown, async {
                let s = acceptor.accept(raw).await.map_err(ConnError::Tls)?;
                let mut io = haggle(s);
                let h = options(&mut io, &*registry, TlsState::Active, no_zeroes).await?;
                Ok((io, h))
            })
            .await?;
            match second {
                Some((io, Haggled::Attach(n))) => attached(io, n, shutdown, &peer, metrics).await,
                _ => Ok(()),
            }
        }
        Some((_, Haggled::Left)) | None => Ok(()),
    }
}

/// Runs `fut` until `deadline`; `Ok(None)` if shutdown came first.
async fn bounded<T>(
    deadline: tokio::time::Instant,
    shutdown: &mut watch::Receiver<bool>,
    fut: impl Future<Output = Result<T, ConnError>>,
) -> Result<Option<T>, ConnError> {
    tokio::select! {
        r = tokio::time::timeout_at(deadline, fut) => r.map_err(|_| ConnError::Timeout)?.map(Some),
        _ = stopped(shutdown) => Ok(None),
    }
}

/// Enters the transmission phase on a negotiated stream.
async fn attached<S: NbdStream>(
    io: Haggle<S>,
    n: Negotiated,
    shutdown: watch::Receiver<bool>,
    peer: &str,
    metrics: Arc<NbdMetrics>,
) -> Result<(), ConnError> {
    // A client may pipeline its first requests right behind GO: keep what
    // the handshake buffer already holds.
    let early = io.buffer().to_vec();
    let (rd, wr) = io.into_inner().into_inner().into_halves();
    let rd = BufReader::with_capacity(16 << 10, std::io::Cursor::new(early).chain(rd));
    let wr = BufWriter::with_capacity(64 << 10, wr);
    info!(%peer, export = %n.export.name, structured = n.structured, "client attached");
    let r = transmission(rd, wr, n, shutdown, metrics).await;
    debug!(%peer, "client detached");
    r
}

/// Resolves once the shutdown signal is true (or its sender is gone).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

async fn read_u32<R: AsyncRead + Unpin>(rd: &mut R) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    rd.read_exact(&mut b).await?;
    Ok(u32::from_be_bytes(b))
}

async fn send_opt_reply<W: AsyncWrite + Unpin>(
    wr: &mut W,
    option: u32,
    ty: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let mut b = Vec::with_capacity(proto::OPT_REPLY_HEADER_LEN + data.len());
    proto::encode_opt_reply(&mut b, option, ty, data);
    wr.write_all(&b).await
}

async fn send_opt_error<W: AsyncWrite + Unpin>(
    wr: &mut W,
    option: u32,
    ty: u32,
    msg: &str,
) -> std::io::Result<()> {
    send_opt_reply(wr, option, ty, msg.as_bytes()).await?;
    wr.flush().await
}

fn transmission_flags(export: &Export, structured: bool) -> u16 {
    let caps = export.target.capabilities();
    let mut f = tflags::HAS_FLAGS
        | tflags::SEND_FLUSH
        | tflags::SEND_FUA
        | tflags::CAN_MULTI_CONN
        | tflags::SEND_CACHE;
    if export.read_only || caps.read_only {
        f |= tflags::READ_ONLY;
    }
    if caps.trim {
        f |= tflags::SEND_TRIM;
    }
    if caps.write_zeroes {
        f |= tflags::SEND_WRITE_ZEROES;
        if caps.fast_zero {
            f |= tflags::SEND_FAST_ZERO;
        }
    }
    if structured {
        f |= tflags::SEND_DF;
    }
    f
}

/// Sends the greeting and reads the client's flags; returns whether the
/// client asked for NO_ZEROES (which shapes the EXPORT_NAME reply).
async fn greet<IO: AsyncRead + AsyncWrite + Unpin>(io: &mut IO) -> Result<bool, ConnError> {
    let mut greeting = Vec::new();
    proto::encode_greeting(
        &mut greeting,
        proto::handshake_flags::FIXED_NEWSTYLE | proto::handshake_flags::NO_ZEROES,
    );
    io.write_all(&greeting).await?;
    io.flush().await?;
    let cflags = read_u32(io).await?;
    let known = proto::client_flags::FIXED_NEWSTYLE | proto::client_flags::NO_ZEROES;
    if cflags & !known != 0 {
        return Err(ConnError::Protocol(format!(
            "unknown client flags {cflags:#x}"
        )));
    }
    Ok(cflags & proto::client_flags::NO_ZEROES != 0)
}

/// Runs option haggling until the client attaches, leaves, or (in
/// [`TlsState::Required`]) asks for STARTTLS.
async fn options<IO>(
    io: &mut IO,
    registry: &dyn ExportRegistry,
    tls: TlsState,
    no_zeroes: bool,
) -> Result<Haggled, ConnError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut structured = false;
    // (export name, base:allocation selected) from the last SET_META_CONTEXT.
    let mut meta: Option<(String, bool)> = None;

    loop {
        let mut hdr = [0u8; proto::OPTION_HEADER_LEN];
        io.read_exact(&mut hdr).await?;
        let h = proto::parse_option_header(&hdr)?;
        if h.len > MAX_OPTION_DATA {
            if h.len > MAX_OPTION_SKIP {
                return Err(ConnError::Protocol(format!(
                    "option data of {} bytes",
                    h.len
                )));
            }
            tokio::io::copy(&mut (&mut *io).take(h.len as u64), &mut tokio::io::sink()).await?;
            send_opt_error(io, h.code, rep::ERR_TOO_BIG, "option data too large").await?;
            continue;
        }
        let mut data = vec![0u8; h.len as usize];
        io.read_exact(&mut data).await?;
        let option = match proto::parse_option(h.code, &data) {
            Ok(o) => o,
            Err(e) if h.code == opt::EXPORT_NAME => {
                return Err(ConnError::Protocol(format!("bad EXPORT_NAME: {e}")));
            }
            Err(e) => {
                send_opt_error(io, h.code, rep::ERR_INVALID, &e.to_string()).await?;
                continue;
            }
        };
        if tls == TlsState::Required
            && !matches!(option, ClientOption::StartTls | ClientOption::Abort)
        {
            if h.code == opt::EXPORT_NAME {
                // EXPORT_NAME cannot be refused; hanging up is the answer.
                return Err(ConnError::Protocol("EXPORT_NAME before STARTTLS".into()));
            }
            let msg = "this node requires TLS: send NBD_OPT_STARTTLS first";
            send_opt_error(io, h.code, rep::ERR_TLS_REQD, msg).await?;
            continue;
        }
        match option {
            ClientOption::ExportName(name) => {
                let Some(export) = registry.open(&name) else {
                    // The spec leaves no way to refuse EXPORT_NAME but hanging up.
                    return Err(ConnError::Protocol(format!("unknown export {name:?}")));
                };
                let mut b = Vec::new();
                let flags = transmission_flags(&export, structured);
                proto::encode_export_name_reply(&mut b, export.target.size(), flags, no_zeroes);
                io.write_all(&b).await?;
                io.flush().await?;
                let base_allocation = matches!(&meta, Some((n, true)) if *n == name);
                return Ok(Haggled::Attach(Negotiated {
                    export,
                    structured,
                    base_allocation,
                }));
            }
            ClientOption::Abort => {
                // The client may already be gone; a failed ACK is fine.
                let _ = send_opt_error(io, h.code, rep::ACK, "").await;
                return Ok(Haggled::Left);
            }
            ClientOption::List => {
                for (name, desc) in registry.list() {
                    send_opt_reply(
                        io,
                        h.code,
                        rep::SERVER,
                        &proto::encode_rep_server(&name, &desc),
                    )
                    .await?;
                }
                send_opt_error(io, h.code, rep::ACK, "").await?;
            }
            ClientOption::StartTls => match tls {
                TlsState::Off => {
                    let msg = "TLS is not configured on this node";
                    send_opt_error(io, h.code, rep::ERR_POLICY, msg).await?;
                }
                TlsState::Required => {
                    send_opt_error(io, h.code, rep::ACK, "").await?;
                    return Ok(Haggled::StartTls);
                }
                TlsState::Active => {
                    let msg = "TLS is already on";
                    send_opt_error(io, h.code, rep::ERR_INVALID, msg).await?;
                }
            },
            ClientOption::StructuredReply => {
                if structured {
                    send_opt_error(
                        io,
                        h.code,
                        rep::ERR_INVALID,
                        "structured replies already on",
                    )
                    .await?;
                } else {
                    structured = true;
                    send_opt_error(io, h.code, rep::ACK, "").await?;
                }
            }
            ClientOption::Info(req) | ClientOption::Go(req) => {
                let go = h.code == opt::GO;
                let Some(export) = registry.open(&req.name) else {
                    let msg = format!("no volume named {:?} on this node", req.name);
                    send_opt_error(io, h.code, rep::ERR_UNKNOWN, &msg).await?;
                    continue;
                };
                let flags = transmission_flags(&export, structured);
                let items = [
                    proto::InfoItem::Export {
                        size: export.target.size(),
                        flags,
                    },
                    proto::InfoItem::BlockSize {
                        min: 1,
                        preferred: PREFERRED_BLOCK,
                        max: MAX_PAYLOAD,
                    },
                ];
                for item in &items {
                    send_opt_reply(io, h.code, rep::INFO, &item.encode()).await?;
                }
                for r in &req.requests {
                    let item = match *r {
                        proto::info::NAME => proto::InfoItem::Name(export.name.clone()),
                        proto::info::DESCRIPTION => {
                            proto::InfoItem::Description(export.description.clone())
                        }
                        _ => continue,
                    };
                    send_opt_reply(io, h.code, rep::INFO, &item.encode()).await?;
                }
                send_opt_error(io, h.code, rep::ACK, "").await?;
                if go {
                    let base_allocation = matches!(&meta, Some((n, true)) if *n == req.name);
                    return Ok(Haggled::Attach(Negotiated {
                        export,
                        structured,
                        base_allocation,
                    }));
                }
            }
            ClientOption::ListMetaContext(q) | ClientOption::SetMetaContext(q) => {
                let set = h.code == opt::SET_META_CONTEXT;
                if set && !structured {
                    send_opt_error(
                        io,
                        h.code,
                        rep::ERR_INVALID,
                        "SET_META_CONTEXT needs structured replies first",
                    )
                    .await?;
                    continue;
                }
                if registry.open(&q.export).is_none() {
                    let msg = format!("no volume named {:?} on this node", q.export);
                    send_opt_error(io, h.code, rep::ERR_UNKNOWN, &msg).await?;
                    continue;
                }
                let selected = if set {
                    q.queries.iter().any(|s| s == proto::BASE_ALLOCATION)
                } else {
                    q.queries.is_empty()
                        || q.queries
                            .iter()
                            .any(|s| s == proto::BASE_ALLOCATION || s == "base:")
                };
                if selected {
                    let d = proto::encode_rep_meta_context(
                        proto::BASE_ALLOCATION_ID,
                        proto::BASE_ALLOCATION,
                    );
                    send_opt_reply(io, h.code, rep::META_CONTEXT, &d).await?;
                }
                if set {
                    meta = Some((q.export, selected));
                }
                send_opt_error(io, h.code, rep::ACK, "").await?;
            }
            ClientOption::Unknown(code) => {
                let msg = format!("option {code} is not supported");
                send_opt_error(io, code, rep::ERR_UNSUP, &msg).await?;
            }
        }
    }
}

/// Shared, read-only state of one connection's transmission phase.
struct Conn {
    target: Arc<dyn BlockTarget>,
    size: u64,
    read_only: bool,
    structured: bool,
    base_allocation: bool,
    bulk_reads: bool,
    metrics: Arc<NbdMetrics>,
}

async fn transmission<R, W>(
    mut rd: BufReader<R>,
    wr: BufWriter<W>,
    n: Negotiated,
    mut shutdown: watch::Receiver<bool>,
    metrics: Arc<NbdMetrics>,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let caps = n.export.target.capabilities();
    let conn = Arc::new(Conn {
        size: n.export.target.size(),
        target: n.export.target.clone(),
        read_only: n.export.read_only || caps.read_only,
        structured: n.structured,
        base_allocation: n.base_allocation,
        bulk_reads: n.export.bulk_reads,
        metrics,
    });
    let _guard = n.export.guard;
    let sink = Arc::new(ReplySink::new(wr));
    let budget = Arc::new(Semaphore::new(IN_FLIGHT_BUDGET as usize));

    // Whether the connection ended by the protocol (NBD_CMD_DISC, after
    // which every request sent before it must still be handled) or by the
    // server stopping; otherwise the client is gone (EOF, an error).
    let mut orderly = false;
    let result = loop {
        let mut hdr = [0u8; proto::REQUEST_LEN];
        tokio::select! {
            biased;
            _ = stopped(&mut shutdown) => {
                orderly = true;
                break Ok(());
            }
            r = rd.read_exact(&mut hdr[..4]) => match r {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
                Err(e) => break Err(e.into()),
            },
        }
        // Check the magic before waiting for the rest of the header, so a
        // client speaking something else is dropped at once.
        if hdr[..4] != proto::REQUEST_MAGIC.to_be_bytes() {
            break Err(ConnError::Protocol(format!(
                "bad request magic {:02x?}",
                &hdr[..4]
            )));
        }
        if let Err(e) = rd.read_exact(&mut hdr[4..]).await {
            break Err(e.into());
        }
        if sink.is_broken() {
            break Ok(());
        }
        let req = match Request::parse(&hdr) {
            Ok(r) => r,
            Err(e) => break Err(e.into()),
        };
        if req.command == Command::Disc {
            orderly = true;
            break Ok(());
        }
        // Check the request before reading its payload, so that a bad WRITE
        // is drained (keeping the stream in sync) rather than buffered.
        let verdict = validate(&conn, &req);
        // Take the request's share of the budget before buffering anything
        // for it: its payload, then its reply until that is on the wire.
        let cost = match (&verdict, req.command) {
            (Ok(()), Command::Read | Command::Write) => {
                req.len.clamp(MIN_REQUEST_COST, IN_FLIGHT_BUDGET)
            }
            _ => MIN_REQUEST_COST,
        };
        let permit = budget
            .clone()
            .acquire_many_owned(cost)
            .await
            .expect("semaphore never closed");
        let payload = if req.command == Command::Write {
            if verdict.is_err() {
                let r =
                    tokio::io::copy(&mut (&mut rd).take(req.len as u64), &mut tokio::io::sink())
                        .await;
                if let Err(e) = r {
                    break Err(e.into());
                }
                None
            } else {
                let mut p = vec![0u8; req.len as usize];
                if let Err(e) = rd.read_exact(&mut p).await {
                    break Err(e.into());
                }
                Some(p)
            }
        } else {
            None
        };
        if let Err((code, msg)) = verdict {
            debug!(?req, code, msg, "request refused");
            conn.metrics.request_refused(req.command);
            sink.send(error_reply(&conn, &req, code, msg).into(), permit)
                .await;
            continue;
        }
        let task_conn = conn.clone();
        let task_sink = sink.clone();
        let arrived = Instant::now();
        let mut fut = Box::pin(async move {
            let reply = handle(&task_conn, req, payload).await;
            let bytes = if req.command == Command::Flush {
                0
            } else {
                req.len as u64
            };
            task_conn
                .metrics
                .request_done(req.command, bytes, arrived.elapsed());
            task_sink.send(reply, permit).await;
        });
        // Fast path: most requests to a local target complete on their first
        // poll (page-cache copies). Finish those right here; only requests
        // that really wait (fsync, a remote fetch) become tasks of their own,
        // so they complete, and reply, out of order. The first poll uses a
        // no-op waker: a pending request is handed to `tokio::spawn`, whose
        // own poll registers the real waker.
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if fut.as_mut().poll(&mut cx).is_pending() {
            tokio::spawn(fut);
        }
    };
    // A client that vanished may resend its unanswered requests on another
    // connection, then write on: one of them still waiting here to start
    // (a write waiting for the cluster lease) must not land after those.
    if !orderly {
        conn.target.client_gone();
    }
    // Let every accepted request finish and its reply go out (or be dropped,
    // if the client is gone).
    let _all = budget.acquire_many(IN_FLIGHT_BUDGET).await;
    sink.close().await;
    result
}

/// Where replies go. Writers take turns: a reply is queued, and whoever
/// finds the socket free drains the whole queue, then checks again after
/// letting go, so no reply is ever stranded in the queue.
///
/// Each reply travels with its request's budget permit, released only once
/// the reply is written (or dropped for a dead client): a client that stops
/// reading replies stops being read from, instead of making the queue grow.
struct ReplySink<W> {
    queue: std::sync::Mutex<Vec<(IoBuf, OwnedSemaphorePermit)>>,
    writer: tokio::sync::Mutex<BufWriter<W>>,
    broken: std::sync::atomic::AtomicBool,
}

impl<W: AsyncWrite + Unpin + Send> ReplySink<W> {
    fn new(wr: BufWriter<W>) -> Self {
        Self {
            queue: std::sync::Mutex::new(Vec::new()),
            writer: tokio::sync::Mutex::new(wr),
            broken: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether a write to the client has failed (the reader then stops).
    fn is_broken(&self) -> bool {
        self.broken.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn send(&self, reply: IoBuf, permit: OwnedSemaphorePermit) {
        self.queue.lock().unwrap().push((reply, permit));
        loop {
            {
                let Ok(mut w) = self.writer.try_lock() else {
                    // The current writer will pick our reply up.
                    return;
                };
                loop {
                    let batch = std::mem::take(&mut *self.queue.lock().unwrap());
                    if batch.is_empty() {
                        break;
                    }
                    if self.is_broken() {
                        continue; // drop replies to a dead client
                    }
                    let mut r = Ok(());
                    for (b, _) in &batch {
                        if r.is_ok() {
                            r = w.write_all(b).await;
                        }
                    }
                    if r.is_ok() {
                        r = w.flush().await;
                    }
                    // Only now, with the replies on the wire, do their
                    // buffers and budget permits go back.
                    for (b, _permit) in batch {
                        b.give();
                    }
                    if let Err(e) = r {
                        debug!("cannot send replies: {e}");
                        self.broken
                            .store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
            // A reply queued while we held the writer, whose sender saw it
            // busy, is ours to send.
            if self.queue.lock().unwrap().is_empty() {
                return;
            }
        }
    }

    async fn close(&self) {
        let mut w = self.writer.lock().await;
        let _ = w.flush().await;
        let _ = w.shutdown().await;
    }
}

type Refusal = (u32, &'static str);

/// Checks a request against the protocol and the export, without I/O.
fn validate(conn: &Conn, req: &Request) -> Result<(), Refusal> {
    let allowed = match req.command {
        Command::Read => {
            if conn.structured {
                cmd_flags::DF
            } else {
                0
            }
        }
        Command::Write => cmd_flags::FUA,
        Command::Trim => cmd_flags::FUA,
        Command::WriteZeroes => cmd_flags::FUA | cmd_flags::NO_HOLE | cmd_flags::FAST_ZERO,
        Command::BlockStatus => cmd_flags::REQ_ONE,
        Command::Flush | Command::Cache | Command::Disc => 0,
        Command::Unknown(_) => return Err((errno::EINVAL, "unknown command")),
    };
    // FUA is harmless on any command; clients (the Linux kernel) send it.
    if req.flags & !(allowed | cmd_flags::FUA) != 0 {
        return Err((errno::EINVAL, "unsupported command flags"));
    }
    let writes = matches!(
        req.command,
        Command::Write | Command::Trim | Command::WriteZeroes
    );
    if writes && conn.read_only {
        return Err((errno::EPERM, "export is read-only"));
    }
    if matches!(req.command, Command::Read | Command::Write) && req.len > MAX_PAYLOAD {
        let e = if conn.structured || req.command == Command::Write {
            errno::EOVERFLOW
        } else {
            errno::EINVAL
        };
        return Err((e, "request larger than the maximum block size"));
    }
    if req.command == Command::BlockStatus && !conn.base_allocation {
        return Err((errno::EINVAL, "no metadata context negotiated"));
    }
    if req.command != Command::Flush {
        let in_range = req
            .offset
            .checked_add(req.len as u64)
            .is_some_and(|end| end <= conn.size);
        if !in_range {
            let e = if matches!(req.command, Command::Write | Command::WriteZeroes) {
                errno::ENOSPC
            } else {
                errno::EINVAL
            };
            return Err((e, "request past the end of the volume"));
        }
        if req.len == 0
            && matches!(
                req.command,
                Command::BlockStatus | Command::Trim | Command::WriteZeroes
            )
        {
            return Err((errno::EINVAL, "zero-length request"));
        }
    }
    Ok(())
}

/// The reply refusing `req` with errno `code` (counted in the metrics).
fn error_reply(conn: &Conn, req: &Request, code: u32, msg: &str) -> Vec<u8> {
    conn.metrics.error(req.command, code);
    let mut b = Vec::with_capacity(64);
    if conn.structured {
        proto::encode_error_chunk(&mut b, req.cookie, code, msg);
    } else {
        proto::encode_simple_reply(&mut b, req.cookie, code);
    }
    b
}

fn block_error_reply(conn: &Conn, req: &Request, e: &BlockError) -> Vec<u8> {
    let cookie = req.cookie;
    let code = e.nbd_errno();
    if code == errno::EIO {
        warn!(cookie, "request failed: {e}");
    } else {
        debug!(cookie, "request failed: {e}");
    }
    error_reply(conn, req, code, &e.to_string())
}

fn ok_reply(cookie: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(proto::SIMPLE_REPLY_LEN);
    proto::encode_simple_reply(&mut b, cookie, 0);
    b
}

/// Carries out one validated request and returns its complete reply.
async fn handle(conn: &Conn, req: Request, payload: Option<Vec<u8>>) -> IoBuf {
    let t = &*conn.target;
    let fua = req.has(cmd_flags::FUA);
    let (off, len) = (req.offset, req.len as u64);
    let r = match req.command {
        Command::Read => return handle_read(conn, req).await,
        Command::Write => t.write(off, payload.as_deref().unwrap_or(&[]), fua).await,
        Command::Flush => t.flush().await,
        Command::Trim => t.trim(off, len, fua).await,
        Command::WriteZeroes => {
            let flags = ZeroFlags {
                no_hole: req.has(cmd_flags::NO_HOLE),
                fast: req.has(cmd_flags::FAST_ZERO),
                fua,
            };
            t.write_zeroes(off, len, flags).await
        }
        Command::Cache => t.cache(off, len).await,
        Command::BlockStatus => match t.block_status(off, len).await {
            Ok(mut ext) => {
                if req.has(cmd_flags::REQ_ONE) {
                    ext.truncate(1);
                }
                if ext.is_empty() {
                    return error_reply(conn, &req, errno::EIO, "target gave no extents").into();
                }
                let mut b = Vec::with_capacity(proto::CHUNK_HEADER_LEN + 4 + 8 * ext.len());
                proto::encode_block_status(&mut b, req.cookie, proto::BASE_ALLOCATION_ID, &ext);
                return b.into();
            }
            Err(e) => Err(e),
        },
        Command::Disc | Command::Unknown(_) => unreachable!("refused by validate"),
    };
    match r {
        Ok(()) => ok_reply(req.cookie),
        Err(e) => block_error_reply(conn, &req, &e),
    }
    .into()
}

/// A read reply's buffer: `lead` bytes of header, then `len` bytes the
/// target fills. Every byte is overwritten (the header by the caller, the
/// data by the target's read; on error the buffer is dropped unsent), so
/// it comes from the pool unzeroed. A bulk read gets its data aligned for
/// `O_DIRECT` and goes through [`BlockTarget::read_bulk`].
async fn read_reply(conn: &Conn, req: &Request, lead: usize) -> Result<IoBuf, BlockError> {
    let len = req.len as usize;
    if conn.bulk_reads && req.len >= BULK_READ_MIN {
        let b = IoBuf::aligned(lead + len, lead);
        let (b, r) = conn.target.read_bulk(req.offset, b, lead).await;
        return r.map(|()| b);
    }
    let mut b = IoBuf::unaligned(lead + len);
    conn.target.read(req.offset, &mut b[lead..]).await?;
    Ok(b)
}

async fn handle_read(conn: &Conn, req: Request) -> IoBuf {
    let len = req.len as usize;
    if !conn.structured {
        return match read_reply(conn, &req, proto::SIMPLE_REPLY_LEN).await {
            Ok(mut b) => {
                proto::write_simple_reply(&mut b, req.cookie, 0);
                b
            }
            Err(e) => block_error_reply(conn, &req, &e).into(),
        };
    }
    if len == 0 {
        let mut b = Vec::with_capacity(proto::CHUNK_HEADER_LEN);
        proto::encode_none_chunk(&mut b, req.cookie);
        return b.into();
    }
    let sparse = req.len >= SPARSE_READ_MIN
        && !req.has(cmd_flags::DF)
        && conn.target.capabilities().block_status;
    let extents = if sparse {
        conn.target.block_status(req.offset, len as u64).await.ok()
    } else {
        None
    };
    match extents {
        Some(ext) if ext.iter().any(|e| e.flags & proto::alloc_flags::ZERO != 0) => {
            sparse_read(conn, req, &ext).await.into()
        }
        _ => match read_reply(conn, &req, proto::OFFSET_DATA_PREFIX).await {
            Ok(mut b) => {
                proto::write_offset_data_prefix(&mut b, true, req.cookie, req.offset, req.len);
                b
            }
            Err(e) => block_error_reply(conn, &req, &e).into(),
        },
    }
}

/// A structured read whose zero extents are sent as `OFFSET_HOLE` chunks.
async fn sparse_read(conn: &Conn, req: Request, ext: &[Extent]) -> Vec<u8> {
    let end = req.offset + req.len as u64;
    // Extents may cover less than the request; read the rest as data.
    let mut pieces: Vec<(u64, u64, bool)> = Vec::new();
    let mut pos = req.offset;
    for e in ext {
        if pos >= end {
            break;
        }
        let n = (e.len as u64).min(end - pos);
        pieces.push((pos, n, e.flags & proto::alloc_flags::ZERO != 0));
        pos += n;
    }
    if pos < end {
        pieces.push((pos, end - pos, false));
    }
    let data_bytes: u64 = pieces.iter().filter(|p| !p.2).map(|p| p.1).sum();
    let mut b = Vec::with_capacity(data_bytes as usize + pieces.len() * 32);
    let last = pieces.len() - 1;
    for (i, (off, n, zero)) in pieces.into_iter().enumerate() {
        let done = i == last;
        if zero {
            proto::encode_offset_hole(&mut b, done, req.cookie, off, n as u32);
        } else {
            let at = b.len();
            b.resize(at + proto::OFFSET_DATA_PREFIX + n as usize, 0);
            proto::write_offset_data_prefix(&mut b[at..], done, req.cookie, off, n as u32);
            if let Err(e) = conn
                .target
                .read(off, &mut b[at + proto::OFFSET_DATA_PREFIX..])
                .await
            {
                return block_error_reply(conn, &req, &e);
            }
        }
    }
    b
}

#[cfg(test)]
mod bulk_read_tests {
    use super::*;
    use crate::nbd::client::NbdClient;
    use crate::target::LocalTarget;

    /// One file, two exports: `vm` as a guest sees it, `vm@origin` with
    /// bulk reads (what a destination's origin link gets).
    struct Two(Arc<dyn BlockTarget>);

    impl ExportRegistry for Two {
        fn list(&self) -> Vec<(String, String)> {
            vec![]
        }
        fn open(&self, name: &str) -> Option<Export> {
            let bulk = match name {
                "vm" => false,
                "vm@origin" => true,
                _ => return None,
            };
            Some(Export {
                name: name.into(),
                description: String::new(),
                target: self.0.clone(),
                read_only: bulk,
                bulk_reads: bulk,
                guard: Box::new(()),
            })
        }
    }

    async fn connect(reg: Arc<dyn ExportRegistry>, name: &str) -> NbdClient {
        let (server_end, client_end) = tokio::io::duplex(1 << 20);
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(async move {
            let _stop = stop;
            let _ = serve_connection(
                server_end,
                reg,
                HandshakePolicy::plain(),
                stop_rx,
                "test".into(),
                Default::default(),
            )
            .await;
        });
        NbdClient::handshake(client_end, name, false).await.unwrap()
    }

    /// The source keeps taking guest writes (buffered, not flushed) while
    /// the origin link serves large reads around the page cache: every
    /// read, aligned or not, must return what the guest wrote last.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn origin_link_bulk_reads_see_unflushed_guest_writes() {
        let dir = tempfile::tempdir().unwrap();
        let t: Arc<dyn BlockTarget> =
            Arc::new(LocalTarget::create(&dir.path().join("d.raw"), 16 << 20).unwrap());
        let reg: Arc<dyn ExportRegistry> = Arc::new(Two(t));
        let guest = connect(reg.clone(), "vm").await;
        let origin = connect(reg, "vm@origin").await;
        let mut model = vec![0u8; 8 << 20];
        for round in 1..=4u8 {
            // The guest rewrites the first 8 MiB, in pieces of odd sizes.
            let mut off = 0usize;
            let mut k = 0usize;
            while off < model.len() {
                let n = [65536, 4096 + 512, 1 << 20, 12345][k % 4].min(model.len() - off);
                let d: Vec<u8> = (0..n)
                    .map(|i| (i as u8).wrapping_mul(round) ^ (k as u8) | 1)
                    .collect();
                guest.write(off as u64, &d, false).await.unwrap();
                model[off..off + n].copy_from_slice(&d);
                off += n;
                k += 1;
            }
            for (o, l) in [
                (0u64, 1u32 << 20),
                (4096, 4 << 20),
                (512, (1 << 20) + 512),
                (3 << 20, 5 << 20),
            ] {
                let got = origin.read(o, l).await.unwrap();
                assert!(
                    got[..] == model[o as usize..o as usize + l as usize],
                    "round {round}: bulk read of {l} at {o} is stale"
                );
                let got = origin.read_aligned(o, l).await.unwrap();
                assert!(got[..] == model[o as usize..o as usize + l as usize]);
            }
        }
    }
}
