//! `dlsm demo`: the main job. For now: a node on loopback with a sample
//! volume, written and verified over NBD, and the commands to attach QEMU or
//! nbdinfo to it.

use std::time::Duration;

use anyhow::Context;

use crate::nbd::client::{NbdAddr, NbdClient};
use crate::node::{Node, NodeConfig};
use crate::size::format_size;

pub async fn run(hold: bool) -> anyhow::Result<()> {
    let dir = tempfile_dir()?;
    let node = Node::start(NodeConfig {
        data_dir: dir.clone(),
        listen: Some("127.0.0.1:0".into()),
        listen_unix: None,
        api: "127.0.0.1:0".into(),
        name: "demo-a".into(),
        source_timeout: Duration::from_secs(30),
    })
    .await?;
    let size = 256u64 << 20;
    node.state.store.create("demo", size)?;
    let nbd = node.state.nbd_addr.context("no NBD address")?;
    let client = NbdClient::connect(&NbdAddr::Tcp(nbd.to_string()), "demo").await?;
    let block = vec![0xa5u8; 1 << 20];
    for i in (0..size).step_by(16 << 20) {
        client.write(i, &block, false).await?;
    }
    client.flush().await?;
    let mut mismatches = 0;
    for i in (0..size).step_by(16 << 20) {
        if client.read(i, block.len() as u32).await? != block {
            mismatches += 1;
        }
    }
    client.disconnect().await?;
    println!(
        "node demo-a serving volume 'demo' ({}) at nbd://{nbd}/demo",
        format_size(size)
    );
    println!("  wrote and verified 16 MiB over NBD: {mismatches} mismatches");
    println!("  inspect:  nbdinfo --map nbd://{nbd}/demo");
    println!(
        "  attach:   qemu-system-x86_64 -drive file=nbd://{nbd}/demo,format=raw,if=virtio ..."
    );
    println!("  API:      dlsm --api {} volume list", node.api_addr);
    if hold {
        println!("serving until Ctrl-C");
        tokio::signal::ctrl_c().await?;
    }
    node.shutdown(Duration::from_secs(10)).await;
    let _ = std::fs::remove_dir_all(&dir);
    if mismatches > 0 {
        anyhow::bail!("{mismatches} blocks read back wrong");
    }
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("dlsm-demo-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
