//! The vhost-user sockets: one per volume, at `DIR/NAME`, following the
//! set of volumes on the node.
//!
//! Each socket has a thread that waits for a frontend (QEMU connects as
//! the vhost-user client) and serves it with a fresh [`BlockDevice`] until
//! it goes; a frontend that comes back (QEMU's `reconnect`) is served
//! again from scratch, as the protocol expects. One frontend at a time:
//! while one is connected, others are accepted and closed at once with a
//! warning in the node's log (the protocol has no way to say why; QEMU
//! reports the closed socket). A connected frontend counts as a client of
//! the volume, as an NBD connection does, so `volume rm` refuses and a
//! migration's source waits for it like any other.
//!
//! What this module never does: touch volume data or tables. It only
//! opens the volume's gated target, as the NBD server does.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tracing::{info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::GuestMemoryAtomic;

use super::device::{BlockDevice, DeviceConfig};
use crate::node::store::Volume;

/// How often an idle socket thread checks whether to stop.
const TICK: Duration = Duration::from_millis(200);

/// Every volume's vhost-user socket.
pub struct VhostExports {
    dir: PathBuf,
    num_queues: usize,
    rt: tokio::runtime::Handle,
    exports: Mutex<HashMap<String, Socket>>,
}

struct Socket {
    /// The volume it serves (a volume removed and made again under the
    /// same name gets a new socket).
    volume: Arc<Volume>,
    state: Arc<SocketState>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct SocketState {
    stop: AtomicBool,
    /// The connected frontend's connection, to cut it on stop.
    active: Mutex<Option<ShutdownHandle>>,
}

impl VhostExports {
    /// Sockets under `dir` (created if missing), devices offering
    /// `num_queues` queues, I/O on `rt`.
    pub fn new(dir: &Path, num_queues: usize, rt: tokio::runtime::Handle) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(VhostExports {
            dir: dir.to_owned(),
            num_queues,
            rt,
            exports: Mutex::new(HashMap::new()),
        })
    }

    /// Where the sockets are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The socket path of volume `name`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Makes the sockets match `volumes`: new volumes get one, volumes gone
    /// (or replaced) lose theirs.
    pub fn sync(&self, volumes: &[Arc<Volume>]) {
        let mut exports = self.exports.lock().unwrap();
        let gone: Vec<String> = exports
            .iter()
            .filter(|(name, s)| {
                !volumes
                    .iter()
                    .any(|v| &v.name == *name && Arc::ptr_eq(v, &s.volume))
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in gone {
            if let Some(s) = exports.remove(&name) {
                s.stop(&self.path(&name));
                info!(volume = %name, "vhost-user: socket removed");
            }
        }
        for v in volumes {
            if exports.contains_key(&v.name) {
                continue;
            }
            match self.open(v) {
                Ok(s) => {
                    info!(volume = %v.name, socket = %self.path(&v.name).display(), "vhost-user: serving");
                    exports.insert(v.name.clone(), s);
                }
                Err(e) => {
                    warn!(volume = %v.name, error = %e, "vhost-user: cannot open the socket")
                }
            }
        }
    }

    /// Stops every socket (node shutdown).
    pub fn stop_all(&self) {
        let all: Vec<(String, Socket)> = self.exports.lock().unwrap().drain().collect();
        for (name, s) in all {
            s.stop(&self.path(&name));
        }
    }

    fn open(&self, vol: &Arc<Volume>) -> std::io::Result<Socket> {
        let path = self.path(&vol.name);
        // A socket file left by an earlier run would make bind fail.
        if path.exists() {
            std::fs::remove_file(&path)?;
        }
        let listener = UnixListener::bind(&path)?;
        let state = Arc::new(SocketState::default());
        let thread = {
            let (state, vol, rt) = (state.clone(), vol.clone(), self.rt.clone());
            let cfg = DeviceConfig::new(&vol.name, self.num_queues, false);
            std::thread::Builder::new()
                .name(format!("vhost-{}", vol.name))
                .spawn(move || serve_socket(listener, &state, &vol, cfg, rt))?
        };
        Ok(Socket {
            volume: vol.clone(),
            state,
            thread: Some(thread),
        })
    }
}

impl Socket {
    fn stop(mut self, path: &Path) {
        self.state.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.state.active.lock().unwrap().take() {
            h.shutdown();
        }
        // A connection seen waiting and then withdrawn leaves the thread
        // blocked in accept: one more, closed at once, frees it.
        drop(std::os::unix::net::UnixStream::connect(path));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(path);
    }
}

/// Waits up to one tick for a connection on `l`.
fn readable(l: &UnixListener) -> bool {
    let mut fds = [PollFd::new(l.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::from(TICK.as_millis() as u16)), Ok(n) if n > 0)
}

/// The socket's thread: one frontend at a time, until stopped.
fn serve_socket(
    listener: UnixListener,
    state: &SocketState,
    vol: &Arc<Volume>,
    cfg: DeviceConfig,
    rt: tokio::runtime::Handle,
) {
    let name = vol.name.clone();
    while !state.stop.load(Ordering::SeqCst) {
        if !readable(&listener) {
            continue;
        }
        let device = match BlockDevice::new(cfg.clone(), vol.gated_target(), rt.clone()) {
            Ok(d) => d,
            Err(e) => {
                warn!(volume = %name, error = %e, "vhost-user: cannot make the device");
                std::thread::sleep(TICK);
                continue;
            }
        };
        let mut daemon = match VhostUserDaemon::new(
            format!("vhost-{name}-conn"),
            device.clone(),
            GuestMemoryAtomic::new(Default::default()),
        ) {
            Ok(d) => d,
            Err(e) => {
                warn!(volume = %name, error = %e, "vhost-user: cannot start the device");
                std::thread::sleep(TICK);
                continue;
            }
        };
        // `start` accepts the connection `readable` saw waiting.
        let mut l = match listener.try_clone() {
            Ok(l) => Listener::from(l),
            Err(e) => {
                warn!(volume = %name, error = %e, "vhost-user: listener");
                std::thread::sleep(TICK);
                continue;
            }
        };
        if let Err(e) = daemon.start(&mut l) {
            warn!(volume = %name, error = %e, "vhost-user: frontend connection failed");
            continue;
        }
        let guard = vol.connection_guard();
        info!(volume = %name, "vhost-user: frontend connected");
        *state.active.lock().unwrap() = daemon.shutdown_handle();
        // A stop that came between the accept and the line above found no
        // connection to cut: cut it here, or `wait` (and the stop joining
        // this thread) lasts as long as the frontend stays.
        if state.stop.load(Ordering::SeqCst) {
            daemon.request_shutdown();
        }
        // Refuse further frontends while this one is served.
        let busy = Arc::new(AtomicBool::new(true));
        let refuser = {
            let (l, busy, name) = (listener.try_clone(), busy.clone(), name.clone());
            std::thread::Builder::new()
                .name(format!("vhost-{name}-busy"))
                .spawn(move || {
                    let Ok(l) = l else { return };
                    while busy.load(Ordering::SeqCst) {
                        if readable(&l) && busy.load(Ordering::SeqCst) {
                            if let Ok((s, _)) = l.accept() {
                                warn!(volume = %name,
                                      "vhost-user: refused a second frontend: the volume already has one connected");
                                drop(s);
                            }
                        }
                    }
                })
                .ok()
        };
        match daemon.wait() {
            Ok(()) => info!(volume = %name, "vhost-user: frontend disconnected"),
            Err(e) => {
                info!(volume = %name, error = %e, "vhost-user: frontend connection ended")
            }
        }
        busy.store(false, Ordering::SeqCst);
        if let Some(r) = refuser {
            let _ = r.join();
        }
        state.active.lock().unwrap().take();
        // Dropping the daemon stops and joins the queue workers; requests
        // still in flight write nothing more into guest memory.
        device.stop_workers();
        drop(daemon);
        // The next frontend (QEMU reconnecting offers again what was not
        // answered) is served only once the gone one's requests are done,
        // so none of its writes lands after one of the next frontend's;
        // until then the volume still has this client.
        let mut warned = false;
        while !device.wait_idle(TICK) && !state.stop.load(Ordering::SeqCst) {
            if !warned {
                warn!(volume = %name, "vhost-user: waiting for the requests of a gone frontend");
                warned = true;
            }
        }
        drop(guard);
    }
}
