//! The directory: one record per volume (`volumes/NAME`, a
//! [`VolumeRecord`]) and the `by-node/NODE/NAME` index, kept in the same
//! transactions.
//!
//! Every change is one transaction that compares what was read: create
//! compares that the name is free and that the creator's `nodes/` key is
//! under the creator's current lease (so a node whose lease lapsed cannot
//! create); removal compares the record's `mod_revision`. A transaction
//! whose answer was lost (a timeout, then a retry on another endpoint)
//! is recognised on the retry by the record's `id`.

use std::collections::HashSet;

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp, TxnOpResponse};

use super::etcd::CALL_TIMEOUT;
use super::member::parse;
use super::{
    by_node_key, node_key, volume_key, Cluster, ClusterError, NodeRecord, VolumeRecord, PREFIX,
};
use crate::api::types::ClusterVolume;

/// Records read per request by [`Cluster::volumes`] (~0.5 KB each, far
/// under the client's 4 MiB answer limit).
const PAGE: i64 = 1000;

impl Cluster {
    /// Writes the record of a new volume owned by this node, generation 1.
    /// Refused if the name exists anywhere in the cluster, or if this
    /// node's `nodes/` key is not under its current lease.
    pub async fn create_record(&self, name: &str, size: u64) -> Result<VolumeRecord, ClusterError> {
        let lease = self.lease();
        if lease == 0 || !self.lease_valid_now() {
            return Err(ClusterError::LeaseLost);
        }
        let now = super::now_rfc3339();
        let rec = VolumeRecord {
            v: 1,
            name: name.to_owned(),
            size,
            owner: self.name.clone(),
            owner_lease: lease,
            generation: 1,
            id: crate::node::store::new_migration_id(),
            migration: None,
            table: Some(super::TableSummary::local()),
            created: now.clone(),
            changed: now,
        };
        let value = serde_json::to_string(&rec).expect("record serialises");
        let (vkey, nkey, ikey) = (
            volume_key(name),
            node_key(&self.name),
            by_node_key(&self.name, name),
        );
        let r = self
            .etcd
            .call("create volume record", CALL_TIMEOUT, |mut c| {
                let txn = Txn::new()
                    .when([
                        Compare::version(vkey.clone(), CompareOp::Equal, 0),
                        Compare::lease(nkey.clone(), CompareOp::Equal, lease),
                    ])
                    .and_then([
                        TxnOp::put(vkey.clone(), value.clone(), None),
                        TxnOp::put(ikey.clone(), "1", None), // generation 1
                    ])
                    .or_else([TxnOp::get(vkey.clone(), None)]);
                async move { c.txn(txn).await }
            })
            .await?;
        if r.succeeded() {
            return Ok(rec);
        }
        let held = r.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.value().to_vec()),
            _ => None,
        });
        match held {
            Some(v) => {
                let other: VolumeRecord = parse(&vkey, &v)?;
                if other.id == rec.id {
                    return Ok(rec); // ours: an earlier try was applied
                }
                Err(ClusterError::VolumeExists {
                    name: name.to_owned(),
                    owner: other.owner,
                })
            }
            // The name is free, so the lease compare failed.
            None => Err(ClusterError::LeaseLost),
        }
    }

    /// A volume's record and its `mod_revision`, read linearizably.
    pub async fn record(&self, name: &str) -> Result<Option<(VolumeRecord, i64)>, ClusterError> {
        self.etcd
            .read_json("read volume record", &volume_key(name))
            .await
    }

    /// Deletes a record read at `mod_revision`, with its index entry.
    /// Refused (a conflict) if the record changed since.
    pub async fn delete_record(
        &self,
        rec: &VolumeRecord,
        mod_revision: i64,
    ) -> Result<(), ClusterError> {
        let (vkey, ikey) = (volume_key(&rec.name), by_node_key(&rec.owner, &rec.name));
        let r = self
            .etcd
            .call("delete volume record", CALL_TIMEOUT, |mut c| {
                let txn = Txn::new()
                    .when([Compare::mod_revision(
                        vkey.clone(),
                        CompareOp::Equal,
                        mod_revision,
                    )])
                    .and_then([
                        TxnOp::delete(vkey.clone(), None),
                        TxnOp::delete(ikey.clone(), None),
                    ])
                    .or_else([TxnOp::get(vkey.clone(), None)]);
                async move { c.txn(txn).await }
            })
            .await?;
        if r.succeeded() {
            return Ok(());
        }
        let still = r.op_responses().into_iter().any(|op| match op {
            TxnOpResponse::Get(g) => !g.kvs().is_empty(),
            _ => false,
        });
        if still {
            Err(ClusterError::Conflict(format!(
                "volume {:?}'s record",
                rec.name
            )))
        } else {
            Ok(()) // gone already: an earlier try was applied
        }
    }

    /// The names of the volumes the index gives this node.
    pub async fn owned(&self) -> Result<Vec<String>, ClusterError> {
        let prefix = super::by_node_prefix(&self.name);
        let p = prefix.clone();
        let r = self
            .etcd
            .call("list owned volumes", CALL_TIMEOUT, move |mut c| {
                let p = p.clone();
                async move {
                    c.get(p, Some(GetOptions::new().with_prefix().with_keys_only()))
                        .await
                }
            })
            .await?;
        Ok(r.kvs()
            .iter()
            .filter_map(|kv| {
                std::str::from_utf8(kv.key())
                    .ok()
                    .and_then(|k| k.strip_prefix(&prefix))
                    .map(str::to_owned)
            })
            .collect())
    }

    /// Rebinds every record this node owns to `lease` (its new lease, at
    /// startup or after losing the old one): one transaction per record,
    /// comparing its revision and that `nodes/NAME` is under `lease`.
    /// Returns the names this node owns.
    pub async fn rebind_owned(&self, lease: i64) -> Result<Vec<(String, u64)>, ClusterError> {
        let mut owned = Vec::new();
        for name in self.owned().await? {
            if let Some(g) = self.rebind_one(&name, lease).await? {
                owned.push((name, g));
            }
        }
        Ok(owned)
    }

    /// Rebinds `name`'s record to `lease` if this node owns it; its
    /// generation, or `None` if the record is gone or names another node.
    /// A record that changed between the read and the transaction (this
    /// node's own migration start or clear, racing a lost lease's
    /// rebinding; a takeover) is read again, a few times.
    async fn rebind_one(&self, name: &str, lease: i64) -> Result<Option<u64>, ClusterError> {
        let (vkey, nkey) = (volume_key(name), node_key(&self.name));
        for _ in 0..5 {
            let Some((mut rec, rev)) = self.record(name).await? else {
                return Ok(None); // an index entry whose record went
            };
            if rec.owner != self.name {
                return Ok(None); // moved while this node was away
            }
            if rec.owner_lease == lease {
                return Ok(Some(rec.generation));
            }
            rec.owner_lease = lease;
            rec.changed = super::now_rfc3339();
            let value = serde_json::to_string(&rec).expect("record serialises");
            let r = self
                .etcd
                .call("rebind volume record", CALL_TIMEOUT, |mut c| {
                    let txn = Txn::new()
                        .when([
                            Compare::mod_revision(vkey.clone(), CompareOp::Equal, rev),
                            Compare::lease(nkey.clone(), CompareOp::Equal, lease),
                        ])
                        .and_then([TxnOp::put(vkey.clone(), value.clone(), None)]);
                    async move { c.txn(txn).await }
                })
                .await?;
            if r.succeeded() {
                return Ok(Some(rec.generation));
            }
        }
        Err(ClusterError::Conflict(format!("rebinding {vkey}")))
    }

    /// Every record, [`PAGE`] per request, all pages at one revision (one
    /// consistent snapshot however large the cluster).
    pub async fn records(&self) -> Result<Vec<VolumeRecord>, ClusterError> {
        let prefix = format!("{PREFIX}volumes/");
        // The prefix's range end: its last byte plus one ('/' + 1 = '0').
        let mut end = prefix.clone().into_bytes();
        *end.last_mut().expect("non-empty") += 1;
        let mut start = prefix.into_bytes();
        let mut rev = 0;
        let mut out = Vec::new();
        loop {
            let (s, e) = (start.clone(), end.clone());
            let r = self
                .etcd
                .call("list volume records", CALL_TIMEOUT, move |mut c| {
                    let mut o = GetOptions::new().with_range(e.clone()).with_limit(PAGE);
                    if rev != 0 {
                        o = o.with_revision(rev);
                    }
                    let s = s.clone();
                    async move { c.get(s, Some(o)).await }
                })
                .await?;
            if rev == 0 {
                rev = r.header().map_or(0, |h| h.revision());
            }
            for kv in r.kvs() {
                out.push(parse(&String::from_utf8_lossy(kv.key()), kv.value())?);
            }
            match (r.more(), r.kvs().last()) {
                (true, Some(last)) => {
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => return Ok(out),
            }
        }
    }

    /// `volume list` in cluster mode: every volume, its node, and whether
    /// that node is up.
    pub async fn volumes(&self) -> Result<Vec<ClusterVolume>, ClusterError> {
        let records = self.records().await?;
        let prefix = format!("{PREFIX}nodes/");
        let live = self
            .etcd
            .call("list nodes", CALL_TIMEOUT, move |mut c| {
                let p = prefix.clone();
                async move { c.get(p, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        // A node is up under a lease; a record names its owner under one.
        let mut up = HashSet::new();
        for kv in live.kvs() {
            let n: NodeRecord = parse(&String::from_utf8_lossy(kv.key()), kv.value())?;
            up.insert((n.name, kv.lease()));
        }
        Ok(records
            .into_iter()
            .map(|r| ClusterVolume {
                state: if !up.contains(&(r.owner.clone(), r.owner_lease)) {
                    "unavailable"
                } else if r.migration.is_some() {
                    "migrating"
                } else {
                    "ok"
                }
                .into(),
                name: r.name,
                size: r.size,
                node: r.owner,
                generation: r.generation,
                migration: r
                    .migration
                    .map(|m| serde_json::to_value(m).expect("serialises")),
            })
            .collect())
    }
}
