//! Block targets: what a volume's mapping table is made of.
//!
//! A *target* is anything that stores the bytes of a volume. Every target
//! implements one small trait, [`BlockTarget`]; the NBD server talks to that
//! trait only, so targets stack (a `clone` holds a `remote` origin and a
//! `local` file) without the server knowing.
//!
//! ```text
//!   NBD server ──► Arc<dyn BlockTarget>
//!                    ├── LocalTarget   sparse raw file (holes, punch, SEEK_DATA)
//!                    ├── RemoteTarget  NBD client to another node's export
//!                    └── CloneTarget   origin + local + region map (migration)
//! ```
//!
//! What every target must do: `size`, `read`, `write` (honouring FUA),
//! `flush`. What is optional, and said by [`Capabilities`]: trim, zeroes,
//! fast zeroes, block status, cache. A target that cannot do an optional
//! operation returns [`BlockError::NotSupported`] and the server does not
//! advertise it.
//!
//! Targets never see out-of-range requests: the server checks bounds before
//! calling (but targets check again where a bug would corrupt data).

pub mod local;
pub mod remote;

use async_trait::async_trait;
use thiserror::Error;

use crate::bufpool::IoBuf;

pub use crate::nbd::proto::Extent;
pub use local::LocalTarget;
pub use remote::RemoteTarget;

/// What a migration's clone needs of its origin (the source's export):
/// reads, and block status to skip zeros. Small on purpose, so the clone's
/// invariants can be tested against an in-memory origin that delays, fails
/// and reorders (see `migrate::clone` tests); [`RemoteTarget`] is the one
/// used between nodes.
#[async_trait]
pub trait Origin: Send + Sync {
    /// Reads `buf.len()` bytes at `offset`.
    async fn read_into(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()>;
    /// Reads `len` bytes at `offset` into a new buffer aligned for
    /// `O_DIRECT` (see [`IoBuf::aligned`]); `bulk` marks background
    /// copying (it may use other connections than on-demand reads, so a
    /// guest's fetch never queues behind megabytes of copy).
    async fn read_vec(&self, offset: u64, len: u32, bulk: bool) -> BlockResult<IoBuf>;
    /// Extents of `[offset, offset + len)`, as NBD block status reports
    /// them (at least one, none of length 0).
    async fn block_status(&self, offset: u64, len: u64) -> BlockResult<Vec<Extent>>;
    /// Drops every connection; later calls fail.
    fn close(&self);
}

/// The one error type of the target boundary. It maps to NBD errno values in
/// [`BlockError::nbd_errno`] and nowhere else.
#[derive(Debug, Error)]
pub enum BlockError {
    #[error("request [{offset}, +{len}) is outside the volume of {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("volume is read-only")]
    ReadOnly,
    #[error("write refused: this node no longer owns the volume ({0})")]
    Fenced(String),
    #[error("no space left on the node's disk")]
    NoSpace,
    #[error("operation not supported by this target")]
    NotSupported,
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("origin unavailable: {0}")]
    Unavailable(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl BlockError {
    /// The NBD error value for this error: the single mapping table.
    pub fn nbd_errno(&self) -> u32 {
        use crate::nbd::proto::errno;
        match self {
            BlockError::OutOfRange { .. } | BlockError::Invalid(_) => errno::EINVAL,
            BlockError::ReadOnly | BlockError::Fenced(_) => errno::EPERM,
            BlockError::NoSpace => errno::ENOSPC,
            BlockError::NotSupported => errno::ENOTSUP,
            BlockError::Unavailable(_) => errno::EIO,
            BlockError::Io(e) if is_no_space(e) => errno::ENOSPC,
            BlockError::Io(_) => errno::EIO,
        }
    }

    /// Wraps an I/O error, recognising a full disk.
    pub fn from_io(e: std::io::Error) -> Self {
        if is_no_space(&e) {
            BlockError::NoSpace
        } else {
            BlockError::Io(e)
        }
    }
}

fn is_no_space(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(c) if c == nix::libc::ENOSPC || c == nix::libc::EDQUOT)
}

impl From<nix::Error> for BlockError {
    fn from(e: nix::Error) -> Self {
        BlockError::from_io(std::io::Error::from(e))
    }
}

pub type BlockResult<T> = Result<T, BlockError>;

/// Optional operations a target supports; the server advertises exactly these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    pub read_only: bool,
    pub trim: bool,
    pub write_zeroes: bool,
    pub fast_zero: bool,
    pub block_status: bool,
    pub cache: bool,
}

/// How a `write_zeroes` may be carried out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The range must stay allocated (NBD_CMD_FLAG_NO_HOLE).
    pub no_hole: bool,
    /// Fail with `NotSupported` rather than zero slowly (NBD_CMD_FLAG_FAST_ZERO).
    pub fast: bool,
    /// Durable before returning (NBD_CMD_FLAG_FUA).
    pub fua: bool,
}

/// The interface every target implements. Offsets and lengths are bytes.
///
/// Cancellation: the server may drop a future at an `.await` only when the
/// whole connection is torn down; implementations must leave their on-disk
/// state consistent at every await point (a dropped write may or may not
/// have happened, as with a power cut, but never half-updates metadata).
#[async_trait]
pub trait BlockTarget: Send + Sync + 'static {
    /// Size of the volume in bytes.
    fn size(&self) -> u64;
    /// Optional operations supported.
    fn capabilities(&self) -> Capabilities;
    /// Fills `buf` with the bytes at `offset`.
    async fn read(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()>;
    /// Fills `buf[at..]` with the bytes at `offset`, for bulk data read
    /// once (a migration's copy): a target may read it around the page
    /// cache (`O_DIRECT`; `buf[at..]` is aligned for it when it comes from
    /// [`IoBuf::aligned`]). Same result as [`BlockTarget::read`], which
    /// is what it does unless a target says otherwise.
    async fn read_bulk(&self, offset: u64, mut buf: IoBuf, at: usize) -> (IoBuf, BlockResult<()>) {
        let r = self.read(offset, &mut buf[at..]).await;
        (buf, r)
    }
    /// Writes `data` at `offset`; durable before returning if `fua`.
    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> BlockResult<()>;
    /// Makes every completed write durable.
    async fn flush(&self) -> BlockResult<()>;
    /// Discards a range (reads of it afterwards return zeroes in dlsm).
    async fn trim(&self, _offset: u64, _len: u64, _fua: bool) -> BlockResult<()> {
        Err(BlockError::NotSupported)
    }
    /// Writes zeroes over a range.
    async fn write_zeroes(&self, _offset: u64, _len: u64, _flags: ZeroFlags) -> BlockResult<()> {
        Err(BlockError::NotSupported)
    }
    /// Allocation of `[offset, offset+len)` as `base:allocation` extents that
    /// together cover at least one byte and at most `len` bytes.
    async fn block_status(&self, _offset: u64, _len: u64) -> BlockResult<Vec<Extent>> {
        Err(BlockError::NotSupported)
    }
    /// Hint: the client will read this range soon.
    async fn cache(&self, _offset: u64, _len: u64) -> BlockResult<()> {
        Ok(())
    }
    /// The client this target was opened for is gone (its connection
    /// broke, without an orderly disconnect): requests of that client that
    /// have not started yet must not start, since the client may resend them
    /// elsewhere and write on. Only a target opened per connection acts on
    /// it (the fence gate, whose writes can wait for the cluster lease).
    fn client_gone(&self) {}
    /// Bytes actually stored for this volume on this node (for status).
    fn allocated_bytes(&self) -> u64 {
        0
    }
}

/// Checks `[offset, offset+len)` lies within `size`.
pub fn check_range(offset: u64, len: u64, size: u64) -> BlockResult<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange { offset, len, size }),
    }
}
