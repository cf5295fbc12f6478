#!/usr/bin/env python3
"""Writes the seed corpus of every fuzz target into fuzz/seeds/<target>/.

Seeds are well-formed conversations (so the fuzzer starts deep inside the
protocol) plus a few known-hostile ones. Rerun after changing the protocol;
the output is deterministic.
"""
import json, os, struct, sys

HERE = os.path.dirname(os.path.abspath(__file__))
NBDMAGIC, IHAVEOPT, REPMAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x3E889045565A9
REQ, SIMPLE, STRUCT = 0x25609513, 0x67446698, 0x668E33EF
EXPORT_NAME, ABORT, LIST, STARTTLS, INFO, GO, SR, LISTMETA, SETMETA = 1, 2, 3, 5, 6, 7, 8, 9, 10
ACK, SERVER, R_INFO, R_META = 1, 2, 3, 4
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WZ, BS = range(8)

def opt(code, data=b""):
    return struct.pack(">QII", IHAVEOPT, code, len(data)) + data

def info_req(name, reqs=()):
    n = name.encode()
    return struct.pack(">I", len(n)) + n + struct.pack(">H", len(reqs)) + b"".join(struct.pack(">H", r) for r in reqs)

def meta_q(name, queries):
    n = name.encode()
    out = struct.pack(">I", len(n)) + n + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q.encode()
    return out

def req(cmd, cookie, off, length, flags=0, payload=b""):
    return struct.pack(">IHHQQI", REQ, flags, cmd, cookie, off, length) + payload

def rep(option, ty, data=b""):
    return struct.pack(">QIII", REPMAGIC, option, ty, len(data)) + data

def chunk(flags, ty, cookie, payload):
    return struct.pack(">IHHQI", STRUCT, flags, ty, cookie, len(payload)) + payload

def write(target, name, data):
    if target == "server":
        # First byte: 0 plain, 1 TLS required (see fuzz_targets/server.rs).
        for mode in (0, 1):
            write_file(target, f"{name}-{'tls' if mode else 'plain'}", bytes([mode]) + data)
        return
    write_file(target, name, data)

def write_file(target, name, data):
    d = os.path.join(HERE, "seeds", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)

FLAGS = struct.pack(">I", 3)
# --- server: whole client conversations --------------------------------
session = (FLAGS + opt(SR) + opt(SETMETA, meta_q("vm", ["base:allocation"])) + opt(GO, info_req("vm", [0, 1, 2, 3]))
    + req(WRITE, 1, 0, 4096, 0, b"\xab" * 4096) + req(READ, 2, 0, 4096) + req(BS, 3, 0, 1 << 20)
    + req(TRIM, 4, 4096, 8192) + req(WZ, 5, 65536, 65536, 2) + req(CACHE, 6, 0, 4096) + req(FLUSH, 7, 0, 0)
    + req(READ, 8, 1 << 20, 1) + req(DISC, 9, 0, 0))
write("server", "full-session", session)
write("server", "list-info-abort", FLAGS + opt(LIST) + opt(INFO, info_req("vm", [1])) + opt(LISTMETA, meta_q("vm", [])) + opt(ABORT))
write("server", "export-name", FLAGS + opt(EXPORT_NAME, b"vm") + req(READ, 1, 0, 512) + req(DISC, 2, 0, 0))
write("server", "starttls-unknown-opts", FLAGS + opt(STARTTLS) + opt(99, b"xyz") + opt(GO, info_req("nope")) + opt(ABORT))
write("server", "simple-replies", FLAGS + opt(GO, info_req("vm")) + req(WRITE, 1, 100, 3, 1, b"abc") + req(READ, 2, 98, 8) + req(DISC, 3, 0, 0))
write("server", "bad-magic-after-go", FLAGS + opt(GO, info_req("vm")) + b"\xde\xad\xbe\xef" * 7)
# A ClientHello-shaped record after STARTTLS (TLS mode): rustls parses it.
write("server", "starttls-then-record", FLAGS + opt(STARTTLS) + bytes([0x16, 3, 1, 0, 0x30, 1, 0, 0, 0x2c, 3, 3]) + b"\x00" * 40)
write("server", "huge-option", FLAGS + struct.pack(">QII", IHAVEOPT, GO, 0xFFFFFFFF))
# --- options: headers + data, and option replies ----------------------
for i, (code, data) in enumerate([(GO, info_req("vm", [0, 3])), (INFO, info_req("a" * 300)), (SETMETA, meta_q("vm", ["base:allocation", "qemu:dirty-bitmap:x"])),
                                  (LISTMETA, meta_q("vm", [])), (EXPORT_NAME, b"disk"), (STARTTLS, b""), (LIST, b""), (ABORT, b""), (GO, b"\x00\x00\x00\x09vm")]):
    write("options", f"opt-{i}", opt(code, data))
write("options", "reply-info-export", rep(GO, R_INFO, struct.pack(">HQH", 0, 1 << 30, 0x1ED)))
write("options", "reply-meta", rep(SETMETA, R_META, struct.pack(">I", 1) + b"base:allocation"))
write("options", "reply-server", rep(LIST, SERVER, struct.pack(">I", 2) + b"vmdesc"))
write("options", "greeting", struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3))
# --- requests -----------------------------------------------------------
write("requests", "all-commands", b"".join(req(c, c + 1, c * 4096, 4096, f) for c, f in [(READ, 0), (WRITE, 1), (DISC, 0), (FLUSH, 0), (TRIM, 1), (CACHE, 0), (WZ, 6), (BS, 8)]))
write("requests", "edge-values", req(READ, 2**64 - 1, 2**64 - 512, 0xFFFFFFFF, 0xFFFF) + req(99, 0, 0, 0))
# --- client_replies: a server's side of a conversation ------------------
greet = struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3)
hs = (greet + rep(SR, ACK) + rep(SETMETA, R_META, struct.pack(">I", 7) + b"base:allocation") + rep(SETMETA, ACK)
      + rep(GO, R_INFO, struct.pack(">HQH", 0, 1 << 20, 0x1ED)) + rep(GO, R_INFO, struct.pack(">HIII", 3, 1, 4096, 32 << 20)) + rep(GO, ACK))
write("client_replies", "good", hs + chunk(0, 1, 1, struct.pack(">Q", 0) + b"\x11" * 2048) + chunk(0, 2, 1, struct.pack(">QI", 2048, (128 << 10) - 2048))
      + chunk(1, 0, 1, b"") + chunk(1, 5, 2, struct.pack(">III", 7, 1 << 20, 3)) + struct.pack(">IIQ", SIMPLE, 0, 3))
write("client_replies", "errors", hs + chunk(1, (1 << 15) + 1, 1, struct.pack(">IH", 5, 4) + b"oops") + chunk(1, (1 << 15) + 2, 2, struct.pack(">IHQ", 22, 0, 12)) + struct.pack(">IIQ", SIMPLE, 28, 3))
write("client_replies", "no-structured", greet + rep(SR, (1 << 31) + 1, b"no") + rep(GO, R_INFO, struct.pack(">HQH", 0, 4096, 1)) + rep(GO, ACK) + struct.pack(">IIQ", SIMPLE, 0, 1) + b"\x22" * 4096)
write("client_replies", "wrong-cookie", hs + chunk(1, 1, 99, struct.pack(">Q", 0) + b"x" * 16))
# --- api_bodies: route selector + JSON body -----------------------------
bodies = [(0, {"name": "fz", "size": 1048576}), (0, {"name": "../x", "size": 4096}), (0, {"name": "fz", "size": 0}),
          (1, {"name": "fz", "size": 1 << 20, "origin_nbd": "127.0.0.1:1", "origin_api": "127.0.0.1:1", "region_size": 65536, "rate": 0}),
          (1, {"name": "fz", "size": 1 << 20, "origin_nbd": "nowhere", "origin_api": "x", "region_size": 3}),
          (2, {"rate": 1000000}), (3, {}), (4, {}), (5, None)]
for i, (sel, body) in enumerate(bodies):
    write("api_bodies", f"body-{i}", bytes([sel]) + (json.dumps(body).encode() if body is not None else b""))
write("api_bodies", "not-json", b"\x00{\"name\": \"fz\", \"size\": ")
# --- vhost_requests: guest memory (descriptor table at 0, avail at 0x100) --
def vq(descs, heads, extra):
    """Guest memory image: split-queue descriptors, an available ring
    offering `heads`, and `extra` {address: bytes}."""
    m = bytearray(0x4000)
    for i, (addr, ln, flags, nxt) in enumerate(descs):
        m[i * 16:(i + 1) * 16] = struct.pack("<QIHH", addr, ln, flags, nxt)
    m[0x100:0x104] = struct.pack("<HH", 0, len(heads))
    for i, h in enumerate(heads):
        m[0x104 + 2 * i:0x106 + 2 * i] = struct.pack("<H", h)
    for a, b in extra.items():
        m[a:a + len(b)] = b
    return bytes(m)
NEXT, WR, IND = 1, 2, 4
blkhdr = lambda t, s: struct.pack("<IIQ", t, 0, s)
write("vhost_requests", "read", vq([(0x1000, 16, NEXT, 1), (0x2000, 512, NEXT | WR, 2), (0x3000, 1, WR, 0)], [0], {0x1000: blkhdr(0, 8)}))
write("vhost_requests", "write-flush-discard", vq([(0x1000, 16, NEXT, 1), (0x2000, 4096, NEXT, 2), (0x3000, 1, WR, 0),
    (0x1100, 16, NEXT, 4), (0x3001, 1, WR, 0), (0x1200, 16 + 32, NEXT, 6), (0x3002, 1, WR, 0)], [0, 3, 5],
    {0x1000: blkhdr(1, 0), 0x1100: blkhdr(4, 0), 0x1200: blkhdr(11, 0) + struct.pack("<QII", 8, 16, 0) + struct.pack("<QII", 64, 8, 0)}))
write("vhost_requests", "indirect", vq([(0x1800, 48, IND, 0)], [0], {0x1000: blkhdr(0, 0),
    0x1800: struct.pack("<QIHH", 0x1000, 16, NEXT, 1) + struct.pack("<QIHH", 0x2000, 1024, NEXT | WR, 2) + struct.pack("<QIHH", 0x3000, 1, WR, 0)}))
write("vhost_requests", "loop", vq([(0x1000, 16, NEXT, 1), (0x2000, 512, NEXT | WR, 0)], [0], {0x1000: blkhdr(0, 0)}))
write("vhost_requests", "out-of-memory", vq([(0x1000, 16, NEXT, 1), (0xFFFF_FFFF_FFFF_F000, 4096, NEXT | WR, 2), (0x3000, 1, WR, 0)], [0], {0x1000: blkhdr(0, 0)}))
print("seeds written under", os.path.join(HERE, "seeds"))
