"""kasd's listeners over TLS (the configured backend): gRPC with ALPN h2 on the agent and api
listeners, mTLS on the private listener, a routed call end to end through TLS on both faces, and
clear log lines for failed handshakes. Certificates: test/certs (KD_TEST_CERTS)."""
import base64
import os
import socket
import ssl
import sys
import tempfile
import unittest

import grpc

sys.path.insert(0, os.path.dirname(__file__))
import gitlab_client  # noqa: E402
from agentk import AgentK  # noqa: E402
from gitlab_client import GitLabClient  # noqa: E402
from kasd_harness import Kasd  # noqa: E402

CERTS = os.environ.get("KD_TEST_CERTS", os.path.join(os.path.dirname(__file__), "..", "certs"))


def read(name):
    with open(os.path.join(CERTS, name), "rb") as f:
        return f.read()


class Tls(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        d = tempfile.mkdtemp(prefix="kasd-tls-")
        cls.token = base64.urlsafe_b64encode(os.urandom(24)).decode()
        with open(os.path.join(d, "tokens.yaml"), "w") as f:
            f.write(f"agents:\n  - token: \"{cls.token}\"\n    agent_id: 5\n    project_id: 1\n"
                    "    agent_name: tls-agent\n")
        cls.secret = gitlab_client.generate_secret()
        gitlab_client.write_secret(os.path.join(d, "api-secret"), cls.secret)
        c = CERTS
        tls = f"    certificate_file: {c}/server.pem\n    key_file: {c}/server.key\n"
        cfg = (f"shards: 2\nagent:\n  listen:\n    address: 127.0.0.1:0\n{tls}  token_file: {d}/tokens.yaml\n"
               f"api:\n  listen:\n    address: 127.0.0.1:0\n{tls}    authentication_secret_file: {d}/api-secret\n"
               f"private_api:\n  listen:\n    address: 127.0.0.1:0\n{tls}    client_ca_file: {c}/ca.pem\n"
               "observability:\n  listen:\n    address: 127.0.0.1:0\n")
        cls.kasd = Kasd(config=cfg)
        assert cls.kasd.started, cls.kasd.log()
        cls.creds = grpc.ssl_channel_credentials(root_certificates=read("ca.pem"))

    @classmethod
    def tearDownClass(cls):
        rc = cls.kasd.stop()
        cls.kasd.kill()
        assert rc == 0, cls.kasd.log()

    def addr(self, name):
        return "localhost:%d" % self.kasd.listeners[name][1]

    def health(self, ch):
        return ch.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=10)

    def test_listeners_announce_tls(self):
        protos = {ev["listener"]: ev.get("protocol") for ev in self.kasd.events if ev.get("event") == "listening"}
        self.assertEqual(protos, {"agent": "grpc+tls", "api": "grpc+tls", "private_api": "grpc+tls",
                                  "observability": "http/1.1+h2c"})

    def test_health_over_tls(self):
        for name in ("agent", "api"):
            with grpc.secure_channel(self.addr(name), self.creds) as ch:
                self.assertEqual(self.health(ch), b"\x08\x01")

    def metric(self, name, **labels):
        """Sum of the series of `name` on /metrics whose labels include `labels`."""
        import re
        import urllib.request
        host, port = self.kasd.listeners["observability"]
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        total = 0.0
        for line in text.splitlines():
            m = re.match(r'^([a-z_0-9]+)\{([^}]*)\} (\S+)$', line)
            if m and m.group(1) == name:
                got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
                if all(got.get(k) == v for k, v in labels.items()):
                    total += float(m.group(3))
        return total

    def test_private_listener_requires_client_certificate(self):
        ok0 = self.metric("kasd_listener_tls_handshakes_total", listener="private_api")
        bad0 = self.metric("kasd_listener_tls_handshake_failures_total", listener="private_api")
        good = grpc.ssl_channel_credentials(read("ca.pem"), read("client.key"), read("client.pem"))
        with grpc.secure_channel(self.addr("private_api"), good) as ch:
            self.assertEqual(self.health(ch), b"\x08\x01")
        for creds in (self.creds,  # no client certificate
                      grpc.ssl_channel_credentials(read("ca.pem"), read("other-client.key"),
                                                   read("other-client.pem"))):  # unknown issuer
            with grpc.secure_channel(self.addr("private_api"), creds) as ch:
                with self.assertRaises(grpc.RpcError) as cm:
                    self.health(ch)
                self.assertEqual(cm.exception.code(), grpc.StatusCode.UNAVAILABLE)
        self.kasd.wait_event("tls_handshake_failed", 5)
        reasons = [ev.get("reason", "") for ev in self.kasd.events if ev.get("event") == "tls_handshake_failed"]
        self.assertTrue(all(r and "i/o error" not in r.lower() for r in reasons), reasons)
        # and counted, by listener
        self.assertGreaterEqual(self.metric("kasd_listener_tls_handshakes_total", listener="private_api") - ok0, 1)
        self.assertGreaterEqual(
            self.metric("kasd_listener_tls_handshake_failures_total", listener="private_api") - bad0, 2)

    def test_plaintext_to_tls_port_is_refused_and_logged(self):
        with grpc.insecure_channel("127.0.0.1:%d" % self.kasd.listeners["agent"][1]) as ch:
            with self.assertRaises(grpc.RpcError) as cm:
                self.health(ch)
            self.assertEqual(cm.exception.code(), grpc.StatusCode.UNAVAILABLE)

    def test_tls12_and_tls13_handshakes(self):
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            ctx = ssl.create_default_context(cadata=read("ca.pem").decode())
            ctx.minimum_version = ctx.maximum_version = version
            ctx.set_alpn_protocols(["h2"])
            with socket.create_connection(self.kasd.listeners["agent"], timeout=5) as raw:
                with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                    self.assertEqual(s.selected_alpn_protocol(), "h2")
                    self.assertEqual(s.version(), "TLSv1.3" if version == ssl.TLSVersion.TLSv1_3 else "TLSv1.2")

    def test_routed_call_through_tls_on_both_faces(self):
        agent = AgentK(self.addr("agent"), self.token, pods=1, idle=2, root_certificates=read("ca.pem"),
                       server_name="localhost")
        agent.start()
        try:
            agent.wait_for(lambda s: s["tunnels_idle"] >= 2, timeout=15)
            gl = GitLabClient(self.addr("api"), self.secret, root_certificates=read("ca.pem"))
            data, _ = gl.unary("/test.Echo/Unary", b"over tls", agent_id=5, timeout=10)
            self.assertEqual(data, b"over tls")
            gl.close()
        finally:
            agent.stop(2)


if __name__ == "__main__":
    result = unittest.main(exit=False, verbosity=2).result
    failed = len(result.failures) + len(result.errors)
    print(f"{result.testsRun - failed - len(result.skipped)} passed, {failed} failed, "
          f"{len(result.skipped)} skipped")
    sys.exit(1 if failed else 0)
