"""What the Debian package and its systemd unit rely on in the kasd binary (debian/, packaging/):
the readiness protocol of Type=notify (READY=1 once kasd serves, STOPPING=1 when it starts to
drain, sent by kasd's main process to $NOTIFY_SOCKET, path or abstract), and `kasd gen-secret`
for a first install's secret files."""
import array
import base64
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import unittest
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))
from kasd_harness import BASE_CONFIG, KASD, Kasd, connect, service_config, write_tokens  # noqa: E402


class NotifySocket:
    """A datagram socket standing in for systemd's notify socket; records (pid, message)."""

    def __init__(self, abstract=False):
        self.dir = tempfile.mkdtemp(prefix="kasd-notify-")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        if abstract:
            name = f"kasd-test-notify-{os.getpid()}-{os.urandom(4).hex()}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.address = os.path.join(self.dir, "notify")
            self.sock.bind(self.address)

    def recv(self, timeout):
        """(sender pid, text), or None after timeout seconds."""
        self.sock.settimeout(timeout)
        try:
            data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
        except socket.timeout:
            return None
        pid = None
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = array.array("i", payload[:12])[0]
        return pid, data.decode()

    def close(self):
        self.sock.close()
        shutil.rmtree(self.dir, True)


def probe(kasd, path):
    host, port = kasd.listeners["observability"]
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


class SdNotify(unittest.TestCase):
    def start(self, notify_socket, config=BASE_CONFIG):
        old = os.environ.get("NOTIFY_SOCKET")
        os.environ["NOTIFY_SOCKET"] = notify_socket
        try:
            k = Kasd(config)
        finally:
            if old is None:
                del os.environ["NOTIFY_SOCKET"]
            else:
                os.environ["NOTIFY_SOCKET"] = old
        self.addCleanup(k.kill)
        return k

    def ready_then_stopping(self, abstract):
        ns = NotifySocket(abstract)
        self.addCleanup(ns.close)
        k = self.start(ns.address)
        self.assertTrue(k.started, k.log())
        got = ns.recv(10)
        self.assertIsNotNone(got, "no READY=1 within 10 s\n" + k.log())
        pid, text = got
        # From the main process (systemd's default NotifyAccess=main), and only once it serves.
        self.assertEqual(pid, k.proc.pid)
        self.assertEqual(text, "READY=1")
        # READY=1 means kasd serves: every listener accepts. (Not that Redis is connected yet:
        # /readiness says that, for load balancers; systemd's start must not hang on Redis.)
        self.assertEqual(probe(k, "/liveness"), 200)
        for name in ("agent", "api", "private_api"):
            connect(k.listeners[name]).close()
        self.assertIsNone(ns.recv(0.3), "more than READY=1 before the stop")
        k.signal(signal.SIGTERM)
        got = ns.recv(10)
        self.assertEqual(got, (k.proc.pid, "STOPPING=1"), k.log())
        self.assertEqual(k.wait(30), 0, k.log())
        self.assertIsNone(ns.recv(0.2), "a datagram after STOPPING=1")
        stopping = k.wait_event("stopping", 1)
        self.assertEqual(stopping["signal"], "SIGTERM")
        self.assertFalse([ev for ev in k.events if ev.get("event") == "sd_notify_failed"], k.log())

    def test_ready_then_stopping_path_socket(self):
        self.ready_then_stopping(abstract=False)

    def test_ready_then_stopping_abstract_socket(self):
        self.ready_then_stopping(abstract=True)

    def test_unreachable_socket_is_logged_and_harmless(self):
        d = tempfile.mkdtemp(prefix="kasd-notify-")
        self.addCleanup(shutil.rmtree, d, True)
        k = self.start(os.path.join(d, "nobody-listens"))
        self.assertTrue(k.started, k.log())
        ev = k.wait_event("sd_notify_failed", 5)
        self.assertIn("READY=1", ev["msg"])
        self.assertEqual(probe(k, "/liveness"), 200)
        self.assertEqual(k.stop(), 0, k.log())

    def test_without_notify_socket_nothing_is_sent(self):
        old = os.environ.pop("NOTIFY_SOCKET", None)  # a test runner under systemd may have one
        try:
            k = Kasd(BASE_CONFIG)
        finally:
            if old is not None:
                os.environ["NOTIFY_SOCKET"] = old
        self.addCleanup(k.kill)
        self.assertTrue(k.started, k.log())
        self.assertEqual(k.stop(), 0, k.log())
        self.assertFalse([ev for ev in k.events if ev.get("event") == "sd_notify_failed"], k.log())


def gen_secret(*args, umask=None):
    return subprocess.run([KASD, "gen-secret", *args], capture_output=True, text=True, timeout=20,
                          preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


class GenSecret(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="kasd-secret-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def check_secret(self, path):
        st = os.stat(path)
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o600)
        with open(path) as f:
            text = f.read()
        self.assertTrue(text.endswith("\n") and text.count("\n") == 1, repr(text))
        self.assertEqual(len(base64.b64decode(text.strip(), validate=True)), 32)
        return text

    def test_writes_32_random_bytes_base64_mode_0600(self):
        a, b = os.path.join(self.dir, "a"), os.path.join(self.dir, "b")
        r = gen_secret(a, umask=0)  # the mode does not depend on the umask
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn(a, r.stdout)
        self.assertEqual(gen_secret(b).returncode, 0)
        self.assertNotEqual(self.check_secret(a), self.check_secret(b))

    def test_refuses_to_overwrite_without_force(self):
        path = os.path.join(self.dir, "api-secret")
        with open(path, "w") as f:
            f.write("keep me\n")
        r = gen_secret(path)
        self.assertEqual(r.returncode, 1)
        self.assertIn("--force", r.stderr)
        with open(path) as f:
            self.assertEqual(f.read(), "keep me\n")

    def test_force_replaces_and_resets_mode(self):
        path = os.path.join(self.dir, "api-secret")
        with open(path, "w") as f:
            f.write("old\n")
        os.chmod(path, 0o644)
        r = gen_secret("--force", path)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.check_secret(path)
        self.assertEqual(sorted(os.listdir(self.dir)), ["api-secret"])  # no temporary left

    def test_usage_errors(self):
        self.assertEqual(gen_secret().returncode, 2)
        self.assertEqual(gen_secret("a", "b").returncode, 2)
        self.assertEqual(gen_secret("--bogus", "a").returncode, 2)
        r = gen_secret(os.path.join(self.dir, "no-such-dir", "s"))
        self.assertEqual(r.returncode, 1)
        self.assertIn("No such file or directory", r.stderr)

    def test_kasd_serves_with_generated_secrets(self):
        write_tokens(os.path.join(self.dir, "tokens.yaml"), {1: ("t" * 32, 1)})
        self.assertEqual(gen_secret(os.path.join(self.dir, "api-secret")).returncode, 0)
        self.assertEqual(gen_secret(os.path.join(self.dir, "private-api-secret")).returncode, 0)
        config = service_config(self.dir).replace(
            "private_api:\n  listen:\n    address: 127.0.0.1:0\n",
            f"private_api:\n  listen:\n    address: 127.0.0.1:0\n"
            f"    authentication_secret_file: {self.dir}/private-api-secret\n")
        self.assertIn("private-api-secret", config)
        path = os.path.join(self.dir, "kasd.yaml")
        with open(path, "w") as f:
            f.write(config)
        r = subprocess.run([KASD, "--check-config", path], capture_output=True, text=True, timeout=20)
        self.assertEqual(r.returncode, 0, r.stderr)
        k = Kasd(config)
        self.addCleanup(k.kill)
        self.assertTrue(k.started, k.log())
        names = {ev.get("event") for ev in k.events}
        self.assertNotIn("no_api_secret", names)
        self.assertNotIn("no_private_api_secret", names)
        self.assertEqual(k.stop(), 0, k.log())


if __name__ == "__main__":
    unittest.main(verbosity=2)
