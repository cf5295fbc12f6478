//! A minimal vhost-user-blk *frontend*: the driver side of a vhost-user-blk
//! socket, for benchmarks and tests. It is not a production driver.
//!
//! It plays the part a VMM (or libblkio's `virtio-blk-vhost-user` driver)
//! plays towards a vhost-user-blk backend such as dlsm's export or
//! `qemu-storage-daemon --export type=vhost-user-blk`:
//!
//! * "guest memory" is one memfd, mapped here and handed to the backend with
//!   `SET_MEM_TABLE`; guest physical address 0 is the start of the memfd;
//! * every queue is a split virtqueue laid out in that memory, followed by its
//!   request headers, status bytes and data buffers (see [`QueueLayout`]);
//! * the control messages go through [`vhost::vhost_user::Frontend`]; kicks
//!   and calls are eventfds.
//!
//! Usage: [`VhostBlkClient::connect`], then drive a [`BlkQueue`] (borrowed
//! with [`VhostBlkClient::queue`], or moved to threads with
//! [`VhostBlkClient::take_queues`]): put data in its buffer slots, submit
//! requests ([`BlkQueue::read`], [`BlkQueue::write`], ...), [`BlkQueue::kick`],
//! and reap [`Completion`]s with [`BlkQueue::poll`] or [`BlkQueue::wait`].
//! Many requests may be in flight on a queue; each takes two or three
//! descriptors (no indirect tables), so a queue of size N holds N/3 reads or
//! writes at once.
//!
//! For tests of a backend's input validation, [`BlkQueue::submit_raw`] sends
//! an arbitrary descriptor chain (any address, length, flags, next index,
//! including chains that leave guest memory or loop), and
//! [`BlkQueue::publish_raw_head`] puts any index in the available ring.
//!
//! Limits: little-endian hosts only (virtio 1.0 rings are little-endian and
//! are accessed natively here); no reconnection, no live migration, no
//! inflight tracking; the backend must offer `VIRTIO_F_VERSION_1`,
//! `VHOST_USER_F_PROTOCOL_FEATURES` and the `CONFIG` protocol feature.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk as vb;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring as vr;
use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

#[cfg(target_endian = "big")]
compile_error!("dlsm::vhost::frontend assumes a little-endian host");

/// Sector size of the virtio-blk protocol (request offsets are in sectors).
pub const SECTOR: u64 = 512;

/// Virtio and vhost-user feature bits, as masks.
pub mod feature {
    use super::{vb, vr, VIRTIO_F_VERSION_1};
    /// `VIRTIO_F_VERSION_1`.
    pub const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
    /// `VIRTIO_RING_F_INDIRECT_DESC`.
    pub const INDIRECT_DESC: u64 = 1 << vr::VIRTIO_RING_F_INDIRECT_DESC;
    /// `VIRTIO_RING_F_EVENT_IDX`.
    pub const EVENT_IDX: u64 = 1 << vr::VIRTIO_RING_F_EVENT_IDX;
    /// `VHOST_USER_F_PROTOCOL_FEATURES`.
    pub const PROTOCOL_FEATURES: u64 = 1 << 30;
    /// `VIRTIO_BLK_F_SIZE_MAX`.
    pub const SIZE_MAX: u64 = 1 << vb::VIRTIO_BLK_F_SIZE_MAX;
    /// `VIRTIO_BLK_F_SEG_MAX`.
    pub const SEG_MAX: u64 = 1 << vb::VIRTIO_BLK_F_SEG_MAX;
    /// `VIRTIO_BLK_F_RO`.
    pub const RO: u64 = 1 << vb::VIRTIO_BLK_F_RO;
    /// `VIRTIO_BLK_F_BLK_SIZE`.
    pub const BLK_SIZE: u64 = 1 << vb::VIRTIO_BLK_F_BLK_SIZE;
    /// `VIRTIO_BLK_F_FLUSH`.
    pub const FLUSH: u64 = 1 << vb::VIRTIO_BLK_F_FLUSH;
    /// `VIRTIO_BLK_F_TOPOLOGY`.
    pub const TOPOLOGY: u64 = 1 << vb::VIRTIO_BLK_F_TOPOLOGY;
    /// `VIRTIO_BLK_F_CONFIG_WCE`.
    pub const CONFIG_WCE: u64 = 1 << vb::VIRTIO_BLK_F_CONFIG_WCE;
    /// `VIRTIO_BLK_F_MQ`.
    pub const MQ: u64 = 1 << vb::VIRTIO_BLK_F_MQ;
    /// `VIRTIO_BLK_F_DISCARD`.
    pub const DISCARD: u64 = 1 << vb::VIRTIO_BLK_F_DISCARD;
    /// `VIRTIO_BLK_F_WRITE_ZEROES`.
    pub const WRITE_ZEROES: u64 = 1 << vb::VIRTIO_BLK_F_WRITE_ZEROES;
}

/// Request status byte values (`VIRTIO_BLK_S_*`).
pub mod status {
    use super::vb;
    /// Success.
    pub const OK: u8 = vb::VIRTIO_BLK_S_OK as u8;
    /// I/O error (also: out-of-range request, write to a read-only device).
    pub const IOERR: u8 = vb::VIRTIO_BLK_S_IOERR as u8;
    /// Unsupported request type.
    pub const UNSUPP: u8 = vb::VIRTIO_BLK_S_UNSUPP as u8;
    /// What the status byte holds before the backend writes it.
    pub const UNWRITTEN: u8 = 0xff;
}

/// Errors of the frontend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A vhost-user control message failed.
    #[error("vhost-user: {0}")]
    Vhost(#[from] vhost::Error),
    /// A system call failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// Creating or mapping the memfd failed.
    #[error("guest memory: {0}")]
    Mmap(String),
    /// Guest memory access out of range.
    #[error("guest memory access: {0}")]
    Mem(#[from] vm_memory::volatile_memory::Error),
    /// The backend does not offer something this frontend needs.
    #[error("backend lacks {0}")]
    Missing(&'static str),
    /// Bad [`QueueOpts`].
    #[error("bad queue options: {0}")]
    BadOpts(String),
    /// Not enough free descriptors for the request.
    #[error("queue full")]
    QueueFull,
    /// A buffer slot index or length outside the queue's buffers.
    #[error("buffer slot {slot} (+{len} bytes) outside the queue's buffers")]
    BadSlot {
        /// The slot asked for.
        slot: usize,
        /// The length asked for.
        len: usize,
    },
    /// The backend put an index in the used ring that is not the head of a
    /// chain in flight (or is outside the queue).
    #[error("used ring element id {id} (len {len}) is not a request in flight")]
    UnexpectedUsed {
        /// The id the backend returned.
        id: u32,
        /// The length it returned.
        len: u32,
    },
    /// [`BlkQueue::wait`] timed out.
    #[error("timed out waiting for completions")]
    Timeout,
}

/// Result of the frontend.
pub type Result<T> = std::result::Result<T, Error>;

/// How to set up the queues.
#[derive(Debug, Clone)]
pub struct QueueOpts {
    /// Number of queues (more than one needs `VIRTIO_BLK_F_MQ`).
    pub num_queues: u16,
    /// Descriptors per queue, a power of two up to 32768.
    pub queue_size: u16,
    /// Negotiate `VIRTIO_RING_F_EVENT_IDX` (the backend must offer it).
    pub event_idx: bool,
    /// Data buffer slots per queue.
    pub buf_count: usize,
    /// Bytes per data buffer slot (rounded up to a 4 KiB multiple).
    pub buf_size: usize,
}

impl Default for QueueOpts {
    fn default() -> Self {
        QueueOpts {
            num_queues: 1,
            queue_size: 128,
            event_idx: true,
            buf_count: 32,
            buf_size: 64 << 10,
        }
    }
}

/// The virtio-blk configuration space fields this frontend reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Largest segment size (with `SIZE_MAX`).
    pub size_max: u32,
    /// Most segments per request (with `SEG_MAX`).
    pub seg_max: u32,
    /// Logical block size (with `BLK_SIZE`).
    pub blk_size: u32,
    /// Writeback cache enabled (with `CONFIG_WCE`).
    pub wce: u8,
    /// Number of queues (with `MQ`).
    pub num_queues: u16,
    /// Largest discard, in sectors (with `DISCARD`).
    pub max_discard_sectors: u32,
    /// Most discard segments per request.
    pub max_discard_seg: u32,
    /// Discard alignment, in sectors.
    pub discard_sector_alignment: u32,
    /// Largest write-zeroes, in sectors (with `WRITE_ZEROES`).
    pub max_write_zeroes_sectors: u32,
    /// Most write-zeroes segments per request.
    pub max_write_zeroes_seg: u32,
    /// Whether write-zeroes may unmap.
    pub write_zeroes_may_unmap: u8,
}

/// Bytes of `struct virtio_blk_config` read with `GET_CONFIG` (up to and
/// including `write_zeroes_may_unmap` and its padding).
pub const CONFIG_LEN: usize = 60;

impl BlkConfig {
    /// Parses the first [`CONFIG_LEN`] bytes of a virtio-blk config space.
    pub fn parse(b: &[u8]) -> Option<BlkConfig> {
        if b.len() < CONFIG_LEN {
            return None;
        }
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        Some(BlkConfig {
            capacity: u64::from_le_bytes(b[0..8].try_into().unwrap()),
            size_max: u32_at(8),
            seg_max: u32_at(12),
            blk_size: u32_at(20),
            wce: b[32],
            num_queues: u16_at(34),
            max_discard_sectors: u32_at(36),
            max_discard_seg: u32_at(40),
            discard_sector_alignment: u32_at(44),
            max_write_zeroes_sectors: u32_at(48),
            max_write_zeroes_seg: u32_at(52),
            write_zeroes_may_unmap: b[56],
        })
    }
}

/// Where one queue's structures live in guest memory (guest physical
/// addresses, which are also offsets into the memfd).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLayout {
    /// Queue size (descriptors).
    pub size: u16,
    /// Descriptor table: `size` 16-byte descriptors.
    pub desc: u64,
    /// Available ring: flags, idx, `size` entries, `used_event`.
    pub avail: u64,
    /// Used ring: flags, idx, `size` 8-byte elements, `avail_event`.
    pub used: u64,
    /// Request headers, 16 bytes per descriptor index (the chain's head).
    pub hdr: u64,
    /// Status bytes, one per descriptor index (the chain's head).
    pub status: u64,
    /// Data buffer slots.
    pub bufs: u64,
    /// Bytes between buffer slots.
    pub buf_stride: u64,
    /// Number of buffer slots.
    pub buf_count: usize,
    /// First byte after this queue's area.
    pub end: u64,
}

const PAGE: u64 = 4096;

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

impl QueueLayout {
    /// Lays out a queue at `base` (page-aligned) in guest memory.
    pub fn new(base: u64, size: u16, buf_count: usize, buf_size: usize) -> QueueLayout {
        let n = u64::from(size);
        let desc = base;
        let avail = desc + 16 * n;
        let used = align_up(avail + 6 + 2 * n, 4);
        let hdr = align_up(used + 6 + 8 * n, 16);
        let status = hdr + 16 * n;
        let bufs = align_up(status + n, PAGE);
        let buf_stride = align_up(buf_size.max(1) as u64, PAGE);
        let end = bufs + buf_stride * buf_count as u64;
        QueueLayout {
            size,
            desc,
            avail,
            used,
            hdr,
            status,
            bufs,
            buf_stride,
            buf_count,
            end,
        }
    }
}

/// The 16 bytes of a split-ring descriptor.
pub fn desc_bytes(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    d
}

/// The 16 bytes of a virtio-blk request header.
pub fn req_header(kind: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// `vring_need_event` of the virtio spec: whether moving an index from `old`
/// to `new` crosses the other side's `event` index.
pub fn vring_need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Descriptor flag: the chain continues at `next`.
pub const DESC_F_NEXT: u16 = vr::VRING_DESC_F_NEXT as u16;
/// Descriptor flag: the device writes this buffer.
pub const DESC_F_WRITE: u16 = vr::VRING_DESC_F_WRITE as u16;
/// Descriptor flag: the buffer is an indirect descriptor table.
pub const DESC_F_INDIRECT: u16 = vr::VRING_DESC_F_INDIRECT as u16;

/// A virtio-blk request type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// `VIRTIO_BLK_T_IN`: the device writes the data buffer.
    Read,
    /// `VIRTIO_BLK_T_OUT`.
    Write,
    /// `VIRTIO_BLK_T_FLUSH`.
    Flush,
    /// `VIRTIO_BLK_T_GET_ID`: the device writes up to 20 bytes of serial.
    GetId,
    /// `VIRTIO_BLK_T_DISCARD`: the data buffer holds [`Segment`]s.
    Discard,
    /// `VIRTIO_BLK_T_WRITE_ZEROES`: the data buffer holds [`Segment`]s.
    WriteZeroes,
    /// Any other type code; its data buffer (if any) is device-readable.
    Other(u32),
}

impl RequestType {
    /// The `VIRTIO_BLK_T_*` code.
    pub fn code(self) -> u32 {
        match self {
            RequestType::Read => vb::VIRTIO_BLK_T_IN,
            RequestType::Write => vb::VIRTIO_BLK_T_OUT,
            RequestType::Flush => vb::VIRTIO_BLK_T_FLUSH,
            RequestType::GetId => vb::VIRTIO_BLK_T_GET_ID,
            RequestType::Discard => vb::VIRTIO_BLK_T_DISCARD,
            RequestType::WriteZeroes => vb::VIRTIO_BLK_T_WRITE_ZEROES,
            RequestType::Other(c) => c,
        }
    }

    /// Whether the device writes the data buffer.
    pub fn device_writes_data(self) -> bool {
        matches!(self, RequestType::Read | RequestType::GetId)
    }
}

/// A discard / write-zeroes segment (`struct virtio_blk_discard_write_zeroes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// Flags (`VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP` = 1).
    pub flags: u32,
}

impl Segment {
    /// The 16 bytes of the segment.
    pub fn bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.sector.to_le_bytes());
        b[8..12].copy_from_slice(&self.num_sectors.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b
    }
}

/// A request built by [`BlkQueue::submit`]: header, optional data buffer
/// (`len` bytes of buffer slot `slot`), status byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Request type.
    pub kind: RequestType,
    /// Header sector field.
    pub sector: u64,
    /// Data buffer: (slot, length in bytes), or none.
    pub data: Option<(usize, u32)>,
}

/// Where a raw descriptor's `next` field points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawNext {
    /// The descriptor after this one in the slice passed to
    /// [`BlkQueue::submit_raw`] (0 for the last one).
    Following,
    /// The `k`-th descriptor of the slice (lets a chain loop).
    Nth(usize),
    /// This raw descriptor index, which may be outside the chain or the table.
    Index(u16),
}

/// A descriptor for [`BlkQueue::submit_raw`]; written as given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawDesc {
    /// Guest physical address (anything; the memory is `[0, mem_size)`).
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Flags (`DESC_F_*`, or anything else).
    pub flags: u16,
    /// The `next` field.
    pub next: RawNext,
}

impl RawDesc {
    /// A descriptor followed by the next one in the list (`RawNext::Following`).
    pub fn new(addr: u64, len: u32, flags: u16) -> Self {
        RawDesc {
            addr,
            len,
            flags,
            next: RawNext::Following,
        }
    }
}

/// A completed request, from the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Head descriptor index of the chain.
    pub id: u16,
    /// The caller's tag, given at submission.
    pub user_data: u64,
    /// The status byte, for requests built by [`BlkQueue::submit`]; `None`
    /// for raw chains (the caller knows where their status byte is).
    pub status: Option<u8>,
    /// The used length the backend reported (bytes it wrote into the chain).
    pub len: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Head {
    Free,
    Req,
    Raw,
}

/// The guest memory: a memfd mapped shared.
struct Memory {
    region: MmapRegion,
}

impl Memory {
    fn new(size: usize) -> Result<Memory> {
        let fd = memfd_create(c"dlsm-vhost-frontend", MemFdCreateFlag::MFD_CLOEXEC)
            .map_err(|e| Error::Mmap(format!("memfd_create: {e}")))?;
        let file = File::from(fd);
        file.set_len(size as u64)?;
        let region = MmapRegion::from_file(FileOffset::new(file, 0), size)
            .map_err(|e| Error::Mmap(format!("mmap: {e}")))?;
        Ok(Memory { region })
    }

    fn size(&self) -> u64 {
        self.region.size() as u64
    }
}

/// A connected vhost-user-blk device.
pub struct VhostBlkClient {
    frontend: Frontend,
    mem: Arc<Memory>,
    offered: u64,
    features: u64,
    protocol_features: u64,
    config: BlkConfig,
    queues: Vec<Option<BlkQueue>>,
}

impl VhostBlkClient {
    /// Connects to the vhost-user-blk socket at `path`, negotiates features,
    /// reads the config space, shares guest memory and starts
    /// `opts.num_queues` queues.
    pub fn connect(path: impl AsRef<Path>, opts: QueueOpts) -> Result<VhostBlkClient> {
        let qs = opts.queue_size;
        if qs == 0 || !qs.is_power_of_two() || qs > 32768 {
            return Err(Error::BadOpts(format!("queue_size {qs}")));
        }
        if opts.num_queues == 0 {
            return Err(Error::BadOpts("num_queues 0".into()));
        }
        let nq = usize::from(opts.num_queues);
        let mut frontend = Frontend::connect(path, nq as u64)?;
        frontend.set_owner()?;
        let offered = frontend.get_features()?;
        if offered & feature::VERSION_1 == 0 {
            return Err(Error::Missing("VIRTIO_F_VERSION_1"));
        }
        if offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(Error::Missing("VHOST_USER_F_PROTOCOL_FEATURES"));
        }
        if opts.event_idx && offered & feature::EVENT_IDX == 0 {
            return Err(Error::Missing("VIRTIO_RING_F_EVENT_IDX"));
        }
        let proto_offered = frontend.get_protocol_features()?;
        let proto = proto_offered
            & (VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK);
        if !proto.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(Error::Missing("VHOST_USER_PROTOCOL_F_CONFIG"));
        }
        frontend.set_protocol_features(proto)?;
        if proto.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every later message is acknowledged, so a backend's refusal
            // shows up as an error of the message that caused it.
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        if nq > 1 {
            if offered & feature::MQ == 0 {
                return Err(Error::Missing("VIRTIO_BLK_F_MQ"));
            }
            if !proto.contains(VhostUserProtocolFeatures::MQ) {
                return Err(Error::Missing("VHOST_USER_PROTOCOL_F_MQ"));
            }
        }
        if proto.contains(VhostUserProtocolFeatures::MQ) {
            let max = frontend.get_queue_num()?;
            if (nq as u64) > max {
                return Err(Error::BadOpts(format!(
                    "{nq} queues asked, backend has {max}"
                )));
            }
        }
        let (_, cfg) = frontend.get_config(
            0,
            CONFIG_LEN as u32,
            VhostUserConfigFlags::empty(),
            &[0u8; CONFIG_LEN],
        )?;
        let config = BlkConfig::parse(&cfg).ok_or(Error::Missing("a config space"))?;
        if nq > 1 && usize::from(config.num_queues) < nq {
            return Err(Error::BadOpts(format!(
                "{nq} queues asked, config space says {}",
                config.num_queues
            )));
        }

        let mut want = feature::VERSION_1
            | feature::PROTOCOL_FEATURES
            | feature::INDIRECT_DESC
            | feature::SIZE_MAX
            | feature::SEG_MAX
            | feature::RO
            | feature::BLK_SIZE
            | feature::FLUSH
            | feature::TOPOLOGY
            | feature::CONFIG_WCE
            | feature::DISCARD
            | feature::WRITE_ZEROES;
        if opts.event_idx {
            want |= feature::EVENT_IDX;
        }
        if nq > 1 {
            want |= feature::MQ;
        }
        let features = offered & want;
        frontend.set_features(features)?;

        let mut layouts = Vec::with_capacity(nq);
        let mut base = 0;
        for _ in 0..nq {
            let l = QueueLayout::new(base, qs, opts.buf_count, opts.buf_size);
            base = align_up(l.end, PAGE);
            layouts.push(l);
        }
        let size = usize::try_from(base.max(PAGE))
            .map_err(|_| Error::BadOpts("guest memory too large".into()))?;
        let mem = Arc::new(Memory::new(size)?);
        let hva = mem.region.as_ptr() as u64;
        let fd = mem
            .region
            .file_offset()
            .ok_or(Error::Mmap("no file".into()))?
            .file()
            .as_raw_fd();
        frontend.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: size as u64,
            userspace_addr: hva,
            mmap_offset: 0,
            mmap_handle: fd,
        }])?;

        let event_idx = features & feature::EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(nq);
        for (i, l) in layouts.into_iter().enumerate() {
            let q = BlkQueue::new(i as u16, mem.clone(), l, event_idx, Some(frontend.clone()))?;
            frontend.set_vring_num(i, qs)?;
            frontend.set_vring_base(i, 0)?;
            frontend.set_vring_addr(
                i,
                &VringConfigData {
                    queue_max_size: qs,
                    queue_size: qs,
                    flags: 0,
                    desc_table_addr: hva + l.desc,
                    used_ring_addr: hva + l.used,
                    avail_ring_addr: hva + l.avail,
                    log_addr: None,
                },
            )?;
            frontend.set_vring_call(i, &q.call)?;
            frontend.set_vring_kick(i, &q.kick)?;
            queues.push(Some(q));
        }
        for i in 0..nq {
            frontend.set_vring_enable(i, true)?;
        }
        Ok(VhostBlkClient {
            frontend,
            mem,
            offered,
            features,
            protocol_features: proto.bits(),
            config,
            queues,
        })
    }

    /// Device capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.config.capacity * SECTOR
    }

    /// The negotiated (acknowledged) virtio features.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The virtio features the backend offered.
    pub fn offered_features(&self) -> u64 {
        self.offered
    }

    /// The negotiated vhost-user protocol features.
    pub fn protocol_features(&self) -> u64 {
        self.protocol_features
    }

    /// The config space read at connect time.
    pub fn config(&self) -> &BlkConfig {
        &self.config
    }

    /// Re-reads the config space (e.g. after a resize).
    pub fn read_config(&mut self) -> Result<BlkConfig> {
        let (_, cfg) = self.frontend.get_config(
            0,
            CONFIG_LEN as u32,
            VhostUserConfigFlags::empty(),
            &[0u8; CONFIG_LEN],
        )?;
        self.config = BlkConfig::parse(&cfg).ok_or(Error::Missing("a config space"))?;
        Ok(self.config.clone())
    }

    /// Size of guest memory in bytes (valid addresses are `[0, mem_size)`).
    pub fn mem_size(&self) -> u64 {
        self.mem.size()
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Queue `i`. Panics if it was taken with [`Self::take_queues`].
    pub fn queue(&mut self, i: usize) -> &mut BlkQueue {
        self.queues[i].as_mut().expect("queue taken")
    }

    /// Moves the queues out (e.g. one per thread). Each keeps the connection
    /// open while it lives.
    pub fn take_queues(&mut self) -> Vec<BlkQueue> {
        self.queues.iter_mut().filter_map(Option::take).collect()
    }

    /// Stops queue `i` with `GET_VRING_BASE` and returns the backend's next
    /// available index (the count of requests it took, mod 2^16).
    pub fn stop_queue(&mut self, i: usize) -> Result<u32> {
        Ok(self.frontend.get_vring_base(i)?)
    }
}

/// One virtqueue of a [`VhostBlkClient`], with its buffers.
pub struct BlkQueue {
    index: u16,
    mem: Arc<Memory>,
    l: QueueLayout,
    event_idx: bool,
    kick: EventFd,
    call: EventFd,
    epoll: Epoll,
    /// Free descriptor indices (a stack).
    free: Vec<u16>,
    /// Shadow of each chain's descriptor indices: `chain[i]` is the next
    /// index after `i` in the chain we built (not what the device sees).
    chain: Vec<u16>,
    chain_len: Vec<u16>,
    head: Vec<Head>,
    user_data: Vec<u64>,
    in_flight: usize,
    /// Next available ring index to publish.
    avail_idx: u16,
    /// Available index at the last notification decision.
    kicked_idx: u16,
    /// Next used ring index to read.
    last_used: u16,
    /// Keeps the vhost-user connection open while the queue lives.
    _conn: Option<Frontend>,
}

impl BlkQueue {
    fn new(
        index: u16,
        mem: Arc<Memory>,
        l: QueueLayout,
        event_idx: bool,
        conn: Option<Frontend>,
    ) -> Result<BlkQueue> {
        let n = usize::from(l.size);
        let call = EventFd::new(0)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            call.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )?;
        let q = BlkQueue {
            index,
            mem,
            l,
            event_idx,
            kick: EventFd::new(0)?,
            call,
            epoll,
            free: (0..l.size).rev().collect(),
            chain: vec![0; n],
            chain_len: vec![0; n],
            head: vec![Head::Free; n],
            user_data: vec![0; n],
            in_flight: 0,
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
            _conn: conn,
        };
        q.zero(l.desc, (l.bufs - l.desc) as usize)?;
        Ok(q)
    }

    fn zero(&self, addr: u64, len: usize) -> Result<()> {
        self.write_mem(addr, &vec![0u8; len])
    }

    fn m(&self) -> vm_memory::VolatileSlice<'_> {
        self.mem.region.as_volatile_slice()
    }

    /// Queue index.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.l.size
    }

    /// The queue's layout in guest memory.
    pub fn layout(&self) -> &QueueLayout {
        &self.l
    }

    /// Requests submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Free descriptors.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Number of buffer slots.
    pub fn buf_count(&self) -> usize {
        self.l.buf_count
    }

    /// Bytes per buffer slot.
    pub fn buf_size(&self) -> usize {
        self.l.buf_stride as usize
    }

    /// Guest physical address of buffer slot `slot`.
    pub fn buf_addr(&self, slot: usize) -> u64 {
        self.l.bufs + self.l.buf_stride * slot as u64
    }

    fn check_slot(&self, slot: usize, off: usize, len: usize) -> Result<()> {
        if slot >= self.l.buf_count || off.saturating_add(len) > self.buf_size() {
            return Err(Error::BadSlot { slot, len });
        }
        Ok(())
    }

    /// Copies `data` into buffer slot `slot` at `off`.
    pub fn write_buf(&self, slot: usize, off: usize, data: &[u8]) -> Result<()> {
        self.check_slot(slot, off, data.len())?;
        self.write_mem(self.buf_addr(slot) + off as u64, data)
    }

    /// Copies from buffer slot `slot` at `off` into `out`.
    pub fn read_buf(&self, slot: usize, off: usize, out: &mut [u8]) -> Result<()> {
        self.check_slot(slot, off, out.len())?;
        self.read_mem(self.buf_addr(slot) + off as u64, out)
    }

    /// Writes anywhere in guest memory (including other queues' rings).
    pub fn write_mem(&self, addr: u64, data: &[u8]) -> Result<()> {
        Ok(self.m().write_slice(data, addr as usize)?)
    }

    /// Reads anywhere in guest memory.
    pub fn read_mem(&self, addr: u64, out: &mut [u8]) -> Result<()> {
        Ok(self.m().read_slice(out, addr as usize)?)
    }

    /// Guest physical address of the status byte of the request whose chain
    /// starts at descriptor `head`.
    pub fn status_addr(&self, head: u16) -> u64 {
        self.l.status + u64::from(head)
    }

    /// Guest physical address of the header of the request whose chain
    /// starts at descriptor `head`.
    pub fn hdr_addr(&self, head: u16) -> u64 {
        self.l.hdr + 16 * u64::from(head)
    }

    fn alloc(&mut self, n: usize) -> Result<Vec<u16>> {
        if n == 0 || self.free.len() < n {
            return Err(Error::QueueFull);
        }
        let at = self.free.len() - n;
        let mut idx = self.free.split_off(at);
        idx.reverse();
        Ok(idx)
    }

    fn write_desc(&self, i: u16, d: [u8; 16]) -> Result<()> {
        self.write_mem(self.l.desc + 16 * u64::from(i), &d)
    }

    /// Puts `head` in the available ring and makes it visible (no kick).
    fn publish(&mut self, head: u16) -> Result<()> {
        let slot = u64::from(self.avail_idx % self.l.size);
        let next = self.avail_idx.wrapping_add(1);
        let m = self.m();
        m.store(
            head,
            (self.l.avail + 4 + 2 * slot) as usize,
            Ordering::Relaxed,
        )?;
        // Release: the descriptors, header and ring entry are visible before
        // the index that hands them over.
        m.store(next, (self.l.avail + 2) as usize, Ordering::Release)?;
        self.avail_idx = next;
        Ok(())
    }

    fn track(&mut self, idx: &[u16], kind: Head, user_data: u64) {
        for w in idx.windows(2) {
            self.chain[usize::from(w[0])] = w[1];
        }
        let h = usize::from(idx[0]);
        self.chain_len[h] = idx.len() as u16;
        self.head[h] = kind;
        self.user_data[h] = user_data;
        self.in_flight += 1;
    }

    /// Submits a request (header, optional data buffer, status byte) and
    /// publishes it; call [`Self::kick`] to notify the backend. Returns the
    /// chain's head index (also [`Completion::id`]).
    pub fn submit(&mut self, req: &Request, user_data: u64) -> Result<u16> {
        if let Some((slot, len)) = req.data {
            self.check_slot(slot, 0, len as usize)?;
        }
        let n = if req.data.is_some() { 3 } else { 2 };
        let idx = self.alloc(n)?;
        let head = idx[0];
        self.write_mem(
            self.hdr_addr(head),
            &req_header(req.kind.code(), req.sector),
        )?;
        self.write_mem(self.status_addr(head), &[status::UNWRITTEN])?;
        self.write_desc(
            head,
            desc_bytes(self.hdr_addr(head), 16, DESC_F_NEXT, idx[1]),
        )?;
        if let Some((slot, len)) = req.data {
            let flags = if req.kind.device_writes_data() {
                DESC_F_NEXT | DESC_F_WRITE
            } else {
                DESC_F_NEXT
            };
            self.write_desc(idx[1], desc_bytes(self.buf_addr(slot), len, flags, idx[2]))?;
        }
        let last = idx[n - 1];
        self.write_desc(last, desc_bytes(self.status_addr(head), 1, DESC_F_WRITE, 0))?;
        self.track(&idx, Head::Req, user_data);
        self.publish(head)?;
        Ok(head)
    }

    /// Reads `len` bytes at byte offset `offset` into buffer slot `slot`.
    pub fn read(&mut self, offset: u64, slot: usize, len: u32, user_data: u64) -> Result<u16> {
        self.submit(
            &Request {
                kind: RequestType::Read,
                sector: offset / SECTOR,
                data: Some((slot, len)),
            },
            user_data,
        )
    }

    /// Writes `len` bytes of buffer slot `slot` at byte offset `offset`.
    pub fn write(&mut self, offset: u64, slot: usize, len: u32, user_data: u64) -> Result<u16> {
        self.submit(
            &Request {
                kind: RequestType::Write,
                sector: offset / SECTOR,
                data: Some((slot, len)),
            },
            user_data,
        )
    }

    /// Flushes the device's write cache.
    pub fn flush(&mut self, user_data: u64) -> Result<u16> {
        self.submit(
            &Request {
                kind: RequestType::Flush,
                sector: 0,
                data: None,
            },
            user_data,
        )
    }

    /// Reads the device id (serial, up to 20 bytes) into buffer slot `slot`.
    pub fn get_id(&mut self, slot: usize, user_data: u64) -> Result<u16> {
        self.submit(
            &Request {
                kind: RequestType::GetId,
                sector: 0,
                data: Some((slot, vb::VIRTIO_BLK_ID_BYTES)),
            },
            user_data,
        )
    }

    fn segments(
        &mut self,
        kind: RequestType,
        slot: usize,
        segs: &[Segment],
        user_data: u64,
    ) -> Result<u16> {
        let bytes: Vec<u8> = segs.iter().flat_map(|s| s.bytes()).collect();
        self.write_buf(slot, 0, &bytes)?;
        self.submit(
            &Request {
                kind,
                sector: 0,
                data: Some((slot, bytes.len() as u32)),
            },
            user_data,
        )
    }

    /// Discards `segs` (their table is written into buffer slot `slot`).
    pub fn discard(&mut self, slot: usize, segs: &[Segment], user_data: u64) -> Result<u16> {
        self.segments(RequestType::Discard, slot, segs, user_data)
    }

    /// Writes zeroes over `segs` (their table is written into buffer slot
    /// `slot`; flag 1 = may unmap).
    pub fn write_zeroes(&mut self, slot: usize, segs: &[Segment], user_data: u64) -> Result<u16> {
        self.segments(RequestType::WriteZeroes, slot, segs, user_data)
    }

    /// Submits an arbitrary descriptor chain, written as given into freshly
    /// allocated descriptor slots, and publishes its head. The descriptors
    /// are freed when the backend returns the head in the used ring, whatever
    /// their `next` fields said. Returns the head index.
    pub fn submit_raw(&mut self, descs: &[RawDesc], user_data: u64) -> Result<u16> {
        let idx = self.alloc(descs.len())?;
        for (k, d) in descs.iter().enumerate() {
            let next = match d.next {
                RawNext::Following => idx.get(k + 1).copied().unwrap_or(0),
                RawNext::Nth(j) => *idx.get(j).ok_or(Error::BadOpts(format!(
                    "RawNext::Nth({j}) of a {}-descriptor chain",
                    descs.len()
                )))?,
                RawNext::Index(i) => i,
            };
            self.write_desc(idx[k], desc_bytes(d.addr, d.len, d.flags, next))?;
        }
        self.track(&idx, Head::Raw, user_data);
        let head = idx[0];
        self.publish(head)?;
        Ok(head)
    }

    /// Puts `head` in the available ring without allocating or writing any
    /// descriptor (e.g. an index outside the queue, or one already in
    /// flight). The queue does not expect a completion for it: if the
    /// backend returns one, [`Self::poll`] reports [`Error::UnexpectedUsed`].
    pub fn publish_raw_head(&mut self, head: u16) -> Result<()> {
        self.publish(head)
    }

    /// Notifies the backend of newly published requests, unless it asked not
    /// to be (event index / `VRING_USED_F_NO_NOTIFY`). Returns whether it
    /// wrote the kick eventfd.
    pub fn kick(&mut self) -> Result<bool> {
        if self.avail_idx == self.kicked_idx {
            return Ok(false);
        }
        // The index store must be visible before reading the backend's
        // suppression state, or both sides may decide not to notify.
        fence(Ordering::SeqCst);
        let m = self.m();
        let need = if self.event_idx {
            let ev: u16 = m.load(
                (self.l.used + 4 + 8 * u64::from(self.l.size)) as usize,
                Ordering::Acquire,
            )?;
            vring_need_event(ev, self.avail_idx, self.kicked_idx)
        } else {
            let flags: u16 = m.load(self.l.used as usize, Ordering::Acquire)?;
            flags & vr::VRING_USED_F_NO_NOTIFY as u16 == 0
        };
        self.kicked_idx = self.avail_idx;
        if need {
            self.kick.write(1)?;
        }
        Ok(need)
    }

    fn used_idx(&self) -> Result<u16> {
        Ok(self
            .m()
            .load((self.l.used + 2) as usize, Ordering::Acquire)?)
    }

    /// Reaps whatever completions are in the used ring, without blocking;
    /// appends them to `out` and returns how many.
    pub fn poll(&mut self, out: &mut Vec<Completion>) -> Result<usize> {
        let used_idx = self.used_idx()?;
        let mut n = 0;
        while self.last_used != used_idx {
            let e = self.l.used + 4 + 8 * u64::from(self.last_used % self.l.size);
            let mut el = [0u8; 8];
            self.read_mem(e, &mut el)?;
            self.last_used = self.last_used.wrapping_add(1);
            let id = u32::from_le_bytes(el[0..4].try_into().unwrap());
            let len = u32::from_le_bytes(el[4..8].try_into().unwrap());
            let h = id as usize;
            if h >= self.head.len() || self.head[h] == Head::Free {
                return Err(Error::UnexpectedUsed { id, len });
            }
            let head = id as u16;
            let status = if self.head[h] == Head::Req {
                let mut s = [0u8];
                self.read_mem(self.status_addr(head), &mut s)?;
                Some(s[0])
            } else {
                None
            };
            let mut i = head;
            for _ in 0..self.chain_len[h] {
                self.free.push(i);
                i = self.chain[usize::from(i)];
            }
            self.head[h] = Head::Free;
            self.in_flight -= 1;
            out.push(Completion {
                id: head,
                user_data: self.user_data[h],
                status,
                len,
            });
            n += 1;
        }
        Ok(n)
    }

    /// Submits `req`, kicks, and waits up to `timeout` for its completion
    /// (the queue must have nothing else in flight).
    pub fn submit_and_wait(
        &mut self,
        req: &Request,
        timeout: Option<Duration>,
    ) -> Result<Completion> {
        self.submit(req, 0)?;
        self.kick()?;
        let mut out = Vec::new();
        self.wait(&mut out, 1, timeout)?;
        Ok(out[0])
    }

    /// Reaps completions until at least `min` (at most the number in flight)
    /// arrived, sleeping on the call eventfd in between; `None` waits
    /// forever. Returns how many were appended to `out`.
    pub fn wait(
        &mut self,
        out: &mut Vec<Completion>,
        min: usize,
        timeout: Option<Duration>,
    ) -> Result<usize> {
        let min = min.min(self.in_flight);
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut got = self.poll(out)?;
        while got < min {
            if self.event_idx {
                // Ask for a call when the next element is used.
                let at = (self.l.avail + 4 + 2 * u64::from(self.l.size)) as usize;
                self.m().store(self.last_used, at, Ordering::Relaxed)?;
            }
            fence(Ordering::SeqCst);
            if self.used_idx()? != self.last_used {
                got += self.poll(out)?;
                continue;
            }
            match deadline {
                None => {
                    self.call.read()?;
                }
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(Error::Timeout);
                    }
                    let ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
                    let mut ev = [EpollEvent::default()];
                    match self.epoll.wait(ms, &mut ev) {
                        Ok(0) => {}
                        Ok(_) => {
                            self.call.read()?;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            got += self.poll(out)?;
        }
        Ok(got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detached(size: u16, event_idx: bool) -> BlkQueue {
        let l = QueueLayout::new(0, size, 4, 4096);
        let mem = Arc::new(Memory::new(l.end as usize).unwrap());
        BlkQueue::new(0, mem, l, event_idx, None).unwrap()
    }

    fn desc(q: &BlkQueue, i: u16) -> (u64, u32, u16, u16) {
        let mut d = [0u8; 16];
        q.read_mem(q.l.desc + 16 * u64::from(i), &mut d).unwrap();
        (
            u64::from_le_bytes(d[0..8].try_into().unwrap()),
            u32::from_le_bytes(d[8..12].try_into().unwrap()),
            u16::from_le_bytes(d[12..14].try_into().unwrap()),
            u16::from_le_bytes(d[14..16].try_into().unwrap()),
        )
    }

    fn avail(q: &BlkQueue) -> (u16, Vec<u16>) {
        let m = q.m();
        let idx: u16 = m.load((q.l.avail + 2) as usize, Ordering::Relaxed).unwrap();
        let ring = (0..q.l.size)
            .map(|i| {
                m.load(
                    (q.l.avail + 4 + 2 * u64::from(i)) as usize,
                    Ordering::Relaxed,
                )
                .unwrap()
            })
            .collect();
        (idx, ring)
    }

    /// Plays the device: puts (id, len) in the used ring.
    fn complete(q: &BlkQueue, id: u32, len: u32) {
        let m = q.m();
        let idx: u16 = m.load((q.l.used + 2) as usize, Ordering::Relaxed).unwrap();
        let e = q.l.used + 4 + 8 * u64::from(idx % q.l.size);
        let mut el = [0u8; 8];
        el[0..4].copy_from_slice(&id.to_le_bytes());
        el[4..8].copy_from_slice(&len.to_le_bytes());
        q.write_mem(e, &el).unwrap();
        m.store(
            idx.wrapping_add(1),
            (q.l.used + 2) as usize,
            Ordering::Release,
        )
        .unwrap();
    }

    #[test]
    fn layout_is_aligned_and_disjoint() {
        for size in [1u16, 2, 8, 128, 256, 1024, 32768] {
            let l = QueueLayout::new(8192, size, 3, 5000);
            let n = u64::from(size);
            assert_eq!(l.desc, 8192);
            assert_eq!(l.desc % 16, 0);
            assert_eq!(l.avail, l.desc + 16 * n);
            assert_eq!(l.avail % 2, 0);
            assert_eq!(l.used % 4, 0);
            assert!(l.used >= l.avail + 6 + 2 * n);
            assert!(l.hdr >= l.used + 6 + 8 * n);
            assert_eq!(l.hdr % 16, 0);
            assert_eq!(l.status, l.hdr + 16 * n);
            assert!(l.bufs >= l.status + n);
            assert_eq!(l.bufs % PAGE, 0);
            assert_eq!(l.buf_stride, 8192);
            assert_eq!(l.end, l.bufs + 3 * 8192);
        }
    }

    #[test]
    fn encodings() {
        let d = desc_bytes(0x1122_3344_5566_7788, 0x99aa_bbcc, 0x0003, 0x0102);
        assert_eq!(
            d,
            [
                0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 0xcc, 0xbb, 0xaa, 0x99, 0x03, 0x00,
                0x02, 0x01
            ]
        );
        let h = req_header(1, 0x10);
        assert_eq!(h, [1, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0]);
        let s = Segment {
            sector: 2,
            num_sectors: 3,
            flags: 1,
        };
        assert_eq!(s.bytes(), [2, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0]);
    }

    #[test]
    fn need_event() {
        // The device asked to be kicked when index 5 is published.
        assert!(vring_need_event(5, 6, 5));
        assert!(vring_need_event(5, 8, 4));
        assert!(!vring_need_event(5, 5, 4));
        assert!(!vring_need_event(5, 9, 6));
        // Wrap-around.
        assert!(vring_need_event(u16::MAX, 1, u16::MAX - 1));
        assert!(!vring_need_event(3, 2, u16::MAX));
    }

    #[test]
    fn config_parse() {
        let mut b = [0u8; CONFIG_LEN];
        b[0..8].copy_from_slice(&2048u64.to_le_bytes());
        b[12..16].copy_from_slice(&126u32.to_le_bytes());
        b[20..24].copy_from_slice(&512u32.to_le_bytes());
        b[32] = 1;
        b[34..36].copy_from_slice(&4u16.to_le_bytes());
        b[40..44].copy_from_slice(&1u32.to_le_bytes());
        b[56] = 1;
        let c = BlkConfig::parse(&b).unwrap();
        assert_eq!(c.capacity, 2048);
        assert_eq!(c.seg_max, 126);
        assert_eq!(c.blk_size, 512);
        assert_eq!(c.wce, 1);
        assert_eq!(c.num_queues, 4);
        assert_eq!(c.max_discard_seg, 1);
        assert_eq!(c.write_zeroes_may_unmap, 1);
        assert!(BlkConfig::parse(&b[..59]).is_none());
    }

    #[test]
    fn read_builds_a_three_descriptor_chain() {
        let mut q = detached(8, true);
        let head = q.read(4096, 1, 4096, 77).unwrap();
        let (h_addr, h_len, h_flags, h_next) = desc(&q, head);
        assert_eq!(
            (h_addr, h_len, h_flags),
            (q.hdr_addr(head), 16, DESC_F_NEXT)
        );
        let (d_addr, d_len, d_flags, d_next) = desc(&q, h_next);
        assert_eq!(
            (d_addr, d_len, d_flags),
            (q.buf_addr(1), 4096, DESC_F_NEXT | DESC_F_WRITE)
        );
        let (s_addr, s_len, s_flags, _) = desc(&q, d_next);
        assert_eq!(
            (s_addr, s_len, s_flags),
            (q.status_addr(head), 1, DESC_F_WRITE)
        );
        let mut hdr = [0u8; 16];
        q.read_mem(q.hdr_addr(head), &mut hdr).unwrap();
        assert_eq!(hdr, req_header(vb::VIRTIO_BLK_T_IN, 8));
        let (idx, ring) = avail(&q);
        assert_eq!((idx, ring[0]), (1, head));
        assert_eq!(q.free_descriptors(), 5);
        assert_eq!(q.in_flight(), 1);

        // Device completes it with OK.
        q.write_mem(q.status_addr(head), &[status::OK]).unwrap();
        complete(&q, u32::from(head), 4097);
        let mut out = Vec::new();
        assert_eq!(q.poll(&mut out).unwrap(), 1);
        assert_eq!(
            out[0],
            Completion {
                id: head,
                user_data: 77,
                status: Some(status::OK),
                len: 4097
            }
        );
        assert_eq!(q.free_descriptors(), 8);
        assert_eq!(q.in_flight(), 0);
    }

    #[test]
    fn write_and_flush_directions() {
        let mut q = detached(8, false);
        let w = q.write(0, 0, 512, 1).unwrap();
        let (_, _, _, n) = desc(&q, w);
        assert_eq!(desc(&q, n).2, DESC_F_NEXT); // data is device-readable
        let f = q.flush(2).unwrap();
        let (_, len, flags, next) = desc(&q, f);
        assert_eq!((len, flags), (16, DESC_F_NEXT));
        assert_eq!(desc(&q, next), (q.status_addr(f), 1, DESC_F_WRITE, 0));
        assert_eq!(q.free_descriptors(), 3);
        // Two reads don't fit into the three descriptors left... one does.
        q.read(0, 0, 512, 3).unwrap();
        assert!(matches!(q.read(0, 0, 512, 4), Err(Error::QueueFull)));
        assert!(matches!(
            q.read(0, 4, 512, 4),
            Err(Error::BadSlot { slot: 4, .. })
        ));
        // Completed out of order.
        complete(&q, u32::from(f), 1);
        complete(&q, u32::from(w), 1);
        let mut out = Vec::new();
        q.poll(&mut out).unwrap();
        assert_eq!(
            out.iter().map(|c| c.user_data).collect::<Vec<_>>(),
            vec![2, 1]
        );
        assert_eq!(q.free_descriptors(), 5);
    }

    #[test]
    fn raw_chains_can_loop_and_leave_memory() {
        let mut q = detached(8, true);
        let descs = [
            RawDesc {
                addr: u64::MAX - 3,
                len: 16,
                flags: DESC_F_NEXT,
                next: RawNext::Following,
            },
            RawDesc {
                addr: 0,
                len: 1,
                flags: DESC_F_NEXT | DESC_F_WRITE,
                next: RawNext::Nth(0),
            },
        ];
        let head = q.submit_raw(&descs, 9).unwrap();
        let (a0, _, f0, n0) = desc(&q, head);
        assert_eq!((a0, f0), (u64::MAX - 3, DESC_F_NEXT));
        let (_, _, f1, n1) = desc(&q, n0);
        assert_eq!(f1, DESC_F_NEXT | DESC_F_WRITE);
        assert_eq!(n1, head); // the loop
        complete(&q, u32::from(head), 0);
        let mut out = Vec::new();
        q.poll(&mut out).unwrap();
        assert_eq!(out[0].status, None);
        assert_eq!(out[0].user_data, 9);
        assert_eq!(q.free_descriptors(), 8);

        // An index the queue never handed out.
        q.publish_raw_head(200).unwrap();
        complete(&q, 200, 0);
        assert!(matches!(
            q.poll(&mut out),
            Err(Error::UnexpectedUsed { id: 200, .. })
        ));
    }

    #[test]
    fn kick_suppression() {
        let mut q = detached(8, true);
        // avail_event = 0: the device wants a kick for the first request.
        q.flush(0).unwrap();
        assert!(q.kick().unwrap());
        assert!(!q.kick().unwrap()); // nothing new
                                     // avail_event still 0: index 1 -> 2 doesn't cross it.
        q.flush(0).unwrap();
        assert!(!q.kick().unwrap());
        // The device asks for a kick at index 2.
        let at = (q.l.used + 4 + 8 * 8) as usize;
        q.m().store(2u16, at, Ordering::Relaxed).unwrap();
        q.flush(0).unwrap();
        assert!(q.kick().unwrap());

        let mut q = detached(8, false);
        q.flush(0).unwrap();
        assert!(q.kick().unwrap());
        q.m()
            .store(
                vr::VRING_USED_F_NO_NOTIFY as u16,
                q.l.used as usize,
                Ordering::Relaxed,
            )
            .unwrap();
        q.flush(0).unwrap();
        assert!(!q.kick().unwrap());
    }

    #[test]
    fn wait_times_out_and_sets_used_event() {
        let mut q = detached(8, true);
        q.flush(5).unwrap();
        let mut out = Vec::new();
        let t = Instant::now();
        assert!(matches!(
            q.wait(&mut out, 1, Some(Duration::from_millis(30))),
            Err(Error::Timeout)
        ));
        assert!(t.elapsed() >= Duration::from_millis(30));
        let ue: u16 = q
            .m()
            .load((q.l.avail + 4 + 2 * 8) as usize, Ordering::Relaxed)
            .unwrap();
        assert_eq!(ue, 0);
        complete(&q, 0, 1);
        q.call.write(1).unwrap();
        assert_eq!(
            q.wait(&mut out, 1, Some(Duration::from_secs(5))).unwrap(),
            1
        );
        assert_eq!(out[0].user_data, 5);
    }
}
