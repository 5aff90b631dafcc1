"""gRPC inside WebSocket on the agent listener (agentk's ws:// and wss:// kas addresses), with raw
sockets: the upgrade and its refusals, HTTP/2 inside masked binary frames, ping/pong, bad frames,
TLS (wss), raw h2c on the same port, the listener counters, and a whole agent (agentk.py, grpcio)
registering and serving routed calls through a local WebSocket bridge. kasd runs with 2 shards, so
the agent connections are handed to their owner shard with the WebSocket state in the middle of a
stream."""
import base64
import hashlib
import os
import random
import re
import socket
import ssl
import struct
import sys
import tempfile
import threading
import time
import unittest
import urllib.request

import grpc

sys.path.insert(0, os.path.dirname(__file__))
import gitlab_client  # noqa: E402
from agentk import AgentK  # noqa: E402
from gitlab_client import GitLabClient  # noqa: E402
from kasd_harness import Kasd, service_config, metric  # noqa: E402

CERTS = os.environ.get("KD_TEST_CERTS", os.path.join(os.path.dirname(__file__), "..", "certs"))
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_SETTINGS_EMPTY = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
TIMEOUT = 10


def accept_for(key):
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


def upgrade_request(key, protocol="ws-tunnel", version="13", extra=""):
    req = ("GET /-/kubernetes-agent/ HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
           "Connection: Upgrade\r\n")
    if version is not None:
        req += f"Sec-WebSocket-Version: {version}\r\n"
    if key is not None:
        req += f"Sec-WebSocket-Key: {key}\r\n"
    if protocol is not None:
        req += f"Sec-WebSocket-Protocol: {protocol}\r\n"
    return (req + extra + "\r\n").encode()


def read_head(s):
    """The HTTP response head: (status, {lower-case name: value}, bytes after the head, body)."""
    buf = b""
    deadline = time.monotonic() + TIMEOUT
    while b"\r\n\r\n" not in buf:
        if time.monotonic() > deadline or len(buf) > 65536:
            raise AssertionError(f"no response head: {buf!r}")
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1]) if lines[0].startswith("HTTP/1.1 ") else 0
    headers = {}
    for line in lines[1:]:
        n, _, v = line.partition(":")
        headers[n.strip().lower()] = v.strip()
    if status and status != 101:
        n = int(headers.get("content-length", "0"))
        while len(rest) < n:
            chunk = s.recv(4096)
            if not chunk:
                break
            rest += chunk
    return status, headers, rest, lines[0]


def client_frame(op, payload, fin=True, mask=True, rsv=0):
    b0 = (0x80 if fin else 0) | rsv | op
    n = len(payload)
    if n < 126:
        hdr = struct.pack("!BB", b0, n | (0x80 if mask else 0))
    elif n <= 0xFFFF:
        hdr = struct.pack("!BBH", b0, 126 | (0x80 if mask else 0), n)
    else:
        hdr = struct.pack("!BBQ", b0, 127 | (0x80 if mask else 0), n)
    if not mask:
        return hdr + payload
    key = os.urandom(4)
    return hdr + key + bytes(b ^ key[i & 3] for i, b in enumerate(payload))


class FrameReader:
    """Server frames from a socket (they must not be masked)."""

    def __init__(self, sock, initial=b""):
        self.s = sock
        self.buf = initial

    def _need(self, n):
        while len(self.buf) < n:
            chunk = self.s.recv(65536)
            if not chunk:
                raise EOFError("connection closed")
            self.buf += chunk

    def frame(self):
        self._need(2)
        b0, b1 = self.buf[0], self.buf[1]
        assert not (b1 & 0x80), "server frames are never masked"
        n, at = b1 & 0x7F, 2
        if n == 126:
            self._need(4)
            n, at = struct.unpack("!H", self.buf[2:4])[0], 4
        elif n == 127:
            self._need(10)
            n, at = struct.unpack("!Q", self.buf[2:10])[0], 10
        self._need(at + n)
        payload = self.buf[at:at + n]
        self.buf = self.buf[at + n:]
        return b0 & 0x0F, bool(b0 & 0x80), payload

    def close_code(self):
        """Skip data frames until the close; its (code, reason)."""
        while True:
            op, _, p = self.frame()
            if op == 8:
                return (struct.unpack("!H", p[:2])[0] if len(p) >= 2 else None), p[2:].decode()


def ws_connect(addr, key=None, tls_ctx=None):
    key = key or base64.b64encode(os.urandom(16)).decode()
    raw = socket.create_connection(addr, timeout=TIMEOUT)
    s = tls_ctx.wrap_socket(raw, server_hostname="localhost") if tls_ctx else raw
    s.settimeout(TIMEOUT)
    s.sendall(upgrade_request(key))
    status, headers, rest, line = read_head(s)
    return s, key, status, headers, rest


def h2_frames(data):
    """Split HTTP/2 bytes into (type, flags, stream, payload) frames."""
    out = []
    while len(data) >= 9:
        n = int.from_bytes(data[:3], "big")
        if len(data) < 9 + n:
            break
        out.append((data[3], data[4], int.from_bytes(data[5:9], "big") & 0x7FFFFFFF, data[9:9 + n]))
        data = data[9 + n:]
    return out, data


class Bridge:
    """127.0.0.1 TCP <-> kasd over WebSocket: what agentk's ws:// dialer does, for grpcio clients.
    Outbound bytes go in masked binary frames, cut at random places into frames, fragments and
    TCP writes, so kasd sees frames split every way; kasd's frames are unwrapped, pings answered."""

    def __init__(self, target, tls_ctx=None):
        self.target = target
        self.tls_ctx = tls_ctx
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.addr = "127.0.0.1:%d" % self.lsock.getsockname()[1]
        self.upgrades = 0
        self.errors = []
        self.rng = random.Random(1234)
        self._socks = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._stop:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        try:
            s, key, status, headers, rest = ws_connect(self.target, tls_ctx=self.tls_ctx)
        except Exception as e:  # noqa: BLE001
            self.errors.append(f"connect: {e}")
            c.close()
            return
        if status != 101 or headers.get("sec-websocket-accept") != accept_for(key):
            self.errors.append(f"upgrade: {status} {headers}")
            c.close()
            s.close()
            return
        self.upgrades += 1
        s.settimeout(None)
        self._socks += [c, s]
        lock = threading.Lock()
        threading.Thread(target=self._up, args=(c, s, lock), daemon=True).start()
        self._down(c, s, rest, lock)

    @staticmethod
    def _headers_ends(st, data):
        """Offsets in data where an HTTP/2 HEADERS frame from the client ends (st: parse state
        across chunks: preface left, partial frame header, payload left, its type)."""
        ends, i = [], 0
        while i < len(data):
            if st["preface"]:
                n = min(st["preface"], len(data) - i)
                st["preface"] -= n
                i += n
            elif st["left"]:
                n = min(st["left"], len(data) - i)
                st["left"] -= n
                i += n
                if st["left"] == 0 and st["type"] == 1:
                    ends.append(i)
            else:
                n = min(9 - len(st["hdr"]), len(data) - i)
                st["hdr"] += data[i:i + n]
                i += n
                if len(st["hdr"]) == 9:
                    st["left"], st["type"] = int.from_bytes(st["hdr"][:3], "big"), st["hdr"][3]
                    st["hdr"] = b""
                    if st["left"] == 0 and st["type"] == 1:
                        ends.append(i)
        return ends

    def _up(self, c, s, lock):
        st = {"preface": len(H2_PREFACE), "hdr": b"", "left": 0, "type": 0}
        try:
            while True:
                data = c.recv(65536)
                if not data:
                    break
                c.settimeout(0.005)  # gather what grpcio writes together (HEADERS + DATA)
                try:
                    while len(data) < 65536:
                        more = c.recv(65536)
                        if not more:
                            break
                        data += more
                except (socket.timeout, BlockingIOError):
                    pass
                c.settimeout(None)
                ends = [e for e in self._headers_ends(st, data) if e < len(data)]
                if ends:
                    # One frame, sent up to the end of a HEADERS frame, then a pause: kasd starts
                    # the call (an agent's first call moves the connection to its owner shard)
                    # while it holds a frame half-read, so that state must move with it.
                    f = client_frame(2, data)
                    cut = len(f) - len(data) + ends[0]
                    with lock:
                        s.sendall(f[:cut])
                        time.sleep(0.02)
                        s.sendall(f[cut:])
                    continue
                frames = []
                while data:
                    n = self.rng.randint(1, max(1, len(data)))
                    piece, data = data[:n], data[n:]
                    if len(piece) > 3 and self.rng.random() < 0.3:
                        k = self.rng.randint(1, len(piece) - 1)  # a fragmented message
                        frames += [client_frame(2, piece[:k], fin=False), client_frame(0, piece[k:])]
                    else:
                        frames.append(client_frame(2, piece))
                with lock:
                    for f in frames:  # each frame cut anywhere into two writes
                        k = self.rng.randint(1, len(f))
                        s.sendall(f[:k])
                        s.sendall(f[k:])
        except OSError:
            pass
        finally:
            try:
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _down(self, c, s, rest, lock):
        r = FrameReader(s, rest)
        try:
            while True:
                op, _, p = r.frame()
                if op in (0, 2):
                    c.sendall(p)
                elif op == 9:
                    with lock:
                        s.sendall(client_frame(10, p))
                elif op == 8:
                    break
                else:
                    self.errors.append(f"unexpected opcode {op}")
        except (OSError, EOFError):
            pass
        finally:
            for x in (c, s):
                try:
                    x.close()
                except OSError:
                    pass

    def close(self):
        self._stop = True
        self.lsock.close()
        for x in self._socks:
            try:
                x.close()
            except OSError:
                pass



def setup_dir(prefix, n_agents):
    d = tempfile.mkdtemp(prefix=prefix)
    tokens = {i: base64.urlsafe_b64encode(os.urandom(24)).decode() for i in range(1, n_agents + 1)}
    with open(os.path.join(d, "tokens.yaml"), "w") as f:
        f.write("agents:\n")
        for i, t in tokens.items():
            f.write(f"  - token: \"{t}\"\n    agent_id: {i}\n    project_id: {100 + i}\n"
                    f"    agent_name: agent-{i}\n")
    secret = gitlab_client.generate_secret()
    gitlab_client.write_secret(os.path.join(d, "api-secret"), secret)
    return d, tokens, secret


def who_handler(agent_id):
    def handle(call):
        for _ in call:
            pass
        call.send_header({})
        call.send_message(b"agent %d over websocket" % agent_id)
        call.send_trailer({})
    return handle


class WebSocket(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir, cls.tokens, cls.secret = setup_dir("kasd-ws-", 8)
        cfg = service_config(cls.dir, "limits:\n  routing_timeout: 5s\n  shutdown_grace: 3s\n")
        cls.kasd = Kasd(config=cfg)
        assert cls.kasd.started, cls.kasd.log()
        cls.addr = cls.kasd.listeners["agent"]

    @classmethod
    def tearDownClass(cls):
        rc = cls.kasd.stop()
        cls.kasd.kill()
        assert rc == 0, f"exit code {rc}\n" + cls.kasd.log()

    def m(self, name):
        return metric(self.kasd, name, listener="agent")

    # --- the upgrade ---

    def test_upgrade_accepted(self):
        key = "dGhlIHNhbXBsZSBub25jZQ=="
        up0 = self.m("kasd_listener_websocket_upgrades_total")
        s, _, status, headers, rest = ws_connect(self.addr, key=key)
        with s:
            self.assertEqual(status, 101)
            self.assertEqual(headers.get("sec-websocket-accept"), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
            self.assertEqual(headers.get("sec-websocket-protocol"), "ws-tunnel")
            self.assertEqual(headers.get("upgrade", "").lower(), "websocket")
            self.assertNotIn("sec-websocket-extensions", headers, "nothing negotiated")
            # what follows the 101 is WebSocket: kasd's SETTINGS in a binary frame
            op, _, p = FrameReader(s, rest).frame()
            self.assertEqual(op, 2)
            self.assertEqual(h2_frames(p)[0][0][0], 4)
        self.assertEqual(self.m("kasd_listener_websocket_upgrades_total") - up0, 1)

    def refused(self, req):
        with socket.create_connection(self.addr, timeout=TIMEOUT) as s:
            s.settimeout(TIMEOUT)
            s.sendall(req)
            status, headers, body, _ = read_head(s)
            self.assertEqual(s.recv(100), b"", "closed after the answer")
            return status, headers, body.decode()

    def test_refusals(self):
        key = base64.b64encode(os.urandom(16)).decode()
        bad0 = self.m("kasd_listener_websocket_refused_total")
        cases = [
            (upgrade_request(key, protocol=None), 400, "Sec-WebSocket-Protocol must offer ws-tunnel"),
            (upgrade_request(key, protocol="chat"), 400, "Sec-WebSocket-Protocol must offer ws-tunnel"),
            (upgrade_request(key, version="8"), 426, "Sec-WebSocket-Version must be 13"),
            (upgrade_request("c2hvcnQ="), 400, "Sec-WebSocket-Key must be base64 of 16 bytes"),
            (upgrade_request(None), 400, "Sec-WebSocket-Key must be base64 of 16 bytes"),
            (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 400, "Upgrade header must list websocket"),
            # exactly the 8 KiB bound and no end: nothing unread is left for a reset to lose the answer
            (b"GET / HTTP/1.1\r\nX-Pad: ".ljust(8192, b"a"), 431, "request head too large"),
        ]
        for req, want, reason in cases:
            status, headers, body = self.refused(req)
            self.assertEqual(status, want, body)
            self.assertEqual(body, reason + "\n")
            if want == 426:
                self.assertEqual(headers.get("sec-websocket-version"), "13")
        self.assertEqual(self.m("kasd_listener_websocket_refused_total") - bad0, len(cases))
        log = self.kasd.log()
        self.assertIn('"event":"websocket_upgrade_refused"', log.replace(" ", ""))
        self.assertIn("Sec-WebSocket-Version must be 13", log)

    # --- frames ---

    def test_http2_inside_binary_frames(self):
        s, _, status, _, rest = ws_connect(self.addr)
        with s:
            self.assertEqual(status, 101)
            # the preface cut across two messages, the second one fragmented: boundaries mean nothing
            s.sendall(client_frame(2, H2_PREFACE[:5]) + client_frame(2, H2_PREFACE[5:20], fin=False) +
                      client_frame(0, H2_PREFACE[20:] + H2_SETTINGS_EMPTY))
            r = FrameReader(s, rest)
            got = b""
            deadline = time.monotonic() + TIMEOUT
            frames = []
            while not any(t == 4 and not (f & 1) for t, f, _, _ in frames):
                self.assertLess(time.monotonic(), deadline)
                op, fin, p = r.frame()
                self.assertEqual(op, 2, "HTTP/2 comes back in binary frames")
                self.assertLessEqual(len(p), 64 * 1024)
                got += p
                frames, _ = h2_frames(got)
            t, f, sid, _ = frames[0]
            self.assertEqual((t, sid), (4, 0), "kasd's SETTINGS first")
            # ping -> pong with the same payload, between HTTP/2 bytes
            s.sendall(client_frame(9, b"are you there?"))
            while True:
                op, fin, p = r.frame()
                if op == 10:
                    self.assertEqual(p, b"are you there?")
                    break
            # a clean close: echoed
            s.sendall(client_frame(8, struct.pack("!H", 1000) + b"bye"))
            code, _ = r.close_code()
            self.assertEqual(code, 1000)

    def bad_frame(self, frame):
        s, _, status, _, rest = ws_connect(self.addr)
        with s:
            self.assertEqual(status, 101)
            s.sendall(client_frame(2, H2_PREFACE) + frame)
            return FrameReader(s, rest).close_code()

    def test_unmasked_frame_closes_1002(self):
        bad0 = self.m("kasd_listener_websocket_bad_frames_total")
        code, reason = self.bad_frame(client_frame(2, H2_SETTINGS_EMPTY, mask=False))
        self.assertEqual(code, 1002)
        self.assertEqual(reason, "client frame not masked")
        self.assertEqual(self.m("kasd_listener_websocket_bad_frames_total") - bad0, 1)
        self.assertIn("client frame not masked", self.kasd.log())

    def test_text_frame_closes_1003(self):
        code, _ = self.bad_frame(client_frame(1, b"hello"))
        self.assertEqual(code, 1003)

    def test_reserved_bits_and_opcodes_close_1002(self):
        self.assertEqual(self.bad_frame(client_frame(2, b"x", rsv=0x40))[0], 1002)  # no permessage-deflate
        self.assertEqual(self.bad_frame(client_frame(5, b"x"))[0], 1002)

    # --- the same port still speaks h2c ---

    def test_raw_h2c_on_the_same_port(self):
        self.health_via(f"127.0.0.1:{self.addr[1]}")

    def health_via(self, target):
        with grpc.insecure_channel(target) as ch:
            stub = ch.unary_unary("/grpc.health.v1.Health/Check", request_serializer=None,
                                  response_deserializer=None)
            self.assertEqual(stub(b"", timeout=TIMEOUT), b"\x08\x01")  # SERVING

    def test_health_over_bridge(self):
        b = Bridge(self.addr)
        try:
            self.health_via(b.addr)
            self.assertEqual(b.upgrades, 1)
            self.assertEqual(b.errors, [])
        finally:
            b.close()

    # --- a whole agent over WebSocket ---

    def test_agent_over_websocket_serves_routed_calls(self):
        b = Bridge(self.addr)
        gl = GitLabClient("%s:%d" % self.kasd.listeners["api"], self.secret)
        agents = []
        try:
            moved0 = metric(self.kasd, "kasd_connection_handoffs_out_total")
            # Agents until one connection was handed to its owner shard mid-stream (1 in 2 each).
            for i in range(1, 9):
                a = AgentK(b.addr, self.tokens[i], pods=1, idle=2,
                           handlers={"/test.Echo/Who": who_handler(i)}).start()
                agents.append((i, a))
                a.wait_for(lambda st: st["tunnels_idle"] >= 2 and st["registers"] >= 1, timeout=15)
                if metric(self.kasd, "kasd_connection_handoffs_out_total") > moved0:
                    break
            self.assertGreater(metric(self.kasd, "kasd_connection_handoffs_out_total"), moved0,
                               "some agent connection moved shards")
            for i, a in agents:
                for _ in range(3):
                    data, _ = gl.unary("/test.Echo/Who", b"", agent_id=i, timeout=TIMEOUT)
                    self.assertEqual(data, b"agent %d over websocket" % i)
                big = os.urandom(300 * 1024)  # many frames each way
                data, _ = gl.unary("/test.Echo/Unary", big, agent_id=i, timeout=TIMEOUT)
                self.assertEqual(data, big)
            self.assertEqual(b.errors, [])
            self.assertEqual(b.upgrades, len(agents), "one connection per agent: none was lost")
        finally:
            for _, a in agents:
                a.stop(2)
            gl.close()
            b.close()


class WebSocketTLS(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir, cls.tokens, cls.secret = setup_dir("kasd-wss-", 1)
        cfg = f"""\
shards: 2
agent:
  listen:
    address: 127.0.0.1:0
    certificate_file: {CERTS}/server.pem
    key_file: {CERTS}/server.key
  token_file: {cls.dir}/tokens.yaml
api:
  listen:
    address: 127.0.0.1:0
    authentication_secret_file: {cls.dir}/api-secret
private_api:
  listen:
    address: 127.0.0.1:0
observability:
  listen:
    address: 127.0.0.1:0
limits:
  shutdown_grace: 3s
"""
        cls.kasd = Kasd(config=cfg)
        assert cls.kasd.started, cls.kasd.log()
        cls.addr = cls.kasd.listeners["agent"]
        # agentk's wss:// dial (Go net/http for an Upgrade request) offers no ALPN
        cls.ctx = ssl.create_default_context(cafile=os.path.join(CERTS, "ca.pem"))

    @classmethod
    def tearDownClass(cls):
        rc = cls.kasd.stop()
        cls.kasd.kill()
        assert rc == 0, f"exit code {rc}\n" + cls.kasd.log()

    def test_wss_upgrade_and_http2(self):
        s, key, status, headers, rest = ws_connect(self.addr, tls_ctx=self.ctx)
        with s:
            self.assertEqual(status, 101)
            self.assertEqual(headers.get("sec-websocket-accept"), accept_for(key))
            self.assertEqual(headers.get("sec-websocket-protocol"), "ws-tunnel")
            s.sendall(client_frame(2, H2_PREFACE + H2_SETTINGS_EMPTY))
            op, _, p = FrameReader(s, rest).frame()
            self.assertEqual(op, 2)
            frames, _ = h2_frames(p)
            self.assertEqual(frames[0][0], 4, "kasd's SETTINGS inside the first binary frame")

    def test_wss_bad_version(self):
        raw = socket.create_connection(self.addr, timeout=TIMEOUT)
        with self.ctx.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(upgrade_request(base64.b64encode(os.urandom(16)).decode(), version="12"))
            status, headers, body, _ = read_head(s)
            self.assertEqual(status, 426)
            self.assertEqual(body, b"Sec-WebSocket-Version must be 13\n")

    def test_agent_over_wss(self):
        b = Bridge(self.addr, tls_ctx=self.ctx)
        gl = GitLabClient("%s:%d" % self.kasd.listeners["api"], self.secret)
        a = AgentK(b.addr, self.tokens[1], pods=1, idle=2, handlers={"/test.Echo/Who": who_handler(1)})
        try:
            a.start()
            a.wait_for(lambda st: st["tunnels_idle"] >= 2, timeout=15)
            data, _ = gl.unary("/test.Echo/Who", b"", agent_id=1, timeout=TIMEOUT)
            self.assertEqual(data, b"agent 1 over websocket")
            self.assertEqual(b.errors, [])
        finally:
            a.stop(2)
            gl.close()
            b.close()

    def test_h2_with_alpn_still_works(self):
        with open(os.path.join(CERTS, "ca.pem"), "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        with grpc.secure_channel("127.0.0.1:%d" % self.addr[1], creds,
                                 options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
            stub = ch.unary_unary("/grpc.health.v1.Health/Check")
            self.assertEqual(stub(b"", timeout=TIMEOUT), b"\x08\x01")


class WebSocketDisabled(unittest.TestCase):
    def test_websocket_false_is_http2_only(self):
        d, _, _ = setup_dir("kasd-nows-", 1)
        cfg = service_config(d).replace("    address: 127.0.0.1:0\n  token_file",
                                        "    address: 127.0.0.1:0\n    websocket: false\n  token_file", 1)
        self.assertIn("websocket: false", cfg)
        k = Kasd(config=cfg)
        try:
            self.assertTrue(k.started, k.log())
            with socket.create_connection(k.listeners["agent"], timeout=TIMEOUT) as s:
                s.settimeout(TIMEOUT)
                s.sendall(upgrade_request(base64.b64encode(os.urandom(16)).decode()))
                got = b""
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    got += chunk
                self.assertFalse(got.startswith(b"HTTP/1.1"), got)
                frames, _ = h2_frames(got)
                self.assertTrue(frames, got)
                self.assertEqual(frames[0][0], 4, "HTTP/2 SETTINGS: the bytes went to nghttp2")
            self.assertEqual(metric(k, "kasd_listener_websocket_upgrades_total"), 0)
        finally:
            rc = k.stop()
            k.kill()
        self.assertEqual(rc, 0)


if __name__ == "__main__":
    unittest.main(verbosity=2)
