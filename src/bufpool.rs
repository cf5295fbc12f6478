//! A small pool of large I/O buffers.
//!
//! Reads of a few MiB (a migration's batches, sequential guest I/O) would
//! otherwise allocate a fresh buffer each time; glibc serves those with
//! `mmap`, and every page is then faulted in and zeroed by the kernel, which
//! costs more than the copy the buffer exists for. Buffers of at least
//! [`MIN_POOLED`] bytes are kept here after use and handed out again. The
//! pool is bounded ([`MAX_POOLED_BYTES`]); beyond that, buffers are freed.

use std::sync::Mutex;

/// Smaller buffers are not pooled (the allocator does fine with them).
pub const MIN_POOLED: usize = 64 << 10;
/// Total capacity the pool keeps.
pub const MAX_POOLED_BYTES: usize = 256 << 20;

static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// A zero-filled buffer of `len` bytes, reused when one is available.
pub fn take(len: usize) -> Vec<u8> {
    match reuse(len) {
        Some(mut b) => {
            b.clear();
            b.resize(len, 0);
            b
        }
        None => vec![0u8; len],
    }
}

/// A pooled buffer of at least `len` bytes' capacity, if there is one.
fn reuse(len: usize) -> Option<Vec<u8>> {
    if len < MIN_POOLED {
        return None;
    }
    let mut pool = POOL.lock().unwrap();
    let i = pool.iter().position(|b| b.capacity() >= len)?;
    Some(pool.swap_remove(i))
}

/// A buffer of `len` bytes whose contents are unspecified (a reused
/// buffer keeps whatever it held). For callers that overwrite every byte
/// before anyone sees it, such as a read reply filled by `read_exact_at`:
/// it saves zeroing megabytes that are about to be overwritten.
pub fn take_for_overwrite(len: usize) -> Vec<u8> {
    match reuse(len) {
        Some(mut b) => {
            // Only the part past the old length needs initialising.
            b.resize(len, 0);
            b
        }
        None => vec![0u8; len],
    }
}

/// Returns a buffer to the pool (or frees it).
pub fn give(buf: Vec<u8>) {
    if buf.capacity() < MIN_POOLED {
        return;
    }
    let mut pool = POOL.lock().unwrap();
    let held: usize = pool.iter().map(|b| b.capacity()).sum();
    if held + buf.capacity() <= MAX_POOLED_BYTES {
        pool.push(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_zeroed() {
        let mut b = take(1 << 20);
        assert_eq!(b.len(), 1 << 20);
        b.fill(7);
        let ptr = b.as_ptr();
        give(b);
        let b = take(1 << 19);
        assert_eq!(b.len(), 1 << 19);
        assert!(b.iter().all(|x| *x == 0), "reused buffer not zeroed");
        // Usually the same allocation (other tests may race for it).
        let _ = ptr;
        give(b);
        assert_eq!(take(10).len(), 10);
    }
}
