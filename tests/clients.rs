//! The node against the real NBD clients: qemu-img, qemu-io, nbdinfo,
//! nbdcopy, fio's nbd engine and libnbd's Python bindings.

mod common;

use std::process::Command;

use common::{pattern, require, run_ok, NodeProc};

#[test]
fn qemu_img_info_convert_and_compare() {
    require("qemu-img");
    let node = NodeProc::start();
    node.create("vm1", "64M");
    let tmp = tempfile::tempdir().unwrap();
    // A raw image: 1 MiB of data at 8 MiB, the rest zero.
    let src = tmp.path().join("src.raw");
    let mut img = vec![0u8; 64 << 20];
    img[8 << 20..9 << 20].copy_from_slice(&pattern(1 << 20, 1));
    std::fs::write(&src, &img).unwrap();

    let info = run_ok(Command::new("qemu-img").args(["info", "--output=json", &node.uri("vm1")]));
    assert!(info.contains("\"virtual-size\": 67108864"), "{info}");

    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(node.uri("vm1")),
    );
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(node.uri("vm1")),
    );

    let back = tmp.path().join("back.raw");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &node.uri("vm1")])
            .arg(&back),
    );
    assert!(
        std::fs::read(&back).unwrap() == img,
        "image read back differs"
    );

    // A change on the volume makes compare fail: the check can fail.
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x11 0 4k",
        &node.uri("vm1"),
    ]));
    let st = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(node.uri("vm1"))
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(1), "compare must report the difference");
}

#[test]
fn qemu_io_patterns_over_tcp_and_unix() {
    require("qemu-io");
    let node = NodeProc::start();
    node.create("vm1", "16M");
    for uri in [node.uri("vm1"), node.unix_uri("vm1")] {
        let out = run_ok(Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 1M",
            "-c",
            "write -P 0xa5 1000 3333", // unaligned
            "-c",
            "aio_write -P 0x33 2M 64k",
            "-c",
            "aio_write -P 0x44 3M 64k",
            "-c",
            "aio_flush",
            "-c",
            "read -P 0x5a 0 1000",
            "-c",
            "read -P 0xa5 1000 3333",
            "-c",
            "read -P 0x5a 4333 100k",
            "-c",
            "read -P 0x33 2M 64k",
            "-c",
            "read -P 0x44 3M 64k",
            "-c",
            "write -z 2M 64k",
            "-c",
            "read -P 0 2M 64k",
            "-c",
            "discard 3M 64k",
            "-c",
            "read -P 0 3M 64k",
            "-c",
            "flush",
            &uri,
        ]));
        assert!(!out.contains("Pattern verification failed"), "{out}");
        assert!(!out.to_lowercase().contains("error"), "{out}");
        // A wrong pattern must be caught (the check can fail).
        let bad = Command::new("qemu-io")
            .args(["-f", "raw", "-c", "read -P 0x99 0 4k", &uri])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&bad.stdout).to_string()
            + &String::from_utf8_lossy(&bad.stderr);
        assert!(text.contains("Pattern verification failed"), "{text}");
    }
}

#[test]
fn nbdinfo_map_shows_holes_and_data() {
    require("nbdinfo");
    require("qemu-io");
    let node = NodeProc::start();
    node.create("vm1", "32M");
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 1 4M 1M",
        "-c",
        "write -P 2 20M 512k",
        &node.uri("vm1"),
    ]));
    let map = run_ok(Command::new("nbdinfo").args(["--map", &node.uri("vm1")]));
    let rows: Vec<(u64, u64, u32)> = map
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            (0, 4 << 20, 3),
            (4 << 20, 1 << 20, 0),
            (5 << 20, 15 << 20, 3),
            (20 << 20, 512 << 10, 0),
            (
                20 * (1 << 20) + (512 << 10),
                32 * (1 << 20) - 20 * (1 << 20) - (512 << 10),
                3
            ),
        ],
        "{map}"
    );
    // --list shows every volume.
    node.create("vm2", "1M");
    let list = run_ok(Command::new("nbdinfo").args(["--list", &format!("nbd://{}", node.nbd)]));
    assert!(
        list.contains("export=\"vm1\"") && list.contains("export=\"vm2\""),
        "{list}"
    );
    // Unknown export: a clear refusal.
    let o = Command::new("nbdinfo")
        .arg(node.uri("nope"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("opt_go") && err.contains("nope"), "{err}");
}

#[test]
fn nbdcopy_round_trip_preserves_sparseness() {
    require("nbdcopy");
    let node = NodeProc::start();
    node.create("vm1", "64M");
    node.create("vm2", "64M");
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src.raw");
    let mut img = vec![0u8; 64 << 20];
    for (i, chunk) in img
        .chunks_mut(4 << 20)
        .enumerate()
        .filter(|(i, _)| i % 3 == 0)
    {
        chunk[..1 << 20].copy_from_slice(&pattern(1 << 20, i as u64));
    }
    std::fs::write(&src, &img).unwrap();
    run_ok(Command::new("nbdcopy").arg(&src).arg(node.uri("vm1")));
    run_ok(Command::new("nbdcopy").args([&node.uri("vm1"), &node.uri("vm2")]));
    let back = tmp.path().join("back.raw");
    run_ok(Command::new("nbdcopy").arg(node.uri("vm2")).arg(&back));
    assert!(
        std::fs::read(&back).unwrap() == img,
        "nbdcopy round trip differs"
    );
    // Zero ranges stayed holes on the node: 6 data MiB (of 16 chunks, 6 have data).
    let show = node.cli_ok(&["volume", "show", "vm2", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&show).unwrap();
    let alloc = v["allocated_bytes"].as_u64().unwrap();
    assert!(
        alloc <= 8 << 20,
        "zeroes were stored: {alloc} bytes allocated"
    );
    assert!(alloc >= 6 << 20, "data missing: {alloc} bytes allocated");
}

#[test]
fn fio_nbd_engine_verifies_random_writes() {
    require("fio");
    let node = NodeProc::start();
    node.create("vm1", "64M");
    let out = run_ok(Command::new("fio").args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={}", node.uri("vm1")),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=32M",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--do_verify=1",
        // fio would otherwise leave local-verify-*.state in the working tree.
        "--verify_state_save=0",
        "--output-format=json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    let job = &v["jobs"][0];
    assert_eq!(job["error"].as_u64(), Some(0), "{out}");
    assert_eq!(job["write"]["total_ios"].as_u64(), Some(8192), "{out}");
    assert!(
        job["read"]["total_ios"].as_u64().unwrap() >= 8192,
        "verify did not read: {out}"
    );
}

#[test]
fn libnbd_option_negotiation() {
    require("python3");
    let node = NodeProc::start();
    node.create("vm1", "8M");
    node.create("vm2", "1M");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/options.py");
    let out = run_ok(Command::new("/usr/bin/python3").arg(script).arg(&node.nbd));
    assert!(out.trim_end().ends_with("ALL OK"), "{out}");
}
