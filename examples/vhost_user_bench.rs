//! Host-level vhost-user-blk benchmark: drives a vhost-user-blk socket with
//! `dlsm::vhost::frontend` (no guest, no kernel driver) and prints one JSON
//! line: iops, MiB/s, mean/p50/p99 latency (µs) and this process's CPU time
//! (getrusage user+sys) per I/O. Used by `bench/vhost-user.sh`.
//!
//! `cargo run --release --example vhost_user_bench -- --socket S
//!  --pattern randread --bs 4k --depth 32 --runtime 10 --queues 1`
//!
//! Depth is per queue; every queue has its own thread. Random offsets are
//! uniform over the capacity and aligned to the block size; sequential
//! patterns split the capacity into one range per queue. Written data is
//! random non-zero bytes (each write's first 8 bytes re-randomised). I/Os
//! count if they complete within the measured window (after `--ramp`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use dlsm::vhost::frontend::{status, BlkQueue, Completion, QueueOpts, VhostBlkClient};
use nix::sys::resource::{getrusage, UsageWho};
use rand::{Rng, SeedableRng};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Pattern {
    Randread,
    Randwrite,
    Read,
    Write,
}

impl Pattern {
    fn writes(self) -> bool {
        matches!(self, Pattern::Randwrite | Pattern::Write)
    }
    fn random(self) -> bool {
        matches!(self, Pattern::Randread | Pattern::Randwrite)
    }
    fn name(self) -> &'static str {
        match self {
            Pattern::Randread => "randread",
            Pattern::Randwrite => "randwrite",
            Pattern::Read => "read",
            Pattern::Write => "write",
        }
    }
}

#[derive(Parser, Debug)]
struct Args {
    /// vhost-user-blk UNIX socket.
    #[arg(long)]
    socket: String,
    /// I/O pattern.
    #[arg(long, value_enum, default_value = "randread")]
    pattern: Pattern,
    /// Block size (4k, 1m, ...).
    #[arg(long, default_value = "4k", value_parser = dlsm::size::parse_size)]
    bs: u64,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 1)]
    depth: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    runtime: f64,
    /// Unmeasured warm-up seconds before the measured window.
    #[arg(long, default_value_t = 1.0)]
    ramp: f64,
    /// Queues (one thread each).
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Don't negotiate VIRTIO_RING_F_EVENT_IDX.
    #[arg(long)]
    no_event_idx: bool,
}

struct Stats {
    lat_ns: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
}

fn nonzero_bytes(rng: &mut impl Rng, n: usize) -> Vec<u8> {
    (0..n).map(|_| rng.gen_range(1..=255u8)).collect()
}

#[allow(clippy::too_many_arguments)]
fn run_queue(
    mut q: BlkQueue,
    a: &Args,
    capacity: u64,
    nq: usize,
    t_measure: Instant,
    t_end: Instant,
    failed: &AtomicBool,
) -> Stats {
    let bs = a.bs;
    let qi = q.index() as u64;
    let mut rng = rand::rngs::StdRng::from_entropy();
    let blocks = capacity / bs;
    // Sequential: this queue's range of blocks.
    let per_q = blocks / nq as u64;
    let (lo, hi) = (qi * per_q, (qi + 1) * per_q);
    let mut cursor = lo;
    if a.pattern.writes() {
        for slot in 0..a.depth {
            q.write_buf(slot, 0, &nonzero_bytes(&mut rng, bs as usize))
                .expect("fill buffer");
        }
    }
    let mut started = vec![Instant::now(); a.depth];
    let mut stats = Stats {
        lat_ns: Vec::with_capacity(1 << 20),
        errors: 0,
        first_error: None,
    };
    let mut submit = |q: &mut BlkQueue, slot: usize, rng: &mut rand::rngs::StdRng| {
        let block = if a.pattern.random() {
            rng.gen_range(0..blocks)
        } else {
            let b = cursor;
            cursor = if cursor + 1 >= hi { lo } else { cursor + 1 };
            b
        };
        let off = block * bs;
        let r = if a.pattern.writes() {
            let stamp = rng.gen::<u64>() | 0x0101_0101_0101_0101;
            q.write_buf(slot, 0, &stamp.to_le_bytes()).expect("stamp");
            q.write(off, slot, bs as u32, slot as u64)
        } else {
            q.read(off, slot, bs as u32, slot as u64)
        };
        r.expect("submit");
    };
    for (slot, t) in started.iter_mut().enumerate() {
        *t = Instant::now();
        submit(&mut q, slot, &mut rng);
    }
    q.kick().expect("kick");
    let mut done: Vec<Completion> = Vec::with_capacity(a.depth);
    loop {
        done.clear();
        if let Err(e) = q.wait(&mut done, 1, Some(Duration::from_secs(30))) {
            stats.errors += 1;
            stats.first_error.get_or_insert(format!("wait: {e}"));
            failed.store(true, Ordering::Relaxed);
            return stats;
        }
        let now = Instant::now();
        let stop = now >= t_end || failed.load(Ordering::Relaxed);
        for c in &done {
            let slot = c.user_data as usize;
            if c.status != Some(status::OK) {
                stats.errors += 1;
                stats
                    .first_error
                    .get_or_insert(format!("request status {:?}", c.status));
                failed.store(true, Ordering::Relaxed);
            } else if now >= t_measure && now < t_end {
                stats.lat_ns.push((now - started[slot]).as_nanos() as u64);
            }
            if !stop {
                started[slot] = now;
                submit(&mut q, slot, &mut rng);
            }
        }
        if stop {
            if q.in_flight() == 0 {
                return stats;
            }
        } else {
            q.kick().expect("kick");
        }
    }
}

fn cpu_seconds() -> (f64, f64) {
    let u = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage");
    let tv = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    (tv(u.user_time()), tv(u.system_time()))
}

fn main() {
    let a = Args::parse();
    if a.depth == 0 || a.bs == 0 || a.bs % 512 != 0 {
        eprintln!("depth must be > 0 and bs a multiple of 512");
        std::process::exit(2);
    }
    let queue_size = (3 * a.depth).next_power_of_two().clamp(64, 32768) as u16;
    let opts = QueueOpts {
        num_queues: a.queues,
        queue_size,
        event_idx: !a.no_event_idx,
        buf_count: a.depth,
        buf_size: a.bs as usize,
    };
    let mut client = match VhostBlkClient::connect(&a.socket, opts) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vhost_user_bench: {}: {e}", a.socket);
            std::process::exit(1);
        }
    };
    let capacity = client.capacity();
    if capacity / a.bs < u64::from(a.queues) {
        eprintln!("device of {capacity} bytes is too small");
        std::process::exit(2);
    }
    let queues = client.take_queues();
    let nq = queues.len();
    let t0 = Instant::now();
    let t_measure = t0 + Duration::from_secs_f64(a.ramp);
    let t_end = t_measure + Duration::from_secs_f64(a.runtime);
    let failed = AtomicBool::new(false);
    let a = Arc::new(a);
    let (stats, cpu0, cpu1) = thread::scope(|s| {
        let handles: Vec<_> = queues
            .into_iter()
            .map(|q| {
                let a = a.clone();
                let failed = &failed;
                s.spawn(move || run_queue(q, &a, capacity, nq, t_measure, t_end, failed))
            })
            .collect();
        thread::sleep(t_measure.saturating_duration_since(Instant::now()));
        let cpu0 = cpu_seconds();
        thread::sleep(t_end.saturating_duration_since(Instant::now()));
        let cpu1 = cpu_seconds();
        let stats: Vec<Stats> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        (stats, cpu0, cpu1)
    });
    let errors: u64 = stats.iter().map(|s| s.errors).sum();
    let first_error = stats.iter().find_map(|s| s.first_error.clone());
    let mut lat: Vec<u64> = stats.into_iter().flat_map(|s| s.lat_ns).collect();
    lat.sort_unstable();
    let ios = lat.len() as f64;
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            0.0
        } else {
            lat[((lat.len() - 1) as f64 * p).round() as usize] as f64 / 1e3
        }
    };
    let mean = if lat.is_empty() {
        0.0
    } else {
        lat.iter().sum::<u64>() as f64 / ios / 1e3
    };
    let (user, sys) = (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1);
    let out = serde_json::json!({
        "engine": "vhost-user-frontend",
        "socket": a.socket,
        "pattern": a.pattern.name(),
        "bs": a.bs,
        "depth": a.depth,
        "queues": nq,
        "event_idx": !a.no_event_idx,
        "runtime_s": a.runtime,
        "ios": lat.len(),
        "iops": ios / a.runtime,
        "mib_s": ios * a.bs as f64 / a.runtime / 1048576.0,
        "lat_mean_us": mean,
        "lat_p50_us": pct(0.50),
        "lat_p99_us": pct(0.99),
        "lat_max_us": pct(1.0),
        "cpu_user_s": user,
        "cpu_sys_s": sys,
        "cpu_us_per_io": if ios > 0.0 { (user + sys) * 1e6 / ios } else { 0.0 },
        "errors": errors,
        "first_error": first_error,
    });
    println!("{out}");
    if errors > 0 {
        std::process::exit(1);
    }
}
