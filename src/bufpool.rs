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

/// Memory alignment O_DIRECT asks for (the logical block size of any disk
/// dlsm is likely to run on; 512-byte disks accept it too).
pub const IO_ALIGN: usize = 4096;

/// A pooled buffer whose bytes may start some way into their allocation,
/// so that a chosen byte of them sits on an [`IO_ALIGN`] boundary in
/// memory: what `O_DIRECT` needs to move data between a disk and this
/// buffer without the page cache (and its copy). Dereferences to its bytes.
pub struct IoBuf {
    v: Vec<u8>,
    start: usize,
    len: usize,
}

impl IoBuf {
    /// `len` bytes whose byte `lead` is [`IO_ALIGN`]-aligned in memory
    /// (`lead = 0`: the data itself; a reply header's length: the data
    /// after it). Contents unspecified, as with [`take_for_overwrite`].
    pub fn aligned(len: usize, lead: usize) -> IoBuf {
        let need = len + IO_ALIGN;
        let mut v = reuse(need).unwrap_or_default();
        if v.len() < need {
            v.resize(need, 0);
        }
        let at = v.as_ptr() as usize + lead;
        let start = (IO_ALIGN - at % IO_ALIGN) % IO_ALIGN;
        IoBuf { v, start, len }
    }

    /// `len` bytes at the start of their allocation (no alignment), so the
    /// buffer turns into a `Vec` without a copy. Contents unspecified.
    pub fn unaligned(len: usize) -> IoBuf {
        IoBuf::from(take_for_overwrite(len))
    }

    /// Whether byte `at` lies on an [`IO_ALIGN`] boundary in memory.
    pub fn is_aligned_at(&self, at: usize) -> bool {
        (self[at..].as_ptr() as usize).is_multiple_of(IO_ALIGN)
    }

    /// The bytes as a `Vec` (a copy only if they do not start the
    /// allocation).
    pub fn into_vec(self) -> Vec<u8> {
        let IoBuf { mut v, start, len } = self;
        if start == 0 {
            v.truncate(len);
            v
        } else {
            let out = v[start..start + len].to_vec();
            give(v);
            out
        }
    }

    /// Returns the allocation to the pool.
    pub fn give(self) {
        give(self.v)
    }
}

impl From<Vec<u8>> for IoBuf {
    fn from(v: Vec<u8>) -> Self {
        let len = v.len();
        IoBuf { v, start: 0, len }
    }
}

impl std::ops::Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.v[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.v[self.start..self.start + self.len]
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IoBuf({} bytes)", self.len)
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

    #[test]
    fn aligned_buffers_are_aligned_where_asked() {
        for (len, lead) in [(1 << 20, 0), (4 << 20, 28), (100, 16), (65536, 4095)] {
            let mut b = IoBuf::aligned(len, lead);
            assert_eq!(b.len(), len);
            assert!(b.is_aligned_at(lead), "len {len} lead {lead}");
            b.fill(3);
            let v = b.into_vec();
            assert_eq!(v.len(), len);
            assert!(v.iter().all(|x| *x == 3));
        }
        let v = IoBuf::unaligned(70000).into_vec();
        assert_eq!(v.len(), 70000);
    }
}
