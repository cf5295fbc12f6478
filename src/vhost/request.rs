//! virtio-blk requests, parsed out of a descriptor chain: pure, no I/O.
//!
//! A guest driver may lay a request out over its descriptors any way it
//! likes (virtio 1.x, "message framing"): the header may span
//! descriptors, data may share a descriptor with the header or the status.
//! So the chain is read as two byte streams, as the spec defines them: the
//! device-readable descriptors (which must all come first) and the
//! device-writable ones. The first 16 readable bytes are the header; the
//! rest of the readable stream is write/discard payload; the last writable
//! byte is the status; the writable bytes before it take read data.
//!
//! Everything a guest controls is checked here, before any I/O: every
//! descriptor lies inside guest memory, the order is readable-then-writable,
//! lengths add up, discard/write-zeroes ranges are whole and few. A request
//! that fails these checks never reaches a target; [`ParseError::status_at`]
//! says whether there is a status byte to report the failure in.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// virtio-blk addresses in 512-byte sectors, whatever the block size.
pub const SECTOR: u64 = 512;
/// The request header: type (le32), reserved (le32), sector (le64).
pub const HEADER_LEN: u64 = 16;
/// One discard / write-zeroes range: sector (le64), sectors (le32), flags (le32).
pub const RANGE_LEN: u64 = 16;
/// Most ranges one discard or write-zeroes request may carry (advertised
/// as `max_discard_seg` / `max_write_zeroes_seg`).
pub const MAX_RANGES: u32 = 32;
/// The device ID answered to GET_ID is at most this long.
pub const ID_LEN: usize = 20;
/// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`: the zeroed range may be deallocated.
pub const WZ_FLAG_UNMAP: u32 = 1;

/// One guest buffer: `len` bytes at guest-physical `addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A descriptor as the parser sees it (what `virtio_queue::Descriptor`
/// carries, minus chaining, which the queue's iterator has already
/// followed, indirect tables and loops included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    /// Device-writable (`VRING_DESC_F_WRITE`).
    pub write: bool,
}

/// A discard or write-zeroes range, in sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub sector: u64,
    pub sectors: u32,
    pub flags: u32,
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Read into the writable data buffers.
    Read,
    /// Write the readable payload.
    Write,
    Flush,
    /// Fill the writable data buffers with the device ID.
    GetId,
    Discard(Vec<Range>),
    WriteZeroes(Vec<Range>),
    /// A type this device does not implement: answered `UNSUPP`.
    Unsupported(u32),
}

/// A parsed, checked request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    /// First sector (meaningful for Read and Write).
    pub sector: u64,
    /// Read: where the data goes; Write: where it comes from.
    pub data: Vec<Seg>,
    /// Total bytes of `data`.
    pub data_len: u64,
    /// The status byte.
    pub status: GuestAddress,
}

/// Why a chain is not a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("descriptor [{addr:#x}, +{len}) is outside guest memory")]
    BadAddress {
        addr: u64,
        len: u32,
        status: Option<GuestAddress>,
    },
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable { status: Option<GuestAddress> },
    #[error("no device-writable byte for the status")]
    NoStatus,
    #[error("request header is {0} bytes, needs {HEADER_LEN}")]
    ShortHeader(u64, GuestAddress),
    #[error("{what} payload of {len} bytes is not a whole number of {RANGE_LEN}-byte ranges (1 to {MAX_RANGES})")]
    BadRanges {
        what: &'static str,
        len: u64,
        status: GuestAddress,
    },
}

impl ParseError {
    /// The status byte the failure can be reported in, if the chain had a
    /// usable one (otherwise the chain is returned with no bytes written).
    pub fn status_at(&self) -> Option<GuestAddress> {
        match self {
            ParseError::BadAddress { status, .. }
            | ParseError::ReadableAfterWritable { status } => *status,
            ParseError::NoStatus => None,
            ParseError::ShortHeader(_, s) | ParseError::BadRanges { status: s, .. } => Some(*s),
        }
    }
}

/// The descriptors of a chain as the queue's iterator follows them
/// (indirect tables entered, a looping chain cut at the queue size).
pub fn descriptors<M>(chain: virtio_queue::DescriptorChain<M>) -> Vec<Desc>
where
    M: std::ops::Deref,
    M::Target: GuestMemoryBackend,
{
    chain
        .map(|d| Desc {
            addr: d.addr().0,
            len: d.len(),
            write: d.is_write_only(),
        })
        .collect()
}

/// Parses the descriptors of one chain against guest memory `mem`.
pub fn parse<M: GuestMemoryBackend + ?Sized>(
    descs: impl IntoIterator<Item = Desc>,
    mem: &M,
) -> Result<Request, ParseError> {
    let descs: Vec<Desc> = descs.into_iter().collect();
    // The status byte first: the last byte of the last writable
    // descriptor, if it is in guest memory. Found before anything else is
    // checked so most malformed chains can still be told "IOERR".
    let status = descs
        .iter()
        .rev()
        .find(|d| d.write && d.len > 0)
        .filter(|_| descs.last().is_some_and(|d| d.write))
        .and_then(|d| {
            let at = d.addr.checked_add(u64::from(d.len) - 1)?;
            mem.check_address(GuestAddress(at))
        });

    let mut readable = Vec::new();
    let mut writable = Vec::new();
    for d in &descs {
        if d.len == 0 {
            continue;
        }
        let ok = d
            .addr
            .checked_add(u64::from(d.len))
            .is_some_and(|_| mem.check_range(GuestAddress(d.addr), d.len as usize));
        if !ok {
            return Err(ParseError::BadAddress {
                addr: d.addr,
                len: d.len,
                status,
            });
        }
        let seg = Seg {
            addr: GuestAddress(d.addr),
            len: d.len,
        };
        if d.write {
            writable.push(seg);
        } else if !writable.is_empty() {
            return Err(ParseError::ReadableAfterWritable { status });
        } else {
            readable.push(seg);
        }
    }
    let status = status.ok_or(ParseError::NoStatus)?;
    // Drop the status byte from the writable stream.
    let last = writable
        .last_mut()
        .expect("status found in a writable descriptor");
    last.len -= 1;
    if last.len == 0 {
        writable.pop();
    }

    let (header, payload) = split_at(&readable, HEADER_LEN);
    let got: u64 = header.iter().map(|s| u64::from(s.len)).sum();
    if got < HEADER_LEN {
        return Err(ParseError::ShortHeader(got, status));
    }
    let mut raw = [0u8; HEADER_LEN as usize];
    let mut at = 0;
    for s in &header {
        let n = s.len as usize;
        // In range: checked above.
        mem.read_slice(&mut raw[at..at + n], s.addr)
            .map_err(|_| ParseError::BadAddress {
                addr: s.addr.0,
                len: s.len,
                status: Some(status),
            })?;
        at += n;
    }
    let kind = u32::from_le_bytes(raw[0..4].try_into().unwrap());
    let sector = u64::from_le_bytes(raw[8..16].try_into().unwrap());

    let (op, data) = match kind {
        VIRTIO_BLK_T_IN => (Op::Read, writable),
        VIRTIO_BLK_T_OUT => (Op::Write, payload),
        VIRTIO_BLK_T_FLUSH => (Op::Flush, Vec::new()),
        VIRTIO_BLK_T_GET_ID => (Op::GetId, writable),
        VIRTIO_BLK_T_DISCARD => (
            Op::Discard(ranges("discard", &payload, mem, status)?),
            Vec::new(),
        ),
        VIRTIO_BLK_T_WRITE_ZEROES => (
            Op::WriteZeroes(ranges("write-zeroes", &payload, mem, status)?),
            Vec::new(),
        ),
        other => (Op::Unsupported(other), Vec::new()),
    };
    let data_len = data.iter().map(|s| u64::from(s.len)).sum();
    Ok(Request {
        op,
        sector,
        data,
        data_len,
        status,
    })
}

/// Splits a byte stream of segments after its first `n` bytes.
fn split_at(segs: &[Seg], n: u64) -> (Vec<Seg>, Vec<Seg>) {
    let (mut head, mut tail) = (Vec::new(), Vec::new());
    let mut left = n;
    for s in segs {
        let len = u64::from(s.len);
        if left >= len {
            head.push(*s);
            left -= len;
        } else if left > 0 {
            head.push(Seg {
                addr: s.addr,
                len: left as u32,
            });
            tail.push(Seg {
                addr: GuestAddress(s.addr.0 + left),
                len: s.len - left as u32,
            });
            left = 0;
        } else {
            tail.push(*s);
        }
    }
    (head, tail)
}

/// Reads the discard / write-zeroes ranges of a payload.
fn ranges<M: GuestMemoryBackend + ?Sized>(
    what: &'static str,
    payload: &[Seg],
    mem: &M,
    status: GuestAddress,
) -> Result<Vec<Range>, ParseError> {
    let len: u64 = payload.iter().map(|s| u64::from(s.len)).sum();
    let bad = || ParseError::BadRanges { what, len, status };
    if len == 0 || !len.is_multiple_of(RANGE_LEN) || len / RANGE_LEN > u64::from(MAX_RANGES) {
        return Err(bad());
    }
    let mut bytes = vec![0u8; len as usize];
    let mut at = 0;
    for s in payload {
        mem.read_slice(&mut bytes[at..at + s.len as usize], s.addr)
            .map_err(|_| bad())?;
        at += s.len as usize;
    }
    Ok(bytes
        .chunks_exact(RANGE_LEN as usize)
        .map(|c| Range {
            sector: u64::from_le_bytes(c[0..8].try_into().unwrap()),
            sectors: u32::from_le_bytes(c[8..12].try_into().unwrap()),
            flags: u32::from_le_bytes(c[12..16].try_into().unwrap()),
        })
        .collect())
}

/// The byte range `[offset, offset + len)` a sector-addressed request
/// covers, checked against a device of `capacity` bytes: `None` if it is
/// not whole sectors or runs past the end.
pub fn byte_range(sector: u64, len: u64, capacity: u64) -> Option<(u64, u64)> {
    if !len.is_multiple_of(SECTOR) {
        return None;
    }
    let offset = sector.checked_mul(SECTOR)?;
    let end = offset.checked_add(len)?;
    (end <= capacity).then_some((offset, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const MEM: u64 = 0x10_0000;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
    }

    fn header(m: &GuestMemoryMmap<()>, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&h, GuestAddress(at)).unwrap();
    }

    fn r(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            write: false,
        }
    }

    fn w(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            write: true,
        }
    }

    #[test]
    fn linux_layout_read() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 8);
        let req = parse([r(0x1000, 16), w(0x2000, 4096), w(0x3000, 1)], &m).unwrap();
        assert_eq!(req.op, Op::Read);
        assert_eq!(req.sector, 8);
        assert_eq!(req.data_len, 4096);
        assert_eq!(
            req.data,
            vec![Seg {
                addr: GuestAddress(0x2000),
                len: 4096
            }]
        );
        assert_eq!(req.status, GuestAddress(0x3000));
    }

    #[test]
    fn any_layout_header_split_and_data_shares_status_descriptor() {
        let m = mem();
        // Header split 10 + 6, the write payload sharing the second
        // descriptor; status as the last byte of a data descriptor.
        header(&m, 0x1000, VIRTIO_BLK_T_OUT, 3);
        let mut h = [0u8; 16];
        m.read_slice(&mut h, GuestAddress(0x1000)).unwrap();
        m.write_slice(&h[10..], GuestAddress(0x5000)).unwrap();
        let req = parse([r(0x1000, 10), r(0x5000, 6 + 512), w(0x9000, 1)], &m).unwrap();
        assert_eq!(req.op, Op::Write);
        assert_eq!(req.sector, 3);
        assert_eq!(
            req.data,
            vec![Seg {
                addr: GuestAddress(0x5006),
                len: 512
            }]
        );
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        let req = parse([r(0x1000, 16), w(0x2000, 513)], &m).unwrap();
        assert_eq!(
            req.data,
            vec![Seg {
                addr: GuestAddress(0x2000),
                len: 512
            }]
        );
        assert_eq!(req.status, GuestAddress(0x2200));
    }

    #[test]
    fn out_of_memory_descriptor_is_refused_with_status_when_it_has_one() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        let e = parse([r(0x1000, 16), w(MEM - 100, 4096), w(0x3000, 1)], &m).unwrap_err();
        assert!(matches!(e, ParseError::BadAddress { .. }), "{e}");
        assert_eq!(e.status_at(), Some(GuestAddress(0x3000)));
        // Address wrap-around.
        let e = parse([r(u64::MAX - 4, 16), w(0x3000, 1)], &m).unwrap_err();
        assert!(matches!(e, ParseError::BadAddress { .. }), "{e}");
        // Status itself outside memory: nothing to report in.
        let e = parse([r(0x1000, 16), w(MEM + 10, 1)], &m).unwrap_err();
        assert_eq!(e.status_at(), None);
    }

    #[test]
    fn malformed_chains() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            parse([r(0x1000, 16)], &m).unwrap_err(),
            ParseError::NoStatus
        );
        assert_eq!(parse([], &m).unwrap_err(), ParseError::NoStatus);
        let e = parse([r(0x1000, 8), w(0x3000, 1)], &m).unwrap_err();
        assert_eq!(e, ParseError::ShortHeader(8, GuestAddress(0x3000)));
        let e = parse(
            [r(0x1000, 16), w(0x2000, 8), r(0x4000, 8), w(0x3000, 1)],
            &m,
        )
        .unwrap_err();
        assert!(matches!(e, ParseError::ReadableAfterWritable { .. }), "{e}");
        // A trailing readable descriptor: the status is not the chain's last byte.
        let e = parse([r(0x1000, 16), w(0x3000, 1), r(0x4000, 8)], &m).unwrap_err();
        assert!(
            matches!(e, ParseError::ReadableAfterWritable { status: None }),
            "{e}"
        );
    }

    #[test]
    fn discard_ranges() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_DISCARD, 0);
        let mut b = Vec::new();
        for (s, n, f) in [(8u64, 16u32, 0u32), (1024, 8, 1)] {
            b.extend_from_slice(&s.to_le_bytes());
            b.extend_from_slice(&n.to_le_bytes());
            b.extend_from_slice(&f.to_le_bytes());
        }
        m.write_slice(&b, GuestAddress(0x2000)).unwrap();
        let req = parse([r(0x1000, 16), r(0x2000, 32), w(0x3000, 1)], &m).unwrap();
        assert_eq!(
            req.op,
            Op::Discard(vec![
                Range {
                    sector: 8,
                    sectors: 16,
                    flags: 0
                },
                Range {
                    sector: 1024,
                    sectors: 8,
                    flags: 1
                }
            ])
        );
        let e = parse([r(0x1000, 16), r(0x2000, 20), w(0x3000, 1)], &m).unwrap_err();
        assert!(matches!(e, ParseError::BadRanges { .. }), "{e}");
        let e = parse([r(0x1000, 16), w(0x3000, 1)], &m).unwrap_err();
        assert!(matches!(e, ParseError::BadRanges { .. }), "{e}");
        let too_many = (MAX_RANGES + 1) * RANGE_LEN as u32;
        let e = parse([r(0x1000, 16), r(0x8000, too_many), w(0x3000, 1)], &m).unwrap_err();
        assert!(matches!(e, ParseError::BadRanges { .. }), "{e}");
    }

    #[test]
    fn unknown_type_is_unsupported_not_an_error() {
        let m = mem();
        header(&m, 0x1000, 0x7777, 0);
        let req = parse([r(0x1000, 16), w(0x3000, 1)], &m).unwrap();
        assert_eq!(req.op, Op::Unsupported(0x7777));
    }

    #[test]
    fn byte_ranges() {
        assert_eq!(byte_range(0, 4096, 8192), Some((0, 4096)));
        assert_eq!(byte_range(8, 4096, 8192), Some((4096, 4096)));
        assert_eq!(byte_range(9, 4096, 8192), None);
        assert_eq!(byte_range(0, 100, 8192), None);
        assert_eq!(byte_range(u64::MAX / 256, 512, u64::MAX), None);
    }

    proptest::proptest! {
        /// Whatever the descriptors, parsing neither panics nor accepts a
        /// buffer outside guest memory.
        #[test]
        fn arbitrary_chains(descs in proptest::collection::vec(
            (0u64..MEM * 2, 0u32..0x2_0000, proptest::bool::ANY), 0..8), kind in 0u32..16) {
            let m = mem();
            header(&m, 0x1000, kind, 0);
            let descs: Vec<Desc> = descs.into_iter().map(|(addr, len, write)| Desc { addr, len, write }).collect();
            if let Ok(req) = parse(descs, &m) {
                for s in &req.data {
                    proptest::prop_assert!(m.check_range(s.addr, s.len as usize));
                }
                proptest::prop_assert!(m.check_address(req.status).is_some());
            }
        }
    }
}
