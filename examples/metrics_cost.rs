//! What recording one NBD request in the metrics costs, without the noise
//! of a whole server: `NbdMetrics::request_done` (two clock reads around
//! it, as the server does) in a tight loop, on one thread and on two
//! threads hitting the same counters (the worst case for the atomics).
//!
//! `cargo run --release --example metrics_cost`

use std::sync::Arc;
use std::time::{Duration, Instant};

use dlsm::nbd::proto::Command;
use dlsm::node::metrics::NbdMetrics;

const N: u32 = 20_000_000;

fn run(m: &NbdMetrics) -> Duration {
    let t = Instant::now();
    for i in 0..N {
        let arrived = Instant::now();
        let cmd = if i % 4 == 0 {
            Command::Write
        } else {
            Command::Read
        };
        m.request_done(cmd, 4096, arrived.elapsed());
    }
    t.elapsed()
}

fn main() {
    let m = Arc::new(NbdMetrics::default());
    let one = run(&m);
    println!(
        "1 thread:  {:.1} ns per request recorded (clock reads included)",
        one.as_nanos() as f64 / N as f64
    );
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let m = m.clone();
            std::thread::spawn(move || run(&m))
        })
        .collect();
    let two: Vec<Duration> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let worst = two.iter().max().unwrap();
    println!(
        "2 threads: {:.1} ns per request recorded, same counters from both",
        worst.as_nanos() as f64 / N as f64
    );
}
