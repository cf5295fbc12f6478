//! A clone that ends without completing (dropped by a cancel, or
//! a rollback reverted before its handoff) must let go of its origin: its
//! NBD links to the other node close, and that node's connection count
//! (which the NBD connection cap counts) goes back down.

mod common;

use std::time::Duration;

use common::{client, pattern, wait_until, NodeProc};

const MIB: u64 = 1 << 20;

fn nbd_connections(node: &NodeProc) -> u64 {
    let text: String = ureq::get(&format!("http://{}/metrics", node.api))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("dlsm_nbd_connections "))
        .unwrap()
        .trim()
        .parse::<f64>()
        .unwrap() as u64
}

/// Passthrough reads at `at` open origin links to the other node.
async fn read_through(at: &NodeProc) {
    let c = client(at, "vm1").await;
    for i in 0..8u64 {
        c.read(i * MIB, MIB as u32).await.unwrap();
    }
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_clones_close_their_origin_links() {
    let a = NodeProc::start();
    let b = NodeProc::start();
    a.create("vm1", "8M");
    {
        let c = client(&a, "vm1").await;
        c.write(0, &pattern(8 * MIB as usize, 1), false)
            .await
            .unwrap();
        c.flush().await.unwrap();
    }
    wait_until("no client on a", 10, || nbd_connections(&a) == 0);
    let mut seen = Vec::new();
    for _ in 1..=3 {
        a.cli_ok(&["migrate", "vm1", "--to", &b.api]);
        read_through(&b).await;
        a.cli_ok(&["migration", "cancel", "vm1"]);
        std::thread::sleep(Duration::from_secs(3));
        seen.push(nbd_connections(&a));
    }
    assert_eq!(
        seen,
        [0, 0, 0],
        "NBD connections left open on the source after each migrate+cancel round"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reverted_rollback_closes_its_origin_links() {
    let a = NodeProc::start();
    let b = NodeProc::start();
    a.create("vm1", "16M");
    {
        let c = client(&a, "vm1").await;
        c.write(0, &pattern(16 * MIB as usize, 1), false)
            .await
            .unwrap();
        c.flush().await.unwrap();
    }
    a.cli_ok(&["migrate", "vm1", "--to", &b.api, "--rate", "64K"]);
    {
        let c = client(&b, "vm1").await;
        c.write(0, &pattern(128 << 10, 2), false).await.unwrap();
        c.flush().await.unwrap();
    }
    wait_until("no client on b", 10, || nbd_connections(&b) == 0);
    // Cancel after handoff: rollback R, a clone on A reading from B.
    a.cli_ok(&["migration", "cancel", "vm1"]);
    assert_eq!(a.status("vm1")["phase"], "passthrough");
    read_through(&a).await;
    assert!(nbd_connections(&b) > 0, "the rollback clone reads from b");
    // Cancel R before its handoff: A is the fenced source again.
    a.cli_ok(&["migration", "cancel", "vm1"]);
    std::thread::sleep(Duration::from_secs(2));
    let n = nbd_connections(&b);
    assert_eq!(
        n, 0,
        "{n} NBD links of the reverted rollback clone stay open on b"
    );
}
