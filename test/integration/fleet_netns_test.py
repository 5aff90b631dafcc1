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

Private listeners ping after 1 s of silence and give up after 1 s more
(private_api.listen.keepalive_*), which kasd also applies to its own connections to peers; a
dial to a peer fails after fleet.peer_connect_timeout (2 s). Checked: during a 6 s cut every
call is served by C within 2 s; restored, B serves again; a call in flight through the cut link
ends UNAVAILABLE in seconds on both ends; with B the only holder, a call ends at the routing
deadline (8 s), not later, and B serves again at once when the link is back.

Everything listens on 127.0.0.1 or on the namespaces' own addresses; nothing is configured in
the host's namespace. Needs root and iproute2 (`ip netns`)."""
import base64
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import grpc

sys.path.insert(0, os.path.dirname(__file__))
import gitlab_client  # noqa: E402
from agentk import AgentK  # noqa: E402
from gitlab_client import GitLabClient, collect  # noqa: E402
from kasd_harness import Kasd, metric, wait_until, write_tokens  # noqa: E402
from redis_fixture import RedisServer  # noqa: E402

AGENT = 1
CUT_SECONDS = 6.0       # how long the partition of test 2 lasts
# B serves again within this after the restore. A call offered to a dial A started during the
# cut fails with it (fleet.peer_connect_timeout, 2 s), and the holders are read again 250 ms
# later (doubling while offers keep failing): a healed link announces nothing, and the safety
# re-check (fleet.recheck_interval, 30 s here) is far too late.
RECOVERY_SECONDS = 4.0
IN_FLIGHT_SECONDS = 5.0  # a call in flight through a cut link ends within this (keepalive 1 s + 1 s)
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
    keepalive_time: 1s
    keepalive_timeout: 1s
    keepalive_min_time: 500ms
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
  peer_connect_timeout: 2s
  recheck_interval: 30s
limits:
  routing_timeout: 8s
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

    held = threading.Event()      # a Hold call reached its pod
    released = threading.Event()  # and was cancelled there

    @classmethod
    def hold_handler(cls, name):
        def handle(call):
            call.recv()
            call.send_header({})
            call.send_message(name.encode())
            cls.held.set()
            if call.cancelled.wait(30):
                cls.released.set()
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

    def gave_up_on_b(self, since):
        """A's log lines, from event index `since`, that end a connection to B's private address
        because B did not answer (dial or keepalive)."""
        target = "%s:%d" % self.kasds["b"].listeners["private_api"]
        return [e for e in self.kasds["a"].events[since:]
                if e.get("event") in ("connect_timeout", "keepalive_timeout") and e.get("target") == target]

    def serve_again_from_b(self, t_restore):
        """The first call entering A after the restore is served by pod b, within
        RECOVERY_SECONDS of the restore, and so are the next ten, promptly; seconds to the first."""
        pod, _ = self.who(timeout=RECOVERY_SECONDS + 2)
        recovered = time.monotonic() - t_restore
        self.assertEqual(pod, "b")
        self.assertLess(recovered, RECOVERY_SECONDS)
        times = []
        for i in range(10):
            pod, dt = self.who(timeout=10)
            times.append(dt)
            self.assertEqual(pod, "b", f"call {i} after the recovery")
        self.assertLess(max(times), 1.0, times)
        return recovered

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
        # A has a live connection to B (test 1); the partition lasts CUT_SECONDS and calls keep
        # entering A all along: every one is served by C, none waits on the silent B
        raced0 = metric(self.kasds["a"], "kasd_fleet_raced_total")
        ev0 = len(self.kasds["a"].events)
        t_cut = time.monotonic()
        self.cut()
        times = []
        while time.monotonic() - t_cut < CUT_SECONDS:
            pod, dt = self.who(timeout=10)
            times.append(dt)
            self.assertEqual(pod, "c", f"call {len(times)} after the cut")
            self.assertLess(dt, 2.0, f"call {len(times)} after the cut took {dt:.3f}s")
            time.sleep(0.2)
        raced = metric(self.kasds["a"], "kasd_fleet_raced_total") - raced0
        gave_up = self.gave_up_on_b(ev0)
        print(f"\n  {len(times)} calls in {CUT_SECONDS}s of cut, all served by c: slowest "
              f"{max(times):.3f}s, raced {raced:.0f}; A gave up on B: "
              f"{[(e['event'], e.get('reason')) for e in gave_up]}", file=sys.stderr)
        # a kas-to-kas cut, not an instance gone: B still holds the agent, its Redis is up
        self.assertTrue(self.advertised("b"))
        self.assertEqual(metric(self.kasds["b"], "kasd_redis_up"), 2)
        # A noticed the silent peer by itself (keepalive PING unanswered, or its re-dial not
        # answered within fleet.peer_connect_timeout), not when TCP gives up
        self.assertTrue(gave_up, self.kasds["a"].log()[-3000:])

    def test_3_restored_link_serves_from_b_again(self):
        t_restore = time.monotonic()
        self.restore()
        # only B holds the agent now: calls entering A must reach it through the restored link
        self.agents.pop("c").stop(2)
        self.assertTrue(wait_until(lambda: not self.advertised("c"), 5))
        recovered = self.serve_again_from_b(t_restore)
        print(f"\n  after the restore: served by b {recovered:.3f}s after the link came back",
              file=sys.stderr)

    def test_4_call_in_flight_across_a_cut_ends_promptly(self):
        # Only pod b holds agent X (test 3). A streaming call through A and B is answered once,
        # then the kas link is cut under it. Both ends of the kas connection ping after
        # private_api.listen.keepalive_time (1 s here) and give up after keepalive_timeout (1 s):
        # B cancels the call at the agent, A ends it UNAVAILABLE for the caller, rather than
        # leaving it until the caller's deadline (GitLab may set none).
        self.held.clear()
        self.released.clear()
        call = self.clients["a"].stream("/test.Echo/Hold", iter([b"x"]), agent_id=AGENT, timeout=15)
        self.assertTrue(self.held.wait(10), "the call never reached pod b")
        # the answer's first message has crossed both instances before the link is cut (held is
        # set when the agent queued it, not when the caller has it)
        first = next(call)
        t_cut = time.monotonic()
        self.cut()
        try:
            r = collect(call)
            r.messages.insert(0, first)
            took = time.monotonic() - t_cut
            self.assertTrue(self.released.wait(6), "B kept the call of a peer it cannot reach")
            b_gave_up = time.monotonic() - t_cut
            print(f"\n  in-flight call: the caller on A got {r.code.name} {took:.3f}s after the cut "
                  f"({r.details}); the agent on B saw it cancelled within {b_gave_up:.3f}s",
                  file=sys.stderr)
            self.assertEqual(r.messages, [b"b"])
            self.assertLess(took, IN_FLIGHT_SECONDS,
                            f"a call through a cut kas link hung on A until the caller's deadline "
                            f"({r.code.name}: {r.details})")
            self.assertEqual(r.code, grpc.StatusCode.UNAVAILABLE, r.details)
        finally:
            call.cancel()
            self.restore()

    def test_5_only_holder_cut_off_then_restored(self):
        # Only B holds agent X and the link is cut: a call entering A cannot be served, and must
        # end at the routing deadline (8 s), not hang on A's dial to B; A's dials are abandoned
        # after fleet.peer_connect_timeout (2 s). Restored, the next calls reach B.
        ev0 = len(self.kasds["a"].events)
        failed0 = metric(self.kasds["a"], "kasd_fleet_forwarded_total", result="failed")
        time.sleep(0.5)
        self.cut()
        t = time.monotonic()
        with self.assertRaises(grpc.RpcError) as cm:
            self.who(timeout=15)
        took = time.monotonic() - t
        gave_up = self.gave_up_on_b(ev0)
        failed = metric(self.kasds["a"], "kasd_fleet_forwarded_total", result="failed") - failed0
        print(f"\n  only holder cut off: {cm.exception.code().name} after {took:.3f}s "
              f"({cm.exception.details()}); offers failed {failed:.0f}; A gave up on B: "
              f"{[(e['event'], e.get('reason')) for e in gave_up]}", file=sys.stderr)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.DEADLINE_EXCEEDED, cm.exception.details())
        self.assertLess(took, 8.0 + 1.5, "a call for an agent behind a cut link outlived the routing deadline")
        self.assertTrue(gave_up, self.kasds["a"].log()[-3000:])
        self.assertGreaterEqual(failed, 1)
        t_restore = time.monotonic()
        self.restore()
        recovered = self.serve_again_from_b(t_restore)
        print(f"  restored: served by b {recovered:.3f}s after the link came back", file=sys.stderr)


if __name__ == "__main__":
    unittest.main(verbosity=2)
