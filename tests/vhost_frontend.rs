//! `dlsm::vhost::frontend` against QEMU's own vhost-user-blk server
//! (`qemu-storage-daemon --export type=vhost-user-blk`) exporting a local
//! raw file: what the frontend reads is the file's bytes, what it writes
//! lands in the file, and flush, get-id, discard, write-zeroes, deep queues
//! and several queues work.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{qsd_vhost_export, KillOnDrop};
use dlsm::vhost::frontend::{
    feature, status, BlkQueue, Completion, QueueOpts, RawDesc, RawNext, Request, RequestType,
    Segment, VhostBlkClient, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, SECTOR,
};
use rand::{Rng, SeedableRng};

const WAIT: Option<Duration> = Some(Duration::from_secs(10));

/// A qemu-storage-daemon exporting a random-filled raw file.
struct Qsd {
    _daemon: KillOnDrop,
    sock: PathBuf,
    file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Qsd {
    fn start(size: usize, num_queues: u16) -> Qsd {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let file = dir.path().join("disk.raw");
        let sock = dir.path().join("blk.sock");
        let mut data = vec![0u8; size];
        rand::rngs::StdRng::seed_from_u64(size as u64).fill(&mut data[..]);
        std::fs::write(&file, &data).unwrap();
        let daemon = qsd_vhost_export(
            &file,
            &sock,
            "cache.direct=off",
            &format!("num-queues={num_queues}"),
        );
        Qsd {
            _daemon: daemon,
            sock,
            file,
            _dir: dir,
        }
    }

    fn connect(&self, opts: QueueOpts) -> VhostBlkClient {
        VhostBlkClient::connect(&self.sock, opts).unwrap()
    }

    fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.file).unwrap()
    }
}

fn opts(num_queues: u16, queue_size: u16, buf_count: usize, buf_size: usize) -> QueueOpts {
    QueueOpts {
        num_queues,
        queue_size,
        event_idx: true,
        buf_count,
        buf_size,
    }
}

/// Submits one request and waits for it.
fn one(q: &mut BlkQueue, req: Request) -> Completion {
    q.submit_and_wait(&req, WAIT).unwrap()
}

#[derive(Clone, Debug)]
enum Op {
    Read { off: u64, len: usize },
    Write { off: u64, data: Vec<u8> },
}

/// Runs `ops` keeping up to `depth` in flight (one buffer slot each);
/// returns each op's completion and, for reads, the bytes read.
fn run_ops(q: &mut BlkQueue, ops: &[Op], depth: usize) -> Vec<(Completion, Option<Vec<u8>>)> {
    let mut results: Vec<Option<(Completion, Option<Vec<u8>>)>> = vec![None; ops.len()];
    let mut free_slots: Vec<usize> = (0..depth).collect();
    let mut slot_of = vec![usize::MAX; ops.len()];
    let mut next = 0;
    let mut out = Vec::new();
    let mut max_in_flight = 0;
    while results.iter().any(Option::is_none) {
        while next < ops.len() {
            let Some(slot) = free_slots.pop() else { break };
            match &ops[next] {
                Op::Read { off, len } => q.read(*off, slot, *len as u32, next as u64),
                Op::Write { off, data } => {
                    q.write_buf(slot, 0, data).unwrap();
                    q.write(*off, slot, data.len() as u32, next as u64)
                }
            }
            .unwrap();
            slot_of[next] = slot;
            next += 1;
        }
        max_in_flight = max_in_flight.max(q.in_flight());
        q.kick().unwrap();
        out.clear();
        q.wait(&mut out, 1, WAIT).unwrap();
        for c in &out {
            let i = c.user_data as usize;
            let slot = slot_of[i];
            let data = match &ops[i] {
                Op::Read { len, .. } => {
                    let mut b = vec![0u8; *len];
                    q.read_buf(slot, 0, &mut b).unwrap();
                    Some(b)
                }
                Op::Write { .. } => None,
            };
            free_slots.push(slot);
            results[i] = Some((*c, data));
        }
    }
    assert_eq!(max_in_flight, depth.min(ops.len()), "queue never got full");
    results.into_iter().map(Option::unwrap).collect()
}

fn random_ops(
    rng: &mut impl Rng,
    n: usize,
    capacity: u64,
    max_len: usize,
    writes: bool,
) -> Vec<Op> {
    (0..n)
        .map(|_| {
            let len = rng.gen_range(1..=max_len / 512) * 512;
            let off = rng.gen_range(0..(capacity - len as u64) / 512) * 512;
            if writes && rng.gen_bool(0.5) {
                let mut data = vec![0u8; len];
                rng.fill(&mut data[..]);
                Op::Write { off, data }
            } else {
                Op::Read { off, len }
            }
        })
        .collect()
}

#[test]
fn negotiates_features_and_reads_capacity() {
    let qsd = Qsd::start(16 << 20, 1);
    let c = qsd.connect(QueueOpts::default());
    assert_eq!(c.capacity(), 16 << 20);
    let f = c.features();
    for (bit, name) in [
        (feature::VERSION_1, "VERSION_1"),
        (feature::PROTOCOL_FEATURES, "PROTOCOL_FEATURES"),
        (feature::EVENT_IDX, "EVENT_IDX"),
        (feature::FLUSH, "FLUSH"),
        (feature::DISCARD, "DISCARD"),
        (feature::WRITE_ZEROES, "WRITE_ZEROES"),
        (feature::BLK_SIZE, "BLK_SIZE"),
    ] {
        assert!(f & bit != 0, "{name} not negotiated: {f:#x}");
    }
    assert_eq!(f & feature::RO, 0);
    assert_eq!(c.config().blk_size, 512);
    eprintln!(
        "qsd offers {:#x}, negotiated {:#x}, protocol {:#x}, config {:?}",
        c.offered_features(),
        f,
        c.protocol_features(),
        c.config()
    );
}

#[test]
fn reads_return_the_files_bytes_at_depth_32() {
    let qsd = Qsd::start(32 << 20, 1);
    let file = qsd.contents();
    // With and without EVENT_IDX (one connection after the other).
    for event_idx in [true, false] {
        let mut c = qsd.connect(QueueOpts {
            event_idx,
            ..opts(1, 128, 32, 64 << 10)
        });
        assert_eq!(c.features() & feature::EVENT_IDX != 0, event_idx);
        let q = c.queue(0);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let ops = random_ops(&mut rng, 3000, 32 << 20, 64 << 10, false);
        for (op, (c, data)) in ops.iter().zip(run_ops(q, &ops, 32)) {
            let Op::Read { off, len } = op else {
                unreachable!()
            };
            assert_eq!(c.status, Some(status::OK));
            let off = *off as usize;
            assert!(data.unwrap() == file[off..off + len], "read {off}+{len}");
        }
        assert_eq!(q.in_flight(), 0);
        assert_eq!(q.free_descriptors(), 128);
    }
}

#[test]
fn writes_land_in_the_file_and_read_back() {
    let qsd = Qsd::start(32 << 20, 1);
    let mut model = qsd.contents();
    let mut c = qsd.connect(opts(1, 256, 64, 128 << 10));
    let q = c.queue(0);
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    // Writes in flight together may land in either order, so they are kept
    // disjoint: each of 1500 writes gets its own 16 KiB chunk of the disk.
    let mut chunks: Vec<u64> = (0..(32u64 << 20) / (16 << 10)).collect();
    rand::seq::SliceRandom::shuffle(&mut chunks[..], &mut rng);
    let ops: Vec<Op> = chunks[..1500]
        .iter()
        .map(|chunk| {
            let len = rng.gen_range(1..=32usize) * 512;
            let off = chunk * (16 << 10) + rng.gen_range(0..=(32 - len as u64 / 512)) * 512;
            let mut data = vec![0u8; len];
            rng.fill(&mut data[..]);
            model[off as usize..off as usize + len].copy_from_slice(&data);
            Op::Write { off, data }
        })
        .collect();
    for (c, _) in run_ops(q, &ops, 64) {
        assert_eq!(c.status, Some(status::OK));
    }
    let f = one(
        q,
        Request {
            kind: RequestType::Flush,
            sector: 0,
            data: None,
        },
    );
    assert_eq!(f.status, Some(status::OK));
    assert!(
        qsd.contents() == model,
        "file differs from what was written"
    );
    // And the device reads back the same.
    let reads: Vec<Op> = (0..(32 << 20) / (128 << 10))
        .map(|i| Op::Read {
            off: i as u64 * (128 << 10),
            len: 128 << 10,
        })
        .collect();
    let mut back = Vec::new();
    for (c, data) in run_ops(q, &reads, 64) {
        assert_eq!(c.status, Some(status::OK));
        back.extend(data.unwrap());
    }
    assert!(back == model);
}

#[test]
fn flush_get_id_and_errors() {
    let qsd = Qsd::start(1 << 20, 1);
    let mut c = qsd.connect(opts(1, 64, 4, 4096));
    let q = c.queue(0);
    q.flush(0).unwrap();
    q.kick().unwrap();
    let mut out = Vec::new();
    q.wait(&mut out, 1, WAIT).unwrap();
    assert_eq!(out[0].status, Some(status::OK));
    assert_eq!(out[0].len, 1, "a flush writes only its status byte");

    q.write_buf(0, 0, &[0xaa; 20]).unwrap();
    q.get_id(0, 0).unwrap();
    q.kick().unwrap();
    out.clear();
    q.wait(&mut out, 1, WAIT).unwrap();
    assert_eq!(out[0].status, Some(status::OK));
    let mut id = [0u8; 20];
    q.read_buf(0, 0, &mut id).unwrap();
    assert_ne!(id, [0xaa; 20]);
    eprintln!(
        "get-id: {:?} (used len {})",
        String::from_utf8_lossy(&id),
        out[0].len
    );

    // Past the end: an I/O error, and the queue keeps working.
    let past = one(
        q,
        Request {
            kind: RequestType::Read,
            sector: (1 << 20) / SECTOR,
            data: Some((0, 4096)),
        },
    );
    assert_eq!(past.status, Some(status::IOERR));
    let bad = one(
        q,
        Request {
            kind: RequestType::Other(99),
            sector: 0,
            data: None,
        },
    );
    assert_eq!(bad.status, Some(status::UNSUPP));
    let ok = one(
        q,
        Request {
            kind: RequestType::Read,
            sector: 0,
            data: Some((0, 4096)),
        },
    );
    assert_eq!(ok.status, Some(status::OK));
}

#[test]
fn discard_and_write_zeroes() {
    let qsd = Qsd::start(4 << 20, 1);
    let mut c = qsd.connect(opts(1, 64, 4, 64 << 10));
    eprintln!("config: {:?}", c.config());
    let q = c.queue(0);
    let mut out = Vec::new();
    q.write_zeroes(
        0,
        &[Segment {
            sector: 8,
            num_sectors: 24,
            flags: 0,
        }],
        0,
    )
    .unwrap();
    q.kick().unwrap();
    q.wait(&mut out, 1, WAIT).unwrap();
    assert_eq!(out[0].status, Some(status::OK));
    let file = qsd.contents();
    assert!(file[4096..16384].iter().all(|b| *b == 0));
    assert!(file[..4096].iter().any(|b| *b != 0));
    assert!(file[16384..20480].iter().any(|b| *b != 0));
    // Read back through the device.
    let r = one(
        q,
        Request {
            kind: RequestType::Read,
            sector: 8,
            data: Some((1, 12288)),
        },
    );
    assert_eq!(r.status, Some(status::OK));
    let mut b = vec![1u8; 12288];
    q.read_buf(1, 0, &mut b).unwrap();
    assert!(b.iter().all(|x| *x == 0));

    // Write-zeroes that may unmap, then discard: both succeed; a discard
    // leaves the content unspecified, so only the status is checked.
    out.clear();
    q.write_zeroes(
        0,
        &[Segment {
            sector: 256,
            num_sectors: 256,
            flags: 1,
        }],
        1,
    )
    .unwrap();
    q.discard(
        2,
        &[Segment {
            sector: 1024,
            num_sectors: 2048,
            flags: 0,
        }],
        2,
    )
    .unwrap();
    q.kick().unwrap();
    q.wait(&mut out, 2, WAIT).unwrap();
    for c in &out {
        assert_eq!(c.status, Some(status::OK), "{c:?}");
    }
    let file = qsd.contents();
    assert!(file[256 * 512..512 * 512].iter().all(|b| *b == 0));
}

#[test]
fn several_queues_in_parallel() {
    let qsd = Qsd::start(16 << 20, 4);
    let mut model = qsd.contents();
    let mut c = qsd.connect(opts(4, 128, 16, 64 << 10));
    assert!(c.features() & feature::MQ != 0);
    assert_eq!(c.num_queues(), 4);
    let queues = c.take_queues();
    // Each queue owns a quarter of the disk: writes there, then reads back.
    let quarter = (16u64 << 20) / 4;
    let written: Vec<Vec<Op>> = std::thread::scope(|s| {
        let hs: Vec<_> = queues
            .into_iter()
            .map(|mut q| {
                s.spawn(move || {
                    let base = u64::from(q.index()) * quarter;
                    let mut rng = rand::rngs::StdRng::seed_from_u64(10 + base);
                    let ops: Vec<Op> = (0..quarter / (64 << 10))
                        .map(|i| {
                            let mut data = vec![0u8; 64 << 10];
                            rng.fill(&mut data[..]);
                            Op::Write {
                                off: base + i * (64 << 10),
                                data,
                            }
                        })
                        .collect();
                    for (c, _) in run_ops(&mut q, &ops, 16) {
                        assert_eq!(c.status, Some(status::OK));
                    }
                    let reads: Vec<Op> = ops
                        .iter()
                        .map(|o| match o {
                            Op::Write { off, data } => Op::Read {
                                off: *off,
                                len: data.len(),
                            },
                            Op::Read { .. } => unreachable!(),
                        })
                        .collect();
                    for (o, (c, data)) in ops.iter().zip(run_ops(&mut q, &reads, 16)) {
                        assert_eq!(c.status, Some(status::OK));
                        let Op::Write { data: w, .. } = o else {
                            unreachable!()
                        };
                        assert!(&data.unwrap() == w);
                    }
                    ops
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for op in written.iter().flatten() {
        if let Op::Write { off, data } = op {
            model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        }
    }
    assert!(qsd.contents() == model);
}

/// The raw escape hatch, used to build well-formed requests by hand: a read
/// split over two data descriptors, and one through an indirect table.
#[test]
fn raw_chains_direct_and_indirect() {
    let qsd = Qsd::start(1 << 20, 1);
    let file = qsd.contents();
    let mut c = qsd.connect(opts(1, 64, 4, 8192));
    assert!(c.features() & feature::INDIRECT_DESC != 0);
    let q = c.queue(0);
    let (hdr, st) = (q.buf_addr(0), q.buf_addr(0) + 16);
    q.write_buf(0, 0, &dlsm::vhost::frontend::req_header(0, 16))
        .unwrap();
    q.write_buf(0, 16, &[0xff]).unwrap();
    let chain = [
        RawDesc {
            addr: hdr,
            len: 16,
            flags: DESC_F_NEXT,
            next: RawNext::Following,
        },
        RawDesc {
            addr: q.buf_addr(1),
            len: 1000,
            flags: DESC_F_NEXT | DESC_F_WRITE,
            next: RawNext::Following,
        },
        RawDesc {
            addr: q.buf_addr(2),
            len: 24,
            flags: DESC_F_NEXT | DESC_F_WRITE,
            next: RawNext::Following,
        },
        RawDesc {
            addr: st,
            len: 1,
            flags: DESC_F_WRITE,
            next: RawNext::Following,
        },
    ];
    q.submit_raw(&chain, 7).unwrap();
    q.kick().unwrap();
    let mut out = Vec::new();
    q.wait(&mut out, 1, WAIT).unwrap();
    assert_eq!(out[0].user_data, 7);
    assert_eq!(out[0].status, None);
    let mut s = [0u8];
    q.read_mem(st, &mut s).unwrap();
    assert_eq!(s[0], status::OK);
    let mut got = vec![0u8; 1024];
    q.read_buf(1, 0, &mut got[..1000]).unwrap();
    q.read_buf(2, 0, &mut got[1000..]).unwrap();
    assert!(got == file[16 * 512..16 * 512 + 1024]);

    // The same read through an indirect table in buffer slot 3.
    q.write_buf(0, 16, &[0xff]).unwrap();
    let table: Vec<u8> = [
        dlsm::vhost::frontend::desc_bytes(hdr, 16, DESC_F_NEXT, 1),
        dlsm::vhost::frontend::desc_bytes(q.buf_addr(1), 1024, DESC_F_NEXT | DESC_F_WRITE, 2),
        dlsm::vhost::frontend::desc_bytes(st, 1, DESC_F_WRITE, 0),
    ]
    .concat();
    q.write_buf(3, 0, &table).unwrap();
    q.write_buf(1, 0, &[0u8; 1024]).unwrap();
    q.submit_raw(
        &[RawDesc {
            addr: q.buf_addr(3),
            len: table.len() as u32,
            flags: DESC_F_INDIRECT,
            next: RawNext::Following,
        }],
        8,
    )
    .unwrap();
    q.kick().unwrap();
    out.clear();
    q.wait(&mut out, 1, WAIT).unwrap();
    q.read_mem(st, &mut s).unwrap();
    assert_eq!(s[0], status::OK);
    q.read_buf(1, 0, &mut got).unwrap();
    assert!(got == file[16 * 512..16 * 512 + 1024]);
    assert_eq!(q.free_descriptors(), 64);
}
