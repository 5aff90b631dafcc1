#!/usr/bin/env python3
"""kasd's Redis connection (shards/redis.c) against REAL redis-server processes on free loopback
ports, driven by test/support/redis_testclient on a real shard: pipelining, 1 MiB values, scripts
with the NOSCRIPT fallback, MULTI/EXEC, error texts (refused, wrong password, read timeout, TLS
name mismatch), Redis restarted mid-run (reconnect, in-flight commands fail clearly, pub-sub
re-subscribed), TLS, and Sentinel following a failover.

Every process is bounded by timeouts, binds 127.0.0.1 only, and is killed at the end."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

CLIENT = os.environ.get("REDIS_TESTCLIENT", "build-test/test/redis_testclient")
CERTS = os.path.abspath(os.environ.get("KD_TEST_CERTS", os.path.join(os.path.dirname(__file__), "..", "certs")))
REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resp(port, *args, timeout=3):
    """One command over a fresh socket; returns the raw reply bytes (enough for these checks)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        out = b"*%d\r\n" % len(args)
        for a in args:
            a = str(a).encode()
            out += b"$%d\r\n%s\r\n" % (len(a), a)
        s.sendall(out)
        data = b""
        deadline = time.time() + timeout
        while not data.endswith(b"\r\n") and time.time() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            time.sleep(0.01)
        return data


class Redis:
    """redis-server (or a sentinel) on 127.0.0.1:port; no persistence."""

    def __init__(self, port=None, extra=(), sentinel_conf=None):
        self.port = port or free_port()
        self.extra = list(extra)
        self.dir = tempfile.mkdtemp(prefix="kasd-redis-test-")
        self.sentinel_conf = sentinel_conf
        self.proc = None
        self.start()

    def start(self):
        if self.sentinel_conf is not None:
            conf = os.path.join(self.dir, "sentinel.conf")
            with open(conf, "w") as f:
                f.write(self.sentinel_conf)
            args = [REDIS, conf, "--sentinel", "--port", str(self.port), "--bind", "127.0.0.1"]
        else:
            args = [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                    "--dir", self.dir] + self.extra
        self.log = open(os.path.join(self.dir, "redis.log"), "ab")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        if "--port" in self.extra and self.extra[self.extra.index("--port") + 1] == "0":
            time.sleep(0.5)
            return
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                if b"PONG" in resp(self.port, "PING", timeout=0.5) or b"NOAUTH" in resp(self.port, "PING", timeout=0.5):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("redis-server on port %d did not start" % self.port)

    def stop(self, sig=signal.SIGKILL):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(sig)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()
            self.log = None

    def close(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Client:
    """redis_testclient MODE ...; lines are parsed as they come."""

    def __init__(self, mode, *args, limit=40):
        self.proc = subprocess.Popen([CLIENT, mode, "--limit", str(limit)] + list(args), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines = []
        self.limit = limit

    def wait_for(self, pred, timeout=20):
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            ev = json.loads(line)
            self.lines.append(ev)
            if pred(ev):
                return ev
        raise AssertionError("not seen in time; so far: %s\nstderr: %s" % (self.lines, self.stderr()))

    def finish(self, timeout=None):
        try:
            out, err = self.proc.communicate(timeout=timeout or self.limit + 10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        for line in out.splitlines():
            self.lines.append(json.loads(line))
        self.err = err
        return self.proc.returncode

    def stderr(self):
        try:
            self.proc.kill()
            return self.proc.communicate(timeout=5)[1][-3000:]
        except Exception:
            return ""

    def checks(self):
        return {e["check"]: e for e in self.lines if "check" in e}


class RedisTest(unittest.TestCase):
    def setUp(self):
        self.cleanup = []

    def tearDown(self):
        for c in reversed(self.cleanup):
            c()

    def redis(self, *a, **kw):
        r = Redis(*a, **kw)
        self.cleanup.append(r.close)
        return r

    def run_client(self, mode, *args, limit=40):
        c = Client(mode, *args, limit=limit)
        self.cleanup.append(lambda: c.proc.poll() is None and c.proc.kill())
        return c

    def assert_passed(self, c, rc, names=()):
        checks = c.checks()
        self.assertEqual(rc, 0, "client failed: %s\n%s" % (c.lines, c.err[-3000:]))
        for n in names:
            self.assertIn(n, checks)
            self.assertTrue(checks[n]["ok"], checks[n])

    def test_commands(self):
        r = self.redis()
        c = self.run_client("basic", "--addr", "127.0.0.1:%d" % r.port)
        rc = c.finish()
        self.assert_passed(c, rc, ["pipeline_10k_in_order", "value_1MiB_roundtrip",
                                   "evalsha_after_script_flush_falls_back", "evalsha_loaded", "multi_exec",
                                   "error_reply_is_a_reply"])
        self.assertIn('"event":"redis_up"', c.err)

    def test_database_and_acl_user(self):
        r = self.redis(extra=["--user", "kas", "on", ">pw", "~*", "&*", "+@all"])
        c = self.run_client("basic", "--addr", "127.0.0.1:%d" % r.port, "--username", "kas", "--password", "pw",
                            "--db", "3")
        rc = c.finish()
        self.assert_passed(c, rc, ["multi_exec"])
        # the keys landed in database 3
        with socket.create_connection(("127.0.0.1", r.port), timeout=3) as s:
            s.sendall(b"*3\r\n$4\r\nAUTH\r\n$3\r\nkas\r\n$2\r\npw\r\n*2\r\n$6\r\nSELECT\r\n$1\r\n3\r\n"
                      b"*2\r\n$6\r\nEXISTS\r\n$3\r\nctr\r\n")
            time.sleep(0.3)
            self.assertTrue(s.recv(1000).endswith(b":1\r\n"))

    def test_connection_refused(self):
        port = free_port()
        c = self.run_client("error", "--addr", "127.0.0.1:%d" % port, "--expect", "connection refused")
        rc = c.finish()
        self.assert_passed(c, rc, ["error_text"])
        self.assertIn("redis 127.0.0.1:%d: not connected (connection refused)" % port,
                      c.checks()["error_text"]["detail"])

    def test_wrong_password(self):
        r = self.redis(extra=["--requirepass", "right"])
        c = self.run_client("error", "--addr", "127.0.0.1:%d" % r.port, "--password", "wrong",
                            "--expect", "authentication failed")
        rc = c.finish()
        self.assert_passed(c, rc, ["error_text"])
        self.assertIn("WRONGPASS", c.checks()["error_text"]["detail"])

    def test_missing_password(self):
        r = self.redis(extra=["--requirepass", "right"])
        c = self.run_client("error", "--addr", "127.0.0.1:%d" % r.port, "--expect", "authentication failed")
        self.assert_passed(c, c.finish(), ["error_text"])

    def test_read_timeout_when_redis_is_paused(self):
        r = self.redis()
        c = self.run_client("timeout", "--addr", "127.0.0.1:%d" % r.port, "--read-timeout", "300")
        c.wait_for(lambda e: e.get("event") == "up")
        r.proc.send_signal(signal.SIGSTOP)
        try:
            rc = c.finish()
        finally:
            r.proc.send_signal(signal.SIGCONT)
        self.assert_passed(c, rc, ["read_timeout_error_text"])

    def test_restart_reconnects_and_resubscribes(self):
        r = self.redis()
        c = self.run_client("restart", "--addr", "127.0.0.1:%d" % r.port, "--read-timeout", "2000")
        seen = set()
        c.wait_for(lambda e: seen.add(e.get("event")) or {"up", "sub_up"} <= seen)
        time.sleep(0.3)  # traffic flowing
        r.stop(signal.SIGKILL)
        down = c.wait_for(lambda e: e.get("event") in ("down", "command_failed"))
        time.sleep(0.3)
        r.start()
        rc = c.finish()
        self.assert_passed(c, rc, ["pubsub_message_after_restart"])
        events = [e for e in c.lines if "event" in e]
        self.assertTrue(any(e["event"] == "up" and e["n"] == 2 for e in events), events)
        downs = [e["detail"] for e in events if e["event"] in ("down", "command_failed")]
        self.assertTrue(downs, events)
        for d in downs:
            self.assertIn("redis 127.0.0.1:%d: " % r.port, d)
            self.assertNotIn("i/o timeout", d)
        self.assertIsNotNone(down)
        # one redis_down and one redis_up per transition, not per retry
        self.assertEqual(c.err.count('"event":"redis_down","connection":"test"'), 1, c.err)
        self.assertEqual(c.err.count('"event":"redis_up","connection":"test"'), 2, c.err)

    def tls_redis(self):
        return self.redis(extra=["--port", "0", "--tls-port", str(free_port()),
                                 "--tls-cert-file", os.path.join(CERTS, "server.pem"),
                                 "--tls-key-file", os.path.join(CERTS, "server.key"),
                                 "--tls-ca-cert-file", os.path.join(CERTS, "ca.pem"),
                                 "--tls-auth-clients", "no"])

    def test_tls(self):
        r = self.tls_redis()
        tls_port = r.extra[r.extra.index("--tls-port") + 1]
        c = self.run_client("basic", "--addr", "127.0.0.1:%s" % tls_port, "--tls-ca", os.path.join(CERTS, "ca.pem"),
                            "--server-name", "localhost")
        self.assert_passed(c, c.finish(), ["pipeline_10k_in_order", "value_1MiB_roundtrip", "multi_exec"])

    def test_tls_name_mismatch(self):
        r = self.tls_redis()
        tls_port = r.extra[r.extra.index("--tls-port") + 1]
        c = self.run_client("error", "--addr", "127.0.0.1:%s" % tls_port, "--tls-ca", os.path.join(CERTS, "ca.pem"),
                            "--server-name", "redis.example.com", "--expect", "TLS certificate verify failed")
        self.assert_passed(c, c.finish(), ["error_text"])

    def test_tls_unknown_ca(self):
        r = self.tls_redis()
        tls_port = r.extra[r.extra.index("--tls-port") + 1]
        c = self.run_client("error", "--addr", "127.0.0.1:%s" % tls_port, "--tls-ca",
                            os.path.join(CERTS, "other-ca.pem"), "--expect", "TLS certificate verify failed")
        self.assert_passed(c, c.finish(), ["error_text"])

    def test_sentinel_failover(self):
        master = self.redis()
        replica = self.redis(extra=["--replicaof", "127.0.0.1", str(master.port)])
        deadline = time.time() + 15
        while b"master_link_status:up" not in resp(replica.port, "INFO", "replication") and time.time() < deadline:
            time.sleep(0.1)
        sport = free_port()
        conf = ("sentinel monitor m1 127.0.0.1 %d 1\n"
                "sentinel down-after-milliseconds m1 1000\n"
                "sentinel failover-timeout m1 5000\n"
                "sentinel parallel-syncs m1 1\n" % master.port)
        sentinel = self.redis(port=sport, sentinel_conf=conf)
        deadline = time.time() + 15
        while b"127.0.0.1" not in resp(sport, "SENTINEL", "get-master-addr-by-name", "m1") and time.time() < deadline:
            time.sleep(0.1)
        dead = free_port()  # an unreachable sentinel first: the client must move on to the next
        c = self.run_client("sentinel", "--sentinel-master", "m1", "--sentinel", "127.0.0.1:%d" % dead,
                            "--sentinel", "127.0.0.1:%d" % sport, "--read-timeout", "2000", limit=60)
        up = c.wait_for(lambda e: e.get("event") == "up")
        self.assertEqual(up["address"], "127.0.0.1:%d" % master.port)
        # wait for the sentinel to know the replica, then fail over
        deadline = time.time() + 20
        while time.time() < deadline:
            out = resp(sport, "SENTINEL", "FAILOVER", "m1")
            if out.startswith(b"+OK"):
                break
            time.sleep(0.3)
        else:
            self.fail("SENTINEL FAILOVER refused: %r" % out)
        rc = c.finish()
        self.assert_passed(c, rc, ["followed_failover"])
        ups = [e for e in c.lines if e.get("event") == "up"]
        self.assertEqual(ups[-1]["address"], "127.0.0.1:%d" % replica.port)

    def test_no_sentinel_answers(self):
        c = self.run_client("error", "--sentinel-master", "m1", "--sentinel", "127.0.0.1:%d" % free_port(),
                            "--expect", "no sentinel answered")
        self.assert_passed(c, c.finish(), ["error_text"])
        self.assertIn("connection refused", c.checks()["error_text"]["detail"])


if __name__ == "__main__":
    unittest.main(verbosity=2)
