"""A stand-in for the parts of GitLab's API that kas calls, for tests of kasd's GitLab integration.
Python 3 standard library only; HTTP/1.1 with keep-alive, threaded, on 127.0.0.1 at a free port.

    g = FakeGitLab(secret_bytes).start()      # or FakeGitLab.from_secret_file(path); or `with`
    g.url                                     # "http://127.0.0.1:PORT" (gitlab.address for kasd)
    g.add_agent("agent-token", agent_id=7, project_id=70, name="my-agent")
    ...
    g.stop()

Every request must carry `Gitlab-Kas-Api-Request: <JWT>`: HS256 over the shared secret (the bytes
GitLab keeps base64-encoded in the file kas reads), "iss": "gitlab-kas", "aud": "gitlab" (a string
or a list holding it), "exp" in the future ("nbf", when present, in the past); else 401
{"message": "KAS JWT authentication invalid"}, as GitLab answers. Real GitLab checks this JWT only
under /api/v4/internal/ (kas sends none to /api/v4/job/allowed_agents); set
g.jwt_on_job_api = False to behave like that.

Endpoints (JSON shapes as GitLab's Rails code and gitlab-agent's client read them):
  GET  /api/v4/internal/kubernetes/agent_info   (and /api/v4/internal/agents/agentk/agent_info)
       Authorization: Bearer <agent token> -> 200 {"project_id", "agent_id", "agent_name",
       "gitaly_info": {"address", "token", "features"}, "gitaly_repository": {"storage_name",
       "relative_path", "gl_repository", "gl_project_path"}, "default_branch"}; unknown or revoked
       token: 401; add_agent(..., status=403/404) answers that status instead.
  POST /api/v4/internal/kubernetes/authorize_proxy_user
       {"agent_id", "access_type": "personal_access_token"|"session_cookie", "access_key",
       "csrf_token"} -> 200 {"agent": {"id", "config_project": {"id"}}, "user": {"id", "username"},
       "access_as": {"agent": {}} | {"user": {"projects": [{"id", "roles"}], "groups": [...]}}};
       missing or invalid parameters 400 {"error"}; unknown personal access token 400 (GitLab:
       "Unable to get user from request data"); revoked token, unknown session or CSRF mismatch
       401; unknown agent 404; user without access to the agent 403.
  GET  /api/v4/job/allowed_agents
       Job-Token: <CI job token> -> 200 {"allowed_agents": [{"id", "config_project": {"id"},
       "configuration": {"default_namespace", "access_as"}}], "job": {"id"}, "pipeline": {"id"},
       "project": {"id", "groups": [{"id"}]}, "user": {"id", "username", "roles_in_project"},
       "environment": {"slug", "tier"} (only when set)}; unknown token 401.
  Anything else: 404 {"message": "404 Not Found"}; a known path with another method 405; a request
  body without Content-Length (chunked) 411: kas sends lengths, and this fake reads nothing else.

Knobs for tests (all thread-safe, all take effect on the next request):
  g.count("agent_info"), g.counts (a dict copy), g.reset_counts(), g.wait_for_count(name, n):
      requests per endpoint ("agent_info", "authorize_proxy_user", "allowed_agents", "other"),
      counted on arrival, before any delay, failure or check; refused JWTs also count under
      "jwt_refused".
  g.delay = seconds, g.delays["agent_info"] = seconds: sleep before answering.
  g.fail(503, endpoint=None, times=None, body=None): answer with that status (all endpoints or
      one; `times` requests, or until g.fail(None)), before the JWT is looked at (a GitLab that
      is down answers 502/503 whoever asks).
  g.go_away(): stop accepting and cut open connections (connect() is refused);
  g.go_away(hang=True): keep the port but answer nothing (connect() succeeds, requests wait);
  g.come_back(): serve again on the same port.
  g.keep_alive = False: answer with Connection: close.
  g.requests: every request as a Request (endpoint, method, path, headers, body, status, jwt).

Run alone (python3 fake_gitlab.py --secret-file F [--port N] [--agent TOKEN:AGENT_ID:PROJECT_ID]...)
it prints its URL and serves until interrupted.
"""
import argparse
import base64
import collections
import hashlib
import hmac
import http.server
import json
import socket
import socketserver
import sys
import threading
import time
import urllib.parse

JWT_HEADER = "Gitlab-Kas-Api-Request"
JWT_ISSUER = "gitlab-kas"
JWT_AUDIENCE = "gitlab"

ENDPOINTS = {
    ("GET", "/api/v4/internal/kubernetes/agent_info"): "agent_info",
    ("GET", "/api/v4/internal/agents/agentk/agent_info"): "agent_info",
    ("POST", "/api/v4/internal/kubernetes/authorize_proxy_user"): "authorize_proxy_user",
    ("GET", "/api/v4/job/allowed_agents"): "allowed_agents",
}
_PATHS = {path for _, path in ENDPOINTS}
ACCESS_TYPES = ("session_cookie", "personal_access_token")
_REASONS = {400: "Bad request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found"}


def _b64url(data):
    if isinstance(data, str):
        data = data.encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_decode(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def load_secret(path):
    """The secret bytes from a file as GitLab writes it (base64, trailing newline allowed)."""
    with open(path, "rb") as f:
        return base64.b64decode(f.read().strip(), validate=True)


def make_kas_jwt(secret, *, iss=JWT_ISSUER, aud=JWT_AUDIENCE, ttl=5, now=None, exp=None, nbf=None,
                 alg="HS256", sign_with=None, claims=None):
    """A token as kas sends it in Gitlab-Kas-Api-Request (exp = now + 5 s, nbf = now - 5 s, like
    gitlab-agent's client). Pass iss/aud None to omit them, exp/nbf to override, alg "none" for an
    unsigned token, sign_with for a wrong key."""
    now = int(time.time()) if now is None else int(now)
    payload = {"iat": now, "nbf": now - 5 if nbf is None else nbf, "exp": now + ttl if exp is None else exp}
    if iss is not None:
        payload["iss"] = iss
    if aud is not None:
        payload["aud"] = aud
    payload.update(claims or {})
    head = _b64url(json.dumps({"alg": alg, "typ": "JWT"}, separators=(",", ":")))
    body = _b64url(json.dumps(payload, separators=(",", ":")))
    if alg.lower() == "none":
        return f"{head}.{body}."
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    key = secret if sign_with is None else sign_with
    sig = hmac.new(key, f"{head}.{body}".encode(), digest).digest()
    return f"{head}.{body}.{_b64url(sig)}"


def verify_kas_jwt(token, secret, *, leeway=0, now=None):
    """The payload of a valid kas token, or raise ValueError saying why. HS256 only (GitLab decodes
    with algorithm HS256), iss gitlab-kas, aud gitlab, exp required and in the future, nbf (if any)
    in the past."""
    if not token:
        raise ValueError("no token")
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("not three parts")
    try:
        head = json.loads(_b64url_decode(parts[0]))
        payload = json.loads(_b64url_decode(parts[1]))
        sig = _b64url_decode(parts[2])
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"malformed: {e}") from None
    if not isinstance(head, dict) or not isinstance(payload, dict):
        raise ValueError("not JSON objects")
    if head.get("alg") != "HS256":
        raise ValueError(f"algorithm {head.get('alg')!r}")
    want = hmac.new(secret, f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(want, sig):
        raise ValueError("bad signature")
    if payload.get("iss") != JWT_ISSUER:
        raise ValueError(f"issuer {payload.get('iss')!r}")
    aud = payload.get("aud")
    if not (aud == JWT_AUDIENCE or (isinstance(aud, list) and JWT_AUDIENCE in aud)):
        raise ValueError(f"audience {aud!r}")
    now = time.time() if now is None else now
    exp = payload.get("exp")
    if not isinstance(exp, (int, float)) or isinstance(exp, bool):
        raise ValueError("no exp")
    if now >= exp + leeway:
        raise ValueError("expired")
    nbf = payload.get("nbf")
    if nbf is not None and (not isinstance(nbf, (int, float)) or now < nbf - leeway):
        raise ValueError("not yet valid")
    return payload


class Request:
    """One request as received. headers: [(name, value)]; body: bytes; status: what was answered;
    jwt: the verified payload, or the reason it was refused (str), or None when not checked."""

    def __init__(self, endpoint, method, path, query, headers, body):
        self.endpoint = endpoint
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.status = None
        self.jwt = None

    def header(self, name):
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def __repr__(self):
        return f"<Request {self.method} {self.path} -> {self.status}>"


def allowed_agent(agent_id, config_project_id, *, default_namespace=None, access_as=None):
    """One entry of allowed_agents: the agent, its configuration project, and its ci_access entry
    for the job's project or group (id removed), as GitLab returns it."""
    entry = {"id": agent_id, "config_project": {"id": config_project_id}}
    configuration = {}
    if default_namespace is not None:
        configuration["default_namespace"] = default_namespace
    if access_as is not None:
        configuration["access_as"] = access_as
    entry["configuration"] = configuration
    return entry


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def handle_error(self, request, client_address):
        # Connections cut by go_away()/stop() or by the client are expected; report anything else.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-gitlab"

    def log_message(self, fmt, *args):  # quiet
        pass

    def setup(self):
        super().setup()
        self.server.fake._track(self.connection, True)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.fake._track(self.connection, False)

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    def do_DELETE(self):
        self._handle("DELETE")

    def _read_body(self):
        """The body by Content-Length; None for a chunked one (kas sends lengths; not supported)."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            return None
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def _send(self, req, status, obj):
        data = b"" if obj is None else json.dumps(obj).encode()
        req.status = status
        self.send_response(status)
        if obj is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if not self.server.fake.keep_alive:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _handle(self, method):
        fake = self.server.fake
        path, _, query = self.path.partition("?")
        body = self._read_body()
        endpoint = ENDPOINTS.get((method, path), "other")
        req = Request(endpoint, method, path, query, list(self.headers.items()), body or b"")
        fake._arrived(req)
        if body is None:
            return self._send(req, 411, {"message": "411 Length Required (fake_gitlab reads Content-Length only)"})
        fake._hold_while_hanging()
        delay = fake.delays.get(endpoint, fake.delay)
        if delay:
            time.sleep(delay)
        failure = fake._take_failure(endpoint)
        if failure is not None:
            status, fbody = failure
            return self._send(req, status, fbody if fbody is not None else
                              {"message": f"{status} {_REASONS.get(status, 'Error')}"})
        if endpoint == "other" and path in _PATHS:
            return self._send(req, 405, {"message": "405 Method Not Allowed"})
        if endpoint == "other":
            return self._send(req, 404, {"message": "404 Not Found"})
        if path.startswith("/api/v4/internal/") or fake.jwt_on_job_api:
            try:
                req.jwt = verify_kas_jwt(self.headers.get(JWT_HEADER), fake.secret, leeway=fake.jwt_leeway)
            except ValueError as e:
                req.jwt = str(e)
                fake._count("jwt_refused")
                return self._send(req, 401, {"message": "KAS JWT authentication invalid"})
        status, obj = getattr(fake, "_" + endpoint)(req)
        self._send(req, status, obj)


def _unauthorized(message="401 Unauthorized"):
    return 401, {"message": message}


class FakeGitLab:
    def __init__(self, secret, *, port=0, jwt_leeway=0, tls=None):
        """tls: (certificate file, key file): serve HTTPS (the url says https://localhost:PORT)."""
        if isinstance(secret, str):
            secret = secret.encode()
        self.secret = secret
        self.tls = tls
        self.jwt_leeway = jwt_leeway
        self.jwt_on_job_api = True
        self.keep_alive = True
        self.delay = 0.0
        self.delays = {}
        self.requests = []
        self._lock = threading.Lock()
        self._counts = collections.Counter()
        self._count_cv = threading.Condition(self._lock)
        self._failure = None  # (status, endpoint, times, body)
        self._agents = {}  # token -> dict
        self._agent_projects = {}  # agent id -> config project id
        self._users = {}  # (access_type, access_key) -> dict
        self._grants = {}  # (agent id, user id) -> access_as
        self._jobs = {}  # job token -> dict
        self._conns = set()
        self._running = threading.Event()  # set while answering (cleared while hanging)
        self._running.set()
        self._port = port
        self._server = None
        self._thread = None
        self._stopped = False

    @classmethod
    def from_secret_file(cls, path, **kw):
        return cls(load_secret(path), **kw)

    # ---- life cycle ----

    def start(self):
        self._serve(self._port)
        return self

    def _serve(self, port):
        self._server = _Server(("127.0.0.1", port), _Handler)
        if self.tls is not None:
            import ssl
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*self.tls)
            self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        self._server.fake = self
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    @property
    def port(self):
        return self._port

    @property
    def url(self):
        if self.tls is not None:
            return f"https://localhost:{self._port}"
        return f"http://127.0.0.1:{self._port}"

    def _halt(self, close_socket):
        if self._server is None:
            return
        self._server.shutdown()
        self._thread.join(timeout=5)
        if close_socket:
            self._server.server_close()
            self._server = None

    def _cut_connections(self):
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def go_away(self, hang=False):
        """Stop serving. hang=False: the port is closed (connections refused) and open connections
        are cut. hang=True: the port stays open but nothing is answered (new connections wait in the
        backlog, requests on open connections wait) until come_back()."""
        if hang:
            self._running.clear()
            self._halt(close_socket=False)
        else:
            self._halt(close_socket=True)
            self._cut_connections()

    def come_back(self):
        """Serve again, on the same port."""
        if self._server is None:
            self._serve(self._port)
        else:  # hanging: the listening socket is still there
            self._thread = threading.Thread(target=self._server.serve_forever,
                                            kwargs={"poll_interval": 0.05}, daemon=True)
            self._thread.start()
        self._running.set()

    def stop(self):
        self._stopped = True
        self._running.set()  # release held requests
        self._halt(close_socket=True)
        self._cut_connections()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ---- knobs ----

    def fail(self, status, *, endpoint=None, times=None, body=None):
        """Answer `status` (with `body`, a JSON-able object, or GitLab's {"message"}) to requests for
        `endpoint` (None: all), `times` of them (None: until fail(None))."""
        with self._lock:
            self._failure = None if status is None else [status, endpoint, times, body]

    def _take_failure(self, endpoint):
        with self._lock:
            f = self._failure
            if f is None or (f[1] is not None and f[1] != endpoint):
                return None
            if f[2] is not None:
                f[2] -= 1
                if f[2] <= 0:
                    self._failure = None
            return f[0], f[3]

    def _hold_while_hanging(self):
        while not self._running.wait(0.1):
            if self._stopped:
                break

    def _track(self, conn, add):
        with self._lock:
            (self._conns.add if add else self._conns.discard)(conn)

    def _arrived(self, req):
        with self._lock:
            self.requests.append(req)
            self._counts[req.endpoint] += 1
            self._count_cv.notify_all()

    def _count(self, name):
        with self._lock:
            self._counts[name] += 1
            self._count_cv.notify_all()

    def count(self, endpoint):
        with self._lock:
            return self._counts[endpoint]

    @property
    def counts(self):
        with self._lock:
            return dict(self._counts)

    def reset_counts(self):
        with self._lock:
            self._counts.clear()
            self.requests = []

    def wait_for_count(self, endpoint, n, timeout=10):
        """Wait until `endpoint` has seen at least n requests; returns the count (may be < n on
        timeout)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._counts[endpoint] < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._count_cv.wait(left)
            return self._counts[endpoint]

    # ---- tables ----

    def add_agent(self, token, *, agent_id, project_id, name=None, status=None, default_branch="main",
                  gitaly_info=None, gitaly_repository=None):
        """Make `token` an agent token. status: answer this (403, 404, ...) instead of 200."""
        with self._lock:
            self._agents[token] = {
                "agent_id": agent_id, "project_id": project_id, "name": name or f"agent-{agent_id}",
                "status": status, "default_branch": default_branch,
                "gitaly_info": gitaly_info, "gitaly_repository": gitaly_repository,
            }
            self._agent_projects[agent_id] = project_id

    def set_agent_status(self, token, status):
        """None: answer normally again; 401/403/404...: answer that for this token."""
        with self._lock:
            self._agents[token]["status"] = status

    def revoke_agent(self, token):
        """The token becomes unknown (401); the agent itself stays (authorize_proxy_user knows it)."""
        with self._lock:
            self._agents.pop(token, None)

    def add_user(self, access_key, *, user_id, username, access_type="personal_access_token", csrf_token=None,
                 revoked=False):
        """A credential authorize_proxy_user resolves to a user. session_cookie needs csrf_token."""
        if access_type not in ACCESS_TYPES:
            raise ValueError(access_type)
        with self._lock:
            self._users[(access_type, access_key)] = {"id": user_id, "username": username,
                                                       "csrf_token": csrf_token, "revoked": revoked}

    def grant(self, agent_id, user_id, access_as=None):
        """The user may reach the agent (its user_access). access_as: {"agent": {}} (default) or
        {"user": {"projects": [{"id": 1, "roles": ["developer"]}], "groups": [...]}}."""
        with self._lock:
            self._grants[(agent_id, user_id)] = access_as if access_as is not None else {"agent": {}}

    def add_job(self, job_token, *, job_id, pipeline_id, project_id, user_id, username, allowed_agents=(),
                groups=(), roles_in_project=("reporter", "developer"), environment=None, status=None):
        """A CI job token. allowed_agents: entries from allowed_agent(); groups: ids of the project's
        groups; environment: {"slug", "tier"} or None; status: answer this instead of 200."""
        with self._lock:
            self._jobs[job_token] = {
                "status": status,
                "body": {
                    "allowed_agents": list(allowed_agents),
                    "job": {"id": job_id},
                    "pipeline": {"id": pipeline_id},
                    "project": {"id": project_id, "groups": [{"id": g} for g in groups]},
                    "user": {"id": user_id, "username": username, "roles_in_project": list(roles_in_project)},
                    **({"environment": environment} if environment is not None else {}),
                },
            }

    # ---- endpoints: (status, JSON object) ----

    def _agent_info(self, req):
        auth = req.header("Authorization") or ""
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _unauthorized()
        with self._lock:
            a = self._agents.get(token.strip())
            a = dict(a) if a else None
        if a is None:
            return _unauthorized()
        if a["status"] is not None:
            return a["status"], {"message": f"{a['status']} {_REASONS.get(a['status'], 'Error')}"}
        pid = a["project_id"]
        return 200, {
            "project_id": pid,
            "agent_id": a["agent_id"],
            "agent_name": a["name"],
            "gitaly_info": a["gitaly_info"] or {"address": "tcp://127.0.0.1:8075", "token": "", "features": {}},
            "gitaly_repository": a["gitaly_repository"] or {
                "storage_name": "default",
                "relative_path": f"@hashed/project-{pid}.git",
                "gl_repository": f"project-{pid}",
                "gl_project_path": f"group/project-{pid}",
            },
            "default_branch": a["default_branch"],
        }

    def _authorize_proxy_user(self, req):
        try:
            p = json.loads(req.body or b"{}")
            if not isinstance(p, dict):
                raise ValueError("not an object")
        except ValueError:
            return 400, {"error": "body is not a JSON object"}
        missing = [k for k in ("agent_id", "access_type", "access_key") if p.get(k) in (None, "")]
        if missing:
            return 400, {"error": ", ".join(f"{k} is missing" for k in missing)}
        agent_id = p["agent_id"]
        if isinstance(agent_id, str) and agent_id.isdigit():
            agent_id = int(agent_id)
        if not isinstance(agent_id, int) or isinstance(agent_id, bool):
            return 400, {"error": "agent_id is invalid"}
        if p["access_type"] not in ACCESS_TYPES:
            return 400, {"error": "access_type does not have a valid value"}
        if p["access_type"] == "session_cookie" and not p.get("csrf_token"):
            return 400, {"error": "csrf_token is missing"}
        with self._lock:
            user = self._users.get((p["access_type"], p["access_key"]))
            project_id = self._agent_projects.get(agent_id)
            access_as = self._grants.get((agent_id, user["id"])) if user else None
        if p["access_type"] == "session_cookie":
            if user is None:
                return _unauthorized("401 Unauthorized - Invalid session")
            if not hmac.compare_digest(str(user["csrf_token"]), str(p["csrf_token"])):
                return _unauthorized("401 Unauthorized - CSRF token does not match")
        elif user is None:
            return 400, {"message": "400 Bad request - Unable to get user from request data"}
        elif user["revoked"]:
            return _unauthorized()
        if project_id is None:
            return 404, {"message": "404 Not found"}
        if access_as is None:
            return 403, {"message": "403 Forbidden"}
        return 200, {
            "agent": {"id": agent_id, "config_project": {"id": project_id}},
            "user": {"id": user["id"], "username": user["username"]},
            "access_as": access_as,
        }

    def _allowed_agents(self, req):
        token = req.header("Job-Token")
        if token is None:  # GitLab also takes the job token as a parameter
            token = (urllib.parse.parse_qs(req.query).get("job_token") or [None])[0]
        with self._lock:
            job = self._jobs.get(token) if token else None
        if job is None:
            return _unauthorized()
        if job["status"] is not None:
            return job["status"], {"message": f"{job['status']} {_REASONS.get(job['status'], 'Error')}"}
        return 200, json.loads(json.dumps(job["body"]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--secret-file", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--agent", action="append", default=[], help="TOKEN:AGENT_ID:PROJECT_ID")
    args = ap.parse_args(argv)
    g = FakeGitLab.from_secret_file(args.secret_file, port=args.port)
    for spec in args.agent:
        token, agent_id, project_id = spec.rsplit(":", 2)
        g.add_agent(token, agent_id=int(agent_id), project_id=int(project_id))
    g.start()
    print(g.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    g.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
