//! Option haggling, pure parsing: an option header then its data, as the
//! server reads them. Whatever parses must re-encode to what was read.
#![no_main]
use dlsm::nbd::proto::{self, ClientOption};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while rest.len() >= proto::OPTION_HEADER_LEN {
        let (hdr, tail) = rest.split_at(proto::OPTION_HEADER_LEN);
        let Ok(h) = proto::parse_option_header(hdr) else {
            return;
        };
        let len = (h.len as usize).min(tail.len());
        let (body, tail) = tail.split_at(len);
        if let Ok(opt) = proto::parse_option(h.code, body) {
            // Structured options survive a round trip.
            match &opt {
                ClientOption::Go(r) | ClientOption::Info(r) => {
                    assert_eq!(proto::parse_option(h.code, &r.encode()).unwrap(), opt);
                }
                ClientOption::ListMetaContext(q) | ClientOption::SetMetaContext(q) => {
                    assert_eq!(proto::parse_option(h.code, &q.encode()).unwrap(), opt);
                }
                _ => {}
            }
        }
        rest = tail;
    }
    // Option replies, as a client reads them.
    if data.len() >= proto::OPT_REPLY_HEADER_LEN {
        let _ = proto::parse_opt_reply_header(&data[..proto::OPT_REPLY_HEADER_LEN]);
        let body = &data[proto::OPT_REPLY_HEADER_LEN..];
        let _ = proto::InfoItem::parse(body);
        let _ = proto::parse_rep_server(body);
        let _ = proto::parse_rep_meta_context(body);
    }
    let _ = proto::parse_greeting(data);
});
