"""A real redis-server on a free 127.0.0.1 port for integration tests, and a tiny RESP2 client.

    r = RedisServer()            # started, no persistence, killed at exit if a test forgets
    r.cmd("SET", "k", "v")       # -> b"OK"; errors raise RedisError; arrays are lists
    r.stop(); r.start()          # restart on the same port (empty data)
    r.address                    # "127.0.0.1:PORT"
"""
import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisError(Exception):
    pass


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _encode(args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, int):
            a = str(a)
        if isinstance(a, str):
            a = a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class _Reader:
    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def _line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n):
        while len(self.buf) < n + 2:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def reply(self):
        line = self._line()
        t, rest = line[:1], line[1:]
        if t == b"+":
            return rest
        if t == b"-":
            raise RedisError(rest.decode())
        if t == b":":
            return int(rest)
        if t == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n)
        if t == b"*":
            n = int(rest)
            return None if n < 0 else [self.reply() for _ in range(n)]
        raise RedisError(f"bad reply line {line!r}")


class RedisServer:
    def __init__(self, port=None, extra_args=(), sentinel_conf=None):
        """sentinel_conf: run a sentinel with this configuration instead of a server."""
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dir = tempfile.mkdtemp(prefix="kasd-redis-")
        self.extra_args = list(extra_args)
        self.sentinel_conf = sentinel_conf
        self.proc = None
        atexit.register(self.kill)
        self.start()

    def start(self, timeout=10):
        head = [REDIS_SERVER]
        if self.sentinel_conf is not None:
            conf = os.path.join(self.dir, "sentinel.conf")
            with open(conf, "w") as f:  # a sentinel rewrites its file: a fresh copy each start
                f.write(self.sentinel_conf)
            head = [REDIS_SERVER, conf, "--sentinel"]
        self.proc = subprocess.Popen(
            [*head, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
             "--logfile", os.path.join(self.dir, "redis.log"),
             *([] if self.sentinel_conf is not None else ["--save", "", "--appendonly", "no"]),
             *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.cmd("PING") == b"PONG":
                    return
            except RedisError as e:
                if str(e).startswith("NOAUTH"):
                    return  # up, and wants a password (--requirepass)
                time.sleep(0.05)
            except (OSError, ConnectionError):
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on {self.address} did not start")

    def stop(self, timeout=10):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def cmd(self, *args, timeout=5):
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(_encode(args))
            return _Reader(s).reply()

    def keys(self, pattern="*"):
        return sorted(k.decode() for k in self.cmd("KEYS", pattern))

    def commandstats(self):
        """{command: calls} from INFO commandstats."""
        out = {}
        for line in self.cmd("INFO", "commandstats").decode().splitlines():
            if line.startswith("cmdstat_"):
                name, rest = line[8:].split(":", 1)
                fields = dict(kv.split("=") for kv in rest.split(","))
                out[name] = int(fields["calls"])
        return out
