"""Fleet tracking in Redis (docs/redis.md) and AgentTracker/GetConnectedAgents, with a real
redis-server, real kasd instances, the agentk emulator and a grpcio GitLab client.

The instances run with short heartbeat/TTL/sweep intervals so that crash-safety is observable in
seconds: heartbeat 300 ms, instance TTL 1.5 s, sweeper every 500 ms."""
import base64
import os
import signal
import sys
import tempfile
import time
import unittest

import grpc

sys.path.insert(0, os.path.dirname(__file__))
import gitlab_client  # noqa: E402
import kaspb  # noqa: E402
from agentk import AgentK  # noqa: E402
from gitlab_client import GitLabClient  # noqa: E402
from kasd_harness import Kasd, service_config, write_tokens, wait_until  # noqa: E402
from redis_fixture import RedisServer  # noqa: E402

PROJECT = 500  # agents 1..3 share it; agent 4.. have their own



def readiness(kasd):
    import urllib.error
    import urllib.request
    host, port = kasd.listeners["observability"]
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/readiness", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


class Tracker(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="kasd-tracker-")
        cls.tokens = {i: base64.urlsafe_b64encode(os.urandom(24)).decode() for i in range(1, 12)}
        write_tokens(os.path.join(cls.dir, "tokens.yaml"),
                     {i: (t, PROJECT if i <= 3 else 600 + i) for i, t in cls.tokens.items()})
        cls.secret = gitlab_client.generate_secret()
        gitlab_client.write_secret(os.path.join(cls.dir, "api-secret"), cls.secret)
        cls.redis = RedisServer()
        cls.a = cls.start_kasd()
        cls.gl = GitLabClient("%s:%d" % cls.a.listeners["api"], cls.secret)
        cls.agents = []

    @classmethod
    def start_kasd(cls, prefix="gitlab-kas"):
        k = Kasd(config=service_config(cls.dir, f"""\
redis:
  server:
    address: {cls.redis.address}
  key_prefix: {prefix}
  heartbeat_interval: 300ms
  instance_ttl: 1500ms
  sweep_interval: 500ms
limits:
  shutdown_grace: 3s
"""))
        assert k.started, k.log()
        started = [e for e in k.events if e.get("event") == "started"][0]
        k.instance_id = started["instance_id"]
        return k

    @classmethod
    def tearDownClass(cls):
        cls.gl.close()
        for a in cls.agents:
            a.stop(2)
        rc = cls.a.stop()
        cls.a.kill()
        cls.redis.kill()
        assert rc == 0, f"exit code {rc}\n" + cls.a.log()

    def agent(self, kasd, agent_id, pods=1, **kw):
        a = AgentK("%s:%d" % kasd.listeners["agent"], self.tokens[agent_id], pods=pods, idle=1,
                   backoff=(0.2, 1.0), **kw)
        a.start()
        a.wait_for(lambda s: s["registers"] >= pods and s["tunnels_idle"] >= pods, timeout=15)
        self.agents.append(a)
        return a

    def connected(self, gl=None, **q):
        return list((gl or self.gl).get_connected_agents(timeout=5, **q).agents)

    def wait_count(self, n, timeout=10, gl=None, **q):
        got = wait_until(lambda: len(self.connected(gl, **q)) == n, timeout)
        self.assertTrue(got, f"expected {n} entries for {q}, got {self.connected(gl, **q)}")
        return self.connected(gl, **q)

    # --- GetConnectedAgents ---

    def test_by_agent_and_project_with_meta(self):
        t0 = time.time()
        a1 = self.agent(self.a, 1, pods=2, agent_meta=dict(version="v17.5.0", pod_namespace="ns1"))
        self.agent(self.a, 2)
        got = self.wait_count(2, agent_id=1)
        pods = {p.pod_id: p for p in a1.pods}
        self.assertEqual({e.connection_id for e in got}, set(pods))
        for e in got:
            self.assertEqual(e.agent_id, 1)
            self.assertEqual(e.project_id, PROJECT)
            self.assertEqual(e.agent_meta.version, "v17.5.0")
            self.assertEqual(e.agent_meta.pod_namespace, "ns1")
            self.assertEqual(e.agent_meta.pod_name, pods[e.connection_id].name)
            self.assertEqual(e.agent_meta.kubernetes_version.git_version, "v1.29.0")
            at = e.connected_at.seconds + e.connected_at.nanos / 1e9
            self.assertTrue(t0 - 1 <= at <= time.time() + 1, (t0, at))
        by_project = self.wait_count(3, project_id=PROJECT)
        self.assertEqual(sorted(e.agent_id for e in by_project), [1, 1, 2])
        self.assertEqual(self.connected(agent_id=999), [])
        self.assertEqual(self.connected(project_id=999), [])

    def test_disconnect_removes_entry(self):
        a = self.agent(self.a, 5)
        self.wait_count(1, agent_id=5)
        tun_key = f"gitlab-kas:{{a:5}}:tunnels"
        self.assertTrue(wait_until(lambda: self.redis.cmd("SMEMBERS", tun_key) == [self.a.instance_id.encode()], 5))
        a.stop(2)
        self.agents.remove(a)
        self.wait_count(0, agent_id=5)
        self.assertTrue(wait_until(lambda: self.redis.cmd("SMEMBERS", tun_key) == [], 5))
        # nothing of agent 5 is left in this instance's index either
        idx = [m for k in self.redis.keys(f"gitlab-kas:{{i:{self.a.instance_id}}}:idx:*")
               for m in self.redis.cmd("SMEMBERS", k)]
        self.assertFalse([m for m in idx if m.endswith(b":5:605") or m == b"t:5"], idx)

    def test_invalid_requests(self):
        with self.assertRaises(grpc.RpcError) as cm:
            self.gl.get_connected_agents(timeout=5)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        with self.assertRaises(grpc.RpcError) as cm:
            self.gl.get_connected_agents(agent_id=1, auth="Bearer not-a-jwt", timeout=5)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.UNAUTHENTICATED)

    def test_reregister_with_same_meta_writes_nothing(self):
        a = self.agent(self.a, 6, register_interval=0.2)
        self.wait_count(1, agent_id=6)
        before = self.redis.commandstats().get("hset", 0)
        n0 = a.stats["registers"]
        a.wait_for(lambda s: s["registers"] >= n0 + 5, timeout=10)
        self.assertEqual(self.redis.commandstats().get("hset", 0), before)

    # --- fleet ---

    def test_two_instances_and_kill9_is_swept(self):
        b = self.start_kasd()
        try:
            self.agent(b, 7, pods=2)
            self.agent(self.a, 8)
            # A answers for B's agent, B for A's
            self.wait_count(2, agent_id=7)
            gl_b = GitLabClient("%s:%d" % b.listeners["api"], self.secret)
            try:
                self.wait_count(1, gl=gl_b, agent_id=8)
            finally:
                gl_b.close()
            self.assertTrue(self.redis.keys(f"gitlab-kas:{{i:{b.instance_id}}}:idx:*"))
            b.proc.send_signal(signal.SIGKILL)
            b.proc.wait(10)
            t_kill = time.monotonic()
            # gone from answers within the TTL (1.5 s) plus a heartbeat, give or take
            self.wait_count(0, timeout=10, agent_id=7)
            hidden = time.monotonic() - t_kill
            self.assertLess(hidden, 8.0)  # TTL 1.5 s + a heartbeat, with room for a loaded machine
            # and swept from Redis: entries, index, tunnels flag, record
            swept = wait_until(lambda: not self.redis.cmd("HGETALL", "gitlab-kas:{a:7}:conns")
                               and not self.redis.keys(f"gitlab-kas:{{i:{b.instance_id}}}:*")
                               and not self.redis.cmd("SMEMBERS", "gitlab-kas:{a:7}:tunnels")
                               and self.redis.cmd("HGET", "gitlab-kas:{fleet}:instances", b.instance_id) is None,
                               10)
            self.assertTrue(swept, self.redis.keys())
            self.assertTrue(self.a.wait_event("redis_instance_swept", 5), self.a.log())
            # A's own agent is untouched
            self.assertEqual(len(self.connected(agent_id=8)), 1)
        finally:
            b.kill()

    def test_stalled_instance_is_swept_then_republishes(self):
        """An instance that stops answering longer than the TTL (SIGSTOP: a VM pause, a stuck host)
        is swept by a peer; when it runs again its heartbeat finds its alive key gone, and it
        registers and re-publishes everything, although its Redis connections never dropped."""
        b = self.start_kasd()
        try:
            self.agent(b, 10, pods=2)
            self.wait_count(2, agent_id=10)
            b.proc.send_signal(signal.SIGSTOP)
            try:
                # swept by A (TTL 1.5 s, sweeper every 0.5 s)
                self.assertTrue(wait_until(lambda: self.redis.cmd("HLEN", "gitlab-kas:{a:10}:conns") == 0, 10),
                                self.redis.keys())
                self.assertEqual(self.connected(agent_id=10), [])
            finally:
                b.proc.send_signal(signal.SIGCONT)
            self.assertTrue(b.wait_event("redis_heartbeat_lapsed", 10), b.log())
            lapse = [i for i, e in enumerate(b.events) if e.get("event") == "redis_heartbeat_lapsed"][0]
            got = self.wait_count(2, agent_id=10)
            # and again once a sweep lease that may have been running has expired (2 x TTL = 3 s):
            # both shards re-sync twice after the lapse
            self.assertTrue(wait_until(lambda: len([e for e in b.events[lapse:] if e.get("event") == "redis_resync"])
                                       >= 4, 10), b.log())
            got = self.wait_count(2, agent_id=10)
            self.assertEqual({e.agent_id for e in got}, {10})
            self.assertIsNotNone(self.redis.cmd("HGET", "gitlab-kas:{fleet}:instances", b.instance_id))
            self.assertEqual(self.redis.cmd("SMEMBERS", "gitlab-kas:{a:10}:tunnels"), [b.instance_id.encode()])
        finally:
            for a in list(self.agents):
                if a.addr == "%s:%d" % b.listeners["agent"]:
                    a.stop(2)
                    self.agents.remove(a)
            b.stop()
            b.kill()

    def test_clean_stop_removes_everything(self):
        c = self.start_kasd(prefix="stoptest")
        a = None
        try:
            a = AgentK("%s:%d" % c.listeners["agent"], self.tokens[9], pods=1, idle=1)
            a.start()
            a.wait_for(lambda s: s["registers"] >= 1 and s["tunnels_idle"] >= 1, timeout=15)
            self.assertTrue(wait_until(lambda: self.redis.cmd("HLEN", "stoptest:{a:9}:conns") == 1, 5))
            self.assertTrue(self.redis.keys("stoptest:*"))
            a.stop(2)
            a = None
            self.assertEqual(c.stop(), 0, c.log())
            # every entry is gone; only the instance's record stays, for a peer's sweeper
            self.assertEqual(self.redis.keys("stoptest:*"), ["stoptest:{fleet}:instances"])
            self.assertEqual(self.redis.cmd("HKEYS", "stoptest:{fleet}:instances"), [c.instance_id.encode()])
            d = self.start_kasd(prefix="stoptest")
            try:
                self.assertTrue(wait_until(lambda: self.redis.cmd("HKEYS", "stoptest:{fleet}:instances")
                                           == [d.instance_id.encode()], 10), self.redis.keys("stoptest:*"))
            finally:
                self.assertEqual(d.stop(), 0, d.log())
                d.kill()
        finally:
            if a is not None:
                a.kill()
            c.kill()

    def test_redis_restart_republishes(self):
        # a separate instance and Redis, so the other tests keep theirs
        r2 = RedisServer()
        old, self.__class__.redis = self.__class__.redis, r2
        d = self.start_kasd(prefix="restart")
        gl = GitLabClient("%s:%d" % d.listeners["api"], self.secret)
        try:
            stay = self.agent(d, 10)
            leave = self.agent(d, 11)
            self.wait_count(1, gl=gl, agent_id=10)
            self.wait_count(1, gl=gl, agent_id=11)
            # Redis comes back with its data (SAVE, then restart loads dump.rdb): agent 11's entries
            # are stale by then and the re-sync must delete them; agent 10's must stay.
            r2.cmd("SAVE")
            r2.stop()
            with self.assertRaises(grpc.RpcError) as cm:
                gl.get_connected_agents(agent_id=10, timeout=5)
            self.assertEqual(cm.exception.code(), grpc.StatusCode.UNAVAILABLE)
            self.assertIn(r2.address, cm.exception.details())
            self.assertTrue(wait_until(lambda: readiness(d) == 503, 5))
            # while Redis is away: one agent leaves, the other stays; local routing still works
            leave.stop(2)
            self.agents.remove(leave)
            data, _ = gl.unary("/test.Echo/Unary", b"still here", agent_id=10, timeout=10)
            self.assertEqual(data, b"still here")
            r2.start()
            got = wait_until(lambda: self._try(gl, agent_id=10) == 1 and self._try(gl, agent_id=11) == 0, 15)
            self.assertTrue(got, d.log())
            self.assertEqual(self.redis.cmd("SMEMBERS", "restart:{a:10}:tunnels"), [d.instance_id.encode()])
            self.assertIsNotNone(self.redis.cmd("GET", f"restart:{{fleet}}:alive:{d.instance_id}"))
            self.assertTrue(wait_until(lambda: readiness(d) == 200, 5))
            stay.stop(2)
            self.agents.remove(stay)
        finally:
            gl.close()
            d.stop()
            d.kill()
            self.__class__.redis = old
            r2.kill()

    def test_no_partial_answer_while_resyncing(self):
        """Right after Redis comes back empty, GetConnectedAgents answers UNAVAILABLE (re-syncing)
        until every shard of the instance has re-published its agents, never OK with some missing."""
        r3 = RedisServer()
        old, self.__class__.redis = self.__class__.redis, r3
        d = self.start_kasd(prefix="resync")
        # callers on separate connections, so the lookups are served by both shards
        gls = [GitLabClient("%s:%d" % d.listeners["api"], self.secret,
                            options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(4)]
        try:
            for agent_id in (1, 2, 3):  # project PROJECT; 2 shards: some agents on each
                self.agent(d, agent_id)
            self.wait_count(3, gl=gls[0], project_id=PROJECT)
            for round_ in range(3):
                r3.stop()  # --save "": Redis comes back empty, kasd must write everything again
                self.assertTrue(wait_until(lambda: readiness(d) == 503, 5))
                r3.start()
                seen = {"ok": 0, "unavailable": 0}
                deadline = time.monotonic() + 10
                i = 0
                while time.monotonic() < deadline:
                    gl = gls[i % len(gls)]
                    i += 1
                    try:
                        n = len(gl.get_connected_agents(project_id=PROJECT, timeout=5).agents)
                    except grpc.RpcError as e:
                        self.assertEqual(e.code(), grpc.StatusCode.UNAVAILABLE, e.details())
                        self.assertTrue("re-syncing" in e.details() or "redis" in e.details(), e.details())
                        seen["unavailable"] += 1
                        continue
                    self.assertEqual(n, 3, f"round {round_}: an OK answer missing agents after {seen}")
                    seen["ok"] += 1
                    if seen["ok"] >= 20:
                        break
                self.assertGreaterEqual(seen["ok"], 20, f"round {round_}: {seen}\n" + d.log())
        finally:
            for a in list(self.agents):
                if a.addr == "%s:%d" % d.listeners["agent"]:
                    a.stop(2)
                    self.agents.remove(a)
            for gl in gls:
                gl.close()
            d.stop()
            d.kill()
            self.__class__.redis = old
            r3.kill()

    def test_shard0_reconnect_resyncs_every_shard(self):
        """If a peer swept this instance while shard 0's heartbeat was away, every shard re-publishes
        once shard 0 is back (not only shard 0)."""
        e = self.start_kasd(prefix="swept")
        try:
            for agent_id in (1, 2, 3):  # 2 shards: some agents land on shard 1
                self.agent(e, agent_id)
            clients = self.redis.cmd("CLIENT", "LIST").decode().splitlines()
            names = {dict(kv.split("=", 1) for kv in c.split(" ") if "=" in kv).get("name"): c for c in clients}
            for shard in (0, 1):
                self.assertIn(f"kasd-{e.instance_id}-shard{shard}", names, clients)
            self.assertTrue(wait_until(lambda: sum(self.redis.cmd("HLEN", f"swept:{{a:{i}}}:conns")
                                                   for i in (1, 2, 3)) == 3, 5))
            # what a peer's sweeper does to an instance it took for dead
            for k in self.redis.keys("swept:*"):
                self.redis.cmd("DEL", k)
            resyncs = len([ev for ev in e.events if ev.get("event") == "redis_resync"])
            shard0 = dict(kv.split("=", 1) for kv in names[f"kasd-{e.instance_id}-shard0"].split(" ") if "=" in kv)
            self.assertEqual(self.redis.cmd("CLIENT", "KILL", "ID", shard0["id"]), 1)
            # every shard re-syncs (shard 1's own connection never dropped) and all three are back
            self.assertTrue(wait_until(lambda: len([ev for ev in e.events if ev.get("event") == "redis_resync"])
                                       >= resyncs + 2, 10), e.log())
            self.assertTrue(wait_until(lambda: sum(self.redis.cmd("HLEN", f"swept:{{a:{i}}}:conns")
                                                   for i in (1, 2, 3)) == 3, 5), self.redis.keys())
            for i in (1, 2, 3):
                self.assertEqual(self.redis.cmd("SMEMBERS", f"swept:{{a:{i}}}:tunnels"), [e.instance_id.encode()])
            self.assertIsNotNone(self.redis.cmd("HGET", "swept:{fleet}:instances", e.instance_id))
        finally:
            for a in list(self.agents):
                if a.addr == "%s:%d" % e.listeners["agent"]:
                    a.stop(2)
                    self.agents.remove(a)
            e.stop()
            e.kill()

    @staticmethod
    def _try(gl, **q):
        try:
            return len(gl.get_connected_agents(timeout=5, **q).agents)
        except grpc.RpcError:
            return -1


def metric(kasd, name, **labels):
    """The sum over shards of a /metrics series with these labels (0 when absent)."""
    import urllib.request
    host, port = kasd.listeners["observability"]
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        lbl, _, val = line[len(name) + 1:].rpartition("} ")
        have = dict(kv.split("=", 1) for kv in lbl.split(","))
        if all(have.get(k) == f'"{v}"' for k, v in labels.items()):
            total += float(val)
    return total


class PodLimits(unittest.TestCase):
    """limits.pods_per_connection and limits.pods_per_agent bound what one agent may register on
    this instance; GetConnectedAgents answers at most limits.connected_agents_max_size bytes."""
    PER_CONN, PER_AGENT = 3, 5

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="kasd-podlimits-")
        cls.tokens = {i: base64.urlsafe_b64encode(os.urandom(24)).decode() for i in range(1, 4)}
        write_tokens(os.path.join(cls.dir, "tokens.yaml"), {i: (t, 700 + i) for i, t in cls.tokens.items()})
        cls.secret = gitlab_client.generate_secret()
        gitlab_client.write_secret(os.path.join(cls.dir, "api-secret"), cls.secret)
        cls.redis = RedisServer()
        cls.k = Kasd(config=service_config(cls.dir, f"""\
redis:
  server:
    address: {cls.redis.address}
limits:
  shutdown_grace: 3s
  pods_per_connection: {cls.PER_CONN}
  pods_per_agent: {cls.PER_AGENT}
  agent_meta_max_size: 1048576
"""))
        assert cls.k.started, cls.k.log()
        cls.gl = GitLabClient("%s:%d" % cls.k.listeners["api"], cls.secret)

    @classmethod
    def tearDownClass(cls):
        cls.gl.close()
        rc = cls.k.stop()
        cls.k.kill()
        cls.redis.kill()
        assert rc == 0, f"exit code {rc}\n" + cls.k.log()

    def channel(self, agent_id):
        """One HTTP/2 connection of its own, authenticated as agent_id."""
        ch = grpc.insecure_channel("%s:%d" % self.k.listeners["agent"],
                                   options=[("grpc.use_local_subchannel_pool", 1)])
        self.addCleanup(ch.close)
        rpc = ch.unary_unary(kaspb.METHOD_REGISTER,
                             request_serializer=kaspb.registrar_rpc.RegisterRequest.SerializeToString,
                             response_deserializer=kaspb.registrar_rpc.RegisterResponse.FromString)
        md = [("authorization", f"Bearer {self.tokens[agent_id]}")]

        def register(pod_id, pod_name=None):
            meta = kaspb.entity.AgentMeta(version="v17.0.0", pod_name=pod_name or f"pod-{pod_id}")
            return rpc(kaspb.registrar_rpc.RegisterRequest(agent_meta=meta, pod_id=pod_id), metadata=md,
                       timeout=10)
        return register

    def test_pods_per_connection_and_per_agent(self):
        refused_conn0 = metric(self.k, "kasd_agent_pods_refused_total", limit="pods_per_connection")
        refused_agent0 = metric(self.k, "kasd_agent_pods_refused_total", limit="pods_per_agent")
        a = self.channel(1)
        for pod in range(1, self.PER_CONN + 1):
            a(pod)
        with self.assertRaises(grpc.RpcError) as cm:
            a(100)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertIn("limits.pods_per_connection", cm.exception.details())
        a(1)  # the pods already registered stay and may register again
        b = self.channel(1)
        for pod in range(11, 11 + self.PER_AGENT - self.PER_CONN):
            b(pod)
        with self.assertRaises(grpc.RpcError) as cm:
            b(200)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertIn("limits.pods_per_agent", cm.exception.details())
        # nothing was evicted: all five are advertised, the refused ones are not
        got = wait_until(lambda: {e.connection_id for e in self.gl.get_connected_agents(agent_id=1).agents}
                         == {1, 2, 3, 11, 12}, 5)
        self.assertTrue(got, self.gl.get_connected_agents(agent_id=1))
        # another agent has its own budget
        self.channel(2)(1)
        self.assertEqual(metric(self.k, "kasd_agent_pods_refused_total", limit="pods_per_connection"),
                         refused_conn0 + 1)
        self.assertEqual(metric(self.k, "kasd_agent_pods_refused_total", limit="pods_per_agent"),
                         refused_agent0 + 1)

    def test_agent_meta_max_size(self):
        # limits.agent_meta_max_size (1 MiB here): a Register whose AgentMeta is larger is refused,
        # naming the key, and nothing of it reaches Redis; one at the limit's edge is accepted.
        refused0 = metric(self.k, "kasd_agent_pods_refused_total", limit="agent_meta_max_size")
        reg = self.channel(2)
        with self.assertRaises(grpc.RpcError) as cm:
            reg(77, pod_name="x" * (1 << 20))
        self.assertEqual(cm.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertIn("limits.agent_meta_max_size is 1048576", cm.exception.details())
        self.assertEqual(metric(self.k, "kasd_agent_pods_refused_total", limit="agent_meta_max_size"), refused0 + 1)
        reg(78, pod_name="y" * ((1 << 20) - 64))
        ids = wait_until(lambda: {e.connection_id for e in self.gl.get_connected_agents(agent_id=2).agents} >= {78}, 5)
        self.assertTrue(ids)
        self.assertNotIn(77, {e.connection_id for e in self.gl.get_connected_agents(agent_id=2).agents})

    def test_get_connected_agents_capped_below_the_message_limit(self):
        # Five pods of agent 3 with 900 KB AgentMeta each: 4.5 MB of entries in Redis, more than a
        # gRPC client receives by default (4 MiB). The answer holds what fits, says so, and is OK.
        regs = [self.channel(3) for _ in range(2)]
        for pod in range(1, 6):
            regs[pod % 2](pod, pod_name=f"{pod}-" + "n" * 900_000)
        self.assertTrue(wait_until(lambda: self.redis.cmd("HLEN", "gitlab-kas:{a:3}:conns") == 5, 5))
        ch = grpc.insecure_channel("%s:%d" % self.k.listeners["api"])  # grpcio's default limits
        self.addCleanup(ch.close)
        rpc = ch.unary_unary(kaspb.METHOD_GET_CONNECTED_AGENTS,
                             request_serializer=kaspb.tracker_rpc.GetConnectedAgentsRequest.SerializeToString,
                             response_deserializer=kaspb.tracker_rpc.GetConnectedAgentsResponse.FromString)
        before = metric(self.k, "kasd_get_connected_agents_truncated_total")
        resp, call = rpc.with_call(kaspb.tracker_rpc.GetConnectedAgentsRequest(agent_id=3),
                                   metadata=self.gl.metadata(), timeout=10)
        self.assertLessEqual(resp.ByteSize(), 4 << 20)
        self.assertEqual(len(resp.agents), 4, "as many entries as fit")
        self.assertIn(("kasd-truncated", "true"), list(call.trailing_metadata()))
        self.assertEqual(metric(self.k, "kasd_get_connected_agents_truncated_total"), before + 1)
        self.assertTrue(any(e.get("event") == "get_connected_agents_truncated" for e in self.k.events),
                        self.k.log())
        # an answer that fits carries no marker
        resp, call = rpc.with_call(kaspb.tracker_rpc.GetConnectedAgentsRequest(agent_id=2),
                                   metadata=self.gl.metadata(), timeout=10)
        self.assertNotIn("kasd-truncated", dict(call.trailing_metadata()))


class RedisErrors(unittest.TestCase):
    """kasd pointed at a Redis it cannot use: the reason is logged once, named with the address,
    /readiness says so, GetConnectedAgents answers UNAVAILABLE naming it, and local routing works."""

    def start(self, redis_section, files=None):
        d = tempfile.mkdtemp(prefix="kasd-redis-err-")
        for name, content in (files or {}).items():
            with open(os.path.join(d, name), "w") as f:
                f.write(content)
        self.token = base64.urlsafe_b64encode(os.urandom(24)).decode()
        write_tokens(os.path.join(d, "tokens.yaml"), {1: (self.token, 2)})
        self.secret = gitlab_client.generate_secret()
        gitlab_client.write_secret(os.path.join(d, "api-secret"), self.secret)
        k = Kasd(config=service_config(d, redis_section.replace("DIR", d) + "\nlimits:\n  shutdown_grace: 2s\n"))
        self.addCleanup(k.kill)
        self.assertTrue(k.started, k.log())
        return k

    def check(self, k, address, reason):
        self.assertTrue(k.wait_event("redis_down", 10), k.log())
        downs = [e for e in k.events if e.get("event") == "redis_down"]
        self.assertTrue(downs and all(reason in e.get("reason", "") and address in e.get("reason", "")
                                      for e in downs), downs)
        time.sleep(1.0)  # retries are counted, not logged again
        self.assertLessEqual(len([e for e in k.events if e.get("event") == "redis_down"]), 2)
        self.assertEqual(readiness(k), 503)
        gl = GitLabClient("%s:%d" % k.listeners["api"], self.secret)
        try:
            with self.assertRaises(grpc.RpcError) as cm:
                gl.get_connected_agents(agent_id=1, timeout=5)
            self.assertEqual(cm.exception.code(), grpc.StatusCode.UNAVAILABLE)
            self.assertIn(address, cm.exception.details())
            self.assertIn(reason, cm.exception.details())
            # routing through a tunnel held here does not need Redis
            a = AgentK("%s:%d" % k.listeners["agent"], self.token, pods=1, idle=1)
            a.start()
            try:
                a.wait_for(lambda s: s["tunnels_idle"] >= 1, timeout=15)
                data, _ = gl.unary("/test.Echo/Unary", b"no redis needed", agent_id=1, timeout=10)
                self.assertEqual(data, b"no redis needed")
            finally:
                a.stop(2)
        finally:
            gl.close()
        self.assertEqual(k.stop(), 0, k.log())

    def test_redis_refusing_writes_backs_off_then_converges(self):
        """Redis out of memory (noeviction): writes fail, and the shard re-syncs with backoff
        instead of rewriting everything every heartbeat; once Redis has room, it converges."""
        r = RedisServer(extra_args=["--maxmemory-policy", "noeviction"])
        self.addCleanup(r.kill)
        k = self.start(f"redis:\n  server:\n    address: {r.address}\n  heartbeat_interval: 200ms\n"
                       f"  instance_ttl: 5s")
        self.assertTrue(k.wait_event("redis_up", 10), k.log())
        r.cmd("CONFIG", "SET", "maxmemory", "1")  # always over the limit: every write is refused (OOM)
        a = AgentK("%s:%d" % k.listeners["agent"], self.token, pods=1, idle=1)
        a.start()
        try:
            a.wait_for(lambda s: s["registers"] >= 1, timeout=15)
            time.sleep(4.0)  # 20 heartbeat ticks
            # per shard: the first one, then retries after 0, 1, 2, 4, 8 ... ticks: about 6 in 20
            # ticks, not 20 (a full rewrite per tick would add to an overloaded Redis)
            for shard in (0, 1):
                n = len([e for e in k.events if e.get("event") == "redis_resync" and e.get("shard") == shard])
                self.assertLessEqual(n, 8, k.log())
            self.assertTrue(k.wait_event("redis_write_failed", 1), k.log())
            r.cmd("CONFIG", "SET", "maxmemory", "0")
            self.assertTrue(wait_until(lambda: r.cmd("HLEN", "gitlab-kas:{a:1}:conns") == 1, 15), k.log())
        finally:
            a.stop(2)
        self.assertEqual(k.stop(), 0, k.log())

    def test_wrong_password(self):
        r = RedisServer(extra_args=["--requirepass", "right-password"])
        self.addCleanup(r.kill)
        k = self.start(f"redis:\n  server:\n    address: {r.address}\n  password_file: DIR/redis-password",
                       files={"redis-password": "wrong-password\n"})
        self.check(k, r.address, "authentication failed")

    def test_sentinel_failover(self):
        """kasd behind Sentinel: its agents are in the master; after a failover it follows the
        new master, where the replicated entries are re-synced and new agents are written."""
        def replication(server):
            # a replica being reconfigured by the Sentinel may drop a client connection: that is
            # "not yet", not a failure
            try:
                return server.cmd("INFO", "replication")
            except OSError:
                return b""
        master = RedisServer()
        self.addCleanup(master.kill)
        replica = RedisServer(extra_args=["--replicaof", "127.0.0.1", str(master.port)])
        self.addCleanup(replica.kill)
        self.assertTrue(wait_until(lambda: b"master_link_status:up" in replication(replica), 15))
        sentinel = RedisServer(sentinel_conf=f"sentinel monitor m1 127.0.0.1 {master.port} 1\n"
                                             "sentinel down-after-milliseconds m1 1000\n"
                                             "sentinel failover-timeout m1 5000\n")
        self.addCleanup(sentinel.kill)
        self.assertTrue(wait_until(lambda: sentinel.cmd("SENTINEL", "get-master-addr-by-name", "m1"), 15))
        k = self.start(f"redis:\n  sentinel:\n    master_name: m1\n    addresses: [{sentinel.address}]\n"
                       "  heartbeat_interval: 300ms\n  instance_ttl: 3s\n  read_timeout: 2s\n")
        self.assertTrue(k.wait_event("redis_up", 10), k.log())
        a = AgentK("%s:%d" % k.listeners["agent"], self.token, pods=1, idle=1)
        a.start()
        gl = GitLabClient("%s:%d" % k.listeners["api"], self.secret)
        try:
            a.wait_for(lambda s: s["registers"] >= 1, timeout=15)
            self.assertTrue(wait_until(lambda: master.cmd("HLEN", "gitlab-kas:{a:1}:conns") == 1, 10))
            self.assertTrue(wait_until(lambda: sentinel.cmd("SENTINEL", "replicas", "m1"), 15))
            ok = wait_until(lambda: self._failover(sentinel), 20, step=0.3)
            self.assertTrue(ok, "SENTINEL FAILOVER refused")
            # kasd follows: its shards reconnect to the promoted replica and re-sync there
            self.assertTrue(wait_until(lambda: b"role:master" in replication(replica), 20))
            self.assertTrue(wait_until(lambda: len([e for e in k.events if e.get("event") == "redis_up"
                                                    and e.get("address") == replica.address]) >= 2, 20), k.log())
            self.assertTrue(wait_until(lambda: len(gl.get_connected_agents(agent_id=1, timeout=5).agents) == 1, 10))
            # a pod that registers now is written to the new master
            b = AgentK("%s:%d" % k.listeners["agent"], self.token, pods=1, idle=1)
            b.start()
            try:
                b.wait_for(lambda s: s["registers"] >= 1, timeout=15)
                self.assertTrue(wait_until(lambda: replica.cmd("HLEN", "gitlab-kas:{a:1}:conns") == 2, 10))
                self.assertTrue(wait_until(
                    lambda: len(gl.get_connected_agents(agent_id=1, timeout=5).agents) == 2, 10))
            finally:
                b.stop(2)
        finally:
            gl.close()
            a.stop(2)
        self.assertEqual(k.stop(), 0, k.log())

    @staticmethod
    def _failover(sentinel):
        try:
            return sentinel.cmd("SENTINEL", "FAILOVER", "m1") == b"OK"
        except Exception:  # noqa: BLE001 - "NOGOODSLAVE" until the sentinel knows the replica
            return False

    def test_unreachable(self):
        from redis_fixture import free_port
        address = f"127.0.0.1:{free_port()}"
        k = self.start(f"redis:\n  server:\n    address: {address}\n  dial_timeout: 1s")
        self.check(k, address, "connection refused")


if __name__ == "__main__":
    unittest.main()
