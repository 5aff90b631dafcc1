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
                # /readiness stays 200 (known agents work) and says what happened to GitLab
                import urllib.request
                with urllib.request.urlopen("http://%s:%d/readiness" % self.kasd.listeners["observability"],
                                            timeout=5) as resp:
                    body = resp.read().decode()
                self.assertIn("gitlab: the last request failed", body)
                self.assertIn("connection to GitLab failed", body)
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


class GitLabHung(unittest.TestCase):
    """A GitLab that accepts and never answers: stop does not wait for it, and the control thread
    survives requests that time out while others queue and fail at once."""

    def test_stop_with_a_call_waiting_for_its_token_and_a_full_queue(self):
        import socket
        d = tempfile.mkdtemp(prefix="kasd-gitlab-hung-")
        secret = os.urandom(32)
        with open(os.path.join(d, "gitlab-secret"), "w") as f:
            f.write(base64.b64encode(secret).decode() + "\n")
        g = FakeGitLab(secret).start()
        self.addCleanup(g.stop)
        g.go_away(hang=True)
        k = Kasd(config=f"""\
shards: 1
agent:
  listen:
    address: 127.0.0.1:0
  token_source: gitlab
gitlab:
  address: {g.url}
  authentication_secret_file: {d}/gitlab-secret
  timeout: 1s
api:
  listen:
    address: 127.0.0.1:0
private_api:
  listen:
    address: 127.0.0.1:0
observability:
  listen:
    address: 127.0.0.1:0
kubernetes_api:
  listen:
    address: 127.0.0.1:0
limits:
  shutdown_grace: 10s
""")
        self.addCleanup(k.kill)
        self.assertTrue(k.started, k.log())
        host, port = k.listeners["kubernetes_api"]
        socks = []

        def send(tok):
            s = socket.create_connection((host, port))
            s.sendall(f"GET /k8s-proxy/api HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer pat:1:{tok}\r\n\r\n".encode())
            socks.append(s)
        # every slot taken, a token that fails at once queued behind them, more behind it; the first
        # ones time out while the rest start and fail (the reviewer's use-after-free scenario)
        for i in range(17):
            send(f"slot-token-{i:02d}-0123456789")
        send("a b")
        for i in range(15):
            send(f"later-token-{i:02d}-0123456789")
        a = AgentK("%s:%d" % k.listeners["agent"], token(), pods=1, idle=1, backoff=(5, 5)).start()
        self.addCleanup(a.kill)
        time.sleep(2.5)
        self.assertIsNone(k.proc.poll(), k.log())
        t0 = time.monotonic()
        self.assertEqual(k.stop(), 0, k.log())
        self.assertLess(time.monotonic() - t0, 5)  # not the 10 s grace: the waiting call ended at once
        for s in socks:
            s.close()


class FrontDoorGitLab(unittest.TestCase):
    """The Kubernetes API front door's credentials checked by GitLab (no access-token file):
    pat via authorize_proxy_user, ci via job/allowed_agents, impersonation as kas derives it."""

    AGENT = 21

    @classmethod
    def setUpClass(cls):
        import kubeapi_test  # the recording MakeRequest handler
        cls.kt = kubeapi_test
        cls.dir = d = tempfile.mkdtemp(prefix="kasd-gitlab-k8s-")
        secret = os.urandom(32)
        with open(os.path.join(d, "gitlab-secret"), "w") as f:
            f.write(base64.b64encode(secret).decode() + "\n")
        cls.gitlab = FakeGitLab(secret).start()
        cls.agent_token = token()
        cls.gitlab.add_agent(cls.agent_token, agent_id=cls.AGENT, project_id=210, name="k8s-agent")
        cls.gitlab.add_user("pat-agent-access-0123456789", user_id=1, username="alice")
        cls.gitlab.grant(cls.AGENT, 1)  # access as the agent
        cls.gitlab.add_user("pat-user-access-0123456789", user_id=2, username="bob")
        cls.gitlab.grant(cls.AGENT, 2, {"user": {"projects": [{"id": 210, "roles": ["developer"]}],
                                                 "groups": [{"id": 7, "roles": ["maintainer"]}]}})
        cls.gitlab.add_user("pat-no-grant-0123456789", user_id=3, username="eve")
        from fake_gitlab import allowed_agent
        cls.gitlab.add_job("job-token-allowed-0123456789", job_id=501, pipeline_id=50, project_id=300, user_id=2,
                           username="bob", groups=(7, 8),
                           allowed_agents=[allowed_agent(cls.AGENT, 210, access_as={"ci_job": {}})])
        cls.gitlab.add_job("job-token-other-0123456789", job_id=502, pipeline_id=50, project_id=300, user_id=2,
                           username="bob", allowed_agents=[allowed_agent(99, 990)])
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
api:
  listen:
    address: 127.0.0.1:0
private_api:
  listen:
    address: 127.0.0.1:0
observability:
  listen:
    address: 127.0.0.1:0
kubernetes_api:
  listen:
    address: 127.0.0.1:0
limits:
  routing_timeout: 2s
  shutdown_grace: 2s
"""
        cls.kasd = Kasd(config=cfg)
        assert cls.kasd.started, cls.kasd.log()
        cls.host, cls.port = cls.kasd.listeners["kubernetes_api"]
        cls.rec = cls.kt.Recorder()
        cls.agent = AgentK("%s:%d" % cls.kasd.listeners["agent"], cls.agent_token, pods=1, idle=2,
                           handlers={cls.kt.MAKE_REQUEST: cls.rec}).start()
        cls.agent.wait_for(lambda s: s["registers"] >= 1 and s["tunnels_idle"] >= 2, timeout=15)

    @classmethod
    def tearDownClass(cls):
        cls.agent.stop(5)
        rc = cls.kasd.stop()
        cls.gitlab.stop()
        assert rc == 0, f"kasd exited {rc}\n" + cls.kasd.log()

    def get(self, cred, agent=None):
        import http.client
        c = http.client.HTTPConnection(self.host, self.port, timeout=10)
        c.request("GET", "/k8s-proxy/api/v1/pods", headers={"Authorization": f"Bearer {cred.format(a=agent or self.AGENT)}"})
        r = c.getresponse()
        body = r.read()
        c.close()
        return r, body

    def extra(self):
        with self.rec.lock:
            hdr = self.rec.requests[-1][0]
        if not hdr.HasField("extra"):
            return None
        ex = self.kt.kaspb.kubernetes_api_rpc.HeaderExtra()
        ex.ParseFromString(hdr.extra.value)
        return ex.imp_config

    def test_pat_as_agent_cached(self):
        self.gitlab.reset_counts()
        for _ in range(3):
            r, _ = self.get("pat:{a}:pat-agent-access-0123456789")
            self.assertEqual(r.status, 404)  # the agent's answer: the request went through
            self.assertIsNone(self.extra())
        self.assertEqual(self.gitlab.count("authorize_proxy_user"), 1)

    def test_pat_as_user_impersonates(self):
        r, _ = self.get("pat:{a}:pat-user-access-0123456789")
        self.assertEqual(r.status, 404)
        imp = self.extra()
        self.assertEqual(imp.username, "gitlab:user:bob")
        self.assertEqual(list(imp.groups), ["gitlab:user", "gitlab:project_role:210:developer",
                                            "gitlab:group_role:7:maintainer"])

    def test_pat_refused(self):
        for cred, agent in (("pat:{a}:pat-unknown-0123456789", None), ("pat:{a}:pat-no-grant-0123456789", None),
                            ("pat:{a}:pat-agent-access-0123456789", 77)):
            r, body = self.get(cred, agent)
            self.assertEqual(r.status, 401, (cred, body))
            self.assertEqual(r.getheader("Gitlab-Unauthorized"), "true")

    def test_ci_job(self):
        r, _ = self.get("ci:{a}:job-token-allowed-0123456789")
        self.assertEqual(r.status, 404)
        imp = self.extra()
        self.assertEqual(imp.username, "gitlab:ci_job:501")
        self.assertEqual(list(imp.groups), ["gitlab:ci_job", "gitlab:group:7", "gitlab:group:8", "gitlab:project:300"])
        r, body = self.get("ci:{a}:job-token-other-0123456789")
        self.assertEqual(r.status, 403, body)
        r, _ = self.get("ci:{a}:job-token-unknown-0123456789")
        self.assertEqual(r.status, 401)

    def test_z_gitlab_away_is_503(self):
        self.gitlab.go_away()
        try:
            r, body = self.get("pat:{a}:pat-never-seen-0123456789")
            self.assertEqual(r.status, 503, body)
            self.assertIn("GitLab unavailable", body.decode())
        finally:
            self.gitlab.come_back()



class SharedThroughRedis(unittest.TestCase):
    """Two instances with one Redis: an agent known to the first costs GitLab nothing on the second."""

    def test_second_instance_reads_redis(self):
        from redis_fixture import RedisServer
        d = tempfile.mkdtemp(prefix="kasd-gitlab-redis-")
        secret = os.urandom(32)
        with open(os.path.join(d, "gitlab-secret"), "w") as f:
            f.write(base64.b64encode(secret).decode() + "\n")
        g = FakeGitLab(secret).start()
        self.addCleanup(g.stop)
        redis = RedisServer()
        self.addCleanup(redis.stop)
        tok = token()
        g.add_agent(tok, agent_id=41, project_id=410, name="shared-agent")
        cfg = f"""\
shards: 2
agent:
  listen:
    address: 127.0.0.1:0
  token_source: gitlab
gitlab:
  address: {g.url}
  authentication_secret_file: {d}/gitlab-secret
api:
  listen:
    address: 127.0.0.1:0
private_api:
  listen:
    address: 127.0.0.1:0
observability:
  listen:
    address: 127.0.0.1:0
redis:
  server:
    address: {redis.address}
"""
        ks = [Kasd(config=cfg), Kasd(config=cfg)]
        for k in ks:
            self.addCleanup(k.kill)
            self.assertTrue(k.started, k.log())
        for i, k in enumerate(ks):
            a = AgentK("%s:%d" % k.listeners["agent"], tok, pods=2, idle=1).start()
            try:
                a.wait_for(lambda s: s["registers"] >= 2, timeout=15)
            finally:
                a.stop(5)
            self.assertEqual(g.count("agent_info"), 1, f"after instance {i}")
        self.assertGreaterEqual(sum(metric(ks[1], "kasd_gitlab_agent_info_redis_hits_total", shard=str(s))
                                    for s in (0, 1)), 1)
        keys = redis.cmd("KEYS", "*agent_info*")
        self.assertEqual(len(keys), 1)
        self.assertNotIn(tok.encode(), redis.cmd("GET", keys[0]))  # no token in Redis
        for k in ks:
            self.assertEqual(k.stop(), 0, k.log())


CERTS = os.environ.get("KD_TEST_CERTS", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "certs"))


class GitLabOverTLS(unittest.TestCase):
    """https:// to GitLab: the certificate is checked against gitlab.ca_file and the address's host."""

    def start(self, ca, cert=None):
        d = tempfile.mkdtemp(prefix="kasd-gitlab-tls-")
        secret = os.urandom(32)
        with open(os.path.join(d, "gitlab-secret"), "w") as f:
            f.write(base64.b64encode(secret).decode() + "\n")
        g = FakeGitLab(secret, tls=cert or (os.path.join(CERTS, "server.pem"), os.path.join(CERTS, "server.key"))).start()
        self.addCleanup(g.stop)
        tok = token()
        g.add_agent(tok, agent_id=31, project_id=310, name="tls-agent")
        k = Kasd(config=f"""\
shards: 1
agent:
  listen:
    address: 127.0.0.1:0
  token_source: gitlab
gitlab:
  address: {g.url}
  authentication_secret_file: {d}/gitlab-secret
  ca_file: {os.path.join(CERTS, ca)}
  timeout: 2s
api:
  listen:
    address: 127.0.0.1:0
private_api:
  listen:
    address: 127.0.0.1:0
observability:
  listen:
    address: 127.0.0.1:0
""")
        self.addCleanup(k.kill)
        self.assertTrue(k.started, k.log())
        a = AgentK("%s:%d" % k.listeners["agent"], tok, pods=1, idle=1, backoff=(5, 5)).start()
        self.addCleanup(a.kill)
        return g, k, a

    def test_verified_certificate(self):
        g, k, a = self.start("ca.pem")
        a.wait_for(lambda s: s["registers"] >= 1, timeout=15)
        self.assertEqual(g.count("agent_info"), 1)
        self.assertEqual(k.stop(), 0, k.log())

    def test_certificate_for_another_name_is_refused(self):
        """Signed by the right CA, but for other.example: GitLab is https://localhost, so no request
        (and no agent token) goes out."""
        import subprocess
        d = tempfile.mkdtemp(prefix="kasd-wrong-name-")
        key, csr, crt, ext = (os.path.join(d, n) for n in ("w.key", "w.csr", "w.pem", "ext.cnf"))
        with open(ext, "w") as f:
            f.write("subjectAltName=DNS:other.example\n")
        subprocess.run(["openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
                        "-subj", "/CN=other.example"], check=True, capture_output=True)
        subprocess.run(["openssl", "x509", "-req", "-in", csr, "-CA", os.path.join(CERTS, "ca.pem"), "-CAkey",
                        os.path.join(CERTS, "ca.key"), "-CAcreateserial", "-CAserial", os.path.join(d, "ca.srl"),
                        "-days", "2", "-extfile", ext, "-out", crt], check=True, capture_output=True)
        g, k, a = self.start("ca.pem", cert=(crt, key))
        self.assertTrue(a.wait_for(lambda s: "UNAVAILABLE" in s["last_error"], timeout=10), a.stats)
        self.assertIn("hostname mismatch", a.stats["last_error"])
        self.assertEqual(g.count("agent_info"), 0)

    def test_unknown_ca_is_unavailable(self):
        g, k, a = self.start("other-ca.pem")
        self.assertTrue(a.wait_for(lambda s: "UNAVAILABLE" in s["last_error"], timeout=10), a.stats)
        self.assertIn("connection to GitLab failed", a.stats["last_error"])
        self.assertEqual(g.count("agent_info"), 0)  # no request went out


if __name__ == "__main__":
    unittest.main()
