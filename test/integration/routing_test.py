"""Agents, reverse tunnels and routed calls on one kasd instance, with real clients:
agentk.py (python agentk emulator over grpcio) on the agent listener and gitlab_client.py
(JWT-signed grpcio calls) on the api listener. kasd runs with 2 shards, so agent connections are
handed to their owner shard and most calls cross shards."""
import base64
import os
import signal
import sys
import tempfile
import threading
import time
import unittest

import grpc

sys.path.insert(0, os.path.dirname(__file__))
import gitlab_client  # noqa: E402
from agentk import AgentK  # noqa: E402
from gitlab_client import GitLabClient, collect, make_jwt  # noqa: E402
from kasd_harness import Kasd, metric, wait_until  # noqa: E402

NAGENTS = 6     # connected for the whole class
SPARE = (7, 8, 9)  # in the token file, connected by single tests only


def who_handler(agent_id):
    """/test.Echo/Who answers the agent's own id: proves which agent served a call."""
    def handle(call):
        for _ in call:
            pass
        call.send_header({})
        call.send_message(str(agent_id).encode())
        call.send_trailer({})
    return handle


class Routing(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="kasd-routing-")
        cls.tokens = {i: base64.urlsafe_b64encode(os.urandom(24)).decode()
                      for i in range(1, NAGENTS + 1 + len(SPARE))}
        with open(os.path.join(cls.dir, "tokens.yaml"), "w") as f:
            f.write("agents:\n")
            for i, t in cls.tokens.items():
                f.write(f"  - token: \"{t}\"\n    agent_id: {i}\n    project_id: {100 + i}\n"
                        f"    agent_name: agent-{i}\n")
        cls.secret = gitlab_client.generate_secret()
        gitlab_client.write_secret(os.path.join(cls.dir, "api-secret"), cls.secret)
        cfg = f"""\
shards: 2
agent:
  listen:
    address: 127.0.0.1:0
  token_file: {cls.dir}/tokens.yaml
api:
  listen:
    address: 127.0.0.1:0
    authentication_secret_file: {cls.dir}/api-secret
private_api:
  listen:
    address: 127.0.0.1:0
observability:
  listen:
    address: 127.0.0.1:0
limits:
  routing_timeout: 2s
  shutdown_grace: 3s
"""
        cls.kasd = Kasd(config=cfg)
        assert cls.kasd.started, cls.kasd.log()
        cls.agent_addr = "%s:%d" % cls.kasd.listeners["agent"]
        cls.api_addr = "%s:%d" % cls.kasd.listeners["api"]
        cls.agents = {}
        for i in range(1, NAGENTS + 1):
            a = AgentK(cls.agent_addr, cls.tokens[i], pods=2 if i == 1 else 1, idle=2,
                       handlers={"/test.Echo/Who": who_handler(i)})
            cls.agents[i] = a.start()
        for a in cls.agents.values():
            a.wait_for(lambda s: s["tunnels_idle"] >= 2 * len(a.pods) and s["registers"] >= len(a.pods),
                       timeout=15)
        cls.gl = GitLabClient(cls.api_addr, cls.secret)

    @classmethod
    def tearDownClass(cls):
        cls.gl.close()
        for a in cls.agents.values():
            a.stop(2)
        rc = cls.kasd.stop()
        cls.kasd.kill()
        assert rc == 0, f"exit code {rc}\n" + cls.kasd.log()

    # --- calls ---

    def test_unary(self):
        data, call = self.gl.unary("/test.Echo/Unary", b"hello", agent_id=1, timeout=10)
        self.assertEqual(data, b"hello")
        trailers = dict(call.trailing_metadata())
        self.assertEqual(trailers.get("x-echo-count"), "1")

    def test_message_just_under_the_limit_round_trips(self):
        # 4 MiB - 1 bytes, the largest message limits.grpc_max_message_size (default 4 MiB)
        # allows: wrapped in the tunnel's ConnectResponse/ConnectRequest Message it grows by a
        # few bytes, and must still reach the agent and come back.
        big = os.urandom((4 << 20) - 1)
        data, _ = self.gl.unary("/test.Echo/Unary", big, agent_id=5, timeout=30)
        self.assertEqual(len(data), len(big))
        self.assertEqual(data, big)

    def test_message_over_the_limit_resource_exhausted(self):
        big = b"x" * ((4 << 20) + 1)
        with self.assertRaises(grpc.RpcError) as cm:
            self.gl.unary("/test.Echo/Unary", big, agent_id=5, timeout=30)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED, cm.exception.details())
        self.assertIn("limits.grpc_max_message_size", cm.exception.details())
        # the agent's tunnels are unharmed: the next call works
        data, _ = self.gl.unary("/test.Echo/Unary", b"after", agent_id=5, timeout=10)
        self.assertEqual(data, b"after")

    def test_agent_answer_over_the_limit_resource_exhausted(self):
        # The agent answers a message larger than the limit: the caller is told why, not
        # "agent disconnected".
        def handle(call):
            for _ in call:
                pass
            call.send_header({})
            call.send_message(b"y" * ((4 << 20) + 1))
            call.send_trailer({})
        a = AgentK(self.agent_addr, self.tokens[SPARE[2]], idle=2, handlers={"/test.Big/Answer": handle})
        a.start()
        try:
            a.wait_for(lambda s: s["tunnels_idle"] >= 2, timeout=10)
            with self.assertRaises(grpc.RpcError) as cm:
                self.gl.unary("/test.Big/Answer", b"", agent_id=SPARE[2], timeout=30)
            self.assertEqual(cm.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED,
                             cm.exception.details())
            self.assertIn("limits.grpc_max_message_size", cm.exception.details())
        finally:
            a.stop(5)

    def test_client_streaming_unary_handler(self):
        data, _ = self.gl.client_stream("/test.Echo/Unary", [b"a"], agent_id=2, timeout=10)
        self.assertEqual(data, b"a")

    def test_bidi_streaming_large(self):
        chunks = [os.urandom(64 * 1024) for _ in range(80)]  # 5 MiB each way
        res = collect(self.gl.stream("/test.Echo/Stream", iter(chunks), agent_id=3, timeout=60))
        self.assertEqual(res.code, grpc.StatusCode.OK, res.details)
        self.assertEqual(b"".join(res.messages), b"".join(chunks))
        self.assertIn(("x-echo-count", "80"), res.trailing_metadata)

    def test_calls_after_idle_memory_is_given_back(self):
        # A quiet shard drops its receive buffers' pages and a quiet connection its HTTP/2 output
        # buffer's pages (docs/architecture.md, "Memory while quiet"). Bytes must be intact after
        # both, and the memory must really go: RSS falls once the shed has happened.
        def sheds():
            return (metric(self.kasd, "kasd_shard_buffer_sheds_total"),
                    metric(self.kasd, "kasd_shard_quiet_sheds_total"))

        def rss_kib():
            with open(f"/proc/{self.kasd.proc.pid}/status") as f:
                return int(next(x for x in f if x.startswith("VmRSS:")).split()[1])

        for round_ in range(2):
            before = sheds()
            chunks = [os.urandom(64 * 1024) for _ in range(64)]  # 4 MiB each way: 256+ buffers
            res = collect(self.gl.stream("/test.Echo/Stream", iter(chunks), agent_id=6, timeout=60))
            self.assertEqual(res.code, grpc.StatusCode.OK, res.details)
            self.assertEqual(b"".join(res.messages), b"".join(chunks))
            loaded = rss_kib()
            after = wait_until(lambda: (lambda s: s if s[0] > before[0] and s[1] > before[1] else None)(sheds()),
                               timeout=10)
            self.assertIsNotNone(after, f"round {round_}: no shed within 10 s: {before} -> {sheds()}")
            shed = rss_kib()
            self.assertLess(shed, loaded - 1024, f"round {round_}: RSS {loaded} -> {shed} KiB after the shed")
        # after the sheds: every agent still answers, with its own id, and large bodies are intact
        for i in range(1, NAGENTS + 1):
            data, _ = self.gl.unary("/test.Echo/Who", b"", agent_id=i, timeout=10)
            self.assertEqual(data, str(i).encode())
        big = os.urandom(3 << 20)
        data, _ = self.gl.unary("/test.Echo/Unary", big, agent_id=6, timeout=30)
        self.assertEqual(data, big)

    def test_server_streaming(self):
        res = collect(self.gl.server_stream("/test.Echo/Stream", b"one", agent_id=4, timeout=10))
        self.assertEqual(res.code, grpc.StatusCode.OK, res.details)
        self.assertEqual(res.messages, [b"one"])

    def test_metadata_round_trip(self):
        data, call = self.gl.unary("/test.Echo/Meta", b"", agent_id=1, timeout=10,
                                   metadata=(("x-foo", "bar"), ("x-echo-tag", "t1"),
                                             ("x-raw-bin", b"\x00\xffbin")))
        lines = dict(l.split(b"=", 1) for l in data.splitlines())
        self.assertEqual(lines[b"x-foo"], b"bar")
        self.assertEqual(lines[b"x-raw-bin"], b"\x00\xffbin", "-bin values reach the agent as raw bytes")
        for k in lines:
            self.assertFalse(k.startswith(b"kas-hop-"), k)
            self.assertNotEqual(k, b"authorization")
        # the agent's header metadata comes back to the caller
        self.assertIn(("x-echo-tag", "t1"), list(call.initial_metadata()))

    def test_64k_of_metadata_reaches_the_agent(self):
        """grpc-go/grpcio callers keep to the MAX_HEADER_LIST_SIZE kasd advertises: 64 KiB of
        metadata must fit (it was 16 KiB), reach the agent whole, and more than the limit
        (1 MiB) fails cleanly with RESOURCE_EXHAUSTED."""
        md = tuple((f"x-big-{i}", chr(ord("a") + i) * 8192) for i in range(8))
        data, _ = self.gl.unary("/test.Echo/Meta", b"", agent_id=2, timeout=10, metadata=md)
        lines = dict(l.split(b"=", 1) for l in data.splitlines())
        for k, v in md:
            self.assertEqual(lines.get(k.encode()), v.encode(), k)
        with self.assertRaises(grpc.RpcError) as cm:
            self.gl.unary("/test.Echo/Meta", b"", agent_id=2, timeout=10,
                          metadata=tuple((f"x-big-{i}", "v" * 60000) for i in range(20)))
        self.assertEqual(cm.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        data, _ = self.gl.unary("/test.Echo/Who", b"", agent_id=2, timeout=10)
        self.assertEqual(data, b"2")

    def test_agent_error_passes_through(self):
        with self.assertRaises(grpc.RpcError) as cm:
            self.gl.unary("/test.Echo/Fail", b"", agent_id=2, timeout=10)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.FAILED_PRECONDITION)
        self.assertEqual(cm.exception.details(), "failed by agent")

    def test_many_agents_never_misrouted(self):
        import concurrent.futures
        futs = []
        with concurrent.futures.ThreadPoolExecutor(16) as ex:
            for rnd in range(10):
                for i in range(1, NAGENTS + 1):
                    futs.append((i, ex.submit(self.gl.unary, "/test.Echo/Who", b"", agent_id=i, timeout=20)))
            for i, f in futs:
                data, _ = f.result()
                self.assertEqual(data, str(i).encode())

    def test_unknown_method_for_agent_waits_then_deadline(self):
        t0 = time.monotonic()
        with self.assertRaises(grpc.RpcError) as cm:
            self.gl.unary("/test.Echo/NotServed", b"", agent_id=1, timeout=10)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.DEADLINE_EXCEEDED)
        self.assertIn("agent connection not found", cm.exception.details())
        # kasd's own answer (the message), well before the caller's 10 s deadline: the cap applied.
        # Generous bound: sanitizer builds on a loaded 2-core machine are slow.
        self.assertLess(time.monotonic() - t0, 9.5, "capped by limits.routing_timeout (2s)")

    def test_unknown_agent_deadline_exceeded(self):
        with self.assertRaises(grpc.RpcError) as cm:
            self.gl.unary("/test.Echo/Unary", b"", agent_id=999, timeout=10)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.DEADLINE_EXCEEDED)
        self.assertIn("agent connection not found", cm.exception.details())

    def test_waiting_call_woken_when_agent_connects(self):
        late = AgentK(self.agent_addr, self.tokens[7], pods=1, idle=2, handlers={"/test.Echo/Late": who_handler(7)})
        result = {}

        def call():
            try:
                result["data"], _ = self.gl.unary("/test.Echo/Late", b"", agent_id=7, timeout=10)
            except grpc.RpcError as e:
                result["err"] = e
        th = threading.Thread(target=call)
        th.start()
        time.sleep(0.5)  # the call is waiting on the owner shard now
        t0 = time.monotonic()
        late.start()
        th.join(10)
        late.stop(2)
        self.assertNotIn("err", result, result.get("err"))
        self.assertEqual(result["data"], b"7")
        self.assertLess(time.monotonic() - t0, 5, "woken by the tunnel's arrival")

    def test_caller_cancel_reaches_agent(self):
        a = self.agents[5]
        before = a.stats["calls_cancelled"]
        call = self.gl.stream("/test.Echo/Slow", iter([b"30"]), agent_id=5, timeout=60)
        a.wait_for(lambda s: s["calls_by_method"].get("/test.Echo/Slow", 0) >= 1, timeout=10)
        call.cancel()
        a.wait_for(lambda s: s["calls_cancelled"] > before, timeout=10)

    def test_agent_killed_mid_call_unavailable(self):
        victim = AgentK(self.agent_addr, self.tokens[8], pods=1, idle=1)
        victim.start()
        victim.wait_for(lambda s: s["tunnels_idle"] >= 1, timeout=10)
        call = self.gl.stream("/test.Echo/Slow", iter([b"30"]), agent_id=8, timeout=30)
        victim.wait_for(lambda s: s["calls_started"] >= 1, timeout=10)
        victim.kill()
        res = collect(call)
        self.assertEqual(res.code, grpc.StatusCode.UNAVAILABLE, res)

    # --- routing metadata and auth ---

    def test_invalid_agent_ids(self):
        for bad in (None, "abc", "-1", "0", ["1", "2"], "12x", ""):
            with self.assertRaises(grpc.RpcError, msg=repr(bad)) as cm:
                self.gl.unary("/test.Echo/Unary", b"", agent_id=bad, timeout=5)
            self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT, repr(bad))

    def test_jwt_algorithms_accepted(self):
        for alg in ("HS256", "HS384", "HS512"):
            auth = "Bearer " + make_jwt(self.secret, alg=alg)
            data, _ = self.gl.unary("/test.Echo/Unary", b"x", agent_id=1, timeout=10, auth=auth)
            self.assertEqual(data, b"x")

    def test_bad_jwts_unauthenticated(self):
        now = int(time.time())
        bad = {
            "none": False,
            "garbage": "Bearer garbage",
            "not bearer": "Basic " + make_jwt(self.secret),
            "wrong secret": "Bearer " + make_jwt(os.urandom(32)),
            "expired": "Bearer " + make_jwt(self.secret, now=now - 3600, ttl=60),
            "not yet valid": "Bearer " + make_jwt(self.secret, now=now + 3600, ttl=60),
            "wrong audience": "Bearer " + make_jwt(self.secret, aud="someone-else"),
            # make_jwt builds unsigned tokens on purpose; if it cannot, the test must say so
            "alg none": "Bearer " + make_jwt(self.secret, alg="none"),
        }
        for name, auth in bad.items():
            with self.assertRaises(grpc.RpcError, msg=name) as cm:
                self.gl.unary("/test.Echo/Unary", b"", agent_id=1, timeout=5, auth=auth)
            self.assertEqual(cm.exception.code(), grpc.StatusCode.UNAUTHENTICATED, name)
        self.assertNotIn(self.secret.hex(), self.kasd.log())

    def test_bad_agent_token_unauthenticated(self):
        a = AgentK(self.agent_addr, "not-a-token-0123456789", pods=1, idle=1, backoff=(5, 5))
        a.start()
        try:
            s = a.wait_for(lambda s: s["register_errors"].get("UNAUTHENTICATED", 0) >= 1
                           or s["tunnel_end_codes"].get("UNAUTHENTICATED", 0) >= 1, timeout=10)
            self.assertEqual(s["calls_started"], 0)
        finally:
            a.kill()
        self.assertNotIn("not-a-token-0123456789", self.kasd.log(), "tokens are never logged")

    def test_agent_protocol_violation_ends_only_that_tunnel(self):
        bad = AgentK(self.agent_addr, self.tokens[4], pods=1, idle=1, violation="message_before_descriptor",
                     backoff=(5, 5))
        bad.start()
        try:
            bad.wait_for(lambda s: s["tunnel_end_codes"].get("INVALID_ARGUMENT", 0) >= 1, timeout=10)
        finally:
            bad.kill()
        # the agent's good tunnels still serve
        data, _ = self.gl.unary("/test.Echo/Who", b"", agent_id=4, timeout=10)
        self.assertEqual(data, b"4")
        self.assertIn("tunnel_protocol_violation", self.kasd.log())

    def test_agent_violations_during_a_call_fail_that_call_only(self):
        for mode in ("header_twice", "message_before_header", "message_after_trailer"):
            bad = AgentK(self.agent_addr, self.tokens[9], pods=1, idle=1, violation=mode, backoff=(5, 5))
            bad.start()
            try:
                bad.wait_for(lambda s: s["tunnels_idle"] >= 1, timeout=10)
                res = collect(self.gl.stream("/test.Echo/Stream", iter([b"x"]), agent_id=9, timeout=10))
                if mode == "message_after_trailer":
                    # the call completed before the extra message; only the tunnel is ended
                    self.assertEqual(res.code, grpc.StatusCode.OK, (mode, res))
                else:
                    self.assertEqual(res.code, grpc.StatusCode.UNAVAILABLE, (mode, res))
                    self.assertIn("protocol", res.details, mode)
            finally:
                bad.kill()
        data, _ = self.gl.unary("/test.Echo/Who", b"", agent_id=3, timeout=10)
        self.assertEqual(data, b"3", "other agents are untouched")

    def test_agent_socket_dropped_with_live_tunnels(self):
        """An agent whose TCP connection vanishes (no RST_STREAM, no GOAWAY) while its tunnels are
        open: kasd ends them and carries on."""
        import socket
        import struct

        def frame(t, flags, sid, payload=b""):
            return struct.pack(">I", len(payload))[1:] + bytes([t, flags]) + struct.pack(">I", sid) + payload

        def lit(n, v):
            n, v = n.encode(), v.encode()
            return b"\x00" + bytes([len(n)]) + n + (bytes([len(v)]) if len(v) < 127 else
                                                     bytes([127, len(v) - 127])) + v
        hdrs = b"".join(lit(n, v) for n, v in [
            (":method", "POST"), (":scheme", "http"), (":authority", "kasd"),
            (":path", "/gitlab.agent.reverse_tunnel.rpc.ReverseTunnel/Connect"),
            ("content-type", "application/grpc"), ("te", "trailers"),
            ("authorization", "Bearer " + self.tokens[9])])
        desc = bytes.fromhex("0a0e0a0c0a0a0a03612e4212030a014d")  # descriptor{agent_descriptor{a.B/M}}
        for _ in range(3):
            s = socket.create_connection(self.kasd.listeners["agent"], timeout=5)
            body = b"".join(frame(1, 4, sid, hdrs) + frame(0, 0, sid, b"\x00" + struct.pack(">I", len(desc)) + desc)
                            for sid in (1, 3, 5))
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0) + body)
            time.sleep(0.3)
            s.close()  # abrupt: the tunnels die with the socket
        time.sleep(0.3)
        self.assertIsNone(self.kasd.proc.poll(), "kasd must survive:\n" + self.kasd.log())
        data, _ = self.gl.unary("/test.Echo/Who", b"", agent_id=2, timeout=10)
        self.assertEqual(data, b"2")

    def test_health_on_every_listener(self):
        for name in ("agent", "api", "private_api"):
            with grpc.insecure_channel("%s:%d" % self.kasd.listeners[name]) as ch:
                self.assertEqual(ch.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=5), b"\x08\x01")


class Compressed(unittest.TestCase):
    """A gzip agent (as real agentk) and gzip, deflate and identity callers, routed through kasd:
    compression is per hop, so every combination gives the same bytes."""

    def test_gzip_agent_any_caller(self):
        d = tempfile.mkdtemp(prefix="kasd-routing-gz-")
        token = base64.urlsafe_b64encode(os.urandom(24)).decode()
        with open(os.path.join(d, "tokens.yaml"), "w") as f:
            f.write(f"agents:\n  - token: \"{token}\"\n    agent_id: 5\n    project_id: 105\n"
                    f"    agent_name: agent-5\n")
        secret = gitlab_client.generate_secret()
        gitlab_client.write_secret(os.path.join(d, "api-secret"), secret)
        for resp in ("identity", "gzip"):
            cfg = f"""\
shards: 2
agent:
  listen:
    address: 127.0.0.1:0
  token_file: {d}/tokens.yaml
api:
  listen:
    address: 127.0.0.1:0
    authentication_secret_file: {d}/api-secret
private_api:
  listen:
    address: 127.0.0.1:0
observability:
  listen:
    address: 127.0.0.1:0
grpc:
  response_compression: {resp}
limits:
  routing_timeout: 2s
  shutdown_grace: 3s
"""
            kasd = Kasd(config=cfg)
            self.assertTrue(kasd.started, kasd.log())
            agent = AgentK("%s:%d" % kasd.listeners["agent"], token, idle=2,
                           compression=grpc.Compression.Gzip).start()
            try:
                agent.wait_for(lambda s: s["tunnels_idle"] >= 2 and s["registers"] >= 1, timeout=15)
                api = "%s:%d" % kasd.listeners["api"]
                # grpc.default_compression_algorithm: 0 identity, 1 deflate, 2 gzip
                for alg in (0, 2, 1):
                    with self.subTest(response=resp, caller=alg):
                        gl = GitLabClient(api, secret, options=[("grpc.default_compression_algorithm", alg)])
                        try:
                            data = b"kas" * 30000 + os.urandom(1000)
                            got, _ = gl.unary("/test.Echo/Unary", data, agent_id=5, timeout=10)
                            self.assertEqual(got, data)
                            chunks = [os.urandom(20000) + b"z" * 40000 for _ in range(20)]
                            res = collect(gl.stream("/test.Echo/Stream", iter(chunks), agent_id=5, timeout=30))
                            self.assertEqual(res.code, grpc.StatusCode.OK, res.details)
                            self.assertEqual(b"".join(res.messages), b"".join(chunks))
                            # per hop: the agent never sees the caller's encoding headers
                            meta, _ = gl.unary("/test.Echo/Meta", b"", agent_id=5, timeout=10,
                                               metadata=(("x-foo", "bar"),))
                            keys = [l.split(b"=", 1)[0] for l in meta.splitlines()]
                            self.assertIn(b"x-foo", keys)
                            self.assertNotIn(b"grpc-encoding", keys)
                            self.assertNotIn(b"grpc-accept-encoding", keys)
                        finally:
                            gl.close()
            finally:
                agent.stop(2)
                rc = kasd.stop()
                kasd.kill()
            self.assertEqual(rc, 0, kasd.log())


class Reload(unittest.TestCase):
    def test_sighup_reloads_tokens(self):
        d = tempfile.mkdtemp(prefix="kasd-reload-")
        path = os.path.join(d, "tokens.yaml")
        old, new = "old-token-0123456789abcdef", "new-token-0123456789abcdef"
        with open(path, "w") as f:
            f.write(f"agents:\n  - token: \"{old}\"\n    agent_id: 7\n    project_id: 1\n    agent_name: a\n")
        cfg = f"shards: 2\nagent:\n  listen:\n    address: 127.0.0.1:0\n  token_file: {path}\n" \
              "api:\n  listen:\n    address: 127.0.0.1:0\nprivate_api:\n  listen:\n    address: 127.0.0.1:0\n" \
              "observability:\n  listen:\n    address: 127.0.0.1:0\n"
        k = Kasd(config=cfg)
        self.addCleanup(k.kill)
        self.assertTrue(k.started, k.log())
        addr = "%s:%d" % k.listeners["agent"]

        def register(token):
            with grpc.insecure_channel(addr) as ch:
                try:
                    ch.unary_unary("/gitlab.agent.agent_registrar.rpc.AgentRegistrar/Register")(
                        b"", timeout=5, metadata=(("authorization", "Bearer " + token),))
                    return grpc.StatusCode.OK
                except grpc.RpcError as e:
                    return e.code()
        self.assertEqual(register(old), grpc.StatusCode.OK, k.log())
        self.assertEqual(register(new), grpc.StatusCode.UNAUTHENTICATED, k.log())
        with open(path, "w") as f:
            f.write(f"agents:\n  - token: \"{new}\"\n    agent_id: 7\n    project_id: 1\n    agent_name: a\n")
        k.signal(signal.SIGHUP)
        k.wait_event("tokens_reloaded", 10)
        self.assertEqual(register(new), grpc.StatusCode.OK, k.log())
        self.assertEqual(register(old), grpc.StatusCode.UNAUTHENTICATED, "a revoked token stops working\n" + k.log())
        self.assertEqual(k.stop(), 0)


if __name__ == "__main__":
    result = unittest.main(exit=False, verbosity=2).result
    failed = len(result.failures) + len(result.errors)
    print(f"{result.testsRun - failed - len(result.skipped)} passed, {failed} failed, "
          f"{len(result.skipped)} skipped")
    sys.exit(1 if failed else 0)
