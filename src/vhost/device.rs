//! One volume as a virtio-blk device behind vhost-user: features, config
//! space, and the queues' request loop.
//!
//! The frontend (QEMU) owns the device model and hands this node the
//! guest's memory and virtqueues. Each queue has its own worker thread
//! (made by `vhost-user-backend`), which pops every available chain,
//! checks it ([`super::request::parse`]) and spawns its I/O on the node's
//! Tokio runtime, so many requests of many queues are in flight at once and
//! a slow one (an on-demand fetch from a migration's source) holds up no
//! other. I/O reads and writes guest buffers in place: a single-buffer
//! request goes straight between the file and guest memory.
//!
//! The device reaches the volume only through the [`BlockTarget`] the NBD
//! server uses (the fence gate over the live table), so a migration's
//! clone, handoff on first write and fencing apply unchanged.
//!
//! Live migration of the VM: guest pages this device writes (read data,
//! status bytes, used ring) are marked in QEMU's dirty log while logging is
//! on ([`GuestMemoryMmap<BitmapMmapRegion>`] marks every write made through
//! vm-memory; in-place writes mark theirs by hand). `GET_VRING_BASE`
//! stops a queue only once its requests in flight have completed
//! ([`VhostUserBackend::stop_vring`]), so none is lost in the move.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use tracing::{debug, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::request::{self, byte_range, Op, Request, ID_LEN, MAX_RANGES, SECTOR};
use crate::target::{BlockError, BlockTarget, ZeroFlags};

/// Guest memory as this device maps it: every region carries the dirty
/// log QEMU hands over for live migration.
pub type GuestMem = GuestMemoryMmap<BitmapMmapRegion>;
type AtomicMem = GuestMemoryAtomic<GuestMem>;

/// Largest virtqueue the device accepts.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Largest single data buffer (`size_max`): with [`SEG_MAX`] buffers a
/// request stays under [`MAX_REQUEST`], so a guest never builds one the
/// device refuses.
const SIZE_MAX: u32 = 256 << 10;
/// Most data buffers per request (`seg_max`): Linux wants at most
/// queue size - 2, and QEMU's default queue has 128 entries.
const SEG_MAX: u32 = 126;
/// Most data one read or write may carry (as NBD's largest request): a
/// guest's descriptors can name gigabytes, which must not become a buffer.
pub const MAX_REQUEST: u64 = 32 << 20;
/// How long `GET_VRING_BASE` waits for requests in flight before giving up
/// on them (an origin that stopped answering mid-migration).
const STOP_WAIT: Duration = Duration::from_secs(60);

/// How an export is set up.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// The volume's name: the GET_ID answer and the log's label.
    pub name: String,
    /// Queues offered (`num_queues`); the frontend may use fewer.
    pub num_queues: usize,
    /// The export refuses writes.
    pub read_only: bool,
    /// The guest's write-cache setting (CONFIG_WCE), shared by every
    /// connection to the socket: QEMU does not send it again when it
    /// reconnects, so it must outlive the device of one connection.
    pub writeback: Arc<AtomicBool>,
}

impl DeviceConfig {
    /// A configuration with the write cache on (the virtio default).
    pub fn new(name: &str, num_queues: usize, read_only: bool) -> Self {
        DeviceConfig {
            name: name.to_owned(),
            num_queues,
            read_only,
            writeback: Arc::new(AtomicBool::new(true)),
        }
    }
}

/// A volume as a vhost-user-blk device (cheap to clone: one shared state).
#[derive(Clone)]
pub struct BlockDevice(Arc<Inner>);

struct Inner {
    cfg: DeviceConfig,
    target: Arc<dyn BlockTarget>,
    size: u64,
    rt: tokio::runtime::Handle,
    mem: RwLock<Option<AtomicMem>>,
    event_idx: AtomicBool,
    acked: AtomicU64,
    /// Per worker thread: the event that stops it.
    exits: Vec<(EventConsumer, EventNotifier)>,
    /// Per queue: requests popped and not yet completed.
    in_flight: Vec<InFlight>,
    /// Per queue: its ring as last served, to report where it stopped.
    rings: Vec<Mutex<Option<VringRwLock<AtomicMem>>>>,
    /// The frontend's connection ended: requests still in flight finish
    /// their I/O but write nothing more into guest memory (QEMU takes the
    /// used index it finds as the ring position and offers again every
    /// request not answered, possibly to the next connection).
    gone: AtomicBool,
}

#[derive(Default)]
struct InFlight {
    n: Mutex<usize>,
    zero: Condvar,
    /// Offers were left in the ring because the queue had as many
    /// requests in flight as it has entries: the next completion pops them.
    held_back: AtomicBool,
}

/// What one pass over a queue did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Popped everything offered.
    Drained,
    /// Stopped at the in-flight bound; a completion resumes the queue.
    Full,
    /// The queue is stopped (GET_VRING_BASE): nothing may be popped.
    Stopped,
}

impl InFlight {
    fn leave(&self) {
        let mut n = self.n.lock().unwrap();
        *n -= 1;
        if *n == 0 {
            self.zero.notify_all();
        }
    }
    fn wait_idle(&self, limit: Duration) -> bool {
        let n = self.n.lock().unwrap();
        let (n, _) = self.zero.wait_timeout_while(n, limit, |n| *n > 0).unwrap();
        *n == 0
    }
}

impl BlockDevice {
    /// A device over `target`, whose I/O runs on `rt`.
    pub fn new(
        cfg: DeviceConfig,
        target: Arc<dyn BlockTarget>,
        rt: tokio::runtime::Handle,
    ) -> io::Result<Self> {
        let queues = cfg.num_queues.clamp(1, 64);
        let exits = (0..queues)
            .map(|_| new_event_consumer_and_notifier(EventFlag::NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        let read_only = cfg.read_only || target.capabilities().read_only;
        Ok(BlockDevice(Arc::new(Inner {
            cfg: DeviceConfig {
                num_queues: queues,
                read_only,
                ..cfg
            },
            size: target.size(),
            target,
            rt,
            mem: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            acked: AtomicU64::new(0),
            exits,
            in_flight: (0..queues).map(|_| InFlight::default()).collect(),
            rings: (0..queues).map(|_| Mutex::new(None)).collect(),
            gone: AtomicBool::new(false),
        })))
    }

    /// Stops every worker thread (the connection is gone): requests still
    /// in flight finish their I/O but write nothing into guest memory.
    pub fn stop_workers(&self) {
        self.0.gone.store(true, Ordering::SeqCst);
        for (_, notify) in &self.0.exits {
            let _ = notify.notify();
        }
    }

    /// Waits up to `limit` for every request in flight to finish: whether
    /// none is left. (A gone frontend's writes must not land after those
    /// of the next frontend, which may write the same blocks.)
    pub fn wait_idle(&self, limit: Duration) -> bool {
        let until = std::time::Instant::now() + limit;
        self.0
            .in_flight
            .iter()
            .all(|f| f.wait_idle(until.saturating_duration_since(std::time::Instant::now())))
    }

    /// The config space (`struct virtio_blk_config`), as this device fills it.
    pub fn config_space(&self) -> [u8; 60] {
        config_space(
            self.0.size,
            self.0.cfg.num_queues as u16,
            self.0.cfg.writeback.load(Ordering::Relaxed),
        )
    }
}

/// `struct virtio_blk_config` (virtio 1.2, 5.2.4), little endian.
pub fn config_space(size: u64, num_queues: u16, writeback: bool) -> [u8; 60] {
    let mut c = [0u8; 60];
    let sectors = size / SECTOR;
    c[0..8].copy_from_slice(&sectors.to_le_bytes()); // capacity
    c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes()); // size_max
    c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes()); // seg_max
                                                       // geometry (16..20) unused.
    c[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes()); // blk_size
    c[24] = 3; // physical_block_exp: 4 KiB physical blocks
    c[25] = 0; // alignment_offset
    c[26..28].copy_from_slice(&8u16.to_le_bytes()); // min_io_size (sectors)
    c[28..32].copy_from_slice(&0u32.to_le_bytes()); // opt_io_size
    c[32] = u8::from(writeback);
    c[34..36].copy_from_slice(&num_queues.to_le_bytes());
    let max_sectors = u32::try_from(sectors).unwrap_or(u32::MAX);
    c[36..40].copy_from_slice(&max_sectors.to_le_bytes()); // max_discard_sectors
    c[40..44].copy_from_slice(&MAX_RANGES.to_le_bytes()); // max_discard_seg
    c[44..48].copy_from_slice(&8u32.to_le_bytes()); // discard_sector_alignment
    c[48..52].copy_from_slice(&max_sectors.to_le_bytes()); // max_write_zeroes_sectors
    c[52..56].copy_from_slice(&MAX_RANGES.to_le_bytes()); // max_write_zeroes_seg
    c[56] = 1; // write_zeroes_may_unmap
    c
}

impl VhostUserBackend for BlockDevice {
    type Bitmap = BitmapMmapRegion;
    type Vring = VringRwLock<AtomicMem>;

    fn num_queues(&self) -> usize {
        self.0.cfg.num_queues
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE as usize
    }

    fn features(&self) -> u64 {
        let mut f = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_TOPOLOGY
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_CONFIG_WCE
            | 1 << VIRTIO_BLK_F_MQ
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits();
        if self.0.cfg.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    fn acked_features(&self, features: u64) {
        self.0.acked.store(features, Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        self.0.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let c = self.config_space();
        let (o, s) = (offset as usize, size as usize);
        let mut out = vec![0u8; s];
        if o < c.len() {
            let n = s.min(c.len() - o);
            out[..n].copy_from_slice(&c[o..o + n]);
        }
        out
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only the write-cache byte is writable (CONFIG_WCE).
        if offset == 32 && buf.len() == 1 {
            self.0.cfg.writeback.store(buf[0] != 0, Ordering::Relaxed);
            debug!(volume = %self.0.cfg.name, writeback = buf[0] != 0, "vhost-user: write cache");
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("config bytes [{offset}, +{}) are read-only", buf.len()),
        ))
    }

    fn update_memory(&self, mem: AtomicMem) -> io::Result<()> {
        {
            let m = mem.memory();
            info!(volume = %self.0.cfg.name, regions = m.num_regions(),
                  bytes = m.iter().map(vm_memory::GuestMemoryRegion::len).sum::<u64>(), "vhost-user: guest memory table");
        }
        *self.0.mem.write().unwrap() = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker thread per queue.
        (0..self.0.cfg.num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (c, n) = self.0.exits.get(thread_index)?;
        Some((c.try_clone().ok()?, n.try_clone().ok()?))
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        if let Some(f) = self.0.in_flight.get(queue_index as usize) {
            if !f.wait_idle(STOP_WAIT) {
                warn!(volume = %self.0.cfg.name, queue = queue_index,
                      "vhost-user: requests still in flight when the frontend stopped the queue");
            }
        }
        // Where the ring stopped: what a live migration carries over (the
        // next available index) and what the guest's memory says (the used
        // index), which must agree once nothing is in flight.
        if let Some(v) = self
            .0
            .rings
            .get(queue_index as usize)
            .and_then(|r| r.lock().unwrap().clone())
        {
            info!(volume = %self.0.cfg.name, queue = queue_index,
                  next_avail = v.queue_next_avail(), used = ?v.queue_used_idx().ok(),
                  "vhost-user: queue stopped");
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        // One queue per thread: the thread's index is the queue's.
        let Some(vring) = vrings.get(device_event as usize) else {
            return Ok(());
        };
        self.run_queue(thread_id, vring)
    }
}

impl BlockDevice {
    /// Serves `vring` until nothing more is offered, the queue is stopped
    /// or its in-flight bound is reached.
    fn run_queue(&self, queue: usize, vring: &VringRwLock<AtomicMem>) -> io::Result<()> {
        if let Some(slot) = self.0.rings.get(queue) {
            let mut slot = slot.lock().unwrap();
            if slot.is_none() {
                info!(volume = %self.0.cfg.name, queue,
                      next_avail = vring.queue_next_avail(), used = ?vring.queue_used_idx().ok(),
                      "vhost-user: queue started");
                *slot = Some(vring.clone());
            }
        }
        let event_idx = self.0.event_idx.load(Ordering::Relaxed);
        loop {
            if event_idx {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            // A stopped queue must not be looked at again (offers still in
            // its ring would make `enable_notification` say "more" forever);
            // a full one is resumed by its next completion.
            if self.process_queue(queue, vring)? != Pass::Drained {
                break;
            }
            if !event_idx || !vring.enable_notification().map_err(io::Error::other)? {
                break;
            }
        }
        Ok(())
    }

    /// Pops the available chains of `vring`, up to as many in flight as
    /// the queue has entries, and starts their I/O.
    fn process_queue(&self, queue: usize, vring: &VringRwLock<AtomicMem>) -> io::Result<Pass> {
        let Some(atomic) = self.0.mem.read().unwrap().clone() else {
            return Err(io::Error::other("no guest memory table yet"));
        };
        let mem = atomic.memory();
        // Popping and counting in flight happen under the queue's in-flight
        // lock, after checking the queue still runs: `stop_vring` takes the
        // same lock, so once it has seen the count reach zero no request
        // popped before the stop is still out, and none is popped after.
        // (Otherwise `GET_VRING_BASE` could report a ring position past
        // requests that never complete; the guest, migrated, would then
        // read used entries that were never written.)
        //
        // A guest may offer a chain again before it is answered, so the
        // ring alone does not bound what is in flight: at most the queue
        // size is popped (a driver within the spec never has more), the
        // rest waits in the ring for a completion to resume the queue.
        let in_flight = &self.0.in_flight[queue];
        let mut n = in_flight.n.lock().unwrap();
        if self.0.gone.load(Ordering::SeqCst) {
            return Ok(Pass::Stopped);
        }
        let mut state = vring.get_mut();
        if !state.get_queue().ready() {
            return Ok(Pass::Stopped);
        }
        let room = usize::from(state.get_queue().size()).saturating_sub(*n);
        let chains: Vec<_> = state
            .get_queue_mut()
            .iter(mem.clone())
            .map_err(io::Error::other)?
            .take(room)
            .collect();
        drop(state);
        *n += chains.len();
        let pass = if chains.len() == room {
            in_flight.held_back.store(true, Ordering::SeqCst);
            Pass::Full
        } else {
            Pass::Drained
        };
        drop(n);
        for chain in chains {
            let head = chain.head_index();
            let parsed = request::parse(request::descriptors(chain), &*mem);
            let status_at = parsed_status(&parsed);
            let dev = self.clone();
            let vring = vring.clone();
            let mem = mem.clone().into_inner();
            let counted = Counted {
                dev: self.clone(),
                queue,
                answered: false,
            };
            let request = Box::pin(async move {
                let (status, used) = match parsed {
                    Ok(req) => dev.execute(&req, &mem).await,
                    Err(e) => {
                        warn!(volume = %dev.0.cfg.name, error = %e, "vhost-user: bad request");
                        (VIRTIO_BLK_S_IOERR as u8, 0)
                    }
                };
                dev.complete(counted, &vring, &mem, head, status, used, status_at);
            });
            self.start(request);
        }
        Ok(pass)
    }

    /// Runs a request's first step here, on the queue's worker thread: a
    /// local read or write (an inline `pread`/`pwrite`) finishes there and
    /// then, without a hop to a runtime thread and back, which is most of
    /// a 4 KiB request's latency. A request that has to wait (an on-demand
    /// fetch from a migration's source, a flush) moves to the runtime and
    /// holds up nothing else on the queue.
    fn start(&self, mut request: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) {
        use std::task::{Context, Poll, Waker};
        // Tokio's I/O and timers need its context even off its threads.
        let _runtime = self.0.rt.enter();
        let mut cx = Context::from_waker(Waker::noop());
        // A panic in a target must not take the queue's worker thread with
        // it (a spawned task's panic only ends the task): the request is
        // dropped unanswered, which leaves its in-flight count.
        let first = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            request.as_mut().poll(&mut cx)
        }));
        match first {
            Ok(Poll::Ready(())) => {}
            // Spawning polls it again at once with a real waker, which
            // replaces the no-op one wherever it registered.
            Ok(Poll::Pending) => drop(self.0.rt.spawn(request)),
            Err(_) => {
                warn!(volume = %self.0.cfg.name, "vhost-user: a request panicked; left unanswered");
                drop(request);
            }
        }
    }
}

/// One request counted in flight. Answering it ([`BlockDevice::complete`])
/// leaves the count; a request whose task is dropped unanswered (a panic,
/// the runtime shutting down) leaves it here, so neither `GET_VRING_BASE`
/// nor the socket's wait for a gone frontend's requests waits for it.
struct Counted {
    dev: BlockDevice,
    queue: usize,
    answered: bool,
}

impl Drop for Counted {
    fn drop(&mut self) {
        if !self.answered {
            self.dev.0.in_flight[self.queue].leave();
        }
    }
}

fn parsed_status(p: &Result<Request, request::ParseError>) -> Option<GuestAddress> {
    match p {
        Ok(r) => Some(r.status),
        Err(e) => e.status_at(),
    }
}

impl BlockDevice {
    /// Writes the status, returns the chain to the guest, and tells it
    /// (when EVENT_IDX says it wants to know).
    #[allow(clippy::too_many_arguments)]
    fn complete(
        &self,
        mut counted: Counted,
        vring: &VringRwLock<AtomicMem>,
        mem: &GuestMem,
        head: u16,
        status: u8,
        data_written: u32,
        status_at: Option<GuestAddress>,
    ) {
        counted.answered = true;
        let queue = counted.queue;
        if self.0.gone.load(Ordering::SeqCst) {
            self.0.in_flight[queue].leave();
            return;
        }
        let mut used = data_written;
        if let Some(at) = status_at {
            if mem.write_obj(status, at).is_ok() {
                used += 1;
            }
        }
        if let Err(e) = vring.add_used(head, used) {
            warn!(volume = %self.0.cfg.name, error = %e, "vhost-user: cannot return a request");
        } else {
            let notify = !self.0.event_idx.load(Ordering::Relaxed)
                || vring.needs_notification().unwrap_or(true);
            if notify {
                if let Err(e) = vring.signal_used_queue() {
                    debug!(volume = %self.0.cfg.name, error = %e, "vhost-user: cannot signal the guest");
                }
            }
        }
        let f = &self.0.in_flight[queue];
        f.leave();
        if f.held_back.swap(false, Ordering::SeqCst) {
            if let Err(e) = self.run_queue(queue, vring) {
                warn!(volume = %self.0.cfg.name, error = %e, "vhost-user: cannot resume the queue");
            }
        }
    }

    /// Carries out one request: `(status, bytes written to guest buffers)`.
    async fn execute(&self, req: &Request, mem: &GuestMem) -> (u8, u32) {
        let t = &self.0.target;
        let size = self.0.size;
        let ro = self.0.cfg.read_only;
        if req.data_len > MAX_REQUEST {
            warn!(volume = %self.0.cfg.name, bytes = req.data_len,
                  "vhost-user: request larger than {MAX_REQUEST} bytes refused");
            return (VIRTIO_BLK_S_IOERR as u8, 0);
        }
        let result: Result<u32, BlockError> = match &req.op {
            Op::Read => match in_volume(req.sector, req.data_len, size) {
                Err(e) => Err(e),
                Ok((offset, len)) => read_into_guest(t.as_ref(), offset, &req.data, mem)
                    .await
                    .map(|()| len as u32),
            },
            Op::Write if ro => Err(BlockError::ReadOnly),
            Op::Write => match in_volume(req.sector, req.data_len, size) {
                Err(e) => Err(e),
                Ok((offset, _)) => {
                    let fua = !self.0.cfg.writeback.load(Ordering::Relaxed);
                    write_from_guest(t.as_ref(), offset, &req.data, mem, fua)
                        .await
                        .map(|()| 0)
                }
            },
            Op::Flush => t.flush().await.map(|()| 0),
            Op::GetId => {
                let mut id = [0u8; ID_LEN];
                let n = self.0.cfg.name.len().min(ID_LEN);
                id[..n].copy_from_slice(&self.0.cfg.name.as_bytes()[..n]);
                let mut left = &id[..];
                let mut written = 0u32;
                for s in &req.data {
                    let k = (s.len as usize).min(left.len());
                    if mem.write_slice(&left[..k], s.addr).is_err() {
                        break;
                    }
                    left = &left[k..];
                    written += k as u32;
                }
                Ok(written)
            }
            Op::Discard(_) | Op::WriteZeroes(_) if ro => Err(BlockError::ReadOnly),
            Op::Discard(ranges) | Op::WriteZeroes(ranges) => {
                let zero = matches!(req.op, Op::WriteZeroes(_));
                let fua = !self.0.cfg.writeback.load(Ordering::Relaxed);
                let mut r = Ok(0);
                for range in ranges {
                    let len = u64::from(range.sectors) * SECTOR;
                    let (offset, len) = match in_volume(range.sector, len, size) {
                        Ok(r) => r,
                        Err(e) => {
                            r = Err(e);
                            break;
                        }
                    };
                    let done = if zero {
                        let flags = ZeroFlags {
                            no_hole: range.flags & request::WZ_FLAG_UNMAP == 0,
                            fast: false,
                            fua,
                        };
                        t.write_zeroes(offset, len, flags).await
                    } else {
                        t.trim(offset, len, fua).await
                    };
                    if let Err(e) = done {
                        r = Err(e);
                        break;
                    }
                }
                r
            }
            Op::Unsupported(_) => Err(BlockError::NotSupported),
        };
        match result {
            Ok(n) => (VIRTIO_BLK_S_OK as u8, n),
            Err(BlockError::NotSupported) => (VIRTIO_BLK_S_UNSUPP as u8, 0),
            Err(e) => {
                debug!(volume = %self.0.cfg.name, op = ?req.op, error = %e, "vhost-user: request failed");
                (VIRTIO_BLK_S_IOERR as u8, 0)
            }
        }
    }
}

/// The byte range a sector-addressed request covers, or why it is not
/// one the volume has (see [`byte_range`]).
fn in_volume(sector: u64, len: u64, size: u64) -> Result<(u64, u64), BlockError> {
    byte_range(sector, len, size).ok_or(BlockError::OutOfRange {
        offset: sector.saturating_mul(SECTOR),
        len,
        size,
    })
}

/// Reads `[offset, +len(segs))` of the volume into guest buffers: straight
/// into guest memory when the request is one buffer, else through one
/// pooled buffer (one target call, not one per page).
async fn read_into_guest(
    t: &dyn BlockTarget,
    offset: u64,
    segs: &[request::Seg],
    mem: &GuestMem,
) -> Result<(), BlockError> {
    if let [seg] = segs {
        let len = seg.len as usize;
        let buf: Option<&mut [u8]> = mem.get_slice(seg.addr, len).ok().map(|slice| {
            let ptr = slice.ptr_guard_mut().as_ptr();
            // SAFETY: `slice` lies inside a region of `mem`, whose mapping
            // lives as long as `mem` (held by this request until it
            // completes); the pointer guard only matters for Xen grant
            // mappings, which this node does not use. The guest made this
            // buffer device-writable and, by the virtio contract, does not
            // touch it until the request is returned; a guest that does
            // anyway races only with its own data, and any byte pattern is
            // a valid `u8`. No other Rust reference to this memory exists:
            // vm-memory hands out only volatile accessors.
            unsafe { std::slice::from_raw_parts_mut(ptr, len) }
        });
        if let Some(buf) = buf {
            let r = t.read(offset, buf).await;
            // The guest page changed: tell a migration's dirty log.
            if let Ok(slice) = mem.get_slice(seg.addr, len) {
                slice.bitmap().mark_dirty(0, len);
            }
            return r;
        }
    }
    let total: u64 = segs.iter().map(|s| u64::from(s.len)).sum();
    let mut buf = crate::bufpool::take_for_overwrite(total as usize);
    let r = t.read(offset, &mut buf).await;
    if r.is_ok() {
        let mut at = 0usize;
        for s in segs {
            let n = s.len as usize;
            mem.write_slice(&buf[at..at + n], s.addr)
                .map_err(|e| BlockError::Invalid(format!("guest buffer: {e}")))?;
            at += n;
        }
    }
    crate::bufpool::give(buf);
    r
}

/// Writes guest buffers to `[offset, +len(segs))` of the volume.
async fn write_from_guest(
    t: &dyn BlockTarget,
    offset: u64,
    segs: &[request::Seg],
    mem: &GuestMem,
    fua: bool,
) -> Result<(), BlockError> {
    if let [seg] = segs {
        let len = seg.len as usize;
        let buf: Option<&[u8]> = mem.get_slice(seg.addr, len).ok().map(|slice| {
            let ptr = slice.ptr_guard().as_ptr();
            // SAFETY: as in `read_into_guest`; the buffer is only read. A
            // guest changing it meanwhile writes whichever bytes it raced
            // with, as on any DMA-capable disk.
            unsafe { std::slice::from_raw_parts(ptr, len) }
        });
        if let Some(buf) = buf {
            return t.write(offset, buf, fua).await;
        }
    }
    let total: u64 = segs.iter().map(|s| u64::from(s.len)).sum();
    let mut buf = crate::bufpool::take_for_overwrite(total as usize);
    let mut at = 0usize;
    for s in segs {
        let n = s.len as usize;
        if let Err(e) = mem.read_slice(&mut buf[at..at + n], s.addr) {
            crate::bufpool::give(buf);
            return Err(BlockError::Invalid(format!("guest buffer: {e}")));
        }
        at += n;
    }
    let r = t.write(offset, &buf, fua).await;
    crate::bufpool::give(buf);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::target::LocalTarget;
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use vm_memory::GuestMemoryLoadGuard;

    const QSIZE: u16 = 16;
    const DESC: u64 = 0x0;
    const AVAIL: u64 = 0x1000;
    const USED: u64 = 0x2000;
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;

    /// A device over a 1 MiB volume (byte i = i % 251) and one queue in a
    /// guest memory of 64 MiB, driven the way a guest driver would.
    struct Rig {
        dev: BlockDevice,
        vring: VringRwLock<AtomicMem>,
        mem: AtomicMem,
        next_desc: u16,
        avail_idx: u16,
        _dir: tempfile::TempDir,
    }

    /// A target whose reads and writes wait for a permit each: requests
    /// stay in flight until the test lets them through.
    struct Gated {
        inner: LocalTarget,
        gate: Arc<tokio::sync::Semaphore>,
    }

    #[async_trait::async_trait]
    impl BlockTarget for Gated {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn capabilities(&self) -> crate::target::Capabilities {
            self.inner.capabilities()
        }
        async fn read(&self, offset: u64, buf: &mut [u8]) -> crate::target::BlockResult<()> {
            self.gate.acquire().await.unwrap().forget();
            self.inner.read(offset, buf).await
        }
        async fn write(
            &self,
            offset: u64,
            data: &[u8],
            fua: bool,
        ) -> crate::target::BlockResult<()> {
            self.gate.acquire().await.unwrap().forget();
            self.inner.write(offset, data, fua).await
        }
        async fn flush(&self) -> crate::target::BlockResult<()> {
            self.inner.flush().await
        }
    }

    impl Rig {
        fn new(read_only: bool) -> Rig {
            Rig::build(read_only, None)
        }

        /// A rig whose reads and writes wait for permits of `gate`.
        fn gated(gate: Arc<tokio::sync::Semaphore>) -> Rig {
            Rig::build(false, Some(gate))
        }

        fn build(read_only: bool, gate: Option<Arc<tokio::sync::Semaphore>>) -> Rig {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("v.raw");
            let bytes: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
            std::fs::write(&path, bytes).unwrap();
            let local = LocalTarget::open(&path, false).unwrap();
            let target: Arc<dyn BlockTarget> = match gate {
                None => Arc::new(local),
                Some(gate) => Arc::new(Gated { inner: local, gate }),
            };
            let dev = BlockDevice::new(
                DeviceConfig::new("vol-under-test", 1, read_only),
                target,
                tokio::runtime::Handle::current(),
            )
            .unwrap();
            let mem = GuestMemoryAtomic::new(
                GuestMem::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap(),
            );
            dev.update_memory(mem.clone()).unwrap();
            let vring = VringRwLock::new(mem.clone(), QSIZE).unwrap();
            vring.set_queue_size(QSIZE);
            vring.set_queue_info(DESC, AVAIL, USED).unwrap();
            vring.set_queue_ready(true);
            vring.set_enabled(true);
            Rig {
                dev,
                vring,
                mem,
                next_desc: 0,
                avail_idx: 0,
                _dir: dir,
            }
        }

        fn m(&self) -> GuestMemoryLoadGuard<GuestMem> {
            self.mem.memory()
        }

        /// Offers a chain of `(addr, len, flags)` and processes the queue.
        fn submit(&mut self, chain: &[(u64, u32, u16)]) -> u16 {
            let m = self.m();
            // Tests await each request, so the table's start is free again.
            if usize::from(self.next_desc) + chain.len() > usize::from(QSIZE) {
                self.next_desc = 0;
            }
            let head = self.next_desc;
            for (i, &(addr, len, flags)) in chain.iter().enumerate() {
                let idx = self.next_desc + i as u16;
                let last = i + 1 == chain.len();
                let f = if last { flags } else { flags | NEXT };
                let mut d = Vec::new();
                d.extend_from_slice(&addr.to_le_bytes());
                d.extend_from_slice(&len.to_le_bytes());
                d.extend_from_slice(&f.to_le_bytes());
                d.extend_from_slice(&(idx + 1).to_le_bytes());
                m.write_slice(&d, GuestAddress(DESC + 16 * u64::from(idx)))
                    .unwrap();
            }
            self.next_desc += chain.len() as u16;
            let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % QSIZE);
            m.write_obj(head, GuestAddress(slot)).unwrap();
            self.avail_idx += 1;
            m.write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
                .unwrap();
            self.dev.process_queue(0, &self.vring).unwrap();
            head
        }

        /// Offers chain `head` (already in the descriptor table) once
        /// more, without waiting for its earlier offers to complete, as a
        /// hostile driver may; returns what processing the queue said.
        fn publish(&mut self, head: u16) -> io::Result<bool> {
            let m = self.m();
            let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % QSIZE);
            m.write_obj(head, GuestAddress(slot)).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            m.write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
                .unwrap();
            self.dev.process_queue(0, &self.vring).map(|_| true)
        }

        fn used_idx(&self) -> u16 {
            self.m().read_obj(GuestAddress(USED + 2)).unwrap()
        }

        fn in_flight(&self) -> usize {
            *self.dev.0.in_flight[0].n.lock().unwrap()
        }

        fn header(&self, at: u64, kind: u32, sector: u64) {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&kind.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            self.m().write_slice(&h, GuestAddress(at)).unwrap();
        }

        /// Waits for used entry `n` (0-based): `(head, len)`.
        async fn used(&self, n: u16) -> (u32, u32) {
            let m = self.m();
            for _ in 0..500 {
                let idx: u16 = m.read_obj(GuestAddress(USED + 2)).unwrap();
                if idx > n {
                    let at = USED + 4 + 8 * u64::from(n % QSIZE);
                    return (
                        m.read_obj(GuestAddress(at)).unwrap(),
                        m.read_obj(GuestAddress(at + 4)).unwrap(),
                    );
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("request {n} never completed");
        }

        fn byte(&self, at: u64) -> u8 {
            self.m().read_obj(GuestAddress(at)).unwrap()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn read_lands_in_guest_memory_in_place_and_multi_buffer() {
        let mut r = Rig::new(false);
        r.header(0x4000, VIRTIO_BLK_T_IN, 2);
        let head = r.submit(&[(0x4000, 16, 0), (0x8000, 4096, WRITE), (0x5000, 1, WRITE)]);
        assert_eq!(r.used(0).await, (u32::from(head), 4097));
        assert_eq!(r.byte(0x5000), VIRTIO_BLK_S_OK as u8);
        let mut got = vec![0u8; 4096];
        r.m().read_slice(&mut got, GuestAddress(0x8000)).unwrap();
        let want: Vec<u8> = (1024..1024 + 4096u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(got, want);
        // Three buffers, one of them odd-sized: one target read, scattered.
        r.header(0x4100, VIRTIO_BLK_T_IN, 0);
        r.submit(&[
            (0x4100, 16, 0),
            (0x10000, 512, WRITE),
            (0x20000, 1024, WRITE),
            (0x30000, 512, WRITE),
            (0x5001, 1, WRITE),
        ]);
        assert_eq!(r.used(1).await.1, 2049);
        assert_eq!(r.byte(0x20000), (512 % 251) as u8);
        assert_eq!(r.byte(0x30000 + 511), (2047 % 251) as u8);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn write_then_read_back() {
        let mut r = Rig::new(false);
        r.m()
            .write_slice(&[0xAB; 512], GuestAddress(0x8000))
            .unwrap();
        r.header(0x4000, VIRTIO_BLK_T_OUT, 10);
        r.submit(&[(0x4000, 16, 0), (0x8000, 512, 0), (0x5000, 1, WRITE)]);
        assert_eq!(r.used(0).await.1, 1, "a write returns only the status byte");
        assert_eq!(r.byte(0x5000), VIRTIO_BLK_S_OK as u8);
        r.header(0x4100, VIRTIO_BLK_T_IN, 10);
        r.submit(&[(0x4100, 16, 0), (0x9000, 512, WRITE), (0x5001, 1, WRITE)]);
        r.used(1).await;
        assert_eq!(r.byte(0x9000), 0xAB);
        assert_eq!(r.byte(0x9000 + 511), 0xAB);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_requests_get_an_error_status_and_touch_nothing() {
        let mut r = Rig::new(false);
        // Past the end of the volume.
        r.header(0x4000, VIRTIO_BLK_T_IN, (1 << 20) / 512);
        r.submit(&[(0x4000, 16, 0), (0x8000, 512, WRITE), (0x5000, 1, WRITE)]);
        assert_eq!(r.used(0).await.1, 1);
        assert_eq!(r.byte(0x5000), VIRTIO_BLK_S_IOERR as u8);
        // A buffer outside guest memory.
        r.header(0x4100, VIRTIO_BLK_T_IN, 0);
        r.submit(&[
            (0x4100, 16, 0),
            (0xFFFF_0000, 4096, WRITE),
            (0x5001, 1, WRITE),
        ]);
        assert_eq!(r.used(1).await.1, 1);
        assert_eq!(r.byte(0x5001), VIRTIO_BLK_S_IOERR as u8);
        // Not a whole number of sectors.
        r.header(0x4200, VIRTIO_BLK_T_OUT, 0);
        r.submit(&[(0x4200, 16, 0), (0x8000, 100, 0), (0x5002, 1, WRITE)]);
        r.used(2).await;
        assert_eq!(r.byte(0x5002), VIRTIO_BLK_S_IOERR as u8);
        // An unknown request type.
        r.header(0x4300, 0x55, 0);
        r.submit(&[(0x4300, 16, 0), (0x5003, 1, WRITE)]);
        r.used(3).await;
        assert_eq!(r.byte(0x5003), VIRTIO_BLK_S_UNSUPP as u8);
        // No status byte at all: returned with nothing written.
        r.header(0x4400, VIRTIO_BLK_T_IN, 0);
        r.submit(&[(0x4400, 16, 0)]);
        assert_eq!(r.used(4).await.1, 0);
        // Larger than the device allows.
        r.header(0x4500, VIRTIO_BLK_T_IN, 0);
        r.submit(&[
            (0x4500, 16, 0),
            (0x10_0000, (MAX_REQUEST + 512) as u32, WRITE),
            (0x5005, 1, WRITE),
        ]);
        r.used(5).await;
        assert_eq!(r.byte(0x5005), VIRTIO_BLK_S_IOERR as u8);
        // The volume is untouched: its first sectors still hold the pattern.
        r.header(0x4600, VIRTIO_BLK_T_IN, 0);
        r.submit(&[(0x4600, 16, 0), (0x9000, 512, WRITE), (0x5006, 1, WRITE)]);
        r.used(6).await;
        assert_eq!(r.byte(0x9000 + 300), (300 % 251) as u8);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn read_only_device_refuses_writes_and_says_so() {
        let mut r = Rig::new(true);
        assert!(r.dev.features() & (1 << VIRTIO_BLK_F_RO) != 0);
        assert!(r.dev.features() & (1 << VIRTIO_BLK_F_DISCARD) == 0);
        r.header(0x4000, VIRTIO_BLK_T_OUT, 0);
        r.submit(&[(0x4000, 16, 0), (0x8000, 512, 0), (0x5000, 1, WRITE)]);
        r.used(0).await;
        assert_eq!(r.byte(0x5000), VIRTIO_BLK_S_IOERR as u8);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn get_id_is_the_volume_name() {
        let mut r = Rig::new(false);
        r.header(0x4000, VIRTIO_BLK_T_GET_ID, 0);
        r.submit(&[(0x4000, 16, 0), (0x8000, 20, WRITE), (0x5000, 1, WRITE)]);
        assert_eq!(r.used(0).await.1, 21);
        let mut id = [0u8; 14];
        r.m().read_slice(&mut id, GuestAddress(0x8000)).unwrap();
        assert_eq!(&id, b"vol-under-test");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stopped_queue_pops_nothing() {
        let mut r = Rig::new(false);
        r.vring.set_queue_ready(false);
        assert!(r.dev.stop_vring(0).is_ok());
        r.header(0x4000, VIRTIO_BLK_T_IN, 0);
        r.submit(&[(0x4000, 16, 0), (0x8000, 512, WRITE), (0x5000, 1, WRITE)]);
        assert_eq!(
            r.vring.queue_next_avail(),
            0,
            "a request was popped after the stop"
        );
    }

    /// GET_VRING_BASE stops a queue (`ready` false) while the guest has
    /// offered requests the worker has not popped yet (a VM paused for
    /// migration under load). With EVENT_IDX, the worker's loop must not
    /// keep re-checking a ring it may no longer pop: it would spin a core
    /// forever and never see its exit event, so the connection's end
    /// would hang joining it (and with it the socket's stop, `volume rm`,
    /// the migration's release of the source copy and node shutdown).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_queue_stopped_with_requests_waiting_does_not_spin_its_worker() {
        let mut r = Rig::new(false);
        r.vring.set_queue_event_idx(true);
        r.dev.set_event_idx(true);
        r.vring.set_queue_ready(false);
        r.dev.stop_vring(0).unwrap();
        r.header(0x4000, VIRTIO_BLK_T_IN, 0);
        r.submit(&[(0x4000, 16, 0), (0x8000, 512, WRITE), (0x5000, 1, WRITE)]);
        assert_eq!(r.vring.queue_next_avail(), 0);
        let (dev, vring) = (r.dev.clone(), r.vring.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(dev.handle_event(0, EventSet::IN, &[vring], 0).is_ok());
        });
        assert!(
            rx.recv_timeout(Duration::from_secs(5)).is_ok(),
            "the queue worker spins on a stopped queue with requests waiting"
        );
    }

    /// A guest may offer a chain again before the device has answered it
    /// (the avail ring only bounds what is offered and not yet popped).
    /// Each pop is a task and, for a request of several buffers, a pooled
    /// buffer of up to 32 MiB: in flight must stay bounded by the queue
    /// size (as QEMU's and libvhost-user's `inuse` check does), or one
    /// guest grows the node's memory without limit and takes every other
    /// volume down with it. Offers past the bound wait in the ring and are
    /// served as requests complete.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_guest_cannot_have_more_requests_in_flight_than_the_queue_size() {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let mut r = Rig::gated(gate.clone());
        r.header(0x4000, VIRTIO_BLK_T_IN, 0);
        let head = r.submit(&[(0x4000, 16, 0), (0x8000, 4096, WRITE), (0x5000, 1, WRITE)]);
        for _ in 1..2 * QSIZE {
            r.publish(head).unwrap();
        }
        assert!(
            r.in_flight() <= usize::from(QSIZE),
            "{} requests in flight on a queue of {QSIZE}",
            r.in_flight()
        );
        gate.add_permits(4 * usize::from(QSIZE));
        for _ in 0..500 {
            if r.used_idx() == 2 * QSIZE {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            r.used_idx(),
            2 * QSIZE,
            "offers held back were never served"
        );
        assert_eq!(r.in_flight(), 0);
    }

    /// The frontend went (its connection ended; `serve_socket` stops the
    /// workers) while a request was still in flight. QEMU then takes the
    /// used index it finds as the ring position and, reconnected, offers
    /// again every request not answered: a late answer from the old
    /// connection would complete a request twice, the second time in a
    /// used ring the new connection is filling. It must write nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_in_flight_when_the_frontend_goes_writes_nothing_into_guest_memory() {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let mut r = Rig::gated(gate.clone());
        r.m().write_obj(0xEEu8, GuestAddress(0x5000)).unwrap();
        r.header(0x4000, VIRTIO_BLK_T_OUT, 0);
        r.submit(&[(0x4000, 16, 0), (0x8000, 512, 0), (0x5000, 1, WRITE)]);
        assert_eq!(r.in_flight(), 1);
        r.dev.stop_workers();
        let dev = r.dev.clone();
        let busy = tokio::task::spawn_blocking(move || dev.wait_idle(Duration::from_millis(50)));
        assert!(!busy.await.unwrap(), "idle with a request in flight");
        gate.add_permits(1);
        let dev = r.dev.clone();
        let idle = tokio::task::spawn_blocking(move || dev.wait_idle(Duration::from_secs(5)));
        assert!(idle.await.unwrap(), "the request never finished");
        assert_eq!(r.in_flight(), 0);
        assert_eq!(
            r.used_idx(),
            0,
            "a request of a gone frontend was returned to the ring"
        );
        assert_eq!(
            r.byte(0x5000),
            0xEE,
            "a request of a gone frontend wrote its status"
        );
    }

    /// A request whose task dies unanswered (here the target panics; at
    /// node shutdown the runtime drops it) must not stay counted in
    /// flight: `GET_VRING_BASE` would wait a minute for it, the socket
    /// forever before serving the next frontend.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_whose_task_dies_does_not_stay_in_flight() {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        gate.close(); // `acquire` fails: the gated read panics
        let mut r = Rig::gated(gate);
        r.header(0x4000, VIRTIO_BLK_T_IN, 0);
        r.submit(&[(0x4000, 16, 0), (0x8000, 512, WRITE), (0x5000, 1, WRITE)]);
        let dev = r.dev.clone();
        let idle = tokio::task::spawn_blocking(move || dev.wait_idle(Duration::from_secs(5)));
        assert!(
            idle.await.unwrap(),
            "a dead request is still counted in flight"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn write_cache_setting_outlives_the_connection() {
        let r = Rig::new(false);
        r.dev.set_config(32, &[0]).unwrap();
        assert_eq!(r.dev.get_config(32, 1), vec![0]);
        // The next connection's device, made from the same configuration.
        let next = BlockDevice::new(
            r.dev.0.cfg.clone(),
            r.dev.0.target.clone(),
            tokio::runtime::Handle::current(),
        )
        .unwrap();
        assert_eq!(
            next.get_config(32, 1),
            vec![0],
            "write-through forgotten on reconnect"
        );
        assert!(
            r.dev.set_config(0, &[1; 8]).is_err(),
            "capacity is read-only"
        );
    }

    #[test]
    fn the_largest_request_a_guest_can_build_is_accepted() {
        assert!(u64::from(SIZE_MAX) * u64::from(SEG_MAX) <= MAX_REQUEST);
    }

    #[test]
    fn config_space_layout() {
        let c = config_space(1 << 30, 2, true);
        assert_eq!(
            u64::from_le_bytes(c[0..8].try_into().unwrap()),
            (1 << 30) / 512
        );
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), SEG_MAX);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
        assert_eq!(c[32], 1);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 2);
        assert_eq!(
            u32::from_le_bytes(c[40..44].try_into().unwrap()),
            MAX_RANGES
        );
        assert_eq!(config_space(4096, 1, false)[32], 0);
    }
}
