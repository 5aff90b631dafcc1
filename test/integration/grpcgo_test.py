"""kasd through the real transport: grpc-go peers configured exactly like agentk and GitLab.

kasd-goagent (test/go/agent) dials the agent listener as agentk does: gzip on every call, 10 MiB
messages, keepalive every 55 s with PermitWithoutStream, user agent gitlab-agent/<v>/<commit>,
bearer token per call; it registers, keeps a pool of reverse tunnels serving kasd.test.Echo, and
keeps AgentConfiguration/GetConfiguration open. kasd-goclient (test/go/client) is GitLab on the
api listener (JWT HS256, kas-hop-routing-agent-id, optional gzip). kasd runs with a real
redis-server. Cases:

  1. grpc:// agent: registers (GetConnectedAgents shows its meta and pod id), serves routed unary
     calls with and without gzip, 8 MiB each way byte-checked, error status passes through;
  2. grpcs:// against kasd with TLS;
  3. an idle agent with the real 55 s keepalive stays connected 70 s with no call (pinging through
     a frame-counting proxy, no GOAWAY, no state change), then still serves a call; it runs
     alongside the other cases of its class;
  4. GetConfiguration delivers a configuration with the agent's id (skipped while proto/ has no
     agent_configuration protos);
  5. ws:// and wss://: the agent over WebSocket registers and serves a routed call.

KASD_GOAGENT_EXTRA_ARGS (debugging only) adds arguments to every kasd-goagent, e.g. --no-gzip.
"""
import base64
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(__file__))
import gitlab_client  # noqa: E402
from kasd_harness import Kasd, service_config, write_tokens, metric  # noqa: E402
from redis_fixture import RedisServer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
GOAGENT = os.environ.get("KASD_GOAGENT", "build/test/go/kasd-goagent")
GOCLIENT = os.environ.get("KASD_GOCLIENT", "build/test/go/kasd-goclient")
CERTS = os.environ.get("KD_TEST_CERTS", os.path.join(HERE, "..", "certs"))
EXTRA = shlex.split(os.environ.get("KASD_GOAGENT_EXTRA_ARGS", ""))
IDLE_SECONDS = 70
VERSION, COMMIT = "v17.1.0-goagent-test", "c0ffee0123456789"
EIGHT_MIB = 8 << 20


class GoAgent:
    """A kasd-goagent process; its JSON event lines are collected in .events."""

    def __init__(self, addr, token, *args):
        self.events = []
        self.stderr = []
        self._cond = threading.Condition()
        self.cmd = [GOAGENT, "--addr", addr, "--token", token, "--version", VERSION, "--commit", COMMIT,
                    *args, *EXTRA]
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._threads = [threading.Thread(target=self._read, args=(self.proc.stdout, True), daemon=True),
                         threading.Thread(target=self._read, args=(self.proc.stderr, False), daemon=True)]
        for t in self._threads:
            t.start()

    def _read(self, f, events):
        for raw in f:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._cond:
                if events:
                    try:
                        self.events.append(json.loads(line))
                    except ValueError:
                        self.events.append({"event": "unparsed", "line": line})
                else:
                    self.stderr.append(line)
                self._cond.notify_all()

    def named(self, name):
        with self._cond:
            return [e for e in self.events if e.get("event") == name]

    def wait_for(self, predicate, timeout, what):
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                r = predicate(self.events)
                if r:
                    return r
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"kasd-goagent: {what} not seen within {timeout}s\n" + self.log())
                self._cond.wait(min(left, 0.2))

    def wait_event(self, name, timeout, **match):
        def pred(evs):
            for e in evs:
                if e.get("event") == name and all(e.get(k) == v for k, v in match.items()):
                    return e
            return None
        return self.wait_for(pred, timeout, f"event {name} {match or ''}")

    def pod_id(self):
        return self.named("start")[0]["pod_id"]

    def wait_ready(self, timeout=20):
        """Registered, and at least 2 idle tunnels announced."""
        self.wait_event("registered", timeout)
        self.wait_for(lambda evs: any(e.get("event") == "tunnel_open" and e.get("idle", 0) >= 2 for e in evs),
                      timeout, "2 idle tunnels")

    def log(self):
        with self._cond:
            return "\n".join([" ".join(self.cmd[:3]) + " ..."] + [json.dumps(e) for e in self.events] +
                             ["stderr: " + l for l in self.stderr])

    def stop(self, timeout=15):
        """SIGTERM; the agent must exit 0 and say it stopped."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError("kasd-goagent did not exit on SIGTERM\n" + self.log())
        for t in self._threads:
            t.join(5)
        return rc

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def goclient(addr, secret_file, cmd, *args, timeout=120):
    """Run kasd-goclient; return (exit code, its JSON line or {}, stderr)."""
    p = subprocess.run([GOCLIENT, "--addr", addr, "--secret-file", secret_file, *args, cmd],
                       capture_output=True, timeout=timeout)
    out = p.stdout.decode("utf-8", "replace").strip().splitlines()
    try:
        res = json.loads(out[-1]) if out else {}
    except ValueError:
        res = {"unparsed": out}
    return p.returncode, res, p.stderr.decode("utf-8", "replace")


class H2PingProxy:
    """A TCP proxy for h2c on 127.0.0.1 that counts HTTP/2 frames by type and direction (PING from
    the client, GOAWAY from the server): proof the agent really pinged and kasd never sent GOAWAY."""
    PING, GOAWAY = 6, 7

    def __init__(self, target):
        self.target = target
        self.frames = {"c2s": {}, "s2c": {}}
        self.lock = threading.Lock()
        self.ls = socket.socket()
        self.ls.bind(("127.0.0.1", 0))
        self.ls.listen(8)
        self.address = "127.0.0.1:%d" % self.ls.getsockname()[1]
        self.socks = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.ls.accept()
            except OSError:
                return
            s = socket.create_connection(self.target, timeout=10)
            s.settimeout(None)
            self.socks += [c, s]
            threading.Thread(target=self._pipe, args=(c, s, "c2s", 24), daemon=True).start()
            threading.Thread(target=self._pipe, args=(s, c, "s2c", 0), daemon=True).start()

    def _pipe(self, src, dst, direction, preface):
        buf = b""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
                buf += data
                if preface:
                    if len(buf) < preface:
                        continue
                    buf, preface = buf[preface:], 0
                while len(buf) >= 9:
                    n = int.from_bytes(buf[:3], "big")
                    if len(buf) < 9 + n:
                        break
                    t, flags = buf[3], buf[4]
                    key = (t, flags)
                    with self.lock:
                        self.frames[direction][key] = self.frames[direction].get(key, 0) + 1
                    buf = buf[9 + n:]
        except OSError:
            pass
        finally:
            for x in (src, dst):
                try:
                    x.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def count(self, direction, ftype, flags=None):
        with self.lock:
            return sum(v for (t, f), v in self.frames[direction].items()
                       if t == ftype and (flags is None or f == flags))

    def close(self):
        self.ls.close()
        for s in self.socks:
            try:
                s.close()
            except OSError:
                pass



class GoPeers:
    """Common setup: a token file for agents 1..6 (project 100+id), the api secret, kasd."""
    redis = None
    tls = False

    @classmethod
    def start(cls, prefix):
        cls.dir = tempfile.mkdtemp(prefix="kasd-grpcgo-")
        cls.tokens = {i: base64.urlsafe_b64encode(os.urandom(24)).decode() for i in range(1, 7)}
        write_tokens(os.path.join(cls.dir, "tokens.yaml"), {i: (t, 100 + i) for i, t in cls.tokens.items()})
        cls.secret_file = os.path.join(cls.dir, "api-secret")
        gitlab_client.write_secret(cls.secret_file, gitlab_client.generate_secret())
        cls.redis = RedisServer()
        cfg = service_config(cls.dir, f"""\
redis:
  server:
    address: {cls.redis.address}
  key_prefix: {prefix}
limits:
  routing_timeout: 10s
  shutdown_grace: 3s
""")
        if cls.tls:
            tls = f"    certificate_file: {CERTS}/server.pem\n    key_file: {CERTS}/server.key\n"
            for face in ("agent:\n  listen:\n    address: 127.0.0.1:0\n", "api:\n  listen:\n    address: 127.0.0.1:0\n"):
                cfg = cfg.replace(face, face + tls)
        cls.kasd = Kasd(config=cfg)
        if not cls.kasd.started:
            cls.kasd.kill()
            cls.redis.kill()
            raise AssertionError(cls.kasd.log())
        host = "localhost" if cls.tls else "127.0.0.1"
        cls.agent_port = cls.kasd.listeners["agent"][1]
        cls.api_addr = "%s:%d" % (host, cls.kasd.listeners["api"][1])
        cls.agents = []

    @classmethod
    def stop(cls):
        bad = []
        for a in cls.agents:
            try:
                rc = a.stop()
                if rc != 0:
                    bad.append(f"kasd-goagent exit code {rc}\n" + a.log())
                elif not a.named("stopped"):
                    bad.append("kasd-goagent exited without 'stopped'\n" + a.log())
            finally:
                a.kill()
        rc = cls.kasd.stop()
        cls.kasd.kill()
        cls.redis.kill()
        assert rc == 0, f"kasd exit code {rc}\n" + cls.kasd.log()
        assert not bad, "\n".join(bad)

    @classmethod
    def agent(cls, agent_id, addr, *args):
        a = GoAgent(addr, cls.tokens[agent_id], *args)
        cls.agents.append(a)
        return a

    def client(self, cmd, *args, **kw):
        tls = ("--ca-file", os.path.join(CERTS, "ca.pem")) if self.tls else ()
        return goclient(self.api_addr, self.secret_file, cmd, *tls, *args, **kw)

    def assert_client(self, cmd, *args, agent=None, **kw):
        rc, res, err = self.client(cmd, *args, **kw)
        self.assertEqual(rc, 0, f"kasd-goclient {cmd} {args}: {err}\n{res}\n" +
                         (agent.log() if agent else "") + "\nkasd:\n" + self.kasd.log()[-6000:])
        self.assertTrue(res.get("ok"), res)
        return res

    def check_listed(self, agent, agent_id):
        res = self.assert_client("agents", "--agent-id", str(agent_id), agent=agent)
        mine = [a for a in res["agents"] if a["connection_id"] == agent.pod_id()]
        self.assertEqual(len(mine), 1, res)
        a = mine[0]
        self.assertEqual((a["agent_id"], a["project_id"]), (agent_id, 100 + agent_id))
        meta = a["agent_meta"]
        self.assertEqual((meta["version"], meta["commit_id"], meta["pod_namespace"]),
                         (VERSION, COMMIT, "gitlab-agent"))
        self.assertEqual(meta["pod_name"], agent.named("start")[0]["pod_name"])
        self.assertEqual(meta["kubernetes_version"]["git_version"], "v1.29.0")
        return a


class GrpcGo(GoPeers, unittest.TestCase):
    """Cases 1, 3, 4 and ws:// on one h2c kasd. Agent 1 serves the calls; agent 2 stays idle
    from setUpClass to the last test (case 3), while the others run."""

    @classmethod
    def setUpClass(cls):
        cls.start("grpcgo")
        cls.proxy = None
        try:
            cls.agent_addr = "grpc://127.0.0.1:%d" % cls.agent_port
            cls.a1 = cls.agent(1, cls.agent_addr, "--keepalive-time", "20s")
            cls.proxy = H2PingProxy(("127.0.0.1", cls.agent_port))
            cls.idle = cls.agent(2, "grpc://" + cls.proxy.address)   # agentk's own 55 s keepalive
            cls.idle_started = time.monotonic()
        except BaseException:
            cls.tearDownClass()  # unittest does not call it when setUpClass fails
            raise

    @classmethod
    def tearDownClass(cls):
        try:
            cls.stop()
        finally:
            if cls.proxy:
                cls.proxy.close()

    def test_1a_registers_and_is_listed(self):
        self.a1.wait_ready()
        self.check_listed(self.a1, 1)
        res = self.assert_client("agents", "--project-id", "101", agent=self.a1)
        self.assertIn(self.a1.pod_id(), [a["connection_id"] for a in res["agents"]])
        start = self.a1.named("start")[0]
        self.assertEqual(start["user_agent"], f"gitlab-agent/{VERSION}/{COMMIT}")
        self.assertEqual(start["gzip"], "--no-gzip" not in EXTRA)

    def test_1b_unary_with_and_without_gzip(self):
        self.a1.wait_ready()
        before = len([e for e in self.a1.named("call_served") if e["method"] == "/kasd.test.Echo/Unary"])
        for gz in ((), ("--gzip",)):
            res = self.assert_client("unary", "--agent-id", "1", "--data", "unary-" + str(bool(gz)),
                                     "--tag", "tag-1b", *gz, agent=self.a1)
            self.assertEqual(res["agent_pod_id"], str(self.a1.pod_id()))
        # the agent logs call_served after its last frame is sent, so the client may see the
        # answer first: wait for the two lines rather than read the log once
        unary = lambda evs: [e for e in evs if e.get("event") == "call_served"
                             and e["method"] == "/kasd.test.Echo/Unary"]
        served = self.a1.wait_for(lambda evs: len(unary(evs)) >= before + 2 and unary(evs), 5,
                                  "two more Unary calls served")
        self.assertTrue(all(e["code"] == "OK" for e in served), served)
        # tunnels used are replaced: the pool is back to at least 2 idle
        self.a1.wait_for(lambda evs: [e for e in evs if e.get("event") in ("tunnel_open", "tunnel_used")][-1]
                         .get("idle", 0) >= 2, 10, "the pool back at 2 idle tunnels")

    def test_1c_8mib_each_way(self):
        self.a1.wait_ready()
        for args in (("--mode", "gen"), ("--mode", "echo", "--gzip")):
            res = self.assert_client("stream", "--agent-id", "1", "--bytes", str(EIGHT_MIB),
                                     "--timeout", "120s", *args, agent=self.a1)
            self.assertEqual(res["received_bytes"], EIGHT_MIB)
        big = lambda evs: [e for e in evs if e.get("event") == "call_served"
                           and e["method"] == "/kasd.test.Echo/Stream" and e["code"] == "OK"
                           and e["in_bytes"] == EIGHT_MIB and e["out_bytes"] == EIGHT_MIB]
        self.a1.wait_for(big, 5, "an 8 MiB Stream call served OK")

    def test_1d_error_status_passes_through(self):
        self.a1.wait_ready()
        for gz in ((), ("--gzip",)):
            res = self.assert_client("error", "--agent-id", "1", "--expect-code", "FAILED_PRECONDITION",
                                     "--expect-message", "failed by go agent", *gz, agent=self.a1)
            self.assertEqual(res["code_number"], 9)

    def test_1e_no_tunnel_error_from_agent(self):
        self.a1.wait_ready()
        errors = [e for e in self.a1.named("error")]
        self.assertEqual(errors, [], self.a1.log())

    def test_4_get_configuration(self):
        # the agent looks the protos up at start, before it connects: say so at once
        try:
            self.a1.wait_event("config_unavailable", 3)
        except AssertionError:
            pass
        if self.a1.named("config_unavailable"):
            self.skipTest("proto/ has no agent_configuration protos yet (branch agentcfg): "
                          + self.a1.named("config_unavailable")[0]["reason"])
        self.a1.wait_ready()
        ev = self.a1.wait_event("config", 15)
        self.assertEqual(ev.get("agent_id"), 1, ev)
        self.assertIn("gitlab_external_url", ev)
        self.assertIn("commit_id", ev)

    def test_5a_ws(self):
        a = self.agent(3, "ws://127.0.0.1:%d" % self.agent_port)
        a.wait_ready()
        ws = a.wait_event("ws_connected", 5)
        self.assertEqual(ws["subprotocol"], "ws-tunnel")
        self.check_listed(a, 3)
        res = self.assert_client("unary", "--agent-id", "3", "--data", "over ws", agent=a)
        self.assertEqual(res["response"], "echo:over ws")
        self.assert_client("stream", "--agent-id", "3", "--bytes", str(1 << 20), agent=a)

    def test_zz_3_idle_agent_keeps_its_connection(self):
        a = self.idle
        a.wait_ready()
        listed = self.check_listed(a, 2)
        time.sleep(2)  # the connection's start-up pings (BDP estimation) are over
        pings0 = {d: self.proxy.count(d, H2PingProxy.PING, flags=0) for d in ("c2s", "s2c")}
        left = IDLE_SECONDS - (time.monotonic() - self.idle_started)
        if left > 0:
            time.sleep(left)
        # no state change after READY, no tunnel lost, nothing failed
        states = [e["state"] for e in a.named("conn_state")]
        self.assertEqual(states[-1], "READY", a.log())
        self.assertEqual(states[states.index("READY"):], ["READY"], a.log())
        self.assertEqual(a.named("tunnel_closed") + a.named("error"), [], a.log())
        # keepalive pings went over the idle connection and were answered: the agent pings after
        # 55 s without reads, kasd every 50 s (which also counts as a read for the agent, so
        # within 70 s either may be first), and kasd never sent GOAWAY
        pings = {d: self.proxy.count(d, H2PingProxy.PING, flags=0) - pings0[d] for d in ("c2s", "s2c")}
        self.assertGreaterEqual(pings["c2s"] + pings["s2c"], 1, self.proxy.frames)
        self.assertGreaterEqual(self.proxy.count("s2c", H2PingProxy.PING, flags=1),
                                self.proxy.count("c2s", H2PingProxy.PING, flags=0), self.proxy.frames)
        self.assertEqual(self.proxy.count("s2c", H2PingProxy.GOAWAY), 0, self.proxy.frames)
        self.assertEqual(len(self.proxy.socks), 2, "the agent reconnected")
        self.assertNotIn("too_many_pings", self.kasd.log())
        self.assertEqual([e for e in self.kasd.events if e.get("event") == "http2_error"], [])
        # same connection in the fleet view, and it still serves a call
        self.assertEqual(self.check_listed(a, 2)["connected_at"], listed["connected_at"])
        res = self.assert_client("unary", "--agent-id", "2", "--data", "after idle", agent=a)
        self.assertEqual(res["response"], "echo:after idle")
        a.wait_event("call_served", 5, method="/kasd.test.Echo/Unary", code="OK")
        self.assertGreaterEqual(metric(self.kasd, "kasd_listener_connections_opened_total", listener="agent"), 2)


class GrpcGoTls(GoPeers, unittest.TestCase):
    """Case 2 (grpcs://) and wss:// against kasd with TLS on the agent and api listeners."""
    tls = True

    @classmethod
    def setUpClass(cls):
        cls.start("grpcgotls")
        cls.ca = os.path.join(CERTS, "ca.pem")

    @classmethod
    def tearDownClass(cls):
        cls.stop()

    def test_2_grpcs(self):
        a = self.agent(4, "grpcs://localhost:%d" % self.agent_port, "--ca-file", self.ca)
        a.wait_ready()
        self.check_listed(a, 4)
        res = self.assert_client("unary", "--agent-id", "4", "--data", "over tls", agent=a)
        self.assertEqual(res["response"], "echo:over tls")
        self.assert_client("unary", "--agent-id", "4", "--gzip", agent=a)
        self.assert_client("stream", "--agent-id", "4", "--bytes", str(EIGHT_MIB), agent=a)

    def test_2_grpcs_wrong_ca_is_refused(self):
        a = self.agent(5, "grpcs://localhost:%d" % self.agent_port, "--ca-file", os.path.join(CERTS, "other-ca.pem"))
        ev = a.wait_event("error", 20, what="register")
        self.assertEqual(ev["code"], "Unavailable", ev)
        self.assertFalse(a.named("registered"))

    def test_5b_wss(self):
        a = self.agent(6, "wss://localhost:%d" % self.agent_port, "--ca-file", self.ca)
        a.wait_ready()
        self.assertEqual(a.wait_event("ws_connected", 5)["subprotocol"], "ws-tunnel")
        self.check_listed(a, 6)
        res = self.assert_client("unary", "--agent-id", "6", "--data", "over wss", agent=a)
        self.assertEqual(res["response"], "echo:over wss")


if __name__ == "__main__":
    result = unittest.main(exit=False, verbosity=2).result
    failed = len(result.failures) + len(result.errors)
    print(f"{max(0, result.testsRun - failed - len(result.skipped))} passed, {failed} failed, "
          f"{len(result.skipped)} skipped")
    sys.exit(1 if failed else 0)
