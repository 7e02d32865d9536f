#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz harnesses (corpus/NAME/) from the
message formats, so that a seed is a readable recipe rather than an opaque
blob. Run after changing a format; the output is committed.
Usage: tests/fuzz/make_seeds.py [HARNESS...]"""
import hashlib
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
IHAVEOPT = 0x49484156454F5054
REQ_MAGIC = 0x25609513


def opt(n, payload=b""):
    return struct.pack(">QII", IHAVEOPT, n, len(payload)) + payload


def info(name, reqs=()):
    return struct.pack(">I", len(name)) + name + struct.pack(">H", len(reqs)) + b"".join(
        struct.pack(">H", r) for r in reqs)


def meta(name, queries):
    return (struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries)) +
            b"".join(struct.pack(">I", len(q)) + q for q in queries))


def req(cmd, offset, length, flags=0, cookie=1, payload=b""):
    return struct.pack(">IHHQQI", REQ_MAGIC, flags, cmd, cookie, offset, length) + payload


FLAGS = struct.pack(">I", 3)


def nbd_handshake():
    return {
        "go": FLAGS + opt(7, info(b"disk", (1, 2, 3))),
        "export_name": FLAGS + opt(1, b"ro"),
        "list_abort": FLAGS + opt(3) + opt(2),
        "info_default": FLAGS + opt(6, info(b"")) + opt(7, info(b"disk")),
        "meta": FLAGS + opt(8) + opt(9, meta(b"disk", [b"base:", b"blockway:cache"])) +
                opt(10, meta(b"disk", [b"base:allocation", b"blockway:cache"])) + opt(7, info(b"disk")),
        "meta_unstructured": FLAGS + opt(10, meta(b"disk", [b"base:allocation"])),
        "starttls_unknown": FLAGS + opt(5) + opt(99, b"xx") + opt(6, info(b"nosuch")),
        "too_big": FLAGS + struct.pack(">QII", IHAVEOPT, 7, 70000) + b"\0" * 70000,
        "plain_newstyle": struct.pack(">I", 0) + opt(1, b"disk"),
    }


def nbd_transmission():
    data = bytes(range(256)) * 16
    return {
        "rw_simple": b"\x00" + req(1, 0, 4096, payload=data) + req(0, 0, 4096, cookie=2) +
                     req(3, 0, 0, cookie=3) + req(2, 0, 0, cookie=4),
        "structured_read": b"\x01" + req(0, 512, 8192, flags=4) + req(0, 0, 512) + req(5, 0, 65536),
        "block_status": b"\x03" + req(6, 4096, 8192, flags=2) + req(7, 0, 262144) +
                        req(7, 1024, 4096, flags=8) + req(4, 0, 4096, flags=1),
        "ro_errors": b"\x07" + req(1, 0, 512, payload=data[:512]) + req(0, 262144, 512) + req(9, 0, 0) +
                     req(0, 0, 1 << 20),
        "export_name": b"\x08" + req(0, 0, 512, flags=1) + req(6, 0, 512, flags=16),
        "bad_magic": b"\x01" + struct.pack(">IHHQQI", 0x12345678, 0, 0, 1, 0, 512),
    }


SEEDS = {"nbd_handshake": nbd_handshake, "nbd_transmission": nbd_transmission}


def write(name, seeds):
    d = os.path.join(HERE, "corpus", name)
    os.makedirs(d, exist_ok=True)
    for label, blob in seeds.items():
        with open(os.path.join(d, label), "wb") as f:
            f.write(blob)


if __name__ == "__main__":
    for name in sys.argv[1:] or SEEDS:
        write(name, SEEDS[name]())
