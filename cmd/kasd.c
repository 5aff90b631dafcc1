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
#include "shards/conn.h"
#include "shards/server.h"

/* Until the gRPC layer is on a listener, its connections are held and their input discarded: the
 * listener is open (so orchestration and tests see the port) but serves no protocol yet. */
static int held_on_data(struct kd_conn *c, const uint8_t *data, size_t len)
{
    (void)c;
    (void)data;
    (void)len;
    return 0;
}

static const struct kd_conn_ops held_ops = {.name = "held", .on_data = held_on_data};

static void usage(FILE *f)
{
    fprintf(f,
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

struct listener_spec {
    const char *name;
    struct kd_listen_cfg *cfg;
};

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"config", required_argument, NULL, 'c'}, {"check-config", required_argument, NULL, 'C'},
        {"dev", no_argument, NULL, 'd'},          {"state-dir", required_argument, NULL, 's'},
        {"version", no_argument, NULL, 'V'},      {"help", no_argument, NULL, 'h'},
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
            printf("kasd %s\n", KD_VERSION);
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
    struct kd_embedded_redis redis = {.pid = -1};
    struct kd_server *srv = NULL;
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

    struct listener_spec specs[] = {
        {"agent", &cfg.agent.listen},
        {"api", &cfg.api.listen},
        {"private_api", &cfg.private_api.listen},
    };
    struct kd_server_opts o = {
        .shards = cfg.shards,
        .pin = true,
        .connections_per_shard = cfg.limits.connections_per_shard,
        .recv_buffers = cfg.limits.recv_buffers,
        .recv_buffer_size = cfg.limits.recv_buffer_size,
        .ring_size = cfg.limits.router_ring_size,
        .shutdown_grace_ms = cfg.limits.shutdown_grace_ms,
    };
    for (size_t i = 0; i < sizeof(specs) / sizeof(specs[0]); i++) {
        struct kd_server_listener *l = &o.listeners[o.nlisteners++];
        l->name = specs[i].name;
        l->addr = specs[i].cfg->addr;
        l->addrlen = specs[i].cfg->addrlen;
        l->ops = &held_ops;
    }
    if (kd_server_create(&o, &srv, err, sizeof(err)) < 0 || kd_server_start(srv, err, sizeof(err)) < 0) {
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
        kd_log_end(&l);
    }
    {
        struct kd_logline l;
        kd_log_begin(&l, KD_LOG_INFO, "started");
        kd_log_str(&l, "version", KD_VERSION);
        kd_log_uint(&l, "shards", kd_server_nshards(srv));
        kd_log_int(&l, "pid", getpid());
        kd_log_str(&l, "config", cfg.source);
        kd_log_end(&l);
    }

    for (;;) {
        int sig;
        if (sigwait(&sigs, &sig) != 0)
            continue;
        if (sig == SIGHUP) {
            kd_log_msg(KD_LOG_INFO, "sighup", "nothing to reload yet");
            continue;
        }
        struct kd_logline l;
        kd_log_begin(&l, KD_LOG_INFO, "stopping");
        kd_log_str(&l, "signal", sig == SIGTERM ? "SIGTERM" : "SIGINT");
        kd_log_uint(&l, "grace_ms", cfg.limits.shutdown_grace_ms);
        kd_log_end(&l);
        break;
    }
    kd_server_stop(srv);
    kd_server_wait(srv);
    exit_code = 0;
out:
    kd_server_destroy(srv);
    kd_redis_embedded_stop(&redis);
    if (exit_code == 0)
        kd_log_msg(KD_LOG_INFO, "stopped", "clean exit");
    kd_log_stop();
    kd_config_free(&cfg);
    return exit_code;
}
