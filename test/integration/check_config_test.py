"""kasd --check-config reads every file the configuration names exactly as start-up reads it: for
each broken file (secret files, the agent token file, TLS certificates and keys, Redis password
files), --check-config exits 2 with the message a real start prints, and a good configuration is
still valid (and really starts)."""
import base64
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(__file__))
from kasd_harness import KASD, Kasd, write_tokens  # noqa: E402

CERTS = os.environ.get("KD_TEST_CERTS", os.path.join(os.path.dirname(__file__), "..", "certs"))
HAVE_CERTS = os.path.exists(os.path.join(CERTS, "server.pem"))


def run(*args, timeout=20):
    return subprocess.run([KASD, *args], capture_output=True, text=True, timeout=timeout)


def start_failure(path, timeout=30):
    """Start kasd for real on `path`; it must exit on its own (the config cannot start). Returns
    (exit code, stderr)."""
    p = subprocess.Popen([KASD, "--config", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # It started although a file it names is broken: stop it and report what it said.
        p.send_signal(signal.SIGTERM)
        try:
            _, err = p.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate(timeout=5)
        return None, err
    return p.returncode, err


class CheckConfig(unittest.TestCase):
    def setUp(self):
        self.d = tempfile.mkdtemp(prefix="kasd-check-")
        self.addCleanup(shutil.rmtree, self.d, True)
        self.files = {}
        secret = base64.b64encode(os.urandom(32)).decode() + "\n"
        self.put("api-secret", secret)
        self.put("private-api-secret", secret)
        self.put("redis-password", "hunter2\n")
        write_tokens(os.path.join(self.d, "tokens.yaml"), {7: ("t" * 32, 1)})
        if HAVE_CERTS:
            for name in ("server.pem", "server.key", "ca.pem"):
                shutil.copy(os.path.join(CERTS, name), os.path.join(self.d, name))

    def put(self, name, text):
        with open(os.path.join(self.d, name), "w") as f:
            f.write(text)

    def config(self, tls=False, redis=False):
        d = self.d
        t = f"    certificate_file: {d}/server.pem\n    key_file: {d}/server.key\n" if tls else ""
        text = (f"shards: 1\n"
                f"agent:\n  listen:\n    address: 127.0.0.1:0\n{t}  token_file: {d}/tokens.yaml\n"
                f"api:\n  listen:\n    address: 127.0.0.1:0\n{t}"
                f"    authentication_secret_file: {d}/api-secret\n"
                f"private_api:\n  listen:\n    address: 127.0.0.1:0\n"
                f"    authentication_secret_file: {d}/private-api-secret\n"
                f"observability:\n  listen:\n    address: 127.0.0.1:0\n"
                f"limits:\n  shutdown_grace: 1s\n")
        if redis:
            text += (f"redis:\n  server:\n    address: 127.0.0.1:1\n  password_file: {d}/redis-password\n"
                     f"  sentinel:\n    master_name: m\n    addresses: [127.0.0.1:1]\n"
                     f"    password_file: {d}/redis-password\n")
            if tls:
                text += f"  tls:\n    ca_file: {d}/ca.pem\n"
        path = os.path.join(d, "kasd.yaml")
        with open(path, "w") as f:
            f.write(text)
        return path

    def break_file(self, name, how):
        path = os.path.join(self.d, name)
        if os.path.isdir(path):
            os.rmdir(path)
        elif os.path.exists(path):
            os.unlink(path)
        if how == "missing":
            return
        if how == "directory":
            os.mkdir(path)
            return
        self.put(name, {"empty": "", "blank": "\n", "bad base64": "not base64!!\n",
                        "garbage": "-----BEGIN CERTIFICATE-----\nnot a certificate\n"
                                   "-----END CERTIFICATE-----\n",
                        "bad yaml": "agents: [\n", "no agents": "agents:\n  - agent_id: 1\n"}[how])

    def assert_refused_like_start(self, path, want_in, can_start=True):
        chk = run("--check-config", path)
        self.assertEqual(chk.returncode, 2, f"--check-config accepted it: {chk.stdout}{chk.stderr}")
        self.assertNotIn("valid", chk.stdout)
        self.assertIn(want_in, chk.stderr)
        self.assertEqual(chk.stderr.count("\n"), 1, chk.stderr)
        if can_start:
            rc, err = start_failure(path)
            self.assertEqual(rc, 2, f"start: {err}")
            self.assertEqual(chk.stderr, err, "--check-config and a real start say the same")
        return chk.stderr

    def test_good_config_is_valid_and_starts(self):
        path = self.config(tls=HAVE_CERTS)
        r = run("--check-config", path)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout, f"{path}: configuration is valid\n")
        self.assertEqual(r.stderr, "")
        with open(path) as f:
            k = Kasd(config=f.read())
        self.addCleanup(k.kill)
        self.assertTrue(k.started, k.log())
        self.assertEqual(k.stop(), 0, k.log())

    def test_good_config_with_redis_files_is_valid(self):
        r = run("--check-config", self.config(tls=HAVE_CERTS, redis=True))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("configuration is valid", r.stdout)

    def test_broken_secret_files(self):
        for name, key in (("api-secret", "api.listen.authentication_secret_file"),
                          ("private-api-secret", "private_api.listen.authentication_secret_file")):
            for how in ("missing", "empty", "blank", "bad base64", "directory"):
                with self.subTest(file=name, how=how):
                    self.setUp()
                    self.break_file(name, how)
                    msg = self.assert_refused_like_start(self.config(), key)
                    self.assertIn(os.path.join(self.d, name), msg)

    def test_broken_token_file(self):
        for how in ("missing", "empty", "bad yaml", "no agents", "directory"):
            with self.subTest(how=how):
                self.setUp()
                self.break_file("tokens.yaml", how)
                self.assert_refused_like_start(self.config(), "agent.token_file")

    def test_broken_redis_password_files(self):
        # With a redis section a real start would dial 127.0.0.1:1; the password files are read
        # while the configuration loads, before any of that, so both paths stop at the same place.
        for how in ("missing", "empty", "blank", "directory"):
            with self.subTest(how=how):
                self.setUp()
                self.break_file("redis-password", how)
                self.assert_refused_like_start(self.config(redis=True), "redis.")

    def test_broken_configuration_dir(self):
        for how in ("missing", "file"):
            with self.subTest(how=how):
                self.setUp()
                path = os.path.join(self.d, "agents")
                if how == "file":
                    self.put("agents", "not a directory\n")
                with open(self.config()) as f:
                    text = f.read()
                text = text.replace(
                    f"  token_file: {self.d}/tokens.yaml\n",
                    f"  token_file: {self.d}/tokens.yaml\n  configuration_dir: {path}\n")
                with open(os.path.join(self.d, "kasd.yaml"), "w") as f:
                    f.write(text)
                msg = self.assert_refused_like_start(os.path.join(self.d, "kasd.yaml"),
                                                     "agent.configuration_dir")
                self.assertIn(path, msg)

    @unittest.skipUnless(HAVE_CERTS, "no test certificates")
    def test_broken_tls_files(self):
        for name in ("server.pem", "server.key"):
            for how in ("missing", "empty", "garbage", "directory"):
                with self.subTest(file=name, how=how):
                    self.setUp()
                    self.break_file(name, how)
                    self.assert_refused_like_start(self.config(tls=True), "agent.listen TLS")

    @unittest.skipUnless(HAVE_CERTS, "no test certificates")
    def test_key_of_another_certificate(self):
        # The CA's certificate with the server's key: a pair that does not match.
        shutil.copy(os.path.join(CERTS, "ca.pem"), os.path.join(self.d, "server.pem"))
        self.assert_refused_like_start(self.config(tls=True), "agent.listen TLS")

    def kube_config(self, tls):
        # the front door with its own certificate pair (k8s.pem/k8s.key) and access-token file
        with open(self.config()) as f:
            text = f.read()
        t = f"    certificate_file: {self.d}/k8s.pem\n    key_file: {self.d}/k8s.key\n" if tls else ""
        text += (f"kubernetes_api:\n  listen:\n    address: 127.0.0.1:0\n{t}"
                 f"  access_token_file: {self.d}/access.yaml\n")
        path = os.path.join(self.d, "kasd.yaml")
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_broken_access_token_file(self):
        for how in ("missing", "empty", "bad yaml", "directory"):
            with self.subTest(how=how):
                self.setUp()
                self.break_file("access.yaml", how)
                self.assert_refused_like_start(self.kube_config(False), "kubernetes_api.access_token_file")
        self.setUp()
        self.put("access.yaml", "users:\n  - {token: k8s-0123456789abcdef, agents: [7]}\n")
        r = run("--check-config", self.kube_config(False))
        self.assertEqual(r.returncode, 0, r.stderr)

    @unittest.skipUnless(HAVE_CERTS, "no test certificates")
    def test_broken_kubernetes_api_tls_files(self):
        for name in ("k8s.pem", "k8s.key"):
            for how in ("missing", "garbage"):
                with self.subTest(file=name, how=how):
                    self.setUp()
                    self.put("access.yaml", "users:\n  - {token: k8s-0123456789abcdef, agents: [7]}\n")
                    shutil.copy(os.path.join(CERTS, "server.pem"), os.path.join(self.d, "k8s.pem"))
                    shutil.copy(os.path.join(CERTS, "server.key"), os.path.join(self.d, "k8s.key"))
                    self.break_file(name, how)
                    self.assert_refused_like_start(self.kube_config(True), "kubernetes_api.listen TLS")

    def gitlab_config(self, extra):
        with open(self.config()) as f:
            text = f.read()
        text = text.replace(f"  token_file: {self.d}/tokens.yaml\n", "  token_source: gitlab\n")
        text += "gitlab:\n" + extra
        path = os.path.join(self.d, "kasd.yaml")
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_gitlab_token_source(self):
        self.put("gitlab-secret", base64.b64encode(os.urandom(32)).decode() + "\n")
        sec = f"  authentication_secret_file: {self.d}/gitlab-secret\n"
        cases = [
            (sec, "agent.token_source: gitlab needs gitlab.address"),
            ("  address: http://127.0.0.1:1\n", "needs gitlab.authentication_secret_file"),
            ("  address: http://127.0.0.1:1\n  authentication_secret_file: " + self.d + "/missing\n",
             "gitlab.authentication_secret_file"),
            ("  address: http://no-such-host.invalid:8181\n" + sec, "gitlab.address: http://no-such-host.invalid"),
            ("  address: https://127.0.0.1:1\n  ca_file: " + self.d + "/no-ca.pem\n" + sec, "gitlab.ca_file"),
        ]
        for extra, want in cases:
            with self.subTest(want=want):
                self.assert_refused_like_start(self.gitlab_config(extra), want)
        r = run("--check-config", self.gitlab_config("  address: http://127.0.0.1:1/gitlab\n" + sec))
        self.assertEqual(r.returncode, 0, r.stderr)

    @unittest.skipUnless(HAVE_CERTS, "no test certificates")
    def test_broken_redis_tls_ca(self):
        for how in ("missing", "garbage"):
            with self.subTest(how=how):
                self.setUp()
                self.break_file("ca.pem", how)
                # A real start would need a reachable Redis to get further; the check must not.
                self.assert_refused_like_start(self.config(tls=True, redis=True), "redis.tls")


if __name__ == "__main__":
    result = unittest.main(exit=False, verbosity=2).result
    failed = len(result.failures) + len(result.errors)
    print(f"{result.testsRun - failed - len(result.skipped)} passed, {failed} failed, "
          f"{len(result.skipped)} skipped")
    sys.exit(1 if failed else 0)
