"""Connection policy of kasd's gRPC listeners, at a compressed time scale: keepalive PINGs and dead
peers, client pings as agentk sends them, max connection age on the api listener, and idle reverse
tunnels ending right after a max-age GOAWAY (or at shutdown) while busy ones finish their call.

agentk (grpc-go) pings every 55 s even with no call open and GitLab kas permits client pings every
>= 20 s; here the client pings every 1 s against keepalive_min_time 400ms. kasd pings after
keepalive_time of silence and closes when the PING is not answered within keepalive_timeout.
Raw HTTP/2 peers (h2raw.py) do what gRPC libraries will not: never answer a PING."""
import base64
import os
import re
import signal
import sys
import tempfile
import threading
import time
import unittest
import urllib.request

import grpc

sys.path.insert(0, os.path.dirname(__file__))
import gitlab_client  # noqa: E402
import h2raw  # noqa: E402
from agentk import AgentK  # noqa: E402
from gitlab_client import GitLabClient  # noqa: E402
from kasd_harness import Kasd  # noqa: E402


def metric(kasd, name, listener):
    """Sum over shards of a per-listener counter from /metrics."""
    host, port = kasd.listeners["observability"]
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
        body = r.read().decode()
    total = 0
    for m in re.finditer(r'^%s\{listener="%s",shard="\d+"\} (\d+)$' % (name, listener), body, re.M):
        total += int(m.group(1))
    return total


def setup_dir(agents=(1,)):
    d = tempfile.mkdtemp(prefix="kasd-keepalive-")
    tokens = {i: base64.urlsafe_b64encode(os.urandom(24)).decode() for i in agents}
    with open(os.path.join(d, "tokens.yaml"), "w") as f:
        f.write("agents:\n")
        for i, t in tokens.items():
            f.write(f"  - token: \"{t}\"\n    agent_id: {i}\n    project_id: {100 + i}\n"
                    f"    agent_name: agent-{i}\n")
    secret = gitlab_client.generate_secret()
    gitlab_client.write_secret(os.path.join(d, "api-secret"), secret)
    return d, tokens, secret


def config(d, agent_listen="", api_listen="", extra=""):
    return f"""\
shards: 2
agent:
  listen:
    address: 127.0.0.1:0
{agent_listen}  token_file: {d}/tokens.yaml
api:
  listen:
    address: 127.0.0.1:0
    authentication_secret_file: {d}/api-secret
{api_listen}private_api:
  listen:
    address: 127.0.0.1:0
observability:
  listen:
    address: 127.0.0.1:0
limits:
  shutdown_grace: 5s
  routing_timeout: 5s
{extra}"""


SHORT_KEEPALIVE = """\
    keepalive_time: 1s
    keepalive_timeout: 1s
    keepalive_min_time: 400ms
"""


class Keepalive(unittest.TestCase):
    """keepalive_time 1s, keepalive_timeout 1s, keepalive_min_time 400ms on agent and api."""

    @classmethod
    def setUpClass(cls):
        cls.dir, cls.tokens, cls.secret = setup_dir()
        cls.kasd = Kasd(config=config(cls.dir, SHORT_KEEPALIVE, SHORT_KEEPALIVE))
        assert cls.kasd.started, cls.kasd.log()

    @classmethod
    def tearDownClass(cls):
        rc = cls.kasd.stop()
        cls.kasd.kill()
        assert rc == 0, f"exit code {rc}\n" + cls.kasd.log()

    def peer(self, listener, answer_pings):
        p = h2raw.Peer(self.kasd.listeners[listener], answer_pings=answer_pings).connect()
        self.addCleanup(p.close)
        return p

    def test_unanswered_ping_closes_the_connection_on_agent_and_api(self):
        for listener in ("agent", "api"):
            with self.subTest(listener=listener):
                before = metric(self.kasd, "kasd_listener_keepalive_timeouts_total", listener)
                p = self.peer(listener, answer_pings=False)
                t0 = time.monotonic()
                # SETTINGS exchanged, then silence: kasd pings after 1 s and closes 1 s later.
                self.assertFalse(p.pump(timeout=15), "connection still open after 15 s")
                elapsed = p.closed_at - t0
                self.assertGreaterEqual(p.count(h2raw.PING, h2raw.ACK, 0), 1, "no keepalive PING seen")
                self.assertGreater(elapsed, 1.5, "closed before keepalive_time + keepalive_timeout")
                self.assertLess(elapsed, 12)
                deadline = time.monotonic() + 10
                while metric(self.kasd, "kasd_listener_keepalive_timeouts_total", listener) <= before:
                    self.assertLess(time.monotonic(), deadline, "metric not incremented")
                    time.sleep(0.1)
        self.assertTrue(any(ev.get("event") == "keepalive_timeout" and "not answered" in ev.get("reason", "")
                            for ev in self.kasd.events), "close logged with its reason")

    def test_answered_pings_keep_an_idle_connection(self):
        for listener in ("agent", "api"):
            with self.subTest(listener=listener):
                p = self.peer(listener, answer_pings=True)
                self.assertIsNone(p.pump(timeout=6), "an idle peer that answers PINGs must be kept")
                self.assertGreaterEqual(p.count(h2raw.PING, h2raw.ACK, 0), 2,
                                        "kasd keeps pinging a silent peer (every keepalive_time)")
                self.assertEqual(p.count(h2raw.GOAWAY), 0)

    def test_client_pings_without_streams_like_agentk_are_permitted(self):
        """agentk's pattern, compressed: a PING every 1 s (>= keepalive_min_time), no stream ever
        open, for several seconds. No strike, no GOAWAY, the connection stays, and kasd's own
        keepalive PING is not needed (the client's pings are traffic) yet does no harm."""
        for listener in ("agent", "api"):
            with self.subTest(listener=listener):
                p = self.peer(listener, answer_pings=True)
                for i in range(7):
                    p.send(h2raw.frame(h2raw.PING, 0, 0, i.to_bytes(8, "big")))
                    self.assertIsNone(p.pump(lambda t, f, sid, pl: t == h2raw.GOAWAY, timeout=1.0),
                                      "GOAWAY or close for pings every 1 s")
                self.assertEqual(p.count(h2raw.PING, h2raw.ACK, h2raw.ACK), 7, "every PING answered")
                self.assertEqual(p.count(h2raw.GOAWAY), 0)

    def test_ping_flood_still_refused(self):
        """The policy still bites: pings 100 ms apart (< keepalive_min_time) get GOAWAY
        ENHANCE_YOUR_CALM after 2 strikes."""
        p = self.peer("api", answer_pings=True)
        for i in range(6):
            p.send(h2raw.frame(h2raw.PING, 0, 0, i.to_bytes(8, "big")))
            time.sleep(0.1)
        found = p.pump(lambda t, f, sid, pl: t == h2raw.GOAWAY and int.from_bytes(pl[4:8], "big") == 0xB,
                       timeout=10)
        self.assertTrue(found, "expected GOAWAY ENHANCE_YOUR_CALM")


class GrpcClientKeepalive(unittest.TestCase):
    def test_grpcio_client_keepalive_without_calls_survives(self):
        """A real gRPC client's keepalive (grpcio: keepalive_time 1 s, permit without calls) and
        kasd's own PING after 1 s of silence: one connection throughout, no keepalive close.
        grpc C-core reads an idle channel's socket only from its backup poller (every 5 s), so its
        ACKs can take 5 s: keepalive_timeout here is 8 s (production: 20 s)."""
        d, _, secret = setup_dir()
        k = Kasd(config=config(d, api_listen="    keepalive_time: 1s\n    keepalive_timeout: 8s\n"
                                             "    keepalive_min_time: 400ms\n"))
        self.addCleanup(k.kill)
        self.assertTrue(k.started, k.log())
        self.kasd = k
        before = metric(self.kasd, "kasd_listener_connections_opened_total", "api")
        gl = GitLabClient("%s:%d" % self.kasd.listeners["api"], secret, options=[
            ("grpc.keepalive_time_ms", 1000), ("grpc.keepalive_timeout_ms", 5000),
            ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
            ("grpc.http2.min_time_between_pings_ms", 1000)])
        self.addCleanup(gl.close)
        with self.assertRaises(grpc.RpcError) as cm:  # connects; no agent 1 tunnel: deadline
            gl.unary("/test.Echo/Unary", b"x", agent_id=1, timeout=1)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.DEADLINE_EXCEEDED)
        time.sleep(12)
        with self.assertRaises(grpc.RpcError) as cm:
            gl.unary("/test.Echo/Unary", b"x", agent_id=1, timeout=1)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.DEADLINE_EXCEEDED)
        self.assertEqual(metric(self.kasd, "kasd_listener_connections_opened_total", "api") - before, 1,
                         "the client never had to reconnect:\n" + self.kasd.log())
        self.assertEqual(metric(self.kasd, "kasd_listener_keepalive_timeouts_total", "api"), 0)
        self.assertEqual(k.stop(), 0, k.log())


class ApiMaxAge(unittest.TestCase):
    def test_api_listener_goaway_at_max_age_then_close_after_grace(self):
        d, _, secret = setup_dir()
        k = Kasd(config=config(d, api_listen="    max_connection_age: 2s\n    max_connection_age_grace: 1500ms\n"))
        try:
            self.assertTrue(k.started, k.log())
            p = h2raw.Peer(k.listeners["api"], answer_pings=True).connect()
            t0 = time.monotonic()
            # a routed call for an agent that has no tunnel waits (routing_timeout 5 s): a call in
            # flight, so the connection lives on through the grace period
            jwt = gitlab_client.make_jwt(secret)
            p.send(h2raw.header_frames(1, h2raw.grpc_request_headers("/test.Echo/Unary", extra=[
                ("authorization", "Bearer " + jwt), ("kas-hop-routing-agent-id", "1")])) +
                h2raw.frame(h2raw.DATA, h2raw.END_STREAM, 1, h2raw.grpc_message(b"x")))
            found = p.pump(lambda t, f, sid, pl: t == h2raw.GOAWAY and int.from_bytes(pl[4:8], "big") == 0,
                           timeout=10)
            t_goaway = time.monotonic()
            self.assertTrue(found, "expected GOAWAY NO_ERROR at max connection age")
            self.assertGreater(t_goaway - t0, 1.5, "not before max_connection_age - 10 %")
            self.assertFalse(p.pump(timeout=10), "closed after the grace period")
            self.assertGreater(p.closed_at - t_goaway, 1.0, "the grace period is given")
            p.close()
        finally:
            self.assertEqual(k.stop(), 0, k.log())
            k.kill()


def slow_call(gl, delay, out):
    try:
        data, _ = gl.unary("/test.Echo/Slow", str(delay).encode(), agent_id=1, timeout=30)
        out["data"] = data
    except grpc.RpcError as e:
        out["error"] = e
    out["done"] = time.monotonic()


class IdleTunnelsAtGoaway(unittest.TestCase):
    """A max-age GOAWAY (or SIGTERM) ends every idle tunnel of the connection with OK at once, so
    the agent opens replacements on its new connection; a tunnel carrying a call finishes it."""

    def start(self, agent_listen="", extra=""):
        d, tokens, secret = setup_dir()
        self.kasd = Kasd(config=config(d, agent_listen=agent_listen, extra=extra))
        self.assertTrue(self.kasd.started, self.kasd.log())
        self.addCleanup(self.kasd.kill)
        self.agent = AgentK("%s:%d" % self.kasd.listeners["agent"], tokens[1], idle=3).start()
        self.addCleanup(self.agent.stop, 1)
        self.agent.wait_for(lambda s: s["tunnels_idle"] >= 3 and s["registers"] >= 1, timeout=15)
        self.gl = GitLabClient("%s:%d" % self.kasd.listeners["api"], secret)
        self.addCleanup(self.gl.close)

    def ends_after(self, t):
        with self.agent._lock:
            return [e for e in self.agent.tunnel_ends if e["time"] >= t]

    def test_idle_tunnels_end_ok_right_after_max_age_goaway_busy_one_finishes(self):
        # max age 6s (GOAWAY between 5.4 and 6.6 s), grace 6s
        self.start(agent_listen="    max_connection_age: 6s\n    max_connection_age_grace: 6s\n")
        t_conn = time.monotonic()
        out = {}
        th = threading.Thread(target=slow_call, args=(self.gl, 7.0, out), daemon=True)
        th.start()  # bound now, answers 7 s later: across the GOAWAY, within the grace
        self.agent.wait_for(lambda s: s["calls_started"] >= 1, timeout=10)
        # the idle tunnels of the first connection end, all together, with OK
        deadline = time.monotonic() + 15
        while True:
            ends = [e for e in self.ends_after(t_conn) if not e["used"] and e["started"] < t_conn + 4]
            if len(ends) >= 2:
                break
            self.assertLess(time.monotonic(), deadline, f"idle tunnels did not end: {self.agent.tunnel_ends}")
            time.sleep(0.05)
        first = ends[0]["time"]
        self.assertTrue(all(e["code"] == "OK" for e in ends), ends)
        self.assertLess(first - t_conn, 9, "ended at the GOAWAY, not at the end of the grace period")
        self.assertLess(max(e["time"] for e in ends) - first, 1.0, "all at once")
        self.assertNotIn("done", out, "the call in flight was not cut")
        # replacements are open (on the new connection) while the busy tunnel still finishes
        self.agent.wait_for(lambda s: s["tunnels_idle"] >= 3, timeout=5)
        th.join(20)
        self.assertNotIn("error", out, out.get("error"))
        self.assertEqual(out.get("data"), b"7.0")
        self.assertLess(out["done"] - first, 6, "the busy tunnel finished within the grace period")
        deadline = time.monotonic() + 10  # the tunnel stream ends just after the call's answer
        while not [e for e in self.ends_after(t_conn) if e["used"]]:
            self.assertLess(time.monotonic(), deadline, f"busy tunnel never ended: {self.agent.tunnel_ends}")
            time.sleep(0.05)
        used = [e for e in self.ends_after(t_conn) if e["used"]]
        self.assertEqual(used[0]["code"], "OK", used)
        # and the agent is reachable through the new connection's tunnels
        data, _ = self.gl.unary("/test.Echo/Unary", b"again", agent_id=1, timeout=10)
        self.assertEqual(data, b"again")

    def test_shutdown_ends_idle_tunnels_at_once_busy_call_gets_the_grace(self):
        self.start()
        out = {}
        th = threading.Thread(target=slow_call, args=(self.gl, 2.0, out), daemon=True)
        th.start()
        self.agent.wait_for(lambda s: s["calls_started"] >= 1, timeout=10)
        t_term = time.monotonic()
        self.kasd.signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        def idle_ends():
            return [e for e in self.ends_after(t_term) if not e["used"] and e["started"] < t_term]
        while len(idle_ends()) < 3:
            self.assertLess(time.monotonic(), deadline, f"idle tunnels did not end: {self.agent.tunnel_ends}")
            time.sleep(0.05)
        ends = idle_ends()
        self.assertTrue(all(e["code"] == "OK" for e in ends), ends)
        self.assertLess(max(e["time"] for e in ends) - t_term, 1.5, "at once, not after the grace")
        th.join(15)
        self.assertNotIn("error", out, out.get("error"))
        self.assertEqual(out.get("data"), b"2.0")
        self.assertEqual(self.kasd.wait(20), 0, self.kasd.log())


if __name__ == "__main__":
    result = unittest.main(exit=False, verbosity=2).result
    failed = len(result.failures) + len(result.errors)
    print(f"{result.testsRun - failed - len(result.skipped)} passed, {failed} failed, "
          f"{len(result.skipped)} skipped")
    sys.exit(1 if failed else 0)
