"""Agent tokens resolved by GitLab (agent.token_source: gitlab): kasd asks a stand-in GitLab
(fake_gitlab.py, which checks the Gitlab-Kas-Api-Request JWT) for agent_info, once per token
whatever the number of connections, calls and shards; caches known and refused tokens; answers
UNAVAILABLE (not UNAUTHENTICATED) for a token it cannot resolve while GitLab is away, while agents
it knows keep working."""
import base64
import os
import sys
import tempfile
import time
import unittest

import grpc

sys.path.insert(0, os.path.dirname(__file__))
import gitlab_client  # noqa: E402
from agentk import AgentK  # noqa: E402
from fake_gitlab import FakeGitLab  # noqa: E402
from gitlab_client import GitLabClient  # noqa: E402
from kasd_harness import Kasd, metric, wait_until  # noqa: E402
from routing_test import who_handler  # noqa: E402


def token():
    return "glagent-" + base64.urlsafe_b64encode(os.urandom(24)).decode()


class GitLabTokens(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = d = tempfile.mkdtemp(prefix="kasd-gitlab-")
        cls.gl_secret = os.urandom(32)
        with open(os.path.join(d, "gitlab-secret"), "w") as f:
            f.write(base64.b64encode(cls.gl_secret).decode() + "\n")
        cls.api_secret = gitlab_client.generate_secret()
        gitlab_client.write_secret(os.path.join(d, "api-secret"), cls.api_secret)
        cls.gitlab = FakeGitLab(cls.gl_secret).start()
        cls.tokens = {i: token() for i in (11, 12, 13)}
        for i in (11, 12):
            cls.gitlab.add_agent(cls.tokens[i], agent_id=i, project_id=100 + i, name=f"agent-{i}")
        cfg = f"""\
shards: 2
agent:
  listen:
    address: 127.0.0.1:0
  token_source: gitlab
gitlab:
  address: {cls.gitlab.url}
  authentication_secret_file: {d}/gitlab-secret
  timeout: 2s
  agent_info_cache_error_ttl: 30s
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
limits:
  routing_timeout: 3s
  shutdown_grace: 2s
"""
        cls.kasd = Kasd(config=cfg)
        assert cls.kasd.started, cls.kasd.log()
        cls.agent_addr = "%s:%d" % cls.kasd.listeners["agent"]
        cls.api_addr = "%s:%d" % cls.kasd.listeners["api"]

    @classmethod
    def tearDownClass(cls):
        rc = cls.kasd.stop()
        cls.gitlab.stop()
        assert rc == 0, f"kasd exited {rc}\n" + cls.kasd.log()

    def test_a_one_request_per_token_and_routed_calls_work(self):
        self.gitlab.reset_counts()
        # 6 pods = 6 connections, each Register + 2 tunnels: 18 calls, 1 token. Connections land on
        # either shard; those on the other shard than the agent's owner wait for the token there,
        # move, and wait again on the owner: every call must start at once, its messages intact.
        a = AgentK(self.agent_addr, self.tokens[11], pods=6, idle=2,
                   handlers={"/test.Echo/Who": who_handler(11)}).start()
        try:
            a.wait_for(lambda s: s["tunnels_idle"] >= 12 and s["registers"] >= 6, timeout=15)
            self.assertEqual(a.stats["register_errors"], {})
            self.assertEqual(a.stats["tunnel_end_codes"], {})
            self.assertEqual(self.gitlab.count("agent_info"), 1)
            self.assertEqual(self.gitlab.count("jwt_refused"), 0)
            r = self.gitlab.requests[-1]
            auth = [v for k, v in r.headers if k.lower() == "authorization"]
            self.assertEqual(auth, ["Bearer " + self.tokens[11]])
            self.assertEqual(r.jwt["iss"], "gitlab-kas")
            c = GitLabClient(self.api_addr, self.api_secret)
            try:
                for _ in range(12):  # every tunnel of every pod is usable
                    resp, _ = c.unary("/test.Echo/Who", b"", agent_id=11, timeout=5)
                    self.assertEqual(resp, b"11")
            finally:
                c.close()
            self.assertGreaterEqual(metric(self.kasd, "kasd_gitlab_agent_info_requests_total", outcome="ok"), 1)
        finally:
            a.stop(5)

    def test_b_unknown_token_refused_and_cached(self):
        self.gitlab.reset_counts()
        bad = token()
        for _ in range(3):
            a = AgentK(self.agent_addr, bad, pods=1, idle=1, backoff=(5, 5)).start()
            try:
                self.assertTrue(a.wait_for(lambda s: "UNAUTHENTICATED" in s["last_error"], timeout=10),
                                a.stats)
            finally:
                a.kill()
        self.assertEqual(self.gitlab.count("agent_info"), 1)  # the refusal is cached (30 s)

    def test_c_gitlab_away(self):
        # agent 12 becomes known while GitLab is up
        a = AgentK(self.agent_addr, self.tokens[12], pods=1, idle=1,
                   handlers={"/test.Echo/Who": who_handler(12)}).start()
        try:
            a.wait_for(lambda s: s["registers"] >= 1, timeout=15)  # kasd has resolved the token
            self.gitlab.go_away()
            try:
                # a token kasd never saw: UNAVAILABLE, not UNAUTHENTICATED
                fresh = AgentK(self.agent_addr, token(), pods=1, idle=1, backoff=(5, 5)).start()
                try:
                    self.assertTrue(fresh.wait_for(lambda s: "UNAVAILABLE" in s["last_error"], timeout=10),
                                    fresh.stats)
                    self.assertNotIn("UNAUTHENTICATED", fresh.stats["last_error"])
                finally:
                    fresh.kill()
                # agent 12 keeps working: a routed call uses a tunnel, and a new one replaces it
                c = GitLabClient(self.api_addr, self.api_secret)
                try:
                    for i in range(3):
                        a.wait_for(lambda s: s["tunnels_idle"] >= 1, timeout=10)
                        try:
                            self.assertEqual(c.unary("/test.Echo/Who", b"", agent_id=12, timeout=5)[0], b"12")
                        except grpc.RpcError as e:
                            raise AssertionError(f"call {i}: {e.code()} {e.details()}; agent: {a.stats}") from None
                finally:
                    c.close()
                self.assertGreaterEqual(
                    metric(self.kasd, "kasd_gitlab_agent_info_requests_total", outcome="failed"), 1)
            finally:
                self.gitlab.come_back()
        finally:
            a.stop(5)

    def test_d_slow_gitlab_times_out_as_unavailable(self):
        self.gitlab.go_away(hang=True)
        try:
            t0 = time.monotonic()
            fresh = AgentK(self.agent_addr, token(), pods=1, idle=1, backoff=(5, 5)).start()
            try:
                self.assertTrue(fresh.wait_for(lambda s: "UNAVAILABLE" in s["last_error"], timeout=10),
                                fresh.stats)
                self.assertIn("within 2000 ms", fresh.stats["last_error"])
            finally:
                fresh.kill()
            self.assertLess(time.monotonic() - t0, 8)
        finally:
            self.gitlab.come_back()


if __name__ == "__main__":
    unittest.main()
