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


def control_protocol():
    return {
        "status": b'{"cmd":"status"}',
        "export_add": b'{"cmd":"export-add","name":"vm1","uri":"file:///x.img","read-only":true,"id":7}',
        "qos": b'{"cmd":"qos","limit":"50M","id":"a"}',
        "qos_number": b'{"cmd":"qos","limit":1048576}',
        "refuse": b'{"cmd":"refuse"}',
        "unknown": b'{"cmd":"nosuch","id":[1,2,{"x":null}]}',
        "nested": b'{"cmd":"status","x":' + b"[" * 40 + b"]" * 40 + b"}",
        "not_json": b"status please",
        "wrong_types": b'{"cmd":"export-add","name":5,"uri":null,"read-only":"yes"}',
    }


def uri():
    return {
        "nbd": b"\x00nbd://host:10809/disk",
        "nbd_unix": b"\x00nbd+unix:///disk?socket=/run/nbd.sock",
        "file": b"\x00file:///var/lib/images/vm%201.img",
        "iscsi": b"\x01iscsi://user%secret@[fe80::1]:3260/iqn.2026-01.org.example:disk/2",
        "iscsi_plain": b"\x01iscsi://10.0.0.1/iqn.2003-01.org.linux-iscsi.x:sn/0",
        "nfs": b"\x02nfs://server:2049/export/dir/disk.img?version=4",
        "nfs_v6": b"\x02nfs://[::1]/srv/nfs/img.raw",
        "aoe": b"\x03aoe://eth0/3.7",
        "listen_v6": b"\x04[::1]:10809",
        "listen_unix": b"\x04unix:/run/blockway/nbd.sock",
        "listen_v4": b"\x04127.0.0.1:10809",
        "metrics": b"\x05127.0.0.1:9110",
        "nbds": b"\x00nbds://host/disk?tls-certificates=/etc/pki/blockway&tls-verify-peer=false",
        "rbd": b"\x06rbd://libvirt@rbd/ns/vm1@snap?conf=/etc/ceph/ceph.conf&keyring=/etc/ceph/k&exclusive=break",
        "rbd_plain": b"\x06rbd://rbd/golden",
    }


def config():
    with open(os.path.join(HERE, "..", "..", "packaging", "blockwayd.toml"), "rb") as f:
        packaged = f.read()
    full = b"""listen = ["127.0.0.1:10809", "unix:/run/blockway/nbd.sock"]
default-export = "vm1"
threads = 2
max-inflight = "64M"
handshake-timeout = 2.5
log-level = "debug"
[control]
socket = "/run/blockway/control.sock"
mode = "0660"
[[export]]
name = "vm1"
uri = "file:///srv/vm1.img"
read-only = true
[[export]]
name = "vm2"
uri = "nbd://10.0.0.5/disk"
cache = "/var/cache/blockway/vm2"
mode = "writeback-local"
[fuse]
mountpoint = "/run/blockway/disks"
mode = "0640"
[metrics]
listen = "127.0.0.1:9110"
"""
    return {
        "packaged": b"\x00" + packaged,
        "full": b"\x00" + full,
        "bad_type": b"\x00listen = 5\n[[export]]\nname = 3\n",
        "export_spec": b"\x01vm1=nbd://h/e,cache=/var/cache/blockway/c,mode=writeback,read-only=true",
        "export_spec_qos": b"\x01d=file:///x.img,qos-iops=100,qos-bps=50M",
        "fuse_spec": b"\x02/mnt/disks,mode=0640,allow-other=true,direct-io=false",
    }


def aoe_frame():
    def header(flags, err, shelf, slot, cmd, tag):
        return struct.pack(">BBHBBI", 0x10 | flags, err, shelf, slot, cmd, tag)
    identify = bytearray(512)
    struct.pack_into("<H", identify, 83 * 2, (1 << 10) | (1 << 12) | (1 << 13))
    struct.pack_into("<Q", identify, 100 * 2, 1 << 21)
    identify[27 * 2:27 * 2 + 8] = b"lbvaed  "
    ata = struct.pack(">BBBB6sH", 0x40, 0, 1, 0x40, bytes(6), 0)
    return {
        "ata_read": header(8, 0, 3, 7, 0, 1) + ata + bytes(512),
        "identify": header(8, 0, 3, 7, 0, 2) + struct.pack(">BBBB6sH", 0, 0, 1, 0x40, bytes(6), 0) + bytes(identify),
        "config": header(8, 0, 3, 7, 1, 3) + struct.pack(">HHBBH", 16, 0x4019, 2, 0x10, 0),
        "error": header(12, 2, 3, 7, 0, 4),
        "short": header(8, 0, 3, 7, 0, 5)[:6],
    }


SEEDS = {"nbd_handshake": nbd_handshake, "nbd_transmission": nbd_transmission,
         "control_protocol": control_protocol, "uri": uri, "config": config, "aoe_frame": aoe_frame}


def write(name, seeds):
    d = os.path.join(HERE, "corpus", name)
    os.makedirs(d, exist_ok=True)
    for label, blob in seeds.items():
        with open(os.path.join(d, label), "wb") as f:
            f.write(blob)


if __name__ == "__main__":
    for name in sys.argv[1:] or SEEDS:
        write(name, SEEDS[name]())
