//! Moving a volume between nodes in the directory: the compare-and-swap
//! transactions of a migration in cluster mode (DESIGN.md, "Moving
//! ownership: one compare-and-swap").
//!
//! | step | who | compares | writes |
//! |---|---|---|---|
//! | [`Cluster::start_migration`] | source, the owner | record's `mod_revision`, `lease(nodes/ME)` | `migration {id, from, to, passthrough, started_gen}` |
//! | [`Cluster::claim`] (handoff) | destination, after fencing the source | `mod_revision`, `lease(nodes/ME)` | owner := me, `generation + 1`, phase `hydrating`, `by-node` moved |
//! | [`Cluster::claim`] (takeover) | destination, source unreachable | as handoff, plus `lease(nodes/SOURCE) != owner_lease` | as handoff, `source_fenced: false` |
//! | [`Cluster::clear_migration`] | the owner: a cancel (source) or a completion (destination) | `mod_revision` | `migration: null` |
//!
//! Only a record naming migration `id` to this node can be claimed, and
//! at most one transaction per revision succeeds: two nodes can never both
//! be handed a volume. Each step reads the record first and recognises its
//! own earlier success (an answer lost to a timeout, a retry after a
//! crash), so every step may be repeated.

use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};

use super::etcd::CALL_TIMEOUT;
use super::{
    by_node_key, node_key, volume_key, Cluster, ClusterError, MemberRecord, MigrationRecord,
    VolumeRecord,
};

/// What a destination learned when it asked whether it may take over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceLease {
    /// The lease the record names the owner under is gone: its `nodes/`
    /// key is absent or under a newer lease.
    pub gone: bool,
    /// The owner's granted TTL (from its member record; at least this
    /// node's): how long a dead owner's lease can still live, and how long
    /// a takeover waits after seeing it gone (a lease revoked by hand
    /// vanishes before its holder's own deadline has passed).
    pub ttl: Duration,
}

impl Cluster {
    /// Source: records that migration `id` of `name` to node `to` starts.
    /// Refused unless this node owns the record under its current lease and
    /// no other migration is recorded, but for one this node recorded
    /// itself, still in passthrough: the caller (`node::migration::migrate`,
    /// under the volume's ownership lock) has checked that its table has no
    /// outgoing migration, so that one was never prepared anywhere. Returns
    /// the record's generation.
    pub async fn start_migration(
        &self,
        name: &str,
        id: &str,
        to: &str,
        keep_source: bool,
    ) -> Result<u64, ClusterError> {
        let (mut rec, rev) = self.owned_record(name).await?;
        if let Some(m) = &rec.migration {
            if m.id == id {
                return Ok(rec.generation); // an earlier try was applied
            }
            // Our own earlier start that never reached our table (killed
            // in between, or its answer lost): the caller has no outgoing
            // migration of the volume, so no prepare of that one was ever
            // sent and no clone of it exists: it is replaced.
            if m.from == self.name && m.phase == "passthrough" {
                tracing::warn!(volume = name, old = %m.id, new = id, "replacing a migration recorded by this node that its table does not know");
            } else {
                return Err(ClusterError::Conflict(format!(
                    "volume {name:?} is already migrating from {} to {} (migration {}) in the \
                     cluster's directory",
                    m.from, m.to, m.id
                )));
            }
        }
        rec.migration = Some(MigrationRecord {
            id: id.to_owned(),
            from: self.name.clone(),
            to: to.to_owned(),
            phase: "passthrough".into(),
            started_gen: rec.generation,
            keep_source,
            source_fenced: true,
        });
        let gen = rec.generation;
        self.swap("start migration", &rec, rev, &[], Vec::new())
            .await?;
        Ok(gen)
    }

    /// The owner: forgets migration `id` of `name` in the directory (a
    /// cancel at the source before handoff; a completion at the
    /// destination). `Ok(true)`: the record has no migration `id` now and
    /// this node owns it. `Ok(false)`: the record names another owner (the
    /// volume was handed off), so nothing was changed.
    pub async fn clear_migration(&self, name: &str, id: &str) -> Result<bool, ClusterError> {
        let Some((mut rec, rev)) = self.record(name).await? else {
            return Err(ClusterError::NoSuchVolume(name.into()));
        };
        if rec.owner != self.name {
            return Ok(false);
        }
        if rec.migration.as_ref().is_none_or(|m| m.id != id) {
            return Ok(true); // already cleared (or never recorded)
        }
        if rec.migration.as_ref().is_some_and(|m| m.to == self.name) {
            rec.table = Some(super::TableSummary::local()); // completed here
        }
        rec.migration = None;
        self.swap("clear migration", &rec, rev, &[], Vec::new())
            .await?;
        Ok(true)
    }

    /// Destination: takes `name` for migration `id`, whose source was
    /// fenced (`takeover == false`) or whose lease was seen gone
    /// (`takeover`: the transaction then also checks that the source's
    /// `nodes/` key is still not under the lease the record names).
    /// Returns the new generation. Refused if the record does not name
    /// this migration to this node at the generation it started from.
    pub async fn claim(
        &self,
        name: &str,
        id: &str,
        takeover: bool,
        region_size: u64,
    ) -> Result<u64, ClusterError> {
        let Some((mut rec, rev)) = self.record(name).await? else {
            return Err(ClusterError::NoSuchVolume(name.into()));
        };
        let Some(m) = rec.migration.clone() else {
            return Err(ClusterError::Conflict(format!(
                "volume {name:?}: the cluster's directory records no migration of it (cancelled?)"
            )));
        };
        if m.id != id || m.to != self.name {
            return Err(ClusterError::Conflict(format!(
                "volume {name:?}: the cluster's directory records migration {} from {} to {}, \
                 not migration {id} to this node",
                m.id, m.from, m.to
            )));
        }
        if rec.owner == self.name && rec.generation == m.started_gen + 1 {
            return Ok(rec.generation); // an earlier try was applied
        }
        if rec.owner != m.from || rec.generation != m.started_gen {
            return Err(ClusterError::Conflict(format!(
                "volume {name:?}: the record names owner {} at generation {}, migration {id} \
                 started from {} at generation {}",
                rec.owner, rec.generation, m.from, m.started_gen
            )));
        }
        let lease = self.lease();
        let old_owner_lease = rec.owner_lease;
        rec.owner = self.name.clone();
        rec.owner_lease = lease;
        rec.generation += 1;
        rec.table = Some(super::TableSummary {
            kind: "clone".into(),
            region_size: Some(region_size),
        });
        rec.migration = Some(MigrationRecord {
            phase: "hydrating".into(),
            source_fenced: !takeover,
            ..m.clone()
        });
        let gen = rec.generation;
        let mut extra = Vec::new();
        if takeover {
            // Absent key: etcd compares its lease as 0.
            extra.push(Compare::lease(
                node_key(&m.from),
                CompareOp::NotEqual,
                old_owner_lease,
            ));
        }
        let index = vec![
            TxnOp::delete(by_node_key(&m.from, name), None),
            TxnOp::put(by_node_key(&self.name, name), gen.to_string(), None),
        ];
        self.swap(
            if takeover { "takeover" } else { "handoff" },
            &rec,
            rev,
            &extra,
            index,
        )
        .await?;
        Ok(gen)
    }

    /// Whether the lease under which the record names `name`'s owner is
    /// gone (see [`SourceLease`]), for migration `id` to this node.
    pub async fn source_lease(&self, name: &str, id: &str) -> Result<SourceLease, ClusterError> {
        let Some((rec, _)) = self.record(name).await? else {
            return Err(ClusterError::NoSuchVolume(name.into()));
        };
        if rec.migration.as_ref().is_none_or(|m| m.id != id) {
            return Err(ClusterError::Conflict(format!(
                "volume {name:?}: the cluster's directory records no migration {id}"
            )));
        }
        // Claimed already (a crash, or a lost answer, after this node's
        // own compare-and-swap): the directory gives the volume to this
        // node, whose lease is not the source's; the claim recognises it.
        if rec.owner == self.name
            && rec
                .migration
                .as_ref()
                .is_some_and(|m| m.to == self.name && rec.generation == m.started_gen + 1)
        {
            return Ok(SourceLease {
                gone: true,
                ttl: Duration::ZERO,
            });
        }
        let key = node_key(&rec.owner);
        let r = self
            .etcd
            .call("read node lease", CALL_TIMEOUT, move |mut c| {
                let k = key.clone();
                async move { c.get(k, Some(GetOptions::new().with_keys_only())).await }
            })
            .await?;
        let gone = r
            .kvs()
            .first()
            .is_none_or(|kv| kv.lease() != rec.owner_lease);
        let member: Option<(MemberRecord, i64)> = self
            .etcd
            .read_json("read member", &super::member_key(&rec.owner))
            .await?;
        // An older member record does not say its TTL: assume this node's.
        let ttl = member
            .map(|(m, _)| m.lease_ttl)
            .filter(|t| *t > 0)
            .map_or(self.clock().ttl(), Duration::from_secs);
        Ok(SourceLease {
            gone,
            ttl: ttl.max(self.clock().ttl()),
        })
    }

    /// The record of `name`, which this node must own.
    async fn owned_record(&self, name: &str) -> Result<(VolumeRecord, i64), ClusterError> {
        match self.record(name).await? {
            Some((r, rev)) if r.owner == self.name => Ok((r, rev)),
            Some((r, _)) => Err(ClusterError::WrongNode(format!(
                "volume {name:?} is owned by node {} (generation {}), not by this node ({})",
                r.owner, r.generation, self.name
            ))),
            None => Err(ClusterError::NoSuchVolume(name.into())),
        }
    }

    /// Writes `rec` if the record is still at `rev` and this node's
    /// `nodes/` key is under its current lease (plus `extra` compares and
    /// `index` operations, in the same transaction). A failed compare is
    /// answered by reading the record again: if it already is `rec` (an
    /// earlier try of this very change was applied, its answer lost), that
    /// is success; otherwise a conflict, or a lost lease.
    async fn swap(
        &self,
        what: &str,
        rec: &VolumeRecord,
        rev: i64,
        extra: &[Compare],
        index: Vec<TxnOp>,
    ) -> Result<(), ClusterError> {
        let lease = self.lease();
        if lease == 0 || !self.lease_valid_now() {
            return Err(ClusterError::LeaseLost);
        }
        let mut rec = rec.clone();
        rec.changed = super::now_rfc3339();
        let value = serde_json::to_string(&rec).expect("record serialises");
        let (vkey, nkey) = (volume_key(&rec.name), node_key(&self.name));
        let mut when = vec![
            Compare::mod_revision(vkey.clone(), CompareOp::Equal, rev),
            Compare::lease(nkey, CompareOp::Equal, lease),
        ];
        when.extend_from_slice(extra);
        let mut then = vec![TxnOp::put(vkey.clone(), value, None)];
        then.extend(index);
        let r = self
            .etcd
            .call(what, CALL_TIMEOUT, |mut c| {
                let txn = Txn::new().when(when.clone()).and_then(then.clone());
                async move { c.txn(txn).await }
            })
            .await?;
        if r.succeeded() {
            tracing::info!(volume = %rec.name, owner = %rec.owner, generation = rec.generation, migration = ?rec.migration.as_ref().map(|m| &m.id), "directory: {what}");
            return Ok(());
        }
        match self.record(&rec.name).await? {
            Some((now, _))
                if now.owner == rec.owner
                    && now.generation == rec.generation
                    && now.owner_lease == rec.owner_lease
                    && now.migration == rec.migration =>
            {
                Ok(())
            }
            _ if !self.lease_valid_now() => Err(ClusterError::LeaseLost),
            _ => Err(ClusterError::Conflict(format!(
                "{what}: volume {:?}'s record",
                rec.name
            ))),
        }
    }
}
