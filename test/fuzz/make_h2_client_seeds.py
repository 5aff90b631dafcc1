#!/usr/bin/env python3
"""Write the seed corpus for h2_client_fuzz: small gRPC-over-HTTP/2 server replies, HPACK encoded as
literal header fields without indexing (so the seeds stay readable). Byte 0 of each seed is the
chunk size, byte 1 the driver's set-up (calls started - 1 in bits 0-1, gzip 4, timeouts 8,
half-close 16, a call started midway 32, abort 64, GOAWAY 128). Run from the repo root."""
import gzip
import os
import struct
import zlib

OUT = os.path.join(os.path.dirname(__file__), "corpus", "h2_client")


def frame(t, flags, sid, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([t, flags]) + struct.pack(">I", sid) + payload


def lit(name, value):
    name, value = name.encode(), value.encode()
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def block(pairs):
    return b"".join(lit(n, v) for n, v in pairs)


def resp(extra=()):
    return block([(":status", "200"), ("content-type", "application/grpc"), *extra])


def trailers(status=0, message=None, extra=()):
    pairs = [("grpc-status", str(status))]
    if message is not None:
        pairs.append(("grpc-message", message))
    return block([*pairs, *extra])


def msg(data, compressed=False):
    return bytes([1 if compressed else 0]) + struct.pack(">I", len(data)) + data


def write(name, chunk, setup, body):
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(bytes([chunk, setup]) + body)


HEADERS, DATA, RST, SETTINGS, PING, GOAWAY, WINDOW = 1, 0, 3, 4, 6, 7, 8
start = frame(SETTINGS, 0, 0, struct.pack(">HI", 3, 100) + struct.pack(">HI", 4, 65535)) + frame(SETTINGS, 1, 0)

write("unary", 255, 0, start + frame(HEADERS, 4, 1, resp()) + frame(DATA, 0, 1, msg(b"hello")) +
      frame(HEADERS, 5, 1, trailers(0)))
write("trailers_only", 255, 0, start + frame(HEADERS, 5, 1, block([(":status", "200"),
      ("content-type", "application/grpc"), ("grpc-status", "7"), ("grpc-message", "no%20way")])))
write("http_only", 255, 0, start + frame(HEADERS, 5, 1, block([(":status", "503")])))
write("gzip", 255, 4, start + frame(HEADERS, 4, 1, resp([("grpc-encoding", "gzip")])) +
      frame(DATA, 0, 1, msg(gzip.compress(b"compressed reply"), True)) + frame(HEADERS, 5, 1, trailers(0)))
write("deflate", 255, 4, start + frame(HEADERS, 4, 1, resp([("grpc-encoding", "deflate")])) +
      frame(DATA, 0, 1, msg(zlib.compress(b"deflated reply"), True)) + frame(HEADERS, 5, 1, trailers(0)))
write("bad_encoding", 255, 0, start + frame(HEADERS, 4, 1, resp([("grpc-encoding", "snappy")])) +
      frame(DATA, 0, 1, msg(b"x", True)))
write("stream", 5, 3 | 16, start + frame(HEADERS, 4, 1, resp()) + frame(HEADERS, 4, 3, resp()) +
      frame(DATA, 0, 3, msg(b"a") + msg(b"H") + msg(b"R")[:3]) + frame(DATA, 0, 3, msg(b"R")[3:] + msg(b"S")) +
      frame(DATA, 0, 1, msg(b"X")) + frame(HEADERS, 5, 3, trailers(0, extra=[("x-t", "1")])) +
      frame(WINDOW, 0, 0, struct.pack(">I", 1000)) + frame(HEADERS, 5, 1, trailers(2, "boom")))
write("cancel", 255, 1, start + frame(HEADERS, 4, 1, resp([("x-fuzz", "C")])) + frame(HEADERS, 4, 3, resp()) +
      frame(DATA, 0, 3, msg(b"C")) + frame(HEADERS, 4, 5, resp([("x-fuzz", "R")])))
write("refuse", 255, 0, start + frame(HEADERS, 4, 1, resp([("x-fuzz", "R")])) + frame(DATA, 0, 1, msg(b"E")))
write("rst", 255, 1, start + frame(HEADERS, 4, 1, resp()) + frame(RST, 0, 1, struct.pack(">I", 8)) +
      frame(RST, 0, 3, struct.pack(">I", 2)))
write("goaway", 255, 3 | 32, start + frame(PING, 0, 0, b"12345678") + frame(HEADERS, 4, 1, resp()) +
      frame(GOAWAY, 0, 0, struct.pack(">II", 1, 0) + b"bye") + frame(HEADERS, 5, 1, trailers(0)))
write("no_trailers", 255, 0, start + frame(HEADERS, 4, 1, resp()) + frame(DATA, 1, 1, msg(b"x")))
write("inside_message", 255, 0, start + frame(HEADERS, 4, 1, resp()) + frame(DATA, 0, 1, msg(b"xyz")[:6]) +
      frame(HEADERS, 5, 1, trailers(0)))
write("timeout", 3, 8 | 1, start + frame(HEADERS, 4, 1, resp()) + frame(DATA, 0, 1, msg(b"a")) +
      frame(PING, 0, 0, b"abcdefgh") + frame(PING, 0, 0, b"abcdefgh") + frame(HEADERS, 5, 3, trailers(0)))
write("abort", 255, 64 | 1, start + frame(HEADERS, 4, 1, resp()))
