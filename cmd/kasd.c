/* kasd.c — the kasd command: options, configuration, start, signals, stop. */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cmd/dev.h"
#include "core/config.h"
#include "core/log.h"
#include "core/jwt.h"
#include "core/tls.h"
#include "core/tokens.h"
#include "shards/kas.h"
#include "shards/conn.h"
#include "shards/control.h"
#include "shards/grpc.h"
#include "shards/redis.h"
#include "shards/tracker.h"
#include "shards/server.h"

static void wake_shard(void *ud, unsigned slot)
{
    kd_server_wake(ud, slot);
}

/* SIGHUP: load the token file again and swap it in; the old table is freed once every shard has
 * passed a quiescent point (no shard can still hold a pointer into it). */
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

static void usage(FILE *f)
{
    fprintf(
        f,
        "usage: kasd [--config FILE] [--dev [--state-dir DIR]]\n"
        "       kasd --check-config FILE\n"
        "       kasd --version | --help\n"
        "\n"
        "  -c, --config FILE        YAML configuration (docs/configuration.md); without it kasd runs\n"
        "                           on built-in defaults: listeners on 127.0.0.1, embedded Redis\n"
        "      --check-config FILE  validate FILE and exit (0: valid, 2: invalid)\n"
        "      --dev                development set-up: create (or reuse) agent tokens and JWT secrets in\n"
        "                           the state directory and use them where the config names none\n"
        "      --state-dir DIR      state directory for --dev (default: ./.kasd-dev)\n"
        "  -V, --version            print the version\n"
        "  -h, --help               this text\n"
        "\n"
        "Without redis.server.address in the config, kasd starts its own redis-server on a free\n"
        "loopback port and stops it on exit. SIGTERM/SIGINT stop gracefully (limits.shutdown_grace).\n");
}

/* Redis options from the configuration, made on the main thread before shards start: host names
 * are resolved here, once (a shard never blocks on DNS; see shards/redis.h), the TLS context is
 * built, and the error names the key. */
struct redis_setup {
    struct kd_redis_opts o;
    char address[300];
    char server_name[260];
    char sentinel_buf[16][300];
    const char *sentinels[16];
    struct kd_tls_ctx *tls;
};

static int redis_setup(struct redis_setup *rs, const struct kd_config *cfg, char *err, size_t errlen)
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
        struct kd_tls_ctx_opts to = {
            .server = false,
            .ca_file = cfg->redis.tls.ca_file,
            .cert_file = cfg->redis.tls.certificate_file,
            .key_file = cfg->redis.tls.key_file,
            .min_version = 12,
        };
        if (kd_tls_ctx_create(&to, &rs->tls, why, sizeof(why)) < 0) {
            snprintf(err, errlen, "redis.tls: %s", why);
            return -EINVAL;
        }
        o->tls = rs->tls;
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
    struct kd_tls_ctx *tls;
};

/* TLS for a listener that has certificate_file and key_file; the error names the listener. */
static int listener_tls(struct listener_spec *l, char *err, size_t errlen)
{
    char why[400];
    if (l->cfg->certificate_file == NULL)
        return 0;
    struct kd_tls_ctx_opts o = {
        .server = true,
        .cert_file = l->cfg->certificate_file,
        .key_file = l->cfg->key_file,
        .ca_file = l->cfg->client_ca_file,
        .require_client_cert = l->cfg->client_ca_file != NULL,
        .alpn = "h2",
        .min_version = 12,
    };
    int rc = kd_tls_ctx_create(&o, &l->tls, why, sizeof(why));
    if (rc < 0)
        snprintf(err, errlen, "%s.listen TLS: %s", l->name, why);
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
        int rc = kd_config_load_file(&cfg, check_path, err, sizeof(err));
        if (rc < 0) {
            fprintf(stderr, "kasd: %s\n", err);
            kd_config_free(&cfg);
            return 2;
        }
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

    kd_log_configure(cfg.log.level, 2);
    if (kd_log_start() < 0)
        fprintf(stderr, "kasd: logger thread unavailable, logging synchronously\n");

    int exit_code = 1;
    struct listener_spec specs[] = {
        {.name = "agent", .cfg = &cfg.agent.listen},
        {.name = "api", .cfg = &cfg.api.listen},
        {.name = "private_api", .cfg = &cfg.private_api.listen},
    };
    const struct kd_grpc_method agent_methods[] = {kd_grpc_health_method, kd_kas_connect_method,
                                                   kd_kas_register_method};
    const struct kd_grpc_method api_methods[] = {kd_grpc_health_method,
                                                 kd_tracker_get_connected_agents_method};
    const struct kd_grpc_method private_methods[] = {kd_grpc_health_method};
    struct kd_kas kas = {.routing_timeout_ms = cfg.limits.routing_timeout_ms};
    static struct kd_tracker_cfg tracker_cfg; /* outlives the shards */
    struct kd_tokens_handle tokens_handle;
    struct kd_tokens *tokens = NULL;
    if (cfg.agent.token_file != NULL) {
        if (kd_tokens_load_file(cfg.agent.token_file, &tokens, err, sizeof(err)) < 0) {
            kd_log_msg(KD_LOG_ERROR, "start_failed", "agent.token_file: %s", err);
            kd_log_stop();
            kd_config_free(&cfg);
            return 2;
        }
        kd_tokens_handle_init(&tokens_handle, tokens);
        kas.tokens = &tokens_handle;
    } else {
        kd_log_msg(KD_LOG_WARN, "no_agent_tokens", "no agent.token_file: every agent is refused");
    }
    if (cfg.api.listen.authentication_secret_file != NULL) {
        if (kd_jwt_secret_load(cfg.api.listen.authentication_secret_file, kas.api_secret,
                               sizeof(kas.api_secret), &kas.api_secret_len, err, sizeof(err)) < 0) {
            kd_log_msg(KD_LOG_ERROR, "start_failed", "api.listen.authentication_secret_file: %s", err);
            kd_tokens_free(tokens);
            kd_log_stop();
            kd_config_free(&cfg);
            return 2;
        }
    } else {
        kd_log_msg(KD_LOG_WARN, "no_api_secret",
                   "no api.listen.authentication_secret_file: every api call is "
                   "refused");
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

    if (redis_setup(&rsetup, &cfg, err, sizeof(err)) < 0) {
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
    for (size_t i = 0; i < sizeof(specs) / sizeof(specs[0]); i++) {
        struct listener_spec *sp = &specs[i];
        if (listener_tls(sp, err, sizeof(err)) < 0) {
            kd_log_msg(KD_LOG_ERROR, "start_failed", "%s", err);
            goto out;
        }
        sp->grpc.name = sp->name;
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
        sp->grpc.tls = sp->tls;
        sp->grpc.max_message = cfg.limits.grpc_max_message_size;
        sp->grpc.max_concurrent_streams = cfg.limits.grpc_max_concurrent_streams;
        sp->grpc.max_connection_age_ms = sp->cfg->max_connection_age_ms;
        sp->grpc.websocket = sp->cfg->websocket != 0; /* set for the agent listener only */
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
    tracker_cfg.private_addr = private_addr;
    tracker_cfg.version = KD_VERSION;
    tracker_cfg.nshards = kas.nshards;
    tracker_cfg.heartbeat_ms = cfg.redis.heartbeat_ms;
    tracker_cfg.ttl_ms = cfg.redis.instance_ttl_ms;
    tracker_cfg.sweep_ms = cfg.redis.sweep_ms;
    kd_tracker_cfg_init(&tracker_cfg);
    kas.tracker = &tracker_cfg;
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
        kd_log_str(&l, "protocol", specs[i].tls ? "grpc+tls" : "grpc+h2c");
        kd_log_end(&l);
    }
    /* The control thread (observability: /metrics, /liveness, /readiness) is router participant n;
     * it asks the shards for their state, so it starts once they run. */
    if (kd_control_create(srv, &cfg.observability.listen.addr, cfg.observability.listen.addrlen, &ctl, err,
                          sizeof(err)) < 0 ||
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

    for (;;) {
        int sig;
        if (sigwait(&sigs, &sig) != 0)
            continue;
        if (sig == SIGHUP) {
            reload_tokens(&cfg, &kas, srv);
            continue;
        }
        struct kd_logline l;
        kd_log_begin(&l, KD_LOG_INFO, "stopping");
        kd_log_str(&l, "signal", sig == SIGTERM ? "SIGTERM" : "SIGINT");
        kd_log_uint(&l, "grace_ms", cfg.limits.shutdown_grace_ms);
        kd_log_end(&l);
        break;
    }
    kd_server_stop(srv); /* /readiness answers 503 from here on */
    kd_server_wait(srv);
    kd_control_stop(ctl);
    exit_code = 0;
out:
    kd_control_destroy(ctl); /* before the server: it borrows the server and its router */
    kd_server_destroy(srv);
    if (kas.epoch != NULL)
        kd_epoch_destroy(kas.epoch);
    if (kas.tokens != NULL)
        kd_tokens_free(kd_tokens_handle_swap(kas.tokens, NULL));
    for (size_t i = 0; i < sizeof(specs) / sizeof(specs[0]); i++)
        if (specs[i].tls != NULL)
            kd_tls_ctx_destroy(specs[i].tls);
    kd_redis_embedded_stop(&redis);
    if (rsetup.tls != NULL)
        kd_tls_ctx_destroy(rsetup.tls);
    if (exit_code == 0)
        kd_log_msg(KD_LOG_INFO, "stopped", "clean exit");
    kd_log_stop();
    kd_config_free(&cfg);
    return exit_code;
}
