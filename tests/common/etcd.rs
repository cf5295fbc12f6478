//! An etcd cluster for the tests: one or three real `etcd` members on
//! free loopback ports (`tests/cluster.rs`, `tests/chaos_etcd.rs`).

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{require, wait_until, NodeProc, DLSM};

/// The lease TTL the tests' nodes ask for: short, so a dead node shows
/// down quickly (margin 1 s, renewal every 0.75 s).
pub const TTL: u64 = 4;

/// An etcd cluster (one or three members) on free loopback ports, in a
/// temporary directory, killed on drop.
pub struct Etcd {
    pub members: Vec<Child>,
    /// How each member was started (to start it again).
    pub commands: Vec<Command>,
    /// Each member's plain-HTTP `/health` address.
    pub health: Vec<String>,
    /// The client URLs, one per member.
    pub urls: Vec<String>,
    /// Comma-separated, as `--cluster-etcd` takes them.
    pub url: String,
    pub _dir: tempfile::TempDir,
}

pub use super::free_port;

impl Etcd {
    /// One member.
    pub fn start() -> Etcd {
        Self::start_members(1)
    }

    /// `n` members, healthy when this returns.
    pub fn start_members(n: usize) -> Etcd {
        Self::start_full(n, None)
    }

    /// `n` members; with `tls` (a `tests/tls/make-certs.sh` directory) the
    /// client URLs are https and clients must present a certificate.
    pub fn start_full(n: usize, tls: Option<&Path>) -> Etcd {
        // Ports are found free and then handed to etcd: another test's
        // process (a node binding port 0) can take one in between, and that
        // member exits at once. Such a start is retried on fresh ports.
        let mut why = String::new();
        for attempt in 1..=3 {
            match Self::try_start(n, tls) {
                Ok(e) => return e,
                Err(e) => {
                    eprintln!("etcd start, attempt {attempt}: {e}");
                    why = e;
                }
            }
        }
        panic!("etcd did not start in 3 attempts; last: {why}");
    }

    fn try_start(n: usize, tls: Option<&Path>) -> Result<Etcd, String> {
        let etcd = require("etcd");
        let dir = tempfile::tempdir().unwrap();
        // client, peer, and a plain-HTTP port for /health.
        let ports: Vec<(u16, u16, u16)> = (0..n)
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let urls: Vec<String> = ports
            .iter()
            .map(|(c, _, _)| format!("{scheme}://127.0.0.1:{c}"))
            .collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, p, _))| format!("m{i}=http://127.0.0.1:{p}"))
            .collect();
        let mut commands: Vec<Command> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, p, h))| {
                let peer_url = format!("http://127.0.0.1:{p}");
                let mut cmd = Command::new(&etcd);
                if let Some(t) = tls {
                    cmd.arg("--cert-file")
                        .arg(t.join("server-cert.pem"))
                        .arg("--key-file")
                        .arg(t.join("server-key.pem"))
                        .arg("--trusted-ca-file")
                        .arg(t.join("ca-cert.pem"))
                        .arg("--client-cert-auth");
                }
                cmd.args(["--listen-metrics-urls", &format!("http://127.0.0.1:{h}")]);
                cmd.args(["--name", &format!("m{i}"), "--data-dir"])
                    .arg(dir.path().join(format!("m{i}")))
                    .args(["--listen-client-urls", &urls[i]])
                    .args(["--advertise-client-urls", &urls[i]])
                    .args(["--listen-peer-urls", &peer_url])
                    .args(["--initial-advertise-peer-urls", &peer_url])
                    .args(["--initial-cluster", &initial.join(",")])
                    .args(["--initial-cluster-state", "new"])
                    .args(["--initial-cluster-token", "dlsm-test", "--logger=zap"])
                    .arg(format!(
                        "--log-outputs={}",
                        dir.path().join(format!("m{i}.log")).display()
                    ))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                cmd
            })
            .collect();
        let members = commands
            .iter_mut()
            .map(|c| c.spawn().expect("spawn etcd"))
            .collect();
        let mut e = Etcd {
            members,
            commands,
            health: ports
                .iter()
                .map(|(_, _, h)| format!("127.0.0.1:{h}"))
                .collect(),
            url: urls.join(","),
            urls,
            _dir: dir,
        };
        for i in 0..n {
            let addr = e.health[i].clone();
            let deadline = Instant::now() + Duration::from_secs(20);
            while !health(&addr) {
                if e.members[i].try_wait().unwrap().is_some() {
                    let log = e._dir.path().join(format!("m{i}.log"));
                    let log = std::fs::read_to_string(log).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(5).collect();
                    return Err(format!("member {i} exited: {tail:?}"));
                }
                if Instant::now() > deadline {
                    return Err(format!("member {i} not healthy after 20 s"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // A port taken in between may be one another process answers
        // `/health` on (another test's etcd), while the member that could
        // not bind it exits: every member must still run.
        std::thread::sleep(Duration::from_millis(100));
        for i in 0..n {
            if let Some(st) = e.members[i].try_wait().unwrap() {
                let log = e._dir.path().join(format!("m{i}.log"));
                let log = std::fs::read_to_string(log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(3).collect();
                return Err(format!(
                    "member {i} exited ({st}) after the cluster looked healthy: {tail:?}"
                ));
            }
        }
        Ok(e)
    }

    pub fn wait_healthy(&mut self, i: usize) {
        let addr = self.health[i].clone();
        wait_until("etcd is healthy", 20, || {
            assert!(
                self.members[i].try_wait().unwrap().is_none(),
                "etcd member {i} exited; its log is in {}",
                self._dir.path().display()
            );
            health(&addr)
        });
    }

    /// Kills member `i` (-9).
    pub fn kill(&mut self, i: usize) {
        let _ = self.members[i].kill();
        let _ = self.members[i].wait();
    }

    /// Starts member `i` again on its data directory.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.members[i] = self.commands[i].spawn().expect("spawn etcd");
        self.wait_healthy(i);
    }

    /// Sends `sig` to member `i`.
    pub fn signal(&self, i: usize, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.members[i].id() as i32);
        nix::sys::signal::kill(pid, sig).unwrap();
    }

    /// Makes member `i` the raft leader (`etcdctl move-leader`) and waits
    /// until it says so: tests that freeze a member pick whether the
    /// cluster must elect a new leader.
    pub fn make_leader(&self, i: usize) {
        let etcdctl = require("etcdctl");
        let status = |ep: &str| -> (u64, u64) {
            let o = Command::new(&etcdctl)
                .args(["--endpoints", ep, "endpoint", "status", "-w", "json"])
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            let s = &v[0]["Status"];
            (
                s["header"]["member_id"].as_u64().expect("member_id"),
                s["leader"].as_u64().expect("leader"),
            )
        };
        let (id, leader) = status(&self.urls[i]);
        if id != leader {
            let o = Command::new(&etcdctl)
                .args(["--endpoints", &self.url, "move-leader", &format!("{id:x}")])
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        wait_until("the member to lead", 10, || {
            let (id, leader) = status(&self.urls[i]);
            id == leader
        });
    }

    /// `serve` flags joining this etcd.
    pub fn flags(&self) -> Vec<String> {
        vec![
            "--cluster-etcd".into(),
            self.url.clone(),
            "--cluster-lease-ttl".into(),
            TTL.to_string(),
        ]
    }

    /// Runs `dlsm serve` as node `name` on `dir` in this cluster, with
    /// `extra` flags, for a start that is expected to be refused: waits for
    /// it to exit.
    pub fn serve_refused(&self, dir: &Path, name: &str, extra: &[&str]) -> std::process::Output {
        let mut args = vec![
            "serve".to_string(),
            "--data-dir".into(),
            dir.display().to_string(),
            "--node".into(),
            name.into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--api".into(),
            "127.0.0.1:0".into(),
        ];
        args.extend(self.flags());
        args.extend(extra.iter().map(|a| a.to_string()));
        Command::new(DLSM).args(&args).output().unwrap()
    }

    /// Starts node `name` on `dir` in this cluster.
    pub fn node(&self, dir: &Path, name: &str) -> NodeProc {
        self.node_with(dir, name, &[])
    }

    /// [`Etcd::node`] with `extra` serve flags.
    pub fn node_with(&self, dir: &Path, name: &str, extra: &[&str]) -> NodeProc {
        let mut f = self.flags();
        f.extend(extra.iter().map(|s| s.to_string()));
        let f: Vec<&str> = f.iter().map(String::as_str).collect();
        NodeProc::start_named(dir, name, &f)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for m in &mut self.members {
            let _ = m.kill();
            let _ = m.wait();
        }
    }
}

/// etcd's `GET /health` (on its metrics port) answers `{"health":"true"}`.
pub fn health(addr: &str) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: x\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}
