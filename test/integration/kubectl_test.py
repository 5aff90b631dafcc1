"""Real kubectl (Debian kubernetes-client) through kasd's Kubernetes API front door (over TLS: kubectl
sends a kubeconfig's token only over TLS), a grpc-go agent
that dials and serves MakeRequest as agentk does (kasd-goagent --k8s-api), and a stand-in
Kubernetes API server (fake_k8s.py):

    kubectl --kubeconfig K -> kasd kubernetes_api (TLS, HTTP/2) -> router -> tunnel
        -> kasd-goagent -> fake_k8s (HTTP/1.1)

Two kasd instances form a fleet for the last case: kubectl talks to one, the agent is connected to
the other."""
import base64
import json
import os
import select
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(__file__))
import gitlab_client  # noqa: E402
from fake_k8s import FakeK8s  # noqa: E402
from grpcgo_test import GoAgent  # noqa: E402
from kasd_harness import Kasd, metric, wait_until  # noqa: E402
from redis_fixture import RedisServer  # noqa: E402

KUBECTL = os.environ.get("KUBECTL", "kubectl")
CERTS = os.environ.get("KD_TEST_CERTS", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "certs"))
AGENT = 5
USER_TOKEN = "k8s-kubectl-token-0123456789"
IMP_TOKEN = "k8s-kubectl-imp-0123456789ab"


def config(d, redis=None):
    fleet = ""
    if redis is not None:
        fleet = f"""redis:
  server:
    address: {redis}
  heartbeat_interval: 500ms
  instance_ttl: 2s
"""
    return f"""\
shards: 2
agent:
  listen:
    address: 127.0.0.1:0
  token_file: {d}/tokens.yaml
api:
  listen:
    address: 127.0.0.1:0
private_api:
  listen:
    address: 127.0.0.1:0
    authentication_secret_file: {d}/private-secret
observability:
  listen:
    address: 127.0.0.1:0
kubernetes_api:
  listen:
    address: 127.0.0.1:0
    certificate_file: {CERTS}/server.pem
    key_file: {CERTS}/server.key
  access_token_file: {d}/access.yaml
limits:
  routing_timeout: 3s
  shutdown_grace: 2s
{fleet}"""


class Kubectl(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = d = tempfile.mkdtemp(prefix="kasd-kubectl-")
        cls.token = base64.urlsafe_b64encode(os.urandom(24)).decode()
        with open(os.path.join(d, "tokens.yaml"), "w") as f:
            f.write(f"agents:\n  - {{token: \"{cls.token}\", agent_id: {AGENT}, project_id: 9, agent_name: k}}\n")
        with open(os.path.join(d, "access.yaml"), "w") as f:
            f.write(f"""users:
  - {{token: {USER_TOKEN}, agents: [{AGENT}]}}
  - token: {IMP_TOKEN}
    agents: [{AGENT}]
    impersonate: {{username: "gitlab:user:alice", groups: ["gitlab:user", devs]}}
""")
        gitlab_client.write_secret(os.path.join(d, "private-secret"), gitlab_client.generate_secret())
        cls.redis = RedisServer()
        cls.k8s = FakeK8s().start()
        cls.front = Kasd(config=config(d, cls.redis.address))  # kubectl talks to this one
        assert cls.front.started, cls.front.log()
        cls.home = Kasd(config=config(d, cls.redis.address))  # the agent is connected here
        assert cls.home.started, cls.home.log()
        cls.agent = GoAgent("grpc://%s:%d" % cls.home.listeners["agent"], cls.token, "--k8s-api", cls.k8s.url)
        cls.agent.wait_ready()
        cls.kubeconfig = {}
        for name, tok in (("user", USER_TOKEN), ("imp", IMP_TOKEN), ("bad", "wrong-token-0123456789")):
            for inst in ("front", "home"):
                host, port = getattr(cls, inst).listeners["kubernetes_api"]
                path = os.path.join(d, f"kubeconfig-{name}-{inst}")
                with open(path, "w") as f:
                    f.write(f"""apiVersion: v1
kind: Config
clusters:
  - name: c
    cluster: {{server: "https://{host}:{port}/k8s-proxy", certificate-authority: "{CERTS}/ca.pem"}}
contexts:
  - name: c
    context: {{cluster: c, user: u}}
current-context: c
users:
  - name: u
    user: {{token: "pat:{AGENT}:{tok}"}}
""")
                cls.kubeconfig[(name, inst)] = path

    @classmethod
    def tearDownClass(cls):
        cls.agent.stop()
        for k in (cls.front, cls.home):
            rc = k.stop()
            assert rc == 0, f"kasd exited {rc}\n" + k.log()
        cls.k8s.stop()
        cls.redis.stop()

    def kubectl(self, *args, who="user", inst="home", timeout=30, check=True):
        cmd = [KUBECTL, "--kubeconfig", self.kubeconfig[(who, inst)], "--cache-dir",
               os.path.join(self.dir, "cache-" + who + inst), "--request-timeout", "20s", *args]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(args)}: exit {p.returncode}\n{p.stderr}\n" + self.home.log())
        return p

    def test_get_pods_table_and_json(self):
        out = self.kubectl("get", "pods").stdout
        self.assertIn("pod-a", out)
        self.assertIn("pod-b", out)
        self.assertIn("Running", out)
        pods = json.loads(self.kubectl("get", "pods", "-o", "json").stdout)
        self.assertEqual(sorted(p["metadata"]["name"] for p in pods["items"]), ["pod-a", "pod-b"])
        r = self.k8s.wait_for(lambda r: r.path == "/api/v1/namespaces/default/pods", 5)
        # what the API server saw: kubectl's own headers, none of the user's credentials
        self.assertNotIn(USER_TOKEN, json.dumps(r.headers))
        self.assertTrue(any("kasd" in v for v in r.headers_all("Via")), r.headers_all("Via"))
        self.assertIsNone(r.impersonation().get("user"))

    def test_version_and_missing_pod(self):
        self.assertIn("v1.29.0-fake", self.kubectl("version", "-o", "json").stdout)
        p = self.kubectl("get", "pod", "nope", check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("NotFound", p.stderr + p.stdout)

    def test_create_posts_the_body(self):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "new-pod"},
               "spec": {"containers": [{"name": "c", "image": "busybox"}]}}
        path = os.path.join(self.dir, "pod.json")
        with open(path, "w") as f:
            json.dump(pod, f)
        self.kubectl("create", "--validate=false", "-f", path)
        r = self.k8s.wait_for(lambda r: r.method == "POST", 5)
        self.assertEqual(json.loads(r.body)["metadata"]["name"], "new-pod")

    def test_watch_streams_events(self):
        self.k8s.watch_delay = 0.3
        p = self.kubectl("get", "pods", "--watch", "--output-watch-events", "--request-timeout", "5s",
                         check=False, timeout=30)
        self.assertIn("pod-a", p.stdout)
        self.assertGreaterEqual(p.stdout.count("\n"), 3, p.stdout + p.stderr)

    def test_impersonation_reaches_the_api_server(self):
        self.k8s.clear()
        self.kubectl("get", "pods", who="imp")
        r = self.k8s.wait_for(lambda r: r.path == "/api/v1/namespaces/default/pods", 5)
        imp = r.impersonation()
        self.assertEqual(imp["user"], "gitlab:user:alice")
        self.assertEqual(sorted(imp["groups"]), ["devs", "gitlab:user"])

    def test_wrong_token_is_unauthorized(self):
        p = self.kubectl("get", "pods", who="bad", check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("Unauthorized", p.stderr)

    def upgrade(self, inst):
        """An exec-style upgrade (SPDY/3.1) over TLS: the 101, then bytes both ways; fake_k8s echoes
        every byte after its 101 (kubectl's own SPDY framing is not modelled: the bytes are opaque
        to kasd and the agent)."""
        host, port = getattr(self, inst).listeners["kubernetes_api"]
        ctx = ssl.create_default_context(cafile=os.path.join(CERTS, "ca.pem"))
        ctx.set_alpn_protocols(["http/1.1"])  # as client-go's SPDY dialer does
        s = ctx.wrap_socket(socket.create_connection((host, port), timeout=20), server_hostname="localhost")
        s.sendall((f"POST /k8s-proxy/api/v1/namespaces/default/pods/pod-a/exec?command=sh&stdin=true HTTP/1.1\r\n"
                   f"Host: {host}\r\nAuthorization: Bearer pat:{AGENT}:{USER_TOKEN}\r\n"
                   f"Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n"
                   f"Content-Length: 0\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            self.assertTrue(chunk, head)
            head += chunk
        head, rest = head.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        self.assertTrue(lines[0].startswith("HTTP/1.1 101"), lines)
        hdrs = {l.split(":", 1)[0].lower(): l.split(":", 1)[1].strip() for l in lines[1:]}
        self.assertEqual(hdrs.get("upgrade"), "SPDY/3.1")
        self.assertEqual(hdrs.get("connection", "").lower(), "upgrade")
        payload = os.urandom(3 * 1024 * 1024 + 5)  # beyond the 1 MiB windows, both ways
        got = bytearray(rest)
        # one thread sends and receives (an SSL object must not be read and written at once from two
        # threads), without blocking, so neither direction's flow control can stall the other
        s.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 30
        while len(got) < len(payload):
            self.assertLess(time.monotonic(), deadline, f"{sent} sent, {len(got)} echoed")
            want_w = sent < len(payload)
            r, w, _ = select.select([s], [s] if want_w else [], [], 1)
            if s in r or s.pending():
                try:
                    chunk = s.recv(65536)
                    self.assertTrue(chunk, f"closed after {len(got)} bytes")
                    got += chunk
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
            if want_w and s in w:
                try:
                    sent += s.send(payload[sent:sent + 65536])
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
        self.assertEqual(bytes(got), payload)
        s.close()
        r = self.k8s.wait_for(lambda r: r.path.endswith("/pods/pod-a/exec"), 5)
        self.assertEqual(r.header("Upgrade"), "SPDY/3.1")
        self.assertEqual(r.header("X-Stream-Protocol-Version"), "v4.channel.k8s.io")
        self.assertIn("sh", r.query.get("command", []))
        k = getattr(self, inst)
        # the client's EOF half-closes the call, the agent ends the upstream connection and the call
        self.assertTrue(wait_until(lambda: metric(k, "kasd_kubernetes_api_requests_active") == 0, 5))
        self.assertGreaterEqual(metric(k, "kasd_kubernetes_api_upgrades_total"), 1)

    def test_upgrade_bytes_both_ways(self):
        self.upgrade("home")

    def test_upgrade_through_another_instance(self):
        self.upgrade("front")

    def curl(self, path, token=USER_TOKEN, extra=()):
        host, port = self.home.listeners["kubernetes_api"]
        cmd = ["curl", "-sS", "--http2", "--cacert", os.path.join(CERTS, "ca.pem"), "--max-time", "15",
               "-H", f"Authorization: Bearer pat:{AGENT}:{token}", "-w", "\n%{http_code} %{http_version}",
               *extra, f"https://localhost:{port}/k8s-proxy{path}"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        body, _, tail = p.stdout.rpartition("\n")
        code, version = tail.split()
        return int(code), version, body

    def test_curl_over_http2(self):
        code, version, body = self.curl("/api/v1/namespaces/default/pods")
        self.assertEqual((code, version), (200, "2"), body)
        self.assertEqual(sorted(p["metadata"]["name"] for p in json.loads(body)["items"]), ["pod-a", "pod-b"])
        # a watch streams its events, then ends with the API server's stream
        code, version, body = self.curl("/api/v1/namespaces/default/pods?watch=1")
        self.assertEqual((code, version), (200, "2"))
        events = [json.loads(l) for l in body.splitlines() if l.strip()]
        self.assertGreaterEqual(len(events), 2)
        self.assertTrue(all("type" in e for e in events), events)
        # a bad credential: 401, and nothing reaches the API server
        self.k8s.clear()
        code, version, body = self.curl("/api/v1/namespaces/default/pods", token="wrong-token-0123456789")
        self.assertEqual(code, 401)
        self.assertEqual(json.loads(body)["reason"], "Unauthorized")
        time.sleep(0.3)
        self.assertEqual(self.k8s.requests, [])

    def test_through_another_instance(self):
        """kubectl on the instance without the agent: the call is forwarded over the private API."""
        out = self.kubectl("get", "pods", inst="front").stdout
        self.assertIn("pod-a", out)
        self.assertGreaterEqual(metric(self.front, "kasd_kubernetes_api_requests_total", outcome="proxied"), 1)
        self.assertTrue(wait_until(lambda: metric(self.front, "kasd_kubernetes_api_requests_active") == 0, 10))


if __name__ == "__main__":
    unittest.main()
