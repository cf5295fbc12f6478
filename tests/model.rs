//! Model-based randomized test of a migration under fire.
//!
//! A reference disk in memory; four clients issue random reads, writes
//! (aligned, unaligned, region-spanning), flushes, trims and zero-writes on
//! the destination while on-demand fetches and the hydrator run against a
//! slowed origin (injected 15 ms per origin read, a rate-limited copier,
//! 16 KiB regions). The destination process is killed with SIGKILL at
//! random moments, with requests in flight, and restarted. Each client owns
//! interleaved 24 KiB stripes, so regions are shared between clients and
//! the per-byte model stays exact. Writes not covered by an acknowledged
//! flush at a kill may or may not survive, so their bytes become *unknown*
//! in the model until written again; every other byte must match, during
//! the run and at the end, byte for byte.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{pattern, NodeProc};
use dlsm::nbd::client::{NbdAddr, NbdClient};
use rand::{Rng, SeedableRng};

const SIZE: u64 = 48 << 20;
const STRIPE: u64 = 24 << 10;
const CLIENTS: u64 = 4;

/// The reference disk: bytes, and whether each byte's value is certain.
struct Model {
    data: Vec<u8>,
    known: Vec<bool>,
}

/// What one client did in one round.
struct Round {
    /// Acknowledged writes (offset, bytes), in order.
    applied: Vec<(u64, Vec<u8>)>,
    /// Ranges written since the client's last acknowledged flush, including
    /// a write whose outcome is unknown.
    unflushed: Vec<(u64, u64)>,
    ops: u64,
}

fn owned_range(rng: &mut impl Rng, client: u64) -> (u64, u64) {
    let stripes = SIZE / STRIPE / CLIENTS;
    let s = rng.gen_range(0..stripes) * CLIENTS + client;
    let start = s * STRIPE;
    let a = if rng.gen_bool(0.3) {
        0
    } else {
        rng.gen_range(0..STRIPE - 1)
    };
    let a = if rng.gen_bool(0.3) { a & !4095 } else { a };
    let len = rng.gen_range(1..=STRIPE - a);
    let len = if rng.gen_bool(0.3) {
        (len & !4095).max(4096).min(STRIPE - a)
    } else {
        len
    };
    (start + a, len)
}

async fn run_client(
    c: NbdClient,
    client: u64,
    seed: u64,
    stop: Arc<AtomicBool>,
    model: Arc<std::sync::Mutex<Model>>,
) -> Round {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut r = Round {
        applied: Vec::new(),
        unflushed: Vec::new(),
        ops: 0,
    };
    while !stop.load(Ordering::Relaxed) {
        r.ops += 1;
        let (off, len) = owned_range(&mut rng, client);
        match rng.gen_range(0..10) {
            0..=3 => {
                let data = pattern(len as usize, seed ^ r.ops);
                let fua = rng.gen_bool(0.1);
                r.unflushed.push((off, len));
                if c.write(off, &data, fua).await.is_err() {
                    return r;
                }
                if fua {
                    // FUA makes this write durable, not earlier ones.
                    r.unflushed.pop();
                }
                r.applied.push((off, data));
            }
            4 => {
                r.unflushed.push((off, len));
                if c.trim(off, len as u32).await.is_err() {
                    return r;
                }
                r.applied.push((off, vec![0; len as usize]));
            }
            5 => {
                r.unflushed.push((off, len));
                if c.write_zeroes(off, len as u32, rng.gen_bool(0.5))
                    .await
                    .is_err()
                {
                    return r;
                }
                r.applied.push((off, vec![0; len as usize]));
            }
            6 => {
                if c.flush().await.is_err() {
                    return r;
                }
                r.unflushed.clear();
            }
            _ => {
                let Ok(got) = c.read(off, len as u32).await else {
                    return r;
                };
                // Bytes this client wrote this round are checked against
                // its own writes; the rest against the model.
                let mut want: Vec<Option<u8>> = {
                    let m = model.lock().unwrap();
                    (off..off + len)
                        .map(|i| m.known[i as usize].then_some(m.data[i as usize]))
                        .collect()
                };
                for (woff, data) in &r.applied {
                    for (i, b) in data.iter().enumerate() {
                        let p = woff + i as u64;
                        if p >= off && p < off + len {
                            want[(p - off) as usize] = Some(*b);
                        }
                    }
                }
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    if let Some(w) = w {
                        assert_eq!(
                            g,
                            w,
                            "client {client}: byte {} wrong during the run",
                            off + i as u64
                        );
                    }
                }
            }
        }
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_matches_model_through_kills() {
    let seed: u64 = std::env::var("DLSM_MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("model test seed {seed} (rerun with DLSM_MODEL_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let a = NodeProc::start();
    a.create("vm1", "48M");
    let initial = pattern(SIZE as usize, seed);
    let ca = NbdClient::connect(&NbdAddr::Tcp(a.nbd.clone()), "vm1")
        .await
        .unwrap();
    // Leave some stripes as holes, so zero skipping is exercised too.
    for (i, chunk) in initial.chunks(1 << 20).enumerate() {
        if i % 3 != 1 {
            ca.write((i << 20) as u64, chunk, false).await.unwrap();
        }
    }
    ca.flush().await.unwrap();
    drop(ca);
    let mut data = initial.clone();
    for (i, chunk) in data.chunks_mut(1 << 20).enumerate() {
        if i % 3 == 1 {
            chunk.fill(0);
        }
    }
    let model = Arc::new(std::sync::Mutex::new(Model {
        known: vec![true; SIZE as usize],
        data,
    }));

    let bdir = tempfile::tempdir().unwrap();
    let flags = ["--inject-origin-delay-ms", "15", "--source-timeout", "10"];
    let mut b = NodeProc::start_with(bdir.path(), "127.0.0.1:0", "127.0.0.1:0", &flags);
    let (bnbd, bapi) = (b.nbd.clone(), b.api.clone());
    a.cli_ok(&[
        "migrate",
        "vm1",
        "--to",
        &b.api,
        "--region-size",
        "16K",
        "--rate",
        "1M",
    ]);

    let mut total_ops = 0;
    for round in 0..5u64 {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for client in 0..CLIENTS {
            let c = NbdClient::connect(&NbdAddr::Tcp(b.nbd.clone()), "vm1")
                .await
                .unwrap();
            tasks.push(tokio::spawn(run_client(
                c,
                client,
                rng.gen(),
                stop.clone(),
                model.clone(),
            )));
        }
        let kill = round < 4;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(300..1200))).await;
        if kill {
            b.kill(); // with requests in flight
        }
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let r = t.await.unwrap();
            total_ops += r.ops;
            let mut m = model.lock().unwrap();
            for (off, d) in &r.applied {
                m.data[*off as usize..*off as usize + d.len()].copy_from_slice(d);
                m.known[*off as usize..*off as usize + d.len()].fill(true);
            }
            if kill {
                for (off, len) in &r.unflushed {
                    m.known[*off as usize..(*off + *len) as usize].fill(false);
                }
            }
        }
        if kill {
            b = NodeProc::start_with(bdir.path(), &bnbd, &bapi, &flags);
        }
        let o = b.cli(&["migration", "status", "vm1", "--json"]);
        let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        eprintln!(
            "round {round}: {} of {} regions present",
            s["regions_present"], s["regions_total"]
        );
    }
    // A migration that completed before the last restart has no rate to
    // set, but its status survives the restart.
    let _ = b.cli(&["migration", "set-rate", "vm1", "0"]);
    let done = b.wait_phase("vm1", "complete", 120);
    let c = NbdClient::connect(&NbdAddr::Tcp(b.nbd.clone()), "vm1")
        .await
        .unwrap();
    let m = Arc::try_unwrap(model)
        .ok()
        .expect("clients are done")
        .into_inner()
        .unwrap();
    let mut checked = 0u64;
    for start in (0..SIZE).step_by(1 << 20) {
        let got = c.read(start, 1 << 20).await.unwrap();
        for (i, g) in got.iter().enumerate() {
            let p = (start + i as u64) as usize;
            if m.known[p] {
                assert_eq!(
                    *g, m.data[p],
                    "seed {seed}: byte {p} differs from the model at the end"
                );
                checked += 1;
            }
        }
    }
    eprintln!(
        "{total_ops} ops, 4 kills, {checked} bytes checked ({} unknown), {done}",
        SIZE - checked
    );
    println!(
        "FAULTS model: injected=4 ops={total_ops} bytes_checked={checked} bytes_unknown={} bytes_lost=0",
        SIZE - checked
    );
    assert!(
        checked > SIZE * 9 / 10,
        "too few bytes known to mean anything: {checked}"
    );
    assert!(total_ops > 200, "too few operations: {total_ops}");
}
