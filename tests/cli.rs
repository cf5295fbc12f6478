//! The `dlsm` command line as a user meets it: the real binary against
//! real nodes over real sockets, pipes and a pseudo-terminal.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// `dlsm ARGS` against `node`, with the standard streams given.
fn dlsm(node: &NodeProc, args: &[&str]) -> Command {
    let mut c = Command::new(DLSM);
    c.arg("--api")
        .arg(&node.api)
        .args(&node.client_flags)
        .args(args);
    c
}

/// A command that must fail: its stderr.
fn fails(o: Output) -> String {
    assert!(
        !o.status.success(),
        "succeeded: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8(o.stderr).unwrap()
}

/// Waits for `child` at most `secs`; its output.
fn finish(mut child: Child, secs: u64) -> Output {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        out.read_to_end(&mut s).unwrap();
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        err.read_to_end(&mut s).unwrap();
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            let st = child.wait().unwrap();
            panic!(
                "still running after {secs}s ({st}); stderr so far: {}",
                String::from_utf8_lossy(&t_err.join().unwrap())
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

/// A raw image of `mib` MiB of non-zero data (zeros would be skipped).
fn image(dir: &Path, mib: usize) -> String {
    let p = dir.join("img.raw");
    std::fs::write(&p, pattern(mib << 20, 11)).unwrap();
    p.to_str().unwrap().to_owned()
}

#[test]
fn json_is_one_global_flag_and_errors_are_json_on_stderr() {
    let node = NodeProc::start();
    node.create("vm1", "1G");
    // Before or after the subcommand: the same flag.
    for args in [
        &["--json", "volume", "list"][..],
        &["volume", "--json", "list"],
        &["volume", "list", "--json"],
    ] {
        let v: serde_json::Value = serde_json::from_str(&node.cli_ok(args)).unwrap();
        assert_eq!(v[0]["name"], "vm1", "{args:?}");
    }
    // An error the node reports: one JSON object on stderr, nothing on
    // stdout, exit status 1.
    let o = node.cli(&["--json", "volume", "show", "nope"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(o.stdout.is_empty());
    let e: serde_json::Value = serde_json::from_slice(&o.stderr).unwrap();
    assert!(
        e["error"].as_str().unwrap().contains("no volume named"),
        "{e}"
    );
    assert_eq!(e["http_status"], 404);
    // An error of the CLI's own: JSON too.
    let o = node.cli(&["volume", "create", "x", "--json"]);
    assert_eq!(o.status.code(), Some(1));
    let e: serde_json::Value = serde_json::from_slice(&o.stderr).unwrap();
    assert!(e["error"].as_str().unwrap().contains("give --size"), "{e}");
    // A wrong command line: JSON, exit status 2.
    let o = node.cli(&["--json", "volume", "show"]);
    assert_eq!(o.status.code(), Some(2));
    let e: serde_json::Value = serde_json::from_slice(&o.stderr).unwrap();
    assert!(e["error"].as_str().unwrap().contains("NAME"), "{e}");
    assert_eq!(e["usage"], true);
    // Without --json: one line of text.
    let e = fails(node.cli(&["volume", "show", "nope"]));
    assert!(e.starts_with("error: ") && e.lines().count() == 1, "{e}");
}

#[test]
fn a_reader_that_stops_early_is_not_an_error() {
    let node = NodeProc::start();
    for i in 0..5 {
        node.create(&format!("vm{i}"), "1G");
    }
    // A pipe whose reader is gone before dlsm writes a byte: every write
    // fails with EPIPE. dlsm exits 0, silently, with no panic.
    for args in [
        &["volume", "list"][..],
        &["volume", "list", "--json"],
        &["volume", "show", "vm1"],
        &["node", "info"],
        &["completions", "bash"],
        &["man"],
    ] {
        let (rd, wr) = nix::unistd::pipe().unwrap();
        drop(rd);
        let o = dlsm(&node, args)
            .stdout(Stdio::from(wr))
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert_eq!(
            o.status.code(),
            Some(0),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            o.stderr.is_empty(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // The same in a shell pipeline under pipefail, as a user types it:
    // `head` takes one line of a listing longer than a pipe's buffer.
    let pipeline = format!(
        "set -o pipefail; {DLSM} --api {} completions bash | head -n 1 >/dev/null && \
         {DLSM} --api {} volume list | head -n 1",
        node.api, node.api
    );
    let o = Command::new("bash")
        .args(["-c", &pipeline])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("NAME"));
}

#[test]
fn version_and_node_info() {
    let out = run_ok(Command::new(DLSM).arg("version"));
    assert!(
        out.starts_with(&format!("dlsm {} (", env!("CARGO_PKG_VERSION"))),
        "{out}"
    );
    assert!(out.contains(std::env::consts::ARCH), "{out}");
    let v: serde_json::Value =
        serde_json::from_str(&run_ok(Command::new(DLSM).args(["version", "--json"]))).unwrap();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert!(v["target"].as_str().unwrap().contains("linux"), "{v}");

    let node = NodeProc::start();
    let info = node.cli_ok(&["node", "info"]);
    assert!(info.contains("node:        test\n"), "{info}");
    assert!(
        info.contains(&format!("nbd:         {}\n", node.nbd)),
        "{info}"
    );
    assert!(info.contains(&node.unix.display().to_string()), "{info}");
    let j: serde_json::Value =
        serde_json::from_str(&node.cli_ok(&["node", "info", "--json"])).unwrap();
    assert_eq!(j["name"], "test");
    assert_eq!(j["nbd"], node.nbd.as_str());
    assert_eq!(j["version"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn completions_and_man_page() {
    let bash = require("bash");
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("dlsm.bash");
    let out = run_ok(Command::new(DLSM).args(["completions", "bash"]));
    assert!(out.contains("dlsm") && out.contains("migration"), "{out}");
    std::fs::write(&script, &out).unwrap();
    run_ok(Command::new(&bash).arg("-n").arg(&script));
    // Loaded into bash, it completes subcommands.
    let words = run_ok(Command::new(&bash).arg("-c").arg(format!(
        "source {}; COMP_WORDS=(dlsm migration ''); COMP_CWORD=2; COMP_LINE='dlsm migration '; \
         COMP_POINT=${{#COMP_LINE}}; _dlsm dlsm '' migration; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display()
    )));
    for w in ["status", "list", "handoff", "cancel"] {
        assert!(words.lines().any(|l| l == w), "{w} not offered: {words}");
    }
    let zsh = run_ok(Command::new(DLSM).args(["completions", "zsh"]));
    assert!(zsh.starts_with("#compdef dlsm"), "{zsh}");
    let fish = run_ok(Command::new(DLSM).args(["completions", "fish"]));
    assert!(fish.contains("complete -c dlsm"), "{fish}");
    let o = Command::new(DLSM)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));

    // The man page: groff renders it without a warning, man reads it.
    let page = tmp.path().join("dlsm.1");
    std::fs::write(&page, run_ok(Command::new(DLSM).arg("man"))).unwrap();
    let o = Command::new(require("groff"))
        .args(["-man", "-Tutf8", "-ww", "-z"])
        .arg(&page)
        .output()
        .unwrap();
    assert!(
        o.status.success() && o.stderr.is_empty(),
        "groff: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = Command::new(require("man"))
        .arg("-l")
        .arg(&page)
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    for s in [
        "dlsm volume create",
        "dlsm migration list",
        "--region-size",
        "EXIT STATUS",
        "DLSM_API",
    ] {
        assert!(
            text.contains(s),
            "{s} missing from the rendered page:\n{text}"
        );
    }
}

#[test]
fn empty_names_and_addresses_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_str().unwrap();
    for (args, says) in [
        (&["serve", "--data-dir", d, "--node", ""][..], "--node"),
        (
            &["serve", "--data-dir", d, "--node", "two words"],
            "one word",
        ),
        (&["serve", "--data-dir", d, "--listen", ""], "--listen"),
        (
            &["serve", "--data-dir", d, "--advertise-api", "hostb"],
            "no port",
        ),
        (&["--api", "", "volume", "list"], "--api"),
        (&["migrate", "vm1", "--to", ""], "--to"),
        (&["migrate", "vm1", "--to", ":7450"], "no host"),
    ] {
        let o = Command::new(DLSM).args(args).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(says), "{args:?}: {e}");
        if args.contains(&"") {
            assert!(e.contains("must not be empty"), "{args:?}: {e}");
        }
    }
    assert!(
        std::fs::read_dir(tmp.path()).unwrap().next().is_none(),
        "a refused serve touched its data directory"
    );
}

#[test]
fn api_errors_name_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let tls = tmp.path().join("tls");
    make_tls_dir(&tls, &["127.0.0.1"]);
    let ts = tls.to_str().unwrap();
    let plain = NodeProc::start();
    let secure = NodeProc::start_with(
        &tmp.path().join("d"),
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--tls-dir", ts],
    );
    let call = |api: &str, extra: &[&str]| {
        Command::new(DLSM)
            .arg("--api")
            .arg(api)
            .args(extra)
            .args(["volume", "list"])
            .output()
            .unwrap()
    };
    // --api at a node's NBD port, with and without TLS.
    for (nbd, extra) in [(&plain.nbd, &[][..]), (&secure.nbd, &["--tls-dir", ts])] {
        let e = fails(call(nbd, extra));
        assert!(
            e.contains(&format!(
                "{nbd} answered with the NBD protocol, not the HTTP API; is --api pointing at \
                 the NBD port?"
            )),
            "{e}"
        );
    }
    // Plain HTTP to an API that uses TLS, and TLS to one that does not.
    let e = fails(call(&secure.api, &[]));
    assert!(e.contains("uses TLS") && e.contains("--tls-dir"), "{e}");
    let e = fails(call(&plain.api, &["--tls-dir", ts]));
    assert!(
        e.contains("is plain HTTP") && e.contains("--tls-dir"),
        "{e}"
    );
    // Nothing there: a stopped node's address.
    let mut gone = NodeProc::start();
    let addr = gone.api.clone();
    assert!(gone.stop());
    let e = fails(call(&addr, &[]));
    assert!(
        e.contains(&format!("no dlsm node listening at {addr}")),
        "{e}"
    );
    // And the right flags still work.
    assert!(call(&secure.api, &["--tls-dir", ts]).status.success());
    assert!(call(&plain.api, &[]).status.success());
}

#[test]
fn migrating_to_the_node_the_volume_is_on_is_refused() {
    let a = NodeProc::start();
    let b = NodeProc::start();
    a.create("vm1", "64M");
    let port = a.api.rsplit_once(':').unwrap().1;
    // Other spellings of the source's own address: a name that resolves
    // to it, and the wildcard address (which reaches it by asking it who
    // it is).
    for to in [format!("localhost:{port}"), format!("0.0.0.0:{port}")] {
        let e = fails(a.cli(&["migrate", "vm1", "--to", &to]));
        assert!(e.contains("that same node"), "{to}: {e}");
        assert!(e.contains("name another node's API with --to"), "{e}");
    }
    // The destination's NBD port instead of its API: said before anything
    // starts.
    let e = fails(a.cli(&["migrate", "vm1", "--to", &b.nbd]));
    assert!(e.contains("is --to pointing at the NBD port?"), "{e}");
    // Nothing was started.
    let e = fails(a.cli(&["migration", "status", "vm1"]));
    assert!(e.contains("HTTP 404"), "{e}");
    assert!(!b.has_volume("vm1"));
    // A real destination still works.
    a.cli_ok(&["migrate", "vm1", "--to", &b.api]);
    assert!(b.has_volume("vm1"));
}

#[test]
fn volume_show_names_the_table_and_whom_a_fenced_copy_went_to() {
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path(), 4);
    let a = NodeProc::start();
    let b = NodeProc::start();
    a.cli_ok(&["volume", "create", "vm1", "--from", &img]);
    a.create("big", "1T");
    let list = a.cli_ok(&["volume", "list"]);
    assert!(
        list.contains("1.0 TiB") && !list.contains("1024.0"),
        "{list}"
    );
    let show = a.cli_ok(&["volume", "show", "vm1"]);
    assert!(show.contains("table:       local"), "{show}");
    assert!(show.contains("fenced:      no"), "{show}");

    a.cli_ok(&["migrate", "vm1", "--to", &b.api, "--keep-source"]);
    let show = b.cli_ok(&["volume", "show", "vm1"]);
    assert!(
        show.contains(&format!(
            "table:       clone (migrating in from {}, before handoff",
            a.api
        )),
        "{show}"
    );
    assert!(b.cli_ok(&["volume", "list"]).contains("clone"));
    b.cli_ok(&["migration", "handoff", "vm1"]);
    b.wait_phase("vm1", "complete", 60);
    let show = a.cli_ok(&["volume", "show", "vm1"]);
    assert!(
        show.contains(&format!("fenced:      handed off to {}", b.api)),
        "{show}"
    );
    assert!(a.cli_ok(&["volume", "list"]).contains("local, fenced"));
    let v: serde_json::Value =
        serde_json::from_str(&a.cli_ok(&["volume", "show", "vm1", "--json"])).unwrap();
    assert_eq!(v["fenced_to"], b.api.as_str());
    wait_until("destination table collapses to local", 30, || {
        b.cli_ok(&["volume", "show", "vm1"])
            .contains("table:       local")
    });
}

#[test]
fn migrate_wait_rides_out_a_destination_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path(), 16);
    let a = NodeProc::start();
    let mut b = NodeProc::start();
    a.cli_ok(&["volume", "create", "vm1", "--from", &img]);
    let wait = dlsm(
        &a,
        &[
            "migrate",
            "vm1",
            "--to",
            &b.api,
            "--rate",
            "1M",
            "--region-size",
            "256K",
            "--wait",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    b.wait_phase("vm1", "passthrough", 30);
    let st = b.cli_ok(&["migration", "status", "vm1"]);
    assert!(st.contains("phase:       passthrough\n"), "{st}");
    b.cli_ok(&["migration", "handoff", "vm1"]);
    b.wait_phase("vm1", "hydrating", 30);
    // Paused: no rate, no ETA.
    b.cli_ok(&["migration", "pause", "vm1"]);
    let st = b.cli_ok(&["migration", "status", "vm1"]);
    assert!(st.contains("phase:       hydrating (paused)"), "{st}");
    assert!(st.contains("rate:        paused"), "{st}");
    assert!(!st.contains("eta:"), "{st}");
    b.cli_ok(&["migration", "resume", "vm1"]);
    // The destination goes away for a few seconds (a crash and a restart).
    std::thread::sleep(Duration::from_millis(1500));
    b.kill();
    std::thread::sleep(Duration::from_secs(3));
    b.restart();
    b.cli_ok(&["migration", "set-rate", "vm1", "0"]);
    let o = finish(wait, 120);
    let out = String::from_utf8(o.stdout).unwrap();
    let err = String::from_utf8(o.stderr).unwrap();
    assert!(o.status.success(), "stdout: {out}\nstderr: {err}");
    assert!(
        err.contains(&format!("{} does not answer", b.api))
            && err.contains("retrying for up to 60 s"),
        "{err}"
    );
    assert!(err.contains("answers again"), "{err}");
    // Progress lines (stderr is not a terminal here) with phases as the
    // docs spell them, and the final word on a line of its own.
    assert!(err.contains("vm1: hydrating "), "{err}");
    assert!(err.contains("vm1: complete 64/64 regions"), "{err}");
    for debug in ["Passthrough", "Hydrating", "Complete"] {
        assert!(
            !err.contains(debug) && !out.contains(debug),
            "{debug}: {err}{out}"
        );
    }
    assert!(out.contains("phase:       complete\n"), "{out}");
}

#[test]
fn migrate_wait_gives_up_on_a_destination_that_stays_away() {
    let a = NodeProc::start();
    let mut b = NodeProc::start();
    a.create("vm1", "64M");
    let wait = dlsm(
        &a,
        &[
            "--json",
            "migrate",
            "vm1",
            "--to",
            &b.api,
            "--wait",
            "--retry-for",
            "2",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    b.wait_phase("vm1", "passthrough", 30);
    let t = Instant::now();
    b.kill();
    let o = finish(wait, 30);
    assert!(!o.status.success());
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    // With --json every line on stderr is JSON: the warning, then the error.
    let err = String::from_utf8(o.stderr).unwrap();
    let lines: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert!(
        lines[0]["warning"]
            .as_str()
            .unwrap()
            .contains("does not answer"),
        "{err}"
    );
    let last = lines.last().unwrap()["error"].as_str().unwrap();
    assert!(
        last.contains("gave up waiting for the migration of vm1")
            && last.contains("no dlsm node listening"),
        "{err}"
    );
    // Stdout had the status objects, one per line.
    for l in String::from_utf8(o.stdout).unwrap().lines() {
        let s: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(s["volume"], "vm1");
    }
}

#[test]
fn migrate_wait_progress_bar_ends_its_line() {
    let script = require("script");
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path(), 4);
    let a = NodeProc::start();
    let b = NodeProc::start();
    a.cli_ok(&["volume", "create", "vm1", "--from", &img]);
    // `script` gives the command a terminal, so the bar is drawn as a user
    // sees it; the transcript goes to script's stdout.
    let cmd = format!(
        "{DLSM} --api {} migrate vm1 --to {} --rate 2M --wait",
        a.api, b.api
    );
    let wait = Command::new(script)
        .args(["-q", "-e", "-f", "-c", &cmd, "/dev/null"])
        .env("COLUMNS", "100")
        .env("LINES", "30")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    b.wait_phase("vm1", "passthrough", 30);
    b.cli_ok(&["migration", "handoff", "vm1"]);
    let o = finish(wait, 60);
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{t}");
    // The bar was drawn (a terminal), then cleared; the final word is a
    // line of its own, and the status after it starts on a fresh line.
    assert!(t.contains("regions"), "{t:?}");
    assert!(t.contains("vm1: complete, "), "{t:?}");
    let after = &t[t.find("vm1: complete, ").unwrap()..];
    assert!(
        after.contains("\nvolume:"),
        "status not on a line of its own: {t:?}"
    );
    for debug in ["Passthrough", "Hydrating", "Complete"] {
        assert!(!t.contains(debug), "{debug}: {t:?}");
    }
}

#[test]
fn systemd_unit_verifies_and_the_license_is_apache() {
    let analyze = require("systemd-analyze");
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/packaging/dlsm.service"
    ))
    .unwrap();
    // The daemon rereads TLS on SIGHUP and keeps its volumes in the state
    // directory.
    assert!(unit.contains("ExecReload=/bin/kill -HUP $MAINPID"));
    assert!(unit.contains("StateDirectory=dlsm"));
    assert!(unit.contains("--data-dir /var/lib/dlsm"));
    // systemd-analyze checks the unit's syntax, that ExecStart's binary
    // exists (the one just built, in place of /usr/bin/dlsm) and that the
    // Documentation= man page resolves (the one `dlsm man` prints).
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("dlsm.service");
    std::fs::write(&path, unit.replace("/usr/bin/dlsm", DLSM)).unwrap();
    let man1 = tmp.path().join("man/man1");
    std::fs::create_dir_all(&man1).unwrap();
    std::fs::write(man1.join("dlsm.1"), run_ok(Command::new(DLSM).arg("man"))).unwrap();
    let o = Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .env("MANPATH", tmp.path().join("man"))
        .output()
        .unwrap();
    assert!(
        o.status.success() && o.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );

    let cargo =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
    assert!(cargo.contains("license = \"Apache-2.0\""));
    let license = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/LICENSE")).unwrap();
    assert!(license.contains("Apache License\n") && license.contains("Version 2.0, January 2004"));
    assert!(license.contains("END OF TERMS AND CONDITIONS"));
}

/// A build without the `cluster` feature (the default, which needs no
/// protoc) refuses cluster mode with a sentence saying how to get it,
/// before it opens or binds anything; its other commands are unaffected
/// (every other test here).
#[cfg(not(feature = "cluster"))]
#[test]
fn a_build_without_cluster_support_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let o = Command::new(DLSM)
        .args(["serve", "--data-dir"])
        .arg(tmp.path().join("d"))
        .args(["--listen", "127.0.0.1:0", "--api", "127.0.0.1:0"])
        .args(["--node", "n1", "--cluster-etcd", "http://127.0.0.1:2379"])
        .output()
        .unwrap();
    let err = fails(o);
    assert!(
        err.contains("built without cluster support") && err.contains("--features cluster"),
        "{err}"
    );
    assert!(!tmp.path().join("d").exists(), "it made its data directory");
    // A node of this build answers cluster requests with the same reason.
    let n = NodeProc::start();
    let err = fails(dlsm(&n, &["node", "list"]).output().unwrap());
    assert!(
        err.contains("is not in a cluster") && err.contains("no cluster support"),
        "{err}"
    );
}
