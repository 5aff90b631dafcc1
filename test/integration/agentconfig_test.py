"""AgentConfiguration/GetConfiguration (docs/agents.md): a real kasd with a token file and an
agent.configuration_dir, a grpcio client playing agentk, and GetConnectedAgents on the api listener
(embedded Redis) for the skip_register cases."""
import base64
import hashlib
import os
import queue
import re
import signal
import sys
import tempfile
import threading
import time
import unittest

import grpc

sys.path.insert(0, os.path.dirname(__file__))
import gitlab_client  # noqa: E402
import kaspb  # noqa: E402
from gitlab_client import GitLabClient  # noqa: E402
from kasd_harness import Kasd, metric, service_config, write_tokens, wait_until  # noqa: E402

URL = "https://gitlab.example.com"
PROJECT = 77
NOTHING = object()


class Stream:
    """One GetConfiguration call, its responses collected by a thread into a queue."""

    def __init__(self, addr, token, commit_id="", skip_register=True, meta=None, options=()):
        # One connection per stream: grpcio would otherwise share a connection between channels,
        # and kasd binds a connection to the first agent that authenticates on it.
        self.channel = grpc.insecure_channel(addr, options=[("grpc.use_local_subchannel_pool", 1),
                                                            *options])
        rpc = self.channel.unary_stream(
            kaspb.METHOD_GET_CONFIGURATION,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=kaspb.agent_configuration_rpc.ConfigurationResponse.FromString)
        req = kaspb.agent_configuration_rpc.ConfigurationRequest(commit_id=commit_id,
                                                                 skip_register=skip_register)
        if meta is not None:
            req.agent_meta.CopyFrom(meta)
        self.call = rpc(req, metadata=[("authorization", f"Bearer {token}")], timeout=60)
        self.q = queue.Queue()
        self.error = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for resp in self.call:
                self.q.put(resp)
        except grpc.RpcError as e:
            self.error = e
        self.q.put(NOTHING)

    def next(self, timeout=5):
        try:
            v = self.q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no ConfigurationResponse within {timeout}s")
        if v is NOTHING:
            raise AssertionError(f"stream ended: {self.error}")
        return v

    def quiet(self, seconds):
        """True when nothing arrived (and the stream did not end) for `seconds`."""
        try:
            v = self.q.get(timeout=seconds)
        except queue.Empty:
            return True
        raise AssertionError(f"unexpected: {v if v is not NOTHING else self.error}")

    def close(self):
        self.call.cancel()
        self.channel.close()


def sha(data):
    return hashlib.sha256(data).hexdigest()


def empty_commit(agent_id):
    cfg = kaspb.agentcfg.AgentConfiguration(agent_id=agent_id, gitlab_external_url=URL)
    return sha(cfg.SerializeToString())



class AgentConfiguration(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="kasd-agentcfg-")
        cls.cfgdir = os.path.join(cls.dir, "agents")
        os.mkdir(cls.cfgdir)
        cls.tokens = {i: base64.urlsafe_b64encode(os.urandom(24)).decode() for i in range(1, 10)}
        write_tokens(os.path.join(cls.dir, "tokens.yaml"), {i: (t, PROJECT) for i, t in cls.tokens.items()})
        cls.secret = gitlab_client.generate_secret()
        gitlab_client.write_secret(os.path.join(cls.dir, "api-secret"), cls.secret)
        cls.write("agent-1.yaml", b"observability:\n  logging:\n    level: debug\n")
        cls.write("3.yaml", b"gitops: {}\n")  # agent 3 has a file by decimal id
        extra = f"gitlab:\n  external_url: {URL}\n"
        cfg = service_config(cls.dir, extra).replace(
            f"  token_file: {cls.dir}/tokens.yaml\n",
            f"  token_file: {cls.dir}/tokens.yaml\n  configuration_dir: {cls.cfgdir}\n")
        cls.kasd = Kasd(cfg)
        assert cls.kasd.started, cls.kasd.log()
        cls.addr = "%s:%d" % cls.kasd.listeners["agent"]
        cls.gl = GitLabClient("%s:%d" % cls.kasd.listeners["api"], cls.secret)
        cls.streams = []

    @classmethod
    def tearDownClass(cls):
        for s in cls.streams:
            s.close()
        cls.kasd.stop()

    @classmethod
    def write(cls, name, data):
        path = os.path.join(cls.cfgdir, name)
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        os.replace(path + ".tmp", path)
        return path

    def reloads(self):
        return sum(1 for e in list(self.kasd.events) if e.get("event") == "agent_configuration_reloaded")

    def put(self, name, data):
        """Write a file and wait for kasd's poll to load it (at most ~1 s later). A reload counted
        here may have read the directory just before the write (one the previous change started):
        one more poll period lets the reload that sees the file happen too."""
        before = self.reloads()
        path = self.write(name, data)
        self.assertTrue(wait_until(lambda: self.reloads() > before, 5), "no reload after writing " + name)
        time.sleep(1.2)
        return path

    def stream(self, agent_id, **kw):
        s = Stream(self.addr, self.tokens[agent_id], **kw)
        self.streams.append(s)
        return s

    def logged(self, pattern, timeout=5):
        rx = re.compile(pattern)
        return wait_until(lambda: any(rx.search(line) for line in self.kasd.lines), timeout)

    def connected(self, agent_id):
        return list(self.gl.get_connected_agents(agent_id=agent_id, timeout=5).agents)

    def test_config_at_once_then_only_on_change(self):
        body = b"observability:\n  logging:\n    level: debug\n"
        path = self.put("agent-1.yaml", body)
        s = self.stream(1)
        r = s.next()
        self.assertEqual(r.configuration.agent_id, 1)
        self.assertEqual(r.configuration.gitlab_external_url, URL)
        self.assertEqual(r.commit_id, sha(body))
        # Resuming with that commit_id: nothing is sent until the file changes.
        s2 = self.stream(1, commit_id=r.commit_id)
        self.assertTrue(s2.quiet(2.0))
        body2 = b"observability:\n  logging:\n    level: warn\n"
        with open(path, "wb") as f:  # edited in place (the poll notices size/mtime)
            f.write(body2)
        for st in (s, s2):
            r2 = st.next(timeout=5)
            self.assertEqual(r2.commit_id, sha(body2))
            self.assertEqual(r2.configuration.agent_id, 1)
        self.assertTrue(s.quiet(1.5))  # one push per change

    def test_sighup_reloads_what_the_poll_cannot_see(self):
        body = b"a: 1111\n"
        path = self.put("agent-5.yaml", body)
        s = self.stream(5)
        self.assertEqual(s.next().commit_id, sha(body))
        st = os.stat(path)
        body2 = b"a: 2222\n"  # same size; mtime restored below: invisible to the 1 s poll
        with open(path, "r+b") as f:
            f.write(body2)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        self.assertTrue(s.quiet(2.5))
        self.kasd.signal(signal.SIGHUP)
        self.assertEqual(s.next().commit_id, sha(body2))

    def test_invalid_yaml_keeps_previous_and_logs_position(self):
        body = b"ok: true\n"
        self.put("agent-6.yaml", body)
        s = self.stream(6)
        self.assertEqual(s.next().commit_id, sha(body))
        self.write("agent-6.yaml", b"ok: true\nlist: [1, 2\n")
        self.assertTrue(self.logged(r"agent-6\.yaml:\d+:\d+: YAML syntax error"), self.kasd.log())
        self.assertTrue(s.quiet(2.0))  # the agent keeps its previous configuration
        self.write("agent-6.yaml", b"- a list at the top\n")
        self.assertTrue(self.logged(r"agent-6\.yaml:1:1: expected a mapping at the top level"), self.kasd.log())
        self.assertTrue(s.quiet(1.5))
        # A new stream gets the previous (valid) configuration too.
        s2 = self.stream(6)
        self.assertEqual(s2.next().commit_id, sha(body))
        fixed = b"ok: false\n"
        self.write("agent-6.yaml", fixed)
        self.assertEqual(s.next().commit_id, sha(fixed))
        # An invalid file for an agent that never had a valid one: the empty configuration.
        self.put("agent-7.yaml", b"x: [\n")
        self.assertTrue(self.logged(r"agent-7\.yaml:\d+:\d+: "), self.kasd.log())
        self.assertEqual(self.stream(7).next().commit_id, empty_commit(7))

    def test_missing_file_gives_empty_config_and_file_by_id(self):
        r = self.stream(2).next()
        self.assertEqual(r.configuration.agent_id, 2)
        self.assertEqual(r.configuration.gitlab_external_url, URL)
        self.assertEqual(r.commit_id, empty_commit(2))
        r3 = self.stream(3).next()
        self.assertEqual(r3.configuration.agent_id, 3)
        self.assertEqual(r3.commit_id, sha(b"gitops: {}\n"))
        # Removing a file falls back to the empty configuration, pushed to the open stream.
        path = self.put("agent-8.yaml", b"k: v\n")
        s = self.stream(8)
        self.assertEqual(s.next().commit_id, sha(b"k: v\n"))
        os.unlink(path)
        self.assertEqual(s.next().commit_id, empty_commit(8))

    def test_unknown_token_is_unauthenticated(self):
        s = Stream(self.addr, "glagent-not-a-known-token-0123456789")
        self.streams.append(s)
        with self.assertRaises(AssertionError):
            s.next(timeout=5)
        self.assertIsNotNone(s.error)
        self.assertEqual(s.error.code(), grpc.StatusCode.UNAUTHENTICATED)

    def test_skip_register_false_registers_for_the_stream_life(self):
        meta = kaspb.entity.AgentMeta(version="v16.1.0", pod_namespace="ns-cfg", pod_name="agentk-0")
        s = self.stream(4, skip_register=False, meta=meta)
        s.next()
        got = wait_until(lambda: self.connected(4), 10)
        self.assertTrue(got, "agent 4 not in GetConnectedAgents")
        self.assertEqual(len(got), 1)
        self.assertEqual(got[0].agent_meta.version, "v16.1.0")
        self.assertEqual(got[0].agent_meta.pod_namespace, "ns-cfg")
        self.assertEqual(got[0].project_id, PROJECT)
        s.close()
        self.assertTrue(wait_until(lambda: self.connected(4) == [], 10), self.connected(4))

    def test_skip_register_false_meta_bounded(self):
        # the same bound as Register's (limits.agent_meta_max_size, 16 KiB by default): the stream
        # is refused and nothing reaches Redis
        meta = kaspb.entity.AgentMeta(version="v16.1.0", pod_name="p" * 20000)
        refused0 = metric(self.kasd, "kasd_agent_pods_refused_total", limit="agent_meta_max_size")
        s = self.stream(6, skip_register=False, meta=meta)
        with self.assertRaises(AssertionError):
            s.next(timeout=5)  # "stream ended"
        self.assertEqual(s.error.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertIn("limits.agent_meta_max_size", s.error.details())
        self.assertEqual(self.connected(6), [])
        self.assertEqual(metric(self.kasd, "kasd_agent_pods_refused_total", limit="agent_meta_max_size"), refused0 + 1)

    def test_skip_register_true_does_not_register(self):
        meta = kaspb.entity.AgentMeta(version="v17.0.0")
        s = self.stream(9, skip_register=True, meta=meta)
        s.next()
        time.sleep(1.0)
        self.assertEqual(self.connected(9), [])

    def test_stream_survives_keepalive_pings(self):
        opts = [("grpc.keepalive_time_ms", 2500), ("grpc.keepalive_timeout_ms", 2000),
                ("grpc.http2.max_pings_without_data", 0), ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_time_between_pings_ms", 2500),
                ("grpc.http2.min_ping_interval_without_data_ms", 2500)]
        body = b"keep: alive\n"
        self.put("agent-9.yaml", body)
        s = self.stream(9, options=opts)
        self.assertEqual(s.next().commit_id, sha(body))
        self.assertTrue(s.quiet(6.0))  # pings go both ways; the stream stays open
        body2 = b"keep: still\n"
        self.write("agent-9.yaml", body2)
        self.assertEqual(s.next().commit_id, sha(body2))


if __name__ == "__main__":
    unittest.main(verbosity=2)
