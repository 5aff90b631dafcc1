"""kasd's gRPC server layer (shards/grpc.c + core/h2.c) against a real gRPC client: python3-grpcio.

The server under test is test/support/grpc_testserver.c: kasd's shards, listeners and gRPC layer
with a few test methods. Every server here binds 127.0.0.1 on an ephemeral port and is stopped by
the test (SIGTERM, then SIGKILL after a timeout)."""
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import unittest

import grpc

sys.path.insert(0, os.path.dirname(__file__))

SERVER = os.environ.get("GRPC_TESTSERVER", "build/test/grpc_testserver")
CERTS = os.environ.get("KD_TEST_CERTS", os.path.join(os.path.dirname(__file__), "..", "certs"))
HAVE_CERTS = os.path.exists(os.path.join(CERTS, "server.pem"))


class Server:
    def __init__(self, *args, tls=False):
        cmd = [SERVER, *args]
        if tls:
            cmd += ["--cert", os.path.join(CERTS, "server.pem"), "--key", os.path.join(CERTS, "server.key")]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("test server did not start: " + self.proc.stderr.read())
        ports = json.loads(line)
        self.port, self.tls_port = ports["port"], ports["tls_port"]
        self.addr = f"127.0.0.1:{self.port}"

    def stop(self, timeout=15):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise
        self.stderr = self.proc.stderr.read()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return rc


def raw(channel, kind, path):
    return getattr(channel, kind)(path)


class GrpcServer(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.srv = Server(tls=HAVE_CERTS)
        cls.ch = grpc.insecure_channel(cls.srv.addr)

    @classmethod
    def tearDownClass(cls):
        cls.ch.close()
        assert cls.srv.stop() == 0

    def unary(self, path, req, timeout=10, **kw):
        return self.ch.unary_unary(path)(req, timeout=timeout, **kw)

    def test_health_serving(self):
        self.assertEqual(self.unary("/grpc.health.v1.Health/Check", b""), b"\x08\x01")
        # service "kasd" (field 1, length 4)
        self.assertEqual(self.unary("/grpc.health.v1.Health/Check", b"\x0a\x04kasd"), b"\x08\x01")

    def test_health_unknown_service(self):
        with self.assertRaises(grpc.RpcError) as cm:
            self.unary("/grpc.health.v1.Health/Check", b"\x0a\x03foo")
        self.assertEqual(cm.exception.code(), grpc.StatusCode.NOT_FOUND)

    def test_unknown_method(self):
        with self.assertRaises(grpc.RpcError) as cm:
            self.unary("/no.Such/Method", b"x")
        self.assertEqual(cm.exception.code(), grpc.StatusCode.UNIMPLEMENTED)
        self.assertIn("/no.Such/Method", cm.exception.details())

    def test_unary_sizes(self):
        for size in (0, 1, 100, 16383, 16384, 65536, 1 << 20, 4 << 20):
            data = bytes((i * 7) % 251 for i in range(size)) if size < 70000 else os.urandom(size)
            self.assertEqual(self.unary("/test.Echo/Unary", data, timeout=30), data, size)

    def test_oversize_message_resource_exhausted(self):
        with self.assertRaises(grpc.RpcError) as cm:
            self.unary("/test.Echo/Unary", b"z" * ((4 << 20) + 1), timeout=30)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        # the connection is still good
        self.assertEqual(self.unary("/test.Echo/Unary", b"after"), b"after")

    def test_server_streaming(self):
        msgs = list(self.ch.unary_stream("/test.Echo/ServerStream")(b"200 65536", timeout=30))
        self.assertEqual(len(msgs), 200)
        self.assertTrue(all(len(m) == 65536 for m in msgs))
        self.assertEqual(msgs[0][:3], b"abc")

    def test_client_streaming(self):
        reply = self.ch.stream_unary("/test.Echo/ClientStream")(iter([b"q" * 10000] * 300), timeout=30)
        self.assertEqual(reply, b"3000000")

    def test_bidi_streaming_ping_pong(self):
        import queue
        q = queue.Queue()

        def requests():
            for i in range(100):
                q.put(i)
                yield f"msg {i}".encode() * 50
            # half-close after the last

        got = []
        for i, m in enumerate(self.ch.stream_stream("/test.Echo/Bidi")(requests(), timeout=30)):
            self.assertEqual(m, f"msg {i}".encode() * 50)
            got.append(m)
        self.assertEqual(len(got), 100)

    def test_status_message_and_trailers_pass_through(self):
        with self.assertRaises(grpc.RpcError) as cm:
            self.unary("/test.Echo/Status", "7 denied: é 100% \n done".encode())
        e = cm.exception
        self.assertEqual(e.code(), grpc.StatusCode.PERMISSION_DENIED)
        self.assertEqual(e.details(), "denied: é 100% \n done")
        self.assertIn(("x-test-trailer", "yes"), [(m.key, m.value) for m in e.trailing_metadata()])

    def test_metadata_reaches_handler(self):
        out = self.unary("/test.Echo/Metadata", b"", metadata=(("x-foo", "bar"), ("x-blob-bin", b"\x00\x01")))
        lines = out.decode().splitlines()
        self.assertIn("x-foo=bar", lines)
        self.assertIn("content-type=application/grpc", lines)
        self.assertTrue(any(l.startswith("x-blob-bin=") for l in lines))

    def test_many_concurrent_calls_one_connection(self):
        u = self.ch.unary_unary("/test.Echo/Unary")
        futs = [u.future(f"c{i}".encode() * 100, timeout=30) for i in range(400)]
        for i, f in enumerate(futs):
            self.assertEqual(f.result(), f"c{i}".encode() * 100)

    def test_deadline_expires(self):
        t0 = time.monotonic()
        with self.assertRaises(grpc.RpcError) as cm:
            self.unary("/test.Echo/Hang", b"", timeout=0.5)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.DEADLINE_EXCEEDED)
        self.assertLess(time.monotonic() - t0, 3)

    def test_client_cancel_reaches_handler(self):
        def stats():
            return dict(kv.split("=") for kv in self.unary("/test.Echo/Stats", b"").decode().split())

        before = int(stats()["cancelled"])
        f = self.ch.unary_unary("/test.Echo/Hang").future(b"", timeout=30)
        time.sleep(0.3)
        f.cancel()
        deadline = time.monotonic() + 5
        while int(stats()["cancelled"]) <= before:
            self.assertLess(time.monotonic(), deadline, "handler never saw the cancellation")
            time.sleep(0.05)

    @unittest.skipUnless(HAVE_CERTS, "no test certificates")
    def test_tls(self):
        with open(os.path.join(CERTS, "ca.pem"), "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        with grpc.secure_channel(f"localhost:{self.srv.tls_port}", creds) as ch:
            self.assertEqual(ch.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=10), b"\x08\x01")
            data = os.urandom(1 << 20)
            self.assertEqual(ch.unary_unary("/test.Echo/Unary")(data, timeout=30), data)
            msgs = list(ch.unary_stream("/test.Echo/ServerStream")(b"50 100000", timeout=30))
            self.assertEqual(sum(len(m) for m in msgs), 5000000)
            got = list(ch.stream_stream("/test.Echo/Bidi")(iter([b"t" * 3000] * 100), timeout=30))
            self.assertEqual(len(got), 100)
            with self.assertRaises(grpc.RpcError) as cm:
                ch.unary_unary("/test.Echo/Hang")(b"", timeout=0.3)
            self.assertEqual(cm.exception.code(), grpc.StatusCode.DEADLINE_EXCEEDED)

    @unittest.skipUnless(HAVE_CERTS, "no test certificates")
    def test_tls_garbage_and_plaintext_are_refused_others_carry_on(self):
        # Plaintext HTTP/2, a handshake record that is not a ClientHello, random bytes: each
        # connection must be closed (EOF or reset, not left hanging) having received nothing but
        # TLS alert records (content type 21, TLS 1.x, 2 bytes, level fatal) - no HTTP/2 frame.
        for garbage in (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00" * 100,
                        b"\x16\x03\x01\x00\x05hello" + b"\x00" * 100, os.urandom(200)):
            s = socket.create_connection(("127.0.0.1", self.srv.tls_port), timeout=5)
            s.sendall(garbage)
            got, how, end = b"", None, time.monotonic() + 5
            while how is None:
                s.settimeout(max(end - time.monotonic(), 0.01))
                try:
                    chunk = s.recv(4096)
                    if chunk:
                        got += chunk
                    else:
                        how = "eof"
                except ConnectionResetError:
                    how = "reset"
                except socket.timeout:
                    how = "timeout"
            s.close()
            self.assertIn(how, ("eof", "reset"), f"garbage {garbage[:8]!r}: not closed within 5 s")
            rest = got
            while rest:
                self.assertTrue(len(rest) >= 7 and rest[0] == 21 and rest[1] == 3 and rest[3:5] == b"\x00\x02"
                                and rest[5] == 2, f"garbage {garbage[:8]!r}: got {got.hex()}, not TLS alerts")
                rest = rest[7:]
        self.assertEqual(self.unary("/test.Echo/Unary", b"still"), b"still")


def h2_frame(ftype, flags, sid, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", sid) + payload


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def read_frames(s, until, timeout=5):
    """Read frames until `until(type, flags, payload)` is true, the peer closes, or `timeout` passes.
    Returns (found, closed): closed is True only for an EOF or a reset, never for a timeout (a
    silent peer is not a closed one)."""
    buf = b""
    end = time.monotonic() + timeout
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return False, False
        s.settimeout(left)
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            return False, False
        except ConnectionResetError:
            return False, True
        if not chunk:
            return False, True
        buf += chunk
        while len(buf) >= 9:
            ln = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + ln:
                break
            ftype, flags, payload = buf[3], buf[4], buf[9:9 + ln]
            buf = buf[9 + ln:]
            if until(ftype, flags, payload):
                return True, False


class BadInput(unittest.TestCase):
    def setUp(self):
        self.srv = Server("--handshake-ms", "500", "--max-age-ms", "1500", "--grace-ms", "800")
        self.ch = grpc.insecure_channel(self.srv.addr)

    def tearDown(self):
        self.ch.close()
        self.assertEqual(self.srv.stop(), 0)

    def ok(self):
        self.assertEqual(self.ch.unary_unary("/test.Echo/Unary")(b"fine", timeout=10), b"fine")

    def connect(self):
        s = socket.create_connection(("127.0.0.1", self.srv.port), timeout=5)
        self.addCleanup(s.close)
        return s

    def test_garbage_preface_closed_others_fine(self):
        s = self.connect()
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 10)
        found, closed = read_frames(s, lambda t, f, p: False, timeout=5)
        self.assertTrue(closed, "a connection that does not start with the preface must be closed")
        self.ok()

    def test_invalid_frames_goaway(self):
        s = self.connect()
        # SETTINGS on a stream (PROTOCOL_ERROR), then junk
        s.sendall(PREFACE + h2_frame(4, 0, 0) + h2_frame(4, 0, 1, b"\x00" * 6) + os.urandom(200))
        found, _ = read_frames(s, lambda t, f, p: t == 7 and int.from_bytes(p[4:8], "big") == 1)
        self.assertTrue(found, "expected GOAWAY PROTOCOL_ERROR")
        found, closed = read_frames(s, lambda t, f, p: False)
        self.assertTrue(closed, "closed after the GOAWAY")
        self.ok()

    def test_half_open_connection_closed_after_timeout(self):
        s = self.connect()  # says nothing at all
        t0 = time.monotonic()
        found, closed = read_frames(s, lambda t, f, p: False, timeout=5)
        self.assertTrue(closed, "an idle connection that never sent the preface must be closed")
        self.assertLess(time.monotonic() - t0, 4)
        self.ok()

    def test_large_metadata_accepted_up_to_the_advertised_limit(self):
        """grpc-go and grpcio clients enforce the SETTINGS_MAX_HEADER_LIST_SIZE we advertise on their
        side: 64 KiB of metadata (agentk, GitLab) must fit, and more than the limit fails in the
        caller with RESOURCE_EXHAUSTED (not a broken connection)."""
        md = tuple((f"x-big-{i}", "v" * 8192) for i in range(8))
        self.assertEqual(self.ch.unary_unary("/test.Echo/Unary")(b"x", timeout=10, metadata=md), b"x")
        with self.assertRaises(grpc.RpcError) as cm:
            self.ch.unary_unary("/test.Echo/Unary")(
                b"x", timeout=10, metadata=tuple((f"x-big-{i}", "v" * 60000) for i in range(20)))
        self.assertEqual(cm.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.ok()

    def test_header_block_over_the_limit_gets_a_status_connection_survives(self):
        """A peer that ignores our SETTINGS: the call is answered trailers-only (HEADERS with
        END_STREAM, RESOURCE_EXHAUSTED), not reset, and the connection carries on."""
        import h2raw
        p = h2raw.Peer(("127.0.0.1", self.srv.port), answer_pings=True).connect()
        self.addCleanup(p.close)
        block = h2raw.grpc_request_headers(
            "/test.Echo/Unary", extra=[(f"x-big-{i}", "v" * 60000) for i in range(20)])  # 1.2 MB
        p.send(h2raw.header_frames(1, block))
        got = p.pump(lambda t, f, sid, pl: sid == 1 and t in (h2raw.HEADERS, h2raw.RST_STREAM), timeout=10)
        self.assertTrue(got, "no answer to the oversized request")
        t, f = p.frames[-1][1], p.frames[-1][2]
        self.assertEqual(t, h2raw.HEADERS, "answered with a status, not RST_STREAM")
        self.assertTrue(f & h2raw.END_STREAM, "trailers-only response")
        # still usable: a normal call on the same connection, then a PING round trip
        p.send(h2raw.header_frames(3, h2raw.grpc_request_headers("/test.Echo/Unary")) +
               h2raw.frame(h2raw.DATA, h2raw.END_STREAM, 3, h2raw.grpc_message(b"ok")))
        self.assertTrue(p.pump(lambda t, f, sid, pl: sid == 3 and t == h2raw.DATA, timeout=10))
        p.send(h2raw.frame(h2raw.PING, 0, 0, b"12345678"))
        self.assertTrue(p.pump(lambda t, f, sid, pl: t == h2raw.PING and f & h2raw.ACK, timeout=10))
        self.ok()

    def test_url_authority_accepted_malformed_requests_reset(self):
        """A grpc-go client dialling through a custom dialer (agentk's ws:// addresses) sends the
        whole URL as :authority: served, as grpc-go servers do. Malformed request header blocks are
        still reset with PROTOCOL_ERROR (kasd checks them itself) and the connection carries on."""
        import h2raw
        p = h2raw.Peer(("127.0.0.1", self.srv.port), answer_pings=True).connect()
        self.addCleanup(p.close)
        p.send(h2raw.header_frames(1, h2raw.grpc_request_headers("/test.Echo/Unary",
                                                                 authority="ws://127.0.0.1:8150")) +
               h2raw.frame(h2raw.DATA, h2raw.END_STREAM, 1, h2raw.grpc_message(b"ok")))
        self.assertTrue(p.pump(lambda t, f, sid, pl: sid == 1 and t == h2raw.DATA, timeout=10),
                        "a URL in :authority was not served")
        bad = [
            [("X-Upper", "v")],
            [("connection", "close")],
            [("te", "gzip")],
            [("x-crlf", "a\r\nb")],
            [(":unknown", "v")],
        ]
        sid = 3
        for extra in bad:
            with self.subTest(extra=extra):
                p.send(h2raw.header_frames(sid, h2raw.grpc_request_headers("/test.Echo/Unary", extra=extra),
                                           end_stream=True))
                got = p.pump(lambda t, f, s_, pl: s_ == sid and t in (h2raw.HEADERS, h2raw.RST_STREAM),
                             timeout=10)
                self.assertTrue(got, "no answer")
                t, pl = p.frames[-1][1], p.frames[-1][4]
                self.assertEqual(t, h2raw.RST_STREAM, f"{extra} was not reset")
                self.assertEqual(struct.unpack(">I", pl)[0], 1, "PROTOCOL_ERROR")
            sid += 2
        # a pseudo-header after a regular one, and a request without :path
        late = h2raw.grpc_request_headers("/test.Echo/Unary") + h2raw.literal(":path", "/x")
        nopath = b"".join(h2raw.literal(n, v) for n, v in
                          ((":method", "POST"), (":scheme", "http"), ("content-type", "application/grpc")))
        for block in (late, nopath):
            p.send(h2raw.header_frames(sid, block, end_stream=True))
            self.assertTrue(p.pump(lambda t, f, s_, pl: s_ == sid and t == h2raw.RST_STREAM, timeout=10))
            sid += 2
        p.send(h2raw.header_frames(sid, h2raw.grpc_request_headers("/test.Echo/Unary")) +
               h2raw.frame(h2raw.DATA, h2raw.END_STREAM, sid, h2raw.grpc_message(b"ok")))
        self.assertTrue(p.pump(lambda t, f, s_, pl: s_ == sid and t == h2raw.DATA, timeout=10))
        self.ok()

    def test_ping_flood_gets_goaway_enhance_your_calm(self):
        s = self.connect()
        flood = PREFACE + h2_frame(4, 0, 0) + b"".join(h2_frame(6, 0, 0, struct.pack(">Q", i)) for i in range(10))
        try:
            s.sendall(flood)  # one write: the server may close right after its GOAWAY
        except (BrokenPipeError, ConnectionResetError):
            pass
        found, _ = read_frames(s, lambda t, f, p: t == 7 and int.from_bytes(p[4:8], "big") == 0xB)
        self.assertTrue(found, "expected GOAWAY ENHANCE_YOUR_CALM")
        self.ok()

    def test_max_connection_age_goaway_then_close(self):
        s = self.connect()
        s.sendall(PREFACE + h2_frame(4, 0, 0))
        found, _ = read_frames(s, lambda t, f, p: t == 7 and int.from_bytes(p[4:8], "big") == 0, timeout=4)
        self.assertTrue(found, "expected GOAWAY NO_ERROR at max connection age")
        found, closed = read_frames(s, lambda t, f, p: False, timeout=4)
        self.assertTrue(closed, "closed after the grace period")
        # a grpc client simply reconnects
        self.ok()
        time.sleep(2)
        self.ok()


def vm_hwm_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


class Compression(unittest.TestCase):
    """grpcio callers that compress (as agentk's grpc-go does, with gzip) and a server that answers
    compressed when configured to."""

    def run_calls(self, addr, compression):
        with grpc.insecure_channel(addr, compression=compression) as ch:
            # random bytes grow a little when compressed: the largest stays under the 4 MiB wire limit
            for size in (0, 1, 100, 65536, 1 << 20, 4 << 20):
                data = bytes((i * 7) % 251 for i in range(size)) if size < 70000 else os.urandom(size)
                if size == 4 << 20:
                    data = b"kasd" * (1 << 20)  # 4 MiB inflated, a few KiB compressed
                self.assertEqual(ch.unary_unary("/test.Echo/Unary")(data, timeout=30), data, size)
            msgs = [f"msg {i}".encode() * 50 for i in range(50)]
            self.assertEqual(list(ch.stream_stream("/test.Echo/Bidi")(iter(msgs), timeout=30)), msgs)
            reply = ch.stream_unary("/test.Echo/ClientStream")(iter([b"q" * 10000] * 30), timeout=30)
            self.assertEqual(reply, b"300000")

    def test_gzip_and_deflate_callers(self):
        srv = Server()
        try:
            for comp in (grpc.Compression.Gzip, grpc.Compression.Deflate, grpc.Compression.NoCompression):
                with self.subTest(comp=comp):
                    self.run_calls(srv.addr, comp)
        finally:
            self.assertEqual(srv.stop(), 0)

    def test_gzip_responses_decoded_by_grpcio(self):
        srv = Server("--response-gzip")
        try:
            for comp in (grpc.Compression.Gzip, grpc.Compression.NoCompression):
                with self.subTest(comp=comp):
                    self.run_calls(srv.addr, comp)
        finally:
            self.assertEqual(srv.stop(), 0)

    def test_gzip_bomb_resource_exhausted_and_memory_bounded(self):
        srv = Server()
        try:
            with grpc.insecure_channel(srv.addr, compression=grpc.Compression.Gzip) as ch:
                call = ch.unary_unary("/test.Echo/Unary")
                self.assertEqual(call(b"warm", timeout=10), b"warm")
                before = vm_hwm_kib(srv.proc.pid)
                bomb = bytes(256 << 20)  # 256 MiB of zeros: about 250 KiB on the wire
                for _ in range(3):
                    with self.assertRaises(grpc.RpcError) as cm:
                        call(bomb, timeout=60)
                    self.assertEqual(cm.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
                    self.assertIn("after decompression larger than max", cm.exception.details())
                grown = vm_hwm_kib(srv.proc.pid) - before
                # the limit is 4 MiB: the message buffer plus zlib's state, nowhere near 256 MiB
                # (an ASan build keeps freed buffers in quarantine: more slack there)
                slack = 96 * 1024 if "ASAN_OPTIONS" in os.environ else 24 * 1024
                self.assertLess(grown, slack, f"kasd's peak RSS grew {grown} KiB")
                self.assertEqual(call(b"after", timeout=10), b"after")
        finally:
            self.assertEqual(srv.stop(), 0)


class Shutdown(unittest.TestCase):
    def test_shutdown_mid_call_gives_unavailable_not_hang(self):
        srv = Server()
        ch = grpc.insecure_channel(srv.addr)
        f = ch.unary_unary("/test.Echo/Hang").future(b"", timeout=60)
        stream = ch.unary_stream("/test.Echo/ServerStream")(b"1000000 10", timeout=60)
        next(stream)
        time.sleep(0.2)
        t0 = time.monotonic()
        self.assertEqual(srv.stop(timeout=20), 0)
        with self.assertRaises(grpc.RpcError) as cm:
            f.result(timeout=10)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.UNAVAILABLE)
        with self.assertRaises(grpc.RpcError):
            for _ in stream:
                pass
        self.assertLess(time.monotonic() - t0, 10)
        ch.close()


if __name__ == "__main__":
    result = unittest.main(exit=False, verbosity=2).result
    failed = len(result.failures) + len(result.errors)
    print(f"{result.testsRun - failed - len(result.skipped)} passed, {failed} failed, "
          f"{len(result.skipped)} skipped")
    sys.exit(1 if failed else 0)
