//! Raw-socket tests of the NBD server: the handshake and transmission rules,
//! and hostile input. Each talks to a real `dlsm serve` over TCP.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::NodeProc;
use dlsm::nbd::proto::{self, cmd_flags, errno, opt, rep, Command, InfoRequest, Request};

/// A raw client connection.
struct Raw {
    s: TcpStream,
}

impl Raw {
    /// Connects and completes the greeting with fixed-newstyle + no-zeroes.
    fn connect(node: &NodeProc) -> Raw {
        let s = TcpStream::connect(&node.nbd).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut r = Raw { s };
        let mut g = [0u8; 18];
        r.s.read_exact(&mut g).unwrap();
        assert_eq!(proto::parse_greeting(&g).unwrap(), 3);
        r.s.write_all(&3u32.to_be_bytes()).unwrap();
        r
    }

    fn send_option(&mut self, code: u32, data: &[u8]) {
        let mut b = Vec::new();
        proto::encode_option(&mut b, code, data);
        self.s.write_all(&b).unwrap();
    }

    /// Reads option replies up to the final one; returns (type, data) of all.
    fn opt_replies(&mut self) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            let mut h = [0u8; 20];
            self.s.read_exact(&mut h).unwrap();
            let h = proto::parse_opt_reply_header(&h).unwrap();
            let mut d = vec![0u8; h.len as usize];
            self.s.read_exact(&mut d).unwrap();
            let last = h.reply_type == rep::ACK || rep::is_error(h.reply_type);
            out.push((h.reply_type, d));
            if last {
                return out;
            }
        }
    }

    fn go(&mut self, name: &str, structured: bool) {
        if structured {
            self.send_option(opt::STRUCTURED_REPLY, &[]);
            assert_eq!(self.opt_replies().last().unwrap().0, rep::ACK);
        }
        let req = InfoRequest {
            name: name.into(),
            requests: vec![],
        };
        self.send_option(opt::GO, &req.encode());
        assert_eq!(self.opt_replies().last().unwrap().0, rep::ACK);
    }

    fn request(
        &mut self,
        command: Command,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let mut b = Vec::new();
        Request {
            flags,
            command,
            cookie,
            offset,
            len,
        }
        .encode(&mut b);
        b.extend_from_slice(payload);
        self.s.write_all(&b).unwrap();
    }

    /// Reads one simple reply (no data); returns (error, cookie).
    fn simple_reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        match proto::parse_reply_header(&h).unwrap() {
            proto::ReplyHeader::Simple { error, cookie } => (error, cookie),
            other => panic!("expected a simple reply, got {other:?}"),
        }
    }

    /// Reads one structured chunk; returns (flags, type, cookie, payload).
    fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        match proto::parse_reply_header(&h).unwrap() {
            proto::ReplyHeader::Structured {
                flags,
                ty,
                cookie,
                len,
            } => {
                let mut p = vec![0u8; len as usize];
                self.s.read_exact(&mut p).unwrap();
                (flags, ty, cookie, p)
            }
            other => panic!("expected a chunk, got {other:?}"),
        }
    }

    /// Reads a structured error reply; returns the errno.
    fn chunk_error(&mut self, want_cookie: u64) -> u32 {
        let (flags, ty, cookie, p) = self.chunk();
        assert_eq!(cookie, want_cookie);
        assert_eq!(flags & proto::chunk::FLAG_DONE, 1);
        match proto::parse_chunk(ty, &p).unwrap() {
            proto::Chunk::Error { error, msg, .. } => {
                assert!(!msg.is_empty(), "error without a message");
                error
            }
            other => panic!("expected an error chunk, got {other:?}"),
        }
    }

    /// True once the server has closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => true,
            Err(e) => panic!("server neither answered nor hung up: {e}"),
        }
    }
}

fn node_with_vm1() -> NodeProc {
    let n = NodeProc::start();
    n.create("vm1", "8M");
    n
}

/// The node still serves a fresh client correctly.
fn still_serving(node: &NodeProc) {
    let mut c = Raw::connect(node);
    c.go("vm1", false);
    c.request(Command::Read, 0, 77, 0, 512, &[]);
    assert_eq!(c.simple_reply(), (0, 77));
    let mut d = [0u8; 512];
    c.s.read_exact(&mut d).unwrap();
}

#[test]
fn out_of_range_and_oversize_requests_get_spec_errnos() {
    let node = node_with_vm1();
    let size = 8u64 << 20;
    let mut c = Raw::connect(&node);
    c.go("vm1", false);
    c.request(Command::Read, 0, 1, size - 100, 4096, &[]);
    assert_eq!(c.simple_reply(), (errno::EINVAL, 1));
    // A WRITE past the end: ENOSPC, and its payload is consumed so the next
    // request is read correctly.
    c.request(Command::Write, 0, 2, size - 100, 4096, &[0xee; 4096]);
    assert_eq!(c.simple_reply(), (errno::ENOSPC, 2));
    c.request(Command::Trim, 0, 3, u64::MAX - 10, 4096, &[]);
    assert_eq!(c.simple_reply(), (errno::EINVAL, 3));
    c.request(Command::WriteZeroes, 0, 4, size, 1, &[]);
    assert_eq!(c.simple_reply(), (errno::ENOSPC, 4));
    // Oversize read (simple replies): EINVAL; oversize write: EOVERFLOW after
    // draining 40 MiB of payload.
    c.request(Command::Read, 0, 5, 0, 40 << 20, &[]);
    assert_eq!(c.simple_reply(), (errno::EINVAL, 5));
    c.request(Command::Write, 0, 6, 0, 40 << 20, &vec![1u8; 40 << 20]);
    assert_eq!(c.simple_reply(), (errno::EOVERFLOW, 6));
    // Unknown command and unknown flags.
    c.request(Command::Unknown(42), 0, 7, 0, 0, &[]);
    assert_eq!(c.simple_reply(), (errno::EINVAL, 7));
    c.request(Command::Read, 1 << 12, 8, 0, 512, &[]);
    assert_eq!(c.simple_reply(), (errno::EINVAL, 8));
    // BLOCK_STATUS without a negotiated context.
    c.request(Command::BlockStatus, 0, 9, 0, 4096, &[]);
    assert_eq!(c.simple_reply(), (errno::EINVAL, 9));
    // Still in sync: a valid write and read.
    c.request(Command::Write, cmd_flags::FUA, 10, 4096, 5, b"hello");
    assert_eq!(c.simple_reply(), (0, 10));
    c.request(Command::Read, 0, 11, 4096, 5, &[]);
    assert_eq!(c.simple_reply(), (0, 11));
    let mut d = [0u8; 5];
    c.s.read_exact(&mut d).unwrap();
    assert_eq!(&d, b"hello");
}

#[test]
fn structured_errors_carry_messages() {
    let node = node_with_vm1();
    let mut c = Raw::connect(&node);
    c.go("vm1", true);
    c.request(Command::Read, 0, 1, 0, 40 << 20, &[]);
    assert_eq!(c.chunk_error(1), errno::EOVERFLOW);
    c.request(Command::Read, 0, 2, 8 << 20, 1, &[]);
    assert_eq!(c.chunk_error(2), errno::EINVAL);
    // A structured read of data: one OFFSET_DATA chunk with DONE.
    c.request(Command::Read, cmd_flags::DF, 3, 0, 4096, &[]);
    let (flags, ty, cookie, p) = c.chunk();
    assert_eq!(
        (flags, ty, cookie, p.len()),
        (1, proto::chunk::OFFSET_DATA, 3, 8 + 4096)
    );
}

#[test]
fn bad_magic_drops_only_that_client() {
    let node = node_with_vm1();
    let mut other = Raw::connect(&node);
    other.go("vm1", false);
    let mut bad = Raw::connect(&node);
    bad.go("vm1", false);
    bad.s.write_all(&[0xde, 0xad, 0xbe, 0xef]).unwrap();
    bad.s.write_all(&[0u8; 24]).unwrap();
    assert!(bad.closed(), "server kept a client that sent bad magic");
    // The other client is unaffected.
    other.request(Command::Flush, 0, 5, 0, 0, &[]);
    assert_eq!(other.simple_reply(), (0, 5));
    still_serving(&node);
}

#[test]
fn options_after_go_are_a_protocol_violation() {
    let node = node_with_vm1();
    let mut c = Raw::connect(&node);
    c.go("vm1", false);
    c.send_option(opt::LIST, &[]);
    assert!(c.closed());
    still_serving(&node);
}

#[test]
fn option_haggling_rules() {
    let node = node_with_vm1();
    let mut c = Raw::connect(&node);
    // Unknown option: ERR_UNSUP, and haggling goes on.
    c.send_option(77, b"whatever");
    assert_eq!(c.opt_replies().last().unwrap().0, rep::ERR_UNSUP);
    // Malformed GO body: ERR_INVALID.
    c.send_option(opt::GO, &[0, 0, 0, 200, b'x']);
    assert_eq!(c.opt_replies().last().unwrap().0, rep::ERR_INVALID);
    // Unknown export: ERR_UNKNOWN.
    c.send_option(
        opt::GO,
        &InfoRequest {
            name: "nope".into(),
            requests: vec![],
        }
        .encode(),
    );
    assert_eq!(c.opt_replies().last().unwrap().0, rep::ERR_UNKNOWN);
    // SET_META_CONTEXT before structured replies: ERR_INVALID.
    let q = proto::MetaContextQuery {
        export: "vm1".into(),
        queries: vec!["base:allocation".into()],
    };
    c.send_option(opt::SET_META_CONTEXT, &q.encode());
    assert_eq!(c.opt_replies().last().unwrap().0, rep::ERR_INVALID);
    // STARTTLS without TLS configured: refused, not fatal.
    c.send_option(opt::STARTTLS, &[]);
    assert!(rep::is_error(c.opt_replies().last().unwrap().0));
    // Oversized option data: ERR_TOO_BIG after skipping it.
    c.send_option(opt::GO, &vec![0u8; 100 << 10]);
    assert_eq!(c.opt_replies().last().unwrap().0, rep::ERR_TOO_BIG);
    // Then a normal attach with EXPORT_NAME (reply without the 124 zeroes).
    c.send_option(opt::EXPORT_NAME, b"vm1");
    let mut r = [0u8; 10];
    c.s.read_exact(&mut r).unwrap();
    assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), 8 << 20);
    c.request(Command::Flush, 0, 1, 0, 0, &[]);
    assert_eq!(c.simple_reply(), (0, 1));
}

#[test]
fn hostile_handshakes_are_dropped() {
    let node = node_with_vm1();
    // Unknown client flags.
    let mut s = TcpStream::connect(&node.nbd).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&0xffff_0000u32.to_be_bytes()).unwrap();
    let mut c = Raw { s };
    assert!(c.closed());
    // An absurd option length.
    let mut c = Raw::connect(&node);
    let mut b = Vec::new();
    b.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt::GO.to_be_bytes());
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    c.s.write_all(&b).unwrap();
    assert!(c.closed());
    // EXPORT_NAME of an unknown export: the spec's only answer is to hang up.
    let mut c = Raw::connect(&node);
    c.send_option(opt::EXPORT_NAME, b"nope");
    assert!(c.closed());
    // Bad option magic.
    let mut c = Raw::connect(&node);
    c.s.write_all(&[0x55; 16]).unwrap();
    assert!(c.closed());
    // Truncated frames: half a request header, then hang up.
    let mut c = Raw::connect(&node);
    c.go("vm1", false);
    c.s.write_all(&[0x25, 0x60, 0x95, 0x13, 0, 0]).unwrap();
    drop(c);
    // Truncated write payload: the header promises 64 KiB, 100 bytes come.
    let mut c = Raw::connect(&node);
    c.go("vm1", false);
    let mut b = Vec::new();
    Request {
        flags: 0,
        command: Command::Write,
        cookie: 1,
        offset: 0,
        len: 65536,
    }
    .encode(&mut b);
    b.extend_from_slice(&[0xee; 100]);
    c.s.write_all(&b).unwrap();
    drop(c);
    // Truncated option data: the header promises 1 KiB, 10 bytes come.
    let mut c = Raw::connect(&node);
    let mut b = Vec::new();
    b.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt::GO.to_be_bytes());
    b.extend_from_slice(&1024u32.to_be_bytes());
    b.extend_from_slice(&[0; 10]);
    c.s.write_all(&b).unwrap();
    drop(c);
    still_serving(&node);
    // The truncated write changed nothing.
    let mut c = Raw::connect(&node);
    c.go("vm1", false);
    c.request(Command::Read, 0, 2, 0, 100, &[]);
    assert_eq!(c.simple_reply(), (0, 2));
    let mut data = [0u8; 100];
    c.s.read_exact(&mut data).unwrap();
    assert_eq!(data, [0u8; 100], "a truncated write reached the disk");
}

#[test]
fn thousand_connections_opened_and_dropped() {
    let node = node_with_vm1();
    for i in 0..1000 {
        let mut c = Raw::connect(&node);
        if i % 2 == 0 {
            c.go("vm1", false);
        }
    }
    still_serving(&node);
    std::thread::sleep(Duration::from_millis(500));
    let rss = node.rss();
    assert!(rss < 64 << 20, "RSS after 1000 connections is {rss} bytes");
}

#[test]
fn pipelined_requests_all_answered_with_their_cookies() {
    let node = node_with_vm1();
    let mut c = Raw::connect(&node);
    c.go("vm1", false);
    let mut batch = Vec::new();
    for i in 0..100u64 {
        Request {
            flags: 0,
            command: Command::Write,
            cookie: 1000 + i,
            offset: i * 4096,
            len: 4096,
        }
        .encode(&mut batch);
        batch.extend_from_slice(&[i as u8; 4096]);
    }
    c.s.write_all(&batch).unwrap();
    let mut seen: Vec<u64> = (0..100)
        .map(|_| {
            let (e, k) = c.simple_reply();
            assert_eq!(e, 0);
            k
        })
        .collect();
    seen.sort();
    assert_eq!(seen, (1000..1100).collect::<Vec<_>>());
}

/// 1,500 connections held open at once (half attached, half stuck in the
/// handshake) by a node started with a soft open-file limit of 1,024, the
/// usual default: the node raises its limit, keeps serving a new client,
/// and its memory stays bounded.
#[test]
fn fifteen_hundred_simultaneous_connections() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, mut hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if hard < 4096 {
        // Raising the hard limit needs root, which these tests have.
        setrlimit(Resource::RLIMIT_NOFILE, 4096, 4096).expect("raise the hard open-file limit");
        hard = 4096;
    }
    // The node inherits the low soft limit; this process needs more fds
    // than that for its own end of the connections.
    setrlimit(Resource::RLIMIT_NOFILE, 1024, hard).unwrap();
    let node = node_with_vm1();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    let mut held = Vec::new();
    for i in 0..1500 {
        let mut c = Raw::connect(&node);
        if i % 2 == 0 {
            c.go("vm1", false);
        }
        held.push(c);
    }
    still_serving(&node);
    let rss = node.rss();
    eprintln!("RSS with 1,500 connections open: {} MiB", rss >> 20);
    assert!(rss < 256 << 20, "RSS with 1,500 connections is {rss} bytes");
    drop(held);
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
}

/// A client that pipelines reads and never reads a reply (nor the error
/// replies to bad requests) cannot make the node buffer replies without
/// bound: replies count against the connection's in-flight budget until
/// they are on the wire. Everyone else keeps being served, and the data
/// the stuck client finally reads is right.
#[test]
fn a_client_that_never_reads_replies_holds_bounded_memory() {
    const MIB: usize = 1 << 20;
    let node = node_with_vm1();
    let mut w = Raw::connect(&node);
    w.go("vm1", false);
    w.request(Command::Write, 0, 1, 0, 8 * MIB as u32, &[0x5a; 8 * MIB]);
    assert_eq!(w.simple_reply(), (0, 1));
    drop(w);
    let base = node.rss();

    // 200 reads of 8 MiB (1.6 GiB of replies) and 20,000 refused requests,
    // in 6 MiB of requests; the client reads nothing back.
    let mut hog = Raw::connect(&node);
    hog.go("vm1", false);
    let mut burst = Vec::new();
    for i in 0..200u64 {
        Request {
            flags: 0,
            command: Command::Read,
            cookie: i,
            offset: 0,
            len: 8 * MIB as u32,
        }
        .encode(&mut burst);
        for j in 0..100u64 {
            Request {
                flags: 0,
                command: Command::Read,
                cookie: 1 << 32 | (i * 100 + j),
                offset: 1 << 40,
                len: 4096,
            }
            .encode(&mut burst);
        }
    }
    // The node stops reading once its budget is taken, so write from a
    // thread: this one would block.
    let mut tx = hog.s.try_clone().unwrap();
    let sender = std::thread::spawn(move || tx.write_all(&burst).is_ok());
    std::thread::sleep(Duration::from_secs(3));
    let rss = node.rss();
    println!(
        "RSS {} MiB before, {} MiB with 1.6 GiB of replies unread",
        base >> 20,
        rss >> 20
    );
    assert!(
        rss < base + (160 << 20),
        "RSS grew from {} MiB to {} MiB while a client ignored its replies",
        base >> 20,
        rss >> 20
    );
    still_serving(&node);

    // When the stuck client does read, every reply is there and right.
    let mut data = vec![0u8; 8 * MIB];
    let mut reads = 0;
    let mut refusals = 0;
    while reads + refusals < 200 * 101 {
        let (e, cookie) = hog.simple_reply();
        if cookie >> 32 == 1 {
            assert_eq!(e, errno::EINVAL, "read past the end");
            refusals += 1;
        } else {
            assert_eq!(e, 0);
            hog.s.read_exact(&mut data).unwrap();
            assert!(
                data.iter().all(|&b| b == 0x5a),
                "wrong data in reply {cookie}"
            );
            reads += 1;
        }
    }
    assert!(sender.join().unwrap(), "the node stopped reading requests");
}

/// With `--max-connections 20`, a 21st connection is closed at accept,
/// before any greeting; the 20 are served; a slot freed by a client that
/// leaves goes to the next one; the API is unaffected throughout.
#[test]
fn connections_past_the_cap_are_closed_at_accept() {
    let tmp = tempfile::tempdir().unwrap();
    let node = NodeProc::start_with(
        tmp.path(),
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--max-connections", "20"],
    );
    node.create("vm1", "8M");
    let mut held: Vec<Raw> = (0..20).map(|_| Raw::connect(&node)).collect();

    // Some(stream) if the node greeted a new connection, None if it closed it.
    let attempt = |node: &NodeProc| {
        let mut s = TcpStream::connect(&node.nbd).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut g = [0u8; 18];
        match s.read_exact(&mut g) {
            Ok(()) => Some(Raw { s }),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                None
            }
            Err(e) => panic!("neither greeted nor closed: {e}"),
        }
    };
    assert!(attempt(&node).is_none(), "a 21st connection was greeted");
    node.cli_ok(&["volume", "list"]);

    // The held connections are served.
    held[0].go("vm1", false);
    held[0].request(Command::Read, 0, 5, 0, 512, &[]);
    assert_eq!(held[0].simple_reply(), (0, 5));
    held[0].s.read_exact(&mut [0u8; 512]).unwrap();

    // One leaves; once the node has noticed, the next client gets in and
    // is served.
    drop(held.pop());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut next = loop {
        if let Some(c) = attempt(&node) {
            break c;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a freed slot was never reused"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    next.s.write_all(&3u32.to_be_bytes()).unwrap();
    next.go("vm1", false);
    next.request(Command::Read, 0, 6, 0, 512, &[]);
    assert_eq!(next.simple_reply(), (0, 6));
}
