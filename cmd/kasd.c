/* kasd.c — the kasd command: options, configuration, start, signals, stop. */
#include <errno.h>
#include <netdb.h>
#include <stdatomic.h>
#include <getopt.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "cmd/dev.h"
#include "core/access.h"
#include "core/agentcfg.h"
#include "core/httpd.h"
#include "core/httpmap.h"
#include "core/config.h"
#include "core/log.h"
#include "core/jwt.h"
#include "core/tls.h"
#include "core/tokens.h"
#include "shards/agentconfig.h"
#include "shards/kas.h"
#include "shards/presence.h"
#include "shards/conn.h"
#include "control/control.h"
#include "control/gitlab.h"
#include "control/kubeapi.h"
#include "shards/grpc.h"
#include "shards/redis.h"
#include "shards/tracker.h"
#include "shards/tunnel_codec.h"
#include "shards/server.h"

/* systemd's readiness protocol (Type=notify) without libsystemd: one datagram per state change to
 * the AF_UNIX socket named by $NOTIFY_SOCKET ('@' first: the abstract namespace). The address is
 * read once at start and the variable removed, so children (the embedded redis-server, which
 * speaks the protocol too) do not report for kasd. Not under systemd: nothing is sent. */
static struct sockaddr_un notify_addr;
static socklen_t notify_addrlen; /* 0: no NOTIFY_SOCKET */

static void notify_init(void)
{
    const char *v = getenv("NOTIFY_SOCKET");
    size_t len = v ? strlen(v) : 0;
    if (len < 2 || (v[0] != '/' && v[0] != '@') || len >= sizeof(notify_addr.sun_path))
        return;
    notify_addr.sun_family = AF_UNIX;
    memcpy(notify_addr.sun_path, v, len);
    if (v[0] == '@')
        notify_addr.sun_path[0] = '\0';
    notify_addrlen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len);
    unsetenv("NOTIFY_SOCKET");
}

static void notify_send(const char *state)
{
    if (notify_addrlen == 0)
        return;
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0 ||
        sendto(fd, state, strlen(state), MSG_NOSIGNAL, (struct sockaddr *)&notify_addr, notify_addrlen) < 0)
        kd_log_msg(KD_LOG_WARN, "sd_notify_failed", "%s: %s", state, strerror(errno));
    if (fd >= 0)
        close(fd);
}

/* kasd gen-secret [--force] FILE: a secret file for a first install (exit 0; 1 if FILE exists
 * and --force is not given, or on an I/O error; 2 on a usage error). */
static int gen_secret(int argc, char **argv)
{
    const char *path = NULL;
    bool force = false, created;
    char err[512];
    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], "--force") == 0 || strcmp(argv[i], "-f") == 0) {
            force = true;
        } else if (argv[i][0] == '-' && argv[i][1] != '\0') {
            fprintf(stderr, "kasd gen-secret: unknown option \"%s\"\nusage: kasd gen-secret [--force] FILE\n",
                    argv[i]);
            return 2;
        } else if (path == NULL) {
            path = argv[i];
        } else {
            fprintf(stderr, "kasd gen-secret: one FILE only\nusage: kasd gen-secret [--force] FILE\n");
            return 2;
        }
    }
    if (path == NULL) {
        fprintf(stderr, "usage: kasd gen-secret [--force] FILE\n");
        return 2;
    }
    if (kd_dev_secret_write(path, force, &created, err, sizeof(err)) < 0) {
        fprintf(stderr, "kasd gen-secret: %s\n", err);
        return 1;
    }
    if (!created) {
        fprintf(stderr, "kasd gen-secret: %s exists; not overwritten (--force replaces it)\n", path);
        return 1;
    }
    printf("%s: new secret (32 random bytes, base64), mode 0600\n", path);
    return 0;
}

static void wake_shard(void *ud, unsigned slot)
{
    kd_server_wake(ud, slot);
}

/* SIGHUP: load the token file again and swap it in; the old table is freed once every shard has
 * passed a quiescent point (no shard can still hold a pointer into it). */
/* The Kubernetes API access-token table. The control thread is its only reader: a reload (main
 * thread, SIGHUP) leaves the new table in `pending`; the control thread takes it at its next check
 * and frees the table it replaces itself, so no table is freed under a reader. A pending table never
 * taken is freed by the next reload (or at exit). */
struct access_slot {
    _Atomic(struct kd_access *) pending;
    struct kd_access *cur; /* the control thread's */
};

static void reload_access(const struct kd_config *cfg, struct access_slot *slot)
{
    char err[512];
    struct kd_access *t;
    if (!cfg->kubernetes_api.enabled || cfg->kubernetes_api.access_token_file == NULL)
        return;
    if (kd_access_load_file(cfg->kubernetes_api.access_token_file, &t, err, sizeof(err)) < 0) {
        kd_log_msg(KD_LOG_ERROR, "access_tokens_reload_failed",
                   "kubernetes_api.access_token_file: %s "
                   "(keeping the previous tokens)",
                   err);
        return;
    }
    kd_access_free(atomic_exchange_explicit(&slot->pending, t, memory_order_acq_rel));
    struct kd_logline l;
    kd_log_begin(&l, KD_LOG_INFO, "access_tokens_reloaded");
    kd_log_str(&l, "file", cfg->kubernetes_api.access_token_file);
    kd_log_uint(&l, "users", kd_access_count(t));
    kd_log_end(&l);
}

static void reload_tokens(const struct kd_config *cfg, struct kd_kas *kas, struct kd_server *srv)
{
    char err[512];
    struct kd_tokens *t;
    if (cfg->agent.token_file == NULL || kas->tokens == NULL) {
        kd_log_msg(KD_LOG_INFO, "sighup", "no agent.token_file configured: nothing to reload");
        return;
    }
    if (kd_tokens_load_file(cfg->agent.token_file, &t, err, sizeof(err)) < 0) {
        kd_log_msg(KD_LOG_ERROR, "tokens_reload_failed", "%s (keeping the previous tokens)", err);
        return;
    }
    struct kd_tokens *old = kd_tokens_handle_swap(kas->tokens, t);
    if (kd_epoch_synchronize(kas->epoch, wake_shard, srv, 5000) == 0)
        kd_tokens_free(old);
    else
        kd_log_msg(KD_LOG_WARN, "tokens_reload",
                   "a shard did not pass a quiescent point in 5 s; the old "
                   "table is kept (not freed)");
    kd_log_msg(KD_LOG_INFO, "tokens_reloaded", "%s", cfg->agent.token_file);
}

/* Agent configuration files (agent.configuration_dir): load the directory again and swap the new
 * set in, freeing the old one after a grace period exactly like the token table; the shards notice
 * the new generation on their next turn (the grace period wakes them) and push what changed.
 * Called on SIGHUP and when the directory's fingerprint changed. A directory that cannot be read
 * keeps the previous set (logged once per change of the fingerprint, never in a loop). */
static void reload_agentcfg(const struct kd_config *cfg, struct kd_kas *kas, struct kd_server *srv)
{
    if (kas->agentcfg == NULL)
        return;
    struct kd_agentcfg_set *fresh = NULL;
    const struct kd_agentcfg_set *cur = kd_agentcfg_handle_get(kas->agentcfg);
    int r = kd_agentcfg_load(cfg->agent.configuration_dir, cur, &fresh);
    if (r < 0) {
        kd_log_msg(KD_LOG_ERROR, "agent_configuration_reload_failed",
                   "%s: %s (keeping the previous configurations)", cfg->agent.configuration_dir,
                   strerror(-r));
        return;
    }
    struct kd_agentcfg_set *old = kd_agentcfg_handle_swap(kas->agentcfg, fresh);
    if (kd_epoch_synchronize(kas->epoch, wake_shard, srv, 5000) == 0)
        kd_agentcfg_free(old);
    else
        kd_log_msg(KD_LOG_WARN, "agent_configuration_reload",
                   "a shard did not pass a quiescent point in 5 s; the old set is kept (not freed)");
    struct kd_logline l;
    kd_log_begin(&l, KD_LOG_INFO, "agent_configuration_reloaded");
    kd_log_str(&l, "dir", cfg->agent.configuration_dir);
    kd_log_uint(&l, "files", kd_agentcfg_count(fresh));
    kd_log_end(&l);
}

static void usage(FILE *f)
{
    fprintf(
        f,
        "usage: kasd [--config FILE] [--dev [--state-dir DIR]]\n"
        "       kasd --check-config FILE\n"
        "       kasd gen-secret [--force] FILE\n"
        "       kasd --version | --help\n"
        "\n"
        "  -c, --config FILE        YAML configuration (docs/configuration.md); without it kasd runs\n"
        "                           on built-in defaults: listeners on 127.0.0.1, embedded Redis\n"
        "      --check-config FILE  validate FILE and exit (0: valid, 2: invalid)\n"
        "      --dev                development set-up: create (or reuse) agent tokens and JWT secrets in\n"
        "                           the state directory and use them where the config names none\n"
        "      --state-dir DIR      state directory for --dev (default: ./.kasd-dev)\n"
        "  gen-secret FILE          write a new secret (32 random bytes, base64) to FILE, mode 0600,\n"
        "                           for authentication_secret_file; an existing FILE is kept unless\n"
        "                           --force is given\n"
        "  -V, --version            print the version\n"
        "  -h, --help               this text\n"
        "\n"
        "Without redis.server.address in the config, kasd starts its own redis-server on a free\n"
        "loopback port and stops it on exit. SIGTERM/SIGINT stop gracefully (limits.shutdown_grace);\n"
        "SIGHUP reloads the agent token file, agent configurations and the Kubernetes API access tokens.\n"
        "Under systemd (NOTIFY_SOCKET) kasd reports READY=1 once it serves and STOPPING=1 when it\n"
        "starts to drain.\n");
}

/* Redis options from the configuration, made on the main thread before shards start: host names
 * are resolved here, once (a shard never blocks on DNS; see shards/redis.h), and the error names
 * the key. The TLS context (borrowed) was built by start_files_load(). */
struct redis_setup {
    struct kd_redis_opts o;
    char address[300];
    char server_name[260];
    char sentinel_buf[16][300];
    const char *sentinels[16];
};

static int redis_setup(struct redis_setup *rs, const struct kd_config *cfg, struct kd_tls_ctx *tls, char *err,
                       size_t errlen)
{
    char why[400];
    memset(rs, 0, sizeof(*rs));
    struct kd_redis_opts *o = &rs->o;
    o->username = cfg->redis.username;
    o->password = cfg->redis.password;
    o->database = cfg->redis.database;
    o->dial_timeout_ms = cfg->redis.dial_timeout_ms;
    o->read_timeout_ms = cfg->redis.read_timeout_ms;
    o->write_timeout_ms = cfg->redis.write_timeout_ms;
    if (cfg->redis.sentinel.master_name != NULL) {
        const char *p = cfg->redis.sentinel.addresses;
        unsigned n = 0;
        while (p != NULL && *p != '\0' && n < 16) {
            const char *nl = strchr(p, '\n');
            size_t len = nl ? (size_t)(nl - p) : strlen(p);
            char one[300];
            snprintf(one, sizeof(one), "%.*s", (int)len, p);
            if (kd_redis_resolve(one, rs->sentinel_buf[n], sizeof(rs->sentinel_buf[n]), why, sizeof(why)) <
                0) {
                snprintf(err, errlen, "redis.sentinel.addresses: %s", why);
                return -EINVAL;
            }
            rs->sentinels[n] = rs->sentinel_buf[n];
            n++;
            p = nl ? nl + 1 : NULL;
        }
        o->sentinel_master = cfg->redis.sentinel.master_name;
        o->sentinel_addrs = rs->sentinels;
        o->n_sentinel_addrs = n;
        o->sentinel_password = cfg->redis.sentinel.password;
    } else {
        if (kd_redis_resolve(cfg->redis.address, rs->address, sizeof(rs->address), why, sizeof(why)) < 0) {
            snprintf(err, errlen, "redis.server.address: %s", why);
            return -EINVAL;
        }
        o->address = rs->address;
    }
    if (cfg->redis.tls.enabled == 1) {
        o->tls = tls;
        if (cfg->redis.tls.server_name != NULL) {
            o->server_name = cfg->redis.tls.server_name;
        } else if (cfg->redis.address != NULL && cfg->redis.sentinel.master_name == NULL) {
            /* the name as configured (before resolution) is what the certificate names */
            const char *a = cfg->redis.address;
            const char *colon = strrchr(a, ':');
            size_t hl = colon ? (size_t)(colon - a) : strlen(a);
            if (hl >= 2 && a[0] == '[')
                snprintf(rs->server_name, sizeof(rs->server_name), "%.*s", (int)(hl - 2), a + 1);
            else
                snprintf(rs->server_name, sizeof(rs->server_name), "%.*s", (int)hl, a);
            o->server_name = rs->server_name;
        }
    }
    return 0;
}

struct listener_spec {
    const char *name;
    struct kd_listen_cfg *cfg;
    bool mtls;
    struct kd_grpc_server_cfg grpc;
};

enum { NLISTENERS = 3 }; /* agent, api, private_api, in this order */

/* Everything start-up reads from the files the configuration names, other than the configuration
 * itself and the Redis password files (kd_config_load_file reads those). --check-config loads this
 * too, through the same function, so "valid" means start-up will not fail on a file and both print
 * the same message. Owned here; main() hands the tokens over to the kas handle. */
struct start_files {
    struct kd_tokens *tokens; /* agent.token_file; NULL when unset */
    uint8_t api_secret[sizeof(((struct kd_kas *)0)->api_secret)];
    size_t api_secret_len; /* 0 when unset */
    /* Checked at start as kas does, although no private API method verifies tokens yet. */
    uint8_t private_api_secret[sizeof(((struct kd_kas *)0)->api_secret)];
    size_t private_api_secret_len;
    struct kd_tls_ctx *listener_tls[NLISTENERS]; /* NULL: the listener speaks h2c */
    struct kd_tls_ctx *redis_tls;                /* NULL: plain TCP to Redis */
    struct kd_tls_ctx *peer_tls;                 /* the fleet's private listeners over TLS; NULL: h2c */
    struct kd_agentcfg_set *agentcfg;            /* agent.configuration_dir; NULL when unset */
    uint64_t agentcfg_fp;                        /* its fingerprint when loaded (change poll) */
    struct kd_access *access;                    /* kubernetes_api.access_token_file; NULL when unset */
    bool gitlab_tokens;                          /* agent.token_source: gitlab */
    bool gitlab_on;                              /* gitlab.address: the control thread's client */
    uint8_t gitlab_secret[128];                  /* gitlab.authentication_secret_file */
    struct kd_gitlab_cfg gitlab;                 /* GitLab's address, resolved */
    struct kd_httpd_tls *gitlab_tls;             /* https:// to GitLab */
};

static void start_files_free(struct start_files *f)
{
    kd_tokens_free(f->tokens);
    kd_agentcfg_free(f->agentcfg);
    kd_access_free(f->access);
    kd_httpd_client_tls_free(f->gitlab_tls);
    for (int i = 0; i < NLISTENERS; i++)
        if (f->listener_tls[i] != NULL)
            kd_tls_ctx_destroy(f->listener_tls[i]);
    if (f->redis_tls != NULL)
        kd_tls_ctx_destroy(f->redis_tls);
    if (f->peer_tls != NULL)
        kd_tls_ctx_destroy(f->peer_tls);
    explicit_bzero(f, sizeof(*f));
}

/* TLS for a listener that has certificate_file and key_file; the error names the listener. */
static int listener_tls(const char *name, const struct kd_listen_cfg *cfg, struct kd_tls_ctx **out, char *err,
                        size_t errlen)
{
    char why[400];
    if (cfg->certificate_file == NULL)
        return 0;
    struct kd_tls_ctx_opts o = {
        .server = true,
        .cert_file = cfg->certificate_file,
        .key_file = cfg->key_file,
        .ca_file = cfg->client_ca_file,
        .require_client_cert = cfg->client_ca_file != NULL,
        .alpn = "h2",
        .min_version = 12,
    };
    int rc = kd_tls_ctx_create(&o, out, why, sizeof(why));
    if (rc < 0)
        snprintf(err, errlen, "%s.listen TLS: %s", name, why);
    return rc;
}

/* The front door's credential check against the static access-token file (control thread). */
static int access_authorize(void *ud, const char *token, size_t len, int64_t agent_id, struct kd_hm_imp *imp)
{
    struct access_slot *slot = ud;
    struct kd_access *fresh = atomic_exchange_explicit(&slot->pending, NULL, memory_order_acq_rel);
    if (fresh != NULL) {
        kd_access_free(slot->cur);
        slot->cur = fresh;
    }
    struct kd_access_grant g;
    int rc = kd_access_check(slot->cur, token, len, agent_id, &g);
    if (rc == 0)
        *imp = (struct kd_hm_imp){
            .username = g.username, .groups = g.groups, .ngroups = g.ngroups, .uid = g.uid};
    return rc;
}

static int secret_load(const char *key, const char *path, uint8_t *out, size_t cap, size_t *len, char *err,
                       size_t errlen)
{
    char why[400];
    *len = 0;
    if (path == NULL)
        return 0;
    int rc = kd_jwt_secret_load(path, out, cap, len, why, sizeof(why));
    if (rc < 0)
        snprintf(err, errlen, "%s: %s", key, why);
    return rc;
}

/* Load every file of *f (zeroed by the caller). On error returns a negative errno, writes one line
 * naming the key into err and frees what was loaded. */
/* agent.token_source: gitlab: GitLab's address resolved now (the control thread does no DNS) and
 * its secret read, each error naming its key. */
static int gitlab_load(struct start_files *f, const struct kd_config *cfg, bool tokens, char *err,
                       size_t errlen)
{
    if (cfg->gitlab.address == NULL || cfg->gitlab.authentication_secret_file == NULL) {
        snprintf(err, errlen, "%s needs %s", tokens ? "agent.token_source: gitlab" : "gitlab.address",
                 cfg->gitlab.address == NULL ? "gitlab.address" : "gitlab.authentication_secret_file");
        return -EINVAL;
    }
    if (tokens && cfg->agent.token_file != NULL) {
        snprintf(err, errlen,
                 "agent.token_file: not used with agent.token_source: gitlab (remove one of them)");
        return -EINVAL;
    }
    size_t slen = 0;
    int rc = secret_load("gitlab.authentication_secret_file", cfg->gitlab.authentication_secret_file,
                         f->gitlab_secret, sizeof(f->gitlab_secret), &slen, err, errlen);
    if (rc < 0)
        return rc;
    struct kd_gitlab_cfg *g = &f->gitlab;
    bool https = strncmp(cfg->gitlab.address, "https://", 8) == 0;
    const char *hp = cfg->gitlab.address + (https ? 8 : 7); /* the scheme was checked by the config */
    const char *slash = strchr(hp, '/');
    size_t hl = slash ? (size_t)(slash - hp) : strlen(hp);
    if (hl >= sizeof(g->host) || (slash && strlen(slash) >= sizeof(g->prefix))) {
        snprintf(err, errlen, "gitlab.address: too long");
        return -EINVAL;
    }
    memcpy(g->host, hp, hl);
    g->host[hl] = '\0';
    snprintf(g->prefix, sizeof(g->prefix), "%s", slash ? slash : "");
    size_t pl = strlen(g->prefix);
    while (pl > 0 && g->prefix[pl - 1] == '/')
        g->prefix[--pl] = '\0';
    char host[300], port[8];
    snprintf(port, sizeof(port), "%s", https ? "443" : "80");
    snprintf(host, sizeof(host), "%s", g->host);
    char *colon = host[0] == '[' ? strstr(host, "]:") : strrchr(host, ':');
    if (colon != NULL) {
        if (host[0] == '[')
            colon++;
        snprintf(port, sizeof(port), "%s", colon + 1);
        *colon = '\0';
    }
    if (host[0] == '[') {
        memmove(host, host + 1, strlen(host));
        char *rb = strchr(host, ']');
        if (rb)
            *rb = '\0';
    }
    snprintf(g->server_name, sizeof(g->server_name), "%s", host);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res = NULL;
    int gr = getaddrinfo(host, port, &hints, &res);
    if (gr != 0 || res == NULL) {
        snprintf(err, errlen, "gitlab.address: %s: %s", cfg->gitlab.address, gai_strerror(gr));
        return -EINVAL;
    }
    g->naddrs = 0;
    for (struct addrinfo *a = res; a != NULL && g->naddrs < 4; a = a->ai_next) {
        memcpy(&g->addrs[g->naddrs], a->ai_addr, a->ai_addrlen);
        g->addrlens[g->naddrs++] = a->ai_addrlen;
    }
    freeaddrinfo(res);
    if (https) {
        char why[300];
        f->gitlab_tls = kd_httpd_client_tls_new(cfg->gitlab.ca_file, g->server_name, why, sizeof(why));
        if (f->gitlab_tls == NULL) {
            snprintf(err, errlen, "gitlab.ca_file: %s", why);
            return -EINVAL;
        }
        g->tls = f->gitlab_tls;
    }
    g->secret = f->gitlab_secret;
    g->secret_len = slen;
    g->timeout_ms = cfg->gitlab.timeout_ms;
    g->cache_ttl_ms = cfg->gitlab.agent_info_cache_ttl_ms;
    g->error_ttl_ms = cfg->gitlab.agent_info_cache_error_ttl_ms;
    f->gitlab_tokens = tokens;
    f->gitlab_on = true;
    return 0;
}

static int start_files_load(struct start_files *f, const struct kd_config *cfg, char *err, size_t errlen)
{
    static const char *const names[NLISTENERS] = {"agent", "api", "private_api"};
    const struct kd_listen_cfg *listen[NLISTENERS] = {&cfg->agent.listen, &cfg->api.listen,
                                                      &cfg->private_api.listen};
    char why[400];
    int rc = 0;
    const char *src = cfg->agent.token_source;
    if (src != NULL && strcmp(src, "file") != 0 && strcmp(src, "gitlab") != 0) {
        snprintf(err, errlen, "agent.token_source: expected file or gitlab, got \"%.64s\"", src);
        rc = -EINVAL;
        goto fail;
    }
    bool gl_tokens = src != NULL && strcmp(src, "gitlab") == 0;
    if ((gl_tokens || cfg->gitlab.address != NULL) && (rc = gitlab_load(f, cfg, gl_tokens, err, errlen)) < 0)
        goto fail;
    if (cfg->agent.token_file != NULL &&
        (rc = kd_tokens_load_file(cfg->agent.token_file, &f->tokens, why, sizeof(why))) < 0) {
        snprintf(err, errlen, "agent.token_file: %s", why);
        goto fail;
    }
    if (cfg->kubernetes_api.enabled && cfg->kubernetes_api.access_token_file != NULL &&
        (rc = kd_access_load_file(cfg->kubernetes_api.access_token_file, &f->access, why, sizeof(why))) < 0) {
        snprintf(err, errlen, "kubernetes_api.access_token_file: %s", why);
        goto fail;
    }
    if (cfg->kubernetes_api.enabled && cfg->kubernetes_api.listen.certificate_file != NULL &&
        (rc = kd_httpd_tls_check(cfg->kubernetes_api.listen.certificate_file,
                                 cfg->kubernetes_api.listen.key_file, why, sizeof(why))) < 0) {
        snprintf(err, errlen, "kubernetes_api.listen %s", why);
        goto fail;
    }
    if (cfg->agent.configuration_dir != NULL) {
        /* The directory must be readable at start (a typo should not silently serve empty
         * configurations); later failures keep what was loaded. */
        f->agentcfg_fp = kd_agentcfg_fingerprint(cfg->agent.configuration_dir);
        if ((rc = kd_agentcfg_load(cfg->agent.configuration_dir, NULL, &f->agentcfg)) < 0) {
            snprintf(err, errlen, "agent.configuration_dir: %s: %s", cfg->agent.configuration_dir,
                     strerror(-rc));
            goto fail;
        }
    }
    if ((rc = secret_load("api.listen.authentication_secret_file", cfg->api.listen.authentication_secret_file,
                          f->api_secret, sizeof(f->api_secret), &f->api_secret_len, err, errlen)) < 0 ||
        (rc = secret_load("private_api.listen.authentication_secret_file",
                          cfg->private_api.listen.authentication_secret_file, f->private_api_secret,
                          sizeof(f->private_api_secret), &f->private_api_secret_len, err, errlen)) < 0)
        goto fail;
    for (int i = 0; i < NLISTENERS; i++)
        if ((rc = listener_tls(names[i], listen[i], &f->listener_tls[i], err, errlen)) < 0)
            goto fail;
    if (cfg->redis.tls.enabled == 1) {
        struct kd_tls_ctx_opts to = {
            .server = false,
            .ca_file = cfg->redis.tls.ca_file,
            .cert_file = cfg->redis.tls.certificate_file,
            .key_file = cfg->redis.tls.key_file,
            .min_version = 12,
        };
        if ((rc = kd_tls_ctx_create(&to, &f->redis_tls, why, sizeof(why))) < 0) {
            snprintf(err, errlen, "redis.tls: %s", why);
            goto fail;
        }
    }
    /* A fleet's private listeners all speak TLS or all h2c: this one's mode is the peers'. */
    if (cfg->private_api.listen.certificate_file != NULL) {
        struct kd_tls_ctx_opts to = {
            .server = false,
            .ca_file = cfg->private_api.client.ca_file,
            .cert_file = cfg->private_api.client.certificate_file,
            .key_file = cfg->private_api.client.key_file,
            .alpn = "h2",
            .min_version = 12,
        };
        if ((rc = kd_tls_ctx_create(&to, &f->peer_tls, why, sizeof(why))) < 0) {
            snprintf(err, errlen, "private_api.client: %s", why);
            goto fail;
        }
    }
    return 0;
fail:
    start_files_free(f);
    return rc;
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"config", required_argument, NULL, 'c'},
        {"check-config", required_argument, NULL, 'C'},
        {"dev", no_argument, NULL, 'd'},
        {"state-dir", required_argument, NULL, 's'},
        {"version", no_argument, NULL, 'V'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *config_path = NULL, *check_path = NULL, *state_dir = ".kasd-dev";
    bool dev = false;
    int opt;
    if (argc >= 2 && strcmp(argv[1], "gen-secret") == 0)
        return gen_secret(argc, argv);
    notify_init();
    while ((opt = getopt_long(argc, argv, "c:Vh", longopts, NULL)) != -1) {
        switch (opt) {
        case 'c':
            config_path = optarg;
            break;
        case 'C':
            check_path = optarg;
            break;
        case 'd':
            dev = true;
            break;
        case 's':
            state_dir = optarg;
            break;
        case 'V':
            printf("kasd %s (tls: %s)\n", KD_VERSION, kd_tls_backend());
            return 0;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "kasd: unexpected argument \"%s\"\n", argv[optind]);
        usage(stderr);
        return 2;
    }

    struct kd_config cfg;
    char err[512];
    kd_config_defaults(&cfg);
    if (check_path != NULL) {
        /* The same loads as a start, in the same order, with the same messages. */
        struct start_files files = {0};
        if (kd_config_load_file(&cfg, check_path, err, sizeof(err)) < 0 ||
            start_files_load(&files, &cfg, err, sizeof(err)) < 0) {
            fprintf(stderr, "kasd: %s\n", err);
            kd_config_free(&cfg);
            return 2;
        }
        start_files_free(&files);
        printf("%s: configuration is valid\n", check_path);
        kd_config_free(&cfg);
        return 0;
    }
    if (config_path != NULL && kd_config_load_file(&cfg, config_path, err, sizeof(err)) < 0) {
        fprintf(stderr, "kasd: %s\n", err);
        kd_config_free(&cfg);
        return 2;
    }

    /* Signals are taken synchronously by this thread; every thread created later inherits the mask. */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    if (dev && kd_dev_prepare(&cfg, state_dir, err, sizeof(err)) < 0) {
        fprintf(stderr, "kasd: %s\n", err);
        kd_config_free(&cfg);
        return 1;
    }
    fflush(stdout);

    /* Before anything starts (the embedded Redis, shards): a file that cannot be used is a
     * configuration error, reported like one (plain text, exit 2), as --check-config reports it. */
    static struct start_files files; /* static: it holds the secrets and must outlive the shards */
    if (start_files_load(&files, &cfg, err, sizeof(err)) < 0) {
        fprintf(stderr, "kasd: %s\n", err);
        kd_config_free(&cfg);
        return 2;
    }
    /* The access-token table moves to its slot (the control thread's from now on). */
    static struct access_slot access;
    access.cur = files.access;
    files.access = NULL;

    kd_log_configure(cfg.log.level, 2);
    if (kd_log_start() < 0)
        fprintf(stderr, "kasd: logger thread unavailable, logging synchronously\n");

    int exit_code = 1;
    struct listener_spec specs[NLISTENERS] = {
        {.name = "agent", .cfg = &cfg.agent.listen},
        {.name = "api", .cfg = &cfg.api.listen},
        {.name = "private_api", .cfg = &cfg.private_api.listen},
    };
    const struct kd_grpc_method agent_methods[] = {kd_grpc_health_method, kd_kas_connect_method,
                                                   kd_kas_register_method, kd_agentconfig_method};
    const struct kd_grpc_method api_methods[] = {kd_grpc_health_method,
                                                 kd_tracker_get_connected_agents_method};
    const struct kd_grpc_method private_methods[] = {kd_grpc_health_method, kd_kas_gateway_method};
    struct kd_kas kas = {.routing_timeout_ms = cfg.limits.routing_timeout_ms,
                         .gitlab_tokens = files.gitlab_tokens,
                         .max_message = cfg.limits.grpc_max_message_size,
                         .pods_per_connection = cfg.limits.pods_per_connection,
                         .pods_per_agent = cfg.limits.pods_per_agent,
                         .agent_meta_max = cfg.limits.agent_meta_max_size,
                         .gitlab_external_url = cfg.gitlab.external_url ? cfg.gitlab.external_url : ""};
    static struct kd_tracker_cfg tracker_cfg; /* outlives the shards */
    struct kd_tokens_handle tokens_handle;
    if (files.tokens != NULL) {
        kd_tokens_handle_init(&tokens_handle, files.tokens);
        kas.tokens = &tokens_handle; /* frees it at exit and on SIGHUP swaps */
        files.tokens = NULL;
    } else {
        kd_log_msg(KD_LOG_WARN, "no_agent_tokens", "no agent.token_file: every agent is refused");
    }
    memcpy(kas.api_secret, files.api_secret, sizeof(kas.api_secret));
    kas.api_secret_len = files.api_secret_len;
    memcpy(kas.private_secret, files.private_api_secret, sizeof(kas.private_secret));
    kas.peer_tls = files.peer_tls;
    kas.peer_server_name = cfg.private_api.client.server_name;
    kas.private_secret_len = files.private_api_secret_len;
    if (kas.api_secret_len == 0)
        kd_log_msg(KD_LOG_WARN, "no_api_secret",
                   "no api.listen.authentication_secret_file: every api call is "
                   "refused");
    struct kd_agentcfg_handle agentcfg_handle;
    uint64_t agentcfg_fp = files.agentcfg_fp;
    if (files.agentcfg != NULL) {
        kd_agentcfg_handle_init(&agentcfg_handle, files.agentcfg);
        kas.agentcfg = &agentcfg_handle; /* freed at exit; SIGHUP and the poll swap it */
        files.agentcfg = NULL;
    }
    struct kd_embedded_redis redis = {.pid = -1};
    static struct redis_setup rsetup; /* static: ~6 KiB, and it must outlive the shards */
    struct kd_server *srv = NULL;
    struct kd_control *ctl = NULL;
    if (!cfg.redis.configured) {
        if (kd_redis_embedded_start(&redis, &cfg, NULL, err, sizeof(err)) < 0) {
            kd_log_msg(KD_LOG_ERROR, "start_failed", "%s", err);
            goto out;
        }
        struct kd_logline l;
        kd_log_begin(&l, KD_LOG_INFO, "redis_embedded");
        kd_log_str(&l, "address", cfg.redis.address);
        kd_log_int(&l, "pid", redis.pid);
        kd_log_str(&l, "log", redis.logfile);
        kd_log_end(&l);
    }

    if (redis_setup(&rsetup, &cfg, files.redis_tls, err, sizeof(err)) < 0) {
        kd_log_msg(KD_LOG_ERROR, "start_failed", "%s", err);
        goto out;
    }

    struct kd_server_opts o = {
        .redis = &rsetup.o,
        .shards = cfg.shards,
        .pin = true,
        .connections_per_shard = cfg.limits.connections_per_shard,
        .recv_buffers = cfg.limits.recv_buffers,
        .recv_buffer_size = cfg.limits.recv_buffer_size,
        .ring_size = cfg.limits.router_ring_size,
        .shutdown_grace_ms = cfg.limits.shutdown_grace_ms,
        .user = &kas,
        .on_shard_start = kd_kas_shard_start,
        .on_shard_stop = kd_kas_shard_stop,
        .on_message = kd_kas_on_message,
        .on_turn = kd_kas_on_turn,
    };
    /* Every listener's HTTP/2 abuse limits (borrowed by the listeners: lives until the end of main). */
    const struct kd_h2_limits h2_limits = {
        .reset_burst = cfg.limits.h2_rapid_reset_burst,
        .reset_rate = cfg.limits.h2_rapid_reset_rate,
        .settings_burst = cfg.limits.h2_settings_burst,
        .settings_rate = cfg.limits.h2_settings_rate,
        .ping_strikes = cfg.limits.h2_ping_strikes,
    };
    for (size_t i = 0; i < sizeof(specs) / sizeof(specs[0]); i++) {
        struct listener_spec *sp = &specs[i];
        sp->grpc.name = sp->name;
        sp->grpc.h2_limits = &h2_limits;
        if (i == 0) {
            sp->grpc.methods = agent_methods;
            sp->grpc.nmethods = sizeof(agent_methods) / sizeof(agent_methods[0]);
            sp->grpc.on_conn_close = kd_kas_agent_conn_close;
        } else if (i == 1) {
            sp->grpc.methods = api_methods;
            sp->grpc.nmethods = sizeof(api_methods) / sizeof(api_methods[0]);
            sp->grpc.fallback = &kd_kas_route_method;
        } else {
            sp->grpc.methods = private_methods;
            sp->grpc.nmethods = sizeof(private_methods) / sizeof(private_methods[0]);
        }
        sp->grpc.tls = files.listener_tls[i];
        sp->grpc.max_message = cfg.limits.grpc_max_message_size;
        /* A routed call's message of up to the limit travels to and from the agent wrapped in a
         * tunnel Message: the agent listener takes the limit plus that wrapping, and the tunnel
         * code holds the unwrapped data to the limit itself (shards/tunnels.c). */
        if (i == 0)
            sp->grpc.max_message += KD_TUN_WRAP_OVERHEAD;
        sp->grpc.max_message_key = "limits.grpc_max_message_size";
        sp->grpc.response_compression = (uint8_t)cfg.grpc.response_compression;
        sp->grpc.max_concurrent_streams = cfg.limits.grpc_max_concurrent_streams;
        sp->grpc.max_header_list = cfg.limits.grpc_max_header_list_size;
        sp->grpc.max_connection_age_ms = sp->cfg->max_connection_age_ms;
        sp->grpc.max_connection_age_grace_ms = sp->cfg->max_connection_age_grace_ms;
        sp->grpc.keepalive_ms = sp->cfg->keepalive_time_ms;
        sp->grpc.keepalive_timeout_ms = sp->cfg->keepalive_timeout_ms;
        sp->grpc.ping_min_interval_ms = sp->cfg->keepalive_min_time_ms;
        sp->grpc.websocket = sp->cfg->websocket != 0; /* set for the agent listener only */
        /* Agent connections: thousands, idle for hours, a few calls each (core/h2.h). */
        sp->grpc.lean = i == 0;
        kd_grpc_server_cfg_defaults(&sp->grpc);
        struct kd_server_listener *l = &o.listeners[o.nlisteners++];
        l->name = sp->name;
        l->addr = sp->cfg->addr;
        l->addrlen = sp->cfg->addrlen;
        l->ops = &kd_grpc_server_ops;
        l->cfg = &sp->grpc;
    }
    if (kd_server_create(&o, &srv, err, sizeof(err)) < 0) {
        kd_log_msg(KD_LOG_ERROR, "start_failed", "%s", err);
        goto out;
    }
    kas.nshards = kd_server_nshards(srv);
    /* Fleet tracking in Redis (docs/redis.md): this instance's id and record. */
    static char private_addr[80];
    kd_server_address(srv, 2, private_addr, sizeof(private_addr));
    tracker_cfg.prefix = cfg.redis.key_prefix;
    /* Peers dial the advertised address (NAT, containers) or else the bound one. */
    tracker_cfg.private_addr =
        cfg.private_api.advertise_address ? cfg.private_api.advertise_address : private_addr;
    tracker_cfg.version = KD_VERSION;
    tracker_cfg.nshards = kas.nshards;
    tracker_cfg.heartbeat_ms = cfg.redis.heartbeat_ms;
    tracker_cfg.ttl_ms = cfg.redis.instance_ttl_ms;
    tracker_cfg.sweep_ms = cfg.redis.sweep_ms;
    static atomic_uint tracker_unsynced; /* outlives the shards, like tracker_cfg */
    atomic_init(&tracker_unsynced, kas.nshards);
    tracker_cfg.unsynced = &tracker_unsynced;
    /* What GitLab can receive: its clients keep gRPC's 4 MiB receive default, whatever kasd's own
     * message limit is; and never more than kasd lets itself receive. */
    tracker_cfg.max_response = cfg.limits.connected_agents_max_size < cfg.limits.grpc_max_message_size
                                   ? cfg.limits.connected_agents_max_size
                                   : cfg.limits.grpc_max_message_size;
    kd_tracker_cfg_init(&tracker_cfg);
    kas.tracker = &tracker_cfg;
    /* The fleet (docs/architecture.md): presence events and kas-to-kas forwarding. Peers
     * authenticate to each other with the private API secret: without it there is no fleet. */
    static struct kd_presence_cfg presence_cfg; /* outlives the shards */
    presence_cfg.tracker = &tracker_cfg;
    presence_cfg.redis = &rsetup.o;
    presence_cfg.route_cache_size = cfg.fleet.route_cache_size;
    presence_cfg.recheck_ms = cfg.fleet.recheck_ms;
    presence_cfg.poll = cfg.fleet.discovery != NULL && strcmp(cfg.fleet.discovery, "poll") == 0;
    presence_cfg.peer_idle_ms = cfg.fleet.peer_idle_ms;
    presence_cfg.second_delay_ms = cfg.fleet.second_delay_ms;
    presence_cfg.peer_connect_ms = cfg.fleet.peer_connect_ms;
    /* Peers' private listeners run with this one's settings: ping them as they allow. */
    presence_cfg.peer_keepalive_ms = cfg.private_api.listen.keepalive_time_ms;
    presence_cfg.peer_keepalive_timeout_ms = cfg.private_api.listen.keepalive_timeout_ms;
    /* Peers accept limits.grpc_max_concurrent_streams per connection (they share this configuration):
     * past 90 % of it the next forwarded call opens another connection instead of queueing. */
    presence_cfg.peer_max_calls =
        cfg.limits.grpc_max_concurrent_streams - cfg.limits.grpc_max_concurrent_streams / 10;
    if (kas.private_secret_len > 0)
        kas.presence = &presence_cfg;
    else
        kd_log_msg(KD_LOG_WARN, "no_private_api_secret",
                   "no private_api.listen.authentication_secret_file: no fleet routing (calls reach only "
                   "agents connected to this instance)");
    /* Redis sees every shard's connection as kasd-<instance>-shard<N> (CLIENT LIST). */
    static char client_name[40];
    snprintf(client_name, sizeof(client_name), "kasd-%s", tracker_cfg.instance_id);
    rsetup.o.client_name = client_name;
    if (kd_epoch_create(kas.nshards, &kas.epoch) < 0 || kd_server_start(srv, err, sizeof(err)) < 0) {
        kd_log_msg(KD_LOG_ERROR, "start_failed", "%s", err);
        goto out;
    }
    for (unsigned i = 0; i < o.nlisteners; i++) {
        char addr[80];
        struct kd_logline l;
        kd_server_address(srv, i, addr, sizeof(addr));
        kd_log_begin(&l, KD_LOG_INFO, "listening");
        kd_log_str(&l, "listener", o.listeners[i].name);
        kd_log_str(&l, "address", addr);
        kd_log_str(&l, "protocol", files.listener_tls[i] ? "grpc+tls" : "grpc+h2c");
        kd_log_end(&l);
    }
    /* The control thread (observability: /metrics, /liveness, /readiness) is router participant n;
     * it asks the shards for their state, so it starts once they run. */
    const char *origins[64];
    size_t norigins = 0;
    for (char *org = cfg.kubernetes_api.allowed_origins; org != NULL && *org && norigins < 64;) {
        origins[norigins++] = org;
        char *nl = strchr(org, '\n');
        if (nl == NULL)
            break;
        *nl = '\0';
        org = nl + 1;
    }
    struct kd_kubeapi_cfg kcfg = {
        .prefix = cfg.kubernetes_api.url_path_prefix,
        /* the access-token file, else GitLab (gitlab.address), else nobody */
        .authorize = cfg.kubernetes_api.access_token_file != NULL ? access_authorize : NULL,
        .authorize_ud = &access,
        .origins = origins,
        .norigins = norigins,
        .routing_timeout_ms = kas.routing_timeout_ms,
        .max_header_message = cfg.limits.grpc_max_message_size,
        .via = "gRPC/1.0 kasd/" KD_VERSION,
    };
    if (kd_control_create(srv, &cfg.observability.listen.addr, cfg.observability.listen.addrlen, &ctl, err,
                          sizeof(err)) < 0 ||
        (files.gitlab_on && (kd_control_set_gitlab(ctl, &files.gitlab), false)) ||
        (cfg.kubernetes_api.enabled &&
         kd_control_add_kubeapi(ctl, &cfg.kubernetes_api.listen.addr, cfg.kubernetes_api.listen.addrlen,
                                &kcfg, cfg.kubernetes_api.max_request_body_size,
                                cfg.kubernetes_api.listen.certificate_file,
                                cfg.kubernetes_api.listen.key_file, err, sizeof(err)) < 0) ||
        kd_control_start(ctl, err, sizeof(err)) < 0) {
        kd_log_msg(KD_LOG_ERROR, "start_failed", "%s", err);
        goto out;
    }
    {
        char addr[80];
        struct kd_logline l;
        kd_control_address(ctl, addr, sizeof(addr));
        kd_log_begin(&l, KD_LOG_INFO, "listening");
        kd_log_str(&l, "listener", "observability");
        kd_log_str(&l, "address", addr);
        kd_log_str(&l, "protocol", "http/1.1+h2c");
        kd_log_end(&l);
        if (cfg.kubernetes_api.enabled) {
            kd_control_kubeapi_address(ctl, addr, sizeof(addr));
            kd_log_begin(&l, KD_LOG_INFO, "listening");
            kd_log_str(&l, "listener", "kubernetes_api");
            kd_log_str(&l, "address", addr);
            kd_log_str(&l, "protocol",
                       cfg.kubernetes_api.listen.certificate_file ? "https (h2, http/1.1)" : "http/1.1+h2c");
            kd_log_end(&l);
        }
    }
    {
        struct kd_logline l;
        kd_log_begin(&l, KD_LOG_INFO, "started");
        kd_log_str(&l, "version", KD_VERSION);
        kd_log_str(&l, "tls_backend", kd_tls_backend());
        kd_log_uint(&l, "shards", kd_server_nshards(srv));
        kd_log_int(&l, "pid", getpid());
        kd_log_str(&l, "config", cfg.source);
        kd_log_str(&l, "instance_id", tracker_cfg.instance_id);
        kd_log_end(&l);
    }
    notify_send("READY=1");

    /* With agent.configuration_dir, this thread also looks at the directory once a second
     * (readdir + fstatat of the *.yaml files, compared as one fingerprint) rather than using
     * inotify: it sees edits made through symlink swaps (Kubernetes ConfigMap volumes) and
     * directories replaced or mounted later, needs no watch limits, cannot overflow, and keeps
     * file I/O off the shards. The cost is a second of latency and a few syscalls per file. */
    for (;;) {
        int sig;
        if (kas.agentcfg != NULL) {
            struct timespec tick = {.tv_sec = 1};
            sig = sigtimedwait(&sigs, NULL, &tick);
            if (sig < 0) {
                bool tick_passed = errno == EAGAIN;
                uint64_t fp =
                    tick_passed ? kd_agentcfg_fingerprint(cfg.agent.configuration_dir) : agentcfg_fp;
                if (fp != agentcfg_fp) {
                    agentcfg_fp = fp;
                    reload_agentcfg(&cfg, &kas, srv);
                }
                continue;
            }
        } else if (sigwait(&sigs, &sig) != 0) {
            continue;
        }
        if (sig == SIGHUP) {
            reload_tokens(&cfg, &kas, srv);
            reload_access(&cfg, &access);
            if (kas.agentcfg != NULL) {
                agentcfg_fp = kd_agentcfg_fingerprint(cfg.agent.configuration_dir);
                reload_agentcfg(&cfg, &kas, srv);
            }
            continue;
        }
        struct kd_logline l;
        kd_log_begin(&l, KD_LOG_INFO, "stopping");
        kd_log_str(&l, "signal", sig == SIGTERM ? "SIGTERM" : "SIGINT");
        kd_log_uint(&l, "grace_ms", cfg.limits.shutdown_grace_ms);
        kd_log_end(&l);
        notify_send("STOPPING=1");
        break;
    }
    kd_server_stop(srv); /* /readiness answers 503 from here on */
    kd_server_wait(srv);
    kd_control_stop(ctl);
    exit_code = 0;
out:
    kd_control_destroy(ctl);    /* before the server: it borrows the server and its router */
    kd_access_free(access.cur); /* the control thread has stopped */
    kd_access_free(atomic_exchange(&access.pending, NULL));
    kd_server_destroy(srv);
    if (kas.epoch != NULL)
        kd_epoch_destroy(kas.epoch);
    if (kas.tokens != NULL)
        kd_tokens_free(kd_tokens_handle_swap(kas.tokens, NULL));
    if (kas.agentcfg != NULL)
        kd_agentcfg_free(kd_agentcfg_handle_swap(kas.agentcfg, NULL));
    kd_redis_embedded_stop(&redis);
    start_files_free(
        &files); /* after the server: its listeners and Redis connections used the TLS contexts */
    if (exit_code == 0)
        kd_log_msg(KD_LOG_INFO, "stopped", "clean exit");
    kd_log_stop();
    kd_config_free(&cfg);
    return exit_code;
}
