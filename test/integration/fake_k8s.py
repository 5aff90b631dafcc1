"""A tiny stand-in for a Kubernetes API server, enough for real kubectl and for tests of the
Kubernetes API path (kubectl -> kasd -> tunnel -> agent -> here).

It serves (JSON only, HTTP/1.1, threaded, on 127.0.0.1 at a free port):
  GET  /version, /api, /apis (an APIGroupList with no groups), /api/v1 (pods, namespaces)
  GET  /api/v1/namespaces, /api/v1/namespaces/NAME
  GET  /api/v1/pods and /api/v1/namespaces/NS/pods (a PodList: .pods; NS "default" has them all),
       /api/v1/namespaces/NS/pods/NAME (404 Status when absent). When Accept asks for
       as=Table (kubectl's default output) the answer is a meta.k8s.io/v1 Table, as a real API
       server answers (.tables = False: the plain PodList, which kubectl also accepts and prints
       itself); kubectl -o json/yaml/name ask for plain objects and get the PodList.
  GET  ...?watch=1 (or watch=true) on a pod list: a chunked stream of watch events (.watch_events,
       each after .watch_delay seconds; pods as one-row Tables when as=Table is asked), then the
       stream ends (after .watch_hold more seconds).
  POST any path: echoes the request body with 201 and the request's Content-Type (kubectl create
       needs --validate=false: there is no /openapi).
  Any request carrying "Upgrade: X": 101 Switching Protocols to X, then every byte read is
       written back until the client closes (an echo to test upgraded streams with).
  Anything else: 404 with a Kubernetes Status object.

Every request is recorded (see Request) before it is answered, including its Impersonate-*
headers. Use from a test:

    with FakeK8s() as k8s:             # or k8s = FakeK8s().start(); ...; k8s.stop()
        url = k8s.url                   # "http://127.0.0.1:PORT"
        ...                             # drive requests
        r = k8s.wait_for(lambda r: r.path == "/api/v1/namespaces/default/pods")
        r.header("Impersonate-User"), r.headers_all("Impersonate-Group"), r.impersonation()
        k8s.requests                    # a copy of everything recorded, oldest first
        k8s.clear()

Run alone (python3 fake_k8s.py [--port N]) it prints its URL, then one JSON line per request.
"""
import argparse
import http.server
import json
import socket
import socketserver
import sys
import threading
import time
import urllib.parse

# One uid per pod, so kubectl's printers have something stable to show.
_POD_TEMPLATE = {
    "apiVersion": "v1",
    "kind": "Pod",
    "spec": {"containers": [{"name": "main", "image": "busybox:1.36"}], "nodeName": "node-1"},
    "status": {"phase": "Running", "podIP": "10.0.0.1",
               "containerStatuses": [{"name": "main", "ready": True, "restartCount": 0,
                                      "image": "busybox:1.36", "imageID": "", "started": True,
                                      "state": {"running": {"startedAt": "2024-01-01T00:00:00Z"}}}]},
}


def make_pod(name, namespace="default", resource_version="100"):
    pod = json.loads(json.dumps(_POD_TEMPLATE))
    pod["metadata"] = {"name": name, "namespace": namespace, "uid": f"uid-{namespace}-{name}",
                       "resourceVersion": resource_version,
                       "creationTimestamp": "2024-01-01T00:00:00Z", "labels": {"app": name}}
    return pod


def status_object(code, reason, message):
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


class Request:
    """One recorded request. headers: [(name, value), ...] as received (names as sent);
    query: {name: [values]}; body: bytes (what was read: the whole body, or b"" for none)."""

    def __init__(self, method, target, headers, body=b""):
        self.method = method
        self.target = target
        parts = urllib.parse.urlsplit(target)
        self.path = parts.path
        self.raw_query = parts.query
        self.query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
        self.headers = headers
        self.body = body
        self.time = time.time()

    def header(self, name, default=None):
        """The first value of header name (case-insensitive), or default."""
        vals = self.headers_all(name)
        return vals[0] if vals else default

    def headers_all(self, name):
        """Every value of header name (case-insensitive), in order."""
        n = name.lower()
        return [v for k, v in self.headers if k.lower() == n]

    def impersonation(self):
        """{"user": str|None, "uid": str|None, "groups": [...], "extra": {escaped-key-lowercase: [...]}}
        from the Impersonate-* headers."""
        extra = {}
        for k, v in self.headers:
            if k.lower().startswith("impersonate-extra-"):
                extra.setdefault(k[len("impersonate-extra-"):].lower(), []).append(v)
        return {"user": self.header("Impersonate-User"), "uid": self.header("Impersonate-Uid"),
                "groups": self.headers_all("Impersonate-Group"), "extra": extra}

    def as_dict(self):
        return {"method": self.method, "path": self.path, "query": self.query, "headers": self.headers,
                "body": self.body.decode("utf-8", "replace")}

    def __repr__(self):
        return f"<Request {self.method} {self.target}>"


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False


class FakeK8s:
    def __init__(self, port=0, log=None):
        self.pods = [make_pod("pod-a"), make_pod("pod-b")]
        self.namespaces = ["default", "kube-system"]
        self.watch_events = [
            {"type": "ADDED", "object": make_pod("pod-c", resource_version="101")},
            {"type": "MODIFIED", "object": make_pod("pod-c", resource_version="102")},
            {"type": "DELETED", "object": make_pod("pod-c", resource_version="103")},
        ]
        self.watch_delay = 0.3
        self.watch_hold = 0.0
        self.git_version = "v1.29.0-fake"
        self.tables = True  # answer as=Table requests with a Table (False: with the plain list)
        self.log = log  # a callable given each Request, or None
        self._requests = []
        self._cond = threading.Condition()
        self._port = port
        self._server = None
        self._thread = None

    # --- lifecycle -------------------------------------------------------------------------
    def start(self):
        fake = self

        class Handler(_Handler):
            k8s = fake

        self._server = _Server(("127.0.0.1", self._port), Handler)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        daemon=True, name="fake-k8s")
        self._thread.start()
        return self

    def stop(self):
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self):
        return self.start() if self._server is None else self

    def __exit__(self, *exc):
        self.stop()

    # --- recorded requests -----------------------------------------------------------------
    @property
    def requests(self):
        with self._cond:
            return list(self._requests)

    def clear(self):
        with self._cond:
            self._requests.clear()

    def wait_for(self, pred=lambda r: True, timeout=10.0):
        """The first recorded request matching pred (waiting up to timeout seconds for one)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for r in self._requests:
                    if pred(r):
                        return r
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"fake_k8s: no matching request within {timeout}s; got {self._requests}")
                self._cond.wait(left)

    def _record(self, req):
        with self._cond:
            self._requests.append(req)
            self._cond.notify_all()
        if self.log:
            self.log(req)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    k8s = None  # set per server

    def setup(self):
        super().setup()
        # headers and body are separate writes: without this, Nagle + delayed ACK add ~40 ms
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, fmt, *args):
        pass

    # every method goes through _handle
    def do_GET(self):
        self._handle()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET

    def _read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return body
                body += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def _send_json(self, code, obj, content_type="application/json"):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _not_found(self, what=None):
        self._send_json(404, status_object(404, "NotFound", what or f"the server could not find the requested resource ({self.path})"))

    def _handle(self):
        upgrade = self.headers.get("Upgrade")
        body = b"" if upgrade else self._read_body()
        req = Request(self.command, self.path, list(self.headers.items()), body)
        self.k8s._record(req)
        if upgrade:
            return self._upgrade_echo(upgrade)
        if self.command == "POST":
            self.send_response(201)
            self.send_header("Content-Type", self.headers.get("Content-Type", "application/octet-stream"))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if self.command not in ("GET", "HEAD"):
            return self._send_json(405, status_object(405, "MethodNotAllowed", f"{self.command} is not supported"))
        path = req.path.rstrip("/") or "/"
        parts = path.strip("/").split("/")
        k8s = self.k8s
        if path == "/version":
            return self._send_json(200, {"major": "1", "minor": "29", "gitVersion": k8s.git_version,
                                         "gitCommit": "0000000", "gitTreeState": "clean",
                                         "buildDate": "2024-01-01T00:00:00Z", "goVersion": "go1.21",
                                         "compiler": "gc", "platform": "linux/amd64"})
        if path == "/api":
            return self._send_json(200, {"kind": "APIVersions", "versions": ["v1"],
                                         "serverAddressByClientCIDRs": [
                                             {"clientCIDR": "0.0.0.0/0", "serverAddress": f"127.0.0.1:{k8s.port}"}]})
        if path == "/apis":
            return self._send_json(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": []})
        if path == "/api/v1":
            verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
            return self._send_json(200, {"kind": "APIResourceList", "groupVersion": "v1", "resources": [
                {"name": "namespaces", "singularName": "namespace", "namespaced": False, "kind": "Namespace",
                 "verbs": verbs, "shortNames": ["ns"]},
                {"name": "pods", "singularName": "pod", "namespaced": True, "kind": "Pod",
                 "verbs": verbs, "shortNames": ["po"], "categories": ["all"]},
            ]})
        if parts[:3] == ["api", "v1", "namespaces"] and len(parts) <= 4:
            if len(parts) == 3:
                return self._send_json(200, {"kind": "NamespaceList", "apiVersion": "v1",
                                             "metadata": {"resourceVersion": "100"},
                                             "items": [self._namespace(n) for n in k8s.namespaces]})
            if parts[3] in k8s.namespaces:
                return self._send_json(200, self._namespace(parts[3]))
            return self._not_found(f'namespaces "{parts[3]}" not found')
        ns = None
        if parts[:3] == ["api", "v1", "pods"] and len(parts) == 3:
            ns = ""  # all namespaces
        elif parts[:3] == ["api", "v1", "namespaces"] and len(parts) in (5, 6) and parts[4] == "pods":
            ns = parts[3]
        if ns is None:
            return self._not_found()
        pods = [p for p in k8s.pods if ns in ("", p["metadata"]["namespace"])]
        if len(parts) == 6:
            for p in pods:
                if p["metadata"]["name"] == parts[5]:
                    return self._send_json(200, p)
            return self._not_found(f'pods "{parts[5]}" not found')
        table = k8s.tables and "as=Table" in self.headers.get("Accept", "")
        if req.query.get("watch", [""])[0] in ("1", "true"):
            return self._watch(table)
        if table:
            return self._send_json(200, self._table(pods))
        return self._send_json(200, {"kind": "PodList", "apiVersion": "v1",
                                     "metadata": {"resourceVersion": "100"}, "items": pods})

    @staticmethod
    def _namespace(name):
        return {"kind": "Namespace", "apiVersion": "v1",
                "metadata": {"name": name, "uid": f"uid-ns-{name}", "resourceVersion": "1",
                             "creationTimestamp": "2024-01-01T00:00:00Z"},
                "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}

    @staticmethod
    def _table(pods):
        cols = [("Name", "string"), ("Ready", "string"), ("Status", "string"), ("Restarts", "string"),
                ("Age", "string")]
        rows = []
        for p in pods:
            meta = {k: p["metadata"][k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")}
            rows.append({"cells": [p["metadata"]["name"], "1/1", p["status"]["phase"], "0", "1d"],
                         "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                                    "metadata": meta}})
        return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": "100"},
                "columnDefinitions": [{"name": n, "type": t, "format": "name" if n == "Name" else "",
                                       "description": "", "priority": 0} for n, t in cols],
                "rows": rows}

    def _watch(self, table):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        try:
            for ev in self.k8s.watch_events:
                time.sleep(self.k8s.watch_delay)
                if table and ev.get("object", {}).get("kind") == "Pod":
                    ev = {"type": ev["type"], "object": self._table([ev["object"]])}
                line = json.dumps(ev).encode() + b"\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
            time.sleep(self.k8s.watch_hold)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    def _upgrade_echo(self, protocol):
        self.send_response(101)
        self.send_header("Upgrade", protocol)
        self.send_header("Connection", "Upgrade")
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        try:
            while True:
                data = self.rfile.read1(65536)
                if not data:
                    return
                self.wfile.write(data)
                self.wfile.flush()
        except OSError:
            return


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()

    def log(r):
        print(json.dumps(r.as_dict()), flush=True)

    k8s = FakeK8s(port=args.port, log=log).start()
    print(k8s.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        k8s.stop()


if __name__ == "__main__":
    sys.exit(main())
