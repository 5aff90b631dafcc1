"""A minimal raw HTTP/2 peer for tests that need what gRPC libraries will not do: never answer a
PING, answer it on purpose, or send a header block larger than the server advertised.

Only what the tests use: frames, HPACK literals without indexing or Huffman (always valid to
send), header blocks split into HEADERS + CONTINUATION, and a frame reader that decodes nothing
but frame boundaries (the server's HPACK is not decoded; tests look for grpc-status in the raw
block, which nghttp2 sends as a literal for values it has not indexed yet)."""
import socket
import struct
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
MAX_FRAME = 16384


def frame(ftype, flags, sid, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", sid) + payload


def hpack_int(value, prefix_bits, first=0):
    """RFC 7541 5.1 integer with an N-bit prefix; `first` holds the bits above the prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name, value):
    """Literal header field without indexing, new name, no Huffman."""
    n = name.encode() if isinstance(name, str) else name
    v = value.encode() if isinstance(value, str) else value
    return b"\x00" + hpack_int(len(n), 7) + n + hpack_int(len(v), 7) + v


def grpc_request_headers(path, authority="kasd", extra=()):
    fields = [(":method", "POST"), (":scheme", "http"), (":authority", authority), (":path", path),
              ("content-type", "application/grpc"), ("te", "trailers"), *extra]
    return b"".join(literal(n, v) for n, v in fields)


def header_frames(sid, block, end_stream=False):
    """One header block as HEADERS + CONTINUATION frames of at most MAX_FRAME bytes."""
    out = []
    first = True
    while True:
        piece, block = block[:MAX_FRAME], block[MAX_FRAME:]
        last = not block
        if first:
            flags = (END_STREAM if end_stream else 0) | (END_HEADERS if last else 0)
            out.append(frame(HEADERS, flags, sid, piece))
            first = False
        else:
            out.append(frame(CONTINUATION, END_HEADERS if last else 0, sid, piece))
        if last:
            return b"".join(out)


def grpc_message(payload):
    return b"\x00" + struct.pack(">I", len(payload)) + payload


class Peer:
    """A raw client connection. connect() sends the preface and an empty SETTINGS and ACKs the
    server's SETTINGS as they come (so the server's handshake is complete); PINGs are answered
    only when answer_pings is true. Every frame read is recorded in self.frames as
    (monotonic time, type, flags, stream id, payload)."""

    def __init__(self, addr, answer_pings=False):
        self.sock = socket.create_connection(addr, timeout=5)
        self.answer_pings = answer_pings
        self.buf = b""
        self.frames = []
        self.closed_at = None

    def connect(self):
        self.sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
        return self

    def send(self, data):
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def close(self):
        self.sock.close()

    def _handle(self, ftype, flags, sid, payload):
        self.frames.append((time.monotonic(), ftype, flags, sid, payload))
        if ftype == SETTINGS and not flags & ACK:
            self.send(frame(SETTINGS, ACK, 0))
        elif ftype == PING and not flags & ACK and self.answer_pings:
            self.send(frame(PING, ACK, 0, payload))

    def pump(self, until=None, timeout=5.0):
        """Read frames until until(type, flags, sid, payload) is true (returns True), the server
        closes (returns False, closed_at set), or timeout passes (returns None)."""
        end = time.monotonic() + timeout
        while True:
            while len(self.buf) >= 9:
                ln = int.from_bytes(self.buf[:3], "big")
                if len(self.buf) < 9 + ln:
                    break
                ftype, flags = self.buf[3], self.buf[4]
                sid = int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
                payload = self.buf[9:9 + ln]
                self.buf = self.buf[9 + ln:]
                self._handle(ftype, flags, sid, payload)
                if until is not None and until(ftype, flags, sid, payload):
                    return True
            left = end - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(min(left, 0.5))
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.closed_at = time.monotonic()
                return False
            self.buf += chunk

    def count(self, ftype, flags_mask=None, flags=None):
        return sum(1 for _, t, f, _, _ in self.frames
                   if t == ftype and (flags_mask is None or f & flags_mask == flags))
