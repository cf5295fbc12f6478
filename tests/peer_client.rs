//! The async peer client against hostile peers: after its timeout
//! the call must be over, connection included (no task or fd left holding
//! the socket).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use dlsm::api::peer::Peer;
use dlsm::api_client::ApiAuth;

/// Accepts one connection, reads the request head, then runs `then`;
/// returns whether the client closed the socket within `grace` after.
fn hostile(
    then: impl FnOnce(&mut std::net::TcpStream) + Send + 'static,
) -> (String, std::thread::JoinHandle<bool>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let h = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = [0u8; 4096];
        let mut got = Vec::new();
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                return true;
            }
            got.extend_from_slice(&buf[..n]);
        }
        then(&mut s);
        // Did the client let go? Read until EOF or 3 s.
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            match s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => return true,
            }
            // Keep trickling (a slow body): a write to a closed socket fails.
            if s.write_all(b"x").is_err() {
                return true;
            }
        }
        false
    });
    (addr, h)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_never_answering_is_let_go_at_timeout() {
    let (addr, h) = hostile(|_| std::thread::sleep(Duration::from_millis(800)));
    let t = Instant::now();
    let r = Peer::new(&addr, &ApiAuth::default(), Duration::from_millis(300))
        .get::<serde_json::Value>("/v1/node")
        .await;
    assert!(r.is_err());
    assert!(
        t.elapsed() < Duration::from_millis(700),
        "{:?}",
        t.elapsed()
    );
    assert!(h.join().unwrap(), "connection still held after the timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_trickling_a_body_is_let_go_at_timeout() {
    let (addr, h) = hostile(|s| {
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n[")
            .unwrap();
        for _ in 0..4 {
            std::thread::sleep(Duration::from_millis(100));
            if s.write_all(b"1,").is_err() {
                return;
            }
        }
    });
    let t = Instant::now();
    let r = Peer::new(&addr, &ApiAuth::default(), Duration::from_millis(300))
        .get::<serde_json::Value>("/v1/node")
        .await;
    assert!(r.is_err());
    assert!(
        t.elapsed() < Duration::from_millis(700),
        "{:?}",
        t.elapsed()
    );
    assert!(h.join().unwrap(), "connection still held after the timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_answer_over_the_limit_is_refused() {
    let (addr, h) = hostile(|s| {
        let n: usize = 65 << 20;
        let _ = s.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n").as_bytes());
        let chunk = vec![b' '; 1 << 20];
        for _ in 0..65 {
            if s.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    let r = Peer::new(&addr, &ApiAuth::default(), Duration::from_secs(10))
        .get::<serde_json::Value>("/v1/node")
        .await;
    assert!(r.is_err(), "{r:?}");
    assert!(h.join().unwrap());
}
