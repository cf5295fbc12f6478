//! Who may talk to a node: TLS on NBD (STARTTLS, mutual certificates) with
//! real clients (qemu-io, qemu-img, nbdinfo, libnbd's Python bindings), TLS
//! between nodes during a migration, and an API that refuses strangers.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{make_tls_dir, require, run_ok, wait_until, NodeProc, DLSM};
use dlsm::api_client::{Api, ApiAuth};
use dlsm::nbd::proto::{self, opt, rep};

/// A node with `--tls-dir tls` (and extra serve flags); its CLI calls carry
/// the same directory and `client_extra`.
fn tls_node(tls: &Path, serve_extra: &[&str], client_extra: &[&str]) -> NodeProc {
    let tmp = tempfile::tempdir().unwrap().keep();
    let t = tls.to_str().unwrap();
    let mut extra = vec!["--tls-dir", t];
    extra.extend_from_slice(serve_extra);
    let mut client = vec!["--tls-dir", t];
    client.extend_from_slice(client_extra);
    NodeProc::start_with(&tmp, "127.0.0.1:0", "127.0.0.1:0", &extra).with_client_flags(&client)
}

/// `--image-opts` for qemu-io/qemu-img reaching `vol` over TLS.
fn qemu_tls_args(node: &NodeProc, vol: &str, tls: &Path) -> Vec<String> {
    let (host, port) = node.nbd.rsplit_once(':').unwrap();
    vec![
        "--object".into(),
        format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            tls.display()
        ),
        "--image-opts".into(),
        format!("driver=nbd,host={host},port={port},export={vol},tls-creds=tls0"),
    ]
}

fn qemu_io(node: &NodeProc, vol: &str, tls: &Path, cmd: &str) -> std::process::Output {
    Command::new(require("qemu-io"))
        .args(qemu_tls_args(node, vol, tls))
        .args(["-c", cmd])
        .output()
        .unwrap()
}

fn nbdinfo(uri: &str) -> std::process::Output {
    Command::new(require("nbdinfo")).arg(uri).output().unwrap()
}

/// Greets a node on a raw socket and returns the stream after the flags.
fn raw(node: &NodeProc) -> TcpStream {
    let mut s = TcpStream::connect(&node.nbd).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s
}

fn raw_option(s: &mut TcpStream, code: u32, data: &[u8]) -> u32 {
    let mut b = Vec::new();
    proto::encode_option(&mut b, code, data);
    s.write_all(&b).unwrap();
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    let h = proto::parse_opt_reply_header(&h).unwrap();
    let mut d = vec![0u8; h.len as usize];
    s.read_exact(&mut d).unwrap();
    h.reply_type
}

/// Whether the server closes the connection (reading whatever it sends
/// first, such as a TLS alert).
fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 4096];
    for _ in 0..16 {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return e.kind() != std::io::ErrorKind::WouldBlock,
        }
    }
    false
}

#[test]
fn nbd_requires_tls_and_a_trusted_client_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let tls = tmp.path().join("tls");
    make_tls_dir(&tls, &["127.0.0.1", "localhost"]);
    let node = tls_node(&tls, &[], &[]);
    node.create("vm1", "64M");

    // Real clients over TLS: qemu-io writes, nbdinfo and libnbd read.
    let o = qemu_io(&node, "vm1", &tls, "write -P 0x5a 1M 1M");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let good = format!("nbds://{}/vm1?tls-certificates={}", node.nbd, tls.display());
    let o = nbdinfo(&good);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("with TLS"), "{out}");
    assert!(out.contains("export-size: 67108864"), "{out}");
    let o = qemu_io(&node, "vm1", &tls, "read -P 0x5a 1M 1M");
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("read 1048576"));
    let o = Command::new(require("qemu-img"))
        .arg("info")
        .args(qemu_tls_args(&node, "vm1", &tls))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("67108864 bytes"), "{out}");
    let py = r#"
import nbd, sys
h = nbd.NBD()
h.set_tls(nbd.TLS_REQUIRE)
h.set_uri_allow_local_file(True)
h.connect_uri(sys.argv[1])
assert h.get_tls_negotiated(), "TLS was not negotiated"
buf = h.pread(1 << 20, 1 << 20)
assert buf == b"\x5a" * (1 << 20), "wrong data over TLS"
h.pwrite(b"\xa5" * 4096, 0)
h.flush()
print("ok")
"#;
    let out = run_ok(Command::new("/usr/bin/python3").args(["-c", py, &good]));
    assert_eq!(out.trim(), "ok");
    let o = qemu_io(&node, "vm1", &tls, "read -P 0xa5 0 4k");
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("read 4096"));

    // `volume create --from` uploads over TLS too.
    let img = tmp.path().join("img.raw");
    std::fs::write(&img, vec![0x3c; 1 << 20]).unwrap();
    node.cli_ok(&["volume", "create", "vm2", "--from", img.to_str().unwrap()]);
    let o = qemu_io(&node, "vm2", &tls, "read -P 0x3c 0 1M");
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("read 1048576"));

    // The UNIX socket requires TLS too.
    let unix_good = format!(
        "nbds+unix:///vm1?socket={}&tls-certificates={}",
        node.unix.display(),
        tls.display()
    );
    let o = nbdinfo(&unix_good);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!nbdinfo(&node.unix_uri("vm1")).status.success());

    // Plain clients are refused.
    let o = nbdinfo(&node.uri("vm1"));
    assert!(!o.status.success(), "plain nbdinfo got in");
    let o = Command::new(require("qemu-img"))
        .args(["info", &node.uri("vm1")])
        .output()
        .unwrap();
    assert!(!o.status.success(), "plain qemu-img got in");

    // ... with the spec's reply: everything but STARTTLS/ABORT gets
    // ERR_TLS_REQD; EXPORT_NAME (which cannot be refused) is hung up on.
    let mut s = raw(&node);
    let go = proto::InfoRequest {
        name: "vm1".into(),
        requests: vec![],
    };
    assert_eq!(raw_option(&mut s, opt::GO, &go.encode()), rep::ERR_TLS_REQD);
    assert_eq!(raw_option(&mut s, opt::LIST, &[]), rep::ERR_TLS_REQD);
    assert_eq!(
        raw_option(&mut s, opt::STRUCTURED_REPLY, &[]),
        rep::ERR_TLS_REQD
    );
    assert_eq!(raw_option(&mut s, opt::STARTTLS, b"x"), rep::ERR_INVALID);
    let mut b = Vec::new();
    proto::encode_option(&mut b, opt::EXPORT_NAME, b"vm1");
    s.write_all(&b).unwrap();
    assert!(closed(&mut s), "EXPORT_NAME before TLS was not hung up on");
    // STARTTLS followed by garbage instead of a ClientHello: dropped.
    let mut s = raw(&node);
    assert_eq!(raw_option(&mut s, opt::STARTTLS, &[]), rep::ACK);
    s.write_all(&[0x47; 512]).unwrap();
    assert!(closed(&mut s), "garbage TLS handshake was not dropped");

    // A client whose certificate another CA signed is refused; so is a
    // client with no certificate at all.
    let rogue = tmp.path().join("rogue");
    make_tls_dir(&rogue, &["127.0.0.1", "localhost"]);
    let mixed = tmp.path().join("mixed");
    std::fs::create_dir(&mixed).unwrap();
    std::fs::copy(tls.join("ca-cert.pem"), mixed.join("ca-cert.pem")).unwrap();
    for f in ["client-cert.pem", "client-key.pem"] {
        std::fs::copy(rogue.join(f), mixed.join(f)).unwrap();
    }
    let nocert = tmp.path().join("nocert");
    std::fs::create_dir(&nocert).unwrap();
    std::fs::copy(tls.join("ca-cert.pem"), nocert.join("ca-cert.pem")).unwrap();
    for dir in [&mixed, &nocert] {
        let uri = format!("nbds://{}/vm1?tls-certificates={}", node.nbd, dir.display());
        let o = nbdinfo(&uri);
        assert!(!o.status.success(), "client with {dir:?} got in");
    }
    // ... and a client that does not trust the node's CA does not talk to it.
    let o = qemu_io(&node, "vm1", &rogue, "read 0 4k");
    assert!(!o.status.success(), "client trusted a foreign server");

    // After all that, the node still serves the trusted client.
    assert!(nbdinfo(&good).status.success());
}

#[test]
fn migration_between_tls_nodes_with_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let tls = tmp.path().join("tls");
    make_tls_dir(&tls, &["127.0.0.1", "localhost"]);
    let token = tmp.path().join("token");
    std::fs::write(&token, "s3cret-cluster-token-0123456789\n").unwrap();
    let t = token.to_str().unwrap();
    let a = tls_node(&tls, &["--api-token-file", t], &["--api-token-file", t]);
    let b = tls_node(&tls, &["--api-token-file", t], &["--api-token-file", t]);
    a.create("vm1", "32M");
    let o = qemu_io(&a, "vm1", &tls, "write -P 0x77 0 8M");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value =
        serde_json::from_str(&a.cli_ok(&["migrate", "vm1", "--to", &b.api, "--json"])).unwrap();
    assert_eq!(v["role"], "source");
    // The destination's fetches from A are NBD over TLS (A refuses anything
    // else) and its fence/release calls carry the token over HTTPS.
    b.cli_ok(&["migration", "handoff", "vm1"]);
    b.wait_phase("vm1", "complete", 60);
    let o = qemu_io(&b, "vm1", &tls, "read -P 0x77 0 8M");
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("read 8388608"));
    let o = qemu_io(&b, "vm1", &tls, "read -P 0 8M 24M");
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("read 25165824"));
    wait_until("source never released vm1", 30, || !a.has_volume("vm1"));
    let list = b.cli_ok(&["volume", "list"]);
    assert!(list.contains("nbds://"), "URI should say nbds: {list}");
}

#[test]
fn api_refuses_strangers() {
    let tmp = tempfile::tempdir().unwrap();
    let tls = tmp.path().join("tls");
    make_tls_dir(&tls, &["127.0.0.1", "localhost"]);

    // No TLS, not loopback: the node refuses to start.
    let o = Command::new(DLSM)
        .args(["serve", "--data-dir"])
        .arg(tmp.path().join("d0"))
        .args(["--listen", "127.0.0.1:0", "--api", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("not loopback") && err.contains("--tls-dir"),
        "{err}"
    );

    // A bad token file is refused too.
    let weak = tmp.path().join("weak");
    std::fs::write(&weak, "short").unwrap();
    let o = Command::new(DLSM)
        .args(["serve", "--data-dir"])
        .arg(tmp.path().join("d1"))
        .arg("--api-token-file")
        .arg(&weak)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("at least 16"));

    // With TLS and a token, the API may listen on every interface.
    let token = tmp.path().join("token");
    std::fs::write(&token, "another-s3cret-token-abcdefgh").unwrap();
    let t = token.to_str().unwrap();
    let dir = tmp.path().join("d2");
    let ts = tls.to_str().unwrap();
    let mut node = NodeProc::start_with(
        &dir,
        "127.0.0.1:0",
        "0.0.0.0:0",
        &["--tls-dir", ts, "--api-token-file", t],
    );
    // The certificate names 127.0.0.1, so reach the wildcard listener there.
    node.api = node.api.replace("0.0.0.0", "127.0.0.1");
    let run = |flags: &[&str]| {
        Command::new(DLSM)
            .arg("--api")
            .arg(&node.api)
            .args(flags)
            .args(["volume", "list"])
            .output()
            .unwrap()
    };
    let refused = |flags: &[&str], why: &str| {
        let o = run(flags);
        assert!(!o.status.success(), "{flags:?} got in");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(why), "{flags:?}: {err}");
    };
    // Plain HTTP: no TLS handshake, so no answer (and a hint).
    refused(&["--api-token-file", t], "--tls-dir");
    // TLS but no token, and a wrong token.
    refused(&["--tls-dir", ts], "HTTP 401");
    let wrong = tmp.path().join("wrong");
    std::fs::write(&wrong, "not-the-right-token-at-all").unwrap();
    refused(
        &["--tls-dir", ts, "--api-token-file", wrong.to_str().unwrap()],
        "HTTP 401",
    );
    // A certificate from another CA: the handshake fails.
    let rogue = tmp.path().join("rogue");
    make_tls_dir(&rogue, &["127.0.0.1"]);
    let mixed = tmp.path().join("mixed");
    std::fs::create_dir(&mixed).unwrap();
    std::fs::copy(tls.join("ca-cert.pem"), mixed.join("ca-cert.pem")).unwrap();
    for f in ["client-cert.pem", "client-key.pem"] {
        std::fs::copy(rogue.join(f), mixed.join(f)).unwrap();
    }
    refused(
        &["--tls-dir", mixed.to_str().unwrap(), "--api-token-file", t],
        "cannot reach",
    );
    // The right credentials work.
    let o = run(&["--tls-dir", ts, "--api-token-file", t]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Bodies are validated: too large, malformed, wrong shape, bad values.
    let auth = ApiAuth {
        tls: Some(dlsm::tls::TlsConfig::load_client(&tls).unwrap().client),
        token: Some(std::fs::read_to_string(&token).unwrap()),
    };
    let api = Api::with_auth(&node.api, &auth);
    let huge = serde_json::json!({"name": "x".repeat(100_000), "size": 1});
    let e = api
        .post::<serde_json::Value>("/v1/volumes", &huge)
        .unwrap_err();
    assert!(e.to_string().contains("HTTP 413"), "{e}");
    let e = api
        .post::<serde_json::Value>("/v1/volumes", &serde_json::json!({"name": 7}))
        .unwrap_err();
    assert!(e.to_string().contains("HTTP 422"), "{e}");
    let e = api
        .post::<serde_json::Value>(
            "/v1/volumes",
            &serde_json::json!({"name": "../etc", "size": 4096}),
        )
        .unwrap_err();
    assert!(e.to_string().contains("HTTP 400"), "{e}");
    let e = api
        .post::<serde_json::Value>(
            "/v1/migrations",
            &serde_json::json!({"name": "v", "id": "0123456789abcdef", "size": 4096, "origin_nbd": "nowhere",
                "origin_api": "127.0.0.1:1", "region_size": 3, "rate": 0}),
        )
        .unwrap_err();
    assert!(e.to_string().contains("HTTP 400"), "{e}");
    // The node is fine after all of it.
    let v: serde_json::Value = api.get("/v1/node").unwrap();
    assert!(v.is_object());
    assert!(node.stop(), "node did not stop cleanly");
}

#[test]
fn nodes_with_different_tokens_cannot_migrate_to_each_other() {
    let tmp = tempfile::tempdir().unwrap();
    let tls = tmp.path().join("tls");
    make_tls_dir(&tls, &["127.0.0.1", "localhost"]);
    let (t1, t2) = (tmp.path().join("t1"), tmp.path().join("t2"));
    std::fs::write(&t1, "token-of-cluster-one-0000").unwrap();
    std::fs::write(&t2, "token-of-cluster-two-1111").unwrap();
    let (t1, t2) = (t1.to_str().unwrap(), t2.to_str().unwrap());
    let a = tls_node(&tls, &["--api-token-file", t1], &["--api-token-file", t1]);
    let b = tls_node(&tls, &["--api-token-file", t2], &["--api-token-file", t2]);
    a.create("vm1", "16M");
    let o = a.cli(&["migrate", "vm1", "--to", &b.api]);
    assert!(
        !o.status.success(),
        "migration to a foreign node went ahead"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("401"), "{err}");
    assert!(!b.has_volume("vm1"));
    // The volume stays A's, writable, not migrating.
    let o = qemu_io(&a, "vm1", &tls, "write -P 1 0 64k");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = a.cli(&["migration", "status", "vm1"]);
    assert!(!o.status.success());
}

/// Inside TLS the option rules still hold: a second STARTTLS is refused
/// with ERR_INVALID, and state from before the upgrade is forgotten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_twice_is_refused_inside_tls() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tmp = tempfile::tempdir().unwrap();
    let tls = tmp.path().join("tls");
    make_tls_dir(&tls, &["127.0.0.1", "localhost"]);
    let node = tls_node(&tls, &[], &[]);
    node.create("vm1", "8M");
    let cfg = dlsm::tls::TlsConfig::load_client(&tls).unwrap();

    async fn option<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
        s: &mut S,
        code: u32,
        data: &[u8],
    ) -> Vec<u32> {
        let mut b = Vec::new();
        proto::encode_option(&mut b, code, data);
        s.write_all(&b).await.unwrap();
        let mut types = Vec::new();
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).await.unwrap();
            let h = proto::parse_opt_reply_header(&h).unwrap();
            let mut d = vec![0u8; h.len as usize];
            s.read_exact(&mut d).await.unwrap();
            types.push(h.reply_type);
            if h.reply_type == rep::ACK || rep::is_error(h.reply_type) {
                return types;
            }
        }
    }

    let mut s = tokio::net::TcpStream::connect(&node.nbd).await.unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).await.unwrap();
    s.write_all(&3u32.to_be_bytes()).await.unwrap();
    assert_eq!(option(&mut s, opt::STARTTLS, &[]).await, vec![rep::ACK]);
    let name = dlsm::tls::server_name(&node.nbd).unwrap();
    let mut t = cfg.connector().connect(name, s).await.unwrap();
    assert_eq!(
        option(&mut t, opt::STARTTLS, &[]).await,
        vec![rep::ERR_INVALID]
    );
    assert_eq!(option(&mut t, opt::LIST, &[]).await.last(), Some(&rep::ACK));
    let go = proto::InfoRequest {
        name: "vm1".into(),
        requests: vec![],
    };
    let replies = option(&mut t, opt::GO, &go.encode()).await;
    assert_eq!(replies.last(), Some(&rep::ACK), "{replies:?}");
    // Transmission works over TLS: a read of 512 bytes.
    let mut b = Vec::new();
    proto::Request {
        flags: 0,
        command: proto::Command::Read,
        cookie: 7,
        offset: 0,
        len: 512,
    }
    .encode(&mut b);
    t.write_all(&b).await.unwrap();
    let mut reply = [0u8; 16 + 512];
    t.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply[4..8], &0u32.to_be_bytes(), "read over TLS failed");
    assert_eq!(&reply[8..16], &7u64.to_be_bytes());
}

/// A flood of API connections that send nothing, or half a request, holds
/// at most 256 slots for at most the 10 s header timeout: NBD clients are
/// never affected, and the API answers again once the flood is shed.
#[test]
fn api_connection_flood_is_bounded() {
    let node = NodeProc::start();
    node.create("vm1", "8M");
    let mut flood = Vec::new();
    for i in 0..300 {
        let mut s = TcpStream::connect(&node.api).unwrap();
        if i % 2 == 1 {
            s.write_all(b"GET /v1/node HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
        }
        flood.push(s);
    }
    // The data path does not notice.
    let o = nbdinfo(&node.uri("vm1"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Every flood connection is closed by the node within the timeout
    // (those over the cap at once).
    let t = Instant::now();
    for s in &mut flood {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        assert!(closed(s), "an idle API connection was kept open");
    }
    let shed = t.elapsed();
    assert!(shed < Duration::from_secs(15), "flood shed after {shed:?}");
    node.cli_ok(&["volume", "list"]);
    assert!(node.rss() < 64 << 20, "RSS {}", node.rss());
}

/// Clients that connect and stall — silent after the greeting, half-way
/// through a TLS handshake, or dribbling a byte at a time so no single read
/// ever waits long — are all dropped when `--handshake-timeout` runs out:
/// one deadline covers the whole handshake. Meanwhile real clients get in,
/// and a client that got through is never timed out, however long it idles.
#[test]
fn stalled_handshakes_are_dropped_and_attached_clients_are_not() {
    let tmp = tempfile::tempdir().unwrap();
    let tls = tmp.path().join("tls");
    make_tls_dir(&tls, &["127.0.0.1", "localhost"]);
    let node = tls_node(&tls, &["--handshake-timeout", "2"], &[]);
    node.create("vm1", "8M");
    let start = Instant::now();

    let mut silent = TcpStream::connect(&node.nbd).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    silent.read_exact(&mut [0u8; 18]).unwrap();

    let mut half_tls = raw(&node);
    assert_eq!(raw_option(&mut half_tls, opt::STARTTLS, &[]), rep::ACK);
    // A TLS record header that promises 255 bytes of ClientHello, and 1 byte.
    half_tls
        .write_all(&[0x16, 0x03, 0x01, 0x00, 0xff, 0x01])
        .unwrap();

    // A LIST option, one byte every 300 ms (16 bytes: 4.8 s in all).
    let mut dribble = raw(&node);
    let mut list = Vec::new();
    proto::encode_option(&mut list, opt::LIST, &[]);
    let mut writer = dribble.try_clone().unwrap();
    let dribbler = std::thread::spawn(move || {
        for b in list {
            if writer.write_all(&[b]).is_err() {
                return true; // the node hung up
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        false
    });

    // Real clients are not held up by the stalled ones.
    let good = format!("nbds://{}/vm1?tls-certificates={}", node.nbd, tls.display());
    let o = nbdinfo(&good);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    for (what, s) in [
        ("silent", &mut silent),
        ("half a TLS handshake", &mut half_tls),
        ("dribbling", &mut dribble),
    ] {
        assert!(closed(s), "{what} client was kept");
        let t = start.elapsed();
        assert!(
            t >= Duration::from_millis(1500) && t < Duration::from_secs(8),
            "{what} client dropped after {t:?}, not at the 2 s handshake timeout"
        );
    }
    // Its remaining bytes (16 take 4.8 s; the deadline came at 2 s) were
    // refused: the node had hung up.
    assert!(
        dribbler.join().unwrap(),
        "the node never hung up on the dribbler"
    );

    // Attached clients idle past the timeout and keep working.
    let o = Command::new(require("qemu-io"))
        .args(qemu_tls_args(&node, "vm1", &tls))
        .args(["-c", "write -P 0x33 0 4k", "-c", "sleep 3000"])
        .args(["-c", "read -P 0x33 0 4k"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && !text.contains("fail") && text.contains("read 4096/4096"),
        "an attached client was timed out: {text}"
    );
}

/// The same flood against an HTTPS API, stalled inside the TLS handshake:
/// at most 256 handshakes are held (the rest are closed at once), each for
/// at most the 10 s handshake timeout; NBD over TLS is unaffected and the
/// API answers again once the flood is shed.
#[test]
fn api_tls_handshake_flood_is_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let tls = tmp.path().join("tls");
    make_tls_dir(&tls, &["127.0.0.1", "localhost"]);
    let node = tls_node(&tls, &[], &[]);
    node.create("vm1", "8M");
    let mut flood = Vec::new();
    for i in 0..300 {
        let mut s = TcpStream::connect(&node.api).unwrap();
        if i % 2 == 1 {
            // A TLS record header promising a 255-byte ClientHello, and 1 byte.
            s.write_all(&[0x16, 0x03, 0x01, 0x00, 0xff, 0x01]).unwrap();
        }
        flood.push(s);
    }
    // How many the node has closed so far (a busy machine may take a moment
    // to accept them all; the handshake timeout is 10 s away).
    let count_shut = |flood: &mut Vec<TcpStream>| {
        flood
            .iter_mut()
            .map(|s| {
                s.set_nonblocking(true).unwrap();
                let r = s.read(&mut [0u8; 64]);
                s.set_nonblocking(false).unwrap();
                !matches!(r, Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock)
            })
            .filter(|&shut| shut)
            .count()
    };
    let t = Instant::now();
    let mut shut_at_once = count_shut(&mut flood);
    while shut_at_once < 44 && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(200));
        shut_at_once = count_shut(&mut flood);
    }
    assert_eq!(
        shut_at_once, 44,
        "connections past the 256 handshakes in progress should be closed at once"
    );
    let good = format!("nbds://{}/vm1?tls-certificates={}", node.nbd, tls.display());
    let o = nbdinfo(&good);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t = Instant::now();
    for s in &mut flood {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        assert!(closed(s), "a stalled API handshake was kept open");
    }
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "shed after {:?}",
        t.elapsed()
    );
    node.cli_ok(&["volume", "list"]);
}

/// With `ca-crl.pem` in the TLS directory (the optional CRL QEMU and libnbd
/// read from the same layout), a revoked client certificate gets into
/// neither NBD nor the API; a client holding a CRL that revokes the node's
/// certificate refuses the node; everyone else is unaffected.
#[test]
fn revoked_certificates_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let tls = tmp.path().join("tls");
    require("openssl");
    run_ok(
        Command::new("bash")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/tls/make-certs.sh"
            ))
            .arg(&tls)
            .args(["127.0.0.1", "localhost"])
            .env("EXTRA_CLIENTS", "stolen"),
    );
    let revoke = |dir: &Path, cert: &str| {
        run_ok(
            Command::new("bash")
                .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tls/revoke.sh"))
                .arg(dir)
                .arg(cert),
        );
    };
    // A client directory for the stolen identity, made before the CRL.
    let stolen = tmp.path().join("stolen");
    std::fs::create_dir(&stolen).unwrap();
    for (from, to) in [
        ("ca-cert.pem", "ca-cert.pem"),
        ("stolen-cert.pem", "client-cert.pem"),
        ("stolen-key.pem", "client-key.pem"),
    ] {
        std::fs::copy(tls.join(from), stolen.join(to)).unwrap();
    }
    // Before revocation the stolen identity works (so the refusals below
    // are the CRL's doing).
    let uri = |node: &NodeProc, dir: &Path| {
        format!("nbds://{}/vm1?tls-certificates={}", node.nbd, dir.display())
    };
    // A long handshake deadline: the connection opened below stays
    // mid-handshake while the test runs.
    let node = tls_node(&tls, &["--handshake-timeout", "120"], &[]);
    node.create("vm1", "8M");
    assert!(nbdinfo(&uri(&node, &stolen)).status.success());
    let list = |node: &NodeProc, dir: &Path| {
        Command::new(DLSM)
            .args(["--api", &node.api, "--tls-dir"])
            .arg(dir)
            .args(["volume", "list"])
            .output()
            .unwrap()
    };
    assert!(list(&node, &stolen).status.success());
    // A connection opened before the revocation (SIGHUP must not drop it).
    let mut attached = raw(&node);
    assert_eq!(raw_option(&mut attached, opt::STARTTLS, &[]), rep::ACK);

    // Revoke, and tell the running node with SIGHUP: no restart, no
    // connection dropped.
    revoke(&tls, "stolen-cert.pem");
    let hup = |node: &NodeProc| {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(node.pid()),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap()
    };
    hup(&node);
    wait_until(
        "a revoked client still gets in over NBD after SIGHUP",
        10,
        || !(nbdinfo(&uri(&node, &stolen)).status.success()),
    );
    // NBD and API: refused to the stolen identity, served to the real client.
    let o = nbdinfo(&uri(&node, &tls));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        !list(&node, &stolen).status.success(),
        "a revoked client got into the API"
    );
    assert!(list(&node, &tls).status.success());
    // The connection from before is still there (it was never dropped).
    attached.set_nonblocking(true).unwrap();
    assert!(
        matches!(attached.read(&mut [0u8; 1]), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "SIGHUP dropped an established connection"
    );

    // A broken CRL on reload: the node says so, keeps what it had, and
    // keeps serving.
    let crl = std::fs::read(tls.join("ca-crl.pem")).unwrap();
    std::fs::write(
        tls.join("ca-crl.pem"),
        "-----BEGIN X509 CRL-----\nbm90IGEgQ1JM\n-----END X509 CRL-----\n",
    )
    .unwrap();
    hup(&node);
    std::thread::sleep(Duration::from_millis(500));
    // (Clients read the directory's CRL too, so they use one without it.)
    let good = tmp.path().join("good");
    std::fs::create_dir(&good).unwrap();
    for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
        std::fs::copy(tls.join(f), good.join(f)).unwrap();
    }
    assert!(!nbdinfo(&uri(&node, &stolen)).status.success());
    let o = nbdinfo(&uri(&node, &good));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(list(&node, &good).status.success());
    std::fs::write(tls.join("ca-crl.pem"), crl).unwrap();

    // A node started with the CRL enforces it from the start.
    let fresh = tls_node(&tls, &[], &[]);
    fresh.create("vm1", "8M");
    assert!(!nbdinfo(&uri(&fresh, &stolen)).status.success());
    assert!(nbdinfo(&uri(&fresh, &tls)).status.success());
    let list = |dir: &Path| list(&node, dir);

    // The other way round: a client whose CRL revokes the node's
    // certificate will not talk to the node.
    let wary = tmp.path().join("wary");
    std::fs::create_dir(&wary).unwrap();
    for f in [
        "ca-cert.pem",
        "ca-key.pem",
        "client-cert.pem",
        "client-key.pem",
        "server-cert.pem",
    ] {
        std::fs::copy(tls.join(f), wary.join(f)).unwrap();
    }
    revoke(&wary, "server-cert.pem");
    // A client's directory holds no CA key or server certificate.
    std::fs::remove_file(wary.join("ca-key.pem")).unwrap();
    std::fs::remove_file(wary.join("server-cert.pem")).unwrap();
    let o = list(&wary);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a client talked to a revoked node");
    assert!(err.to_lowercase().contains("revoked"), "{err}");
    println!("a client refusing a revoked node says: {}", err.trim());
}
