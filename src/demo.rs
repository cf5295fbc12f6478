//! `dlsm demo`, the main job: a live migration you can watch.
//!
//! Two nodes start on loopback (A and B, real sockets, in this process). A
//! 1 GiB volume is filled on A (three quarters data, one quarter holes). A
//! client standing in for a VM keeps writing and verifying 4 KiB blocks. The
//! volume is migrated to B: the client switches to B at once, as a VM does
//! with its memory migration; its first write at B hands ownership over, and
//! B hydrates in the background while the client goes on. At the end the
//! whole volume is read back from B and checked block by block against the
//! client's own record, and a report is printed.
//!
//! Needs nothing but Rust.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::{Rng, SeedableRng};

use crate::api::types::MigrateRequest;
use crate::api::types::{MigrationStatus, Phase};
use crate::api_client::Api;
use crate::nbd::client::{NbdAddr, NbdClient};
use crate::node::{Node, NodeConfig};
use crate::size::format_size;

const SIZE: u64 = 1 << 30;
const BLOCK: u64 = 4096;
const BLOCKS: u64 = SIZE / BLOCK;
/// Every fourth 64 MiB stripe stays a hole.
const STRIPE: u64 = 64 << 20;

fn is_hole(block: u64) -> bool {
    (block * BLOCK / STRIPE) % 4 == 3
}

/// Content of `block` at `version` (version 0: the initial fill, or zeroes
/// in a hole).
fn content(block: u64, version: u32, out: &mut [u8]) {
    if version == 0 && is_hole(block) {
        out.fill(0);
        return;
    }
    let mut x = (block << 20) ^ (version as u64) ^ 0x9e37_79b9_7f4a_7c15;
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

async fn start_node(name: &str, dir: &std::path::Path) -> anyhow::Result<Node> {
    Node::start(NodeConfig {
        data_dir: dir.join(name),
        listen: Some("127.0.0.1:0".into()),
        listen_unix: None,
        api: "127.0.0.1:0".into(),
        name: name.into(),
        source_timeout: Duration::from_secs(30),
        inject_origin_delay: Duration::ZERO,
        handshake_timeout: crate::nbd::server::DEFAULT_HANDSHAKE_TIMEOUT,
        max_connections: 0,
        tls: None,
        api_token: None,
        insecure_api: false,
        advertise_nbd: None,
        advertise_api: None,
        vhost_user: None,
        cluster: None,
    })
    .await
}

fn addr(node: &Node) -> NbdAddr {
    NbdAddr::Tcp(node.state.nbd_addr.expect("TCP listener").to_string())
}

/// The client standing in for a VM.
struct Guest {
    versions: Mutex<Vec<u32>>,
    writes: AtomicU64,
    verified: AtomicU64,
    mismatches: AtomicU64,
    /// Worst write latency seen during the migration, microseconds.
    worst_us: AtomicU64,
}

impl Guest {
    async fn step(
        &self,
        c: &NbdClient,
        rng: &mut rand::rngs::StdRng,
        buf: &mut [u8],
    ) -> anyhow::Result<()> {
        let block = rng.gen_range(0..BLOCKS);
        let version = {
            let mut v = self.versions.lock().unwrap();
            v[block as usize] += 1;
            v[block as usize]
        };
        content(block, version, buf);
        let t = Instant::now();
        c.write(block * BLOCK, buf, false).await?;
        self.worst_us
            .fetch_max(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.writes.fetch_add(1, Ordering::Relaxed);
        // Read back a random block and check it against our record.
        let check = rng.gen_range(0..BLOCKS);
        let v = self.versions.lock().unwrap()[check as usize];
        let got = c.read(check * BLOCK, BLOCK as u32).await?;
        content(check, v, buf);
        if got != buf {
            self.mismatches.fetch_add(1, Ordering::Relaxed);
        }
        self.verified.fetch_add(BLOCK, Ordering::Relaxed);
        Ok(())
    }
}

pub async fn run(hold: bool) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("dlsm-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run_in(&dir, hold).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_in(dir: &std::path::Path, hold: bool) -> anyhow::Result<()> {
    let a = start_node("node-a", dir).await?;
    let b = start_node("node-b", dir).await?;
    println!(
        "node-a: nbd://{}  api {}",
        a.state.nbd_addr.unwrap(),
        a.api_addr
    );
    println!(
        "node-b: nbd://{}  api {}",
        b.state.nbd_addr.unwrap(),
        b.api_addr
    );

    // Fill the volume on A.
    a.state.store.create("vm1", SIZE)?;
    let ca = NbdClient::connect(&addr(&a), "vm1").await?;
    let t = Instant::now();
    let mut fill = Vec::new();
    for chunk in 0..SIZE / (4 << 20) {
        let c = ca.clone();
        fill.push(tokio::spawn(async move {
            let start = chunk * (4 << 20) / BLOCK;
            if is_hole(start) {
                return Ok(());
            }
            let mut buf = vec![0u8; 4 << 20];
            for (i, blk) in buf.chunks_mut(BLOCK as usize).enumerate() {
                content(start + i as u64, 0, blk);
            }
            c.write(start * BLOCK, &buf, false).await
        }));
    }
    for f in fill {
        f.await??;
    }
    ca.flush().await?;
    println!(
        "filled vm1 on node-a: {} ({} data, {} holes) in {:.2} s",
        format_size(SIZE),
        format_size(SIZE / 4 * 3),
        format_size(SIZE / 4),
        t.elapsed().as_secs_f64()
    );

    // The guest runs on A.
    let guest = Arc::new(Guest {
        versions: Mutex::new(vec![0; BLOCKS as usize]),
        writes: AtomicU64::new(0),
        verified: AtomicU64::new(0),
        mismatches: AtomicU64::new(0),
        worst_us: AtomicU64::new(0),
    });
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut buf = vec![0u8; BLOCK as usize];
    let warmup = Instant::now();
    while warmup.elapsed() < Duration::from_millis(500) {
        guest.step(&ca, &mut rng, &mut buf).await?;
    }
    println!(
        "guest running on node-a: {} writes, every one verified",
        guest.writes.load(Ordering::Relaxed)
    );

    // Migrate: prepare on B, then switch the guest to B at once.
    let t0 = Instant::now();
    let (src_api, dst_api) = (a.api_addr.to_string(), b.api_addr.to_string());
    let req = MigrateRequest {
        to: dst_api.clone(),
        region_size: None,
        rate: None,
        keep_source: false,
    };
    tokio::task::spawn_blocking(move || {
        Api::new(&src_api).post::<MigrationStatus>("/v1/volumes/vm1/migrate", &req)
    })
    .await??;
    let prepared = t0.elapsed();
    // As QEMU does on migration: flush and stop using the source, then the
    // destination VM opens the destination's export.
    ca.flush().await?;
    ca.disconnect().await?;
    drop(ca);
    let cb = NbdClient::connect(&addr(&b), "vm1").await?;
    guest.step(&cb, &mut rng, &mut buf).await?; // the first write at B hands off
    let switched = t0.elapsed();
    guest.worst_us.store(0, Ordering::Relaxed);
    println!(
        "migrate: prepared on node-b in {:.1} ms; guest switched to node-b after {:.1} ms",
        prepared.as_secs_f64() * 1e3,
        switched.as_secs_f64() * 1e3
    );

    // The guest keeps going on B while B hydrates.
    let stop = Arc::new(AtomicBool::new(false));
    let g = guest.clone();
    let s = stop.clone();
    let c = cb.clone();
    let runner = tokio::spawn(async move {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut buf = vec![0u8; BLOCK as usize];
        while !s.load(Ordering::Relaxed) {
            g.step(&c, &mut rng, &mut buf).await?;
        }
        anyhow::Ok(())
    });
    let vol = b.state.store.get("vm1")?;
    let clone = vol
        .clone_target()
        .context("node-b has no migration for vm1")?;
    let bar = indicatif::ProgressBar::new(clone.status().regions_total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("hydrating {wide_bar} {percent:>3}% {msg}")
            .expect("template"),
    );
    let status = loop {
        let st = clone.status();
        bar.set_position(st.regions_present);
        bar.set_message(format!(
            "{}/s  guest writes {}",
            format_size(st.rate),
            guest.writes.load(Ordering::Relaxed)
        ));
        if st.phase == Phase::Complete {
            break st;
        }
        if st.phase == Phase::Failed {
            bail!("migration failed: {:?}", st.last_error);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    bar.finish();
    let hydrated = t0.elapsed();
    // Let the guest run on the completed volume a moment, then stop it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    runner.await??;
    cb.flush().await?;

    // Verify every block of the volume on B.
    let t = Instant::now();
    let versions = guest.versions.lock().unwrap().clone();
    let mut bad = 0u64;
    let mut want = vec![0u8; 4 << 20];
    for chunk in 0..SIZE / (4 << 20) {
        let start = chunk * (4 << 20) / BLOCK;
        let got = cb.read(start * BLOCK, 4 << 20).await?;
        for (i, blk) in want.chunks_mut(BLOCK as usize).enumerate() {
            content(start + i as u64, versions[(start + i as u64) as usize], blk);
        }
        if got != want {
            bad += got
                .chunks(BLOCK as usize)
                .zip(want.chunks(BLOCK as usize))
                .filter(|(x, y)| x != y)
                .count() as u64;
        }
    }
    guest.verified.fetch_add(SIZE, Ordering::Relaxed);
    let mismatches = guest.mismatches.load(Ordering::Relaxed) + bad;
    let released = !a.state.store.list().iter().any(|v| v.name == "vm1");

    println!();
    println!("== report");
    println!(
        "  volume                  vm1, {} on node-a -> node-b",
        format_size(SIZE)
    );
    println!(
        "  time to switch          {:.1} ms (prepare {:.1} ms)",
        switched.as_secs_f64() * 1e3,
        prepared.as_secs_f64() * 1e3
    );
    println!(
        "  time to hydrate         {:.2} s after handoff",
        status.hydrate_seconds.unwrap_or(0.0)
    );
    println!(
        "  total                   {:.2} s from migrate to complete",
        hydrated.as_secs_f64()
    );
    println!(
        "  bytes on demand         {}",
        format_size(status.bytes_on_demand)
    );
    println!(
        "  bytes in background     {}",
        format_size(status.bytes_background)
    );
    println!(
        "  bytes skipped (zero)    {}",
        format_size(status.bytes_skipped)
    );
    println!(
        "  guest writes            {} (worst latency during hydration {:.1} ms)",
        guest.writes.load(Ordering::Relaxed),
        guest.worst_us.load(Ordering::Relaxed) as f64 / 1e3
    );
    println!(
        "  verified                {} ({} by the guest, then every byte of the volume in {:.1} s)",
        format_size(guest.verified.load(Ordering::Relaxed)),
        format_size(guest.verified.load(Ordering::Relaxed) - SIZE),
        t.elapsed().as_secs_f64()
    );
    println!("  mismatches              {mismatches}");
    println!(
        "  source copy released    {}",
        if released { "yes" } else { "not yet" }
    );
    if hold {
        println!(
            "\nnode-b keeps serving nbd://{}/vm1 until Ctrl-C",
            b.state.nbd_addr.unwrap()
        );
        tokio::signal::ctrl_c().await?;
    }
    cb.disconnect().await?;
    a.shutdown(Duration::from_secs(5)).await;
    b.shutdown(Duration::from_secs(5)).await;
    if mismatches > 0 {
        bail!("{mismatches} blocks read back wrong");
    }
    Ok(())
}
