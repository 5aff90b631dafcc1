#!/usr/bin/env python3
"""Write the seed corpus for ws_fuzz: an agentk-like upgrade followed by frames, and frame streams
alone (flags byte 0x80), with small limits. Input layout: see test/fuzz/ws_fuzz.c. Run from the
repo root."""
import os
import struct

OUT = os.path.join(os.path.dirname(__file__), "corpus", "ws")
MASK = b"\x37\xfa\x21\x3d"
UPGRADE = (b"GET /-/kubernetes-agent/ HTTP/1.1\r\nHost: kas\r\nUpgrade: websocket\r\n"
           b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: ws-tunnel\r\n\r\n")


def frame(b0, payload, mask=True):
    n = len(payload)
    m = 0x80 if mask else 0
    if n < 126:
        h = bytes([b0, m | n])
    elif n <= 0xFFFF:
        h = bytes([b0, m | 126]) + struct.pack(">H", n)
    else:
        h = bytes([b0, m | 127]) + struct.pack(">Q", n)
    if not mask:
        return h + payload
    return h + MASK + bytes(c ^ MASK[i & 3] for i, c in enumerate(payload))


def seed(name, flags, stream, max_msg=64, head=48, split=7):
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(bytes([flags, max_msg, head, split]) + stream)


os.makedirs(OUT, exist_ok=True)
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
seed("upgrade_then_h2", 0, UPGRADE + frame(0x82, PREFACE) + frame(0x82, b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"))
seed("upgrade_refused", 0, UPGRADE.replace(b"ws-tunnel", b"chat"))
seed("fragments_and_ping", 0x80, frame(0x02, b"abc") + frame(0x89, b"ping!") + frame(0x00, b"def") +
     frame(0x8A, b"") + frame(0x80, b"g"))
seed("close", 0x80, frame(0x82, b"x") + frame(0x88, b"\x03\xe8bye"))
seed("bad_unmasked", 0x80, frame(0x82, b"x", mask=False))
seed("len16", 0x80, frame(0x82, bytes(range(200))), max_msg=255)
seed("len64_top_bit", 0x80, bytes([0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 1]) + MASK)
