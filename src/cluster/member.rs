//! A node's membership: its lease, `members/NAME` and `nodes/NAME`, the
//! renewal loop, leaving, and `node list`.
//!
//! One lease per node, never per volume: 1,000 nodes renew 500 times a
//! second, none of it a raft write, and a dead node's lease expires one key.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use tokio::sync::watch;
use tracing::{info, warn};

use super::etcd::{Etcd, CALL_TIMEOUT};
use super::{
    boottime_ns, by_node_prefix, member_key, node_key, ClusterConfig, ClusterError, LeaseClock,
    MemberRecord, NodeRecord, PREFIX,
};
use crate::api::types::ClusterNode;

/// This node's place in the cluster, from [`Cluster::join`] until
/// [`Cluster::leave`].
pub struct Cluster {
    pub name: String,
    /// The cluster's id (see [`super::ClusterIdentity`]).
    pub id: String,
    pub(super) etcd: Etcd,
    /// The data directory's id, in `members/` and `nodes/`: tells this
    /// node's previous run from another process using the same name.
    pub dir_id: String,
    /// The lease `nodes/NAME` is under now (0 while there is none).
    lease: AtomicI64,
    clock: Arc<LeaseClock>,
    /// What `nodes/NAME` says (written again after a lost lease).
    record: NodeRecord,
    stop: watch::Sender<bool>,
    keeper: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Told, after a lost lease was replaced, which volumes the directory
    /// still gives this node, before writes flow again.
    on_rebound: std::sync::Mutex<Option<ReboundHook>>,
    /// Serialises this node's directory changes (create, remove): a remove
    /// that read a record between a create's record and its copy would
    /// delete the record and leave the copy served without one.
    pub directory_ops: tokio::sync::Mutex<()>,
}

/// See [`Cluster::on_rebound`].
pub type ReboundHook = Box<dyn Fn(&[(String, u64)]) + Send + Sync>;

impl Cluster {
    /// Joins: grants the lease, registers `nodes/NAME` under it (refusing
    /// if another live process holds the name), writes `members/NAME`, and
    /// starts renewing. `record` says where the node is reached. The
    /// caller holds the data directory's lock, so a `nodes/NAME` carrying
    /// our `dir_id` can only be our own previous run: its lease is revoked
    /// instead of waited out.
    pub async fn join(
        cfg: &ClusterConfig,
        record: NodeRecord,
        dir_cluster: Option<&str>,
    ) -> Result<Arc<Cluster>, ClusterError> {
        let etcd = Etcd::new(&cfg.endpoints, cfg.tls_dir.as_deref())?;
        let id = match dir_cluster {
            Some(ours) => check_identity(&etcd, ours).await?,
            None => identity(&etcd, true)
                .await?
                .expect("made or read when asked to create"),
        };
        let ttl_secs = cfg.lease_ttl.as_secs().max(1) as i64;
        let sent_at = boottime_ns();
        let grant = etcd
            .call("lease grant", CALL_TIMEOUT, |mut c| async move {
                c.lease_grant(ttl_secs, None).await
            })
            .await?;
        let ttl = Duration::from_secs(grant.ttl().max(1) as u64);
        let clock = Arc::new(LeaseClock::new(ttl));
        clock.confirmed(sent_at);
        let (stop, _) = watch::channel(false);
        let cluster = Arc::new(Cluster {
            name: record.name.clone(),
            id,
            dir_id: record.dir_id.clone(),
            etcd,
            lease: AtomicI64::new(grant.id()),
            clock,
            record,
            stop,
            keeper: std::sync::Mutex::new(None),
            on_rebound: std::sync::Mutex::new(None),
            directory_ops: tokio::sync::Mutex::new(()),
        });
        let registered = async {
            cluster.register(grant.id()).await?;
            cluster.write_member().await
        }
        .await;
        if let Err(e) = registered {
            let _ = cluster.revoke(grant.id()).await;
            return Err(e);
        }
        info!(
            node = %cluster.name,
            lease = grant.id(),
            ttl = ?ttl,
            etcd = %cluster.etcd.pinned(),
            "joined the cluster"
        );
        let keeper = tokio::spawn(keep_alive(cluster.clone()));
        *cluster.keeper.lock().expect("keeper lock") = Some(keeper);
        Ok(cluster)
    }

    /// After a lost lease is replaced and the records rebound, and before
    /// the new lease counts, `hook` is told the volumes the directory still
    /// gives this node (so the node can hold the ones it lost meanwhile).
    pub fn on_rebound(&self, hook: ReboundHook) {
        *self.on_rebound.lock().expect("hook lock") = Some(hook);
    }

    /// The lease this node holds now (0: none).
    pub fn lease(&self) -> i64 {
        self.lease.load(Ordering::Acquire)
    }

    /// The lease's deadline, which the fences of this node's cluster
    /// volumes check on every write.
    pub fn clock(&self) -> Arc<LeaseClock> {
        self.clock.clone()
    }

    /// What `node info` says of this node's membership.
    pub fn info(&self) -> crate::api::types::NodeClusterInfo {
        crate::api::types::NodeClusterInfo {
            id: self.id.clone(),
            etcd: self.etcd.pinned().to_owned(),
            lease: self.lease(),
            lease_ttl_seconds: self.clock.ttl().as_secs(),
            lease_valid: self.lease_valid_now(),
        }
    }

    /// Whether the node's lease is certainly alive in etcd now: true
    /// until `s + T - m` after the last confirmed renewal (`s` read before
    /// its request left). See [`LeaseClock`].
    pub fn lease_valid_now(&self) -> bool {
        self.clock.valid_now()
    }

    /// Creates `nodes/NAME` under `lease`, only if no key is there. A key
    /// left by this directory's previous run is revoked and the create
    /// tried again; anyone else's is a refusal.
    async fn register(&self, lease: i64) -> Result<(), ClusterError> {
        let key = node_key(&self.name);
        let value = serde_json::to_string(&self.record).expect("record serialises");
        for _ in 0..3 {
            let (k, v) = (key.clone(), value.clone());
            let r = self
                .etcd
                .call("register node", CALL_TIMEOUT, move |mut c| {
                    let txn = Txn::new()
                        .when([Compare::version(k.clone(), CompareOp::Equal, 0)])
                        .and_then([TxnOp::put(
                            k.clone(),
                            v.clone(),
                            Some(PutOptions::new().with_lease(lease)),
                        )])
                        .or_else([TxnOp::get(k.clone(), None)]);
                    async move { c.txn(txn).await }
                })
                .await?;
            if r.succeeded() {
                return Ok(());
            }
            let Some((held, holder_lease)) = first_kv(&r) else {
                continue; // gone in between: try again
            };
            if holder_lease == lease {
                return Ok(()); // our own create, whose answer was lost
            }
            let holder: NodeRecord = parse(&key, &held)?;
            // Same directory id but another host or path: a copy of this
            // directory (cloned disk, restored backup, shared storage) run
            // by a live process, not our previous run. (A key written
            // before these fields existed has them empty: trusted.)
            let elsewhere = (!holder.host.is_empty() && holder.host != self.record.host)
                || (!holder.data_dir.is_empty() && holder.data_dir != self.record.data_dir);
            if holder.dir_id != self.dir_id || elsewhere {
                return Err(ClusterError::NameTaken {
                    name: self.name.clone(),
                    holder: if elsewhere {
                        format!(
                            "{}, a copy of this directory at {}:{}",
                            holder.dir_id, holder.host, holder.data_dir
                        )
                    } else {
                        holder.dir_id
                    },
                    ours: self.dir_id.clone(),
                    api: holder.api,
                });
            }
            info!(
                old_lease = holder_lease,
                "nodes/{} is this directory's previous run: revoking its lease", self.name
            );
            let _ = self.revoke(holder_lease).await;
        }
        Err(ClusterError::Conflict(format!("registering {key}")))
    }

    /// Writes `members/NAME`, keeping the date it first joined. Refused if
    /// the member is another data directory's and that one still owns
    /// volumes (its data would be orphaned under our name).
    async fn write_member(&self) -> Result<(), ClusterError> {
        let key = member_key(&self.name);
        let old: Option<MemberRecord> = self
            .etcd
            .read_json("read member", &key)
            .await?
            .map(|(m, _)| m);
        if let Some(m) = &old {
            if m.dir_id != self.dir_id {
                let volumes = self.owned_count(&self.name).await?;
                if volumes > 0 {
                    return Err(ClusterError::MemberOfAnotherDir {
                        name: self.name.clone(),
                        holder: m.dir_id.clone(),
                        ours: self.dir_id.clone(),
                        volumes,
                    });
                }
                warn!(old_dir = %m.dir_id, "member {} was another data directory, which owns no volume: taking the name", self.name);
            }
        }
        let member = MemberRecord {
            v: 1,
            name: self.name.clone(),
            dir_id: self.dir_id.clone(),
            nbd: self.record.nbd.clone(),
            api: self.record.api.clone(),
            vhost_user_dir: self.record.vhost_user_dir.clone(),
            joined: old.map_or_else(super::now_rfc3339, |m| m.joined),
            lease_ttl: self.clock.ttl().as_secs(),
        };
        let value = serde_json::to_string(&member).expect("record serialises");
        self.etcd
            .call("write member", CALL_TIMEOUT, move |mut c| {
                let (k, v) = (key.clone(), value.clone());
                async move { c.put(k, v, None).await }
            })
            .await?;
        Ok(())
    }

    /// How many volumes `node` owns (the `by-node/` index, counted by etcd).
    pub async fn owned_count(&self, node: &str) -> Result<i64, ClusterError> {
        let prefix = by_node_prefix(node);
        let r = self
            .etcd
            .call("count volumes", CALL_TIMEOUT, move |mut c| {
                let p = prefix.clone();
                async move {
                    c.get(p, Some(GetOptions::new().with_prefix().with_count_only()))
                        .await
                }
            })
            .await?;
        Ok(r.count())
    }

    /// `nodes/NAME` of a live node, if it is up.
    pub async fn live_node(&self, name: &str) -> Result<Option<NodeRecord>, ClusterError> {
        Ok(self
            .etcd
            .read_json("read node", &node_key(name))
            .await?
            .map(|(n, _)| n))
    }

    /// Whether `members/NAME` exists.
    pub async fn is_member(&self, name: &str) -> Result<bool, ClusterError> {
        let key = member_key(name);
        let r = self
            .etcd
            .call("read member", CALL_TIMEOUT, move |mut c| {
                let k = key.clone();
                async move { c.get(k, Some(GetOptions::new().with_count_only())).await }
            })
            .await?;
        Ok(r.count() > 0)
    }

    /// `node forget NAME`: removes a member that is down and owns no
    /// volume (one Txn comparing both), so `node list` stops showing a host
    /// that is gone for good. A member that is up, or that the directory
    /// still gives a volume to, is refused: its volumes would have no node.
    pub async fn forget_member(&self, name: &str) -> Result<(), ClusterError> {
        let (mkey, nkey, owned) = (member_key(name), node_key(name), by_node_prefix(name));
        let r = self
            .etcd
            .call("forget member", CALL_TIMEOUT, |mut c| {
                let txn = Txn::new()
                    .when([
                        Compare::version(mkey.clone(), CompareOp::Greater, 0),
                        Compare::version(nkey.clone(), CompareOp::Equal, 0),
                        Compare::version(owned.clone(), CompareOp::Equal, 0).with_prefix(),
                    ])
                    .and_then([TxnOp::delete(mkey.clone(), None)]);
                async move { c.txn(txn).await }
            })
            .await?;
        if r.succeeded() {
            tracing::info!(node = name, "member forgotten");
            return Ok(());
        }
        if !self.is_member(name).await? {
            return Err(ClusterError::NoSuchNode(name.into()));
        }
        if self.live_node(name).await?.is_some() {
            return Err(ClusterError::Conflict(format!(
                "node {name:?} is up: stop it before forgetting it"
            )));
        }
        let n = self.owned_count(name).await?;
        Err(ClusterError::Conflict(format!(
            "node {name:?} still owns {n} volume(s) in the cluster's directory: they would be \
             left with no node; bring it back and migrate them away (or remove them) first"
        )))
    }

    /// `node list`: every member, up or down, with where it is reached and
    /// how many volumes it owns.
    pub async fn node_list(&self) -> Result<Vec<ClusterNode>, ClusterError> {
        let members = self.range(&format!("{PREFIX}members/")).await?;
        let live = self.range(&format!("{PREFIX}nodes/")).await?;
        let mut up = std::collections::HashMap::new();
        for (key, value) in live {
            let n: NodeRecord = parse(&key, &value)?;
            up.insert(n.name.clone(), n);
        }
        let mut out = Vec::new();
        for (key, value) in members {
            let m: MemberRecord = parse(&key, &value)?;
            let volumes = self.owned_count(&m.name).await?;
            let n = ClusterNode {
                state: if up.contains_key(&m.name) {
                    "up"
                } else {
                    "down"
                }
                .into(),
                // A live node's addresses are its current ones.
                nbd: up.get(&m.name).map_or(m.nbd.clone(), |n| n.nbd.clone()),
                api: up.get(&m.name).map_or(m.api.clone(), |n| n.api.clone()),
                vhost_user_dir: up
                    .get(&m.name)
                    .map_or(m.vhost_user_dir.clone(), |n| n.vhost_user_dir.clone()),
                version: up.get(&m.name).map(|n| n.version.clone()),
                joined: m.joined,
                name: m.name,
                volumes: volumes.max(0) as u64,
            };
            out.push(n);
        }
        Ok(out)
    }

    /// Every key and value under `prefix` (small prefixes: members, nodes).
    async fn range(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, ClusterError> {
        let p = prefix.to_owned();
        let r = self
            .etcd
            .call("list", CALL_TIMEOUT, move |mut c| {
                let p = p.clone();
                async move { c.get(p, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        Ok(r.kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    kv.value().to_vec(),
                )
            })
            .collect())
    }

    /// Renews once on the pinned endpoint (then the others), on a fresh
    /// keep-alive stream: one request, one answer, so a late answer is
    /// never credited to a newer request. `Ok(false)`: etcd says the lease
    /// is gone.
    async fn renew(&self, lease: i64) -> Result<bool, ClusterError> {
        let sent_at = boottime_ns(); // before the request leaves
        let alive = self
            .etcd
            .call(
                "lease renewal",
                self.clock.attempt_timeout(),
                move |mut c| async move {
                    match c.lease_keep_alive(lease).await {
                        Ok(_) => Ok(true),
                        Err(etcd_client::Error::LeaseKeepAliveError(m))
                            if m.contains("not found") =>
                        {
                            Ok(false)
                        }
                        Err(e) => Err(e),
                    }
                },
            )
            .await?;
        if alive {
            self.clock.confirmed(sent_at);
        }
        Ok(alive)
    }

    /// After the lease was lost: a new lease, `nodes/NAME` under it, and
    /// this node's records rebound to it; only then do writes flow again.
    async fn rejoin(&self) -> Result<(), ClusterError> {
        // The etcd may have been replaced (wiped, restored, another one
        // behind the same endpoints) while the node ran: it would find none
        // of its records there and hold every copy as an orphan.
        check_identity(&self.etcd, &self.id).await?;
        let ttl_secs = self.clock.ttl().as_secs() as i64;
        let sent_at = boottime_ns();
        let g = self
            .etcd
            .call("lease grant", CALL_TIMEOUT, |mut c| async move {
                c.lease_grant(ttl_secs, None).await
            })
            .await?;
        let bound = async {
            self.register(g.id()).await?;
            self.rebind_owned(g.id()).await
        }
        .await;
        let owned = match bound {
            Ok(owned) => owned,
            Err(e) => {
                let _ = self.revoke(g.id()).await;
                return Err(e);
            }
        };
        if let Some(hook) = &*self.on_rebound.lock().expect("hook lock") {
            hook(&owned);
        }
        self.lease.store(g.id(), Ordering::Release);
        self.clock.confirmed(sent_at);
        info!(lease = g.id(), "registered again under a new lease");
        Ok(())
    }

    /// Revokes `lease`; whether etcd confirmed it (else it expires by itself).
    async fn revoke(&self, lease: i64) -> bool {
        let r = self
            .etcd
            .call("lease revoke", CALL_TIMEOUT, move |mut c| async move {
                match c.lease_revoke(lease).await {
                    Ok(_) => Ok(()),
                    // Already gone: what we wanted.
                    Err(e) if e.to_string().contains("not found") => Ok(()),
                    Err(e) => Err(e),
                }
            })
            .await;
        match r {
            Ok(()) => true,
            Err(e) => {
                warn!(lease, "cannot revoke the lease (it expires by itself): {e}");
                false
            }
        }
    }

    /// A clean stop, once the node acknowledges no more writes: stops
    /// renewing and revokes the lease, so the node shows down at once
    /// instead of after its TTL.
    pub async fn leave(&self) {
        // send_replace: stored even if the keeper has not subscribed yet.
        self.stop.send_replace(true);
        let keeper = self.keeper.lock().expect("keeper lock").take();
        if let Some(k) = keeper {
            let _ = k.await;
        }
        self.clock.invalidate();
        let lease = self.lease.swap(0, Ordering::AcqRel);
        if lease != 0 && self.revoke(lease).await {
            info!(node = %self.name, "left the cluster (lease revoked)");
        }
    }
}

/// Renews the lease every `(T - m) / 4` until [`Cluster::leave`]. A lease
/// etcd no longer knows (expired while the node was frozen or cut off, or
/// revoked by hand) stops counting at once and is replaced.
///
/// A failed renewal is retried after [`RETRY_AFTER_FAILURE`] while the
/// lease is still trusted, not after a whole period: when the etcd leader
/// freezes, the surviving members need an election (one to two election
/// timeouts) before any renewal can succeed, and a round that first
/// waited out the hung member can leave less than a period of the lease's
/// trusted life. Once the lease has lapsed anyway, retries back off
/// (doubling, with jitter, up to a period), so a thousand nodes do not
/// hammer an etcd that is coming back. A failed rejoin counts as a failure.
async fn keep_alive(c: Arc<Cluster>) {
    let mut stop = c.stop.subscribe();
    let mut failures = 0u32;
    // An etcd outage fails every renewal: the first is logged, then one a minute.
    let mut throttle = crate::node::WarnThrottle::default();
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        let pause = retry_pause(failures, c.lease_valid_now(), c.clock.renew_every());
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.changed() => return,
        }
        let lease = c.lease();
        match c.renew(lease).await {
            Ok(true) => {
                throttle = Default::default();
                if failures > 0 {
                    info!(
                        lease,
                        "lease renewed again after {failures} failed attempt(s)"
                    );
                }
                failures = 0;
            }
            Ok(false) => {
                c.clock.invalidate();
                c.lease.store(0, Ordering::Release);
                warn!(
                    lease,
                    "etcd no longer knows this node's lease: joining again"
                );
                match c.rejoin().await {
                    Ok(()) => failures = 0,
                    Err(e) => {
                        failures += 1;
                        warn!("cannot join the cluster again (retrying): {e}");
                        // Keep the old id so the next round finds it gone again.
                        c.lease.store(lease, Ordering::Release);
                    }
                }
            }
            Err(e) => {
                failures += 1;
                if throttle.ready() {
                    warn!(
                        lease,
                        failures,
                        valid = c.lease_valid_now(),
                        "lease renewal failed: {e}"
                    );
                }
            }
        }
    }
}

/// The cluster's id: etcd's `cluster` key. With `create`, made by this
/// call (one create-only transaction) if no node made it before; without,
/// only read (None: this etcd holds no dlsm cluster).
async fn identity(etcd: &Etcd, create: bool) -> Result<Option<String>, ClusterError> {
    let key = super::cluster_key();
    let mine = super::ClusterIdentity {
        v: 1,
        id: format!("{:016x}", rand::random::<u64>()),
        created: super::now_rfc3339(),
    };
    let value = serde_json::to_string(&mine).expect("identity serialises");
    let r = etcd
        .call("read the cluster's id", CALL_TIMEOUT, |mut c| {
            let (k, v) = (key.clone(), value.clone());
            let mut txn = Txn::new().when([Compare::version(k.clone(), CompareOp::Equal, 0)]);
            if create {
                txn = txn.and_then([TxnOp::put(k.clone(), v, None)]);
            }
            let txn = txn.or_else([TxnOp::get(k, None)]);
            async move { c.txn(txn).await }
        })
        .await?;
    if r.succeeded() {
        if !create {
            return Ok(None);
        }
        info!(cluster = %mine.id, "made the cluster's identity (first node to join)");
        return Ok(Some(mine.id));
    }
    let (held, _) = first_kv(&r).ok_or_else(|| ClusterError::Corrupt {
        key: key.clone(),
        why: "neither created nor there".into(),
    })?;
    let theirs: super::ClusterIdentity = parse(&key, &held)?;
    Ok(Some(theirs.id))
}

/// Checks that the etcd holds cluster `ours` (read only: an etcd without
/// the key is not made ours).
async fn check_identity(etcd: &Etcd, ours: &str) -> Result<String, ClusterError> {
    match identity(etcd, false).await? {
        Some(id) if id == ours => Ok(id),
        Some(theirs) => Err(ClusterError::OtherCluster {
            ours: ours.to_owned(),
            theirs,
        }),
        None => Err(ClusterError::NoCluster {
            ours: ours.to_owned(),
        }),
    }
}

/// The pause before retrying a failed renewal while the lease is trusted.
const RETRY_AFTER_FAILURE: Duration = Duration::from_millis(200);

/// How long the keeper waits before its next renewal, after `failures`
/// failed ones in a row (see [`keep_alive`]).
fn retry_pause(failures: u32, lease_valid: bool, period: Duration) -> Duration {
    if failures == 0 {
        return period;
    }
    let quick = RETRY_AFTER_FAILURE.min(period);
    if lease_valid {
        return quick;
    }
    let backoff = quick
        .saturating_mul(1 << (failures - 1).min(16))
        .min(period);
    backoff.mul_f64(0.75 + rand::random::<f64>() / 2.0)
}

/// The value and lease of the first key a transaction's `or_else` get read.
fn first_kv(r: &etcd_client::TxnResponse) -> Option<(Vec<u8>, i64)> {
    r.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Get(g) => g.kvs().first().map(|kv| (kv.value().to_vec(), kv.lease())),
        _ => None,
    })
}

/// A record read from etcd.
pub(super) fn parse<T: serde::de::DeserializeOwned>(
    key: &str,
    value: &[u8],
) -> Result<T, ClusterError> {
    serde_json::from_slice(value).map_err(|e| ClusterError::Corrupt {
        key: key.to_owned(),
        why: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewals_retry_quickly_while_trusted_then_back_off() {
        let p = Duration::from_secs(2);
        assert_eq!(retry_pause(0, true, p), p);
        assert_eq!(retry_pause(5, true, p), Duration::from_millis(200));
        let lapsed: Vec<Duration> = (1..=6).map(|f| retry_pause(f, false, p)).collect();
        assert!(lapsed[0] <= Duration::from_millis(250), "{lapsed:?}");
        assert!(lapsed[5] >= Duration::from_millis(1500), "{lapsed:?}");
        assert!(lapsed.iter().all(|d| *d <= p.mul_f64(1.25)), "{lapsed:?}");
    }
}
