//! `dlsm node info`: what a node says about itself (`GET /v1/node`).

use clap::Subcommand;

use super::output;
use super::Ctx;
use crate::api::types::NodeInfo;

#[derive(Subcommand, Debug)]
pub enum NodeCmd {
    /// Show the node's name, version and NBD listeners.
    Info,
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
    }
}
