"""Option-level checks of a dlsm node with libnbd's Python bindings.

Usage: options.py HOST:PORT   (the node must have volumes vm1 (8M) and vm2 (1M))
Every check raises on failure; the last line printed is "ALL OK".
"""
import errno
import sys

import nbd

addr = sys.argv[1]
host, port = addr.rsplit(":", 1)


def handle():
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_tcp(host, port)
    return h


# NBD_OPT_LIST
h = handle()
names = []
h.opt_list(lambda name, desc: names.append(name))
assert sorted(names) == ["vm1", "vm2"], names
h.opt_abort()
print("list ok", names)

# NBD_OPT_INFO on a known and an unknown export, then GO.
h = handle()
h.set_export_name("vm2")
h.opt_info()
assert h.get_size() == 1 << 20, h.get_size()
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 << 20
assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
h.set_export_name("missing")
try:
    h.opt_info()
    raise AssertionError("INFO on an unknown export succeeded")
except nbd.Error as e:
    assert e.errnum == errno.ENOENT, e  # NBD_REP_ERR_UNKNOWN
print("info ok")

# LIST_META_CONTEXT / SET_META_CONTEXT
h.set_export_name("vm1")
ctx = []
n = h.opt_list_meta_context(lambda name: ctx.append(name))
assert ctx == ["base:allocation"], ctx
h.add_meta_context("base:allocation")
h.opt_go()
assert h.can_meta_context("base:allocation")
assert h.get_structured_replies_negotiated()
assert h.can_multi_conn() and h.can_flush() and h.can_fua() and h.can_trim()
assert h.can_zero() and h.can_fast_zero() and h.can_cache() and h.can_df()
assert not h.is_read_only()
print("meta context ok")

# Transmission: sparse structured read, block status, write zeroes, cache.
h.pwrite(b"\x07" * 65536, 1 << 20)
buf = h.pread(128 << 10, 1 << 20)
assert buf == b"\x07" * 65536 + b"\x00" * 65536
chunks = []


def chunk(sub, off, status, err):
    chunks.append((status, off, len(sub)))
    return 0


h.pread_structured(256 << 10, 0, chunk)
assert chunks and all(c[0] == nbd.READ_HOLE for c in chunks), chunks
extents = []
h.block_status(2 << 20, 0, lambda meta, off, ents, err: extents.append(list(ents)) or 0)
flat = extents[0]
assert flat[:4] == [1 << 20, 3, 65536, 0], flat
h.zero(65536, 1 << 20)
assert h.pread(65536, 1 << 20) == b"\x00" * 65536
h.cache(4096, 0)
h.flush()

# Bad requests get the errno the spec names and the connection stays up.
try:
    h.pread(4096, (8 << 20) - 100)
    raise AssertionError("read past the end succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EINVAL, e
try:
    h.pwrite(b"x" * 4096, (8 << 20) - 100)
    raise AssertionError("write past the end succeeded")
except nbd.Error as e:
    assert e.errnum in (errno.ENOSPC, errno.EINVAL), e
assert h.pread(4, 1 << 20) == b"\x00" * 4
h.shutdown()
print("transmission ok")

# Multi-conn: a flushed write on one connection is visible on the other.
a = handle()
a.set_export_name("vm1")
a.opt_go()
b = handle()
b.set_export_name("vm1")
b.opt_go()
a.pwrite(b"multi-conn", 5 << 20)
a.flush()
assert b.pread(10, 5 << 20) == b"multi-conn"
a.shutdown()
b.shutdown()
print("multi-conn ok")

# Many requests in flight on one connection, completed out of order.
h = handle()
h.set_export_name("vm1")
h.opt_go()
cookies = []
for i in range(64):
    buf = nbd.Buffer(4096)
    cookies.append((h.aio_pread(buf, i * 4096), buf))
while h.aio_in_flight() > 0:
    h.poll(-1)
for c, _ in cookies:
    assert h.aio_command_completed(c)
h.shutdown()
print("pipelining ok")
print("ALL OK")
