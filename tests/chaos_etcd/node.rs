//! A `dlsm serve` node in cluster mode that reaches etcd only through its
//! own fault-injecting proxies (one per etcd member), with its log in a
//! file (scanned for panics). Clients and the harness reach it directly.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::common::{free_port, ready_line, DLSM};
use crate::proxy::{Mode, Proxy};

pub struct ENode {
    pub idx: usize,
    pub data_dir: PathBuf,
    pub nbd: String,
    pub api: String,
    /// One per etcd member: this node's only way to it.
    pub proxies: Vec<Proxy>,
    pub log: PathBuf,
    pub ttl: u64,
    log_scanned: usize,
    child: Option<Child>,
}

impl ENode {
    pub fn new(
        idx: usize,
        data_dir: PathBuf,
        log: PathBuf,
        proxies: Vec<Proxy>,
        ttl: u64,
    ) -> ENode {
        std::fs::create_dir_all(&data_dir).unwrap();
        ENode {
            idx,
            data_dir,
            nbd: String::new(),
            api: String::new(),
            proxies,
            log,
            ttl,
            log_scanned: 0,
            child: None,
        }
    }

    pub fn name(&self) -> String {
        format!("n{}", self.idx)
    }

    /// The proxies' URLs, starting at a member that depends on the node (so
    /// the nodes do not all use the same member first).
    fn etcd_urls(&self) -> String {
        let n = self.proxies.len();
        (0..n)
            .map(|k| format!("http://{}", self.proxies[(self.idx + k) % n].addr))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts the node (on new ports if it never ran or `fresh_ports`);
    /// Err with the reason if it does not come up.
    pub fn start(&mut self, fresh_ports: bool) -> Result<(), String> {
        assert!(self.child.is_none());
        if self.nbd.is_empty() || fresh_ports {
            self.nbd = format!("127.0.0.1:{}", free_port());
            self.api = format!("127.0.0.1:{}", free_port());
        }
        use std::io::Write;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let _ = writeln!(log, "=== chaos_etcd: starting {}", self.name());
        let mut child = Command::new(DLSM)
            .args(["serve", "--data-dir"])
            .arg(&self.data_dir)
            .args(["--listen", &self.nbd, "--api", &self.api, "--node"])
            .arg(self.name())
            .args(["--cluster-etcd", &self.etcd_urls()])
            .args(["--cluster-lease-ttl", &self.ttl.to_string()])
            .env(
                "RUST_LOG",
                std::env::var("DLSM_TEST_LOG")
                    .unwrap_or_else(|_| "warn,dlsm=info,rustls=error".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn dlsm serve");
        match ready_line(&mut child, Duration::from_secs(20)) {
            Ok(_) => {
                self.child = Some(child);
                Ok(())
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    pub fn pid(&self) -> Option<Pid> {
        self.child.as_ref().map(|c| Pid::from_raw(c.id() as i32))
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn signal(&self, sig: Signal) {
        if let Some(p) = self.pid() {
            let _ = kill(p, sig);
        }
    }

    /// Sets every etcd proxy of this node.
    pub fn set_links(&self, m: Mode) {
        for p in &self.proxies {
            p.set(m);
        }
    }

    /// Whether the process exited by itself, with its status.
    pub fn exited(&mut self) -> Option<String> {
        let c = self.child.as_mut()?;
        match c.try_wait() {
            Ok(Some(st)) => {
                self.child = None;
                Some(st.to_string())
            }
            _ => None,
        }
    }

    /// New lines of the log that contain `panicked`.
    pub fn new_panics(&mut self) -> Vec<String> {
        let Ok(text) = std::fs::read(&self.log) else {
            return Vec::new();
        };
        let from = self.log_scanned.min(text.len());
        self.log_scanned = text.len();
        String::from_utf8_lossy(&text[from..])
            .lines()
            .filter(|l| l.contains("panicked"))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for ENode {
    fn drop(&mut self) {
        self.signal(Signal::SIGCONT);
        self.kill9();
    }
}
