"""Self-test of fake_gitlab.py (not a kasd test, not registered in meson): drives the stand-in GitLab
with urllib/http.client and checks the JWT rules, each endpoint's answers and every test knob.

    python3 test/integration/fake_gitlab_selftest.py
"""
import base64
import http.client
import json
import os
import sys
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fake_gitlab import FakeGitLab, allowed_agent, load_secret, make_kas_jwt  # noqa: E402

SECRET = bytes(range(32))
AGENT_INFO = "/api/v4/internal/kubernetes/agent_info"
AUTHORIZE = "/api/v4/internal/kubernetes/authorize_proxy_user"
ALLOWED = "/api/v4/job/allowed_agents"


def call(g, path, *, method="GET", headers=None, body=None, jwt=True, timeout=5):
    """(status, parsed JSON or None, response headers)."""
    h = dict(headers or {})
    if jwt is True:
        h["Gitlab-Kas-Api-Request"] = make_kas_jwt(SECRET)
    elif isinstance(jwt, str):
        h["Gitlab-Kas-Api-Request"] = jwt
    data = None
    if body is not None:
        data = json.dumps(body).encode() if not isinstance(body, bytes) else body
        h.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(g.url + path, data=data, headers=h, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else None, r.headers
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, json.loads(raw) if raw else None, e.headers


def agent_info(g, token, **kw):
    return call(g, AGENT_INFO, headers={"Authorization": f"Bearer {token}"}, **kw)


class Base(unittest.TestCase):
    def setUp(self):
        self.g = FakeGitLab(SECRET).start()
        self.addCleanup(self.g.stop)
        self.g.add_agent("tok-7", agent_id=7, project_id=70, name="seven")


class Jwt(Base):
    def test_valid_token(self):
        status, obj, _ = agent_info(self.g, "tok-7")
        self.assertEqual(status, 200)
        self.assertEqual(self.g.requests[-1].jwt["iss"], "gitlab-kas")
        status, _, _ = agent_info(self.g, "tok-7", jwt=make_kas_jwt(SECRET, aud=["x", "gitlab"]))
        self.assertEqual(status, 200, "aud may be a list holding gitlab")

    def test_refusals(self):
        now = int(time.time())
        bad = {
            "missing": False,
            "garbage": "not-a-jwt",
            "wrong secret": make_kas_jwt(SECRET, sign_with=b"x" * 32),
            "wrong issuer": make_kas_jwt(SECRET, iss="gitlab"),
            "no issuer": make_kas_jwt(SECRET, iss=None),
            "wrong audience": make_kas_jwt(SECRET, aud="gitlab-kas"),
            "no audience": make_kas_jwt(SECRET, aud=None),
            "expired": make_kas_jwt(SECRET, exp=now - 1),
            "not yet valid": make_kas_jwt(SECRET, nbf=now + 60, exp=now + 120),
            "HS512": make_kas_jwt(SECRET, alg="HS512"),
            "alg none": make_kas_jwt(SECRET, alg="none"),
        }
        for why, jwt in bad.items():
            with self.subTest(why):
                status, obj, _ = agent_info(self.g, "tok-7", jwt=jwt)
                self.assertEqual(status, 401)
                self.assertEqual(obj, {"message": "KAS JWT authentication invalid"})
        self.assertEqual(self.g.count("jwt_refused"), len(bad))
        self.assertEqual(self.g.count("agent_info"), len(bad))

    def test_job_api_jwt_knob(self):
        self.g.add_job("job-1", job_id=1, pipeline_id=2, project_id=3, user_id=4, username="u")
        hdr = {"Job-Token": "job-1"}
        self.assertEqual(call(self.g, ALLOWED, headers=hdr, jwt=False)[0], 401, "strict by default")
        self.g.jwt_on_job_api = False
        self.assertEqual(call(self.g, ALLOWED, headers=hdr, jwt=False)[0], 200, "as GitLab does")


class AgentInfo(Base):
    def test_known_token(self):
        status, obj, headers = agent_info(self.g, "tok-7")
        self.assertEqual(status, 200)
        self.assertEqual(headers["Content-Type"], "application/json")
        self.assertEqual(set(obj), {"project_id", "agent_id", "agent_name", "gitaly_info", "gitaly_repository",
                                    "default_branch"})
        self.assertEqual((obj["project_id"], obj["agent_id"], obj["agent_name"]), (70, 7, "seven"))
        self.assertEqual(set(obj["gitaly_info"]), {"address", "token", "features"})
        self.assertEqual(set(obj["gitaly_repository"]),
                         {"storage_name", "relative_path", "gl_repository", "gl_project_path"})
        self.assertEqual(obj["default_branch"], "main")
        status, obj2, _ = call(self.g, "/api/v4/internal/agents/agentk/agent_info",
                               headers={"Authorization": "Bearer tok-7"})
        self.assertEqual((status, obj2), (200, obj), "the newer path answers the same")

    def test_unknown_missing_revoked_and_on_demand(self):
        self.assertEqual(agent_info(self.g, "nope")[:2], (401, {"message": "401 Unauthorized"}))
        self.assertEqual(call(self.g, AGENT_INFO)[0], 401, "no Authorization")
        self.assertEqual(call(self.g, AGENT_INFO, headers={"Authorization": "Basic tok-7"})[0], 401)
        self.g.set_agent_status("tok-7", 403)
        self.assertEqual(agent_info(self.g, "tok-7")[:2], (403, {"message": "403 Forbidden"}))
        self.g.set_agent_status("tok-7", 404)
        self.assertEqual(agent_info(self.g, "tok-7")[0], 404)
        self.g.set_agent_status("tok-7", None)
        self.assertEqual(agent_info(self.g, "tok-7")[0], 200)
        self.g.revoke_agent("tok-7")
        self.assertEqual(agent_info(self.g, "tok-7")[0], 401)

    def test_unknown_path_and_method(self):
        self.assertEqual(call(self.g, "/api/v4/nothing")[0], 404)
        self.assertEqual(call(self.g, AGENT_INFO, method="POST", body={})[0], 405)
        self.assertEqual(self.g.count("other"), 2)


class AuthorizeProxyUser(Base):
    def setUp(self):
        super().setUp()
        self.g.add_user("glpat-1", user_id=100, username="alice")
        self.g.add_user("glpat-rev", user_id=101, username="bob", revoked=True)
        self.g.add_user("cookie-1", user_id=102, username="carol", access_type="session_cookie",
                        csrf_token="csrf-1")
        self.g.grant(7, 100)
        self.g.grant(7, 102, {"user": {"projects": [{"id": 70, "roles": ["developer"]}], "groups": []}})

    def post(self, body, **kw):
        return call(self.g, AUTHORIZE, method="POST", body=body, **kw)[:2]

    def test_access_as_agent(self):
        status, obj = self.post({"agent_id": 7, "access_type": "personal_access_token", "access_key": "glpat-1"})
        self.assertEqual(status, 200)
        self.assertEqual(obj, {"agent": {"id": 7, "config_project": {"id": 70}},
                               "user": {"id": 100, "username": "alice"}, "access_as": {"agent": {}}})
        self.assertEqual(self.g.count("authorize_proxy_user"), 1)

    def test_session_cookie_access_as_user(self):
        status, obj = self.post({"agent_id": "7", "access_type": "session_cookie", "access_key": "cookie-1",
                                 "csrf_token": "csrf-1"})
        self.assertEqual(status, 200)
        self.assertEqual(obj["access_as"], {"user": {"projects": [{"id": 70, "roles": ["developer"]}],
                                                     "groups": []}})
        self.assertEqual(self.post({"agent_id": 7, "access_type": "session_cookie", "access_key": "cookie-1",
                                    "csrf_token": "other"})[0], 401)
        self.assertEqual(self.post({"agent_id": 7, "access_type": "session_cookie", "access_key": "cookie-x",
                                    "csrf_token": "csrf-1"})[0], 401)
        self.assertEqual(self.post({"agent_id": 7, "access_type": "session_cookie", "access_key": "cookie-1"})[0],
                         400, "csrf_token is required for cookies")

    def test_chunked_body_is_refused(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.g.port, timeout=5)
        conn.request("POST", AUTHORIZE, body=iter([b'{"agent_id": 7}']), encode_chunked=True,
                     headers={"Transfer-Encoding": "chunked", "Gitlab-Kas-Api-Request": make_kas_jwt(SECRET)})
        self.assertEqual(conn.getresponse().status, 411, "the fake reads Content-Length bodies only")
        conn.close()

    def test_refusals(self):
        pat = {"access_type": "personal_access_token"}
        self.assertEqual(self.post({**pat, "agent_id": 7, "access_key": "glpat-x"})[0], 400)
        self.assertEqual(self.post({**pat, "agent_id": 7, "access_key": "glpat-rev"})[0], 401)
        self.assertEqual(self.post({**pat, "agent_id": 8, "access_key": "glpat-1"})[0], 404)
        self.g.add_agent("tok-9", agent_id=9, project_id=90)
        self.assertEqual(self.post({**pat, "agent_id": 9, "access_key": "glpat-1"}),
                         (403, {"message": "403 Forbidden"}))
        status, obj = self.post({"access_type": "oidc", "agent_id": 7, "access_key": "k"})
        self.assertEqual(status, 400)
        self.assertIn("access_type", obj["error"])
        status, obj = self.post({"access_type": "personal_access_token"})
        self.assertEqual((status, obj["error"]), (400, "agent_id is missing, access_key is missing"))
        self.assertEqual(self.post(b"[1")[0], 400)
        self.assertEqual(self.post({**pat, "agent_id": 7, "access_key": "glpat-1"}, jwt=False)[0], 401)


class AllowedAgents(Base):
    def test_shape(self):
        self.g.add_job("job-1", job_id=11, pipeline_id=12, project_id=13, user_id=14, username="ci-user",
                       groups=[23, 25], roles_in_project=["reporter", "developer", "maintainer"],
                       allowed_agents=[allowed_agent(7, 70, default_namespace="ns", access_as={"ci_job": {}}),
                                       allowed_agent(9, 90)],
                       environment={"slug": "prod", "tier": "production"})
        status, obj, _ = call(self.g, ALLOWED, headers={"Job-Token": "job-1"})
        self.assertEqual(status, 200)
        self.assertEqual(obj, {
            "allowed_agents": [
                {"id": 7, "config_project": {"id": 70},
                 "configuration": {"default_namespace": "ns", "access_as": {"ci_job": {}}}},
                {"id": 9, "config_project": {"id": 90}, "configuration": {}},
            ],
            "job": {"id": 11}, "pipeline": {"id": 12}, "project": {"id": 13, "groups": [{"id": 23}, {"id": 25}]},
            "user": {"id": 14, "username": "ci-user", "roles_in_project": ["reporter", "developer", "maintainer"]},
            "environment": {"slug": "prod", "tier": "production"},
        })
        status, obj, _ = call(self.g, ALLOWED + "?job_token=job-1")
        self.assertEqual(status, 200, "the job token as a parameter")

    def test_unknown_and_on_demand(self):
        self.assertEqual(call(self.g, ALLOWED, headers={"Job-Token": "nope"})[0], 401)
        self.assertEqual(call(self.g, ALLOWED)[0], 401)
        self.g.add_job("job-2", job_id=1, pipeline_id=2, project_id=3, user_id=4, username="u", status=403)
        self.assertEqual(call(self.g, ALLOWED, headers={"Job-Token": "job-2"})[0], 403)
        self.g.add_job("job-3", job_id=1, pipeline_id=2, project_id=3, user_id=4, username="u")
        status, obj, _ = call(self.g, ALLOWED, headers={"Job-Token": "job-3"})
        self.assertEqual(status, 200)
        self.assertNotIn("environment", obj, "absent when the job has none")
        self.assertEqual(self.g.count("allowed_agents"), 4)


class Knobs(Base):
    def test_counts_and_wait(self):
        for _ in range(3):
            agent_info(self.g, "tok-7")
        self.assertEqual(self.g.counts, {"agent_info": 3})
        threading.Timer(0.2, agent_info, args=(self.g, "tok-7")).start()
        self.assertEqual(self.g.wait_for_count("agent_info", 4, timeout=5), 4)
        self.assertEqual(self.g.wait_for_count("agent_info", 9, timeout=0.2), 4, "gives up at the timeout")
        self.g.reset_counts()
        self.assertEqual(self.g.count("agent_info"), 0)
        self.assertEqual(self.g.requests, [])

    def test_delay(self):
        self.g.delay = 0.3
        t = time.monotonic()
        self.assertEqual(agent_info(self.g, "tok-7")[0], 200)
        self.assertGreaterEqual(time.monotonic() - t, 0.3)
        self.g.delay = 0
        self.g.delays["allowed_agents"] = 5
        t = time.monotonic()
        self.assertEqual(agent_info(self.g, "tok-7")[0], 200)
        self.assertLess(time.monotonic() - t, 2, "a delay for another endpoint does not apply")

    def test_fail(self):
        self.g.fail(503, times=2)
        self.assertEqual(agent_info(self.g, "tok-7")[:2], (503, {"message": "503 Error"}))
        self.assertEqual(agent_info(self.g, "tok-7", jwt=False)[0], 503, "before the JWT check")
        self.assertEqual(agent_info(self.g, "tok-7")[0], 200, "only `times` requests")
        self.g.fail(500, endpoint="allowed_agents", body={"message": "boom"})
        self.assertEqual(agent_info(self.g, "tok-7")[0], 200, "another endpoint")
        self.assertEqual(call(self.g, ALLOWED, headers={"Job-Token": "x"})[:2], (500, {"message": "boom"}))
        self.assertEqual(call(self.g, ALLOWED, headers={"Job-Token": "x"})[0], 500, "until fail(None)")
        self.g.fail(None)
        self.assertEqual(call(self.g, ALLOWED, headers={"Job-Token": "x"})[0], 401)
        self.assertEqual(self.g.count("agent_info"), 4)
        self.assertEqual([r.status for r in self.g.requests], [503, 503, 200, 200, 500, 500, 401])

    def test_go_away_and_come_back(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.g.port, timeout=5)
        conn.request("GET", AGENT_INFO, headers={"Authorization": "Bearer tok-7",
                                                 "Gitlab-Kas-Api-Request": make_kas_jwt(SECRET)})
        self.assertEqual(conn.getresponse().read() and 200, 200)
        port = self.g.port
        self.g.go_away()
        with self.assertRaises(urllib.error.URLError) as cm:
            agent_info(self.g, "tok-7", timeout=2)
        self.assertIsInstance(cm.exception.reason, ConnectionRefusedError)
        # the open keep-alive connection was cut too
        with self.assertRaises((ConnectionError, http.client.HTTPException, OSError)):
            conn.request("GET", AGENT_INFO, headers={"Authorization": "Bearer tok-7"})
            conn.getresponse().read()
        conn.close()
        self.g.come_back()
        self.assertEqual(self.g.port, port)
        self.assertEqual(agent_info(self.g, "tok-7")[0], 200)

    def test_hang_and_come_back(self):
        self.g.go_away(hang=True)
        t = time.monotonic()
        with self.assertRaises((TimeoutError, urllib.error.URLError, OSError)):
            agent_info(self.g, "tok-7", timeout=0.5)
        self.assertLess(time.monotonic() - t, 3)
        out = []
        th = threading.Thread(target=lambda: out.append(agent_info(self.g, "tok-7", timeout=10)[0]))
        th.start()
        time.sleep(0.3)
        self.assertEqual(out, [], "nothing answered while hanging")
        self.g.come_back()
        th.join(10)
        self.assertEqual(out, [200], "a request that waited is answered once back")
        self.assertEqual(agent_info(self.g, "tok-7")[0], 200)

    def test_keep_alive(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.g.port, timeout=5)
        hdr = {"Authorization": "Bearer tok-7", "Gitlab-Kas-Api-Request": make_kas_jwt(SECRET)}
        conn.request("GET", AGENT_INFO, headers=hdr)
        r = conn.getresponse()
        r.read()
        sock = conn.sock
        self.assertIsNone(r.getheader("Connection"))
        conn.request("GET", AGENT_INFO, headers=hdr)
        r = conn.getresponse()
        r.read()
        self.assertIs(conn.sock, sock, "the same connection carried both")
        self.g.keep_alive = False
        conn.request("GET", AGENT_INFO, headers=hdr)
        r = conn.getresponse()
        r.read()
        self.assertEqual(r.getheader("Connection"), "close")
        conn.close()

    def test_secret_file(self):
        with tempfile.NamedTemporaryFile("w", delete=False) as f:
            f.write(base64.b64encode(SECRET).decode() + "\n")
        self.addCleanup(os.unlink, f.name)
        self.assertEqual(load_secret(f.name), SECRET)
        g = FakeGitLab.from_secret_file(f.name)
        with g:
            g.add_agent("t", agent_id=1, project_id=2)
            self.assertEqual(agent_info(g, "t")[0], 200)


if __name__ == "__main__":
    unittest.main(verbosity=2)
