"""The bench harness in quick mode (bench/run all --quick): every scenario runs end to end and every
call succeeds. Timings are printed by the harness but never checked here (performance.md: timings
belong in benchmarks, not in tests).

Environment: KASD_BIN, BENCH_AGENTSIM, BENCH_LOADGEN (paths of the binaries; bench/run reads the
same variables), optionally KASD_BUILD and BENCH_KASLIKE. The peers nginx (S1, S7) and the kas-like
peer (bench/peers/kaslike: S1, S4, S7) must have run whenever they are available (nginx installed, the
kas-like binary built where bench/run looks for it)."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN = os.path.join(ROOT, "bench", "run")
LOADGEN = os.environ.get("BENCH_LOADGEN", os.path.join(ROOT, "build", "bench", "loadgen"))


def kaslike_available():
    """Where bench/run looks for kasd-kaslike (its kaslike_binary())."""
    build = os.path.abspath(os.environ.get("KASD_BUILD") or os.path.join(ROOT, "build"))
    cands = [os.environ.get("BENCH_KASLIKE"), os.path.join(build, "bench", "peers", "kaslike", "kasd-kaslike")]
    if os.environ.get("BENCH_AGENTSIM"):
        cands.append(os.path.join(os.path.dirname(os.path.abspath(os.environ["BENCH_AGENTSIM"])), "peers",
                                  "kaslike", "kasd-kaslike"))
    return any(c and os.access(c, os.X_OK) for c in cands)


NGINX = bool(shutil.which("nginx") or os.access("/usr/sbin/nginx", os.X_OK))
KASLIKE = kaslike_available()


class BenchSmoke(unittest.TestCase):
    report = None
    output = ""
    rc = None

    @classmethod
    def setUpClass(cls):
        fd, path = tempfile.mkstemp(prefix="bench-smoke-", suffix=".json")
        os.close(fd)
        try:
            p = subprocess.run([sys.executable, RUN, "all", "--quick", "--json", path], capture_output=True,
                               text=True, timeout=300, cwd=ROOT)
            cls.rc = p.returncode
            cls.output = p.stdout + p.stderr
            with open(path) as f:
                cls.report = json.load(f)
        finally:
            os.unlink(path)

    def setUp(self):
        self.assertIsNotNone(self.report, self.output)

    def test_harness_exit_status(self):
        self.assertEqual(self.rc, 0, self.output)
        self.assertEqual(self.report["failures"], [], self.output)

    def test_histogram_self_check(self):
        p = subprocess.run([LOADGEN, "--self-check"], capture_output=True, text=True, timeout=30)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)

    def test_s1_every_call_succeeded(self):
        s1 = self.report["scenarios"]["S1"]
        self.assertNotIn("error", s1, self.output)
        layouts = [k for k in s1 if k != "notes"]
        self.assertTrue(layouts, self.output)
        for lay in layouts:
            raw = s1[lay]["raw"]
            for path in ("direct", "routed", "routed-1agent"):
                self.assertTrue(raw[path], f"{lay} {path}: no run")
                for res in raw[path]:
                    self.assertEqual(res["exit"], 0, res)
                    self.assertGreater(res["calls_ok"], 0, res)
                    self.assertEqual(res["calls_failed"], 0, res)
                    self.assertEqual(res["mismatches"], 0, res)
                    self.assertGreater(res["latency_us"]["n"], 0, res)
            for res in raw.get("haproxy", []):  # haproxy may be missing: then noted, not run
                self.assertEqual(res["calls_failed"], 0, res)
            peers = (["nginx"] if NGINX else []) + (["kaslike"] if KASLIKE else [])
            for path in peers:
                self.assertTrue(raw.get(path), f"{lay} {path}: available but did not run\n{self.output[-3000:]}")
                for res in raw[path]:
                    self.assertEqual(res["exit"], 0, res)
                    self.assertGreater(res["calls_ok"], 0, res)
                    self.assertEqual(res["calls_failed"], 0, res)
                    self.assertEqual(res["mismatches"], 0, res)
            if KASLIKE:
                # every call loadgen saw succeed went through the kas-like peer's tunnels
                ok = sum(res["calls_ok_total"] for res in raw["kaslike"])
                self.assertGreaterEqual(s1[lay]["kaslike"]["routed_ok"], ok, s1[lay]["kaslike"])
                self.assertEqual(s1[lay]["kaslike"]["auth_failures"], 0, s1[lay]["kaslike"])
                sk = s1[lay]["agentsim_kaslike"]
                self.assertEqual(sk["protocol_errors"], 0, sk)
                self.assertEqual(sk["calls_failed"], 0, sk)
                self.assertGreaterEqual(sk["tunnel_calls"], ok, sk)
            half = s1[lay]["raw_half_load"]
            for res in half["routed"] + half["direct"]:
                self.assertEqual(res["calls_failed"], 0, res)
                self.assertGreater(res["calls_ok"], 0, res)
            self.assertEqual(s1[lay]["agentsim"]["calls_failed"], 0)
            self.assertEqual(s1[lay]["agentsim"]["protocol_errors"], 0)
            self.assertGreater(s1[lay]["agentsim"]["tunnel_calls"], 0)

    def test_s2_every_call_went_through_the_fleet(self):
        s2 = self.report["scenarios"]["S2"]
        self.assertNotIn("error", s2, self.output)
        layouts = [k for k in s2 if k != "notes"]
        self.assertTrue(layouts, self.output)
        for lay in layouts:
            raw = s2[lay]["raw"]
            for path in ("S1", "S2"):
                self.assertTrue(raw[path], f"{lay} {path}: no run")
                for res in raw[path] + s2[lay]["raw_fixed_rate"][path]:
                    self.assertEqual(res["exit"], 0, res)
                    self.assertGreater(res["calls_ok"], 0, res)
                    self.assertEqual(res["calls_failed"], 0, res)
                    self.assertEqual(res["mismatches"], 0, res)
            for res in raw["S2"]:
                # every call entered A and was forwarded to B, where the agents are
                self.assertGreaterEqual(res["forwarded"]["ready"], res["calls_ok_total"], res["forwarded"])
                self.assertGreaterEqual(res["gateway"]["ready"], res["calls_ok_total"], res["gateway"])
                self.assertIn("redis_commands_per_call", res)
            for sname in ("S1", "S2"):
                self.assertEqual(s2[lay]["agentsim"][sname]["calls_failed"], 0)
                self.assertEqual(s2[lay]["agentsim"][sname]["protocol_errors"], 0)

    def test_s3_every_waiting_call_was_served(self):
        s3 = self.report["scenarios"]["S3"]
        self.assertNotIn("error", s3, self.output)
        for mode in ("events", "poll", "local"):
            trials = s3["raw"][mode]
            self.assertEqual(len(trials), s3["trials"], mode)
            for x in trials:
                self.assertTrue(x["ok"], x)
                self.assertGreaterEqual(x["latency_us"], 0, x)
        # what got the waiting calls routed: presence events (events fleet), the poll (poll fleet), a
        # local tunnel; never the safety re-check (5 s; a trial waits well under 1 s). Lower bounds
        # only: a call that an event reaches before its first Redis read has answered is not counted
        # as having waited.
        woken, n = s3["woken"], s3["trials"]
        self.assertGreaterEqual(woken["events"]["event"], n // 2, woken)
        self.assertEqual(woken["events"]["poll"], 0, woken)
        self.assertGreaterEqual(woken["events"]["tunnel"], n // 2, woken)
        self.assertGreaterEqual(woken["poll"]["poll"], n // 2, woken)
        self.assertEqual(woken["poll"]["event"], 0, woken)
        self.assertEqual(woken["events"]["recheck"] + woken["poll"]["recheck"], 0, woken)

    def test_s4_every_agent_connected(self):
        s4 = self.report["scenarios"]["S4"]
        self.assertNotIn("error", s4, self.output)
        self.assertIn("h2c-200", s4["raw"], self.output)
        self.assertIn("tls-200", s4["raw"], self.output)
        if KASLIKE:
            self.assertIn("h2c-200", s4["raw_kaslike"], self.output)
            self.assertIn("tls-200", s4["raw_kaslike"], self.output)
        for key, runs in list(s4["raw"].items()) + list(s4.get("raw_kaslike", {}).items()):
            for res in runs:
                self.assertEqual(res["agentsim"]["registers_ok"], res["agents"], key)
                self.assertEqual(res["agentsim"]["protocol_errors"], 0, key)
                self.assertGreater(res["rss_loaded_kib"], 0, key)

    def test_s7_streams_succeeded(self):
        s7 = self.report["scenarios"]["S7"]
        self.assertNotIn("error", s7, self.output)
        for lay in [k for k in s7 if k not in ("notes", "slow_reader")]:
            peers = (["nginx"] if NGINX else []) + (["kaslike"] if KASLIKE else [])
            for path in ["direct", "routed"] + peers:
                self.assertTrue(s7[lay]["raw"].get(path), f"{lay} {path}: did not run\n{self.output[-3000:]}")
                for res in s7[lay]["raw"][path]:
                    self.assertEqual(res["calls_failed"], 0, res)
                    self.assertEqual(res["mismatches"], 0, res)
                    self.assertGreater(res["bytes_recv"], 0, res)
        slow = s7["slow_reader"]
        for res in slow["raw"]:
            self.assertEqual(res["calls_failed"], 0, res)
            self.assertEqual(res["calls_ok_total"], 1, res)
            self.assertGreater(res["peak_rss_kib"], 0, res)


if __name__ == "__main__":
    result = unittest.main(exit=False, verbosity=2).result
    failed = len(result.failures) + len(result.errors)
    print(f"{result.testsRun - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
