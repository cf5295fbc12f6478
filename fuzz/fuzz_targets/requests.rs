//! Transmission requests, pure parsing: every 28-byte header either fails
//! to parse or re-encodes to the same bytes.
#![no_main]
use dlsm::nbd::proto::{self, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for chunk in data.chunks(proto::REQUEST_LEN) {
        if let Ok(req) = Request::parse(chunk) {
            let mut out = Vec::new();
            req.encode(&mut out);
            assert_eq!(&out[..], &chunk[..proto::REQUEST_LEN]);
        }
    }
});
