//! Node lifecycle and the CLI: clean shutdown, restart, volume commands and
//! their errors, upload from a file, idle memory.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;

use common::{pattern, require, run_ok, NodeProc, DLSM};

#[test]
fn sigterm_flushes_and_restart_finds_every_volume() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let mut node = NodeProc::start_in(dir.path());
    node.create("vm1", "16M");
    node.create("vm2", "1G");
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x42 1M 1M",
        &node.uri("vm1"),
    ]));
    // A client still attached must not keep the node from stopping.
    let idle = TcpStream::connect(&node.nbd).unwrap();
    assert!(node.stop(), "node did not exit cleanly on SIGTERM");
    drop(idle);
    let node = NodeProc::start_in(dir.path());
    let list: serde_json::Value =
        serde_json::from_str(&node.cli_ok(&["volume", "list", "--json"])).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["vm1", "vm2"]);
    assert_eq!(list[1]["size"].as_u64(), Some(1 << 30));
    let out = run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read -P 0x42 1M 1M",
        &node.uri("vm1"),
    ]));
    assert!(!out.contains("verification failed"), "{out}");
}

#[test]
fn volume_commands_and_their_errors() {
    let node = NodeProc::start();
    let out = node.cli_ok(&["volume", "create", "vm1", "--size", "512M", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["size"].as_u64(), Some(512 << 20));
    assert_eq!(v["uri"].as_str().unwrap(), node.uri("vm1"));
    assert_eq!(v["table"]["kind"].as_str(), Some("local"));
    let table = node.cli_ok(&["volume", "list"]);
    assert!(
        table.contains("vm1") && table.contains("512.0 MiB"),
        "{table}"
    );
    assert!(node.cli_ok(&["volume", "show", "vm1"]).contains("vm1"));

    let err = |args: &[&str]| {
        let o = node.cli(args);
        assert!(!o.status.success(), "{args:?} succeeded");
        let e = String::from_utf8(o.stderr).unwrap();
        assert_eq!(e.lines().count(), 1, "error is not one line: {e:?}");
        e
    };
    assert!(err(&["volume", "create", "vm1", "--size", "1G"]).contains("already exists (HTTP 409)"));
    assert!(err(&["volume", "create", "bad/name", "--size", "1G"]).contains("invalid volume name"));
    assert!(err(&["volume", "create", "vm2", "--size", "1000"]).contains("multiple of 512"));
    assert!(err(&["volume", "show", "nope"]).contains("no volume named \"nope\" (HTTP 404)"));
    assert!(err(&["volume", "rm", "nope"]).contains("HTTP 404"));
    // 16 TiB is more than ext4 holds in one file: the caller's mistake
    // (HTTP 400, saying why), not a storage fault. Elsewhere it fits.
    let fs = nix::sys::statfs::statfs(&node.data_dir)
        .unwrap()
        .filesystem_type();
    if fs == nix::sys::statfs::EXT4_SUPER_MAGIC {
        let e = err(&["volume", "create", "huge", "--size", "16T"]);
        assert!(
            e.contains("larger than the data directory's filesystem allows")
                && e.contains("HTTP 400"),
            "{e}"
        );
    } else {
        node.cli_ok(&["volume", "create", "huge", "--size", "16T"]);
        node.cli_ok(&["volume", "rm", "huge"]);
    }
    let o = node.cli(&["volume", "create", "vm2", "--size", "10X"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown size suffix"));

    // Busy volumes are not removed.
    let mut c = TcpStream::connect(&node.nbd).unwrap();
    let mut g = [0u8; 18];
    c.read_exact(&mut g).unwrap();
    c.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = Vec::new();
    dlsm::nbd::proto::encode_option(&mut opt, dlsm::nbd::proto::opt::EXPORT_NAME, b"vm1");
    c.write_all(&opt).unwrap();
    let mut r = [0u8; 10];
    c.read_exact(&mut r).unwrap();
    assert!(err(&["volume", "rm", "vm1"]).contains("in use by 1 NBD connection"));
    drop(c);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(node
        .cli_ok(&["volume", "rm", "vm1"])
        .contains("removed vm1"));
    assert_eq!(node.cli_ok(&["volume", "list", "--json"]).trim(), "[]");

    // No node there: a clear error.
    let o = Command::new(DLSM)
        .args(["--api", "127.0.0.1:1", "volume", "list"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("no dlsm node listening at 127.0.0.1:1"), "{e}");
    // DLSM_API is honoured.
    let o = Command::new(DLSM)
        .env("DLSM_API", &node.api)
        .args(["volume", "list", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success());
}

#[test]
fn create_from_file_uploads_it() {
    require("qemu-img");
    let node = NodeProc::start();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("img.raw");
    let mut img = vec![0u8; (5 << 20) + 1000];
    img[..1 << 20].copy_from_slice(&pattern(1 << 20, 3));
    let tail = img.len() - 500;
    img[tail..].copy_from_slice(&pattern(500, 4));
    std::fs::write(&src, &img).unwrap();
    node.cli_ok(&["volume", "create", "img", "--from", src.to_str().unwrap()]);
    let v: serde_json::Value =
        serde_json::from_str(&node.cli_ok(&["volume", "show", "img", "--json"])).unwrap();
    let size = v["size"].as_u64().unwrap();
    assert_eq!(size, (img.len() as u64).div_ceil(512) * 512);
    img.resize(size as usize, 0);
    std::fs::write(&src, &img).unwrap();
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(node.uri("img")),
    );
    // Zero megabytes were not uploaded.
    assert!(v["allocated_bytes"].as_u64().unwrap() < 2 << 20, "{v}");
    let o = node.cli(&[
        "volume",
        "create",
        "small",
        "--size",
        "1M",
        "--from",
        src.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
}

#[test]
fn idle_node_memory_stays_small() {
    let node = NodeProc::start();
    for i in 0..100 {
        let v: serde_json::Value = serde_json::from_str(&node.cli_ok(&[
            "volume",
            "create",
            &format!("vol{i}"),
            "--size",
            "1G",
            "--json",
        ]))
        .unwrap();
        assert_eq!(v["size"].as_u64(), Some(1 << 30));
    }
    let mut conns = Vec::new();
    for i in 0..64 {
        let mut c = TcpStream::connect(&node.nbd).unwrap();
        let mut g = [0u8; 18];
        c.read_exact(&mut g).unwrap();
        c.write_all(&3u32.to_be_bytes()).unwrap();
        let mut opt = Vec::new();
        dlsm::nbd::proto::encode_option(
            &mut opt,
            dlsm::nbd::proto::opt::EXPORT_NAME,
            format!("vol{i}").as_bytes(),
        );
        c.write_all(&opt).unwrap();
        let mut r = [0u8; 10];
        c.read_exact(&mut r).unwrap();
        conns.push(c);
    }
    let v: serde_json::Value =
        serde_json::from_str(&node.cli_ok(&["volume", "show", "vol3", "--json"])).unwrap();
    assert_eq!(v["connections"].as_u64(), Some(1));
    let rss = node.rss();
    eprintln!(
        "RSS with 100 volumes and 64 idle connections: {} KiB",
        rss >> 10
    );
    assert!(rss < 64 << 20, "RSS {rss} bytes exceeds 64 MiB");
}

/// A full disk under a volume: writes fail with ENOSPC, nothing else is
/// harmed, and writes work again once space returns. Needs root (mounts a
/// 4 MiB tmpfs as the data directory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_gives_enospc_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(tmp.path())
        .status()
        .unwrap();
    assert!(st.success(), "mounting a tmpfs needs root");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _u = Unmount(tmp.path().to_owned());
    let mut node = NodeProc::start_in(tmp.path());
    node.create("vm1", "64M"); // sparse: fits
    let c = dlsm::nbd::client::NbdClient::connect(
        &dlsm::nbd::client::NbdAddr::Tcp(node.nbd.clone()),
        "vm1",
    )
    .await
    .unwrap();
    let mut written = Vec::new();
    let mut enospc = false;
    for i in 0..64u64 {
        let data = pattern(1 << 20, i);
        match c.write(i << 20, &data, false).await {
            Ok(()) => written.push((i << 20, data)),
            Err(dlsm::nbd::client::ClientError::Server { errno, .. }) => {
                assert_eq!(errno, 28, "a full disk must give ENOSPC");
                enospc = true;
                break;
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert!(enospc, "the 4 MiB disk never filled");
    // Everything acknowledged reads back; the connection and node are fine.
    for (off, data) in &written {
        assert!(c.read(*off, 1 << 20).await.unwrap() == *data);
    }
    assert!(node.cli_ok(&["volume", "list"]).contains("vm1"));
    // Space returns (trim the first MiB): writing works again.
    c.trim(0, 1 << 20).await.unwrap();
    c.write(0, &pattern(1 << 20, 99), false).await.unwrap();
    c.flush().await.unwrap();
    drop(c);
    assert!(node.stop(), "node did not stop cleanly on a full disk");
}
