//! vhost-user-blk requests as the device meets them: a split virtqueue
//! (descriptor table, available ring) and guest memory entirely made of
//! fuzz input, popped with virtio-queue (indirect tables, loops and all)
//! and parsed by `dlsm::vhost::request`. Nothing may panic, and every
//! buffer a parsed request names must lie inside guest memory.
#![no_main]
use dlsm::vhost::request::{descriptors, parse};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const MEM: usize = 0x4000;
const QSIZE: u16 = 16;

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let n = data.len().min(MEM);
    mem.write_slice(&data[..n], GuestAddress(0)).unwrap();
    // Descriptor table at 0, available ring at 0x100, used ring at 0x200.
    let mut q = Queue::new(QSIZE).unwrap();
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(0x100), Some(0));
    q.set_used_ring_address(Some(0x200), Some(0));
    q.set_ready(true);
    let Ok(iter) = q.iter(&mem) else { return };
    for chain in iter.take(QSIZE as usize * 2) {
        if let Ok(req) = parse(descriptors(chain), &mem) {
            for s in &req.data {
                assert!(mem.check_range(s.addr, s.len as usize));
            }
            assert!(mem.check_address(req.status).is_some());
        }
    }
});
