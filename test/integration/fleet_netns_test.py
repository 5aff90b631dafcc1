"""A kas-to-kas link cut inside a network namespace pair fails over and recovers when restored.

Three kasd instances share one redis-server; the link between two of them is cut for real (a
veth whose far end goes down: packets vanish, nothing answers, no RST, no ICMP) while Redis stays
reachable for all three, so the cut instance still looks alive and still holds its tunnels.

Two network namespaces (named after this process's pid, deleted whatever happens):

    ns1                                            ns2
    ---                                            ---
    this test process (setns), redis-server,       kasd B: agent, api, observability
    kasd A (GitLab calls enter here), kasd C       listeners on 10.231.0.2, private
    (127.0.0.1)                                    listener on 10.232.0.2
        m1 10.231.0.1/30  <==== veth "mgmt" ====>  m2 10.231.0.2/30   Redis, agent pod "b",
                                                                      metrics: never cut
        k1 10.232.0.1/30  <==== veth "kas" =====>  k2 10.232.0.2/30   A -> B private API: cut
                                                                      by `ip link set k2 down`

Agent X has two pods: "b" connected to B, "c" connected to C; /test.Echo/Who answers the pod's
name, so every call says which instance served it. Calls enter A, which holds no tunnel of X and
forwards each to B or C (random order, the second raced after fleet.second_candidate_delay).

A has a static neighbour entry for B's kas address, as a router between two hosts would give:
without it the kernel's own ARP failure (about 3 s) would end A's dial with EHOSTUNREACH and
hide whether kasd bounds its own dials. Cut, A's packets to B go nowhere and B's answers are
never sent: what a partition looks like from A.

Everything listens on 127.0.0.1 or on the namespaces' own addresses; nothing is configured in
the host's namespace. Needs root and iproute2 (`ip netns`)."""
import base64
import ctypes
import json
import os
import re
import subprocess
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
from gitlab_client import GitLabClient, collect  # noqa: E402
from kasd_harness import Kasd, write_tokens  # noqa: E402
from redis_fixture import RedisServer  # noqa: E402

AGENT = 1
MGMT = ("10.231.0.1", "10.231.0.2")  # m1 (ns1), m2 (ns2)
KAS = ("10.232.0.1", "10.232.0.2")   # k1 (ns1), k2 (ns2)
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd):
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, "setns: " + os.strerror(e))


class InNetns:
    """with InNetns(name): the calling thread (and every thread or process it starts meanwhile)
    is in network namespace `name`; back in the previous one afterwards."""

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        self.prev = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            setns(fd)
        finally:
            os.close(fd)
        return self

    def __exit__(self, *exc):
        try:
            setns(self.prev)
        finally:
            os.close(self.prev)


def ip(*args, ns=None, check=True):
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def who_handler(name):
    def handle(call):
        for _ in call:
            pass
        call.send_header({})
        call.send_message(name.encode())
        call.send_trailer({})
    return handle


def wait_until(pred, timeout, step=0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(step)


def metric(kasd, family, **labels):
    """Sum of a metric family over shards, for the series whose labels include `labels`."""
    host, port = kasd.listeners["observability"]
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
        body = r.read().decode()
    total = 0
    for line in body.splitlines():
        m = re.match(r"^(\w+)(?:\{([^}]*)\})? (\S+)$", line)
        if not m or m.group(1) != family:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


class FleetNetns(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root (ip netns, setns)")
        cls.ns1 = f"kasd-nt-{os.getpid()}-1"
        cls.ns2 = f"kasd-nt-{os.getpid()}-2"
        cls.kasds = {}
        cls.agents = {}
        cls.clients = {}
        cls.inside = None
        # class cleanups run even when setUpClass fails half-way; last added runs first
        cls.addClassCleanup(cls.delete_namespaces)
        cls.make_namespaces()
        cls.inside = InNetns(cls.ns1).__enter__()
        cls.addClassCleanup(cls.leave_ns1)
        cls.addClassCleanup(cls.stop_everything)

        cls.dir = tempfile.mkdtemp(prefix="kasd-fleet-netns-")
        cls.token = base64.urlsafe_b64encode(os.urandom(24)).decode()
        write_tokens(os.path.join(cls.dir, "tokens.yaml"), {AGENT: (cls.token, 100 + AGENT)})
        cls.secret = gitlab_client.generate_secret()
        gitlab_client.write_secret(os.path.join(cls.dir, "api-secret"), cls.secret)
        gitlab_client.write_secret(os.path.join(cls.dir, "private-secret"), gitlab_client.generate_secret())
        # redis in ns1, on its loopback (A, C, this test) and on m1 (B, through the mgmt veth)
        cls.redis = RedisServer(extra_args=["--bind", "127.0.0.1", MGMT[0], "--protected-mode", "no"])
        cls.start_instance("a", cls.config("127.0.0.1", "127.0.0.1", "127.0.0.1"))
        cls.start_instance("c", cls.config("127.0.0.1", "127.0.0.1", "127.0.0.1"))
        with InNetns(cls.ns2):  # kasd B is forked from this thread: it lives in ns2
            cls.start_instance("b", cls.config(MGMT[1], KAS[1], MGMT[0]))
        b = cls.kasds["b"]
        assert b.listeners["private_api"][0] == KAS[1], b.listeners
        cls.start_pod("b")
        cls.start_pod("c")

    @classmethod
    def make_namespaces(cls):
        ip("netns", "add", cls.ns1)
        ip("netns", "add", cls.ns2)
        for ns in (cls.ns1, cls.ns2):
            ip("link", "set", "lo", "up", ns=ns)
        for (a, b), (x, y) in ((("m1", "m2"), MGMT), (("k1", "k2"), KAS)):
            ip("link", "add", a, "type", "veth", "peer", "name", b, "netns", cls.ns2, ns=cls.ns1)
            ip("addr", "add", f"{x}/30", "dev", a, ns=cls.ns1)
            ip("addr", "add", f"{y}/30", "dev", b, ns=cls.ns2)
            ip("link", "set", a, "up", ns=cls.ns1)
            ip("link", "set", b, "up", ns=cls.ns2)
        mac = json.loads(ip("-j", "link", "show", "k2", ns=cls.ns2))[0]["address"]
        ip("neigh", "replace", KAS[1], "lladdr", mac, "dev", "k1", "nud", "permanent", ns=cls.ns1)

    @classmethod
    def delete_namespaces(cls):
        errs = []
        for ns in (cls.ns1, cls.ns2):
            if os.path.exists(f"/run/netns/{ns}"):
                r = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True, timeout=10)
                if r.returncode != 0:
                    errs.append(f"ip netns del {ns}: {r.stderr.strip()}")
        assert not errs, errs

    @classmethod
    def leave_ns1(cls):
        if cls.inside is not None:
            cls.inside.__exit__(None, None, None)
            cls.inside = None

    @classmethod
    def stop_everything(cls):
        for c in cls.clients.values():
            c.close()
        for a in list(cls.agents.values()):
            a.kill()
        bad = []
        for name, k in cls.kasds.items():
            if k.proc.poll() is None:
                try:
                    rc = k.stop(15)
                except Exception as e:  # noqa: BLE001 - report, and still kill the others
                    rc = repr(e)
                if rc != 0:
                    bad.append(f"{name}: exit {rc}\n" + k.log()[-3000:])
            k.kill()
        if getattr(cls, "redis", None) is not None:
            cls.redis.kill()
        assert not bad, "\n".join(bad)

    @classmethod
    def config(cls, host, private_host, redis_host):
        return f"""\
shards: 2
agent:
  listen:
    address: {host}:0
  token_file: {cls.dir}/tokens.yaml
api:
  listen:
    address: {host}:0
    authentication_secret_file: {cls.dir}/api-secret
private_api:
  listen:
    address: {private_host}:0
    authentication_secret_file: {cls.dir}/private-secret
observability:
  listen:
    address: {host}:0
redis:
  server:
    address: {redis_host}:{cls.redis.port}
  heartbeat_interval: 300ms
  instance_ttl: 1500ms
  sweep_interval: 500ms
fleet:
  recheck_interval: 30s
limits:
  routing_timeout: 5s
  shutdown_grace: 2s
"""

    @classmethod
    def start_instance(cls, name, config):
        k = Kasd(config=config)
        cls.kasds[name] = k
        assert k.started, k.log()
        k.instance_id = [e for e in k.events if e.get("event") == "started"][0]["instance_id"]
        if name == "a":
            cls.clients[name] = GitLabClient("%s:%d" % k.listeners["api"], cls.secret)

    @classmethod
    def start_pod(cls, name):
        k = cls.kasds[name]
        a = AgentK("%s:%d" % k.listeners["agent"], cls.token, pods=1, idle=2, backoff=(0.2, 1.0),
                   handlers={"/test.Echo/Who": who_handler(name), "/test.Echo/Hold": cls.hold_handler(name)})
        cls.agents[name] = a
        a.start()
        a.wait_for(lambda s: s["tunnels_idle"] >= 2 and s["registers"] >= 1, timeout=15)
        assert wait_until(lambda: cls.advertised(name), 5), f"{name} never advertised agent {AGENT}"

    held = threading.Event()

    @classmethod
    def hold_handler(cls, name):
        def handle(call):
            call.recv()
            call.send_header({})
            call.send_message(name.encode())
            cls.held.set()
            call.cancelled.wait(30)
        return handle

    @classmethod
    def advertised(cls, name):
        members = cls.redis.cmd("SMEMBERS", f"gitlab-kas:{{a:{AGENT}}}:tunnels")
        return cls.kasds[name].instance_id.encode() in members

    def who(self, timeout=10):
        """A call entering A for agent X: (pod that answered, seconds)."""
        t = time.monotonic()
        data, _ = self.clients["a"].unary("/test.Echo/Who", b"", agent_id=AGENT, timeout=timeout)
        return data.decode(), time.monotonic() - t

    def cut(self):
        ip("link", "set", "k2", "down", ns=self.ns2)

    def restore(self):
        ip("link", "set", "k2", "up", ns=self.ns2)

    def log_tail(self, name, n=3000):
        return self.kasds[name].log()[-n:]

    # ---

    def test_1_both_instances_serve_before_the_cut(self):
        seen = {}
        for _ in range(60):
            pod, dt = self.who()
            seen[pod] = seen.get(pod, 0) + 1
            if seen.get("b", 0) >= 3 and seen.get("c", 0) >= 3:
                break
        self.assertGreaterEqual(seen.get("b", 0), 3, seen)  # A reaches B over the kas veth
        self.assertGreaterEqual(seen.get("c", 0), 3, seen)
        self.assertGreaterEqual(metric(self.kasds["a"], "kasd_fleet_peer_connections"), 2)

    def test_2_cut_link_fails_over_to_c(self):
        raced0 = metric(self.kasds["a"], "kasd_fleet_raced_total")
        t_cut = time.monotonic()
        self.cut()
        times = []
        for i in range(20):
            pod, dt = self.who(timeout=10)
            times.append(dt)
            self.assertEqual(pod, "c", f"call {i} after the cut")
            self.assertLess(dt, 2.0, f"call {i} after the cut took {dt:.3f}s")
        took = time.monotonic() - t_cut
        raced = metric(self.kasds["a"], "kasd_fleet_raced_total") - raced0
        print(f"\n  20 calls after the cut: {took:.3f}s, slowest {max(times):.3f}s, "
              f"raced {raced:.0f}", file=sys.stderr)
        self.assertLess(took, 10.0)
        # a kas-to-kas cut, not an instance gone: B still holds the agent, Redis still up for it
        self.assertTrue(self.advertised("b"))
        self.assertEqual(metric(self.kasds["b"], "kasd_redis_up"), 2)
        # B is still asked (it is still advertised): each time, the race to C covered it
        self.assertGreaterEqual(raced, 1)

    def test_3_restored_link_serves_from_b_again(self):
        t_restore = time.monotonic()
        self.restore()
        # only B holds the agent now: calls entering A must reach it through the restored link
        self.agents.pop("c").stop(2)
        self.assertTrue(wait_until(lambda: not self.advertised("c"), 5))
        times = []
        for i in range(10):
            pod, dt = self.who(timeout=10)
            times.append(dt)
            self.assertEqual(pod, "b", f"call {i} after the restore")
        first = times[0]
        print(f"\n  after the restore: first call served by b in {first:.3f}s "
              f"({time.monotonic() - t_restore:.3f}s after the link came back); slowest of the "
              f"rest {max(times[1:]):.3f}s", file=sys.stderr)
        self.assertLess(first, 3.0, "the first call after the restore waited on a stale peer connection")
        self.assertLess(max(times[1:]), 1.0)

    def test_4_call_in_flight_across_a_cut_ends_promptly(self):
        # only pod b holds agent X (test 3); a streaming call through A and B is answered once,
        # then the kas link is cut under it
        self.held.clear()
        call = self.clients["a"].stream("/test.Echo/Hold", iter([b"x"]), agent_id=AGENT, timeout=30)
        self.assertTrue(self.held.wait(10), "the call never reached pod b")
        t_cut = time.monotonic()
        self.cut()
        try:
            r = collect(call)
            took = time.monotonic() - t_cut
            print(f"\n  in-flight call ended {r.code} {took:.3f}s after the cut: {r.details}",
                  file=sys.stderr)
            self.assertEqual(r.messages, [b"b"])
            self.assertEqual(r.code, grpc.StatusCode.UNAVAILABLE, r.details)
            self.assertLess(took, 10.0, "a call through a cut kas link hung until the caller's deadline")
        finally:
            call.cancel()
            self.restore()


if __name__ == "__main__":
    unittest.main(verbosity=2)
