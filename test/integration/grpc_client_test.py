"""kasd's own gRPC client (kd_grpc_channel, driven by test/support/grpc_testclient.c) against
  (1) kasd's gRPC server (test/support/grpc_testserver.c), h2c and TLS, and
  (2) a real grpcio server in this process implementing the same test.Echo methods.
Every server binds 127.0.0.1 on an ephemeral port; the client run is bounded (120 s)."""
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import threading
import time
import unittest

import grpc

sys.path.insert(0, os.path.dirname(__file__))
from grpc_server_test import CERTS, HAVE_CERTS, Server  # noqa: E402

CLIENT = os.environ.get("GRPC_TESTCLIENT", "build/test/grpc_testclient")


def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connect is refused
    return port


def run_client(target, *extra):
    r = subprocess.run([CLIENT, "--target", target, "--refused-port", str(closed_port()), *extra],
                       capture_output=True, text=True, timeout=150)
    cases = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    return r.returncode, cases, r.stdout + r.stderr


class PyEcho:
    """test.Echo in grpcio, with raw bytes."""

    def __init__(self):
        self.cancelled = 0
        self.lock = threading.Lock()

    def unary(self, req, ctx):
        return req

    def server_stream(self, req, ctx):
        n, size = map(int, req.decode().split())
        data = bytes(ord("a") + i % 26 for i in range(size))
        for _ in range(n):
            yield data

    def client_stream(self, it, ctx):
        return str(sum(len(m) for m in it)).encode()

    def bidi(self, it, ctx):
        for m in it:
            yield m

    def status(self, req, ctx):
        code, msg = req.decode().split(" ", 1)
        ctx.set_trailing_metadata((("x-test-trailer", "yes"),))
        ctx.abort(next(c for c in grpc.StatusCode if c.value[0] == int(code)), msg)

    def hang(self, req, ctx):
        done = threading.Event()

        def gone():
            with self.lock:
                self.cancelled += 1
            done.set()

        ctx.add_callback(gone)
        done.wait(30)
        return b""

    def stats(self, req, ctx):
        return f"cancelled={self.cancelled} deadline=0".encode()


def py_server():
    e = PyEcho()
    h = grpc.method_handlers_generic_handler("test.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(e.unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(e.server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(e.client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(e.bidi),
        "Status": grpc.unary_unary_rpc_method_handler(e.status),
        "Hang": grpc.unary_unary_rpc_method_handler(e.hang),
        "Stats": grpc.unary_unary_rpc_method_handler(e.stats),
    })
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=64),
                         options=(("grpc.max_concurrent_streams", 1000),))
    server.add_generic_rpc_handlers((h,))
    port = server.add_insecure_port("127.0.0.1:0")
    creds = None
    tls_port = 0
    if HAVE_CERTS:
        with open(os.path.join(CERTS, "server.key"), "rb") as k, open(os.path.join(CERTS, "server.pem"), "rb") as c:
            creds = grpc.ssl_server_credentials(((k.read(), c.read()),))
        tls_port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    return server, port, tls_port


class KasdClient(unittest.TestCase):
    def check(self, rc, cases, out):
        self.assertGreaterEqual(len(cases), 11, out)
        failed = [c for c in cases if not c["ok"]]
        self.assertEqual(failed, [], out)
        self.assertEqual(rc, 0, out)

    def test_against_kasd_server_h2c(self):
        srv = Server(tls=HAVE_CERTS)
        try:
            self.check(*run_client(srv.addr))
        finally:
            self.assertEqual(srv.stop(), 0)

    @unittest.skipUnless(HAVE_CERTS, "no test certificates")
    def test_against_kasd_server_tls(self):
        srv = Server(tls=True)
        try:
            self.check(*run_client(f"127.0.0.1:{srv.tls_port}", "--ca", os.path.join(CERTS, "ca.pem"),
                                   "--server-name", "localhost"))
        finally:
            self.assertEqual(srv.stop(), 0)

    def test_against_grpcio_server_h2c(self):
        server, port, _ = py_server()
        try:
            self.check(*run_client(f"127.0.0.1:{port}"))
        finally:
            server.stop(1)

    @unittest.skipUnless(HAVE_CERTS, "no test certificates")
    def test_against_grpcio_server_tls(self):
        server, _, tls_port = py_server()
        try:
            self.check(*run_client(f"127.0.0.1:{tls_port}", "--ca", os.path.join(CERTS, "ca.pem"),
                                   "--server-name", "localhost"))
        finally:
            server.stop(1)

    @unittest.skipUnless(HAVE_CERTS, "no test certificates")
    def test_tls_wrong_name_fails_clearly(self):
        srv = Server(tls=True)
        try:
            rc, cases, out = run_client(f"127.0.0.1:{srv.tls_port}", "--ca", os.path.join(CERTS, "ca.pem"),
                                        "--server-name", "not-the-server.example")
            self.assertNotEqual(rc, 0)
            first = cases[0]
            self.assertFalse(first["ok"])
            self.assertIn("status 14", first["detail"], out)  # UNAVAILABLE
        finally:
            self.assertEqual(srv.stop(), 0)


if __name__ == "__main__":
    result = unittest.main(exit=False, verbosity=2).result
    failed = len(result.failures) + len(result.errors)
    print(f"{result.testsRun - failed - len(result.skipped)} passed, {failed} failed, "
          f"{len(result.skipped)} skipped")
    sys.exit(1 if failed else 0)
