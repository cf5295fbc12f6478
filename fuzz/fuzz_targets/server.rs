//! The NBD server against a hostile client: the input is everything the
//! "client" sends, from its flags through options and requests, served by
//! the real `serve_connection` over a real (sparse file) target. The server
//! must answer or hang up, never panic, and never hang.
//!
//! The first input byte picks the mode: even, no TLS; odd, TLS required
//! (options before STARTTLS refused; after it, whatever follows is fed to
//! rustls as the client's side of a TLS handshake).
#![no_main]
use std::sync::Arc;
use std::time::Duration;

use dlsm::nbd::server::{serve_connection, Export, ExportRegistry, HandshakePolicy};
use dlsm::target::local::LocalTarget;
use dlsm::target::BlockTarget;
use dlsm::tls::TlsConfig;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct OneExport(Arc<dyn BlockTarget>);

impl ExportRegistry for OneExport {
    fn list(&self) -> Vec<(String, String)> {
        vec![("vm".into(), "fuzz".into())]
    }
    fn open(&self, name: &str) -> Option<Export> {
        (name == "vm").then(|| Export {
            name: name.into(),
            description: "fuzz".into(),
            target: self.0.clone(),
            read_only: false,
            bulk_reads: false,
            guard: Box::new(()),
        })
    }
}

struct Env {
    rt: tokio::runtime::Runtime,
    registry: Arc<dyn ExportRegistry>,
    tls: tokio_rustls::TlsAcceptor,
    _dir: tempfile::TempDir,
}

fn env() -> &'static Env {
    static ENV: std::sync::OnceLock<Env> = std::sync::OnceLock::new();
    ENV.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let t = LocalTarget::create(&dir.path().join("vm.raw"), 1 << 20).unwrap();
        Env {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            registry: Arc::new(OneExport(Arc::new(t))),
            tls: TlsConfig::load_node(std::path::Path::new(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tls"
            )))
            .unwrap()
            .acceptor()
            .unwrap(),
            _dir: dir,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let env = env();
    let policy = HandshakePolicy {
        tls: (mode & 1 == 1).then(|| env.tls.clone()),
        ..HandshakePolicy::plain()
    };
    let data = data.to_vec();
    env.rt.block_on(async move {
        let (server_end, mut client_end) = tokio::io::duplex(1 << 16);
        let (_stop, stop_rx) = tokio::sync::watch::channel(false);
        let server = tokio::spawn(serve_connection(
            server_end,
            env.registry.clone(),
            policy,
            stop_rx,
            "fuzz".into(),
            Default::default(),
        ));
        let client = async move {
            let mut greeting = [0u8; 18];
            client_end.read_exact(&mut greeting).await?;
            let _ = client_end.write_all(&data).await;
            let _ = client_end.shutdown().await;
            let mut sink = vec![0u8; 1 << 16];
            while client_end.read(&mut sink).await? > 0 {}
            std::io::Result::Ok(())
        };
        let r = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = client.await;
            let _ = server.await.expect("server task panicked");
        })
        .await;
        assert!(r.is_ok(), "server hung on a hostile client");
    });
});
