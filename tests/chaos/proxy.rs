//! A fault-injecting TCP proxy for node-to-node traffic.
//!
//! Each node advertises the proxy's address instead of its own, so every
//! byte one node sends another (fetches over NBD, fence/release/handoff
//! calls over the API) crosses a proxy the harness controls:
//!
//! - `Up`: forwards, optionally delaying every chunk (a slow link);
//! - `Reset`: closes every connection with RST and refuses new ones (a
//!   peer that is gone, a firewall that rejects);
//! - `Blackhole`: keeps sockets open and forwards nothing, in either
//!   direction (a dead link with no RST: only timeouts notice). Traffic
//!   held while blackholed flows again when the link is restored, as TCP
//!   retransmission would.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Up,
    Reset,
    Blackhole,
}

pub struct Proxy {
    pub addr: String,
    mode: watch::Sender<Mode>,
    delay_ms: Arc<AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port, forwarding to `upstream`.
    pub async fn start(upstream: String) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let (mode, rx) = watch::channel(Mode::Up);
        let delay_ms = Arc::new(AtomicU64::new(0));
        let d = delay_ms.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                let (rx, d, up) = (rx.clone(), d.clone(), upstream.clone());
                tokio::spawn(conn(s, up, rx, d));
            }
        });
        Proxy {
            addr,
            mode,
            delay_ms,
            accept,
        }
    }

    pub fn set(&self, m: Mode) {
        self.mode.send_replace(m);
    }

    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }

    pub fn set_delay(&self, ms: u64) {
        self.delay_ms.store(ms, Ordering::Relaxed);
    }

    pub fn delay(&self) -> u64 {
        self.delay_ms.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        // Every connection task ends on Reset.
        self.mode.send_replace(Mode::Reset);
    }
}

/// Closes with RST (linger 0) rather than FIN.
#[allow(deprecated)] // linger 0 never blocks: the close is an immediate RST
fn rst(s: &TcpStream) {
    let _ = s.set_linger(Some(Duration::ZERO));
}

async fn wait_reset(mut rx: watch::Receiver<Mode>) {
    let _ = rx.wait_for(|m| *m == Mode::Reset).await;
}

async fn conn(
    client: TcpStream,
    upstream: String,
    mut rx: watch::Receiver<Mode>,
    delay: Arc<AtomicU64>,
) {
    // A new connection: refused while reset, held (never connected
    // upstream) while blackholed.
    loop {
        let m = *rx.borrow_and_update();
        match m {
            Mode::Up => break,
            Mode::Reset => return rst(&client),
            Mode::Blackhole => {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        }
    }
    let Ok(server) = TcpStream::connect(&upstream).await else {
        return rst(&client);
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    rst(&client);
    rst(&server);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let a = pump(cr, sw, rx.clone(), delay.clone());
    let b = pump(sr, cw, rx.clone(), delay);
    tokio::select! {
        _ = async { tokio::join!(a, b) } => {}
        _ = wait_reset(rx) => {}
    }
    // Dropping the halves closes both sockets (with RST: linger 0).
}

async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    mut rx: watch::Receiver<Mode>,
    delay: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = w.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        // Hold the bytes while the link is blackholed.
        loop {
            let m = *rx.borrow_and_update();
            match m {
                Mode::Up => break,
                Mode::Reset => return,
                Mode::Blackhole => {
                    if rx.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
        let d = delay.load(Ordering::Relaxed);
        if d > 0 {
            tokio::time::sleep(Duration::from_millis(d)).await;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
