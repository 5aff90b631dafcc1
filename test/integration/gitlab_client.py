"""Play GitLab against kasd's api listener: JWT-authenticated gRPC calls, routed to agents.

GitLab authenticates to kas with `authorization: Bearer <JWT>`: HS256 over the shared secret
(stored base64-encoded in a file), audience "gitlab-kas". make_jwt() builds such tokens with the
standard library only (and deliberately bad ones for negative tests).

    secret = gitlab_client.generate_secret()
    gitlab_client.write_secret(path, secret)          # the file kasd is configured with
    gl = gitlab_client.GitLabClient("127.0.0.1:8153", secret)

    # A routed call: any method, raw bytes, metadata kas-hop-routing-agent-id: 42
    data, call = gl.unary("/test.Echo/Unary", b"hi", agent_id=42, timeout=5)
    msgs = list(gl.server_stream("/test.Echo/Stream", b"x", agent_id=42))
    data, call = gl.client_stream("/test.Echo/Unary", [b"a", b"b"], agent_id=42)
    call = gl.stream("/test.Echo/Stream", iter([b"a", b"b"]), agent_id=42)   # bidi
    result = gitlab_client.collect(call)     # messages, code, details, metadata: never raises

    # kasd's own method on the api listener
    resp = gl.get_connected_agents(agent_id=42)      # kaspb.tracker_rpc.GetConnectedAgentsResponse

Every call takes `metadata=` (extra (key, value) pairs), `timeout=` (seconds; None sends no
grpc-timeout) and `auth=` (None: a fresh valid JWT; False: no authorization; a str: the exact
authorization value, e.g. "Bearer " + make_jwt(secret, alg="HS384") or "Bearer garbage").
`agent_id` may be None (no routing key), an int or str (one key), or a list (the key repeated).
Errors raise grpc.RpcError (code(), details()) except through collect().

Standard library + grpcio + protobuf only; connects to the given address (127.0.0.1 in tests).
"""
import base64
import hashlib
import hmac
import json
import os
import sys
import time

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kaspb  # noqa: E402

ROUTING_KEY = "kas-hop-routing-agent-id"
JWT_AUDIENCE = "gitlab-kas"
JWT_ISSUER = "gitlab"
_HASHES = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}


def b64url(data):
    """Unpadded base64url, as JWTs use."""
    if isinstance(data, str):
        data = data.encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(secret, *, alg="HS256", aud=JWT_AUDIENCE, iss=JWT_ISSUER, ttl=60, now=None,
             iat=None, nbf=None, exp=None, claims=None, header=None, sign_with=None):
    """A compact JWS (header.payload.signature) signed with HMAC over secret (bytes).

    Claims: aud, iss, iat (default now), nbf (default now), exp (default now + ttl); pass None
    for aud/iss to omit them, or override iat/nbf/exp with explicit values (seconds since the
    epoch; use e.g. exp=now-60 for an expired token). claims: extra or replacement claims;
    header: extra or replacement header fields. alg: HS256/HS384/HS512, or "none" for an
    unsigned token (empty signature). sign_with: sign with this key instead (a wrong secret)."""
    now = int(time.time()) if now is None else int(now)
    payload = {}
    if aud is not None:
        payload["aud"] = aud
    if iss is not None:
        payload["iss"] = iss
    payload["iat"] = now if iat is None else iat
    payload["nbf"] = now if nbf is None else nbf
    payload["exp"] = now + ttl if exp is None else exp
    payload.update(claims or {})
    head = {"alg": alg, "typ": "JWT"}
    head.update(header or {})
    signing_input = (b64url(json.dumps(head, separators=(",", ":"))) + "." +
                     b64url(json.dumps(payload, separators=(",", ":"))))
    if alg.lower() == "none":
        return signing_input + "."
    key = secret if sign_with is None else sign_with
    if isinstance(key, str):
        key = key.encode()
    digest = _HASHES[alg]
    sig = hmac.new(key, signing_input.encode(), digest).digest()
    return signing_input + "." + b64url(sig)


def decode_jwt(token):
    """(header, payload) of a JWT, without verifying anything (for test assertions)."""
    def part(s):
        return json.loads(base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)))
    h, p, _ = token.split(".")
    return part(h), part(p)


def verify_jwt(token, secret, *, aud=JWT_AUDIENCE, leeway=5, now=None):
    """Check an HS256/384/512 token the way kas does (signature, aud, exp, nbf); return its
    payload or raise ValueError. Used by stand-in servers in tests."""
    try:
        h64, p64, s64 = token.split(".")
        head, payload = decode_jwt(token)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"malformed token: {e}") from None
    digest = _HASHES.get(head.get("alg"))
    if digest is None:
        raise ValueError(f"algorithm not allowed: {head.get('alg')!r}")
    key = secret.encode() if isinstance(secret, str) else secret
    want = hmac.new(key, f"{h64}.{p64}".encode(), digest).digest()
    if not hmac.compare_digest(b64url(want), s64):
        raise ValueError("bad signature")
    auds = payload.get("aud")
    auds = auds if isinstance(auds, list) else [auds]
    if aud not in auds:
        raise ValueError("wrong audience")
    now = time.time() if now is None else now
    if "exp" in payload and now > payload["exp"] + leeway:
        raise ValueError("expired")
    if "nbf" in payload and now < payload["nbf"] - leeway:
        raise ValueError("not yet valid")
    return payload


def generate_secret(n=32):
    """A random shared secret (bytes)."""
    return os.urandom(n)


def write_secret(path, secret):
    """Store secret base64-encoded, the way GitLab's shared secret file holds it."""
    with open(path, "w") as f:
        f.write(base64.b64encode(secret).decode() + "\n")


def load_secret(path):
    """Read a base64-encoded secret file; return the raw secret bytes."""
    with open(path) as f:
        return base64.b64decode(f.read().strip())


class CallResult:
    """Outcome of a call: messages (list of bytes), code (grpc.StatusCode), details (str),
    initial_metadata and trailing_metadata (lists of (key, value))."""

    def __init__(self, messages, code, details, initial_metadata, trailing_metadata):
        self.messages = messages
        self.code = code
        self.details = details
        self.initial_metadata = initial_metadata
        self.trailing_metadata = trailing_metadata

    def __repr__(self):
        return (f"CallResult(code={self.code}, details={self.details!r}, "
                f"messages={self.messages!r}, initial={self.initial_metadata!r}, "
                f"trailing={self.trailing_metadata!r})")


def collect(call):
    """Drain a streaming call (server_stream()/stream()) into a CallResult; never raises."""
    messages = []
    try:
        for m in call:
            messages.append(m)
    except grpc.RpcError:
        pass
    try:
        initial = list(call.initial_metadata() or ())
    except Exception:  # noqa: BLE001
        initial = []
    return CallResult(messages, call.code(), call.details() or "", initial,
                      list(call.trailing_metadata() or ()))


class GitLabClient:
    """gRPC client for kasd's api listener, authenticating as GitLab.

    GitLabClient(addr, secret, alg="HS256", aud="gitlab-kas", iss="gitlab", ttl=60,
                 root_certificates=None, server_name=None, options=())
    secret is the raw shared secret (bytes; see load_secret()). A fresh JWT is minted per call.
    Methods: token(), metadata(), unary(), server_stream(), client_stream(), stream(),
    get_connected_agents(), close(); usable as a context manager."""

    def __init__(self, addr, secret, *, alg="HS256", aud=JWT_AUDIENCE, iss=JWT_ISSUER, ttl=60,
                 root_certificates=None, server_name=None, options=()):
        self.addr = addr
        self.secret = secret
        self.alg = alg
        self.aud = aud
        self.iss = iss
        self.ttl = ttl
        opts = [("grpc.use_local_subchannel_pool", 1),
                ("grpc.max_receive_message_length", -1),
                ("grpc.max_send_message_length", -1),
                ("grpc.enable_retries", 0), *options]
        if root_certificates is not None:
            if server_name:
                opts.append(("grpc.ssl_target_name_override", server_name))
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self.channel = grpc.secure_channel(addr, creds, options=opts)
        else:
            self.channel = grpc.insecure_channel(addr, options=opts)
        self._stubs = {}

    def token(self, **overrides):
        """A fresh JWT with this client's settings (overrides go to make_jwt())."""
        kw = dict(alg=self.alg, aud=self.aud, iss=self.iss, ttl=self.ttl)
        kw.update(overrides)
        return make_jwt(self.secret, **kw)

    def metadata(self, agent_id=None, metadata=(), auth=None):
        """Call metadata: authorization (see auth= in the module doc), the routing key for
        agent_id, then the extra pairs."""
        md = []
        if auth is None:
            md.append(("authorization", "Bearer " + self.token()))
        elif auth is not False:
            md.append(("authorization", auth))
        if agent_id is not None:
            ids = agent_id if isinstance(agent_id, (list, tuple)) else [agent_id]
            md.extend((ROUTING_KEY, str(i)) for i in ids)
        md.extend(metadata)
        return md

    def _stub(self, kind, method, ser=None, de=None):
        key = (kind, method, ser, de)
        s = self._stubs.get(key)
        if s is None:
            factory = getattr(self.channel, kind)
            s = factory(method, request_serializer=ser, response_deserializer=de)
            self._stubs[key] = s
        return s

    # Routed calls: raw bytes in, raw bytes out (grpcio generic calls, no serializers).
    def unary(self, method, request=b"", *, agent_id=None, metadata=(), timeout=None,
              auth=None):
        """Unary call; returns (response bytes, grpc.Call) or raises grpc.RpcError."""
        return self._stub("unary_unary", method).with_call(
            request, metadata=self.metadata(agent_id, metadata, auth), timeout=timeout)

    def server_stream(self, method, request=b"", *, agent_id=None, metadata=(), timeout=None,
                      auth=None):
        """Server-streaming call; returns the call: iterate it for bytes; cancel() cancels."""
        return self._stub("unary_stream", method)(
            request, metadata=self.metadata(agent_id, metadata, auth), timeout=timeout)

    def client_stream(self, method, requests, *, agent_id=None, metadata=(), timeout=None,
                      auth=None):
        """Client-streaming call over an iterable of bytes; returns (bytes, grpc.Call)."""
        return self._stub("stream_unary", method).with_call(
            iter(requests), metadata=self.metadata(agent_id, metadata, auth), timeout=timeout)

    def stream(self, method, requests, *, agent_id=None, metadata=(), timeout=None, auth=None):
        """Bidirectional call over an iterator of bytes (the request side half-closes when it is
        exhausted); returns the call: iterate it for bytes; cancel() resets the stream."""
        return self._stub("stream_stream", method)(
            iter(requests), metadata=self.metadata(agent_id, metadata, auth), timeout=timeout)

    # kasd's own api methods.
    def get_connected_agents(self, project_id=None, agent_id=None, *, metadata=(), timeout=10,
                             auth=None):
        """AgentTracker/GetConnectedAgents by project_id or agent_id (neither: the request is
        sent empty, which kasd must reject with INVALID_ARGUMENT). Returns
        kaspb.tracker_rpc.GetConnectedAgentsResponse or raises grpc.RpcError."""
        req = kaspb.tracker_rpc.GetConnectedAgentsRequest()
        if project_id is not None:
            req.project_id = project_id
        if agent_id is not None:
            req.agent_id = agent_id
        stub = self._stub("unary_unary", kaspb.METHOD_GET_CONNECTED_AGENTS,
                          kaspb.tracker_rpc.GetConnectedAgentsRequest.SerializeToString,
                          kaspb.tracker_rpc.GetConnectedAgentsResponse.FromString)
        return stub(req, metadata=self.metadata(None, metadata, auth), timeout=timeout)

    def close(self):
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
