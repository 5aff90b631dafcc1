"""The observability listener (control thread, h2o): /metrics in Prometheus text format, /liveness,
/readiness. Scrapes with the standard library (urllib) and with curl (HTTP/1.1 and HTTP/2 cleartext),
parses every exposition completely, and checks that the numbers move as connections are made and
calls are routed (agentk.py + gitlab_client.py, as routing_test.py). kasd runs with 2 shards."""
import base64
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.request

import grpc

sys.path.insert(0, os.path.dirname(__file__))
import gitlab_client  # noqa: E402
from agentk import AgentK  # noqa: E402
from gitlab_client import GitLabClient  # noqa: E402
from kasd_harness import Kasd, service_config, write_tokens  # noqa: E402

CURL = shutil.which("curl")


def http_get(base, path, timeout=10, method="GET"):
    """(status, body text) without raising on 4xx/5xx."""
    req = urllib.request.Request(base + path, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


# --- a strict parser of the Prometheus text exposition format (0.0.4) ---

METRIC_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL_NAME = r"[a-zA-Z_][a-zA-Z0-9_]*"
SAMPLE_RE = re.compile(r"^(" + METRIC_NAME + r")(\{(.*)\})? (\S+)( -?\d+)?$")
LABEL_RE = re.compile(r"(" + LABEL_NAME + r')="((?:[^"\\\n]|\\["\\n])*)"(,|$)')
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


class ExpositionError(AssertionError):
    pass


def parse_labels(text, lineno):
    labels, pos = {}, 0
    while pos < len(text):
        m = LABEL_RE.match(text, pos)
        if m is None:
            raise ExpositionError(f"line {lineno}: bad labels {{{text}}}")
        if m.group(1) in labels:
            raise ExpositionError(f"line {lineno}: label {m.group(1)} repeated")
        labels[m.group(1)] = m.group(2)
        pos = m.end()
    return labels


def parse_value(s, lineno):
    if s in ("+Inf", "-Inf", "NaN"):
        return float(s.replace("Inf", "inf").replace("NaN", "nan"))
    try:
        return float(s)
    except ValueError:
        raise ExpositionError(f"line {lineno}: bad value {s!r}") from None


def family_of(name, types):
    """The declared family a sample name belongs to (histogram/summary suffixes included)."""
    if name in types:
        return name
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix):
            base = name[: -len(suffix)]
            if types.get(base) in ("histogram", "summary") and (suffix != "_bucket" or types[base] == "histogram"):
                return base
    return None


def parse_exposition(text):
    """Returns (types {family: type}, samples {(name, frozenset(labels)): value}). Raises
    ExpositionError on anything Prometheus would reject, and on what our conventions forbid:
    a sample without a TYPE before it, a family split in two runs, duplicate series, counters not
    ending in _total, histograms that are not cumulative or lack +Inf == _count."""
    if text and not text.endswith("\n"):
        raise ExpositionError("the exposition must end with a newline")
    types, helps, samples = {}, {}, {}
    seen_samples, finished = set(), set()
    current = None
    for lineno, line in enumerate(text.split("\n")[:-1], 1):
        if line == "":
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                if not re.fullmatch(METRIC_NAME, name):
                    raise ExpositionError(f"line {lineno}: bad metric name {name!r}")
                if parts[1] == "HELP":
                    if name in helps:
                        raise ExpositionError(f"line {lineno}: second HELP for {name}")
                    helps[name] = parts[3] if len(parts) > 3 else ""
                else:
                    if name in types:
                        raise ExpositionError(f"line {lineno}: second TYPE for {name}")
                    if name in seen_samples:
                        raise ExpositionError(f"line {lineno}: TYPE for {name} after its samples")
                    if len(parts) < 4 or parts[3] not in TYPES:
                        raise ExpositionError(f"line {lineno}: bad type in {line!r}")
                    types[name] = parts[3]
                if current is not None and current != name:
                    finished.add(current)
                current = name
            continue
        m = SAMPLE_RE.match(line)
        if m is None:
            raise ExpositionError(f"line {lineno}: not a sample: {line!r}")
        name, labels = m.group(1), parse_labels(m.group(3) or "", lineno)
        fam = family_of(name, types)
        if fam is None:
            raise ExpositionError(f"line {lineno}: sample {name} has no TYPE before it")
        if fam in finished:
            raise ExpositionError(f"line {lineno}: family {fam} is split into two runs")
        if current is not None and current != fam:
            finished.add(current)
        current = fam
        seen_samples.add(fam)
        key = (name, frozenset(labels.items()))
        if key in samples:
            raise ExpositionError(f"line {lineno}: duplicate series {line!r}")
        samples[key] = parse_value(m.group(4), lineno)
    for fam, t in types.items():
        if t == "counter" and not fam.endswith("_total"):
            raise ExpositionError(f"counter {fam} does not end in _total")
        if fam not in helps:
            raise ExpositionError(f"{fam} has no HELP")
        if t == "histogram":
            check_histogram(fam, samples)
    return types, samples


def check_histogram(fam, samples):
    groups = {}
    for (name, labels), v in samples.items():
        if name == fam + "_bucket":
            d = dict(labels)
            le = d.pop("le", None)
            if le is None:
                raise ExpositionError(f"{fam}_bucket without le")
            groups.setdefault(frozenset(d.items()), []).append((parse_value(le, 0), v))
    if not groups:
        raise ExpositionError(f"histogram {fam} has no buckets")
    for rest, buckets in groups.items():
        buckets.sort()
        if not math.isinf(buckets[-1][0]):
            raise ExpositionError(f"{fam}{dict(rest)}: no +Inf bucket")
        counts = [c for _, c in buckets]
        if counts != sorted(counts):
            raise ExpositionError(f"{fam}{dict(rest)}: buckets are not cumulative")
        count = samples.get((fam + "_count", rest))
        if count is None or (fam + "_sum", rest) not in samples:
            raise ExpositionError(f"{fam}{dict(rest)}: _sum or _count missing")
        if count != counts[-1]:
            raise ExpositionError(f"{fam}{dict(rest)}: _count {count} != +Inf bucket {counts[-1]}")


def total(samples, name, **match):
    """Sum of every series of `name` whose labels include `match`."""
    s = 0.0
    for (n, labels), v in samples.items():
        if n == name and all(dict(labels).get(k) == str(val) for k, val in match.items()):
            s += v
    return s


class ParserSelfTest(unittest.TestCase):
    """The parser must reject what Prometheus rejects, or the other tests prove nothing."""

    GOOD = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\"} 3\na_total{x=\"2\"} 4\n"

    def test_good(self):
        types, samples = parse_exposition(self.GOOD)
        self.assertEqual(types, {"a_total": "counter"})
        self.assertEqual(total(samples, "a_total"), 7)

    def test_bad(self):
        bad = {
            "no type": "a_total 1\n",
            "duplicate": self.GOOD + "",
            "counter name": "# HELP a A.\n# TYPE a counter\na 1\n",
            "bad value": "# HELP a A.\n# TYPE a gauge\na x\n",
            "bad labels": "# HELP a A.\n# TYPE a gauge\na{x=1} 1\n",
            "no newline": "# HELP a A.\n# TYPE a gauge\na 1",
            "split": "# HELP a A.\n# TYPE a gauge\n# HELP b B.\n# TYPE b gauge\nb 1\na 1\n",
            "not cumulative": "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\n"
                              "h_sum 1\nh_count 1\n",
        }
        bad["duplicate"] = self.GOOD + "a_total{x=\"1\"} 5\n"
        for what, text in bad.items():
            with self.assertRaises(ExpositionError, msg=what):
                parse_exposition(text)


class Observability(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="kasd-obs-")
        cls.tokens = {i: base64.urlsafe_b64encode(os.urandom(24)).decode() for i in (1, 2)}
        write_tokens(os.path.join(cls.dir, "tokens.yaml"), {i: (t, 100 + i) for i, t in cls.tokens.items()})
        cls.secret = gitlab_client.generate_secret()
        gitlab_client.write_secret(os.path.join(cls.dir, "api-secret"), cls.secret)
        cls.kasd = Kasd(config=service_config(cls.dir, "limits:\n  routing_timeout: 1s\n  shutdown_grace: 3s\n"))
        assert cls.kasd.started, cls.kasd.log()
        assert "observability" in cls.kasd.listeners, cls.kasd.log()
        cls.base = "http://%s:%d" % cls.kasd.listeners["observability"]
        cls.agent_addr = "%s:%d" % cls.kasd.listeners["agent"]
        cls.api_addr = "%s:%d" % cls.kasd.listeners["api"]
        cls.agent = AgentK(cls.agent_addr, cls.tokens[1], pods=1, idle=2).start()
        cls.agent.wait_for(lambda s: s["tunnels_idle"] >= 2, timeout=15)
        cls.gl = GitLabClient(cls.api_addr, cls.secret)

    @classmethod
    def tearDownClass(cls):
        cls.gl.close()
        cls.agent.stop(2)
        rc = cls.kasd.stop()
        cls.kasd.kill()
        assert rc == 0, f"exit code {rc}\n" + cls.kasd.log()

    def scrape(self):
        status, body, headers = http_get(self.base, "/metrics")
        self.assertEqual(status, 200, body)
        self.assertTrue(headers.get("content-type", headers.get("Content-Type", "")).startswith("text/plain"))
        return parse_exposition(body)

    def wait_metric(self, pred, timeout=10):
        """Scrape until pred(samples) holds; returns the last samples."""
        deadline = time.monotonic() + timeout
        while True:
            _, samples = self.scrape()
            if pred(samples) or time.monotonic() > deadline:
                return samples
            time.sleep(0.1)

    # --- the exposition ---

    def test_exposition_is_valid_and_complete(self):
        types, samples = self.scrape()
        expected = {
            "kasd_connections_accepted_total": "counter", "kasd_connections_refused_total": "counter",
            "kasd_connections_closed_total": "counter", "kasd_connection_handoffs_out_total": "counter",
            "kasd_connection_handoffs_in_total": "counter", "kasd_received_bytes_total": "counter",
            "kasd_sent_bytes_total": "counter", "kasd_router_messages_sent_total": "counter",
            "kasd_router_doorbells_sent_total": "counter", "kasd_router_doorbells_saved_total": "counter",
            "kasd_agents": "gauge", "kasd_tunnels": "gauge", "kasd_waiting_calls": "gauge",
            "kasd_routed_calls_total": "counter", "kasd_routed_calls_no_tunnel_total": "counter",
            "kasd_agent_auth_failures_total": "counter", "kasd_agent_protocol_violations_total": "counter",
            "process_resident_memory_bytes": "gauge", "process_open_fds": "gauge",
            "k8s_api_proxy_routing_duration_seconds": "histogram", "kasd_shard_responsive": "gauge",
            "kasd_listener_connections_opened_total": "counter", "kasd_listener_connections_closed_total": "counter",
            "kasd_listener_streams_total": "counter", "kasd_listener_tls_handshakes_total": "counter",
            "kasd_listener_tls_handshake_failures_total": "counter", "kasd_routed_calls_by_code_total": "counter",
            "kasd_api_auth_failures_total": "counter", "kasd_redis_up": "gauge",
            "kasd_redis_commands_total": "counter", "kasd_tracker_connections": "gauge",
            "kasd_tracker_redis_commands_total": "counter", "kasd_get_connected_agents_total": "counter",
        }
        for name, t in expected.items():
            self.assertEqual(types.get(name), t, name)
        for shard in ("0", "1"):
            self.assertIn(("kasd_connections_accepted_total", frozenset({("shard", shard)})), samples)
            self.assertEqual(samples[("kasd_shard_responsive", frozenset({("shard", shard)}))], 1)
        self.assertIn(("kasd_router_messages_sent_total", frozenset({("shard", "control")})), samples)
        self.assertGreater(total(samples, "process_resident_memory_bytes"), 1 << 20)
        self.assertGreater(total(samples, "process_open_fds"), 3)
        # buckets start in microseconds
        les = sorted(float(dict(l)["le"]) for n, l in samples if n.endswith("_seconds_bucket"))
        self.assertLessEqual(les[0], 0.0001)
        self.assertGreaterEqual(les[-1], 20)

    def test_gauges_see_the_agent(self):
        _, samples = self.scrape()
        self.assertGreaterEqual(total(samples, "kasd_agents"), 1)
        self.assertGreaterEqual(total(samples, "kasd_tunnels", state="idle"), 2)

    def test_accepted_and_closed_grow_with_connections(self):
        _, before = self.scrape()
        acc0 = total(before, "kasd_connections_accepted_total")
        closed0 = total(before, "kasd_connections_closed_total")
        host, port = self.kasd.listeners["agent"]
        socks = [socket.create_connection((host, port), timeout=5) for _ in range(5)]
        # gRPC channels too: a real HTTP/2 client on the agent listener
        channels = [grpc.insecure_channel(self.agent_addr, options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(3)]
        for ch in channels:
            self.assertEqual(ch.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=5), b"\x08\x01")
        after = self.wait_metric(lambda s: total(s, "kasd_connections_accepted_total") >= acc0 + 8)
        self.assertGreaterEqual(total(after, "kasd_connections_accepted_total"), acc0 + 8)
        self.assertGreater(total(after, "kasd_received_bytes_total"), total(before, "kasd_received_bytes_total"))
        for s in socks:
            s.close()
        for ch in channels:
            ch.close()
        after = self.wait_metric(lambda s: total(s, "kasd_connections_closed_total") >= closed0 + 8)
        self.assertGreaterEqual(total(after, "kasd_connections_closed_total"), closed0 + 8)
        # the same, by listener: 8 opened and closed on the agent listener, 3 health calls
        self.assertGreaterEqual(total(after, "kasd_listener_connections_opened_total", listener="agent") -
                                total(before, "kasd_listener_connections_opened_total", listener="agent"), 8)
        self.assertGreaterEqual(total(after, "kasd_listener_connections_closed_total", listener="agent") -
                                total(before, "kasd_listener_connections_closed_total", listener="agent"), 8)
        self.assertGreaterEqual(total(after, "kasd_listener_streams_total", listener="agent") -
                                total(before, "kasd_listener_streams_total", listener="agent"), 3)
        self.assertEqual(total(after, "kasd_listener_connections_opened_total", listener="private_api"),
                         total(before, "kasd_listener_connections_opened_total", listener="private_api"))

    def test_routed_call_moves_counters_and_histogram(self):
        _, before = self.scrape()
        for _ in range(3):
            data, _ = self.gl.unary("/test.Echo/Unary", b"hi", agent_id=1, timeout=10)
            self.assertEqual(data, b"hi")
        after = self.wait_metric(lambda s: total(s, "kasd_routed_calls_total", outcome="ok") >=
                                 total(before, "kasd_routed_calls_total", outcome="ok") + 3)
        self.assertGreaterEqual(total(after, "kasd_routed_calls_total", outcome="ok"),
                                total(before, "kasd_routed_calls_total", outcome="ok") + 3)
        name = "k8s_api_proxy_routing_duration_seconds"
        self.assertGreaterEqual(total(after, name + "_count", status="success"),
                                total(before, name + "_count", status="success") + 3)
        self.assertGreater(total(after, name + "_sum", status="success"),
                           total(before, name + "_sum", status="success"))
        self.assertGreater(total(after, "kasd_router_messages_sent_total"),
                           total(before, "kasd_router_messages_sent_total"))
        self.assertGreaterEqual(total(after, "kasd_routed_calls_by_code_total", code="OK") -
                                total(before, "kasd_routed_calls_by_code_total", code="OK"), 3)
        self.assertGreaterEqual(total(after, "kasd_listener_streams_total", listener="api") -
                                total(before, "kasd_listener_streams_total", listener="api"), 3)

    def test_api_auth_failures_and_failed_codes(self):
        _, before = self.scrape()
        with self.assertRaises(grpc.RpcError) as cm:
            self.gl.unary("/test.Echo/Unary", b"", agent_id=1, auth="Bearer not-a-jwt", timeout=10)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.UNAUTHENTICATED)
        with self.assertRaises(grpc.RpcError) as cm:
            self.gl.unary("/test.Echo/Fail", b"", agent_id=1, timeout=10)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.FAILED_PRECONDITION)
        after = self.wait_metric(lambda s: total(s, "kasd_routed_calls_by_code_total", code="FAILED_PRECONDITION") >
                                 total(before, "kasd_routed_calls_by_code_total", code="FAILED_PRECONDITION"))
        self.assertEqual(total(after, "kasd_api_auth_failures_total") - total(before, "kasd_api_auth_failures_total"), 1)
        self.assertEqual(total(after, "kasd_routed_calls_by_code_total", code="FAILED_PRECONDITION") -
                         total(before, "kasd_routed_calls_by_code_total", code="FAILED_PRECONDITION"), 1)

    def test_no_tunnel_counts_timeout(self):
        _, before = self.scrape()
        with self.assertRaises(grpc.RpcError) as cm:
            self.gl.unary("/test.Echo/Unary", b"", agent_id=999, timeout=10)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.DEADLINE_EXCEEDED)
        after = self.wait_metric(lambda s: total(s, "kasd_routed_calls_no_tunnel_total") >
                                 total(before, "kasd_routed_calls_no_tunnel_total"))
        self.assertEqual(total(after, "kasd_routed_calls_no_tunnel_total"),
                         total(before, "kasd_routed_calls_no_tunnel_total") + 1)
        name = "k8s_api_proxy_routing_duration_seconds"
        self.assertEqual(total(after, name + "_count", status="timeout"),
                         total(before, name + "_count", status="timeout") + 1)
        # routing_timeout is 1 s: the observation lands in the (0.5, 1] or (1, 2.5] buckets
        le_half = total(after, name + "_bucket", status="timeout", le="0.5") - \
            total(before, name + "_bucket", status="timeout", le="0.5")
        self.assertEqual(le_half, 0)

    def test_waiting_call_gauge(self):
        result = {}

        def call():
            try:
                self.gl.unary("/test.Echo/NotServed", b"", agent_id=2, timeout=10)
            except grpc.RpcError as e:
                result["code"] = e.code()
        th = threading.Thread(target=call)
        th.start()
        samples = self.wait_metric(lambda s: total(s, "kasd_waiting_calls") >= 1, timeout=5)
        self.assertGreaterEqual(total(samples, "kasd_waiting_calls"), 1)
        th.join(10)
        self.assertEqual(result.get("code"), grpc.StatusCode.DEADLINE_EXCEEDED)

    def test_auth_failures(self):
        _, before = self.scrape()
        with grpc.insecure_channel(self.agent_addr) as ch:
            with self.assertRaises(grpc.RpcError):
                ch.unary_unary("/gitlab.agent.agent_registrar.rpc.AgentRegistrar/Register")(
                    b"", timeout=5, metadata=(("authorization", "Bearer not-a-token-0123456789"),))
        after = self.wait_metric(lambda s: total(s, "kasd_agent_auth_failures_total") >
                                 total(before, "kasd_agent_auth_failures_total"))
        self.assertGreater(total(after, "kasd_agent_auth_failures_total"),
                           total(before, "kasd_agent_auth_failures_total"))

    def test_concurrent_scrapes(self):
        errors = []

        def one():
            try:
                status, body, _ = http_get(self.base, "/metrics")
                assert status == 200, status
                parse_exposition(body)
            except Exception as e:  # noqa: BLE001
                errors.append(e)
        threads = [threading.Thread(target=one) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        # a scrape still hanging is a failure too, not an absence of errors
        self.assertEqual([t for t in threads if t.is_alive()], [])
        self.assertEqual(errors, [])

    # --- health ---

    def test_liveness_and_readiness(self):
        self.assertEqual(http_get(self.base, "/liveness")[:2], (200, "ok\n"))
        deadline = time.monotonic() + 10  # ready once every shard's Redis connection is up
        while http_get(self.base, "/readiness")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(http_get(self.base, "/readiness")[:2], (200, "ok\n"))

    def test_unknown_path_and_method(self):
        self.assertEqual(http_get(self.base, "/nope")[0], 404)
        self.assertEqual(http_get(self.base, "/metrics", method="POST")[0], 405)

    @unittest.skipIf(CURL is None, "curl not installed")
    def test_curl_http1_and_http2(self):
        # --http2 is Upgrade: h2c, for which curl 7.88 holds at most 32 KiB after the 101; /metrics
        # is larger (docs/operations.md), so the upgrade is tried on /liveness and /metrics is read
        # with prior knowledge
        for flags in (["--http1.1"], ["--http2-prior-knowledge"], ["--http2"]):
            path = "/liveness" if flags == ["--http2"] else "/metrics"
            r = subprocess.run([CURL, "-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_version} %{http_code}",
                                *flags, self.base + path], capture_output=True, text=True, timeout=20)
            self.assertEqual(r.returncode, 0, (flags, r.stderr))
            body, _, tail = r.stdout.rpartition("\n")
            version, code = tail.split()
            self.assertEqual(code, "200", flags)
            self.assertEqual(version, "1.1" if flags == ["--http1.1"] else "2", flags)
            if path == "/metrics":
                parse_exposition(body + "\n" if not body.endswith("\n") else body)


class Draining(unittest.TestCase):
    def test_readiness_flips_while_stopping(self):
        cfg = """\
shards: 2
agent:
  listen:
    address: 127.0.0.1:0
api:
  listen:
    address: 127.0.0.1:0
private_api:
  listen:
    address: 127.0.0.1:0
observability:
  listen:
    address: 127.0.0.1:0
limits:
  shutdown_grace: 4s
"""
        k = Kasd(config=cfg)
        self.addCleanup(k.kill)
        self.assertTrue(k.started, k.log())
        base = "http://%s:%d" % k.listeners["observability"]
        # ready once every shard's Redis connection (the embedded redis-server) is up: just after
        # the "started" line it may still be connecting
        deadline = time.monotonic() + 10
        while http_get(base, "/readiness")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(http_get(base, "/readiness")[0], 200)
        # An open call keeps its connection, and so kasd, in the grace period after SIGTERM: a
        # client-streaming health check whose request stream stays open until we end it.
        release = threading.Event()
        done = threading.Event()

        def requests():
            release.wait(20)
            return
            yield  # noqa: unreachable: makes this a generator

        ch = grpc.insecure_channel("%s:%d" % k.listeners["agent"])
        self.addCleanup(ch.close)
        self.addCleanup(release.set)
        fut = ch.stream_unary("/grpc.health.v1.Health/Check").future(requests(), timeout=20)
        fut.add_done_callback(lambda f: done.set())
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the call reached kasd
            _, body, _ = http_get(base, "/metrics")
            if total(parse_exposition(body)[1], "kasd_received_bytes_total") > 0:
                break
            time.sleep(0.05)
        else:
            self.fail("the call never reached kasd: nothing would be in flight while draining")
        time.sleep(0.2)
        k.signal(signal.SIGTERM)
        k.wait_event("stopping", 5)
        codes = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.5:
            status, body, _ = http_get(base, "/readiness")
            codes.append(status)
            if status == 503:
                self.assertIn("draining", body)
            time.sleep(0.1)
        self.assertTrue(codes and all(c == 503 for c in codes), codes)
        self.assertIsNone(k.proc.poll(), "kasd was still in its grace period")
        # liveness stays 200 while draining: shards with nothing left to serve have exited their
        # loops, and are presumed finished rather than stuck (docs/operations.md)
        self.assertEqual(http_get(base, "/liveness")[0], 200)
        release.set()
        self.assertEqual(k.wait(30), 0, k.log())
        self.assertTrue(done.wait(10))


if __name__ == "__main__":
    result = unittest.main(exit=False, verbosity=2).result
    failed = len(result.failures) + len(result.errors)
    print(f"{result.testsRun - failed - len(result.skipped)} passed, {failed} failed")
    sys.exit(1 if failed else 0)
