/* dev.c — see dev.h. Only the embedded default lives here; production points kasd at its Redis and
 * its GitLab-provided secrets through the config file. */
#include "cmd/dev.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "core/base64.h"
#include "core/clock.h"

static int random_bytes(uint8_t *buf, size_t n)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = getrandom(buf + got, n - got, 0);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        got += (size_t)r;
    }
    return 0;
}

/* Write content to path with mode 0600 unless it exists already (idempotent set-up). */
static int write_once(const char *path, const char *content, bool *created, char *err, size_t errlen)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    *created = false;
    if (fd < 0) {
        if (errno == EEXIST)
            return 0;
        int e = errno;
        snprintf(err, errlen, "%s: %s", path, strerror(e));
        return -e;
    }
    size_t len = strlen(content);
    ssize_t w = write(fd, content, len);
    int e = errno;
    close(fd);
    if (w != (ssize_t)len) {
        snprintf(err, errlen, "%s: write: %s", path, strerror(e));
        return -e;
    }
    *created = true;
    return 0;
}

/* 32 random bytes, base64, one newline: a kas secret file, as GitLab's .gitlab_kas_secret is. */
static int secret_content(char content[64], char *err, size_t errlen)
{
    uint8_t raw[32];
    int rc = random_bytes(raw, sizeof(raw));
    if (rc < 0) {
        snprintf(err, errlen, "getrandom: %s", strerror(-rc));
        return rc;
    }
    kd_base64_encode(raw, sizeof(raw), content); /* 44 characters and a NUL */
    explicit_bzero(raw, sizeof(raw));
    strcat(content, "\n");
    return 0;
}

/* force: a new file is written beside path (mode 0600) and renamed over it, so a reader never
 * sees a partial secret and the old file's owner or mode do not carry over. */
int kd_dev_secret_write(const char *path, bool force, bool *created, char *err, size_t errlen)
{
    char content[64], tmp[PATH_MAX];
    int rc = secret_content(content, err, errlen);
    *created = false;
    if (rc < 0)
        return rc;
    if (!force) {
        rc = write_once(path, content, created, err, errlen);
        explicit_bzero(content, sizeof(content));
        return rc;
    }
    if (snprintf(tmp, sizeof(tmp), "%s.XXXXXX", path) >= (int)sizeof(tmp)) {
        snprintf(err, errlen, "%s: path too long", path);
        return -ENAMETOOLONG;
    }
    int fd = mkstemp(tmp); /* mode 0600 */
    if (fd < 0) {
        int e = errno;
        snprintf(err, errlen, "%s: %s", tmp, strerror(e));
        return -e;
    }
    size_t len = strlen(content);
    ssize_t w = write(fd, content, len);
    int e = w == (ssize_t)len ? 0 : w < 0 ? errno : EIO;
    explicit_bzero(content, sizeof(content));
    if (e == 0 && fsync(fd) < 0)
        e = errno;
    close(fd);
    if (e == 0 && rename(tmp, path) < 0)
        e = errno;
    if (e != 0) {
        unlink(tmp);
        snprintf(err, errlen, "%s: %s", path, strerror(e));
        return -e;
    }
    *created = true;
    return 0;
}

static int secret_file(const char *dir, const char *name, char **slot, char *err, size_t errlen)
{
    char path[PATH_MAX + 64];
    bool created;
    if (*slot != NULL) /* configured explicitly: leave it */
        return 0;
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    int rc = kd_dev_secret_write(path, false, &created, err, errlen);
    if (rc < 0)
        return rc;
    *slot = strdup(path);
    printf("  %-28s %s%s\n", name, path, created ? " (new)" : "");
    return *slot ? 0 : -ENOMEM;
}

int kd_dev_prepare(struct kd_config *cfg, const char *dir, char *err, size_t errlen)
{
    char path[PATH_MAX + 64], content[512], token[64];
    uint8_t raw[24];
    bool created;
    char abs[PATH_MAX];
    if (mkdir(dir, 0700) < 0 && errno != EEXIST) {
        int e = errno;
        snprintf(err, errlen, "state directory %s: %s", dir, strerror(e));
        return -e;
    }
    /* Absolute paths: printed for the operator, and valid whatever directory kasd runs in. */
    if (realpath(dir, abs) != NULL)
        dir = abs;
    printf("kasd development set-up in %s:\n", dir);
    int rc = secret_file(dir, "api-secret", &cfg->api.listen.authentication_secret_file, err, errlen);
    if (rc == 0)
        rc = secret_file(dir, "private-api-secret", &cfg->private_api.listen.authentication_secret_file, err,
                         errlen);
    if (rc < 0)
        return rc;
    if (cfg->agent.token_file == NULL) {
        snprintf(path, sizeof(path), "%s/agent-tokens.yaml", dir);
        rc = random_bytes(raw, sizeof(raw));
        if (rc < 0) {
            snprintf(err, errlen, "getrandom: %s", strerror(-rc));
            return rc;
        }
        kd_base64_encode(raw, sizeof(raw), token);
        for (char *p = token; *p; p++) /* URL-safe, as GitLab agent tokens are */
            *p = *p == '+' ? '-' : *p == '/' ? '_' : *p;
        snprintf(content, sizeof(content),
                 "# Agent tokens for kasd's embedded token resolver (development set-up).\n"
                 "agents:\n"
                 "  - token: \"glagent-%s\"\n"
                 "    agent_id: 1\n"
                 "    project_id: 1\n"
                 "    agent_name: dev-agent\n",
                 token);
        rc = write_once(path, content, &created, err, errlen);
        if (rc < 0)
            return rc;
        cfg->agent.token_file = strdup(path);
        printf("  %-28s %s%s\n", "agent-tokens.yaml", path, created ? " (new)" : "");
    }
    /* The Kubernetes API front door, with one user token for the dev agent (docs/kubernetes_api.md):
     *   curl -H "Authorization: Bearer pat:1:<token>" http://127.0.0.1:8154/k8s-proxy/version */
    cfg->kubernetes_api.enabled = true;
    if (cfg->kubernetes_api.access_token_file == NULL) {
        snprintf(path, sizeof(path), "%s/kubernetes-access.yaml", dir);
        rc = random_bytes(raw, sizeof(raw));
        if (rc < 0) {
            snprintf(err, errlen, "getrandom: %s", strerror(-rc));
            return rc;
        }
        kd_base64_encode(raw, sizeof(raw), token);
        for (char *p = token; *p; p++)
            *p = *p == '+' ? '-' : *p == '/' ? '_' : *p;
        snprintf(content, sizeof(content),
                 "# Kubernetes API front door users (development set-up): credential\n"
                 "# \"Authorization: Bearer pat:1:<token>\" reaches agent 1.\n"
                 "users:\n"
                 "  - token: \"k8s-%s\"\n"
                 "    agents: [1]\n",
                 token);
        rc = write_once(path, content, &created, err, errlen);
        if (rc < 0)
            return rc;
        cfg->kubernetes_api.access_token_file = strdup(path);
        printf("  %-28s %s%s\n", "kubernetes-access.yaml", path, created ? " (new)" : "");
    }
    return 0;
}

static int free_loopback_port(void)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(a);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    if (bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 || getsockname(fd, (struct sockaddr *)&a, &len) < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    close(fd);
    return ntohs(a.sin_port);
}

/* One PING over a fresh connection; true on +PONG. Bounded by timeout_ms. */
static bool redis_ping(int port, int timeout_ms)
{
    struct sockaddr_in a = {
        .sin_family = AF_INET, .sin_port = htons((uint16_t)port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    bool ok = false;
    char buf[16];
    if (fd < 0)
        return false;
    struct timeval tv = {.tv_sec = 0, .tv_usec = timeout_ms * 1000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    if (connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0 && write(fd, "PING\r\n", 6) == 6) {
        ssize_t n = read(fd, buf, sizeof(buf) - 1);
        ok = n >= 5 && memcmp(buf, "+PONG", 5) == 0;
    }
    close(fd);
    return ok;
}

static bool child_alive(pid_t pid, int *status)
{
    return waitpid(pid, status, WNOHANG) == 0;
}

int kd_redis_embedded_start(struct kd_embedded_redis *r, struct kd_config *cfg, const char *workdir,
                            char *err, size_t errlen)
{
    memset(r, 0, sizeof(*r));
    r->pid = -1;
    if (workdir != NULL) {
        snprintf(r->dir, sizeof(r->dir), "%s", workdir);
    } else {
        const char *tmp = getenv("TMPDIR");
        snprintf(r->dir, sizeof(r->dir), "%s/kasd-redis-XXXXXX", tmp && *tmp ? tmp : "/tmp");
        if (mkdtemp(r->dir) == NULL) {
            int e = errno;
            snprintf(err, errlen, "embedded redis: mkdtemp %s: %s", r->dir, strerror(e));
            return -e;
        }
        r->own_dir = 1;
    }
    snprintf(r->logfile, sizeof(r->logfile), "%s/redis.log", r->dir);
    /* Between picking a free port and redis binding it another process may take it; retry. */
    for (int attempt = 0; attempt < 5; attempt++) {
        int port = free_loopback_port();
        if (port < 0) {
            snprintf(err, errlen, "embedded redis: no free loopback port: %s", strerror(-port));
            return port;
        }
        char portstr[16];
        snprintf(portstr, sizeof(portstr), "%d", port);
        pid_t parent = getpid();
        pid_t pid = fork();
        if (pid < 0) {
            int e = errno;
            snprintf(err, errlen, "embedded redis: fork: %s", strerror(e));
            return -e;
        }
        if (pid == 0) {
            /* Die with kasd even on kill -9, so no stray redis outlives a crashed instance. */
            prctl(PR_SET_PDEATHSIG, SIGTERM);
            if (getppid() != parent)
                _exit(1);
            sigset_t none;
            sigemptyset(&none);
            sigprocmask(SIG_SETMASK, &none, NULL);
            setpgid(0, 0); /* a Ctrl-C at the terminal goes to kasd, which stops redis itself */
            int fd = open(r->logfile, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
            if (fd >= 0) {
                dup2(fd, 1);
                dup2(fd, 2);
            }
            execlp("redis-server", "redis-server", "--port", portstr, "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "no", "--daemonize", "no", "--dir", r->dir, "--protected-mode", "yes",
                   "--loglevel", "warning", (char *)NULL);
            _exit(127);
        }
        uint64_t deadline = kd_clock_ms() + 5000;
        int status = 0;
        bool alive = true;
        while (kd_clock_ms() < deadline) {
            if (!(alive = child_alive(pid, &status)))
                break;
            if (redis_ping(port, 200)) {
                r->pid = pid;
                r->port = port;
                free(cfg->redis.address);
                char addr[32];
                snprintf(addr, sizeof(addr), "127.0.0.1:%d", port);
                cfg->redis.address = strdup(addr);
                return 0;
            }
            struct timespec ts = {0, 20 * 1000000};
            nanosleep(&ts, NULL);
        }
        if (alive) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            snprintf(err, errlen, "embedded redis: redis-server did not answer PING within 5 s (log: %s)",
                     r->logfile);
            return -ETIMEDOUT;
        }
        if (WIFEXITED(status) && WEXITSTATUS(status) == 127) {
            snprintf(err, errlen,
                     "no redis configured and redis-server is not installed: install it (apt-get install "
                     "redis-server) or set redis.server.address");
            return -ENOENT;
        }
        /* Exited: most likely the port was taken in the meantime; try another. */
    }
    snprintf(err, errlen, "embedded redis: redis-server kept exiting at start (log: %s)", r->logfile);
    return -EIO;
}

static void remove_own_dir(struct kd_embedded_redis *r)
{
    if (!r->own_dir)
        return;
    unlink(r->logfile);
    rmdir(r->dir);
    r->own_dir = 0;
}

void kd_redis_embedded_stop(struct kd_embedded_redis *r)
{
    int status;
    if (r->pid <= 0) {
        remove_own_dir(r);
        return;
    }
    kill(r->pid, SIGTERM);
    for (int i = 0; i < 250; i++) { /* up to 5 s, then kill */
        if (waitpid(r->pid, &status, WNOHANG) == r->pid) {
            r->pid = -1;
            remove_own_dir(r);
            return;
        }
        struct timespec ts = {0, 20 * 1000000};
        nanosleep(&ts, NULL);
    }
    kill(r->pid, SIGKILL);
    waitpid(r->pid, &status, 0);
    r->pid = -1;
    remove_own_dir(r);
}
