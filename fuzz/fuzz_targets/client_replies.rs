//! The NBD client against a hostile server: the input is everything the
//! "server" sends (greeting, option replies, transmission replies). The
//! client must fail cleanly, never panic, and never hang; and a read it
//! returns never holds bytes of an earlier use of its (pooled, unzeroed)
//! buffer: the pool is filled with a poison pattern first, and a run of it
//! in the result that the input does not hold is a stale-byte leak.
#![no_main]
use std::time::Duration;

use dlsm::nbd::client::NbdClient;
use dlsm::nbd::proto;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn rt() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    // Pure parsers of the reply side first.
    if data.len() >= 4 {
        let magic = u32::from_be_bytes(data[..4].try_into().unwrap());
        if let Ok(rest) = proto::reply_header_rest(magic) {
            if data.len() >= 4 + rest {
                if let Ok(proto::ReplyHeader::Structured { ty, .. }) =
                    proto::parse_reply_header(&data[..4 + rest])
                {
                    let _ = proto::parse_chunk(ty, &data[4 + rest..]);
                }
            }
        }
    }
    // Reads of at least the pool's minimum come from it unzeroed.
    const READ: usize = 128 << 10;
    const POISON: u8 = 0xA5;
    const RUN: usize = 32;
    let input_has_run = data.windows(RUN).any(|w| w.iter().all(|b| *b == POISON));
    for _ in 0..4 {
        dlsm::bufpool::give(vec![POISON; READ + 2 * dlsm::bufpool::IO_ALIGN]);
    }
    let leaked =
        move |r: &[u8]| !input_has_run && r.windows(RUN).any(|w| w.iter().all(|b| *b == POISON));
    let data = data.to_vec();
    rt().block_on(async move {
        let (client_end, mut server_end) = tokio::io::duplex(1 << 16);
        // Say everything and close the sending side (the client sees EOF
        // once it has read it all), but keep reading what the client sends
        // until it hangs up, so its writes do not fail early.
        let server = tokio::spawn(async move {
            let _ = server_end.write_all(&data).await;
            let _ = server_end.shutdown().await;
            let mut sink = vec![0u8; 1 << 16];
            while let Ok(n) = server_end.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        });
        let run = async {
            let c = NbdClient::handshake(client_end, "fuzz", false).await?;
            if let Ok(r) = c.read(0, READ as u32).await {
                assert!(!leaked(&r), "read returned bytes of an earlier buffer");
            }
            let _ = c.block_status(0, 1 << 20).await;
            c.write(0, &[1u8; 512], false).await
        };
        let r = tokio::time::timeout(Duration::from_secs(5), run).await;
        assert!(r.is_ok(), "client hung on a hostile server");
        let _ = server.await;
    });
});
