//! `dlsm migrate` (start a migration on the source) and `dlsm migration
//! ...` (inspect and steer one, on either node; list them all).
//!
//! Before asking the source to migrate, the CLI refuses a destination that
//! is the source itself when it can tell ([`same_node`]): `--to` reaching
//! the same socket address as `--api`, or both nodes reporting the same
//! node id (nodes older than ids: describing themselves identically). The
//! node itself refuses too, whatever address it was named by: the source
//! its own advertised address, the destination a prepare carrying its own
//! id.

use std::net::ToSocketAddrs;
use std::time::Duration;

use anyhow::bail;
use clap::{Args, Subcommand};

use super::output::{self, outln};
use super::Ctx;
use crate::api::types::MigrationStatus;
use crate::api::types::NodeInfo;
use crate::api::types::{CancelRequest, HandoffRequest, MigrateRequest, RateRequest};
use crate::api_client::{seg, status_of, ApiUnreachable, Unreachable};
use crate::size::parse_size;

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The volume to migrate (on the --api node).
    pub name: String,
    /// The destination node's API address, HOST:PORT; in a cluster, the
    /// destination node's name (`dlsm node list`).
    #[arg(long, value_parser = super::args::api_addr_or_node)]
    pub to: String,
    /// Region size, e.g. 64K (default), 1M.
    #[arg(long, value_parser = parse_size)]
    pub region_size: Option<u64>,
    /// Background copy limit in bytes per second (e.g. 100M).
    #[arg(long, value_parser = parse_size)]
    pub rate: Option<u64>,
    /// Keep the source copy (fenced) after completion instead of deleting it.
    #[arg(long)]
    pub keep_source: bool,
    /// Wait until hydration completes, showing progress (on stderr; with
    /// --json, one status object per second on stdout).
    #[arg(long)]
    pub wait: bool,
    /// With --wait: how long, in seconds, to keep retrying while the
    /// destination's API does not answer or answers with a server error
    /// (a node restarting), before giving up.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    pub retry_for: u64,
}

#[derive(Subcommand, Debug)]
pub enum MigrationCmd {
    /// Show a migration's progress (on either node; also one that ended).
    Status {
        /// The migrating volume.
        name: String,
        /// Which side of a node that is both (the middle of a chain A -> B
        /// -> C): `source` or `destination`. Without it, both are shown.
        #[arg(long, value_parser = ["source", "destination"])]
        role: Option<String>,
    },
    /// List every migration this node takes part in, as source or
    /// destination, finished ones included.
    List,
    /// Hand the volume off now (on either node: the destination does it,
    /// fencing the source).
    Handoff {
        /// The migrating volume.
        name: String,
        /// The source is dead: take ownership without fencing it (on the
        /// destination only; the source is asked first anyway).
        #[arg(long)]
        force: bool,
    },
    /// Cancel a migration (on either node). Before handoff the destination
    /// drops its copy and the volume stays on the source, writable. After
    /// handoff it is rolled back: the volume returns to the source over
    /// the copy the source kept, and only what was written at the
    /// destination crosses back (when the VM moves back, or at `handoff`
    /// on the source).
    Cancel {
        /// The migrating volume.
        name: String,
        /// The destination is gone for good: forget the migration without
        /// its answer (its copy, should it return, is refused by this node).
        #[arg(long)]
        force: bool,
    },
    /// Pause the background copy (on-demand fetches go on).
    Pause {
        /// The migrating volume.
        name: String,
    },
    /// Resume the background copy.
    Resume {
        /// The migrating volume.
        name: String,
    },
    /// Change the background copy limit (bytes/s; 0 = none).
    SetRate {
        /// The migrating volume.
        name: String,
        /// The new limit, e.g. 100M; 0 for none.
        #[arg(value_parser = parse_size)]
        rate: u64,
    },
}

/// `dlsm migrate`.
pub fn migrate(ctx: &Ctx, a: MigrateArgs) -> anyhow::Result<()> {
    let api = ctx.api();
    let path = format!("/v1/volumes/{}/migrate", seg(&a.name)?);
    let by_name = super::args::is_node_name(&a.to);
    // A node name is resolved by the cluster (which also refuses the node
    // the volume is on).
    if let Some(why) = (!by_name)
        .then(|| same_node(ctx, &a.to))
        .transpose()?
        .flatten()
    {
        bail!(
            "{} is on {} already, and --to {} is that same node ({why}): name another \
             node's API with --to",
            a.name,
            ctx.api,
            a.to
        );
    }
    let req = MigrateRequest {
        to: a.to.clone(),
        region_size: a.region_size,
        rate: a.rate,
        keep_source: a.keep_source,
    };
    let s: MigrationStatus = api.post(&path, &req)?;
    if !a.wait {
        return print_status(ctx, &s);
    }
    if !ctx.json {
        outln!(
            "{}: prepared on {}, serving there now; waiting for hydration",
            a.name,
            a.to
        )?;
    }
    // Waiting asks the destination: by name, its address is the cluster's.
    let to_api = if by_name {
        let nodes: Vec<crate::api::types::ClusterNode> = api.get("/v1/cluster/nodes")?;
        nodes
            .into_iter()
            .find(|n| n.name == a.to)
            .map(|n| n.api)
            .ok_or_else(|| anyhow::anyhow!("node {} is not in the cluster's node list", a.to))?
    } else {
        a.to.clone()
    };
    super::wait::wait_for(
        &ctx.api_at(&to_api, "--to"),
        &a.name,
        ctx.json,
        Duration::from_secs(a.retry_for),
    )
}

/// Whether `--to` names the `--api` node itself; `Some(how we know)`.
///
/// First by address: both resolve to a common socket address. Then by
/// asking both nodes who they are: the same name and the same NBD
/// listeners (two nodes can share a name, never a listener). A
/// destination the CLI cannot reach is not an error here (the CLI may be
/// off the network the nodes use between them; the source will say if it
/// cannot reach it either), but a destination address that answers with
/// something other than a node's API (the NBD port, TLS on one side only)
/// is.
fn same_node(ctx: &Ctx, to: &str) -> anyhow::Result<Option<String>> {
    let resolve = |a: &str| -> Vec<std::net::SocketAddr> {
        let bare = a
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .trim_end_matches('/');
        bare.to_socket_addrs()
            .map(|i| i.collect())
            .unwrap_or_default()
    };
    let src = resolve(&ctx.api);
    if let Some(common) = resolve(to).into_iter().find(|a| src.contains(a)) {
        return Ok(Some(format!("both reach {common}")));
    }
    let mine: NodeInfo = ctx.api().get("/v1/node")?;
    let probe = crate::api_client::Api::with_timeout(to, &ctx.auth, Duration::from_secs(3))
        .from_flag("--to");
    let theirs: NodeInfo = match probe.get("/v1/node") {
        Ok(n) => n,
        Err(e) => match e.downcast_ref::<ApiUnreachable>().map(|u| u.kind) {
            Some(Unreachable::NbdPort | Unreachable::NeedsTls | Unreachable::NoTls) => {
                return Err(e)
            }
            _ => return Ok(None),
        },
    };
    // Nodes that report an identity: the same id is the same node.
    if !mine.id.is_empty() && !theirs.id.is_empty() {
        return Ok((mine.id == theirs.id).then(|| format!("node id {}", mine.id)));
    }
    let listens = |n: &NodeInfo| n.nbd.is_some() || n.nbd_unix.is_some();
    if mine.name == theirs.name
        && mine.nbd == theirs.nbd
        && mine.nbd_unix == theirs.nbd_unix
        && listens(&mine)
    {
        return Ok(Some(format!(
            "node {} with NBD at {}",
            mine.name,
            mine.nbd
                .as_deref()
                .or(mine.nbd_unix.as_deref())
                .unwrap_or("-")
        )));
    }
    Ok(None)
}

fn print_status(ctx: &Ctx, s: &MigrationStatus) -> anyhow::Result<()> {
    if ctx.json {
        output::print_json_line(s)
    } else {
        output::write_text(&output::status_text(s))
    }
}

/// `dlsm migration ...`.
pub fn run(ctx: &Ctx, cmd: MigrationCmd) -> anyhow::Result<()> {
    let api = ctx.api();
    let s: MigrationStatus = match cmd {
        MigrationCmd::List => return list(ctx),
        MigrationCmd::Cancel { name, force } => {
            let r: serde_json::Value = api.post(
                &format!("/v1/migrations/{}/cancel", seg(&name)?),
                &CancelRequest { force, id: None },
            )?;
            if ctx.json {
                return output::print_json(&r);
            }
            if let Some(to) = r.get("to").and_then(|t| t.as_str()) {
                return outln!(
                    "migration of {name} was handed off already: rolling it back to {to} \
                     (migration {}). {} written at the destination will cross back once the VM \
                     moves back to {to} (or run `dlsm --api {to} migration handoff {name}`).",
                    r["migration"].as_str().unwrap_or("?"),
                    crate::size::format_size(r["bytes_written"].as_u64().unwrap_or(0)),
                );
            }
            return outln!("migration of {name} cancelled: the volume stays on its source");
        }
        MigrationCmd::Status { name, role } => {
            let path = format!("/v1/migrations/{}", seg(&name)?);
            if let Some(r) = role {
                api.get(&format!("{path}?role={r}"))?
            } else {
                let first: MigrationStatus = api.get(&path)?;
                // A middle node of a chain: its onward migration too.
                if !ctx.json && first.role == "destination" && first.ended.is_none() {
                    if let Ok(other) = api.get::<MigrationStatus>(&format!("{path}?role=source")) {
                        if other.ended.is_none() && other.id != first.id {
                            print_status(ctx, &first)?;
                            outln!("")?;
                            return print_status(ctx, &other);
                        }
                    }
                }
                first
            }
        }
        MigrationCmd::Handoff { name, force } => api.post(
            &format!("/v1/migrations/{}/handoff", seg(&name)?),
            &HandoffRequest { force, id: None },
        )?,
        MigrationCmd::Pause { name } => {
            api.post(&format!("/v1/migrations/{}/pause", seg(&name)?), &())?
        }
        MigrationCmd::Resume { name } => {
            api.post(&format!("/v1/migrations/{}/resume", seg(&name)?), &())?
        }
        MigrationCmd::SetRate { name, rate } => api.post(
            &format!("/v1/migrations/{}/rate", seg(&name)?),
            &RateRequest { rate },
        )?,
    };
    print_status(ctx, &s)
}

/// `dlsm migration list`: `GET /v1/migrations`.
fn list(ctx: &Ctx) -> anyhow::Result<()> {
    let list: Vec<MigrationStatus> = match ctx.api().get("/v1/migrations") {
        Ok(l) => l,
        Err(e) if status_of(&e) == Some(405) => bail!(
            "the node at {} cannot list its migrations (it predates GET /v1/migrations); \
             ask about one volume with `migration status NAME`",
            ctx.api
        ),
        Err(e) => return Err(e),
    };
    if ctx.json {
        return output::print_json(&list);
    }
    if list.is_empty() {
        return outln!("no migrations on this node");
    }
    output::write_text(&output::migration_table(&list))
}
