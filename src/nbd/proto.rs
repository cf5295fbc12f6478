//! The NBD wire format, as pure functions over bytes.
//!
//! This module owns every constant and message layout of the NBD protocol
//! (NetworkBlockDevice/nbd `doc/proto.md`) that dlsm speaks: the fixed-newstyle
//! handshake, options and option replies, requests, simple replies and
//! structured reply chunks. It never touches a socket: decoders take byte
//! slices and return typed messages or a [`ProtoError`]; encoders append to a
//! `Vec<u8>`. The server ([`super::server`]) and the client
//! ([`super::client`]) share it, which is what makes it cheap to unit-test and
//! fuzz.
//!
//! Hostile input is expected here: every decoder checks lengths before it
//! reads and rejects trailing or missing bytes. Nothing in this module panics
//! on any input.

use thiserror::Error;

/// `NBDMAGIC`, the first 8 bytes a server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Size of a request header on the wire.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header on the wire.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header on the wire.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Size of an option header (after which `len` bytes of data follow).
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of an option reply header.
pub const OPT_REPLY_HEADER_LEN: usize = 20;
/// Longest string (export name, context name, message) the spec allows.
pub const MAX_STRING: usize = 4096;

/// Handshake flags (server, 16 bits).
pub mod handshake_flags {
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (32 bits), sent once after the server's greeting.
pub mod client_flags {
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    pub const NO_ZEROES: u32 = 1 << 1;
}

/// Transmission flags (16 bits) describing an export.
pub mod tflags {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const ROTATIONAL: u16 = 1 << 4;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    pub const SEND_RESIZE: u16 = 1 << 9;
    pub const SEND_CACHE: u16 = 1 << 10;
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Command flags (16 bits) of a request.
pub mod cmd_flags {
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
    pub const DF: u16 = 1 << 2;
    pub const REQ_ONE: u16 = 1 << 3;
    pub const FAST_ZERO: u16 = 1 << 4;
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Option codes.
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types.
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const META_CONTEXT: u32 = 4;
    const ERR: u32 = 1 << 31;
    pub const ERR_UNSUP: u32 = ERR | 1;
    pub const ERR_POLICY: u32 = ERR | 2;
    pub const ERR_INVALID: u32 = ERR | 3;
    pub const ERR_PLATFORM: u32 = ERR | 4;
    pub const ERR_TLS_REQD: u32 = ERR | 5;
    pub const ERR_UNKNOWN: u32 = ERR | 6;
    pub const ERR_SHUTDOWN: u32 = ERR | 7;
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR | 8;
    pub const ERR_TOO_BIG: u32 = ERR | 9;

    /// True for every error reply type (bit 31 set).
    pub fn is_error(ty: u32) -> bool {
        ty & ERR != 0
    }
}

/// `NBD_INFO_*` item types inside an `NBD_REP_INFO` reply.
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Structured reply chunk types and flags.
pub mod chunk {
    pub const FLAG_DONE: u16 = 1 << 0;
    pub const NONE: u16 = 0;
    pub const OFFSET_DATA: u16 = 1;
    pub const OFFSET_HOLE: u16 = 2;
    pub const BLOCK_STATUS: u16 = 5;
    pub const ERROR: u16 = (1 << 15) | 1;
    pub const ERROR_OFFSET: u16 = (1 << 15) | 2;

    /// True for every error chunk type (bit 15 set).
    pub fn is_error(ty: u16) -> bool {
        ty & (1 << 15) != 0
    }
}

/// `base:allocation` status flags of a block status descriptor.
pub mod alloc_flags {
    pub const HOLE: u32 = 1 << 0;
    pub const ZERO: u32 = 1 << 1;
}

/// The only metadata context dlsm serves.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// The context id dlsm gives `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// NBD error values (they are the Linux errno numbers the spec names).
pub mod errno {
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;
}

/// Why a byte sequence is not a valid NBD message.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProtoError {
    #[error("message truncated: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    #[error("{0} trailing bytes after message")]
    TrailingBytes(usize),
    #[error("string of {0} bytes exceeds the 4096-byte limit")]
    StringTooLong(usize),
    #[error("string is not valid UTF-8 or contains NUL")]
    BadString,
    #[error("invalid message: {0}")]
    Invalid(&'static str),
}

/// A cursor over a byte slice whose every read is bounds-checked.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        let have = self.buf.len() - self.pos;
        if n > have {
            return Err(ProtoError::Truncated {
                need: self.pos + n,
                have: self.buf.len(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, ProtoError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, ProtoError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, ProtoError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn string(&mut self, len: usize) -> Result<String, ProtoError> {
        if len > MAX_STRING {
            return Err(ProtoError::StringTooLong(len));
        }
        let b = self.take(len)?;
        let s = std::str::from_utf8(b).map_err(|_| ProtoError::BadString)?;
        if s.contains('\0') {
            return Err(ProtoError::BadString);
        }
        Ok(s.to_owned())
    }
    /// A string prefixed by a 32-bit length.
    fn string32(&mut self) -> Result<String, ProtoError> {
        let len = self.u32()? as usize;
        self.string(len)
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn finish(&self) -> Result<(), ProtoError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(ProtoError::TrailingBytes(n)),
        }
    }
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_string32(out: &mut Vec<u8>, s: &str) {
    put_u32(out, s.len() as u32);
    out.extend_from_slice(s.as_bytes());
}

// ---------------------------------------------------------------------------
// Handshake greeting

/// The server's 18-byte greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn encode_greeting(out: &mut Vec<u8>, flags: u16) {
    put_u64(out, NBD_MAGIC);
    put_u64(out, IHAVEOPT);
    put_u16(out, flags);
}

/// Parses the server's greeting (client side); returns the handshake flags.
pub fn parse_greeting(buf: &[u8]) -> Result<u16, ProtoError> {
    let mut r = Reader::new(buf);
    let m = r.u64()?;
    if m != NBD_MAGIC {
        return Err(ProtoError::BadMagic(m));
    }
    let m = r.u64()?;
    if m != IHAVEOPT {
        return Err(ProtoError::BadMagic(m));
    }
    let flags = r.u16()?;
    r.finish()?;
    Ok(flags)
}

// ---------------------------------------------------------------------------
// Options (client → server)

/// The fixed 16-byte header of a client option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub code: u32,
    pub len: u32,
}

/// Parses an option header; rejects a bad `IHAVEOPT` magic.
pub fn parse_option_header(buf: &[u8]) -> Result<OptionHeader, ProtoError> {
    let mut r = Reader::new(buf);
    let m = r.u64()?;
    if m != IHAVEOPT {
        return Err(ProtoError::BadMagic(m));
    }
    let code = r.u32()?;
    let len = r.u32()?;
    r.finish()?;
    Ok(OptionHeader { code, len })
}

/// Appends a client option with its data.
pub fn encode_option(out: &mut Vec<u8>, code: u32, data: &[u8]) {
    put_u64(out, IHAVEOPT);
    put_u32(out, code);
    put_u32(out, data.len() as u32);
    out.extend_from_slice(data);
}

/// The body of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

impl InfoRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_string32(&mut out, &self.name);
        put_u16(&mut out, self.requests.len() as u16);
        for r in &self.requests {
            put_u16(&mut out, *r);
        }
        out
    }
}

/// The body of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextQuery {
    pub export: String,
    pub queries: Vec<String>,
}

impl MetaContextQuery {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_string32(&mut out, &self.export);
        put_u32(&mut out, self.queries.len() as u32);
        for q in &self.queries {
            put_string32(&mut out, q);
        }
        out
    }
}

/// A decoded client option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(String),
    Abort,
    List,
    StartTls,
    Info(InfoRequest),
    Go(InfoRequest),
    StructuredReply,
    ListMetaContext(MetaContextQuery),
    SetMetaContext(MetaContextQuery),
    /// An option this codec does not know; the server answers `ERR_UNSUP`.
    Unknown(u32),
}

/// Decodes an option's data. A malformed body is an error the server answers
/// with `NBD_REP_ERR_INVALID` (or, for `EXPORT_NAME`, by disconnecting).
pub fn parse_option(code: u32, data: &[u8]) -> Result<ClientOption, ProtoError> {
    let mut r = Reader::new(data);
    let opt = match code {
        opt::EXPORT_NAME => {
            let len = r.remaining();
            ClientOption::ExportName(r.string(len)?)
        }
        opt::ABORT => ClientOption::Abort,
        opt::LIST => ClientOption::List,
        opt::STARTTLS => ClientOption::StartTls,
        opt::STRUCTURED_REPLY => ClientOption::StructuredReply,
        opt::INFO | opt::GO => {
            let name = r.string32()?;
            let n = r.u16()? as usize;
            let mut requests = Vec::with_capacity(n.min(16));
            for _ in 0..n {
                requests.push(r.u16()?);
            }
            let req = InfoRequest { name, requests };
            if code == opt::INFO {
                ClientOption::Info(req)
            } else {
                ClientOption::Go(req)
            }
        }
        opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
            let export = r.string32()?;
            let n = r.u32()? as usize;
            // Each query needs at least 4 bytes, so a count larger than the
            // remaining bytes allow is a lie; refuse before allocating.
            if n > r.remaining() / 4 {
                return Err(ProtoError::Invalid("meta context query count too large"));
            }
            let mut queries = Vec::with_capacity(n);
            for _ in 0..n {
                queries.push(r.string32()?);
            }
            let q = MetaContextQuery { export, queries };
            if code == opt::LIST_META_CONTEXT {
                ClientOption::ListMetaContext(q)
            } else {
                ClientOption::SetMetaContext(q)
            }
        }
        other => return Ok(ClientOption::Unknown(other)),
    };
    // Every known option's data must be consumed exactly: data on a
    // data-less option, or bytes after a parsed body, are a client error.
    r.finish()?;
    Ok(opt)
}

// ---------------------------------------------------------------------------
// Option replies (server → client)

/// Appends an option reply: header and data.
pub fn encode_opt_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    put_u64(out, OPT_REPLY_MAGIC);
    put_u32(out, option);
    put_u32(out, reply_type);
    put_u32(out, data.len() as u32);
    out.extend_from_slice(data);
}

/// The 20-byte header of an option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub len: u32,
}

/// Parses an option reply header (client side).
pub fn parse_opt_reply_header(buf: &[u8]) -> Result<OptReplyHeader, ProtoError> {
    let mut r = Reader::new(buf);
    let m = r.u64()?;
    if m != OPT_REPLY_MAGIC {
        return Err(ProtoError::BadMagic(m));
    }
    let h = OptReplyHeader {
        option: r.u32()?,
        reply_type: r.u32()?,
        len: r.u32()?,
    };
    r.finish()?;
    Ok(h)
}

/// Data of an `NBD_REP_SERVER` reply to `NBD_OPT_LIST`.
pub fn encode_rep_server(name: &str, description: &str) -> Vec<u8> {
    let mut out = Vec::new();
    put_string32(&mut out, name);
    out.extend_from_slice(description.as_bytes());
    out
}

/// Parses the data of an `NBD_REP_SERVER` reply: export name.
pub fn parse_rep_server(data: &[u8]) -> Result<String, ProtoError> {
    let mut r = Reader::new(data);
    r.string32()
}

/// Data of an `NBD_REP_META_CONTEXT` reply.
pub fn encode_rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    put_u32(&mut out, id);
    out.extend_from_slice(name.as_bytes());
    out
}

/// Parses the data of an `NBD_REP_META_CONTEXT` reply: id and name.
pub fn parse_rep_meta_context(data: &[u8]) -> Result<(u32, String), ProtoError> {
    let mut r = Reader::new(data);
    let id = r.u32()?;
    let len = r.remaining();
    Ok((id, r.string(len)?))
}

/// One item of an `NBD_REP_INFO` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoItem {
    Export { size: u64, flags: u16 },
    Name(String),
    Description(String),
    BlockSize { min: u32, preferred: u32, max: u32 },
    Unknown(u16),
}

impl InfoItem {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            InfoItem::Export { size, flags } => {
                put_u16(&mut out, info::EXPORT);
                put_u64(&mut out, *size);
                put_u16(&mut out, *flags);
            }
            InfoItem::Name(s) => {
                put_u16(&mut out, info::NAME);
                out.extend_from_slice(s.as_bytes());
            }
            InfoItem::Description(s) => {
                put_u16(&mut out, info::DESCRIPTION);
                out.extend_from_slice(s.as_bytes());
            }
            InfoItem::BlockSize {
                min,
                preferred,
                max,
            } => {
                put_u16(&mut out, info::BLOCK_SIZE);
                put_u32(&mut out, *min);
                put_u32(&mut out, *preferred);
                put_u32(&mut out, *max);
            }
            InfoItem::Unknown(t) => put_u16(&mut out, *t),
        }
        out
    }

    pub fn parse(data: &[u8]) -> Result<InfoItem, ProtoError> {
        let mut r = Reader::new(data);
        let item = match r.u16()? {
            info::EXPORT => InfoItem::Export {
                size: r.u64()?,
                flags: r.u16()?,
            },
            info::NAME => {
                let len = r.remaining();
                InfoItem::Name(r.string(len)?)
            }
            info::DESCRIPTION => {
                let len = r.remaining();
                InfoItem::Description(r.string(len)?)
            }
            info::BLOCK_SIZE => InfoItem::BlockSize {
                min: r.u32()?,
                preferred: r.u32()?,
                max: r.u32()?,
            },
            other => return Ok(InfoItem::Unknown(other)),
        };
        r.finish()?;
        Ok(item)
    }
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, flags and (unless the client
/// negotiated `NO_ZEROES`) 124 bytes of zeroes.
pub fn encode_export_name_reply(out: &mut Vec<u8>, size: u64, flags: u16, no_zeroes: bool) {
    put_u64(out, size);
    put_u16(out, flags);
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
}

// ---------------------------------------------------------------------------
// Transmission: requests

/// A request's command type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    /// A command this server does not implement (answered with `EINVAL`).
    Unknown(u16),
}

impl Command {
    pub fn from_u16(v: u16) -> Self {
        match v {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disc,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }
    pub fn to_u16(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disc => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::Cache => 5,
            Command::WriteZeroes => 6,
            Command::BlockStatus => 7,
            Command::Unknown(v) => v,
        }
    }
}

/// A transmission-phase request header (a WRITE's payload follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    /// Parses the fixed 28-byte header.
    pub fn parse(buf: &[u8]) -> Result<Request, ProtoError> {
        let mut r = Reader::new(buf);
        let magic = r.u32()?;
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic(magic as u64));
        }
        let req = Request {
            flags: r.u16()?,
            command: Command::from_u16(r.u16()?),
            cookie: r.u64()?,
            offset: r.u64()?,
            len: r.u32()?,
        };
        r.finish()?;
        Ok(req)
    }

    /// Appends the 28-byte header (the caller appends a WRITE's payload).
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u32(out, REQUEST_MAGIC);
        put_u16(out, self.flags);
        put_u16(out, self.command.to_u16());
        put_u64(out, self.cookie);
        put_u64(out, self.offset);
        put_u32(out, self.len);
    }

    /// Whether `flag` is set.
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

// ---------------------------------------------------------------------------
// Transmission: replies

/// Writes a simple reply header into `out[..16]`.
pub fn write_simple_reply(out: &mut [u8], cookie: u64, error: u32) {
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
}

/// Appends a simple reply header.
pub fn encode_simple_reply(out: &mut Vec<u8>, cookie: u64, error: u32) {
    let at = out.len();
    out.resize(at + SIMPLE_REPLY_LEN, 0);
    write_simple_reply(&mut out[at..], cookie, error);
}

/// Writes a structured chunk header into `out[..20]`.
pub fn write_chunk_header(out: &mut [u8], flags: u16, ty: u16, cookie: u64, len: u32) {
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&ty.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&len.to_be_bytes());
}

/// Appends a structured chunk header.
pub fn encode_chunk_header(out: &mut Vec<u8>, flags: u16, ty: u16, cookie: u64, len: u32) {
    let at = out.len();
    out.resize(at + CHUNK_HEADER_LEN, 0);
    write_chunk_header(&mut out[at..], flags, ty, cookie, len);
}

/// Bytes before the data of an `OFFSET_DATA` chunk: header plus offset.
pub const OFFSET_DATA_PREFIX: usize = CHUNK_HEADER_LEN + 8;

/// Writes the header and offset of an `OFFSET_DATA` chunk carrying
/// `data_len` bytes into `out[..28]`.
pub fn write_offset_data_prefix(
    out: &mut [u8],
    done: bool,
    cookie: u64,
    offset: u64,
    data_len: u32,
) {
    let flags = if done { chunk::FLAG_DONE } else { 0 };
    write_chunk_header(out, flags, chunk::OFFSET_DATA, cookie, 8 + data_len);
    out[20..28].copy_from_slice(&offset.to_be_bytes());
}

/// Appends an `OFFSET_HOLE` chunk.
pub fn encode_offset_hole(out: &mut Vec<u8>, done: bool, cookie: u64, offset: u64, len: u32) {
    let flags = if done { chunk::FLAG_DONE } else { 0 };
    encode_chunk_header(out, flags, chunk::OFFSET_HOLE, cookie, 12);
    put_u64(out, offset);
    put_u32(out, len);
}

/// Appends a `NONE` chunk (always the final chunk).
pub fn encode_none_chunk(out: &mut Vec<u8>, cookie: u64) {
    encode_chunk_header(out, chunk::FLAG_DONE, chunk::NONE, cookie, 0);
}

/// One block status descriptor: `len` bytes with `base:allocation` flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u32,
    pub flags: u32,
}

/// Appends a final `BLOCK_STATUS` chunk for context `ctx`.
pub fn encode_block_status(out: &mut Vec<u8>, cookie: u64, ctx: u32, extents: &[Extent]) {
    encode_chunk_header(
        out,
        chunk::FLAG_DONE,
        chunk::BLOCK_STATUS,
        cookie,
        4 + 8 * extents.len() as u32,
    );
    put_u32(out, ctx);
    for e in extents {
        put_u32(out, e.len);
        put_u32(out, e.flags);
    }
}

/// Appends a final `ERROR` chunk.
pub fn encode_error_chunk(out: &mut Vec<u8>, cookie: u64, error: u32, msg: &str) {
    let msg = truncate_utf8(msg, MAX_STRING);
    encode_chunk_header(
        out,
        chunk::FLAG_DONE,
        chunk::ERROR,
        cookie,
        6 + msg.len() as u32,
    );
    put_u32(out, error);
    put_u16(out, msg.len() as u16);
    out.extend_from_slice(msg.as_bytes());
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The header of any reply, as a client reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple {
        error: u32,
        cookie: u64,
    },
    Structured {
        flags: u16,
        ty: u16,
        cookie: u64,
        len: u32,
    },
}

/// How many header bytes follow a reply's 4-byte magic.
pub fn reply_header_rest(magic: u32) -> Result<usize, ProtoError> {
    match magic {
        SIMPLE_REPLY_MAGIC => Ok(SIMPLE_REPLY_LEN - 4),
        STRUCTURED_REPLY_MAGIC => Ok(CHUNK_HEADER_LEN - 4),
        other => Err(ProtoError::BadMagic(other as u64)),
    }
}

/// Parses a whole reply header (16 or 20 bytes, magic included).
pub fn parse_reply_header(buf: &[u8]) -> Result<ReplyHeader, ProtoError> {
    let mut r = Reader::new(buf);
    let magic = r.u32()?;
    let h = match magic {
        SIMPLE_REPLY_MAGIC => ReplyHeader::Simple {
            error: r.u32()?,
            cookie: r.u64()?,
        },
        STRUCTURED_REPLY_MAGIC => ReplyHeader::Structured {
            flags: r.u16()?,
            ty: r.u16()?,
            cookie: r.u64()?,
            len: r.u32()?,
        },
        other => return Err(ProtoError::BadMagic(other as u64)),
    };
    r.finish()?;
    Ok(h)
}

/// A decoded structured reply chunk payload (except `OFFSET_DATA`'s data,
/// which the client copies straight into the caller's buffer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    None,
    OffsetData {
        offset: u64,
    },
    OffsetHole {
        offset: u64,
        len: u32,
    },
    BlockStatus {
        ctx: u32,
        extents: Vec<Extent>,
    },
    Error {
        error: u32,
        msg: String,
        offset: Option<u64>,
    },
    Unknown(u16),
}

/// Parses a chunk payload. For `OFFSET_DATA` only the first 8 bytes (the
/// offset) are examined; the data that follows is the caller's.
pub fn parse_chunk(ty: u16, payload: &[u8]) -> Result<Chunk, ProtoError> {
    let mut r = Reader::new(payload);
    let c = match ty {
        chunk::NONE => Chunk::None,
        chunk::OFFSET_DATA => {
            let offset = r.u64()?;
            if r.remaining() == 0 {
                return Err(ProtoError::Invalid("OFFSET_DATA chunk without data"));
            }
            return Ok(Chunk::OffsetData { offset });
        }
        chunk::OFFSET_HOLE => {
            let offset = r.u64()?;
            let len = r.u32()?;
            if len == 0 {
                return Err(ProtoError::Invalid("zero-length OFFSET_HOLE"));
            }
            Chunk::OffsetHole { offset, len }
        }
        chunk::BLOCK_STATUS => {
            let ctx = r.u32()?;
            if !r.remaining().is_multiple_of(8) || r.remaining() == 0 {
                return Err(ProtoError::Invalid(
                    "BLOCK_STATUS payload not whole descriptors",
                ));
            }
            let mut extents = Vec::with_capacity(r.remaining() / 8);
            while r.remaining() > 0 {
                extents.push(Extent {
                    len: r.u32()?,
                    flags: r.u32()?,
                });
            }
            Chunk::BlockStatus { ctx, extents }
        }
        chunk::ERROR | chunk::ERROR_OFFSET => {
            let error = r.u32()?;
            let mlen = r.u16()? as usize;
            let msg = r.string(mlen)?;
            let offset = if ty == chunk::ERROR_OFFSET {
                Some(r.u64()?)
            } else {
                None
            };
            Chunk::Error { error, msg, offset }
        }
        other if chunk::is_error(other) => {
            // Unknown error chunk: the spec requires at least the error value.
            let error = r.u32()?;
            return Ok(Chunk::Error {
                error,
                msg: String::new(),
                offset: None,
            });
        }
        other => return Ok(Chunk::Unknown(other)),
    };
    r.finish()?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn greeting_round_trips() {
        let mut b = Vec::new();
        encode_greeting(
            &mut b,
            handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES,
        );
        assert_eq!(b.len(), 18);
        assert_eq!(parse_greeting(&b).unwrap(), 3);
        b[0] ^= 1;
        assert!(matches!(parse_greeting(&b), Err(ProtoError::BadMagic(_))));
    }

    #[test]
    fn option_header_rejects_bad_magic_and_truncation() {
        let mut b = Vec::new();
        encode_option(&mut b, opt::GO, &[]);
        assert_eq!(
            parse_option_header(&b).unwrap(),
            OptionHeader {
                code: opt::GO,
                len: 0
            }
        );
        assert!(matches!(
            parse_option_header(&b[..15]),
            Err(ProtoError::Truncated { .. })
        ));
        b[3] = 0;
        assert!(matches!(
            parse_option_header(&b),
            Err(ProtoError::BadMagic(_))
        ));
    }

    fn opt_round_trip(code: u32, data: &[u8]) -> ClientOption {
        let mut b = Vec::new();
        encode_option(&mut b, code, data);
        let h = parse_option_header(&b[..16]).unwrap();
        assert_eq!(h.len as usize, data.len());
        parse_option(h.code, &b[16..]).unwrap()
    }

    #[test]
    fn every_option_round_trips() {
        let info = InfoRequest {
            name: "vm1".into(),
            requests: vec![info::BLOCK_SIZE, info::NAME],
        };
        assert_eq!(
            opt_round_trip(opt::GO, &info.encode()),
            ClientOption::Go(info.clone())
        );
        assert_eq!(
            opt_round_trip(opt::INFO, &info.encode()),
            ClientOption::Info(info)
        );
        let q = MetaContextQuery {
            export: "vm1".into(),
            queries: vec!["base:allocation".into(), "qemu:".into()],
        };
        assert_eq!(
            opt_round_trip(opt::SET_META_CONTEXT, &q.encode()),
            ClientOption::SetMetaContext(q.clone())
        );
        assert_eq!(
            opt_round_trip(opt::LIST_META_CONTEXT, &q.encode()),
            ClientOption::ListMetaContext(q)
        );
        assert_eq!(
            opt_round_trip(opt::EXPORT_NAME, b"disk"),
            ClientOption::ExportName("disk".into())
        );
        assert_eq!(opt_round_trip(opt::ABORT, &[]), ClientOption::Abort);
        assert_eq!(opt_round_trip(opt::LIST, &[]), ClientOption::List);
        assert_eq!(opt_round_trip(opt::STARTTLS, &[]), ClientOption::StartTls);
        assert_eq!(
            opt_round_trip(opt::STRUCTURED_REPLY, &[]),
            ClientOption::StructuredReply
        );
        assert_eq!(opt_round_trip(99, b"xyz"), ClientOption::Unknown(99));
    }

    #[test]
    fn hostile_options_are_rejected() {
        // Name length beyond the data.
        let mut d = Vec::new();
        put_u32(&mut d, 1000);
        d.extend_from_slice(b"abc");
        assert!(parse_option(opt::GO, &d).is_err());
        // Name over 4096 bytes.
        let long = "x".repeat(5000);
        let info = InfoRequest {
            name: long,
            requests: vec![],
        };
        assert!(matches!(
            parse_option(opt::GO, &info.encode()),
            Err(ProtoError::StringTooLong(5000))
        ));
        // Trailing bytes after GO.
        let mut d = InfoRequest {
            name: "a".into(),
            requests: vec![],
        }
        .encode();
        d.push(0);
        assert!(matches!(
            parse_option(opt::GO, &d),
            Err(ProtoError::TrailingBytes(1))
        ));
        // Huge meta-context query count does not allocate.
        let mut d = Vec::new();
        put_string32(&mut d, "a");
        put_u32(&mut d, u32::MAX);
        assert!(parse_option(opt::SET_META_CONTEXT, &d).is_err());
        // NUL inside a name; invalid UTF-8.
        assert!(parse_option(opt::EXPORT_NAME, b"a\0b").is_err());
        assert!(parse_option(opt::EXPORT_NAME, &[0xff, 0xfe]).is_err());
        // Data on a data-less option.
        assert!(parse_option(opt::STRUCTURED_REPLY, b"x").is_err());
        assert!(parse_option(opt::LIST, b"x").is_err());
    }

    #[test]
    fn opt_replies_round_trip() {
        let mut b = Vec::new();
        let item = InfoItem::Export {
            size: 1 << 30,
            flags: tflags::HAS_FLAGS | tflags::SEND_FLUSH,
        };
        encode_opt_reply(&mut b, opt::GO, rep::INFO, &item.encode());
        let h = parse_opt_reply_header(&b[..20]).unwrap();
        assert_eq!(h.option, opt::GO);
        assert_eq!(h.reply_type, rep::INFO);
        assert_eq!(InfoItem::parse(&b[20..]).unwrap(), item);
        for item in [
            InfoItem::Name("n".into()),
            InfoItem::Description("d".into()),
            InfoItem::BlockSize {
                min: 1,
                preferred: 4096,
                max: 1 << 25,
            },
        ] {
            assert_eq!(InfoItem::parse(&item.encode()).unwrap(), item);
        }
        assert_eq!(
            parse_rep_server(&encode_rep_server("vm", "desc")).unwrap(),
            "vm"
        );
        assert_eq!(
            parse_rep_meta_context(&encode_rep_meta_context(7, BASE_ALLOCATION)).unwrap(),
            (7, BASE_ALLOCATION.to_string())
        );
        assert!(rep::is_error(rep::ERR_UNKNOWN));
        assert!(!rep::is_error(rep::ACK));
        let mut b = Vec::new();
        encode_export_name_reply(&mut b, 5, 1, false);
        assert_eq!(b.len(), 134);
        let mut b = Vec::new();
        encode_export_name_reply(&mut b, 5, 1, true);
        assert_eq!(b.len(), 10);
    }

    #[test]
    fn replies_round_trip() {
        let mut b = Vec::new();
        encode_simple_reply(&mut b, 42, errno::EIO);
        assert_eq!(
            parse_reply_header(&b).unwrap(),
            ReplyHeader::Simple {
                error: errno::EIO,
                cookie: 42
            }
        );
        let mut b = Vec::new();
        encode_offset_hole(&mut b, true, 9, 4096, 512);
        let h = parse_reply_header(&b[..20]).unwrap();
        assert_eq!(
            h,
            ReplyHeader::Structured {
                flags: chunk::FLAG_DONE,
                ty: chunk::OFFSET_HOLE,
                cookie: 9,
                len: 12
            }
        );
        assert_eq!(
            parse_chunk(chunk::OFFSET_HOLE, &b[20..]).unwrap(),
            Chunk::OffsetHole {
                offset: 4096,
                len: 512
            }
        );
        let ext = vec![
            Extent {
                len: 4096,
                flags: 0,
            },
            Extent {
                len: 8192,
                flags: alloc_flags::HOLE | alloc_flags::ZERO,
            },
        ];
        let mut b = Vec::new();
        encode_block_status(&mut b, 3, BASE_ALLOCATION_ID, &ext);
        assert_eq!(
            parse_chunk(chunk::BLOCK_STATUS, &b[20..]).unwrap(),
            Chunk::BlockStatus {
                ctx: BASE_ALLOCATION_ID,
                extents: ext
            }
        );
        let mut b = Vec::new();
        encode_error_chunk(&mut b, 3, errno::ENOSPC, "disk full");
        assert_eq!(
            parse_chunk(chunk::ERROR, &b[20..]).unwrap(),
            Chunk::Error {
                error: errno::ENOSPC,
                msg: "disk full".into(),
                offset: None
            }
        );
        let mut b = vec![0u8; OFFSET_DATA_PREFIX + 3];
        write_offset_data_prefix(&mut b, true, 1, 77, 3);
        assert_eq!(
            parse_chunk(chunk::OFFSET_DATA, &b[20..]).unwrap(),
            Chunk::OffsetData { offset: 77 }
        );
        let mut b = Vec::new();
        encode_none_chunk(&mut b, 5);
        assert_eq!(parse_chunk(chunk::NONE, &b[20..]).unwrap(), Chunk::None);
    }

    #[test]
    fn hostile_chunks_are_rejected() {
        assert!(parse_chunk(chunk::BLOCK_STATUS, &[0, 0, 0, 1, 0, 0]).is_err());
        assert!(parse_chunk(chunk::BLOCK_STATUS, &[0, 0, 0, 1]).is_err());
        assert!(parse_chunk(chunk::OFFSET_HOLE, &[0; 11]).is_err());
        assert!(parse_chunk(chunk::OFFSET_HOLE, &[0; 12]).is_err()); // zero length
        assert!(parse_chunk(chunk::OFFSET_DATA, &[0; 8]).is_err());
        // Error message longer than the payload.
        assert!(parse_chunk(chunk::ERROR, &[0, 0, 0, 5, 0, 9, b'a']).is_err());
        assert!(parse_reply_header(&[0u8; 16]).is_err());
        assert!(reply_header_rest(0xdead_beef).is_err());
    }

    #[test]
    fn long_error_message_is_truncated_on_a_char_boundary() {
        let msg = "é".repeat(3000); // 6000 bytes
        let mut b = Vec::new();
        encode_error_chunk(&mut b, 1, errno::EIO, &msg);
        match parse_chunk(chunk::ERROR, &b[20..]).unwrap() {
            Chunk::Error { msg, .. } => assert!(msg.len() <= MAX_STRING && !msg.is_empty()),
            other => panic!("unexpected {other:?}"),
        }
    }

    proptest! {
        #[test]
        fn requests_round_trip(flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) {
            let req = Request { flags, command: Command::from_u16(cmd), cookie, offset, len };
            let mut b = Vec::new();
            req.encode(&mut b);
            prop_assert_eq!(b.len(), REQUEST_LEN);
            prop_assert_eq!(Request::parse(&b).unwrap(), req);
        }

        #[test]
        fn decoders_never_panic(code: u32, ty: u16, data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_option(code, &data);
            let _ = parse_chunk(ty, &data);
            let _ = parse_reply_header(&data);
            let _ = Request::parse(&data);
            let _ = InfoItem::parse(&data);
            let _ = parse_opt_reply_header(&data);
            let _ = parse_greeting(&data);
        }

        #[test]
        fn truncated_requests_are_rejected(cut in 0usize..REQUEST_LEN) {
            let mut b = Vec::new();
            Request { flags: 0, command: Command::Read, cookie: 1, offset: 0, len: 512 }.encode(&mut b);
            let truncated = matches!(Request::parse(&b[..cut]), Err(ProtoError::Truncated { .. }));
            prop_assert!(truncated);
        }
    }
}
