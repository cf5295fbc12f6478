//! Fencing: how a source node stops accepting writes at handoff.
//!
//! Every NBD connection's target is wrapped in a [`FenceGate`]. A write-like
//! request enters the gate (counted as in flight) and is refused with EPERM
//! once the volume is fenced. [`Fence::fence`] sets the flag, waits for the
//! writes already admitted to finish, and flushes: when it returns, no write
//! can land here any more and every write this node acknowledged is durable.
//! That is the source's half of the single-writer invariant.
//!
//! A fence can also be *held*: writes are refused while the node does not
//! know whether it still owns the volume (a source that restarted with an
//! outgoing migration recorded asks the destination first; see
//! `node::migration::resume_all`). A hold is lifted, or turned
//! into a fence, by what the destination answers.
//!
//! In cluster mode a volume's fence is also bound to the node's etcd lease
//! ([`Fence::bind_lease`]): a write is admitted only while the lease's
//! deadline is ahead, and acknowledged only if it still is once the write
//! has finished, so every write this node acknowledged took effect while
//! etcd still counted the node as the owner's holder. A write that finished
//! late is answered EIO: unacknowledged, free to be there or not. A write
//! that *arrives* while the lease is unconfirmed waits for a renewal, up to
//! one TTL and outside the in-flight count (so a fence never waits for it),
//! before it is refused: an etcd leader election or a slow renewal then
//! delays the guest's write instead of failing it. It gives up if its
//! connection breaks meanwhile ([`BlockTarget::client_gone`]). Reads and flushes are
//! not gated (a flush makes durable only writes that were acknowledged in
//! time).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::target::{BlockError, BlockResult, BlockTarget, Capabilities, Extent, ZeroFlags};

/// How often a write waiting for the lease looks again: the renewal loop
/// retries every 0.2 s after a failure.
const LEASE_POLL: Duration = Duration::from_millis(20);

/// The slots of [`Fence`]'s holds.
const MIGRATION: usize = 0;
const CLUSTER: usize = 1;

/// The fence state of one volume.
#[derive(Default)]
pub struct Fence {
    fenced: AtomicBool,
    in_flight: AtomicUsize,
    to: Mutex<String>,
    /// The migration the fence was closed for (empty: loaded closed, or
    /// closed before identities existed).
    closed_for: Mutex<String>,
    /// Why writes are held (not fenced for good), if they are: by the
    /// migration protocol (`[MIGRATION]`: a source restarted mid-migration,
    /// until the destination answers) and by the cluster's directory
    /// (`[CLUSTER]`: not re-confirmed yet, stale, orphan). Two slots, each
    /// lifted only by what set it: an answer about a migration never lifts
    /// the directory's hold, nor the other way round.
    held: Mutex<[Option<String>; 2]>,
    /// Whether any slot of `held` is set: the write path looks here, not
    /// at the lock.
    is_held: AtomicBool,
    /// The cluster's directory says this copy is stale (another node owns
    /// the volume, or nobody does): clients' reads are refused too, since
    /// they would see data older than what the owner acknowledged. A
    /// migration's origin link reads the volume's own target, not through
    /// this gate, and is unaffected.
    stale: AtomicBool,
    /// Cluster mode: the node's lease, which every write must be inside.
    lease: std::sync::OnceLock<Arc<crate::cluster::LeaseClock>>,
    /// Cluster mode: every write takes its turn here (tokio's mutex is
    /// FIFO, and `try_lock` fails while anyone waits in it), so writes are
    /// admitted in the order they arrived. One that has to wait for the
    /// lease keeps the turn until it has landed: a copy its client resent
    /// on another connection, or any newer write, can then never land
    /// before it (it would land late over them). A write that does not
    /// wait lets go as soon as it is admitted.
    lapse_line: tokio::sync::Mutex<()>,
    /// Odd while the line's holder waits for the lease; bumped when it
    /// starts and when it stops. A write that arrived during a lapse, or
    /// saw one start before its turn came, is treated as having waited.
    lapses: std::sync::atomic::AtomicU64,
}

impl Fence {
    /// A fence that is already closed (a volume loaded as fenced).
    pub fn closed(to: &str, id: &str) -> Self {
        let f = Self::default();
        f.fenced.store(true, Ordering::SeqCst);
        *f.to.lock().unwrap() = to.to_owned();
        *f.closed_for.lock().unwrap() = id.to_owned();
        f
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }

    /// Opens a fence again. Only for a fence whose migration the
    /// destination has dropped without being handed off (a cancel that
    /// overlapped a handoff that failed after fencing): nobody else can
    /// write the volume, and nobody ever will for that migration.
    /// Only opens a fence closed for migration `id`; says whether it did.
    pub fn reopen(&self, id: &str) -> bool {
        if self.is_fenced() && *self.closed_for.lock().unwrap() == id {
            self.fenced.store(false, Ordering::SeqCst);
            true
        } else {
            false
        }
    }

    /// From now on, writes are admitted and acknowledged only while
    /// `lease` is valid (see the module docs). Once per volume.
    pub fn bind_lease(&self, lease: Arc<crate::cluster::LeaseClock>) {
        let _ = self.lease.set(lease);
    }

    /// Whether writes are bound to a cluster lease.
    pub fn is_lease_bound(&self) -> bool {
        self.lease.get().is_some()
    }

    /// Err (EIO) if the volume is bound to a lease that is not valid now,
    /// or (after a write) was held meanwhile: a lease lost and replaced
    /// during the write leaves the deadline valid again, but a volume that
    /// re-confirmation found no longer ours is held before the new lease
    /// counts (the deadline is read first, so a new one implies the hold).
    fn check_lease(&self) -> BlockResult<()> {
        match self.lease.get() {
            Some(l) if !l.valid_now() => Err(BlockError::Io(std::io::Error::other(
                "write not acknowledged: this node's cluster lease is not confirmed \
                 (etcd unreachable, or the node was frozen); writes resume once it is renewed",
            ))),
            Some(_) if self.is_held.load(Ordering::SeqCst) => {
                Err(BlockError::Io(std::io::Error::other(
                    "write not acknowledged: the volume's writes were held while it ran \
                     (its ownership is being re-confirmed with the cluster)",
                )))
            }
            _ => Ok(()),
        }
    }

    /// Refuses writes until [`Fence::release_hold`], saying `why` (the
    /// migration protocol's hold).
    pub fn hold(&self, why: String) {
        self.set_hold(MIGRATION, Some(why));
    }

    /// Lifts the migration protocol's hold (writes go through again unless
    /// fenced or held by the cluster).
    pub fn release_hold(&self) {
        self.set_hold(MIGRATION, None);
    }

    /// Refuses writes until [`Fence::release_cluster_hold`], saying `why`
    /// (the cluster directory's hold).
    pub fn hold_cluster(&self, why: String) {
        self.set_hold(CLUSTER, Some(why));
    }

    /// Replaces the cluster directory's hold by `why` (None: lifts it;
    /// `stale`: clients' reads refused too, as [`Fence::hold_stale`]), only
    /// if `expected` accepts the present one (None: not held); says
    /// whether it did. For a holder that must not lift or overwrite a hold
    /// set by something else meanwhile (`volume rm`).
    pub fn swap_cluster_hold(
        &self,
        expected: impl Fn(Option<&str>) -> bool,
        why: Option<String>,
        stale: bool,
    ) -> bool {
        let mut held = self.held.lock().unwrap();
        if !expected(held[CLUSTER].as_deref()) {
            return false;
        }
        self.stale.store(stale && why.is_some(), Ordering::SeqCst);
        held[CLUSTER] = why;
        self.is_held
            .store(held.iter().any(Option::is_some), Ordering::SeqCst);
        true
    }

    /// Lifts the cluster directory's hold.
    pub fn release_cluster_hold(&self) {
        self.stale.store(false, Ordering::SeqCst);
        self.set_hold(CLUSTER, None);
    }

    /// The cluster directory's hold for a stale copy: writes and clients'
    /// reads are refused, saying `why`.
    pub fn hold_stale(&self, why: String) {
        self.stale.store(true, Ordering::SeqCst);
        self.set_hold(CLUSTER, Some(why));
    }

    /// Err (EIO) if this copy is stale (see [`Fence::hold_stale`]).
    fn check_fresh(&self) -> BlockResult<()> {
        if self.stale.load(Ordering::SeqCst) {
            return Err(BlockError::Io(std::io::Error::other(format!(
                "read refused: {}",
                self.held().unwrap_or_else(|| "this copy is stale".into())
            ))));
        }
        Ok(())
    }

    fn set_hold(&self, slot: usize, why: Option<String>) {
        let mut held = self.held.lock().unwrap();
        held[slot] = why;
        self.is_held
            .store(held.iter().any(Option::is_some), Ordering::SeqCst);
    }

    /// Why writes are held, if they are (the directory's reason first).
    pub fn held(&self) -> Option<String> {
        let held = self.held.lock().unwrap();
        held[CLUSTER].clone().or_else(|| held[MIGRATION].clone())
    }

    /// Why the migration protocol holds writes, if it does.
    pub fn held_for_migration(&self) -> Option<String> {
        self.held.lock().unwrap()[MIGRATION].clone()
    }

    /// Why the cluster's directory holds writes, if it does.
    pub fn held_by_cluster(&self) -> Option<String> {
        self.held.lock().unwrap()[CLUSTER].clone()
    }

    /// Refuses writes from now on (for migration `id`), waits for admitted
    /// writes, flushes `target`.
    pub async fn fence(&self, to: &str, id: &str, target: &dyn BlockTarget) -> BlockResult<()> {
        *self.to.lock().unwrap() = to.to_owned();
        *self.closed_for.lock().unwrap() = id.to_owned();
        self.fenced.store(true, Ordering::SeqCst);
        while self.in_flight.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        target.flush().await
    }

    /// Bound to a lease that is not valid now, and neither fenced nor held
    /// (those refuse at once: waiting could not change the answer).
    fn lease_lapsed(&self) -> bool {
        matches!(self.lease.get(), Some(l) if !l.valid_now())
            && !self.is_fenced()
            && !self.is_held.load(Ordering::SeqCst)
    }

    fn enter(&self) -> BlockResult<InFlight<'_>> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let g = InFlight(self);
        if self.is_fenced() {
            return Err(BlockError::Fenced(format!(
                "volume handed off to {}",
                self.to.lock().unwrap()
            )));
        }
        if self.is_held.load(Ordering::SeqCst) {
            if let Some(why) = self.held() {
                return Err(BlockError::Fenced(why));
            }
        }
        self.check_lease()?;
        Ok(g)
    }
}

struct InFlight<'a>(&'a Fence);
impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A connection's view of a volume: the volume's target behind its fence.
pub struct FenceGate {
    inner: Arc<dyn BlockTarget>,
    fence: Arc<Fence>,
    /// The connection broke ([`BlockTarget::client_gone`]): a write still
    /// waiting for the lease gives up instead of starting.
    gone: AtomicBool,
}

impl FenceGate {
    pub fn new(inner: Arc<dyn BlockTarget>, fence: Arc<Fence>) -> Self {
        Self {
            inner,
            fence,
            gone: AtomicBool::new(false),
        }
    }

    /// [`Fence::enter`], but in cluster mode a write that finds only the
    /// lease unconfirmed waits for it first (see the module docs): up to
    /// one TTL, not at all once the volume is fenced or held, and not past
    /// its connection's end. Writes take their turn in
    /// [`Fence::lapse_line`], in their order of arrival across
    /// connections; one that waited keeps the turn until it has landed (the
    /// returned [`Admitted`]). A client whose connection broke may resend a
    /// waiting write on another connection and, once that is
    /// acknowledged, write newer data at the same place: the first copy
    /// must not land after that, and the connection's end is not always
    /// seen in time (a reader blocked on its in-flight budget does not read
    /// the socket). A waiting write is not counted in flight, and is
    /// admitted only by the checks of `enter` itself.
    async fn admit(&self) -> BlockResult<Admitted<'_>> {
        let f = &*self.fence;
        let Some(l) = f.lease.get() else {
            // Peer mode: no lease, nothing to wait for.
            return f.enter().map(|g| Admitted { _g: g, _turn: None });
        };
        let until = tokio::time::Instant::now() + l.ttl();
        let arrived = f.lapses.load(Ordering::SeqCst);
        // The place in line is taken in one step: `try_lock` fails while
        // writes wait in it (a release hands the lock to the first).
        let (turn, queued) = match f.lapse_line.try_lock() {
            Ok(t) => (t, false),
            Err(_) => match tokio::time::timeout_at(until, f.lapse_line.lock()).await {
                Ok(t) => (t, true),
                Err(_) => return Err(lease_wait_expired()),
            },
        };
        // Queued through a lapse counts as waiting: this write must keep
        // its turn until it lands, and give up if its connection ended,
        // as the one it queued behind. (Queued in normal operation, it
        // lets go at admission: writes stay concurrent.)
        let mut waited = queued && (arrived % 2 == 1 || f.lapses.load(Ordering::SeqCst) != arrived);
        let mut lapse: Option<LapseMark<'_>> = None;
        let mut retried = false;
        loop {
            if waited && self.gone.load(Ordering::SeqCst) {
                return Err(BlockError::Io(std::io::Error::other(
                    "write not started: its client's connection ended while it waited for the \
                     cluster lease",
                )));
            }
            match f.enter() {
                Ok(g) => {
                    return Ok(Admitted {
                        _g: g,
                        _turn: waited.then_some(turn),
                    })
                }
                Err(e) if f.lease_lapsed() => {
                    if tokio::time::Instant::now() >= until {
                        return Err(e);
                    }
                    waited = true;
                    if lapse.is_none() {
                        f.lapses.fetch_add(1, Ordering::SeqCst); // odd: in a lapse
                        lapse = Some(LapseMark(&f.lapses));
                    }
                    tokio::time::sleep(LEASE_POLL).await;
                }
                // Refused on the lease, renewed just after: once more.
                Err(_) if !retried && !f.is_fenced() && !f.is_held.load(Ordering::SeqCst) => {
                    retried = true;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// A write admitted by [`FenceGate::admit`]: counted in flight, and, if it
/// had to wait for the lease, holding its turn in line until it has landed.
struct Admitted<'a> {
    _g: InFlight<'a>,
    _turn: Option<tokio::sync::MutexGuard<'a, ()>>,
}

/// Ends the line holder's lapse (the count goes even again), however its
/// wait ends: admitted, refused, or its future dropped.
struct LapseMark<'a>(&'a std::sync::atomic::AtomicU64);
impl Drop for LapseMark<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// A write that waited its whole TTL in line for the lease.
fn lease_wait_expired() -> BlockError {
    BlockError::Io(std::io::Error::other(
        "write not acknowledged: this node's cluster lease was not confirmed within a TTL \
         (etcd unreachable, or the node was frozen); writes resume once it is renewed",
    ))
}

#[async_trait]
impl BlockTarget for FenceGate {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        self.fence.check_fresh()?;
        self.inner.read(offset, buf).await
    }
    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> BlockResult<()> {
        let _g = self.admit().await?;
        self.inner.write(offset, data, fua).await?;
        self.fence.check_lease()
    }
    async fn flush(&self) -> BlockResult<()> {
        self.inner.flush().await
    }
    async fn trim(&self, offset: u64, len: u64, fua: bool) -> BlockResult<()> {
        let _g = self.admit().await?;
        self.inner.trim(offset, len, fua).await?;
        self.fence.check_lease()
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        let _g = self.admit().await?;
        self.inner.write_zeroes(offset, len, flags).await?;
        self.fence.check_lease()
    }
    async fn block_status(&self, offset: u64, len: u64) -> BlockResult<Vec<Extent>> {
        self.fence.check_fresh()?;
        self.inner.block_status(offset, len).await
    }
    async fn cache(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.fence.check_fresh()?;
        self.inner.cache(offset, len).await
    }
    fn client_gone(&self) {
        self.gone.store(true, Ordering::SeqCst);
    }
    fn allocated_bytes(&self) -> u64 {
        self.inner.allocated_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::LocalTarget;

    #[tokio::test]
    async fn a_fence_reopens_only_for_the_migration_that_closed_it() {
        let dir = tempfile::tempdir().unwrap();
        let t = LocalTarget::create(&dir.path().join("d"), 4096).unwrap();
        let f = Fence::default();
        f.fence("b", "m2", &t).await.unwrap();
        assert!(!f.reopen("m1"), "a cancel of m1 opened m2's fence");
        assert!(f.is_fenced());
        assert!(f.reopen("m2"));
        assert!(!f.is_fenced());
        let g = Fence::closed("b", "m3");
        assert!(!g.reopen("m1") && g.is_fenced());
    }

    // Paused time: a refused write waits out its TTL instantly.
    #[tokio::test(start_paused = true)]
    async fn a_lease_bound_fence_acknowledges_writes_only_inside_the_lease() {
        use crate::cluster::{boottime_ns, LeaseClock};
        let dir = tempfile::tempdir().unwrap();
        let t: Arc<dyn BlockTarget> =
            Arc::new(LocalTarget::create(&dir.path().join("d"), 4096).unwrap());
        let f = Arc::new(Fence::default());
        let gate = FenceGate::new(t, f.clone());
        gate.write(0, b"a", false).await.unwrap(); // not bound: peer mode
        let clock = Arc::new(LeaseClock::new(Duration::from_secs(2)));
        f.bind_lease(clock.clone());
        // Bound, never confirmed: refused with EIO, reads still served.
        let e = gate.write(0, b"b", false).await.unwrap_err();
        assert_eq!(e.nbd_errno(), crate::nbd::proto::errno::EIO, "{e}");
        assert!(e.to_string().contains("cluster lease"), "{e}");
        assert!(gate
            .write_zeroes(0, 512, ZeroFlags::default())
            .await
            .is_err());
        let mut b = [0u8; 1];
        gate.read(0, &mut b).await.unwrap();
        assert_eq!(&b, b"a");
        clock.confirmed(boottime_ns());
        gate.write(0, b"c", false).await.unwrap();
        gate.trim(512, 512, false).await.unwrap();
        clock.invalidate();
        assert!(gate.write(0, b"d", false).await.is_err());
    }

    /// A lease-bound fence whose lease is not confirmed yet (a lapse), over
    /// a local target of `size` bytes: (its directory, the target, the
    /// fence, the lease's clock).
    fn lapsed(
        size: u64,
    ) -> (
        tempfile::TempDir,
        Arc<LocalTarget>,
        Arc<Fence>,
        Arc<crate::cluster::LeaseClock>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let t = Arc::new(LocalTarget::create(&dir.path().join("d"), size).unwrap());
        let f = Arc::new(Fence::default());
        let clock = Arc::new(crate::cluster::LeaseClock::new(Duration::from_secs(10)));
        f.bind_lease(clock.clone());
        (dir, t, f, clock)
    }

    /// `data` written at `offset` through `gate`, in a task of its own.
    fn spawn_write(
        gate: &Arc<FenceGate>,
        offset: u64,
        data: &'static [u8],
    ) -> tokio::task::JoinHandle<BlockResult<()>> {
        let gate = gate.clone();
        tokio::spawn(async move { gate.write(offset, data, false).await })
    }

    /// A write that arrives while the lease is unconfirmed waits for the
    /// renewal and is acknowledged after it, not refused; it is not in
    /// flight while it waits (a fence does not wait for it, and it is then
    /// refused); a held volume refuses at once, lapsed lease or not.
    #[tokio::test]
    async fn a_write_arriving_in_a_lapse_waits_for_the_renewal() {
        use crate::cluster::{boottime_ns, LeaseClock};
        let dir = tempfile::tempdir().unwrap();
        let t = Arc::new(LocalTarget::create(&dir.path().join("d"), 4096).unwrap());
        let f = Arc::new(Fence::default());
        let gate = Arc::new(FenceGate::new(t.clone(), f.clone()));
        let clock = Arc::new(LeaseClock::new(Duration::from_secs(10)));
        f.bind_lease(clock.clone());

        let w = tokio::spawn({
            let gate = gate.clone();
            async move { gate.write(0, b"w", false).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!w.is_finished(), "refused at once instead of waiting");
        assert_eq!(
            f.in_flight.load(Ordering::SeqCst),
            0,
            "counted while waiting"
        );
        clock.confirmed(boottime_ns());
        tokio::time::timeout(Duration::from_secs(5), w)
            .await
            .expect("still waiting after the renewal")
            .unwrap()
            .unwrap();

        // Waiting, then fenced: the fence does not wait for it, and it is
        // refused (EPERM), not admitted.
        clock.invalidate();
        let w = tokio::spawn({
            let gate = gate.clone();
            async move { gate.write(0, b"x", false).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        tokio::time::timeout(Duration::from_secs(1), f.fence("b", "m1", &*t))
            .await
            .expect("the fence waited for a write that was not admitted")
            .unwrap();
        clock.confirmed(boottime_ns());
        let e = w.await.unwrap().unwrap_err();
        assert_eq!(e.nbd_errno(), crate::nbd::proto::errno::EPERM, "{e}");
        let mut b = [0u8; 1];
        t.read(0, &mut b).await.unwrap();
        assert_eq!(&b, b"w");

        // Held and lapsed: refused at once, with the hold's reason.
        let f = Arc::new(Fence::default());
        let gate = FenceGate::new(t.clone(), f.clone());
        f.bind_lease(Arc::new(LeaseClock::new(Duration::from_secs(10))));
        f.hold_cluster("stale: owned by n9".into());
        let e = tokio::time::timeout(Duration::from_secs(1), gate.write(0, b"y", false))
            .await
            .expect("a held write waited for the lease")
            .unwrap_err();
        assert!(e.to_string().contains("owned by n9"), "{e}");
    }

    /// A write waiting for the lease on a connection that broke never
    /// starts: its client resent it on another connection and wrote on,
    /// and the old one landing late would overwrite that.
    #[tokio::test]
    async fn a_waiting_write_of_a_gone_client_never_lands() {
        use crate::cluster::boottime_ns;
        let (_dir, t, f, clock) = lapsed(4096);
        let old = Arc::new(FenceGate::new(t.clone(), f.clone()));
        let w = spawn_write(&old, 0, b"a");
        tokio::time::sleep(Duration::from_millis(100)).await;
        old.client_gone();
        clock.confirmed(boottime_ns());
        let new = FenceGate::new(t.clone(), f.clone());
        new.write(0, b"a", false).await.unwrap(); // the resent write
        new.write(0, b"b", false).await.unwrap(); // and a newer one
        let e = w.await.unwrap().unwrap_err();
        assert!(e.to_string().contains("connection ended"), "{e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut b = [0u8; 1];
        t.read(0, &mut b).await.unwrap();
        assert_eq!(&b, b"b", "the gone client's write landed after a newer one");
    }

    /// A write queued behind one that waits for the lease waits too: if
    /// its connection ends meanwhile, it never lands.
    #[tokio::test]
    async fn a_write_queued_in_a_lapse_of_a_gone_client_never_lands() {
        use crate::cluster::boottime_ns;
        let (_dir, t, f, clock) = lapsed(8192);
        let head = Arc::new(FenceGate::new(t.clone(), f.clone()));
        let doomed = Arc::new(FenceGate::new(t.clone(), f.clone()));
        let h = spawn_write(&head, 0, b"h");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let d = spawn_write(&doomed, 4096, b"d");
        tokio::time::sleep(Duration::from_millis(50)).await;
        doomed.client_gone();
        clock.confirmed(boottime_ns());
        h.await.unwrap().unwrap();
        let e = d.await.unwrap().unwrap_err();
        assert!(e.to_string().contains("connection ended"), "{e}");
        let mut b = [0u8; 1];
        t.read(4096, &mut b).await.unwrap();
        assert_eq!(b, [0], "the gone client's queued write landed");
        assert_eq!(f.lapses.load(Ordering::SeqCst) % 2, 0, "a lapse left open");
    }

    /// Waiting writes are admitted in arrival order, and a write arriving
    /// once the lease is back lines up behind them: the client's resent
    /// copy (on another connection) and the newer write it sends after
    /// that one's acknowledgement both land after the first copy, never
    /// before it, whatever becomes of the first copy's connection.
    #[tokio::test]
    async fn a_write_after_the_renewal_never_lands_before_one_that_waited() {
        use crate::cluster::boottime_ns;
        let (_dir, t, f, clock) = lapsed(4096);
        let old = Arc::new(FenceGate::new(t.clone(), f.clone()));
        let w = spawn_write(&old, 0, b"a");
        tokio::time::sleep(Duration::from_millis(100)).await;
        clock.confirmed(boottime_ns());
        // At once, before the waiting write's next look at the lease.
        let new = FenceGate::new(t.clone(), f.clone());
        new.write(0, b"a", false).await.unwrap(); // the resent copy
        new.write(0, b"b", false).await.unwrap(); // and a newer write
        w.await.unwrap().unwrap();
        let mut b = [0u8; 1];
        t.read(0, &mut b).await.unwrap();
        assert_eq!(&b, b"b", "the write that waited landed after a newer one");
        assert!(f.lapse_line.try_lock().is_ok(), "the line was left held");
    }

    /// A write that waited keeps its turn until it has landed, not just
    /// until it was admitted: its inner write may be slow (a clone fetching
    /// the region), and the client's resent copy and newer write must not
    /// land during it.
    #[tokio::test]
    async fn a_write_that_waited_lands_before_the_next_one_starts() {
        use crate::cluster::{boottime_ns, LeaseClock};
        struct SlowFirst(Arc<dyn BlockTarget>, AtomicBool);
        #[async_trait]
        impl BlockTarget for SlowFirst {
            fn size(&self) -> u64 {
                self.0.size()
            }
            fn capabilities(&self) -> Capabilities {
                self.0.capabilities()
            }
            async fn read(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
                self.0.read(offset, buf).await
            }
            async fn write(&self, offset: u64, data: &[u8], fua: bool) -> BlockResult<()> {
                if self.1.swap(false, Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                self.0.write(offset, data, fua).await
            }
            async fn flush(&self) -> BlockResult<()> {
                self.0.flush().await
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let t: Arc<dyn BlockTarget> =
            Arc::new(LocalTarget::create(&dir.path().join("d"), 4096).unwrap());
        let slow: Arc<dyn BlockTarget> = Arc::new(SlowFirst(t.clone(), AtomicBool::new(true)));
        let f = Arc::new(Fence::default());
        let clock = Arc::new(LeaseClock::new(Duration::from_secs(10)));
        f.bind_lease(clock.clone());
        let old = Arc::new(FenceGate::new(slow.clone(), f.clone()));
        let w = tokio::spawn({
            let old = old.clone();
            async move { old.write(0, b"a", false).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        clock.confirmed(boottime_ns());
        tokio::time::sleep(Duration::from_millis(100)).await; // admitted, landing slowly
        let new = FenceGate::new(slow, f.clone());
        new.write(0, b"a", false).await.unwrap();
        new.write(0, b"b", false).await.unwrap();
        w.await.unwrap().unwrap();
        let mut b = [0u8; 1];
        t.read(0, &mut b).await.unwrap();
        assert_eq!(&b, b"b", "the write that waited landed after a newer one");
    }

    /// A target whose writes run `during` before they take effect.
    struct Meanwhile {
        inner: Arc<dyn BlockTarget>,
        during: Box<dyn Fn() + Send + Sync>,
    }
    #[async_trait]
    impl BlockTarget for Meanwhile {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn capabilities(&self) -> Capabilities {
            self.inner.capabilities()
        }
        async fn read(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
            self.inner.read(offset, buf).await
        }
        async fn write(&self, offset: u64, data: &[u8], fua: bool) -> BlockResult<()> {
            (self.during)();
            self.inner.write(offset, data, fua).await
        }
        async fn flush(&self) -> BlockResult<()> {
            self.inner.flush().await
        }
    }

    /// The lease was lost and replaced while a write was in flight, and
    /// re-confirmation found the volume no longer ours (held): the write,
    /// which finished inside the *new* lease, must not be acknowledged.
    #[tokio::test]
    async fn a_write_spanning_a_lost_lease_and_a_lost_volume_is_not_acknowledged() {
        use crate::cluster::{boottime_ns, LeaseClock};
        let dir = tempfile::tempdir().unwrap();
        let f = Arc::new(Fence::default());
        let clock = Arc::new(LeaseClock::new(Duration::from_secs(10)));
        clock.confirmed(boottime_ns());
        f.bind_lease(clock.clone());
        let (f2, c2) = (f.clone(), clock.clone());
        let t: Arc<dyn BlockTarget> = Arc::new(Meanwhile {
            inner: Arc::new(LocalTarget::create(&dir.path().join("d"), 4096).unwrap()),
            during: Box::new(move || {
                // What the keeper does on a lost lease: invalidate, rebind,
                // hold what is no longer ours, confirm the new lease.
                c2.invalidate();
                f2.hold("writes refused: no longer ours".into());
                c2.confirmed(boottime_ns());
            }),
        });
        let gate = FenceGate::new(t, f.clone());
        let e = gate.write(0, b"x", false).await.unwrap_err();
        assert_eq!(e.nbd_errno(), crate::nbd::proto::errno::EIO, "{e}");
    }

    /// An answer about a migration lifts only the migration's hold: a
    /// copy the cluster's directory holds (stale, not re-confirmed) stays
    /// held, and the other way round.
    #[tokio::test]
    async fn each_hold_is_lifted_only_by_what_set_it() {
        let dir = tempfile::tempdir().unwrap();
        let t: Arc<dyn BlockTarget> =
            Arc::new(LocalTarget::create(&dir.path().join("d"), 4096).unwrap());
        let f = Arc::new(Fence::default());
        let gate = FenceGate::new(t, f.clone());
        f.hold("writes held: migration".into());
        f.hold_cluster("writes refused: stale".into());
        f.release_hold();
        let e = gate.write(0, b"x", false).await.unwrap_err();
        assert!(e.to_string().contains("stale"), "{e}");
        assert_eq!(f.held_for_migration(), None);
        f.hold("writes held: migration".into());
        f.release_cluster_hold();
        let e = gate.write(0, b"x", false).await.unwrap_err();
        assert!(e.to_string().contains("migration"), "{e}");
        f.release_hold();
        gate.write(0, b"x", false).await.unwrap();
        assert_eq!(f.held(), None);
    }

    #[tokio::test]
    async fn a_held_fence_refuses_writes_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let t: Arc<dyn BlockTarget> =
            Arc::new(LocalTarget::create(&dir.path().join("d"), 4096).unwrap());
        let f = Arc::new(Fence::default());
        let gate = FenceGate::new(t, f.clone());
        f.hold("writes held: test".into());
        let e = gate.write(0, b"x", false).await.unwrap_err();
        assert!(e.to_string().contains("writes held"), "{e}");
        let mut b = [0u8; 1];
        gate.read(0, &mut b).await.unwrap();
        f.release_hold();
        gate.write(0, b"x", false).await.unwrap();
    }
}
