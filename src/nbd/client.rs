//! An NBD client: how one node reads another node's export.
//!
//! It negotiates fixed newstyle, structured replies and `base:allocation`,
//! then pipelines requests: any number of tasks may call it at once; each
//! request gets a cookie, a background reader task matches replies to
//! cookies and wakes the caller. The client is used by the `remote` target
//! (migration origin) and by the CLI to upload a file into a volume.
//!
//! Every reply is checked: data outside the requested range, unknown
//! cookies, or malformed chunks end the connection with
//! [`ClientError::Protocol`], and every waiting request fails with it.
//! Dropping the last handle closes the connection and fails what was pending.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::oneshot;

use super::proto::{self, cmd_flags, opt, rep, tflags, Command, Extent, ReplyHeader, Request};
use crate::bufpool::IoBuf;

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    Tcp(String),
    Unix(PathBuf),
}

impl std::str::FromStr for NbdAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(NbdAddr::Unix(PathBuf::from(p)));
        }
        if s.rsplit_once(':')
            .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            return Err(format!("{s:?} is not HOST:PORT or unix:PATH"));
        }
        Ok(NbdAddr::Tcp(s.to_owned()))
    }
}

impl std::fmt::Display for NbdAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdAddr::Tcp(a) => write!(f, "{a}"),
            NbdAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Errors of the client boundary.
#[derive(Debug, thiserror::Error, Clone)]
pub enum ClientError {
    #[error("connection to NBD server failed: {0}")]
    Io(String),
    #[error("NBD server broke the protocol: {0}")]
    Protocol(String),
    #[error("NBD server refused option {option}: {message} (reply {reply:#x})")]
    Refused {
        option: u32,
        reply: u32,
        message: String,
    },
    #[error("NBD server returned errno {errno}: {message}")]
    Server { errno: u32, message: String },
    #[error("NBD connection closed")]
    Closed,
    #[error("TLS: {0}")]
    Tls(String),
}

impl From<std::io::Error> for ClientError {
    fn from(e: std::io::Error) -> Self {
        ClientError::Io(e.to_string())
    }
}

impl From<proto::ProtoError> for ClientError {
    fn from(e: proto::ProtoError) -> Self {
        ClientError::Protocol(e.to_string())
    }
}

type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// A request waiting for its reply.
struct Pending {
    offset: u64,
    /// For READ: the destination buffer. It comes from the pool unzeroed;
    /// `covered` says which parts the reply filled, and the rest is zeroed
    /// at the end, so no byte of an earlier use of the buffer is ever
    /// returned. A reply whose data and holes leave a gap is an error.
    buf: Option<IoBuf>,
    /// Byte ranges of `buf` (relative) filled by data chunks.
    covered: Vec<(usize, usize)>,
    /// Byte ranges of `buf` (relative) the reply called holes. A reply
    /// claiming success must cover the request with data and holes.
    holes: Vec<(usize, usize)>,
    extents: Vec<Extent>,
    error: Option<ClientError>,
    tx: oneshot::Sender<Result<Done, ClientError>>,
}

/// A completed request's result.
struct Done {
    data: Option<IoBuf>,
    extents: Vec<Extent>,
}

struct Inner {
    writer: tokio::sync::Mutex<Writer>,
    pending: Mutex<HashMap<u64, Pending>>,
    /// Set once the connection is dead; new requests fail with it.
    dead: Mutex<Option<ClientError>>,
    next_cookie: AtomicU64,
}

/// A connected NBD client. Cheap to clone; all clones share the connection.
#[derive(Clone)]
pub struct NbdClient {
    inner: Arc<Inner>,
    size: u64,
    flags: u16,
    structured: bool,
    base_allocation: bool,
    /// Held only so the reader task stops with the last handle.
    _reader: Arc<ReaderHandle>,
}

/// Aborts the reader task when the last client handle goes away.
struct ReaderHandle(tokio::task::JoinHandle<()>);
impl Drop for ReaderHandle {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl NbdClient {
    /// Connects to `addr` and attaches to `export`, in plain text.
    pub async fn connect(addr: &NbdAddr, export: &str) -> Result<Self, ClientError> {
        Self::connect_with(addr, export, None).await
    }

    /// Connects to `addr` and attaches to `export`; with `tls`, upgrades
    /// with NBD_OPT_STARTTLS first and verifies the server's certificate
    /// against the address's host name (or IP).
    pub async fn connect_with(
        addr: &NbdAddr,
        export: &str,
        tls: Option<&tokio_rustls::TlsConnector>,
    ) -> Result<Self, ClientError> {
        match addr {
            NbdAddr::Tcp(a) => {
                let s = tokio::net::TcpStream::connect(a).await?;
                s.set_nodelay(true)?;
                match tls {
                    Some(c) => {
                        let name = crate::tls::server_name(a)
                            .map_err(|e| ClientError::Tls(e.to_string()))?;
                        let s = Self::start_tls(s, c, name).await?;
                        Self::handshake(s, export, true).await
                    }
                    None => Self::handshake(s, export, false).await,
                }
            }
            NbdAddr::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p).await?;
                match tls {
                    Some(c) => {
                        let name = rustls::pki_types::ServerName::try_from("localhost")
                            .expect("static name");
                        let s = Self::start_tls(s, c, name).await?;
                        Self::handshake(s, export, true).await
                    }
                    None => Self::handshake(s, export, false).await,
                }
            }
        }
    }

    /// Greets, asks for STARTTLS and runs the TLS handshake; the returned
    /// stream continues option haggling (with `greeted = true`).
    async fn start_tls<S>(
        mut stream: S,
        connector: &tokio_rustls::TlsConnector,
        name: rustls::pki_types::ServerName<'static>,
    ) -> Result<tokio_rustls::client::TlsStream<S>, ClientError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        greet(&mut stream).await?;
        let (mut rd, mut wr) = tokio::io::split(stream);
        option(&mut rd, &mut wr, opt::STARTTLS, &[]).await?;
        let stream = rd.unsplit(wr);
        connector
            .connect(name, stream)
            .await
            .map_err(|e| ClientError::Tls(e.to_string()))
    }

    /// Runs the handshake over an established stream (`greeted`: the
    /// greeting was already exchanged, as before STARTTLS).
    pub async fn handshake<S>(
        mut stream: S,
        export: &str,
        greeted: bool,
    ) -> Result<Self, ClientError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        if !greeted {
            greet(&mut stream).await?;
        }
        let (rd, mut wr) = tokio::io::split(stream);
        let mut rd = BufReader::with_capacity(256 << 10, rd);

        let structured = match option(&mut rd, &mut wr, opt::STRUCTURED_REPLY, &[]).await {
            Ok(_) => true,
            Err(ClientError::Refused { .. }) => false,
            Err(e) => return Err(e),
        };
        let mut base_allocation = false;
        if structured {
            let q = proto::MetaContextQuery {
                export: export.to_owned(),
                queries: vec![proto::BASE_ALLOCATION.to_owned()],
            };
            if let Ok(replies) = option(&mut rd, &mut wr, opt::SET_META_CONTEXT, &q.encode()).await
            {
                base_allocation = replies.iter().any(|(t, d)| {
                    *t == rep::META_CONTEXT
                        && proto::parse_rep_meta_context(d)
                            .is_ok_and(|(_, n)| n == proto::BASE_ALLOCATION)
                });
            }
        }
        let go = proto::InfoRequest {
            name: export.to_owned(),
            requests: vec![proto::info::BLOCK_SIZE],
        };
        let replies = option(&mut rd, &mut wr, opt::GO, &go.encode()).await?;
        let mut export_info = None;
        for (t, d) in &replies {
            if *t == rep::INFO {
                if let proto::InfoItem::Export { size, flags } = proto::InfoItem::parse(d)? {
                    export_info = Some((size, flags));
                }
            }
        }
        let (size, flags) = export_info
            .ok_or_else(|| ClientError::Protocol("GO without NBD_INFO_EXPORT".into()))?;
        let inner = Arc::new(Inner {
            writer: tokio::sync::Mutex::new(Box::new(wr)),
            pending: Mutex::new(HashMap::new()),
            dead: Mutex::new(None),
            next_cookie: AtomicU64::new(1),
        });
        let reader = tokio::spawn(read_replies(rd, inner.clone()));
        Ok(Self {
            inner,
            size,
            flags,
            structured,
            base_allocation,
            _reader: Arc::new(ReaderHandle(reader)),
        })
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Transmission flags the server advertised.
    pub fn flags(&self) -> u16 {
        self.flags
    }
    /// Whether the server will answer `block_status`.
    pub fn has_block_status(&self) -> bool {
        self.base_allocation
    }
    /// Whether the export is read-only.
    pub fn is_read_only(&self) -> bool {
        self.flags & tflags::READ_ONLY != 0
    }
    /// Declares the connection dead (the caller gave up waiting on it, as
    /// on a link that silently stopped delivering): new requests fail at
    /// once, and a pool holding it will replace it.
    pub fn mark_dead(&self, why: &str) {
        let mut d = self.inner.dead.lock().unwrap();
        if d.is_none() {
            *d = Some(ClientError::Io(why.to_owned()));
        }
    }

    /// Whether the connection has failed.
    pub fn is_dead(&self) -> bool {
        self.inner.dead.lock().unwrap().is_some()
    }

    async fn submit(
        &self,
        command: Command,
        flags: u16,
        offset: u64,
        len: u32,
        payload: Option<&[u8]>,
    ) -> Result<Done, ClientError> {
        self.submit_with(command, flags, offset, len, payload, None)
            .await
    }

    async fn submit_with(
        &self,
        command: Command,
        flags: u16,
        offset: u64,
        len: u32,
        payload: Option<&[u8]>,
        buf: Option<IoBuf>,
    ) -> Result<Done, ClientError> {
        if let Some(e) = self.inner.dead.lock().unwrap().clone() {
            return Err(e);
        }
        let cookie = self.inner.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let buf = match buf {
            Some(b) => Some(b),
            None => (command == Command::Read).then(|| IoBuf::unaligned(len as usize)),
        };
        self.inner.pending.lock().unwrap().insert(
            cookie,
            Pending {
                offset,
                buf,
                covered: Vec::new(),
                holes: Vec::new(),
                extents: Vec::new(),
                error: None,
                tx,
            },
        );
        let req = Request {
            flags,
            command,
            cookie,
            offset,
            len,
        };
        let mut hdr = Vec::with_capacity(proto::REQUEST_LEN);
        req.encode(&mut hdr);
        let sent = async {
            let mut w = self.inner.writer.lock().await;
            w.write_all(&hdr).await?;
            if let Some(p) = payload {
                w.write_all(p).await?;
            }
            w.flush().await
        }
        .await;
        if let Err(e) = sent {
            self.inner.pending.lock().unwrap().remove(&cookie);
            let e = ClientError::from(e);
            fail_all(&self.inner, e.clone());
            return Err(e);
        }
        rx.await.map_err(|_| ClientError::Closed)?
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, ClientError> {
        let d = self.submit(Command::Read, 0, offset, len, None).await?;
        d.data
            .map(IoBuf::into_vec)
            .ok_or_else(|| ClientError::Protocol("read without data".into()))
    }

    /// Reads `len` bytes at `offset` into a buffer aligned for `O_DIRECT`
    /// (see [`IoBuf::aligned`]), so the caller can write it to disk without
    /// the page cache.
    pub async fn read_aligned(&self, offset: u64, len: u32) -> Result<IoBuf, ClientError> {
        let buf = IoBuf::aligned(len as usize, 0);
        let d = self
            .submit_with(Command::Read, 0, offset, len, None, Some(buf))
            .await?;
        d.data
            .ok_or_else(|| ClientError::Protocol("read without data".into()))
    }

    /// Writes `data` at `offset`.
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError> {
        let flags = if fua { cmd_flags::FUA } else { 0 };
        self.submit(Command::Write, flags, offset, data.len() as u32, Some(data))
            .await
            .map(drop)
    }

    /// Makes completed writes durable on the server.
    pub async fn flush(&self) -> Result<(), ClientError> {
        self.submit(Command::Flush, 0, 0, 0, None).await.map(drop)
    }

    /// Discards a range.
    pub async fn trim(&self, offset: u64, len: u32) -> Result<(), ClientError> {
        self.submit(Command::Trim, 0, offset, len, None)
            .await
            .map(drop)
    }

    /// Writes zeroes (punching holes unless `no_hole`).
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        no_hole: bool,
    ) -> Result<(), ClientError> {
        let flags = if no_hole { cmd_flags::NO_HOLE } else { 0 };
        self.submit(Command::WriteZeroes, flags, offset, len, None)
            .await
            .map(drop)
    }

    /// `base:allocation` extents starting at `offset`.
    pub async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, ClientError> {
        if !self.base_allocation {
            return Err(ClientError::Protocol(
                "base:allocation was not negotiated".into(),
            ));
        }
        let d = self
            .submit(Command::BlockStatus, 0, offset, len, None)
            .await?;
        if d.extents.is_empty() {
            return Err(ClientError::Protocol("block status without extents".into()));
        }
        Ok(d.extents)
    }

    /// Sends NBD_CMD_DISC; the server closes after answering what is pending.
    pub async fn disconnect(&self) -> Result<(), ClientError> {
        let req = Request {
            flags: 0,
            command: Command::Disc,
            cookie: 0,
            offset: 0,
            len: 0,
        };
        let mut hdr = Vec::new();
        req.encode(&mut hdr);
        let mut w = self.inner.writer.lock().await;
        w.write_all(&hdr).await?;
        w.flush().await?;
        Ok(())
    }

    /// Whether structured replies were negotiated.
    pub fn is_structured(&self) -> bool {
        self.structured
    }
}

/// Sends one option and collects its replies up to the final one. Error
/// replies become [`ClientError::Refused`].
/// Reads the server's greeting and answers with our flags.
async fn greet<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<(), ClientError> {
    let mut g = [0u8; 18];
    s.read_exact(&mut g).await?;
    let hflags = proto::parse_greeting(&g)?;
    if hflags & proto::handshake_flags::FIXED_NEWSTYLE == 0 {
        return Err(ClientError::Protocol("server lacks fixed newstyle".into()));
    }
    let mut cflags = proto::client_flags::FIXED_NEWSTYLE;
    if hflags & proto::handshake_flags::NO_ZEROES != 0 {
        cflags |= proto::client_flags::NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes()).await?;
    Ok(())
}

async fn option<R, W>(
    rd: &mut R,
    wr: &mut W,
    code: u32,
    data: &[u8],
) -> Result<Vec<(u32, Vec<u8>)>, ClientError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut b = Vec::new();
    proto::encode_option(&mut b, code, data);
    wr.write_all(&b).await?;
    wr.flush().await?;
    let mut replies = Vec::new();
    loop {
        let mut h = [0u8; proto::OPT_REPLY_HEADER_LEN];
        rd.read_exact(&mut h).await?;
        let h = proto::parse_opt_reply_header(&h)?;
        if h.option != code {
            return Err(ClientError::Protocol(format!(
                "reply to option {} while waiting for {code}",
                h.option
            )));
        }
        if h.len > 1 << 20 {
            return Err(ClientError::Protocol(format!(
                "option reply of {} bytes",
                h.len
            )));
        }
        let mut d = vec![0u8; h.len as usize];
        rd.read_exact(&mut d).await?;
        if rep::is_error(h.reply_type) {
            return Err(ClientError::Refused {
                option: code,
                reply: h.reply_type,
                message: String::from_utf8_lossy(&d).into_owned(),
            });
        }
        if h.reply_type == rep::ACK {
            return Ok(replies);
        }
        replies.push((h.reply_type, d));
    }
}

fn fail_all(inner: &Inner, e: ClientError) {
    inner.dead.lock().unwrap().get_or_insert(e.clone());
    let drained: Vec<Pending> = inner
        .pending
        .lock()
        .unwrap()
        .drain()
        .map(|(_, p)| p)
        .collect();
    for p in drained {
        let _ = p.tx.send(Err(e.clone()));
    }
}

async fn read_replies<R: AsyncRead + Unpin>(mut rd: R, inner: Arc<Inner>) {
    let e = match read_loop(&mut rd, &inner).await {
        Ok(()) => ClientError::Closed,
        Err(e) => e,
    };
    fail_all(&inner, e);
}

async fn read_loop<R: AsyncRead + Unpin>(rd: &mut R, inner: &Inner) -> Result<(), ClientError> {
    loop {
        let mut hdr = [0u8; proto::CHUNK_HEADER_LEN];
        match rd.read_exact(&mut hdr[..4]).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let magic = u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let rest = proto::reply_header_rest(magic)?;
        rd.read_exact(&mut hdr[4..4 + rest]).await?;
        match proto::parse_reply_header(&hdr[..4 + rest])? {
            ReplyHeader::Simple { error, cookie } => {
                let mut p = take_pending(inner, cookie)?;
                if error != 0 {
                    let _ = p.tx.send(Err(ClientError::Server {
                        errno: error,
                        message: String::new(),
                    }));
                    continue;
                }
                if let Some(buf) = p.buf.as_mut() {
                    rd.read_exact(buf).await?;
                }
                let _ = p.tx.send(Ok(Done {
                    data: p.buf,
                    extents: Vec::new(),
                }));
            }
            ReplyHeader::Structured {
                flags,
                ty,
                cookie,
                len,
            } => {
                let done = flags & proto::chunk::FLAG_DONE != 0;
                read_chunk(rd, inner, cookie, ty, len).await?;
                if done {
                    let mut p = take_pending(inner, cookie)?;
                    if let Some(b) = p.buf.as_mut() {
                        zero_uncovered(b, &mut p.covered);
                        // The spec: a reply without an error chunk MUST
                        // cover the whole request; what no content chunk
                        // covers is not valid. Zeros there would be data
                        // invented here (a destination would punch those
                        // regions and mark them present).
                        let mut all = std::mem::take(&mut p.covered);
                        all.append(&mut p.holes);
                        let got = covered_prefix(&mut all);
                        if p.error.is_none() && got < b.len() {
                            p.error = Some(ClientError::Protocol(format!(
                                "read reply covers {got} of {} bytes",
                                b.len()
                            )));
                        }
                    }
                    let r = match p.error {
                        Some(e) => Err(e),
                        None => Ok(Done {
                            data: p.buf,
                            extents: p.extents,
                        }),
                    };
                    let _ = p.tx.send(r);
                }
            }
        }
    }
}

/// Most separate data pieces one read reply may arrive in (dlsm's server
/// sends at most one per extent, 1024).
const MAX_PIECES: usize = 4096;

/// Sorts and merges overlapping or touching ranges.
fn merge_ranges(r: &mut Vec<(usize, usize)>) {
    r.sort_unstable();
    let mut out: Vec<(usize, usize)> = Vec::with_capacity(r.len());
    for &(a, b) in r.iter() {
        match out.last_mut() {
            Some(l) if a <= l.1 => l.1 = l.1.max(b),
            _ => out.push((a, b)),
        }
    }
    *r = out;
}

/// How far from 0 the ranges cover without a gap (sorted here).
fn covered_prefix(r: &mut Vec<(usize, usize)>) -> usize {
    merge_ranges(r);
    match r.first() {
        Some(&(0, b)) => b,
        _ => 0,
    }
}

/// Zeroes every byte of `buf` outside the ranges in `covered` (sorted
/// here): the holes of a structured read, in as few fills as there are
/// gaps.
fn zero_uncovered(buf: &mut [u8], covered: &mut [(usize, usize)]) {
    covered.sort_unstable();
    let mut pos = 0;
    for &(a, b) in covered.iter() {
        if a > pos {
            buf[pos..a].fill(0);
        }
        pos = pos.max(b);
    }
    if pos < buf.len() {
        buf[pos..].fill(0);
    }
}

fn take_pending(inner: &Inner, cookie: u64) -> Result<Pending, ClientError> {
    inner
        .pending
        .lock()
        .unwrap()
        .remove(&cookie)
        .ok_or_else(|| ClientError::Protocol(format!("reply for unknown cookie {cookie}")))
}

/// Reads one structured chunk's payload into the pending request.
async fn read_chunk<R: AsyncRead + Unpin>(
    rd: &mut R,
    inner: &Inner,
    cookie: u64,
    ty: u16,
    len: u32,
) -> Result<(), ClientError> {
    if ty == proto::chunk::OFFSET_DATA {
        if len < 9 {
            return Err(ClientError::Protocol("short OFFSET_DATA chunk".into()));
        }
        let mut o = [0u8; 8];
        rd.read_exact(&mut o).await?;
        let offset = u64::from_be_bytes(o);
        let n = (len - 8) as usize;
        // Take the buffer out so no lock is held across the socket read.
        let (req_off, mut buf) = {
            let mut pend = inner.pending.lock().unwrap();
            let p = pend.get_mut(&cookie).ok_or_else(|| {
                ClientError::Protocol(format!("data for unknown cookie {cookie}"))
            })?;
            (p.offset, p.buf.take())
        };
        let b = buf
            .as_mut()
            .ok_or_else(|| ClientError::Protocol("data chunk for a non-read".into()))?;
        let start = offset
            .checked_sub(req_off)
            .filter(|s| s.checked_add(n as u64).is_some_and(|e| e <= b.len() as u64))
            .ok_or_else(|| ClientError::Protocol("data chunk outside the request".into()))?
            as usize;
        rd.read_exact(&mut b[start..start + n]).await?;
        if let Some(p) = inner.pending.lock().unwrap().get_mut(&cookie) {
            p.buf = buf;
            p.covered.push((start, start + n));
            if p.covered.len() > MAX_PIECES {
                merge_ranges(&mut p.covered);
                if p.covered.len() > MAX_PIECES {
                    return Err(ClientError::Protocol(
                        "read reply in too many pieces".into(),
                    ));
                }
            }
        }
        return Ok(());
    }
    if len > 1 << 20 {
        return Err(ClientError::Protocol(format!("chunk of {len} bytes")));
    }
    let mut payload = vec![0u8; len as usize];
    rd.read_exact(&mut payload).await?;
    let c = proto::parse_chunk(ty, &payload)?;
    let mut pend = inner.pending.lock().unwrap();
    let p = pend
        .get_mut(&cookie)
        .ok_or_else(|| ClientError::Protocol(format!("chunk for unknown cookie {cookie}")))?;
    match c {
        proto::Chunk::None | proto::Chunk::Unknown(_) | proto::Chunk::OffsetData { .. } => {}
        proto::Chunk::OffsetHole { offset, len } => {
            // Checked: a hostile server picks offsets near u64::MAX.
            let fits = p.buf.as_ref().is_some_and(|b| {
                offset
                    .checked_sub(p.offset)
                    .and_then(|s| s.checked_add(len as u64))
                    .is_some_and(|e| e <= b.len() as u64)
            });
            if !fits {
                return Err(ClientError::Protocol(
                    "hole chunk outside the request".into(),
                ));
            }
            // Left out of `covered`: zeroed when the reply is done.
            let start = (offset - p.offset) as usize;
            p.holes.push((start, start + len as usize));
            if p.holes.len() > MAX_PIECES {
                merge_ranges(&mut p.holes);
                if p.holes.len() > MAX_PIECES {
                    return Err(ClientError::Protocol(
                        "read reply in too many pieces".into(),
                    ));
                }
            }
        }
        proto::Chunk::BlockStatus { extents, .. } => p.extents = extents,
        proto::Chunk::Error { error, msg, .. } => {
            p.error = Some(ClientError::Server {
                errno: error,
                message: msg,
            })
        }
    }
    Ok(())
}

#[cfg(test)]
mod hostile_server_tests {
    use super::*;

    #[test]
    fn uncovered_bytes_are_zeroed() {
        let mut b = vec![9u8; 100];
        let mut cov = vec![(50, 60), (0, 10), (5, 20), (90, 95)];
        zero_uncovered(&mut b, &mut cov);
        for (i, x) in b.iter().enumerate() {
            let kept = i < 20 || (50..60).contains(&i) || (90..95).contains(&i);
            assert_eq!(*x, if kept { 9 } else { 0 }, "byte {i}");
        }
        let mut r = vec![(5, 9), (0, 3), (3, 4), (20, 30), (8, 12)];
        merge_ranges(&mut r);
        assert_eq!(r, vec![(0, 4), (5, 12), (20, 30)]);
    }

    fn rep(out: &mut Vec<u8>, option: u32, ty: u32, data: &[u8]) {
        proto::encode_opt_reply(out, option, ty, data);
    }

    /// A handshake that attaches with structured replies on.
    fn handshake_bytes() -> Vec<u8> {
        let mut b = Vec::new();
        proto::encode_greeting(&mut b, proto::handshake_flags::FIXED_NEWSTYLE);
        rep(&mut b, opt::STRUCTURED_REPLY, rep::ACK, &[]);
        rep(&mut b, opt::SET_META_CONTEXT, rep::ACK, &[]);
        let info = proto::InfoItem::Export {
            size: 1 << 20,
            flags: tflags::HAS_FLAGS,
        };
        rep(&mut b, opt::GO, rep::INFO, &info.encode());
        rep(&mut b, opt::GO, rep::ACK, &[]);
        b
    }

    /// Read buffers come from the pool unzeroed: every byte of a hole must
    /// read as zero, never as what the pooled buffer held before, and a
    /// reply that claims success without covering the whole request (a
    /// gap, a short chunk) is an error, not zeros; for plain and aligned
    /// reads alike.
    #[tokio::test]
    async fn reused_read_buffers_never_leak_old_bytes() {
        const LEN: usize = 1 << 20;
        fn data(b: &mut Vec<u8>, cookie: u64, off: u64, bytes: &[u8], done: bool) {
            let flags = if done { proto::chunk::FLAG_DONE } else { 0 };
            proto::encode_chunk_header(
                b,
                flags,
                proto::chunk::OFFSET_DATA,
                cookie,
                8 + bytes.len() as u32,
            );
            b.extend_from_slice(&off.to_be_bytes());
            b.extend_from_slice(bytes);
        }
        fn hole(b: &mut Vec<u8>, cookie: u64, off: u64, len: u32) {
            proto::encode_chunk_header(b, 0, proto::chunk::OFFSET_HOLE, cookie, 12);
            b.extend_from_slice(&off.to_be_bytes());
            b.extend_from_slice(&len.to_be_bytes());
        }
        fn none_done(b: &mut Vec<u8>, cookie: u64) {
            proto::encode_chunk_header(b, proto::chunk::FLAG_DONE, proto::chunk::NONE, cookie, 0);
        }
        for aligned in [false, true] {
            // Poison the pool with buffers big enough for the reads below.
            for _ in 0..8 {
                crate::bufpool::give(vec![0xAA; LEN + 2 * crate::bufpool::IO_ALIGN]);
            }
            // One connection per reply (each request is cookie 1).
            let conn = |reply: Vec<u8>| async move {
                let (client_end, mut server_end) = tokio::io::duplex(4 << 20);
                let mut b = handshake_bytes();
                b.extend_from_slice(&reply);
                server_end.write_all(&b).await.unwrap();
                let c = NbdClient::handshake(client_end, "x", false).await.unwrap();
                (c, server_end)
            };
            let get = |c: NbdClient| async move {
                if aligned {
                    c.read_aligned(0, LEN as u32).await.map(|v| v.to_vec())
                } else {
                    c.read(0, LEN as u32).await
                }
            };
            // 1: data, hole, data, hole, then NONE+DONE.
            let mut b = Vec::new();
            data(&mut b, 1, 0, &[0x11; 4096], false);
            hole(&mut b, 1, 4096, 8192);
            data(&mut b, 1, 12288, &[0x22; 4096], false);
            hole(&mut b, 1, 16384, (LEN - 16384) as u32);
            none_done(&mut b, 1);
            let (c, _s) = conn(b).await;
            let r1 = get(c).await.unwrap();
            assert_eq!(r1.len(), LEN);
            for (i, x) in r1.iter().enumerate() {
                let want = match i {
                    0..4096 => 0x11,
                    12288..16384 => 0x22,
                    _ => 0,
                };
                assert_eq!(*x, want, "aligned {aligned}: byte {i} of read 1");
            }
            // 2: an error chunk after partial data (must be an error).
            let mut b = Vec::new();
            data(&mut b, 1, 0, &[0x33; 100], false);
            proto::encode_chunk_header(&mut b, proto::chunk::FLAG_DONE, proto::chunk::ERROR, 1, 6);
            b.extend_from_slice(&5u32.to_be_bytes());
            b.extend_from_slice(&0u16.to_be_bytes());
            let (c, _s) = conn(b).await;
            assert!(get(c).await.is_err(), "error chunk ignored");
            // 3: a "successful" reply that leaves most of the read out (one
            // short data chunk with DONE, or data and a hole with a gap
            // between). The spec: the server MUST cover the whole request
            // when it reports no error, and what no content chunk covers is
            // not valid. Returning zeros for it would have the destination
            // punch those regions and mark them present: silent data loss.
            let mut b = Vec::new();
            data(&mut b, 1, 10, &[0x44; 7], true);
            let (c, _s) = conn(b).await;
            let r = get(c).await;
            assert!(
                matches!(r, Err(ClientError::Protocol(_))),
                "an incomplete read reply was accepted: {:?}",
                r.map(|v| v.len())
            );
            let mut b = Vec::new();
            data(&mut b, 1, 0, &[0x55; 4096], false);
            hole(&mut b, 1, 8192, (LEN - 8192) as u32);
            none_done(&mut b, 1);
            let (c, _s) = conn(b).await;
            let r = get(c).await;
            assert!(
                matches!(r, Err(ClientError::Protocol(_))),
                "a read reply with a gap was accepted: {:?}",
                r.map(|v| v.len())
            );
            // Fully covered (data, hole, data): accepted.
            let mut b = Vec::new();
            data(&mut b, 1, 0, &[0x66; 4096], false);
            hole(&mut b, 1, 4096, (LEN - 8192) as u32);
            data(&mut b, 1, (LEN - 4096) as u64, &[0x77; 4096], true);
            let (c, _s) = conn(b).await;
            let r = get(c).await.unwrap();
            for (i, x) in r.iter().enumerate() {
                let want = match i {
                    0..4096 => 0x66,
                    _ if i >= LEN - 4096 => 0x77,
                    _ => 0,
                };
                assert_eq!(*x, want, "aligned {aligned}: byte {i} of the covered read");
            }
        }
    }

    /// Found by the `client_replies` fuzz target: chunk offsets near
    /// u64::MAX overflowed the bounds check. They must be protocol errors.
    #[tokio::test]
    async fn chunk_offsets_near_u64_max_are_refused() {
        for ty in [proto::chunk::OFFSET_DATA, proto::chunk::OFFSET_HOLE] {
            let (client_end, mut server_end) = tokio::io::duplex(1 << 16);
            let mut b = handshake_bytes();
            let payload: Vec<u8> = if ty == proto::chunk::OFFSET_DATA {
                [&(u64::MAX - 3).to_be_bytes()[..], &[0x11; 16]].concat()
            } else {
                [&(u64::MAX - 3).to_be_bytes()[..], &16u32.to_be_bytes()[..]].concat()
            };
            proto::encode_chunk_header(
                &mut b,
                proto::chunk::FLAG_DONE,
                ty,
                1,
                payload.len() as u32,
            );
            b.extend_from_slice(&payload);
            server_end.write_all(&b).await.unwrap();
            let c = NbdClient::handshake(client_end, "x", false).await.unwrap();
            let e = c.read(0, 4096).await.unwrap_err();
            assert!(matches!(e, ClientError::Protocol(_)), "{e}");
        }
    }
}
