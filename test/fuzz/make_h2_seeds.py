#!/usr/bin/env python3
"""Write the seed corpus for h2_fuzz: small gRPC-over-HTTP/2 client conversations, HPACK encoded as
literal header fields without indexing (so the seeds stay readable). Run from the repo root."""
import os
import struct

OUT = os.path.join(os.path.dirname(__file__), "corpus", "h2")
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(t, flags, sid, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([t, flags]) + struct.pack(">I", sid) + payload


def lit(name, value):
    name, value = name.encode(), value.encode()
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def headers(path, extra=()):
    block = b"".join(lit(n, v) for n, v in [(":method", "POST"), (":scheme", "http"), (":path", path),
                                            (":authority", "x"), ("content-type", "application/grpc"),
                                            ("te", "trailers"), *extra])
    return block


def msg(data):
    return b"\x00" + struct.pack(">I", len(data)) + data


def write(name, chunk, body):
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(bytes([chunk]) + body)


start = PREFACE + frame(4, 0, 0)
write("unary", 255, start + frame(1, 4, 1, headers("/a.B/C")) + frame(0, 1, 1, msg(b"hello")))
write("timeout", 3, start + frame(1, 4, 1, headers("/a.B/C", [("grpc-timeout", "1m")])) +
      frame(0, 0, 1, msg(b"x")))
write("stream", 10, start + frame(1, 4, 1, headers("/a.B/C")) + frame(0, 0, 1, msg(b"a") + msg(b"H")) +
      frame(0, 0, 1, msg(b"R")[:3]) + frame(0, 1, 1, msg(b"R")[3:]))
write("reject", 255, start + frame(1, 5, 1, headers("/x.Y/Reject")))
write("cancel", 255, start + frame(1, 4, 1, headers("/a.B/C")) + frame(3, 0, 1, struct.pack(">I", 8)))
write("ping_goaway", 255, start + frame(6, 0, 0, b"12345678") + frame(7, 0, 0, struct.pack(">II", 0, 0)))
write("two_streams", 40, start + frame(1, 4, 1, headers("/a.B/C")) + frame(1, 4, 3, headers("/a.B/D")) +
      frame(0, 0, 3, msg(b"F")) + frame(0, 1, 1, msg(b"C")) + frame(8, 0, 0, struct.pack(">I", 1000)))
