"""The Kubernetes API front door (kubernetes_api.listen): HTTP requests from a real HTTP client
become KubernetesApi/MakeRequest calls routed to the agent the credential names, and the agent's
HttpResponse messages stream back. The agent here is agentk.py with a MakeRequest handler that
records what it received and answers as scripted; kubectl against a grpc-go agent is in
kubectl_test.py."""
import base64
import http.client
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(__file__))
import kaspb  # noqa: E402
from agentk import AgentK, CallCancelled  # noqa: E402
from kasd_harness import Kasd, metric, wait_until  # noqa: E402

MAKE_REQUEST = kaspb.METHOD_MAKE_REQUEST
USER_TOKEN = "k8s-user-token-0123456789"
IMP_TOKEN = "k8s-imp-token-0123456789ab"
AGENT = 3
OTHER = 4  # in the token file, never connected
ORIGIN = "https://gitlab.example.com"


def parse_request(msgs):
    """HttpRequest messages (bytes) -> (header, body bytes, saw trailer)."""
    header, body, trailer = None, b"", False
    for raw in msgs:
        m = kaspb.grpctool.HttpRequest()
        m.ParseFromString(raw)
        kind = m.WhichOneof("message")
        if kind == "header":
            header = m.header
        elif kind == "data":
            body += m.data.data
        elif kind == "trailer":
            trailer = True
    return header, body, trailer


def response_header(status, headers):
    m = kaspb.grpctool.HttpResponse()
    m.header.response.status_code = status
    m.header.response.status = "%d X" % status
    for k, vs in headers.items():
        m.header.response.header[k].value.extend(vs)
    return m.SerializeToString()


def response_data(b):
    m = kaspb.grpctool.HttpResponse()
    m.data.data = b
    return m.SerializeToString()


def response_trailer():
    m = kaspb.grpctool.HttpResponse()
    m.trailer.SetInParent()
    return m.SerializeToString()


class Recorder:
    """The agent's MakeRequest handler: records each request; the answer is chosen by url_path."""

    def __init__(self):
        self.requests = []
        self.cancelled = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, call):
        # up to the trailer, as agentk reads: an upgrade's request stream stays open after it
        msgs = []
        for raw in call:
            msgs.append(raw)
            m = kaspb.grpctool.HttpRequest()
            m.ParseFromString(raw)
            if m.WhichOneof("message") == "trailer":
                break
        header, body, trailer = parse_request(msgs)
        with self.lock:
            self.requests.append((header, body, trailer, call.meta))
        path = header.request.url_path
        call.send_header({})
        if path == "/echo":
            call.send_message(response_header(201, {"Content-Type": ["application/octet-stream"],
                                                    "Connection": ["X-Drop-Me"], "X-Drop-Me": ["1"],
                                                    "Keep-Alive": ["timeout=5"], "Server": ["agent"],
                                                    "X-Multi": ["a", "b"]}))
            for i in range(0, len(body), 100000):
                call.send_message(response_data(body[i:i + 100000]))
            call.send_message(response_trailer())
        elif path == "/watch":
            call.send_message(response_header(200, {"Content-Type": ["application/json"]}))
            call.send_message(response_data(b'{"type":"ADDED"}\n'))
            try:
                # the client must see the first event before the second exists
                if not self.release.wait(10):
                    raise TimeoutError("not released")
                call.send_message(response_data(b'{"type":"MODIFIED"}\n'))
                # as an API server's watch: something every so often (over HTTP/1.1 a client that
                # left is noticed at the next write; over HTTP/2 by its RST_STREAM)
                for _ in range(200):
                    if call.cancelled.wait(0.05):
                        break
                    call.send_message(response_data(b"\n"))
                self.cancelled.set()
            except CallCancelled:
                self.cancelled.set()
                raise
        elif path == "/cut":
            call.send_message(response_header(200, {"Content-Length": ["100"]}))
            call.send_message(response_data(b"x" * 10))
            call.send_error(14, "agent lost its API server")
        elif path == "/smuggle":
            # declares 5 bytes, sends more that look like a second response
            call.send_message(response_header(200, {"Content-Length": ["5"]}))
            call.send_message(response_data(b"hello" + b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED"))
            call.send_message(response_trailer())
        elif path == "/garbage":
            call.send_message(b"\xff\xff\xff")
        else:
            call.send_message(response_header(404, {"Content-Type": ["text/plain"]}))
            call.send_message(response_data(b"no such path\n"))
            call.send_message(response_trailer())


class FrontDoor(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="kasd-kubeapi-")
        cls.tokens = {i: base64.urlsafe_b64encode(os.urandom(24)).decode() for i in (AGENT, OTHER)}
        with open(os.path.join(cls.dir, "tokens.yaml"), "w") as f:
            f.write("agents:\n")
            for i, t in cls.tokens.items():
                f.write(f"  - {{token: \"{t}\", agent_id: {i}, project_id: 1{i}, agent_name: a{i}}}\n")
        with open(os.path.join(cls.dir, "access.yaml"), "w") as f:
            f.write(f"""users:
  - token: {USER_TOKEN}
    agents: [{AGENT}, {OTHER}]
  - token: {IMP_TOKEN}
    agents: [{AGENT}]
    impersonate: {{username: alice, groups: [devs, ops], uid: "42"}}
""")
        cfg = f"""\
shards: 2
agent:
  listen:
    address: 127.0.0.1:0
  token_file: {cls.dir}/tokens.yaml
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
  access_token_file: {cls.dir}/access.yaml
  allowed_origins: [{ORIGIN}]
  max_request_body_size: 4000000
limits:
  routing_timeout: 1s
  shutdown_grace: 2s
"""
        cls.kasd = Kasd(config=cfg)
        assert cls.kasd.started, cls.kasd.log()
        cls.host, cls.port = cls.kasd.listeners["kubernetes_api"]
        cls.rec = Recorder()
        cls.agent = AgentK("%s:%d" % cls.kasd.listeners["agent"], cls.tokens[AGENT], pods=1, idle=2,
                           handlers={MAKE_REQUEST: cls.rec}).start()
        cls.agent.wait_for(lambda s: s["tunnels_idle"] >= 2, timeout=15)

    @classmethod
    def tearDownClass(cls):
        cls.agent.stop(5)
        if cls.kasd.proc.poll() is None:  # test_zz_* stopped it already when it ran
            rc = cls.kasd.stop()
            assert rc == 0, f"kasd exited {rc}\n" + cls.kasd.log()

    def test_zz_stop_with_a_watch_open(self):
        """SIGTERM while a watch streams: kasd exits 0 (no leak under ASan), the client sees the cut."""
        self.rec.release.clear()
        c = http.client.HTTPConnection(self.host, self.port, timeout=20)
        c.request("GET", "/k8s-proxy/watch", headers=self.auth())
        r = c.getresponse()
        self.assertEqual(r.readline(), b'{"type":"ADDED"}\n')
        self.assertEqual(metric(self.kasd, "kasd_kubernetes_api_requests_active"), 1)
        self.assertEqual(self.kasd.stop(), 0, self.kasd.log())
        with self.assertRaises((http.client.IncompleteRead, ConnectionError)):
            r.read()
        c.close()
        self.rec.release.set()

    def request(self, method, path, headers=None, body=None, timeout=10):
        c = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        data = r.read()
        c.close()
        return r, data

    def auth(self, token=USER_TOKEN, agent=AGENT, kind="pat"):
        return {"Authorization": f"Bearer {kind}:{agent}:{token}"}

    def last(self):
        with self.rec.lock:
            return self.rec.requests[-1]

    def test_get_mapped_like_kas(self):
        n = len(self.rec.requests)
        h = self.auth()
        h.update({"Accept": "application/json", "Cookie": "_gitlab_kas=secret", "X-Csrf-Token": "t",
                  "Connection": "X-Hop", "X-Hop": "1", "X-Custom": "v"})
        r, body = self.request("GET", "/k8s-proxy/api/v1/namespaces/a%20b/pods?watch=1&labelSelector=a%3Db"
                               "&gitlab-agent-id=3&x=1&x=2", h)
        self.assertEqual(r.status, 404)
        self.assertEqual(body, b"no such path\n")
        self.assertEqual(len(self.rec.requests), n + 1)
        hdr, req_body, trailer, meta = self.last()
        rq = hdr.request
        self.assertEqual(rq.method, "GET")
        self.assertEqual(rq.url_path, "/api/v1/namespaces/a b/pods")
        self.assertEqual({k: list(v.value) for k, v in rq.query.items()},
                         {"watch": ["1"], "labelSelector": ["a=b"], "x": ["1", "2"]})
        names = set(rq.header.keys())
        self.assertIn("Accept", names)
        self.assertEqual(list(rq.header["X-Custom"].value), ["v"])
        for gone in ("Authorization", "Cookie", "X-Csrf-Token", "Connection", "X-Hop", "Host"):
            self.assertNotIn(gone, names)
        self.assertTrue(rq.header["Via"].value[-1].startswith("gRPC/1.0 kasd/"), rq.header["Via"])
        self.assertFalse(hdr.HasField("extra"))  # no impersonation for this token
        self.assertEqual(hdr.content_length, 0)
        self.assertTrue(trailer)
        self.assertEqual(req_body, b"")
        self.assertNotIn("kas-hop-routing-agent-id", meta)

    def test_impersonation_in_extra(self):
        r, _ = self.request("GET", "/k8s-proxy/version", self.auth(IMP_TOKEN))
        self.assertEqual(r.status, 404)
        hdr = self.last()[0]
        self.assertEqual(hdr.extra.type_url, "type.googleapis.com/gitlab.agent.kubernetes_api.rpc.HeaderExtra")
        ex = kaspb.kubernetes_api_rpc.HeaderExtra()
        ex.ParseFromString(hdr.extra.value)
        self.assertEqual(ex.imp_config.username, "alice")
        self.assertEqual(list(ex.imp_config.groups), ["devs", "ops"])
        self.assertEqual(ex.imp_config.uid, "42")

    def test_body_both_ways_and_response_headers(self):
        payload = os.urandom(3 * 1024 * 1024 + 17)  # beyond the 1 MiB window: flow control both ways
        r, body = self.request("POST", "/k8s-proxy/echo", self.auth(), body=payload)
        self.assertEqual(r.status, 201)
        self.assertEqual(body, payload)
        hdr, req_body, _, _ = self.last()
        self.assertEqual(hdr.content_length, len(payload))
        self.assertEqual(req_body, payload)
        self.assertEqual(r.getheader("X-Multi"), "a, b")
        for gone in ("X-Drop-Me", "Keep-Alive"):
            self.assertIsNone(r.getheader(gone), gone)
        self.assertEqual(r.getheader("Server"), "kasd")  # the agent's Server is dropped
        self.assertIn("gRPC/1.0 kasd/", r.getheader("Via"))

    def test_body_over_limit_refused(self):
        c = http.client.HTTPConnection(self.host, self.port, timeout=10)
        c.putrequest("POST", "/k8s-proxy/echo")
        for k, v in dict(self.auth(), **{"Content-Length": "4000001"}).items():
            c.putheader(k, v)
        c.endheaders()
        r = c.getresponse()
        self.assertEqual(r.status, 413)
        c.close()

    def status_of(self, r, body):
        st = json.loads(body)
        self.assertEqual((st["kind"], st["apiVersion"], st["status"]), ("Status", "v1", "Failure"))
        self.assertEqual(st["code"], r.status)
        return st

    def test_credentials(self):
        cases = [
            ({}, 401, "no valid credentials"),
            ({"Authorization": "Basic dTpw"}, 401, ""),
            (self.auth(kind="xyz"), 401, ""),
            ({"Authorization": f"Bearer pat:x:{USER_TOKEN}"}, 401, ""),
            (self.auth(token="wrong-token-0123456789"), 401, ""),
            (self.auth(agent=99), 403, "agentId is not allowed"),
            (self.auth(IMP_TOKEN, agent=OTHER), 403, "agentId is not allowed"),
        ]
        n = len(self.rec.requests)
        for headers, code, _ in cases:
            r, body = self.request("GET", "/k8s-proxy/api", headers)
            self.assertEqual(r.status, code, headers)
            st = self.status_of(r, body)
            self.assertTrue(st["message"].startswith("GitLab Agent Server: "), st)
            self.assertEqual(r.getheader("Gitlab-Unauthorized"), "true" if code == 401 else None)
            self.assertNotIn(USER_TOKEN, body.decode())
        self.assertEqual(len(self.rec.requests), n)  # none reached the agent
        self.assertGreaterEqual(metric(self.kasd, "kasd_kubernetes_api_requests_total", outcome="unauthorized"), 5)

    def test_prefix_and_bad_path(self):
        r, body = self.request("GET", "/api/v1/pods", self.auth())
        self.assertEqual(r.status, 400)
        self.assertIn("prefix", self.status_of(r, body)["message"])
        r, body = self.request("GET", "/k8s-proxy/a%zz", self.auth())
        self.assertEqual(r.status, 400)

    def test_cors(self):
        r, _ = self.request("GET", "/k8s-proxy/api", dict(self.auth(), Origin="https://evil.example"))
        self.assertEqual(r.status, 403)
        r, _ = self.request("OPTIONS", "/k8s-proxy/api", {"Origin": ORIGIN,
                                                          "Access-Control-Request-Headers": "authorization"})
        self.assertEqual(r.status, 200)
        self.assertEqual(r.getheader("Access-Control-Allow-Origin"), ORIGIN)
        self.assertEqual(r.getheader("Access-Control-Allow-Headers"), "authorization")
        self.assertIn("PATCH", r.getheader("Access-Control-Allow-Methods"))
        r, _ = self.request("GET", "/k8s-proxy/nothing", dict(self.auth(), Origin=ORIGIN))
        self.assertEqual(r.status, 404)
        self.assertEqual(r.getheader("Access-Control-Allow-Origin"), ORIGIN)
        self.assertEqual(r.getheader("Access-Control-Allow-Credentials"), "true")

    def test_agent_not_connected(self):
        t0 = time.monotonic()
        r, body = self.request("GET", "/k8s-proxy/api", self.auth(agent=OTHER))
        self.assertEqual(r.status, 504)
        self.assertIn("not connected", self.status_of(r, body)["message"])
        self.assertLess(time.monotonic() - t0, 5)

    def test_upgrade_without_101_is_a_plain_answer(self):
        """An upgrade the API server does not accept (here 404) is answered like any request; the
        agent saw the Upgrade and Connection: upgrade that kas puts back."""
        h = dict(self.auth(), Connection="Upgrade", Upgrade="SPDY/3.1")
        r, body = self.request("POST", "/k8s-proxy/api/v1/namespaces/d/pods/p/exec", h)
        self.assertEqual(r.status, 404)
        self.assertEqual(body, b"no such path\n")
        rq = self.last()[0].request
        self.assertEqual(list(rq.header["Upgrade"].value), ["SPDY/3.1"])
        self.assertEqual(list(rq.header["Connection"].value), ["upgrade"])

    def test_streaming_and_client_cancel(self):
        self.rec.release.clear()
        self.rec.cancelled.clear()
        c = http.client.HTTPConnection(self.host, self.port, timeout=10)
        c.request("GET", "/k8s-proxy/watch?watch=true", headers=self.auth())
        r = c.getresponse()
        self.assertEqual(r.status, 200)
        self.assertEqual(r.getheader("Transfer-Encoding"), "chunked")
        self.assertEqual(r.readline(), b'{"type":"ADDED"}\n')  # before the agent sends more
        self.rec.release.set()
        self.assertEqual(r.readline(), b'{"type":"MODIFIED"}\n')
        c.sock.shutdown(socket.SHUT_RDWR)
        c.close()
        self.assertTrue(self.rec.cancelled.wait(10), "the agent's call was not cancelled")
        self.assertTrue(wait_until(lambda: metric(self.kasd, "kasd_kubernetes_api_requests_active") == 0, 10))

    def test_agent_error_after_headers_cuts_the_body(self):
        c = http.client.HTTPConnection(self.host, self.port, timeout=10)
        c.request("GET", "/k8s-proxy/cut", headers=self.auth())
        r = c.getresponse()
        self.assertEqual(r.status, 200)
        with self.assertRaises(http.client.IncompleteRead):
            r.read()
        c.close()

    def test_sighup_reloads_the_access_tokens(self):
        path = os.path.join(self.dir, "access.yaml")
        with open(path) as f:
            original = f.read()
        new_token = "k8s-added-by-reload-0123456789"
        try:
            r, _ = self.request("GET", "/k8s-proxy/nothing", self.auth(new_token))
            self.assertEqual(r.status, 401)
            with open(path, "w") as f:
                f.write(original + f"  - {{token: {new_token}, agents: [{AGENT}]}}\n")
            self.kasd.signal(signal.SIGHUP)
            self.kasd.wait_event("access_tokens_reloaded", 10)
            r, _ = self.request("GET", "/k8s-proxy/nothing", self.auth(new_token))
            self.assertEqual(r.status, 404)  # the agent's answer: the token is known now
            # a broken file keeps the tokens in use
            with open(path, "w") as f:
                f.write("users: [\n")
            self.kasd.signal(signal.SIGHUP)
            self.kasd.wait_event("access_tokens_reload_failed", 10)
            r, _ = self.request("GET", "/k8s-proxy/nothing", self.auth(new_token))
            self.assertEqual(r.status, 404)
        finally:
            with open(path, "w") as f:
                f.write(original)

    def test_agent_cannot_split_the_response(self):
        """An agent's Content-Length is not passed on (h2o would not hold the body to it): what it sends
        is one body, and the kept-alive connection still carries the next request."""
        c = http.client.HTTPConnection(self.host, self.port, timeout=10)
        c.request("GET", "/k8s-proxy/smuggle", headers=self.auth())
        r = c.getresponse()
        self.assertIsNone(r.getheader("Content-Length"))
        self.assertEqual(r.read(), b"hello" + b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED")
        c.request("GET", "/k8s-proxy/nothing", headers=self.auth())
        r = c.getresponse()
        self.assertEqual((r.status, r.read()), (404, b"no such path\n"))
        c.close()

    def test_garbage_from_agent_is_502(self):
        r, body = self.request("GET", "/k8s-proxy/garbage", self.auth())
        self.assertEqual(r.status, 502)
        self.status_of(r, body)


if __name__ == "__main__":
    unittest.main()
