"""kasd as a process: options, configuration errors, start on ephemeral loopback ports, accept
connections on every listener, the embedded Redis, graceful stop on SIGTERM/SIGINT with exit 0."""
import base64
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(__file__))
from kasd_harness import BASE_CONFIG, KASD, Kasd, connect, port_open, redis_ping, service_config, write_tokens  # noqa: E402


def run(*args, timeout=20):
    return subprocess.run([KASD, *args], capture_output=True, text=True, timeout=timeout)


class Options(unittest.TestCase):
    def test_version(self):
        r = run("--version")
        self.assertEqual(r.returncode, 0)
        self.assertRegex(r.stdout, r"^kasd \d+\.\d+\.\d+ \(tls: (openssl|wolfssl)\)\n$")

    def test_help(self):
        r = run("--help")
        self.assertEqual(r.returncode, 0)
        for word in ("--config", "--check-config", "--dev", "--version"):
            self.assertIn(word, r.stdout)

    def test_unknown_option(self):
        r = run("--no-such-option")
        self.assertEqual(r.returncode, 2)
        self.assertIn("usage:", r.stderr)

    def write(self, text):
        fd, path = tempfile.mkstemp(suffix=".yaml")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        self.addCleanup(os.unlink, path)
        return path

    def test_check_config_valid(self):
        path = self.write(BASE_CONFIG)
        r = run("--check-config", path)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("valid", r.stdout)

    def test_packaged_example_config_is_valid(self):
        example = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "packaging",
                               "kasd.example.yaml")
        # The files it names are checked too (as start-up reads them): without them it is refused,
        # naming the first one; with valid files in their place it is valid.
        r = run("--check-config", example)
        self.assertEqual(r.returncode, 2, r.stdout)
        self.assertIn("/etc/kasd/agent-tokens.yaml", r.stderr)
        d = tempfile.mkdtemp(prefix="kasd-example-")
        self.addCleanup(shutil.rmtree, d, True)
        write_tokens(os.path.join(d, "agent-tokens.yaml"), {1: ("x" * 32, 1)})
        for name in ("api-secret", "private-api-secret"):
            with open(os.path.join(d, name), "w") as f:
                f.write(base64.b64encode(os.urandom(32)).decode() + "\n")
        with open(example) as f:
            text = f.read()
        self.assertIn("/etc/kasd/", text)
        r = run("--check-config", self.write(text.replace("/etc/kasd/", d + "/")))
        self.assertEqual(r.returncode, 0, r.stderr)

    def test_check_config_unknown_key_names_file_line_and_key(self):
        path = self.write("agent:\n  listen:\n    adress: 127.0.0.1:1\n")
        r = run("--check-config", path)
        self.assertEqual(r.returncode, 2)
        self.assertIn(f"{path}:3:", r.stderr)
        self.assertIn("agent.listen.adress", r.stderr)
        self.assertIn("unknown key", r.stderr)

    def test_bad_config_fails_start_with_exit_2(self):
        path = self.write("api:\n  listen:\n    address: localhost\n")
        r = run("--config", path)
        self.assertEqual(r.returncode, 2)
        self.assertIn("api.listen.address", r.stderr)
        self.assertIn(f"{path}:3:", r.stderr)

    def test_missing_config_file(self):
        r = run("--config", "/nonexistent/kasd.yaml")
        self.assertEqual(r.returncode, 2)
        self.assertIn("/nonexistent/kasd.yaml", r.stderr)


class Lifecycle(unittest.TestCase):
    def start(self, *a, **kw):
        k = Kasd(*a, **kw)
        self.addCleanup(k.kill)
        return k

    def check_json_log(self, k):
        for line in k.lines:
            ev = json.loads(line)  # every line is one JSON object
            self.assertIn("level", ev)
            self.assertIn("event", ev)
            self.assertIn("ts", ev)

    def test_start_connect_sigterm_exit_0(self):
        k = self.start()
        self.assertTrue(k.started, k.log())
        self.assertEqual(set(k.listeners), {"agent", "api", "private_api", "observability"})
        socks = []
        for name, addr in k.listeners.items():
            self.assertEqual(addr[0], "127.0.0.1")
            self.assertNotEqual(addr[1], 0, "port 0 is resolved to the bound port")
            s = connect(addr)
            s.sendall(b"hello " + name.encode())
            socks.append(s)
        # the embedded redis-server is up and answering
        self.assertIsNotNone(k.redis_address)
        self.assertTrue(redis_ping(k.redis_address))
        k.signal(signal.SIGTERM)
        rc = k.wait(30)
        self.assertEqual(rc, 0, k.log())
        for s in socks:  # connections were closed (after the server's HTTP/2 frames: SETTINGS, GOAWAY)
            try:
                while s.recv(65536):
                    pass
            except ConnectionResetError:
                pass
            s.close()
        self.assertIsNotNone(k.wait_event("stopping", 1))
        self.assertIsNotNone(k.wait_event("stopped", 1))
        host, port = k.redis_address.rsplit(":", 1)
        self.assertFalse(port_open(host, int(port)), "the embedded redis-server is stopped with kasd")
        for addr in k.listeners.values():
            self.assertFalse(port_open(*addr))
        self.check_json_log(k)
        started = k.wait_event("started", 1)
        self.assertEqual(started["shards"], 2)

    def test_sigint_also_stops_cleanly(self):
        k = self.start()
        self.assertTrue(k.started, k.log())
        k.signal(signal.SIGINT)
        self.assertEqual(k.wait(30), 0, k.log())

    def test_busy_port_fails_start_naming_listener(self):
        hold = socket.socket()
        hold.bind(("127.0.0.1", 0))
        hold.listen(1)
        self.addCleanup(hold.close)
        port = hold.getsockname()[1]
        cfg = BASE_CONFIG.replace("api:\n  listen:\n    address: 127.0.0.1:0",
                                  f"api:\n  listen:\n    address: 127.0.0.1:{port}")
        k = self.start(config=cfg)
        self.assertFalse(k.started)
        rc = k.wait(30)
        self.assertEqual(rc, 1)
        log = k.log()
        self.assertIn("Address already in use", log)
        self.assertIn("api listener", log)
        # the embedded redis it had started (before binding the listeners) is gone too
        self.assertIsNotNone(k.redis_address, log)
        host, p = k.redis_address.rsplit(":", 1)
        self.assertFalse(port_open(host, int(p)))

    def test_many_connections_then_stop(self):
        k = self.start()
        self.assertTrue(k.started, k.log())
        socks = [connect(k.listeners["agent"]) for _ in range(200)]
        k.signal(signal.SIGTERM)
        self.assertEqual(k.wait(30), 0, k.log())
        for s in socks:
            s.close()

    def test_8k_path_is_logged_as_valid_json(self):
        # An api call without a bearer token is logged with its :path; 8 KB of it cannot fit a log
        # line (KD_LOG_LINE_MAX 4096), so the line is cut and must still parse.
        import grpc
        d = tempfile.mkdtemp(prefix="kasd-longpath-")
        self.addCleanup(shutil.rmtree, d, True)
        write_tokens(os.path.join(d, "tokens.yaml"), {1: ("y" * 32, 1)})
        with open(os.path.join(d, "api-secret"), "w") as f:
            f.write(base64.b64encode(os.urandom(32)).decode() + "\n")
        k = self.start(config=service_config(d))
        self.assertTrue(k.started, k.log())
        host, port = k.listeners["api"]
        path = "/gitlab.agent.x." + "a%2F\"\\b" * 1200 + "/Method"
        self.assertGreater(len(path), 8192)
        with grpc.insecure_channel(f"{host}:{port}") as ch:
            with self.assertRaises(grpc.RpcError) as cm:
                ch.unary_unary(path)(b"", timeout=10)
            self.assertEqual(cm.exception.code(), grpc.StatusCode.UNAUTHENTICATED)
        ev = k.wait_event("api_auth_failed", 5)
        self.assertTrue(ev.get("truncated"), ev)
        self.assertTrue(path.startswith(ev["method"]) and len(ev["method"]) > 3000, ev["method"][:100])
        self.assertEqual(k.stop(), 0, k.log())  # stop() also checks that every line parses
        self.check_json_log(k)

    def test_dev_mode_creates_files_once(self):
        state = tempfile.mkdtemp(prefix="kasd-dev-")
        cfg = BASE_CONFIG + "kubernetes_api:\n  listen:\n    address: 127.0.0.1:0\n"
        k = self.start(config=cfg, args=("--dev", "--state-dir", state))
        self.assertTrue(k.started, k.log())
        self.assertIn("kubernetes_api", k.listeners)
        self.assertEqual(k.stop(), 0, k.log())
        out1 = k.stdout.decode()
        files = {}
        for name in ("api-secret", "private-api-secret", "agent-tokens.yaml", "kubernetes-access.yaml"):
            path = os.path.join(state, name)
            self.assertIn(path, out1)
            st = os.stat(path)
            self.assertEqual(stat.S_IMODE(st.st_mode), 0o600, name)
            with open(path) as f:
                files[name] = f.read()
        self.assertIn("agent_id: 1", files["agent-tokens.yaml"])
        self.assertIn("agents: [1]", files["kubernetes-access.yaml"])
        # idempotent: a second start reuses the same secrets and token
        k2 = self.start(config=cfg, args=("--dev", "--state-dir", state))
        self.assertTrue(k2.started, k2.log())
        self.assertEqual(k2.stop(), 0)
        for name, content in files.items():
            with open(os.path.join(state, name)) as f:
                self.assertEqual(f.read(), content)


if __name__ == "__main__":
    result = unittest.main(exit=False, verbosity=2).result
    failed = len(result.failures) + len(result.errors)
    print(f"{result.testsRun - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
