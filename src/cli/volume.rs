//! `dlsm volume ...`: create (empty, or uploaded from a raw image over
//! NBD), list, show, remove.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context};
use clap::Subcommand;

use super::output::{self, outln};
use super::Ctx;
use crate::api::types::{ClusterVolume, CreateVolume, NodeInfo, VolumeInfo};
use crate::api_client::seg;
use crate::nbd::client::{NbdAddr, NbdClient};
use crate::size::{format_size, parse_size};

#[derive(Subcommand, Debug)]
pub enum VolumeCmd {
    /// Create a volume (empty, or filled from a raw image file).
    Create {
        /// The new volume's name: 1-64 of A-Z a-z 0-9 . _ - (not starting
        /// with . or -).
        name: String,
        /// Size, e.g. 512M, 10G, 1T (default with --from: the file's size).
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Raw image to copy into the new volume.
        #[arg(long)]
        from: Option<PathBuf>,
        /// Cluster mode: the node to create it on (the node asked forwards
        /// the request there). Default: the node asked.
        #[arg(long, value_parser = super::args::node_name)]
        on: Option<String>,
    },
    /// List volumes: this node's, or in cluster mode every volume of the
    /// cluster with its node.
    List,
    /// Show one volume: size, table (local, clone, ...), whom a fenced
    /// copy was handed to, clients, URI.
    Show {
        /// The volume.
        name: String,
    },
    /// Delete a volume and its data. Refused while NBD clients are attached
    /// or while a migration needs this copy (the source of a migration, or
    /// its destination), unless --force.
    Rm {
        /// The volume.
        name: String,
        /// Remove it anyway, destroying what depends on it: on a migration
        /// source, every region the destination has not copied yet; on a
        /// destination after handoff, every write made there since; on a
        /// destination before handoff, only the clone (the source keeps the
        /// volume, and cancels the migration with `migration cancel`).
        #[arg(long)]
        force: bool,
    },
}

/// `dlsm volume ...`.
pub fn run(ctx: &Ctx, cmd: VolumeCmd) -> anyhow::Result<()> {
    let api = ctx.api();
    match cmd {
        VolumeCmd::Create {
            name,
            size,
            from,
            on,
        } => create(ctx, name, size, from, on),
        VolumeCmd::List => {
            // A node in a cluster lists the cluster; any other answers 404
            // there (peer mode, or a node from before clusters).
            match api.get::<Vec<ClusterVolume>>("/v1/cluster/volumes") {
                Ok(vols) if ctx.json => return output::print_json(&vols),
                Ok(vols) => return output::write_text(&output::cluster_volume_table(&vols)),
                Err(e) if crate::api_client::status_of(&e) == Some(404) => {}
                Err(e) => return Err(e),
            }
            let vols: Vec<VolumeInfo> = api.get("/v1/volumes")?;
            if ctx.json {
                output::print_json(&vols)
            } else {
                output::write_text(&output::volume_table(&vols))
            }
        }
        VolumeCmd::Show { name } => {
            let v: VolumeInfo = api.get(&format!("/v1/volumes/{}", seg(&name)?))?;
            if ctx.json {
                output::print_json(&v)
            } else {
                output::write_text(&output::volume_text(&v))
            }
        }
        VolumeCmd::Rm { name, force } => {
            let force = if force { "?force=true" } else { "" };
            api.delete(&format!("/v1/volumes/{}{force}", seg(&name)?))?;
            if ctx.json {
                output::print_json(&serde_json::json!({ "removed": name }))
            } else {
                outln!("removed {name}")
            }
        }
    }
}

fn create(
    ctx: &Ctx,
    name: String,
    size: Option<u64>,
    from: Option<PathBuf>,
    on: Option<String>,
) -> anyhow::Result<()> {
    if on.is_some() && from.is_some() {
        bail!("--from uploads through the node asked: give --on or --from, not both");
    }
    let api = ctx.api();
    let file_len = match &from {
        Some(p) => Some(
            std::fs::metadata(p)
                .with_context(|| format!("cannot read {}", p.display()))?
                .len(),
        ),
        None => None,
    };
    let size = match (size, file_len, &from) {
        (Some(s), Some(f), Some(p)) if s < f => {
            bail!("--size {s} is smaller than {} ({f} bytes)", p.display())
        }
        (Some(s), _, _) => s,
        (None, Some(f), _) => f.div_ceil(512) * 512,
        (None, None, _) => bail!("give --size (or --from FILE)"),
    };
    let v: VolumeInfo = api.post(
        "/v1/volumes",
        &CreateVolume {
            name: name.clone(),
            size,
            on: on.clone(),
        },
    )?;
    if let Some(path) = from {
        let node: NodeInfo = api.get("/v1/node")?;
        let nbd = node
            .nbd
            .ok_or_else(|| anyhow!("the node has no TCP NBD listener"))?;
        let nbd = match nbd.rsplit_once(':') {
            Some(("0.0.0.0" | "[::]", port)) => format!("{}:{port}", api.host()),
            _ => nbd,
        };
        let nbd_tls = ctx.tls.as_ref().map(|t| t.connector());
        let uploaded = super::runtime()?.block_on(upload(
            &path,
            &nbd.parse().map_err(|e: String| anyhow!(e))?,
            &name,
            nbd_tls.as_ref(),
        ));
        if let Err(e) = uploaded {
            let _ = api.delete(&format!("/v1/volumes/{}", seg(&name)?));
            return Err(e.context(format!(
                "upload of {} failed; volume removed",
                path.display()
            )));
        }
    }
    let v: VolumeInfo = api.get(&format!("/v1/volumes/{}", seg(&v.name)?))?;
    if ctx.json {
        output::print_json(&v)
    } else if let Some(node) = &v.node {
        outln!("created {} ({}) on {node}", v.name, format_size(v.size))
    } else {
        outln!("created {} ({})", v.name, format_size(v.size))
    }
}

/// Copies a raw image into a volume over NBD, skipping all-zero blocks
/// (the new volume reads zero there already).
async fn upload(
    path: &std::path::Path,
    addr: &NbdAddr,
    name: &str,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> anyhow::Result<()> {
    const CHUNK: usize = 1 << 20;
    const IN_FLIGHT: usize = 8;
    let client = NbdClient::connect_with(addr, name, tls).await?;
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut tasks = tokio::task::JoinSet::new();
    let mut offset = 0u64;
    loop {
        let mut buf = vec![0u8; CHUNK];
        let mut n = 0;
        while n < CHUNK {
            let r = file.read(&mut buf[n..])?;
            if r == 0 {
                break;
            }
            n += r;
        }
        if n == 0 {
            break;
        }
        buf.truncate(n);
        if buf.iter().any(|b| *b != 0) {
            if tasks.len() >= IN_FLIGHT {
                tasks.join_next().await.expect("non-empty")??;
            }
            let c = client.clone();
            let at = offset;
            tasks.spawn(async move { c.write(at, &buf, false).await });
        }
        offset += n as u64;
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    client.flush().await?;
    client.disconnect().await?;
    Ok(())
}
