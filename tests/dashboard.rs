//! The dashboard against real nodes: the region view of a live migration
//! (`GET /v1/migrations/{name}/regions`), the server-sent events read off
//! a raw TCP connection, the page itself in headless Chromium driven over
//! WebDriver (screenshot in `target/dashboard.png`), and the streams'
//! limits: a cap, an end when the client leaves or the node stops, and
//! the token only where a browser needs it.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{client, pattern, require, wait_until, NodeProc};
use dlsm::api_client::Api;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
/// Region size of the test migrations (the default): 64 MiB is 1,024
/// regions, one per cell of the default view.
const RS: u64 = 64 << 10;
const ON_DEMAND: u64 = 4;
const WRITTEN: u64 = 8;
const PRESENT: u64 = 2;

fn get(node: &NodeProc, path: &str) -> Value {
    Api::new(&node.api).get(path).unwrap()
}

fn subscribers(node: &NodeProc) -> u64 {
    get(node, "/v1/node")["dashboard_subscribers"]
        .as_u64()
        .unwrap()
}

fn regions(node: &NodeProc, cells: usize) -> Value {
    get(node, &format!("/v1/migrations/vm1/regions?cells={cells}"))
}

fn cell(view: &Value, i: usize) -> u64 {
    view["cells"][i].as_u64().unwrap()
}

/// An HTTP/1.1 response read off a raw socket: status, headers, and the
/// body as it arrives (chunked or not), split into server-sent events.
struct RawStream {
    reader: BufReader<TcpStream>,
    status: u16,
    headers: Vec<(String, String)>,
    chunked: bool,
    /// Body text received and not yet split into events.
    pending: String,
}

impl RawStream {
    fn get(api: &str, path_and_query: &str, extra_headers: &[&str]) -> RawStream {
        let mut s = TcpStream::connect(api).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut req = format!(
            "GET {path_and_query} HTTP/1.1\r\nHost: {api}\r\nAccept: text/event-stream\r\n"
        );
        for h in extra_headers {
            req.push_str(h);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).unwrap();
        let mut reader = BufReader::new(s);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .unwrap_or_else(|| panic!("bad status line {line:?}"))
            .parse()
            .unwrap();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            reader.read_line(&mut h).unwrap();
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').unwrap();
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
        let chunked = headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
        RawStream {
            reader,
            status,
            headers,
            chunked,
            pending: String::new(),
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// More body text; `false` at the end of the body (or the connection).
    fn read_more(&mut self) -> bool {
        if self.chunked {
            let mut size = String::new();
            if self.reader.read_line(&mut size).unwrap_or(0) == 0 {
                return false;
            }
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap(), 16)
                .unwrap_or_else(|_| panic!("bad chunk size {size:?}"));
            let mut buf = vec![0u8; n + 2];
            if self.reader.read_exact(&mut buf).is_err() {
                return false;
            }
            if n == 0 {
                return false;
            }
            self.pending
                .push_str(std::str::from_utf8(&buf[..n]).expect("UTF-8 events"));
        } else {
            let mut buf = [0u8; 8192];
            match self.reader.read(&mut buf) {
                Ok(0) | Err(_) => return false,
                Ok(n) => self
                    .pending
                    .push_str(std::str::from_utf8(&buf[..n]).expect("UTF-8 events")),
            }
        }
        true
    }

    /// The next event's data, parsed; `None` when the stream ended.
    fn next_event(&mut self) -> Option<Value> {
        loop {
            if let Some(end) = self.pending.find("\n\n") {
                let block: String = self.pending.drain(..end + 2).collect();
                let data: Vec<&str> = block
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect();
                if data.is_empty() {
                    continue; // a comment or keep-alive
                }
                return Some(serde_json::from_str(&data.join("\n")).expect("event is JSON"));
            }
            if !self.read_more() {
                return None;
            }
        }
    }

    /// The whole body of a response that is not a stream.
    fn body(mut self) -> String {
        while self.read_more() {
            if !self.chunked
                && self
                    .header("content-length")
                    .is_some_and(|l| l.parse::<usize>().unwrap() <= self.pending.len())
            {
                break;
            }
        }
        self.pending
    }
}

/// A chromedriver process and one headless Chromium session.
struct Browser {
    base: String,
    session: String,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Browser {
        let chromium = require("chromium");
        let chromedriver = require("chromedriver");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let base = format!("http://127.0.0.1:{port}");
        let mut b = Browser {
            base,
            session: String::new(),
            driver,
            _profile: tempfile::tempdir().unwrap(),
        };
        wait_until("chromedriver answers", 30, || {
            ureq::get(&format!("{}/status", b.base)).call().is_ok()
        });
        let profile = b._profile.path().display().to_string();
        let caps = json!({ "capabilities": { "alwaysMatch": { "goog:chromeOptions": {
            "binary": chromium,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                format!("--user-data-dir={profile}"), "--window-size=1280,900",
            ],
        }}}});
        let v = b.call("POST", "/session", Some(caps));
        b.session = v["sessionId"].as_str().expect("a session").to_owned();
        b
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.base);
        let req = ureq::request(method, &url).timeout(Duration::from_secs(120));
        let r = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match r {
            Ok(r) => r.into_json::<Value>().unwrap()["value"].take(),
            Err(ureq::Error::Status(code, r)) => {
                panic!(
                    "WebDriver {method} {path}: {code} {}",
                    r.into_string().unwrap()
                )
            }
            Err(e) => panic!("WebDriver {method} {path}: {e}"),
        }
    }

    fn goto(&self, url: &str) {
        let path = format!("/session/{}/url", self.session);
        self.call("POST", &path, Some(json!({ "url": url })));
    }

    /// Runs `script` (a function body) in the page; returns its value.
    fn eval(&self, script: &str) -> Value {
        let path = format!("/session/{}/execute/sync", self.session);
        self.call("POST", &path, Some(json!({ "script": script, "args": [] })))
    }

    fn screenshot(&self, to: &std::path::Path) {
        use base64::Engine;
        let path = format!("/session/{}/screenshot", self.session);
        let png = self.call("GET", &path, None);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::write(to, bytes).unwrap();
    }

    /// Ends the session (Chromium exits) and chromedriver.
    fn close(mut self) {
        self.quit();
    }

    fn quit(&mut self) {
        if !self.session.is_empty() {
            let path = format!("/session/{}", self.session);
            let _ = ureq::request("DELETE", &format!("{}{path}", self.base))
                .timeout(Duration::from_secs(30))
                .call();
            self.session.clear();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.quit();
    }
}

/// Where a test keeps what a person looks at afterwards: `target/`.
fn artefact(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join(name)
}

/// What the page shows of vm1's region map, or `None` before it drew one.
fn page_map(b: &Browser) -> Option<(u64, u64, u64, u64)> {
    let v = b.eval(
        "const m = document.querySelector('.map[data-volume=\"vm1\"]');
         if (!m || m.hidden || !m.dataset.present) return null;
         return [Number(m.dataset.present), m.querySelectorAll('.c.s2').length,
                 m.querySelectorAll('.c.d').length, m.querySelectorAll('.c.w').length];",
    );
    let a = v.as_array()?;
    let n = |i: usize| a[i].as_u64().unwrap();
    Some((n(0), n(1), n(2), n(3)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_region_map_events_and_page_follow_a_live_migration() {
    let a = NodeProc::start();
    let b = NodeProc::start();
    a.create("vm1", "64M");
    let mut data = pattern((64 * MIB) as usize, 11);
    {
        let c = client(&a, "vm1").await;
        for (i, piece) in data.chunks(8 << 20).enumerate() {
            c.write((i << 23) as u64, piece, false).await.unwrap();
        }
        c.flush().await.unwrap();
    }
    // Slow: one 4 MiB batch every 4 s.
    a.cli_ok(&["migrate", "vm1", "--to", &b.api, "--rate", "1M"]);
    let cb = client(&b, "vm1").await;
    // The first write at B hands off: regions 320..352 written here.
    cb.write(20 * MIB, &vec![7u8; 2 * MIB as usize], false)
        .await
        .unwrap();
    data[(20 * MIB) as usize..(22 * MIB) as usize].fill(7);
    // Far ahead of the copier: regions 640..656 and 800 fetched on demand.
    let got = cb.read(40 * MIB, MIB as u32).await.unwrap();
    assert!(got == data[(40 * MIB) as usize..(41 * MIB) as usize]);
    let got = cb.read(50 * MIB, RS as u32).await.unwrap();
    assert!(got == data[(50 * MIB) as usize..(50 * MIB + RS) as usize]);

    // 1. The region view: flags exactly where the client went, present
    //    cells growing as the copy runs.
    let v = regions(&b, 1024);
    assert_eq!(v["regions_total"], 1024, "{v}");
    assert_eq!(v["cells"].as_array().unwrap().len(), 1024);
    for r in 640..656 {
        assert_eq!(
            cell(&v, r) & (ON_DEMAND | 3),
            ON_DEMAND | PRESENT,
            "cell {r}"
        );
    }
    assert_eq!(cell(&v, 800) & (ON_DEMAND | 3), ON_DEMAND | PRESENT);
    for r in 320..352 {
        assert_eq!(cell(&v, r) & (WRITTEN | 3), WRITTEN | PRESENT, "cell {r}");
    }
    for r in [639, 656, 799, 801, 319, 352, 1000] {
        assert_eq!(
            cell(&v, r) & (ON_DEMAND | WRITTEN),
            0,
            "cell {r}: {}",
            cell(&v, r)
        );
    }
    assert_eq!(v["counts"]["on_demand"], 17, "{}", v["counts"]);
    assert_eq!(v["counts"]["written"], 32, "{}", v["counts"]);
    // Downsampled to 16 cells of 64 regions: the flags stay in their cells.
    let coarse = regions(&b, 16);
    let flags: Vec<u64> = (0..16)
        .map(|i| cell(&coarse, i) & (ON_DEMAND | WRITTEN))
        .collect();
    let mut want = vec![0; 16];
    want[5] = WRITTEN;
    want[10] = ON_DEMAND;
    want[12] = ON_DEMAND;
    assert_eq!(flags, want, "{coarse}");
    let before = v["regions_present"].as_u64().unwrap();
    wait_until("present regions grow", 30, || {
        regions(&b, 1024)["regions_present"].as_u64().unwrap() > before
    });
    let later = regions(&b, 1024);
    assert!(later["counts"]["present"].as_u64() > v["counts"]["present"].as_u64());
    // Bad asks.
    let api = Api::new(&b.api);
    for bad in ["cells=0", "cells=5000", "cells=x", "nope=1"] {
        let e = api
            .get::<Value>(&format!("/v1/migrations/vm1/regions?{bad}"))
            .unwrap_err();
        assert_eq!(dlsm::api_client::status_of(&e), Some(400), "{bad}");
    }
    b.create("other", "1M");
    let e = api
        .get::<Value>("/v1/migrations/other/regions")
        .unwrap_err();
    assert_eq!(dlsm::api_client::status_of(&e), Some(404));

    // 2. The event stream, off a raw socket.
    let mut s = RawStream::get(&b.api, "/v1/events", &[]);
    assert_eq!(s.status, 200);
    assert_eq!(s.header("content-type"), Some("text/event-stream"));
    let e1 = s.next_event().expect("a first event");
    let e2 = s.next_event().expect("a second event");
    assert!(e2["at_ms"].as_u64() > e1["at_ms"].as_u64(), "{e1} {e2}");
    for e in [&e1, &e2] {
        assert_eq!(e["api"], b.api.as_str());
        let m = e["migrations"].as_array().unwrap();
        assert!(
            m.iter()
                .any(|m| m["volume"] == "vm1" && m["role"] == "destination"),
            "{e}"
        );
        let views = e["regions"].as_array().unwrap();
        assert_eq!(views.len(), 1, "{e}");
        assert_eq!(views[0]["volume"], "vm1");
        assert_eq!(views[0]["cells"].as_array().unwrap().len(), 1024);
        assert_eq!(views[0]["counts"]["on_demand"], 17);
        let vols: Vec<&str> = e["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert!(vols.contains(&"vm1") && vols.contains(&"other"), "{e}");
        assert_eq!(e["subscribers"], 1);
    }
    drop(s);
    wait_until("the stream's slot is given back", 10, || {
        subscribers(&b) == 0
    });

    // 3. The page, in headless Chromium: it loads, draws the map, and the
    //    map fills as the copy runs. The copy is paused while the browser
    //    starts, so that it is still partly filled when looked at.
    b.cli_ok(&["migration", "pause", "vm1"]);
    let browser = Browser::start();
    browser.goto(&format!("http://{}/ui", b.api));
    wait_until("the page draws vm1's region map", 60, || {
        page_map(&browser).is_some()
    });
    let (first, cells_present, on_demand, written) = page_map(&browser).unwrap();
    assert_eq!(
        first, cells_present,
        "data-present counts the present cells"
    );
    assert!(on_demand >= 17 && written >= 32, "{on_demand} {written}");
    let title = browser.eval("return document.title;");
    assert!(title.as_str().unwrap().starts_with("dlsm"), "{title}");
    let text = browser.eval("return document.body.innerText;");
    let text = text.as_str().unwrap();
    assert!(text.contains("vm1") && text.contains("paused"), "{text}");
    b.cli_ok(&["migration", "resume", "vm1"]);
    wait_until("the page's map fills as the copy runs", 60, || {
        page_map(&browser).is_some_and(|(p, _, _, _)| p > first)
    });
    // Let a little more arrive, so the picture shows a copy under way.
    std::thread::sleep(Duration::from_secs(3));
    let (now, _, _, _) = page_map(&browser).unwrap();
    assert!(now > first && now < 1024, "{first} -> {now}");
    let shot = artefact("dashboard.png");
    browser.screenshot(&shot);
    eprintln!("dashboard screenshot: {}", shot.display());
    assert_eq!(subscribers(&b), 1, "the page holds one stream");
    browser.close();
    wait_until("the page's stream ends with the browser", 15, || {
        subscribers(&b) == 0
    });

    // The copy completes; the data is the source's plus the write here.
    b.cli_ok(&["migration", "set-rate", "vm1", "0"]);
    b.wait_phase("vm1", "complete", 60);
    for half in 0..2u64 {
        let got = cb.read(half * 32 * MIB, 32 * MIB as u32).await.unwrap();
        let want = &data[(half * 32 * MIB) as usize..((half + 1) * 32 * MIB) as usize];
        assert!(got == want, "data differs after the migration");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_are_capped_and_end_with_their_client_and_with_the_node() {
    let mut n = NodeProc::start();
    n.create("vm1", "8M");
    // Sixteen at once, each with its first event; the seventeenth is
    // refused with a clear 503.
    let mut open: Vec<RawStream> = (0..16)
        .map(|_| {
            let mut s = RawStream::get(&n.api, "/v1/events", &[]);
            assert_eq!(s.status, 200);
            s.next_event().expect("an event");
            s
        })
        .collect();
    assert_eq!(subscribers(&n), 16);
    let refused = RawStream::get(&n.api, "/v1/events", &[]);
    assert_eq!(refused.status, 503);
    assert!(refused.header("retry-after").is_some());
    let body = refused.body();
    assert!(body.contains("16 dashboard event streams"), "{body}");
    // Clients that go away give their slots back (the streams end: no task
    // is left behind holding one).
    open.truncate(3);
    wait_until("13 slots given back", 10, || subscribers(&n) == 3);
    open.clear();
    wait_until("every slot given back", 10, || subscribers(&n) == 0);
    let mut again = RawStream::get(&n.api, "/v1/events", &[]);
    assert_eq!(again.status, 200);
    let e = again.next_event().expect("an event after the others left");
    assert_eq!(e["volumes"][0]["name"], "vm1");
    // The node stops promptly with a stream open (well within the 30 s it
    // gives requests in progress), and the stream ends cleanly.
    let t = Instant::now();
    assert!(n.stop(), "the node did not exit cleanly");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "shutdown waited {:?} for the open stream",
        t.elapsed()
    );
    while again.next_event().is_some() {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_reaches_the_event_stream_by_query_and_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let token = tmp.path().join("token");
    std::fs::write(&token, "dashboard-token-0123456789\n").unwrap();
    let n = NodeProc::start_with(
        &tmp.path().join("d"),
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--api-token-file", token.to_str().unwrap()],
    );
    let tok = "dashboard-token-0123456789";
    // The page is constant and holds no data: no token needed.
    let page = RawStream::get(&n.api, "/ui", &[]);
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    let csp = page.header("content-security-policy").unwrap().to_owned();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert_eq!(page.header("referrer-policy"), Some("no-referrer"));
    assert!(page.body().contains("ui/dashboard.js"));
    for asset in ["/ui/dashboard.js", "/ui/dashboard.css"] {
        assert_eq!(RawStream::get(&n.api, asset, &[]).status, 200, "{asset}");
    }
    // The stream: the header, or ?token= (what the page sends).
    assert_eq!(RawStream::get(&n.api, "/v1/events", &[]).status, 401);
    let wrong = RawStream::get(&n.api, "/v1/events?token=dashboard-token-wrong00000", &[]);
    assert_eq!(wrong.status, 401);
    let mut s = RawStream::get(&n.api, &format!("/v1/events?token={tok}"), &[]);
    assert_eq!(s.status, 200);
    assert!(s.next_event().is_some());
    drop(s);
    let bearer = format!("Authorization: Bearer {tok}");
    let mut s = RawStream::get(&n.api, "/v1/events", &[&bearer]);
    assert_eq!(s.status, 200);
    assert!(s.next_event().is_some());
    drop(s);
    // Nowhere else is a token in the URL accepted.
    for path in [
        "/v1/volumes",
        "/v1/node",
        "/v1/migrations",
        "/v1/migrations/x/regions",
    ] {
        let r = RawStream::get(&n.api, &format!("{path}?token={tok}"), &[]);
        assert_eq!(r.status, 401, "{path}");
    }
    let r = RawStream::get(&n.api, "/v1/node", &[&bearer]);
    assert_eq!(r.status, 200);
}
