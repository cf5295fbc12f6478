//! dlsm's vhost-user-blk export driven by the repo's frontend
//! (`dlsm::vhost::frontend`) against a real `dlsm serve`: what it reads is
//! the volume, what it writes reads back over NBD (and the reverse);
//! malformed chains get an error and harm nothing else; a migration's
//! destination serves absent regions on demand through vhost-user and takes
//! the volume over on the first write, as it does over NBD.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{run_ok, NodeProc};
use dlsm::vhost::frontend::{
    status, BlkQueue, Completion, QueueOpts, RawDesc, Request, RequestType, VhostBlkClient,
    DESC_F_NEXT, DESC_F_WRITE, SECTOR,
};
use rand::{Rng, SeedableRng};

const WAIT: Option<Duration> = Some(Duration::from_secs(20));

fn opts(num_queues: u16) -> QueueOpts {
    QueueOpts {
        num_queues,
        queue_size: 128,
        event_idx: true,
        buf_count: 16,
        buf_size: 64 << 10,
    }
}

/// A node serving vhost-user sockets under its data directory.
fn node(dir: &Path) -> (NodeProc, PathBuf) {
    let vu = dir.join("vu");
    let n = NodeProc::start_with(
        &dir.join("data"),
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--vhost-user-dir", vu.to_str().unwrap()],
    );
    (n, vu)
}

/// A raw file of `size` random bytes.
fn random_file(dir: &Path, size: usize, seed: u64) -> (PathBuf, Vec<u8>) {
    let mut data = vec![0u8; size];
    rand::rngs::StdRng::seed_from_u64(seed).fill(&mut data[..]);
    let path = dir.join(format!("image-{seed}.raw"));
    std::fs::write(&path, &data).unwrap();
    (path, data)
}

fn connect(sock: &Path, queues: u16) -> VhostBlkClient {
    let t = Instant::now();
    loop {
        match VhostBlkClient::connect(sock, opts(queues)) {
            Ok(c) => return c,
            Err(e) => {
                assert!(t.elapsed() < Duration::from_secs(10), "connect: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Submits one request and waits for it.
fn one(q: &mut BlkQueue, req: Request) -> Completion {
    q.submit_and_wait(&req, WAIT).unwrap()
}

fn read(q: &mut BlkQueue, off: u64, len: usize) -> Vec<u8> {
    let c = one(
        q,
        Request {
            kind: RequestType::Read,
            sector: off / SECTOR,
            data: Some((0, len as u32)),
        },
    );
    assert_eq!(c.status, Some(status::OK), "read at {off}");
    let mut b = vec![0u8; len];
    q.read_buf(0, 0, &mut b).unwrap();
    b
}

fn write(q: &mut BlkQueue, off: u64, data: &[u8]) {
    q.write_buf(1, 0, data).unwrap();
    let c = one(
        q,
        Request {
            kind: RequestType::Write,
            sector: off / SECTOR,
            data: Some((1, data.len() as u32)),
        },
    );
    assert_eq!(c.status, Some(status::OK), "write at {off}");
}

/// The volume's bytes as an NBD client sees them.
fn over_nbd(n: &NodeProc, name: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!("{name}-copy.raw"));
    common::nbd_copy(&format!("nbd://{}/{name}", n.nbd), &out);
    std::fs::read(&out).unwrap()
}

#[test]
fn vhost_and_nbd_see_the_same_volume_with_many_requests_in_flight_on_two_queues() {
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let (n, vu) = node(tmp.path());
    let (image, mut model) = random_file(tmp.path(), 8 << 20, 1);
    n.cli_ok(&["volume", "create", "vm", "--from", image.to_str().unwrap()]);
    let mut c = connect(&vu.join("vm"), 2);
    assert_eq!(c.capacity(), 8 << 20);
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);

    // Random reads at depth 16 on each of two queues, from two threads.
    let queues = c.take_queues();
    let threads: Vec<_> = queues
        .into_iter()
        .enumerate()
        .map(|(qi, mut q)| {
            let model = model.clone();
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(10 + qi as u64);
                let mut submitted = std::collections::HashMap::new();
                let mut out = Vec::new();
                let mut done = 0;
                let mut next_slot: Vec<usize> = (0..16).collect();
                let mut issued = 0;
                while done < 400 {
                    while issued < 400 {
                        let Some(slot) = next_slot.pop() else { break };
                        let len = rng.gen_range(1..=16) * 4096usize;
                        let off = rng.gen_range(0..((8 << 20) - len) / 4096) as u64 * 4096;
                        q.read(off, slot, len as u32, issued).unwrap();
                        submitted.insert(issued, (slot, off, len));
                        issued += 1;
                    }
                    q.kick().unwrap();
                    out.clear();
                    q.wait(&mut out, 1, WAIT).unwrap();
                    for cpl in &out {
                        let (slot, off, len) = submitted.remove(&cpl.user_data).unwrap();
                        assert_eq!(cpl.status, Some(status::OK));
                        let mut b = vec![0u8; len];
                        q.read_buf(slot, 0, &mut b).unwrap();
                        assert!(
                            b == model[off as usize..off as usize + len],
                            "queue {qi}: wrong bytes at {off}+{len}"
                        );
                        next_slot.push(slot);
                        done += 1;
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }

    // Writes through vhost-user read back over NBD...
    let mut c = connect_again(&vu.join("vm"), c);
    let q = c.queue(0);
    for _ in 0..50 {
        let len = rng.gen_range(1..=16) * 512usize;
        let off = rng.gen_range(0..((8 << 20) - len) / 512) as u64 * 512;
        let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        write(q, off, &data);
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    let flush = one(
        q,
        Request {
            kind: RequestType::Flush,
            sector: 0,
            data: None,
        },
    );
    assert_eq!(flush.status, Some(status::OK));
    assert!(
        over_nbd(&n, "vm", tmp.path()) == model,
        "NBD sees other bytes"
    );
    // ...and NBD writes read back through vhost-user.
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &format!("nbd://{}/vm", n.nbd),
        "-c",
        "write -P 0x5a 1M 64k",
    ]));
    assert!(read(q, 1 << 20, 64 << 10).iter().all(|b| *b == 0x5a));
}

/// The frontend's connection ends when it is dropped; a new one is served.
fn connect_again(sock: &Path, old: VhostBlkClient) -> VhostBlkClient {
    drop(old);
    connect(sock, 1)
}

#[test]
fn malformed_chains_get_an_error_and_harm_no_one() {
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let (n, vu) = node(tmp.path());
    let (image, model) = random_file(tmp.path(), 1 << 20, 3);
    n.cli_ok(&["volume", "create", "vm", "--from", image.to_str().unwrap()]);
    n.cli_ok(&[
        "volume",
        "create",
        "other",
        "--from",
        image.to_str().unwrap(),
    ]);
    let mut c = connect(&vu.join("vm"), 1);
    let mut other = connect(&vu.join("other"), 1);
    let beyond = c.mem_size() + (1 << 20);
    let q = c.queue(0);
    let (hdr, st) = (q.buf_addr(0), q.buf_addr(0) + 16);
    q.write_buf(0, 0, &dlsm::vhost::frontend::req_header(0, 0))
        .unwrap();

    // A data buffer outside guest memory: IOERR in the status byte.
    q.write_buf(0, 16, &[0xff]).unwrap();
    let chain = [
        RawDesc::new(hdr, 16, DESC_F_NEXT),
        RawDesc::new(beyond, 4096, DESC_F_NEXT | DESC_F_WRITE),
        RawDesc::new(st, 1, DESC_F_WRITE),
    ];
    q.submit_raw(&chain, 1).unwrap();
    q.kick().unwrap();
    let mut out = Vec::new();
    q.wait(&mut out, 1, WAIT).unwrap();
    let mut s = [0u8];
    q.read_mem(st, &mut s).unwrap();
    assert_eq!(s[0], status::IOERR, "out-of-memory buffer not refused");

    // A readable descriptor after the writable ones.
    q.write_buf(0, 16, &[0xff]).unwrap();
    let chain = [
        RawDesc::new(hdr, 16, DESC_F_NEXT),
        RawDesc::new(st, 1, DESC_F_NEXT | DESC_F_WRITE),
        RawDesc::new(q.buf_addr(1), 512, 0),
    ];
    q.submit_raw(&chain, 2).unwrap();
    q.kick().unwrap();
    out.clear();
    q.wait(&mut out, 1, WAIT).unwrap();
    assert_eq!(out[0].len, 0, "a chain with no usable status got bytes");

    // The queue, the node and the other volume's device all still work.
    assert!(read(q, 4096, 8192) == model[4096..12288]);
    assert!(read(other.queue(0), 0, 4096) == model[..4096]);
    n.cli_ok(&["volume", "show", "vm"]);
}

#[test]
fn destination_serves_absent_regions_on_demand_and_takes_over_on_first_write() {
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let a = NodeProc::start_with(&tmp.path().join("a"), "127.0.0.1:0", "127.0.0.1:0", &[]);
    let (b, vu) = node(&tmp.path().join("b"));
    let (image, mut model) = random_file(tmp.path(), 16 << 20, 4);
    a.cli_ok(&["volume", "create", "vm", "--from", image.to_str().unwrap()]);
    a.cli_ok(&["migrate", "vm", "--to", &b.api, "--rate", "4K"]);
    let mut c = connect(&vu.join("vm"), 1);
    let q = c.queue(0);
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut check = |q: &mut BlkQueue, model: &[u8]| {
        for _ in 0..40 {
            let len = rng.gen_range(1..=8) * 4096usize;
            let off = rng.gen_range(0..((16 << 20) - len) / 4096) as u64 * 4096;
            assert!(
                read(q, off, len) == model[off as usize..off as usize + len],
                "wrong bytes at {off}+{len} on the destination"
            );
        }
    };
    // Before the handoff, reads pass through to the source.
    check(q, &model);
    assert_eq!(b.status("vm")["phase"], "passthrough");

    // The first write through vhost-user hands the volume over...
    let data = vec![0xc3u8; 8192];
    write(q, 3 << 20, &data);
    model[3 << 20..(3 << 20) + 8192].copy_from_slice(&data);
    let shown: serde_json::Value =
        serde_json::from_str(&a.cli_ok(&["volume", "show", "vm", "--json"])).unwrap();
    assert!(
        shown["fenced_to"].is_string(),
        "the source was not fenced by the destination's first write: {shown}"
    );
    // ...and absent regions are then fetched on demand, through vhost-user.
    check(q, &model);
    let st = b.status("vm");
    assert!(
        st["bytes_on_demand"].as_u64().unwrap() > 0,
        "nothing fetched on demand: {st}"
    );
    let _ = b.cli(&["migration", "set-rate", "vm", "0"]);
    b.wait_phase("vm", "complete", 120);
    assert!(read(q, 3 << 20, 8192) == data);
    drop(c);
    assert!(
        over_nbd(&b, "vm", tmp.path()) == model,
        "destination's bytes differ"
    );
}
