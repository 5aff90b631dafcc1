"""Start and stop a real kasd process for integration tests.

Every kasd here listens on 127.0.0.1 with ephemeral ports, is bounded by timeouts, and is killed
if a test leaves it running."""
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request

KASD = os.environ.get("KASD_BIN", "build/cmd/kasd")

BASE_CONFIG = """\
shards: 2
agent:
  listen:
    address: 127.0.0.1:0
api:
  listen:
    address: 127.0.0.1:0
private_api:
  listen:
    address: 127.0.0.1:0
observability:
  listen:
    address: 127.0.0.1:0
limits:
  shutdown_grace: 5s
"""


def write_tokens(path, agents):
    """An agent token file: agents = {agent_id: (token, project_id)}; names are agent-<id>."""
    with open(path, "w") as f:
        f.write("agents:\n")
        for i, (token, project) in agents.items():
            f.write(f"  - token: \"{token}\"\n    agent_id: {i}\n    project_id: {project}\n"
                    f"    agent_name: agent-{i}\n")


def service_config(d, extra="", shards=2):
    """A config with every listener on 127.0.0.1:0, the token file d/tokens.yaml and the api secret
    d/api-secret; `extra` is appended (more top-level sections)."""
    return f"""\
shards: {shards}
agent:
  listen:
    address: 127.0.0.1:0
  token_file: {d}/tokens.yaml
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
{extra}"""


class Kasd:
    def __init__(self, config=BASE_CONFIG, args=(), start_timeout=20):
        self.dir = tempfile.mkdtemp(prefix="kasd-test-")
        self.config_path = os.path.join(self.dir, "kasd.yaml")
        with open(self.config_path, "w") as f:
            f.write(config)
        self.lines = []
        self.bad_lines = []
        self._partial = None
        self.events = []
        self.listeners = {}
        self.redis_address = None
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            [KASD, "--config", self.config_path, *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=self.dir)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.stdout = b""
        self._started = self.wait_event("started", start_timeout, allow_exit=True)

    def _read(self):
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._cond:
                self.lines.append(line)
                try:
                    ev = json.loads(raw.decode("utf-8"))  # strict: the bytes must be UTF-8 too
                except ValueError:
                    ev = None
                if not raw.endswith(b"\n"):
                    self._partial = line  # only a process killed mid-write leaves one
                elif not isinstance(ev, dict) and not (not self.events and line.startswith("kasd: ")):
                    # kasd's log is one JSON object per line; the only plain lines are the
                    # "kasd: ..." ones printed before the logger starts (configuration errors).
                    self.bad_lines.append(line)
                if isinstance(ev, dict):
                    self.events.append(ev)
                    if ev.get("event") == "listening":
                        host, port = ev["address"].rsplit(":", 1)
                        self.listeners[ev["listener"]] = (host.strip("[]"), int(port))
                    if ev.get("event") == "redis_embedded":
                        self.redis_address = ev["address"]
                self._cond.notify_all()

    def wait_event(self, name, timeout, allow_exit=False):
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for ev in self.events:
                    if ev.get("event") == name:
                        return ev
                if self.proc.poll() is not None and allow_exit:
                    self._cond.wait(0.2)  # let the reader take the last lines
                    for ev in self.events:
                        if ev.get("event") == name:
                            return ev
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"kasd: no '{name}' event within {timeout}s; log:\n" +
                                       "\n".join(self.lines))
                self._cond.wait(min(left, 0.2))

    @property
    def started(self):
        return self._started is not None

    def signal(self, sig):
        self.proc.send_signal(sig)

    def wait(self, timeout=30):
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise
        self._reader.join(5)
        self.stdout = self.proc.stdout.read()
        self.proc.stdout.close()
        self.proc.stderr.close()
        self.check_log_lines()
        return rc

    def check_log_lines(self):
        """Every line kasd wrote to stderr is one JSON object (checked for every test that stops or
        kills its kasd)."""
        with self._cond:
            bad = list(self.bad_lines)
            if self._partial is not None and not (self.proc.returncode or 0) < 0:
                bad.append(self._partial + "  <- no newline at exit")
        if bad:
            raise AssertionError("kasd wrote log lines that are not JSON objects:\n" +
                                 "\n".join(b[:600] for b in bad))

    def stop(self, timeout=30):
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._reader.join(5)
        for f in (self.proc.stdout, self.proc.stderr):
            if not f.closed:
                try:
                    f.close()
                except OSError:
                    pass
        self.check_log_lines()

    def log(self):
        with self._cond:
            return "\n".join(self.lines)


def connect(addr, timeout=5):
    s = socket.create_connection(addr, timeout=timeout)
    s.settimeout(timeout)
    return s


def port_open(host, port):
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def redis_ping(address, timeout=2):
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(b"PING\r\n")
        return s.recv(16).startswith(b"+PONG")


def wait_until(pred, timeout, step=0.05):
    """pred()'s first true value, polling every `step` seconds; its last (false) value after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(step)


def metric(kasd, name, **labels):
    """Sum over shards of a metric from kasd's /metrics, for the series whose labels include
    `labels` (series without labels count when none are asked for)."""
    host, port = kasd.listeners["observability"]
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^([a-z_0-9]+)(?:\{([^}]*)\})? (\S+)$", line)
        if m and m.group(1) == name:
            got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            if all(got.get(k) == v for k, v in labels.items()):
                total += float(m.group(3))
    return total
