//! `dlsm node info`: what a node says about itself (`GET /v1/node`);
//! `dlsm node list`: every member of its cluster (`GET /v1/cluster/nodes`);
//! `dlsm node forget`: a member gone for good.

use clap::Subcommand;

use super::output;
use super::Ctx;
use crate::api::types::{ClusterNode, NodeInfo};

#[derive(Subcommand, Debug)]
pub enum NodeCmd {
    /// Show the node's name, version and NBD listeners.
    Info,
    /// Cluster mode: list every node of the cluster, up or down, with its
    /// addresses and how many volumes it owns (any node answers).
    List,
    /// Cluster mode: forget a node that is gone for good (down, owning no
    /// volume), so `node list` stops showing it.
    Forget {
        /// The node's name.
        name: String,
    },
}

/// `dlsm node ...`.
pub fn run(ctx: &Ctx, cmd: NodeCmd) -> anyhow::Result<()> {
    match cmd {
        NodeCmd::Info => {
            let n: NodeInfo = ctx.api().get("/v1/node")?;
            if ctx.json {
                output::print_json(&n)
            } else {
                output::write_text(&output::node_text(&ctx.api, &n))
            }
        }
        NodeCmd::Forget { name } => {
            ctx.api().delete(&format!(
                "/v1/cluster/nodes/{}",
                crate::api_client::seg(&name)?
            ))?;
            if ctx.json {
                output::print_json(&serde_json::json!({ "forgotten": name }))
            } else {
                output::write_text(&format!("node {name} forgotten\n"))
            }
        }
        NodeCmd::List => {
            let nodes: Vec<ClusterNode> = ctx.api().get("/v1/cluster/nodes")?;
            if ctx.json {
                output::print_json(&nodes)
            } else {
                output::write_text(&output::node_table(&nodes))
            }
        }
    }
}
