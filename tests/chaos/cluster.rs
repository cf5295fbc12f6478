//! The chaos harness's nodes: real `dlsm serve` processes on fixed
//! loopback ports, each behind two fault-injecting proxies (NBD and API)
//! for node-to-node traffic, with its log in a file (scanned for panics),
//! SIGSTOP/SIGCONT, and optionally its data directory on a small tmpfs that
//! can be filled.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::proxy::Proxy;
use crate::common::{ready_line, Tmpfs};

pub const DLSM: &str = env!("CARGO_BIN_EXE_dlsm");

/// Seconds a request needing an unreachable source waits (the node flag).
pub const SOURCE_TIMEOUT: &str = "3";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Running,
    Frozen,
    Dead,
}

pub struct Node {
    pub idx: usize,
    pub data_dir: PathBuf,
    /// Direct addresses (the harness's own clients and CLI calls).
    pub nbd: String,
    pub api: String,
    /// Proxies other nodes reach this node through (advertised).
    pub pnbd: Proxy,
    pub papi: Proxy,
    pub log: PathBuf,
    log_scanned: u64,
    child: Option<Child>,
    pub state: State,
    /// When the node last started or was thawed.
    pub since: Instant,
    /// A filler file making the tmpfs full, while present.
    pub filler: Option<PathBuf>,
    // Dropped after the child is killed (declaration order: see Drop).
    pub tmpfs: Option<Tmpfs>,
}

pub use crate::common::free_port;

/// The outcome of one CLI call.
pub struct Out {
    pub ok: bool,
    pub timed_out: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn json(&self) -> Option<serde_json::Value> {
        if self.ok {
            serde_json::from_str(&self.stdout).ok()
        } else {
            None
        }
    }
    /// One line of why it failed.
    pub fn why(&self) -> String {
        if self.timed_out {
            return "timed out".into();
        }
        self.stderr.trim().lines().last().unwrap_or("").to_owned()
    }
}

/// Runs a command with a deadline; kills it when the deadline passes.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Out {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = se.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let (ok, timed_out) = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break (st.success(), false);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break (false, true);
        }
        std::thread::sleep(Duration::from_millis(3));
    };
    Out {
        ok,
        timed_out,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

/// A CLI call against the API at `api`.
pub fn cli(api: &str, args: &[&str], timeout: Duration) -> Out {
    run_bounded(
        Command::new(DLSM)
            .arg("--api")
            .arg(api)
            .args(args)
            .env("RUST_LOG", "error"),
        timeout,
    )
}

impl Node {
    pub fn new(
        idx: usize,
        data_dir: PathBuf,
        log: PathBuf,
        pnbd: Proxy,
        papi: Proxy,
        nbd: String,
        api: String,
    ) -> Node {
        Node {
            idx,
            data_dir,
            nbd,
            api,
            pnbd,
            papi,
            log,
            log_scanned: 0,
            child: None,
            state: State::Dead,
            since: Instant::now(),
            filler: None,
            tmpfs: None,
        }
    }

    pub fn name(&self) -> String {
        format!("n{}", self.idx)
    }

    fn serve_cmd(&self, nbd: &str, api: &str) -> Command {
        let mut c = Command::new(DLSM);
        c.args(["serve", "--data-dir"])
            .arg(&self.data_dir)
            .args(["--listen", nbd, "--api", api, "--node", &self.name()])
            .args(["--advertise-nbd", &self.pnbd.addr])
            .args(["--advertise-api", &self.papi.addr])
            .args(["--source-timeout", SOURCE_TIMEOUT])
            .env(
                "RUST_LOG",
                std::env::var("DLSM_TEST_LOG").unwrap_or_else(|_| "warn,rustls=error".into()),
            );
        c
    }

    fn log_file(&self) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap()
    }

    /// Starts the node; Err with the reason if it does not come up.
    pub fn start(&mut self) -> Result<(), String> {
        assert!(self.child.is_none());
        use std::io::Write;
        let _ = writeln!(self.log_file(), "=== chaos: starting {}", self.name());
        let mut child = self
            .serve_cmd(&self.nbd, &self.api)
            .stdout(Stdio::piped())
            .stderr(self.log_file())
            .spawn()
            .expect("spawn dlsm serve");
        match ready_line(&mut child, Duration::from_secs(20)) {
            Ok(_) => {
                self.child = Some(child);
                self.state = State::Running;
                self.since = Instant::now();
                Ok(())
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    /// Starts a second `dlsm serve` on this node's data directory (other
    /// ports). Ok(child) if it came up (it should not), Err(why) if it
    /// refused.
    pub fn second_serve(&self) -> Result<Child, String> {
        let (n, a) = (
            format!("127.0.0.1:{}", free_port()),
            format!("127.0.0.1:{}", free_port()),
        );
        let mut child = self
            .serve_cmd(&n, &a)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn dlsm serve");
        match ready_line(&mut child, Duration::from_secs(10)) {
            Ok(_) => Ok(child),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                let mut s = String::new();
                if let Some(mut se) = child.stderr.take() {
                    let _ = se.read_to_string(&mut s);
                }
                Err(format!("{e}: {}", s.trim().lines().last().unwrap_or("")))
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
        self.state = State::Dead;
    }

    pub fn freeze(&mut self) {
        if let Some(p) = self.pid() {
            let _ = kill(p, Signal::SIGSTOP);
            self.state = State::Frozen;
        }
    }

    pub fn thaw(&mut self) {
        if let Some(p) = self.pid() {
            let _ = kill(p, Signal::SIGCONT);
            self.state = State::Running;
            self.since = Instant::now();
        }
    }

    /// Whether the process exited by itself (a crash), with its status.
    pub fn exited(&mut self) -> Option<String> {
        let c = self.child.as_mut()?;
        match c.try_wait() {
            Ok(Some(st)) => {
                self.child = None;
                self.state = State::Dead;
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
        let from = (self.log_scanned as usize).min(text.len());
        self.log_scanned = text.len() as u64;
        String::from_utf8_lossy(&text[from..])
            .lines()
            .filter(|l| l.contains("panicked"))
            .map(str::to_owned)
            .collect()
    }

    /// Fills the data directory's tmpfs, leaving `slack` bytes.
    pub fn fill_disk(&mut self, slack: u64) -> bool {
        if self.tmpfs.is_none() || self.filler.is_some() {
            return false;
        }
        let st = nix::sys::statvfs::statvfs(&self.data_dir).unwrap();
        let free = st.blocks_available() as u64 * st.fragment_size() as u64;
        let path = self.data_dir.join("chaos-filler");
        let want = free.saturating_sub(slack);
        let f = std::fs::File::create(&path).unwrap();
        let _ = nix::fcntl::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            nix::fcntl::FallocateFlags::empty(),
            0,
            want as i64,
        );
        self.filler = Some(path);
        true
    }

    pub fn free_disk(&mut self) -> bool {
        match self.filler.take() {
            Some(p) => {
                let _ = std::fs::remove_file(p);
                true
            }
            None => false,
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(p) = self.pid() {
            let _ = kill(p, Signal::SIGCONT);
        }
        self.kill9();
        self.free_disk();
        // tmpfs unmounted after the process is gone (field drop).
    }
}
