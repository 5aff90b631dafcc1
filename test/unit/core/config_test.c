/* config_test.c — the YAML loader: defaults, every key, every error path and its exact message,
 * layering and transactional loads, and the host:port and duration parsers.
 * Leaks are checked by LSan when each test worker exits (build with -fsanitize=address). */
#include "core/config.h"
#include "core/h2.h"

#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define NAME "kasd.yaml"

/* Defaults, then yaml on top. The caller frees c. */
static int load(struct kd_config *c, const char *yaml, char *err, size_t errlen)
{
    cr_assert_eq(kd_config_defaults(c), 0);
    return kd_config_load_string(c, NAME, yaml, strlen(yaml), err, errlen);
}

static void expect_ok(struct kd_config *c, const char *yaml)
{
    char err[512] = "";
    int r = load(c, yaml, err, sizeof(err));

    cr_assert_eq(r, 0, "load failed for <<%s>>: %s", yaml, err);
    cr_assert_str_eq(c->source, NAME);
}

/* The exact message, one line, and a config left as it was (defaults). */
static void expect_error(const char *yaml, const char *want)
{
    struct kd_config c;
    char err[512] = "";
    int r = load(&c, yaml, err, sizeof(err));

    cr_expect_eq(r, -EINVAL, "want -EINVAL for <<%s>>, got %d", yaml, r);
    cr_expect_str_eq(err, want, "for <<%s>>\n got: %s\nwant: %s", yaml, err, want);
    cr_expect_null(strchr(err, '\n'), "message is not one line: %s", err);
    cr_expect_str_eq(c.source, "<defaults>", "a failed load must leave the config unchanged");
    kd_config_free(&c);
}

struct error_case {
    const char *yaml;
    const char *want;
};

static void expect_errors(const struct error_case *cases, size_t n)
{
    for (size_t i = 0; i < n; i++)
        expect_error(cases[i].yaml, cases[i].want);
}

#define EXPECT_ERRORS(cases) expect_errors(cases, sizeof(cases) / sizeof(cases[0]))

static void expect_inet(const struct kd_listen_cfg *l, const char *ip, uint16_t port)
{
    const struct sockaddr_in *sin = (const struct sockaddr_in *)&l->addr;
    char buf[INET_ADDRSTRLEN];

    cr_assert_eq(l->addrlen, sizeof(struct sockaddr_in));
    cr_assert_eq(sin->sin_family, AF_INET);
    cr_assert_eq(ntohs(sin->sin_port), port);
    cr_assert_not_null(inet_ntop(AF_INET, &sin->sin_addr, buf, sizeof(buf)));
    cr_assert_str_eq(buf, ip);
}

static void expect_inet6(const struct kd_listen_cfg *l, const char *ip, uint16_t port)
{
    const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)&l->addr;
    char buf[INET6_ADDRSTRLEN];

    cr_assert_eq(l->addrlen, sizeof(struct sockaddr_in6));
    cr_assert_eq(sin6->sin6_family, AF_INET6);
    cr_assert_eq(ntohs(sin6->sin6_port), port);
    cr_assert_not_null(inet_ntop(AF_INET6, &sin6->sin6_addr, buf, sizeof(buf)));
    cr_assert_str_eq(buf, ip);
}

static void expect_defaults(const struct kd_config *c)
{
    cr_assert_eq(c->shards, 0);
    cr_assert_str_eq(c->agent.listen.address, "127.0.0.1:8150");
    expect_inet(&c->agent.listen, "127.0.0.1", 8150);
    cr_assert_null(c->agent.listen.authentication_secret_file);
    cr_assert_null(c->agent.token_file);
    cr_assert_str_eq(c->api.listen.address, "127.0.0.1:8153");
    expect_inet(&c->api.listen, "127.0.0.1", 8153);
    cr_assert_null(c->api.listen.authentication_secret_file);
    cr_assert_str_eq(c->private_api.listen.address, "127.0.0.1:8155");
    expect_inet(&c->private_api.listen, "127.0.0.1", 8155);
    cr_assert_null(c->private_api.listen.authentication_secret_file);
    cr_assert_str_eq(c->observability.listen.address, "127.0.0.1:8151");
    expect_inet(&c->observability.listen, "127.0.0.1", 8151);
    cr_assert_null(c->observability.listen.authentication_secret_file);
    cr_assert_eq(c->redis.configured, false);
    cr_assert_null(c->redis.address);
    cr_assert_null(c->redis.username);
    cr_assert_null(c->redis.password_file);
    cr_assert_eq(c->redis.database, 0);
    cr_assert_str_eq(c->redis.key_prefix, "gitlab-kas");
    cr_assert_eq(c->redis.dial_timeout_ms, 5000);
    cr_assert_eq(c->limits.connections_per_shard, 65536);
    cr_assert_eq(c->limits.recv_buffers, 1024);
    cr_assert_eq(c->limits.recv_buffer_size, 16384);
    cr_assert_eq(c->limits.router_ring_size, 4096);
    cr_assert_eq(c->limits.shutdown_grace_ms, 10000);
    cr_assert_eq(c->limits.pods_per_connection, 16);
    cr_assert_eq(c->limits.pods_per_agent, 1000);
    cr_assert_eq(c->limits.connected_agents_max_size, (4u << 20) - (64u << 10));
    cr_assert_eq(c->log.level, KD_LOG_INFO);
}

/* ---------------------------------------------------------------------------------------------- */
/* Defaults and valid input                                                                        */

Test(config, defaults)
{
    struct kd_config c;

    cr_assert_eq(kd_config_defaults(&c), 0);
    expect_defaults(&c);
    cr_assert_str_eq(c.source, "<defaults>");
    kd_config_free(&c);
    kd_config_free(&c); /* zeroed by the first free: harmless */
    kd_config_free(NULL);
}

Test(config, empty_inputs_mean_defaults)
{
    static const char *inputs[] = {
        "", "\n", "# nothing configured yet\n", "---\n", "---\n...\n", "~\n", "null\n", "%YAML 1.1\n---\n",
    };

    for (size_t i = 0; i < sizeof(inputs) / sizeof(inputs[0]); i++) {
        struct kd_config c;

        expect_ok(&c, inputs[i]);
        expect_defaults(&c);
        kd_config_free(&c);
    }
}

Test(config, null_pointer_input_means_defaults)
{
    struct kd_config c;
    char err[128];

    cr_assert_eq(kd_config_defaults(&c), 0);
    cr_assert_eq(kd_config_load_string(&c, NULL, NULL, 0, err, sizeof(err)), 0);
    cr_assert_str_eq(c.source, "<string>");
    expect_defaults(&c);
    kd_config_free(&c);
}

Test(config, null_sections_are_empty)
{
    struct kd_config c;

    expect_ok(&c, "agent:\nlimits: ~\napi: null\nlog: Null\nobservability: NULL\nprivate_api:\n"
                  "  listen:\n");
    expect_defaults(&c);
    kd_config_free(&c);
}

static const char full_config_template[] = "# every key kasd knows\n"
                                           "shards: 8\n"
                                           "agent:\n"
                                           "  listen:\n"
                                           "    address: 0.0.0.0:8150\n"
                                           "  token_file: /etc/kasd/tokens.yaml\n"
                                           "api:\n"
                                           "  listen:\n"
                                           "    address: \"[::1]:8153\"\n"
                                           "    authentication_secret_file: /etc/kasd/api-secret\n"
                                           "private_api:\n"
                                           "  listen:\n"
                                           "    address: 10.1.2.3:8155\n"
                                           "    authentication_secret_file: /etc/kasd/private-api-secret\n"
                                           "observability:\n"
                                           "  listen:\n"
                                           "    address: '[::]:0'\n"
                                           "redis:\n"
                                           "  server:\n"
                                           "    address: redis.example.com:6379\n"
                                           "  username: kas\n"
                                           "  password_file: %s\n"
                                           "  read_timeout: 2s\n"
                                           "  heartbeat_interval: 2s\n"
                                           "  instance_ttl: 7s\n"
                                           "  sweep_interval: 1m\n"
                                           "  write_timeout: 3s\n"
                                           "  tls:\n"
                                           "    ca_file: /etc/kasd/redis-ca.pem\n"
                                           "    server_name: redis.internal\n"
                                           "    certificate_file: /etc/kasd/redis-client.pem\n"
                                           "    key_file: /etc/kasd/redis-client.key\n"
                                           "  sentinel:\n"
                                           "    master_name: mymaster\n"
                                           "    addresses: [10.0.0.1:26379, 'sentinel-2:26379']\n"
                                           "    password_file: %s\n"
                                           "  database: 3\n"
                                           "  key_prefix: my-kas\n"
                                           "  dial_timeout: 1m30s\n"
                                           "limits:\n"
                                           "  connections_per_shard: 16777216\n"
                                           "  recv_buffers_per_shard: 32768\n"
                                           "  recv_buffer_size: 1048576\n"
                                           "  router_ring_size: 1048576\n"
                                           "  shutdown_grace: 250ms\n"
                                           "log:\n"
                                           "  level: debug\n";

/* The secret files the full config names: written once per test process (criterion forks each
 * test from a process that ran this constructor), named after the pid so parallel runs of the
 * suite (normal and sanitizer builds) never share them. */
static char full_config[sizeof(full_config_template) + 256];
static char redis_password_path[64], sentinel_password_path[64];

__attribute__((constructor)) static void write_secret_files(void)
{
    FILE *f;

    snprintf(redis_password_path, sizeof(redis_password_path), "/tmp/kasd-config-test-%d-redis-pw",
             (int)getpid());
    snprintf(sentinel_password_path, sizeof(sentinel_password_path), "/tmp/kasd-config-test-%d-sentinel-pw",
             (int)getpid());
    f = fopen(redis_password_path, "w");
    if (f) {
        fputs("s3cret\n", f);
        fclose(f);
    }
    f = fopen(sentinel_password_path, "w");
    if (f) {
        fputs("sentinel-pw\r\n", f);
        fclose(f);
    }
    snprintf(full_config, sizeof(full_config), full_config_template, redis_password_path,
             sentinel_password_path);
}

__attribute__((destructor)) static void remove_secret_files(void)
{
    /* Only the process that wrote them (criterion's workers share the pid-named paths of their
     * parent and must not remove them under their siblings). */
    char mine[64];
    snprintf(mine, sizeof(mine), "/tmp/kasd-config-test-%d-redis-pw", (int)getpid());
    if (strcmp(mine, redis_password_path) == 0) {
        unlink(redis_password_path);
        unlink(sentinel_password_path);
    }
}

Test(config, every_key)
{
    struct kd_config c;

    expect_ok(&c, full_config);
    cr_assert_eq(c.shards, 8);
    cr_assert_str_eq(c.agent.listen.address, "0.0.0.0:8150");
    expect_inet(&c.agent.listen, "0.0.0.0", 8150);
    cr_assert_str_eq(c.agent.token_file, "/etc/kasd/tokens.yaml");
    cr_assert_str_eq(c.api.listen.address, "[::1]:8153");
    expect_inet6(&c.api.listen, "::1", 8153);
    cr_assert_str_eq(c.api.listen.authentication_secret_file, "/etc/kasd/api-secret");
    cr_assert_str_eq(c.private_api.listen.address, "10.1.2.3:8155");
    expect_inet(&c.private_api.listen, "10.1.2.3", 8155);
    cr_assert_str_eq(c.private_api.listen.authentication_secret_file, "/etc/kasd/private-api-secret");
    cr_assert_str_eq(c.observability.listen.address, "[::]:0");
    expect_inet6(&c.observability.listen, "::", 0);
    cr_assert_null(c.observability.listen.authentication_secret_file);
    cr_assert(c.redis.configured);
    cr_assert_str_eq(c.redis.address, "redis.example.com:6379");
    cr_assert_str_eq(c.redis.username, "kas");
    cr_assert_str_eq(c.redis.password_file, redis_password_path);
    cr_assert_str_eq(c.redis.password, "s3cret");
    cr_assert_eq(c.redis.database, 3);
    cr_assert_str_eq(c.redis.key_prefix, "my-kas");
    cr_assert_eq(c.redis.dial_timeout_ms, 90000);
    cr_assert_eq(c.redis.read_timeout_ms, 2000);
    cr_assert_eq(c.redis.heartbeat_ms, 2000);
    cr_assert_eq(c.redis.instance_ttl_ms, 7000);
    cr_assert_eq(c.redis.sweep_ms, 60000);
    cr_assert_eq(c.redis.write_timeout_ms, 3000);
    cr_assert_eq(c.redis.tls.enabled, 1);
    cr_assert_str_eq(c.redis.tls.ca_file, "/etc/kasd/redis-ca.pem");
    cr_assert_str_eq(c.redis.tls.server_name, "redis.internal");
    cr_assert_str_eq(c.redis.tls.certificate_file, "/etc/kasd/redis-client.pem");
    cr_assert_str_eq(c.redis.tls.key_file, "/etc/kasd/redis-client.key");
    cr_assert_str_eq(c.redis.sentinel.master_name, "mymaster");
    cr_assert_eq(c.redis.sentinel.n_addresses, 2);
    cr_assert_str_eq(c.redis.sentinel.addresses, "10.0.0.1:26379\nsentinel-2:26379");
    cr_assert_str_eq(c.redis.sentinel.password_file, sentinel_password_path);
    cr_assert_str_eq(c.redis.sentinel.password, "sentinel-pw");
    cr_assert_eq(c.limits.connections_per_shard, 16777216);
    cr_assert_eq(c.limits.recv_buffers, 32768);
    cr_assert_eq(c.limits.recv_buffer_size, 1048576);
    cr_assert_eq(c.limits.router_ring_size, 1048576);
    cr_assert_eq(c.limits.shutdown_grace_ms, 250);
    cr_assert_eq(c.log.level, KD_LOG_DEBUG);
    kd_config_free(&c);
}

Test(config, flow_style_and_lower_bounds)
{
    struct kd_config c;

    expect_ok(&c, "{shards: 0, limits: {connections_per_shard: 1, recv_buffers_per_shard: 16,"
                  " recv_buffer_size: 1024, router_ring_size: 64, shutdown_grace: 0},"
                  " redis: {server: {address: 'unix:/run/redis/redis.sock'}, database: 2147483647,"
                  " dial_timeout: 1ms}, log: {level: error}}\n");
    cr_assert_eq(c.shards, 0);
    cr_assert_eq(c.limits.connections_per_shard, 1);
    cr_assert_eq(c.limits.recv_buffers, 16);
    cr_assert_eq(c.limits.recv_buffer_size, 1024);
    cr_assert_eq(c.limits.router_ring_size, 64);
    cr_assert_eq(c.limits.shutdown_grace_ms, 0);
    cr_assert(c.redis.configured);
    cr_assert_str_eq(c.redis.address, "unix:/run/redis/redis.sock");
    cr_assert_eq(c.redis.database, 2147483647);
    cr_assert_eq(c.redis.dial_timeout_ms, 1);
    cr_assert_eq(c.log.level, KD_LOG_ERROR);
    kd_config_free(&c);
}

Test(config, quoted_scalars_are_accepted)
{
    struct kd_config c;

    expect_ok(&c, "shards: \"4\"\nlog:\n  level: 'warn'\nlimits:\n  shutdown_grace: \"1h\"\n");
    cr_assert_eq(c.shards, 4);
    cr_assert_eq(c.log.level, KD_LOG_WARN);
    cr_assert_eq(c.limits.shutdown_grace_ms, 3600000);
    kd_config_free(&c);
}

Test(config, every_log_level)
{
    static const struct {
        const char *name;
        enum kd_log_level level;
    } levels[] = {
        {"debug", KD_LOG_DEBUG}, {"info", KD_LOG_INFO}, {"warn", KD_LOG_WARN}, {"error", KD_LOG_ERROR}};

    for (size_t i = 0; i < 4; i++) {
        struct kd_config c;
        char yaml[64];

        snprintf(yaml, sizeof(yaml), "log:\n  level: %s\n", levels[i].name);
        expect_ok(&c, yaml);
        cr_assert_eq(c.log.level, levels[i].level);
        cr_assert_str_eq(kd_log_level_name(c.log.level), levels[i].name);
        kd_config_free(&c);
    }
    cr_assert_str_eq(kd_log_level_name((enum kd_log_level)42), "unknown");
}

Test(config, redis_tracker_timings)
{
    struct kd_config c;
    kd_config_defaults(&c);
    cr_assert_eq(c.redis.heartbeat_ms, 10000);
    cr_assert_eq(c.redis.instance_ttl_ms, 30000);
    cr_assert_eq(c.redis.sweep_ms, 30000);
    kd_config_free(&c);
    const struct error_case cases[] = {
        {"redis:\n  server:\n    address: 127.0.0.1:1\n  heartbeat_interval: 5s\n  instance_ttl: 5s\n",
         "kasd.yaml:2:3: redis.instance_ttl: must be longer than redis.heartbeat_interval (5000ms), got "
         "5000ms"},
        {"redis:\n  server:\n    address: 127.0.0.1:1\n  heartbeat_interval: 50ms\n",
         "kasd.yaml:4:23: redis.heartbeat_interval: must be between 100ms and 3600000ms, got \"50ms\""},
    };
    EXPECT_ERRORS(cases);
}

Test(config, redis_addresses)
{
    static const char *good[] = {
        "redis.example.com:6379", "10.0.0.1:6379", "[::1]:6379",
        "unix:/run/redis.sock",   "redis_1:1",     "localhost:65535",
    };

    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        struct kd_config c;
        char yaml[128];

        snprintf(yaml, sizeof(yaml), "redis:\n  server:\n    address: '%s'\n", good[i]);
        expect_ok(&c, yaml);
        cr_assert(c.redis.configured);
        cr_assert_str_eq(c.redis.address, good[i]);
        kd_config_free(&c);
    }
}

Test(config, redis_section_without_address_is_fine_when_a_previous_layer_set_it)
{
    struct kd_config c;
    char err[256];

    expect_ok(&c, "redis:\n  server:\n    address: 10.0.0.1:6379\n");
    cr_assert_eq(kd_config_load_string(&c, "b.yaml", "redis:\n  database: 2\n", 21, err, sizeof(err)), 0,
                 "%s", err);
    cr_assert_str_eq(c.redis.address, "10.0.0.1:6379");
    cr_assert_eq(c.redis.database, 2);
    kd_config_free(&c);
}

Test(config, layered_loads_replace_strings)
{
    struct kd_config c;
    char err[256];
    const char *second = "agent:\n  token_file: /b\napi:\n  listen:\n    address: 127.0.0.2:1\n";

    expect_ok(&c, "shards: 4\nagent:\n  token_file: /a\nredis:\n  server:\n    address: r:1\n"
                  "  username: u1\n  key_prefix: p1\n");
    cr_assert_eq(kd_config_load_string(&c, "second.yaml", second, strlen(second), err, sizeof(err)), 0, "%s",
                 err);
    cr_assert_str_eq(c.source, "second.yaml");
    cr_assert_eq(c.shards, 4);
    cr_assert_str_eq(c.agent.token_file, "/b");
    cr_assert_str_eq(c.api.listen.address, "127.0.0.2:1");
    expect_inet(&c.api.listen, "127.0.0.2", 1);
    cr_assert_str_eq(c.redis.username, "u1");
    cr_assert_str_eq(c.redis.key_prefix, "p1");
    kd_config_free(&c);
}

Test(config, failed_load_leaves_config_unchanged)
{
    struct kd_config c;
    char err[256];
    const char *bad = "shards: 7\nagent:\n  token_file: /changed\n  listen:\n    address: nowhere\n";

    expect_ok(&c, "shards: 3\nagent:\n  token_file: /kept\n");
    cr_assert_eq(kd_config_load_string(&c, "bad.yaml", bad, strlen(bad), err, sizeof(err)), -EINVAL);
    cr_assert_str_eq(err, "bad.yaml:5:14: agent.listen.address: expected host:port (like 127.0.0.1:8150), "
                          "got \"nowhere\"");
    cr_assert_eq(c.shards, 3);
    cr_assert_str_eq(c.agent.token_file, "/kept");
    cr_assert_str_eq(c.source, NAME);
    kd_config_free(&c);
}

/* Run under ASan: LSan reports anything these loads leak when the worker exits. */
Test(config, repeated_loads_do_not_leak)
{
    struct kd_config c;
    char err[256];

    cr_assert_eq(kd_config_defaults(&c), 0);
    for (int i = 0; i < 200; i++) {
        /* Every third load fails half-way, after strings were already replaced in the copy. */
        const char *yaml = (i % 3 == 2) ? "agent:\n  token_file: /x\nlog:\n  level: loud\n" : full_config;
        int r = kd_config_load_string(&c, i % 2 ? "a.yaml" : "b.yaml", yaml, strlen(yaml), err, sizeof(err));

        cr_assert_eq(r, i % 3 == 2 ? -EINVAL : 0, "iteration %d: %s", i, err);
    }
    kd_config_free(&c);
    for (int i = 0; i < 50; i++) {
        cr_assert_eq(kd_config_defaults(&c), 0);
        kd_config_free(&c);
    }
}

/* ---------------------------------------------------------------------------------------------- */
/* Error paths                                                                                     */

Test(config, header_example_message)
{
    expect_error(
        "shards: 2\n"
        "agent:\n"
        "  listen:\n"
        "    address: 127.0.0.1:8150\n"
        "api:\n"
        "  listen:\n"
        "    address: localhost\n",
        "kasd.yaml:7:14: api.listen.address: expected host:port (like 127.0.0.1:8153), got \"localhost\"");
}

Test(config, unknown_keys_everywhere)
{
    static const struct error_case cases[] = {
        {"lisen: 1\n", "kasd.yaml:1:1: lisen: unknown key (expected one of: shards, agent, api, private_api, "
                       "fleet, observability, kubernetes_api, redis, gitlab, limits, log, grpc)"},
        {"agent:\n  lisen: 1\n",
         "kasd.yaml:2:3: agent.lisen: unknown key (expected one of: listen, token_file, configuration_dir, token_source)"},
        {"agent:\n  listen:\n    authentication_secret_file: x\n",
         "kasd.yaml:3:5: agent.listen.authentication_secret_file: unknown key (expected one of: address, "
         "certificate_file, key_file, max_connection_age, "
         "max_connection_age_grace, keepalive_time, keepalive_timeout, keepalive_min_time, websocket)"},
        {"api:\n  token_file: x\n", "kasd.yaml:2:3: api.token_file: unknown key (expected: listen)"},
        {"api:\n  listen:\n    adress: x\n", "kasd.yaml:3:5: api.listen.adress: unknown key (expected one "
                                             "of: address, authentication_secret_file, certificate_file, "
                                             "key_file, max_connection_age, max_connection_age_grace, "
                                             "keepalive_time, keepalive_timeout, keepalive_min_time)"},
        {"private_api:\n  lsten: {}\n", "kasd.yaml:2:3: private_api.lsten: unknown key (expected one of: listen, advertise_address, client)"},
        {"private_api:\n  listen:\n    network: tcp\n",
         "kasd.yaml:3:5: private_api.listen.network: unknown key "
         "(expected one of: address, authentication_secret_file, certificate_file, key_file, "
         "client_ca_file, max_connection_age, max_connection_age_grace, keepalive_time, "
         "keepalive_timeout, keepalive_min_time)"},
        {"observability:\n  port: 1\n", "kasd.yaml:2:3: observability.port: unknown key (expected: listen)"},
        {"observability:\n  listen:\n    authentication_secret_file: s\n",
         "kasd.yaml:3:5: observability.listen.authentication_secret_file: unknown key (expected: address)"},
        {"redis:\n  host: x\n", "kasd.yaml:2:3: redis.host: unknown key (expected one of: server, username, "
                                "password_file, database, key_prefix, dial_timeout, read_timeout, "
                                "write_timeout, heartbeat_interval, instance_ttl, sweep_interval, tls, "
                                "sentinel)"},
        {"redis:\n  server:\n    addr: x\n",
         "kasd.yaml:3:5: redis.server.addr: unknown key (expected: address)"},
        {"limits:\n  max_conns: 1\n",
         "kasd.yaml:2:3: limits.max_conns: unknown key (expected one of: connections_per_shard, "
         "recv_buffers_per_shard, recv_buffer_size, router_ring_size, shutdown_grace, grpc_max_message_size, "
         "grpc_max_concurrent_streams, grpc_max_header_list_size, h2_rapid_reset_burst, h2_rapid_reset_rate, "
         "h2_settings_burst, h2_settings_rate, h2_ping_strikes, routing_timeout, pods_per_connection, "
         "pods_per_agent, agent_meta_max_size, connected_agents_max_size)"},
        {"log:\n  lvl: debug\n", "kasd.yaml:2:3: log.lvl: unknown key (expected: level)"},
        /* Keys are case-sensitive, like kas's. */
        {"Shards: 1\n",
         "kasd.yaml:1:1: Shards: unknown key (expected one of: shards, agent, api, private_api, "
         "fleet, observability, kubernetes_api, redis, gitlab, limits, log, grpc)"},
    };

    EXPECT_ERRORS(cases);
}

Test(config, odd_keys_are_quoted_and_escaped)
{
    static const struct error_case cases[] = {
        {"'': 1\n", "kasd.yaml:1:1: \"\": unknown key (expected one of: shards, agent, api, private_api, "
                    "fleet, observability, kubernetes_api, redis, gitlab, limits, log, grpc)"},
        {"log:\n  \"le vel\\t\": x\n", "kasd.yaml:2:3: log.\"le vel\\x09\": unknown key (expected: level)"},
        {"log:\n  \"l\\u00e9vel\": x\n",
         "kasd.yaml:2:3: log.\"l\\xc3\\xa9vel\": unknown key (expected: level)"},
        {"log:\n  <<: x\n", "kasd.yaml:2:3: log.\"<<\": unknown key (expected: level)"},
        {"log:\n  1: x\n", "kasd.yaml:2:3: log.1: unknown key (expected: level)"},
        {"log:\n  \"level\\0\": x\n", "kasd.yaml:2:3: log.\"level\\x00\": unknown key (expected: level)"},
    };

    EXPECT_ERRORS(cases);
}

Test(config, wrong_node_kinds)
{
    static const struct error_case cases[] = {
        {"agent: 5\n", "kasd.yaml:1:8: agent: expected a mapping, got a scalar"},
        {"agent: [1]\n", "kasd.yaml:1:8: agent: expected a mapping, got a sequence"},
        {"agent: ''\n", "kasd.yaml:1:8: agent: expected a mapping, got a scalar"},
        {"agent:\n  listen: x\n", "kasd.yaml:2:11: agent.listen: expected a mapping, got a scalar"},
        {"redis:\n  server: unix:/x\n", "kasd.yaml:2:11: redis.server: expected a mapping, got a scalar"},
        {"shards: {a: 1}\n", "kasd.yaml:1:9: shards: expected a scalar, got a mapping"},
        {"shards: [1]\n", "kasd.yaml:1:9: shards: expected a scalar, got a sequence"},
        {"api:\n  listen:\n    address: [a]\n",
         "kasd.yaml:3:14: api.listen.address: expected a scalar, got a sequence"},
        {"log:\n  level:\n    x: 1\n", "kasd.yaml:3:5: log.level: expected a scalar, got a mapping"},
        {"limits:\n  shutdown_grace:\n  - 1s\n",
         "kasd.yaml:3:3: limits.shutdown_grace: expected a scalar, got a sequence"},
        {"hello\n", "kasd.yaml:1:1: expected a mapping at the top level, got a scalar"},
        {"'~'\n", "kasd.yaml:1:1: expected a mapping at the top level, got a scalar"},
        {"- shards: 1\n", "kasd.yaml:1:1: expected a mapping at the top level, got a sequence"},
        {"? [a]\n: 1\n", "kasd.yaml:1:3: keys must be scalars, got a sequence"},
        {"agent:\n  ? {a: 1}\n  : 1\n", "kasd.yaml:2:5: agent: keys must be scalars, got a mapping"},
    };

    EXPECT_ERRORS(cases);
}

Test(config, bad_listen_addresses)
{
    static const struct error_case cases[] = {
        {"agent:\n  listen:\n    address: localhost:8150\n",
         "kasd.yaml:3:14: agent.listen.address: expected host:port (like 127.0.0.1:8150), got "
         "\"localhost:8150\""},
        {"private_api:\n  listen:\n    address: 127.0.0.1\n",
         "kasd.yaml:3:14: private_api.listen.address: "
         "expected host:port (like 127.0.0.1:8155), got \"127.0.0.1\""},
        {"observability:\n  listen:\n    address: '[::1]'\n",
         "kasd.yaml:3:14: observability.listen.address: "
         "expected host:port (like 127.0.0.1:8151), got \"[::1]\""},
        {"api:\n  listen:\n    address: '::1:8153'\n",
         "kasd.yaml:3:14: api.listen.address: expected host:port (like 127.0.0.1:8153), got \"::1:8153\""},
        {"api:\n  listen:\n    address: 127.0.0.1:65536\n",
         "kasd.yaml:3:14: api.listen.address: expected host:port (like 127.0.0.1:8153), got "
         "\"127.0.0.1:65536\""},
        {"api:\n  listen:\n    address: ' 127.0.0.1:1'\n",
         "kasd.yaml:3:14: api.listen.address: expected host:port (like 127.0.0.1:8153), got \" "
         "127.0.0.1:1\""},
        {"api:\n  listen:\n    address: :8153\n",
         "kasd.yaml:3:14: api.listen.address: expected host:port (like 127.0.0.1:8153), got \":8153\""},
        {"api:\n  listen:\n    address: 8153\n",
         "kasd.yaml:3:14: api.listen.address: expected host:port (like 127.0.0.1:8153), got \"8153\""},
        {"agent:\n  listen:\n    address:\n",
         "kasd.yaml:3:13: agent.listen.address: expected host:port (like 127.0.0.1:8150), got \"\""},
    };

    EXPECT_ERRORS(cases);
}

Test(config, empty_strings)
{
    static const struct error_case cases[] = {
        {"agent:\n  token_file: ''\n", "kasd.yaml:2:15: agent.token_file: must not be empty"},
        {"api:\n  listen:\n    authentication_secret_file: \"\"\n",
         "kasd.yaml:3:33: api.listen.authentication_secret_file: must not be empty"},
        {"private_api:\n  listen:\n    authentication_secret_file: ''\n",
         "kasd.yaml:3:33: private_api.listen.authentication_secret_file: must not be empty"},
        {"redis:\n  username: ''\n", "kasd.yaml:2:13: redis.username: must not be empty"},
        {"redis:\n  password_file: ''\n", "kasd.yaml:2:18: redis.password_file: must not be empty"},
        {"redis:\n  key_prefix: ''\n", "kasd.yaml:2:15: redis.key_prefix: must not be empty"},
    };

    EXPECT_ERRORS(cases);
}

Test(config, bad_integers)
{
    static const struct error_case cases[] = {
        {"shards: -1\n", "kasd.yaml:1:9: shards: expected a decimal integer, got \"-1\""},
        {"shards: +1\n", "kasd.yaml:1:9: shards: expected a decimal integer, got \"+1\""},
        {"shards: 1.5\n", "kasd.yaml:1:9: shards: expected a decimal integer, got \"1.5\""},
        {"shards: 0x10\n", "kasd.yaml:1:9: shards: expected a decimal integer, got \"0x10\""},
        {"shards: 010\n", "kasd.yaml:1:9: shards: expected a decimal integer, got \"010\""},
        {"shards: 1_000\n", "kasd.yaml:1:9: shards: expected a decimal integer, got \"1_000\""},
        {"shards: 1e3\n", "kasd.yaml:1:9: shards: expected a decimal integer, got \"1e3\""},
        {"shards: four\n", "kasd.yaml:1:9: shards: expected a decimal integer, got \"four\""},
        {"shards: ' 4'\n", "kasd.yaml:1:9: shards: expected a decimal integer, got \" 4\""},
        {"shards:\n", "kasd.yaml:1:8: shards: expected a decimal integer, got \"\""},
        {"shards: 99999999999999999999x\n",
         "kasd.yaml:1:9: shards: expected a decimal integer, got \"99999999999999999999x\""},
        /* Overflowing uint64 is reported as out of range, like any other too-large value. */
        {"shards: 99999999999999999999999\n",
         "kasd.yaml:1:9: shards: must be between 0 and 1024, got \"99999999999999999999999\""},
        {"shards: 18446744073709551616\n",
         "kasd.yaml:1:9: shards: must be between 0 and 1024, got \"18446744073709551616\""},
        {"redis:\n  database: -1\n",
         "kasd.yaml:2:13: redis.database: expected a decimal integer, got \"-1\""},
    };

    EXPECT_ERRORS(cases);
}

Test(config, out_of_range_integers)
{
    static const struct error_case cases[] = {
        {"shards: 1025\n", "kasd.yaml:1:9: shards: must be between 0 and 1024, got \"1025\""},
        {"shards: 4294967296\n", "kasd.yaml:1:9: shards: must be between 0 and 1024, got \"4294967296\""},
        {"limits:\n  connections_per_shard: 0\n",
         "kasd.yaml:2:26: limits.connections_per_shard: must be between 1 and 16777216, got \"0\""},
        {"limits:\n  connections_per_shard: 16777217\n",
         "kasd.yaml:2:26: limits.connections_per_shard: must be between 1 and 16777216, got \"16777217\""},
        {"limits:\n  recv_buffer_size: 1023\n",
         "kasd.yaml:2:21: limits.recv_buffer_size: must be between 1024 and 1048576, got \"1023\""},
        {"limits:\n  recv_buffer_size: 1048577\n",
         "kasd.yaml:2:21: limits.recv_buffer_size: must be between 1024 and 1048576, got \"1048577\""},
        {"limits:\n  pods_per_connection: 0\n",
         "kasd.yaml:2:24: limits.pods_per_connection: must be between 1 and 1000000, got \"0\""},
        {"limits:\n  pods_per_agent: 1000001\n",
         "kasd.yaml:2:19: limits.pods_per_agent: must be between 1 and 1000000, got \"1000001\""},
        {"limits:\n  connected_agents_max_size: 1023\n", "kasd.yaml:2:30: limits.connected_agents_max_size: "
                                                         "must be between 1024 and 1073741824, got \"1023\""},
        {"redis:\n  server:\n    address: r:1\n  database: 2147483648\n",
         "kasd.yaml:4:13: redis.database: must be between 0 and 2147483647, got \"2147483648\""},
    };

    EXPECT_ERRORS(cases);
}

Test(config, powers_of_two)
{
    static const struct error_case cases[] = {
        {"limits:\n  recv_buffers_per_shard: 1000\n", "kasd.yaml:2:27: limits.recv_buffers_per_shard: must "
                                                      "be a power of two between 16 and 32768, got \"1000\""},
        {"limits:\n  recv_buffers_per_shard: 8\n", "kasd.yaml:2:27: limits.recv_buffers_per_shard: must be a "
                                                   "power of two between 16 and 32768, got \"8\""},
        {"limits:\n  recv_buffers_per_shard: 0\n", "kasd.yaml:2:27: limits.recv_buffers_per_shard: must be a "
                                                   "power of two between 16 and 32768, got \"0\""},
        {"limits:\n  recv_buffers_per_shard: 65536\n",
         "kasd.yaml:2:27: limits.recv_buffers_per_shard: must be a power of two between 16 and 32768, got "
         "\"65536\""},
        {"limits:\n  router_ring_size: 100\n", "kasd.yaml:2:21: limits.router_ring_size: must be a power of "
                                               "two between 64 and 1048576, got \"100\""},
        {"limits:\n  router_ring_size: 32\n", "kasd.yaml:2:21: limits.router_ring_size: must be a power of "
                                              "two between 64 and 1048576, got \"32\""},
        {"limits:\n  router_ring_size: 2097152\n", "kasd.yaml:2:21: limits.router_ring_size: must be a power "
                                                   "of two between 64 and 1048576, got \"2097152\""},
        {"limits:\n  router_ring_size: 36893488147419103232\n",
         "kasd.yaml:2:21: limits.router_ring_size: must be a power of two between 64 and 1048576, got "
         "\"36893488147419103232\""},
        {"limits:\n  router_ring_size: 0x100\n",
         "kasd.yaml:2:21: limits.router_ring_size: expected a decimal integer, got \"0x100\""},
    };
    struct kd_config c;

    EXPECT_ERRORS(cases);
    for (unsigned v = 16; v <= 32768; v *= 2) {
        char yaml[64];

        snprintf(yaml, sizeof(yaml), "limits:\n  recv_buffers_per_shard: %u\n", v);
        expect_ok(&c, yaml);
        cr_assert_eq(c.limits.recv_buffers, v);
        kd_config_free(&c);
    }
}

Test(config, bad_durations)
{
    static const struct error_case cases[] = {
        {"limits:\n  shutdown_grace: 10\n", "kasd.yaml:2:19: limits.shutdown_grace: expected a duration like "
                                            "250ms, 10s, 1m30s or 2h, got \"10\""},
        {"limits:\n  shutdown_grace: 10x\n", "kasd.yaml:2:19: limits.shutdown_grace: expected a duration "
                                             "like 250ms, 10s, 1m30s or 2h, got \"10x\""},
        {"limits:\n  shutdown_grace: 1.5s\n", "kasd.yaml:2:19: limits.shutdown_grace: expected a duration "
                                              "like 250ms, 10s, 1m30s or 2h, got \"1.5s\""},
        {"limits:\n  shutdown_grace: -1s\n", "kasd.yaml:2:19: limits.shutdown_grace: expected a duration "
                                             "like 250ms, 10s, 1m30s or 2h, got \"-1s\""},
        {"limits:\n  shutdown_grace: 1 s\n", "kasd.yaml:2:19: limits.shutdown_grace: expected a duration "
                                             "like 250ms, 10s, 1m30s or 2h, got \"1 s\""},
        {"limits:\n  shutdown_grace:\n",
         "kasd.yaml:2:18: limits.shutdown_grace: expected a duration like 250ms, 10s, 1m30s or 2h, got \"\""},
        {"limits:\n  shutdown_grace: 99999999999999999999h\n",
         "kasd.yaml:2:19: limits.shutdown_grace: expected a duration like 250ms, 10s, 1m30s or 2h, got "
         "\"99999999999999999999h\""},
        /* 1200h does not fit the uint32_t milliseconds of the struct. */
        {"limits:\n  shutdown_grace: 1200h\n",
         "kasd.yaml:2:19: limits.shutdown_grace: must be between 0ms and 4294967295ms, got \"1200h\""},
        {"redis:\n  dial_timeout: 0\n",
         "kasd.yaml:2:17: redis.dial_timeout: must be between 1ms and 4294967295ms, got \"0\""},
        {"redis:\n  dial_timeout: 0s\n",
         "kasd.yaml:2:17: redis.dial_timeout: must be between 1ms and 4294967295ms, got \"0s\""},
        {"redis:\n  dial_timeout: 5 seconds\n", "kasd.yaml:2:17: redis.dial_timeout: expected a duration "
                                                "like 250ms, 10s, 1m30s or 2h, got \"5 seconds\""},
    };
    struct kd_config c;

    EXPECT_ERRORS(cases);
    expect_ok(&c, "limits:\n  shutdown_grace: 1193h2m47s295ms\n");
    cr_assert_eq(c.limits.shutdown_grace_ms, UINT32_MAX);
    kd_config_free(&c);
}

Test(config, bad_log_level)
{
    static const struct error_case cases[] = {
        {"log:\n  level: verbose\n",
         "kasd.yaml:2:10: log.level: expected one of: debug, info, warn, error, got \"verbose\""},
        {"log:\n  level: INFO\n",
         "kasd.yaml:2:10: log.level: expected one of: debug, info, warn, error, got \"INFO\""},
        {"log:\n  level: warning\n",
         "kasd.yaml:2:10: log.level: expected one of: debug, info, warn, error, got \"warning\""},
        {"log:\n  level:\n", "kasd.yaml:2:9: log.level: expected one of: debug, info, warn, error, got \"\""},
    };

    EXPECT_ERRORS(cases);
}

Test(config, redis_requires_server_address)
{
    static const struct error_case cases[] = {
        {"redis: {}\n",
         "kasd.yaml:1:8: redis.server.address: required when a redis section is given without sentinel "
         "(like 127.0.0.1:6379 or unix:/path/to/socket)"},
        {"redis:\n",
         "kasd.yaml:1:7: redis.server.address: required when a redis section is given without sentinel "
         "(like 127.0.0.1:6379 or unix:/path/to/socket)"},
        {"shards: 1\nredis:\n  username: kas\n  database: 1\n",
         "kasd.yaml:3:3: redis.server.address: required when a redis section is given without sentinel "
         "(like 127.0.0.1:6379 or unix:/path/to/socket)"},
        {"redis:\n  server: {}\n",
         "kasd.yaml:2:3: redis.server.address: required when a redis section is given without sentinel "
         "(like 127.0.0.1:6379 or unix:/path/to/socket)"},
    };

    EXPECT_ERRORS(cases);
}

Test(config, bad_redis_addresses)
{
    static const char *bad[] = {
        "redis", "unix:", "unix:relative/path", "host:0", "host:99999", "[::1:6379",    "ho st:1",
        ":6379", "host:", "[1.2.3.4]:1",        "a/b:1",  "[::1]",      "tcp://host:1",
    };
    char yaml[256], want[512];

    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        snprintf(yaml, sizeof(yaml), "redis:\n  server:\n    address: '%s'\n", bad[i]);
        snprintf(want, sizeof(want),
                 "kasd.yaml:3:14: redis.server.address: expected host:port (like 127.0.0.1:6379) or "
                 "unix:/path/to/socket, got \"%s\"",
                 bad[i]);
        expect_error(yaml, want);
    }
    /* sun_path holds 107 bytes and a NUL. */
    char path[120];

    memset(path, 'p', sizeof(path));
    path[0] = '/';
    path[108] = '\0';
    snprintf(yaml, sizeof(yaml), "redis:\n  server:\n    address: unix:%s\n", path);
    struct kd_config c;
    char err[512];

    cr_assert_eq(load(&c, yaml, err, sizeof(err)), -EINVAL);
    cr_assert(strstr(err, "kasd.yaml:3:14: redis.server.address: expected host:port") == err, "%s", err);
    kd_config_free(&c);
    path[107] = '\0';
    snprintf(yaml, sizeof(yaml), "redis:\n  server:\n    address: unix:%s\n", path);
    expect_ok(&c, yaml);
    kd_config_free(&c);
}

Test(config, bad_key_prefix)
{
    static const struct error_case cases[] = {
        {"redis:\n  key_prefix: 'a b'\n",
         "kasd.yaml:2:15: redis.key_prefix: must not contain spaces or control characters, got \"a b\""},
        {"redis:\n  key_prefix: \"a\\tb\"\n",
         "kasd.yaml:2:15: redis.key_prefix: must not contain spaces or control characters, got \"a\\x09b\""},
        {"redis:\n  key_prefix: \"a\\x7fb\"\n",
         "kasd.yaml:2:15: redis.key_prefix: must not contain spaces or control characters, got \"a\\x7fb\""},
    };

    EXPECT_ERRORS(cases);
}

Test(config, duplicate_keys)
{
    static const struct error_case cases[] = {
        {"shards: 1\nshards: 2\n", "kasd.yaml:2:1: shards: duplicate key (first given at line 1)"},
        {"agent:\n  listen:\n    address: 1.2.3.4:80\n  listen: {}\n",
         "kasd.yaml:4:3: agent.listen: duplicate key (first given at line 2)"},
        {"limits:\n  recv_buffer_size: 2048\n  shutdown_grace: 1s\n  recv_buffer_size: 4096\n",
         "kasd.yaml:4:3: limits.recv_buffer_size: duplicate key (first given at line 2)"},
        {"log: {level: info, level: debug}\n",
         "kasd.yaml:1:20: log.level: duplicate key (first given at line 1)"},
        /* A quoted key is the same key. */
        {"log:\n  level: info\n  'level': info\n",
         "kasd.yaml:3:3: log.level: duplicate key (first given at line 2)"},
        {"log: {}\nlog: {}\n", "kasd.yaml:2:1: log: duplicate key (first given at line 1)"},
    };

    EXPECT_ERRORS(cases);
}

Test(config, anchors_aliases_and_tags_are_refused)
{
    static const struct error_case cases[] = {
        {"shards: &n 4\n", "kasd.yaml:1:9: shards: anchors are not supported (anchor \"n\")"},
        {"shards: *n\n", "kasd.yaml:1:9: shards: aliases are not supported (alias \"n\")"},
        {"agent: &a\n  token_file: x\napi: *a\n",
         "kasd.yaml:1:8: agent: anchors are not supported (anchor \"a\")"},
        {"*a : 1\n", "kasd.yaml:1:1: aliases are not supported (alias \"a\")"},
        {"&top\nshards: 1\n", "kasd.yaml:1:1: anchors are not supported (anchor \"top\")"},
        {"a: &a [1, 2]\nb: &b [*a, *a]\n",
         "kasd.yaml:1:1: a: unknown key (expected one of: shards, agent, api, "
         "private_api, fleet, observability, kubernetes_api, redis, gitlab, limits, log, grpc)"},
        {"log:\n  level: &l info\n", "kasd.yaml:2:10: log.level: anchors are not supported (anchor \"l\")"},
        {"shards: !!int 4\n",
         "kasd.yaml:1:9: shards: tags are not supported (tag \"tag:yaml.org,2002:int\")"},
        {"agent: !foo {}\n", "kasd.yaml:1:8: agent: tags are not supported (tag \"!foo\")"},
        {"!!map\nshards: 1\n", "kasd.yaml:1:1: tags are not supported (tag \"tag:yaml.org,2002:map\")"},
    };

    EXPECT_ERRORS(cases);
}

Test(config, billion_laughs_is_refused_at_the_first_anchor)
{
    expect_error("log:\n  level: &a [lol, lol]\n  b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n",
                 "kasd.yaml:2:10: log.level: anchors are not supported (anchor \"a\")");
}

Test(config, yaml_syntax_errors)
{
    static const struct error_case cases[] = {
        {"shards: 4\nagent:\n  listen:\n    address: \"1.2.3.4:80\n",
         "kasd.yaml:5:1: YAML syntax error: found unexpected end of stream (while scanning a quoted scalar "
         "at 4:14)"},
        {"shards: 4\nlog: {level: info\n", "kasd.yaml:3:1: YAML syntax error: did not find expected ',' or "
                                           "'}' (while parsing a flow mapping at 2:6)"},
        {"shards: 4\n]\n",
         "kasd.yaml:2:1: YAML syntax error: did not find expected key (while parsing a block "
         "mapping at 1:1)"},
        {"log:\n  level: info\n level: debug\n",
         "kasd.yaml:3:2: YAML syntax error: did not find expected key "
         "(while parsing a block mapping at 1:1)"},
        {"shards: 4: 5\n",
         "kasd.yaml:1:10: YAML syntax error: mapping values are not allowed in this context"},
        {"agent:\n\tlisten: {}\n",
         "kasd.yaml:2:1: YAML syntax error: found character that cannot start any token "
         "(while scanning for the next token at 2:1)"},
        /* Reader errors carry only a byte offset; line:col are recomputed from it. */
        {"shards: 4\nlog:\n  level: \xff\n",
         "kasd.yaml:3:10: YAML syntax error: invalid leading UTF-8 octet (0xFF)"},
    };

    EXPECT_ERRORS(cases);
}

Test(config, one_document_only)
{
    expect_error("shards: 1\n---\nshards: 2\n", "kasd.yaml:2:1: only one YAML document is allowed");
    expect_error("---\n...\n---\n", "kasd.yaml:3:1: only one YAML document is allowed");
}

Test(config, values_in_messages_are_escaped_and_truncated)
{
    char long_yaml[256], want[512];
    char x100[101];

    expect_error("shards: \"a\\x01\\\"b\\\\\"\n", "kasd.yaml:1:9: shards: expected a decimal integer, got "
                                                  "\"a\\x01\\\"b\\\\\"");
    /* An escaped newline must not break the one-line message. */
    expect_error("agent:\n  listen:\n    address: \"1.2.3.4:80\\nX\"\n",
                 "kasd.yaml:3:14: agent.listen.address: expected host:port (like 127.0.0.1:8150), got "
                 "\"1.2.3.4:80\\x0aX\"");
    expect_error(
        "log:\n  level: d\xc3\xa9\x62ug\n",
        "kasd.yaml:2:10: log.level: expected one of: debug, info, warn, error, got \"d\\xc3\\xa9bug\"");
    expect_error("log:\n  level: \"x\\0y\"\n",
                 "kasd.yaml:2:10: log.level: must not contain NUL bytes, got \"x\\x00y\"");
    expect_error("agent:\n  token_file: \"/etc/\\0/x\"\n",
                 "kasd.yaml:2:15: agent.token_file: must not contain NUL bytes, got \"/etc/\\x00/x\"");

    memset(x100, 'x', 100);
    x100[100] = '\0';
    snprintf(long_yaml, sizeof(long_yaml), "shards: %s\n", x100);
    snprintf(want, sizeof(want), "kasd.yaml:1:9: shards: expected a decimal integer, got \"%.60s\"...", x100);
    expect_error(long_yaml, want);
    /* Exactly at the cap: no ellipsis. */
    snprintf(long_yaml, sizeof(long_yaml), "shards: %.60s\n", x100);
    snprintf(want, sizeof(want), "kasd.yaml:1:9: shards: expected a decimal integer, got \"%.60s\"", x100);
    expect_error(long_yaml, want);
    /* 60 bytes that all need \xNN still fit the message. */
    snprintf(
        long_yaml, sizeof(long_yaml), "shards: \"%s\"\n",
        "\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01"
        "\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01"
        "\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01"
        "\\x01");
    struct kd_config c;
    char err[1024];

    cr_assert_eq(load(&c, long_yaml, err, sizeof(err)), -EINVAL);
    cr_assert_eq(strlen(err),
                 strlen("kasd.yaml:1:9: shards: expected a decimal integer, got \"\"...") + 60 * 4, "%s",
                 err);
    kd_config_free(&c);
}

Test(config, source_name_is_escaped)
{
    struct kd_config c;
    char err[256];

    cr_assert_eq(kd_config_defaults(&c), 0);
    cr_assert_eq(kd_config_load_string(&c, "a\nb.yaml", "x: 1\n", 5, err, sizeof(err)), -EINVAL);
    cr_assert(strncmp(err, "a\\x0ab.yaml:1:1: x: unknown key", 31) == 0, "%s", err);
    kd_config_free(&c);
}

Test(config, small_or_missing_error_buffer)
{
    struct kd_config c;
    char err[10];

    cr_assert_eq(kd_config_defaults(&c), 0);
    memset(err, 'Z', sizeof(err));
    cr_assert_eq(kd_config_load_string(&c, NAME, "shards: x\n", 10, err, sizeof(err)), -EINVAL);
    cr_assert_str_eq(err, "kasd.yaml");
    cr_assert_eq(kd_config_load_string(&c, NAME, "shards: x\n", 10, NULL, 0), -EINVAL);
    cr_assert_eq(kd_config_load_string(&c, NAME, "shards: x\n", 10, err, 0), -EINVAL);
    cr_assert_eq(kd_config_load_string(&c, NAME, "}", 1, err, 1), -EINVAL);
    cr_assert_eq(err[0], '\0');
    kd_config_free(&c);
}

Test(config, length_is_respected)
{
    struct kd_config c;
    char err[256];
    const char *yaml = "shards: 4\nshards: 5\n";

    cr_assert_eq(kd_config_defaults(&c), 0);
    /* Only the first line is given: the duplicate after it is never seen. */
    cr_assert_eq(kd_config_load_string(&c, NAME, yaml, 10, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(c.shards, 4);
    kd_config_free(&c);
}

/* ---------------------------------------------------------------------------------------------- */
/* Files                                                                                           */

static char *write_temp(const char *content, size_t len)
{
    char *path = strdup("/tmp/kasd-config-test-XXXXXX");
    int fd;

    cr_assert_not_null(path);
    fd = mkstemp(path);
    cr_assert_geq(fd, 0);
    cr_assert_eq(write(fd, content, len), (ssize_t)len);
    close(fd);
    return path;
}

Test(config, load_file)
{
    struct kd_config c;
    char err[256] = "";
    char *path = write_temp(full_config, strlen(full_config));

    cr_assert_eq(kd_config_defaults(&c), 0);
    cr_assert_eq(kd_config_load_file(&c, path, err, sizeof(err)), 0, "%s", err);
    cr_assert_str_eq(c.source, path);
    cr_assert_eq(c.shards, 8);
    kd_config_free(&c);
    unlink(path);
    free(path);
}

Test(config, load_file_error_names_the_file)
{
    struct kd_config c;
    char err[256] = "", want[256];
    char *path = write_temp("shards: 4\nlog:\n  level: loud\n", 28);

    cr_assert_eq(kd_config_defaults(&c), 0);
    cr_assert_eq(kd_config_load_file(&c, path, err, sizeof(err)), -EINVAL);
    snprintf(want, sizeof(want),
             "%s:3:10: log.level: expected one of: debug, info, warn, error, got \"loud\"", path);
    cr_assert_str_eq(err, want);
    cr_assert_str_eq(c.source, "<defaults>");
    kd_config_free(&c);
    unlink(path);
    free(path);
}

Test(config, load_file_io_errors)
{
    struct kd_config c;
    char err[256] = "";

    cr_assert_eq(kd_config_defaults(&c), 0);
    cr_assert_eq(kd_config_load_file(&c, "/nonexistent-kasd-dir/kasd.yaml", err, sizeof(err)), -ENOENT);
    cr_assert_str_eq(err, "/nonexistent-kasd-dir/kasd.yaml: cannot read config: No such file or directory");
    cr_assert_eq(kd_config_load_file(&c, "/", err, sizeof(err)), -EISDIR);
    cr_assert_str_eq(err, "/: cannot read config: Is a directory");
    cr_assert_str_eq(c.source, "<defaults>");
    expect_defaults(&c);
    kd_config_free(&c);
}

Test(config, load_file_too_large)
{
    struct kd_config c;
    char err[256] = "", want[256];
    size_t len = 1024 * 1024 + 1;
    char *big = malloc(len);
    char *path;

    cr_assert_not_null(big);
    memset(big, '#', len);
    path = write_temp(big, len);
    cr_assert_eq(kd_config_defaults(&c), 0);
    cr_assert_eq(kd_config_load_file(&c, path, err, sizeof(err)), -EFBIG);
    snprintf(want, sizeof(want), "%s: cannot read config: larger than 1048576 bytes", path);
    cr_assert_str_eq(err, want);
    kd_config_free(&c);
    unlink(path);
    free(path);
    free(big);
}

Test(config, empty_file)
{
    struct kd_config c;
    char err[256] = "";
    char *path = write_temp("", 0);

    cr_assert_eq(kd_config_defaults(&c), 0);
    cr_assert_eq(kd_config_load_file(&c, path, err, sizeof(err)), 0, "%s", err);
    expect_defaults(&c);
    cr_assert_str_eq(c.source, path);
    kd_config_free(&c);
    unlink(path);
    free(path);
}

/* ---------------------------------------------------------------------------------------------- */
/* kd_config_parse_hostport                                                                        */

Test(hostport, valid)
{
    static const struct {
        const char *in;
        int family;
        const char *ip;
        uint16_t port;
    } cases[] = {
        {"1.2.3.4:80", AF_INET, "1.2.3.4", 80},
        {"0.0.0.0:0", AF_INET, "0.0.0.0", 0},
        {"255.255.255.255:65535", AF_INET, "255.255.255.255", 65535},
        {"127.0.0.1:080", AF_INET, "127.0.0.1", 80},
        {"[::1]:80", AF_INET6, "::1", 80},
        {"[::]:0", AF_INET6, "::", 0},
        {"[::ffff:1.2.3.4]:443", AF_INET6, "::ffff:1.2.3.4", 443},
        {"[2001:db8::1]:8150", AF_INET6, "2001:db8::1", 8150},
        {"[2001:0db8:0000:0000:0000:ff00:0042:8329]:1", AF_INET6, "2001:db8::ff00:42:8329", 1},
    };

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct kd_listen_cfg l;

        memset(&l, 0, sizeof(l));
        cr_assert_eq(kd_config_parse_hostport(cases[i].in, &l.addr, &l.addrlen), 0, "%s", cases[i].in);
        if (cases[i].family == AF_INET)
            expect_inet(&l, cases[i].ip, cases[i].port);
        else
            expect_inet6(&l, cases[i].ip, cases[i].port);
    }
}

Test(hostport, invalid)
{
    static const char *cases[] = {
        "",
        ":",
        ":80",
        "1.2.3.4",
        "1.2.3.4:",
        "1.2.3.4:65536",
        "1.2.3.4:100000",
        "1.2.3.4:-1",
        "1.2.3.4:+80",
        "1.2.3.4:80a",
        "1.2.3.4: 80",
        " 1.2.3.4:80",
        "1.2.3.4 :80",
        "localhost:80",
        "example.com:443",
        "::1:80",
        "::1",
        "[::1]",
        "[::1]80",
        "[1.2.3.4]:80",
        "[::1:80",
        "::1]:80",
        "[fe80::1%eth0]:80",
        "1.2.3:80",
        "1.2.3.4.5:80",
        "[]:80",
        "[:80",
        "]:80",
        "1.2.3.256:80",
        "01.2.3.4:80",
        "[1111:2222:3333:4444:5555:6666:7777:8888:9999]:80",
        "[aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa]:80",
        "1111111111111111111111111111111111111111111111111111111111111111111111:80",
        "1.2.3.4:000080",
    };
    struct sockaddr_storage ss;
    socklen_t len = 1234;

    memset(&ss, 0xab, sizeof(ss));
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        cr_assert_eq(kd_config_parse_hostport(cases[i], &ss, &len), -EINVAL, "accepted \"%s\"", cases[i]);
    cr_assert_eq(kd_config_parse_hostport(NULL, &ss, &len), -EINVAL);
    /* Outputs are untouched on failure. */
    cr_assert_eq(len, 1234);
    cr_assert_eq(((unsigned char *)&ss)[0], 0xab);
}

/* ---------------------------------------------------------------------------------------------- */
/* kd_config_parse_duration                                                                        */

Test(duration, valid)
{
    static const struct {
        const char *in;
        uint64_t ms;
    } cases[] = {
        {"0", 0},
        {"0s", 0},
        {"0ms", 0},
        {"250ms", 250},
        {"10s", 10000},
        {"1m30s", 90000},
        {"2h", 7200000},
        {"1h1m1s1ms", 3661001},
        {"1s1m", 61000},
        {"010s", 10000},
        {"1m1ms", 60001},
        {"18446744073709551615ms", UINT64_MAX},
        {"5124095576030h", 5124095576030ull * 3600000ull},
    };

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        uint64_t ms = 42;

        cr_assert_eq(kd_config_parse_duration(cases[i].in, &ms), 0, "%s", cases[i].in);
        cr_assert_eq(ms, cases[i].ms, "%s: %llu", cases[i].in, (unsigned long long)ms);
    }
}

Test(duration, invalid)
{
    static const char *cases[] = {
        "",
        "10",
        "00",
        "s",
        "ms",
        "1.5s",
        "-1s",
        "+1s",
        "1 s",
        " 1s",
        "1s ",
        "1S",
        "1us",
        "1ns",
        "1d",
        "1msx",
        "1sm",
        "1hh",
        "1m30",
        "h1",
        "18446744073709551616ms",
        "5124095576031h",
        "18446744073709551615ms1ms",
        "99999999999999999999999s",
    };
    uint64_t ms = 42;

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        cr_assert_eq(kd_config_parse_duration(cases[i], &ms), -EINVAL, "accepted \"%s\"", cases[i]);
    cr_assert_eq(kd_config_parse_duration(NULL, &ms), -EINVAL);
    cr_assert_eq(ms, 42);
}

Test(config, tls_and_grpc_keys)
{
    struct kd_config c;
    char err[512];
    kd_config_defaults(&c);
    cr_assert_eq(c.agent.listen.max_connection_age_ms, 7200000, "GitLab kas default: 2h");
    cr_assert_eq(c.limits.grpc_max_message_size, 4u << 20);
    static const char ok[] =
        "agent:\n  listen:\n    certificate_file: /c.pem\n    key_file: /k.pem\n"
        "    max_connection_age: 30m\n"
        "private_api:\n  listen:\n    certificate_file: /c.pem\n    key_file: /k.pem\n"
        "    client_ca_file: /ca.pem\n"
        "limits:\n  grpc_max_message_size: 1048576\n  grpc_max_concurrent_streams: 100\n";
    cr_assert_eq(kd_config_load_string(&c, "kasd.yaml", ok, sizeof(ok) - 1, err, sizeof(err)), 0, "%s", err);
    cr_assert_str_eq(c.agent.listen.certificate_file, "/c.pem");
    cr_assert_str_eq(c.private_api.listen.client_ca_file, "/ca.pem");
    cr_assert_eq(c.agent.listen.max_connection_age_ms, 1800000);
    cr_assert_eq(c.limits.grpc_max_message_size, 1048576);
    cr_assert_eq(c.limits.grpc_max_concurrent_streams, 100);
    kd_config_free(&c);

    /* Connection policy of every gRPC listener, and the metadata limit. */
    kd_config_defaults(&c);
    const struct kd_listen_cfg *ls[] = {&c.agent.listen, &c.api.listen, &c.private_api.listen};
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(ls[i]->max_connection_age_ms, i == 0 ? 7200000u : 86400000u, "listener %d", i);
        cr_assert_eq(ls[i]->max_connection_age_grace_ms, 60000);
        cr_assert_eq(ls[i]->keepalive_time_ms, 50000, "GitLab kas: PING after 50 s of silence");
        cr_assert_eq(ls[i]->keepalive_timeout_ms, 20000, "grpc-go's server default");
        cr_assert_eq(ls[i]->keepalive_min_time_ms, 20000, "GitLab kas permits client pings every 20 s");
    }
    cr_assert_eq(c.limits.grpc_max_header_list_size, 1u << 20);
    static const char conn[] = "api:\n  listen:\n    max_connection_age: 0\n    keepalive_time: 1s\n"
                               "    keepalive_timeout: 500ms\n    keepalive_min_time: 100ms\n"
                               "private_api:\n  listen:\n    max_connection_age: 3h\n"
                               "    max_connection_age_grace: 2m\n"
                               "limits:\n  grpc_max_header_list_size: 65536\n";
    cr_assert_eq(kd_config_load_string(&c, "kasd.yaml", conn, sizeof(conn) - 1, err, sizeof(err)), 0, "%s",
                 err);
    cr_assert_eq(c.api.listen.max_connection_age_ms, 0);
    cr_assert_eq(c.api.listen.keepalive_time_ms, 1000);
    cr_assert_eq(c.api.listen.keepalive_timeout_ms, 500);
    cr_assert_eq(c.api.listen.keepalive_min_time_ms, 100);
    cr_assert_eq(c.private_api.listen.max_connection_age_ms, 3u * 3600000u);
    cr_assert_eq(c.private_api.listen.max_connection_age_grace_ms, 120000);
    cr_assert_eq(c.agent.listen.keepalive_time_ms, 50000, "other listeners keep theirs");
    cr_assert_eq(c.limits.grpc_max_header_list_size, 65536);
    static const struct {
        const char *yaml, *want;
    } bad[] = {
        {"agent:\n  listen:\n    keepalive_time: 50ms\n",
         "kasd.yaml:3:21: agent.listen.keepalive_time: must be between 100ms and 86400000ms, got \"50ms\""},
        {"api:\n  listen:\n    keepalive_timeout: 2h\n",
         "kasd.yaml:3:24: api.listen.keepalive_timeout: must be between 100ms and 3600000ms, got \"2h\""},
        {"private_api:\n  listen:\n    max_connection_age_grace: 0\n",
         "kasd.yaml:3:31: private_api.listen.max_connection_age_grace: must be between 1ms and 86400000ms, "
         "got \"0\""},
        {"api:\n  listen:\n    keepalive_min_time: 10\n",
         "kasd.yaml:3:25: api.listen.keepalive_min_time: expected a duration like 250ms, 10s, 1m30s or 2h, "
         "got \"10\""},
        {"limits:\n  grpc_max_header_list_size: 16777217\n",
         "kasd.yaml:2:30: limits.grpc_max_header_list_size: must be between 8192 and 16777216, got "
         "\"16777217\""},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        cr_assert_eq(
            kd_config_load_string(&c, "kasd.yaml", bad[i].yaml, strlen(bad[i].yaml), err, sizeof(err)),
            -EINVAL);
        cr_assert_str_eq(err, bad[i].want);
    }
    kd_config_free(&c);

    kd_config_defaults(&c);
    cr_assert_eq(c.agent.listen.websocket, 1, "WebSocket on the agent listener by default");
    static const char nows[] = "agent:\n  listen:\n    websocket: false\n";
    cr_assert_eq(kd_config_load_string(&c, "kasd.yaml", nows, sizeof(nows) - 1, err, sizeof(err)), 0, "%s",
                 err);
    cr_assert_eq(c.agent.listen.websocket, 0);
    kd_config_free(&c);
    kd_config_defaults(&c);
    static const char badws[] = "agent:\n  listen:\n    websocket: yes\n";
    cr_assert_eq(kd_config_load_string(&c, "kasd.yaml", badws, sizeof(badws) - 1, err, sizeof(err)), -EINVAL);
    cr_assert(strstr(err, "agent.listen.websocket: expected true or false") != NULL, "%s", err);
    kd_config_free(&c);

    kd_config_defaults(&c);
    static const char half[] = "api:\n  listen:\n    certificate_file: /c.pem\n";
    cr_assert_eq(kd_config_load_string(&c, "kasd.yaml", half, sizeof(half) - 1, err, sizeof(err)), -EINVAL);
    cr_assert(strstr(err, "api.listen.key_file: required with certificate_file") != NULL, "%s", err);
    static const char mtls[] = "private_api:\n  listen:\n    client_ca_file: /ca.pem\n";
    cr_assert_eq(kd_config_load_string(&c, "kasd.yaml", mtls, sizeof(mtls) - 1, err, sizeof(err)), -EINVAL);
    cr_assert(strstr(err, "private_api.listen.client_ca_file: needs certificate_file") != NULL, "%s", err);
    kd_config_free(&c);
}

Test(config, redis_secrets_tls_and_sentinel_errors)
{
    char *empty = write_temp("\n", 1);
    char yaml[512];
    static const struct error_case cases[] = {
        {"redis:\n  server: {address: 'r:1'}\n  password_file: /nonexistent/kasd-pw\n",
         "kasd.yaml:3:18: redis.password_file: cannot read \"/nonexistent/kasd-pw\": No such file or "
         "directory"},
        {"redis:\n  server: {address: 'r:1'}\n  read_timeout: 0\n",
         "kasd.yaml:3:17: redis.read_timeout: must be between 1ms and 4294967295ms, got \"0\""},
        {"redis:\n  server: {address: 'r:1'}\n  tls:\n    enabled: yes\n",
         "kasd.yaml:4:14: redis.tls.enabled: expected true or false, got \"yes\""},
        {"redis:\n  server: {address: 'r:1'}\n  tls:\n    certificate_file: /c.pem\n",
         "kasd.yaml:4:5: redis.tls.key_file: required with certificate_file (a client certificate needs its "
         "key)"},
        {"redis:\n  sentinel:\n    master_name: m\n", "kasd.yaml:3:5: redis.sentinel.addresses: required "
                                                      "with master_name (Sentinel needs the master's name "
                                                      "and the sentinels' addresses)"},
        {"redis:\n  sentinel:\n    master_name: m\n    addresses: 'a:1'\n",
         "kasd.yaml:4:16: redis.sentinel.addresses: expected a list of host:port addresses, got a scalar"},
        {"redis:\n  sentinel:\n    master_name: m\n    addresses: [a:1, 'unix:/x']\n",
         "kasd.yaml:4:22: redis.sentinel.addresses: expected host:port (like 127.0.0.1:26379), got "
         "\"unix:/x\""},
        {"redis:\n  sentinel:\n    master_name: m\n    addresses: []\n",
         "kasd.yaml:4:16: redis.sentinel.addresses: must list at least one address"},
    };
    struct kd_config c;

    EXPECT_ERRORS(cases);
    snprintf(yaml, sizeof(yaml), "redis:\n  server: {address: 'r:1'}\n  password_file: %s\n", empty);
    char want[512];
    snprintf(want, sizeof(want), "kasd.yaml:3:18: redis.password_file: \"%s\" is empty", empty);
    expect_error(yaml, want);
    /* a sentinel section alone is a complete redis section; tls: {} turns TLS on */
    expect_ok(&c, "redis:\n  sentinel:\n    master_name: m\n    addresses: [127.0.0.1:26379]\n  tls: {}\n");
    cr_assert(c.redis.configured);
    cr_assert_null(c.redis.address);
    cr_assert_eq(c.redis.sentinel.n_addresses, 1);
    cr_assert_eq(c.redis.tls.enabled, 1);
    kd_config_free(&c);
    expect_ok(&c, "redis:\n  server: {address: 'r:1'}\n  tls: {enabled: false, ca_file: /ca.pem}\n");
    cr_assert_eq(c.redis.tls.enabled, 0);
    kd_config_free(&c);
    unlink(empty);
    free(empty);
}

Test(config, grpc_response_compression)
{
    struct kd_config c;
    kd_config_defaults(&c);
    cr_assert_eq(c.grpc.response_compression, 0, "identity by default");
    kd_config_free(&c);
    expect_ok(&c, "grpc:\n  response_compression: gzip\n");
    cr_assert_eq(c.grpc.response_compression, 1);
    kd_config_free(&c);
    expect_ok(&c, "grpc:\n  response_compression: identity\n");
    cr_assert_eq(c.grpc.response_compression, 0);
    kd_config_free(&c);
    expect_error("grpc:\n  response_compression: snappy\n",
                 "kasd.yaml:2:25: grpc.response_compression: expected identity or gzip, got \"snappy\"");
}

/* ---- kd_config_yaml_check (agent configuration files) ---- */

static int yaml_check(const char *doc, char *err, size_t errlen)
{
    return kd_config_yaml_check("agent.yaml", doc, strlen(doc), err, errlen);
}

Test(config_yaml_check, accepts_mappings_and_empty_documents)
{
    char err[256];
    cr_assert_eq(yaml_check("a: 1\nb: [1, 2]\nc: {d: e}\n", err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(yaml_check("", err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(yaml_check("# only a comment\n", err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(yaml_check("~\n", err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(yaml_check("---\nx: &a 1\ny: *a\n...\n", err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(yaml_check("{\"json\": [true, null]}", err, sizeof(err)), 0, "%s", err);
}

Test(config_yaml_check, syntax_error_has_line_and_column)
{
    char err[256];
    cr_assert_eq(yaml_check("ok: true\nlist: [1, 2\n", err, sizeof(err)), -EINVAL);
    cr_assert(strncmp(err, "agent.yaml:3:1: YAML syntax error: ", 35) == 0, "%s", err);
    cr_assert_eq(yaml_check("a: b\n  c: d\n", err, sizeof(err)), -EINVAL);
    cr_assert(strncmp(err, "agent.yaml:2:4: YAML syntax error: ", 35) == 0, "%s", err);
}

Test(config_yaml_check, top_level_must_be_a_mapping)
{
    char err[256];
    cr_assert_eq(yaml_check("- a\n- b\n", err, sizeof(err)), -EINVAL);
    cr_assert_str_eq(err, "agent.yaml:1:1: expected a mapping at the top level, got a sequence");
    cr_assert_eq(yaml_check("\n  just text\n", err, sizeof(err)), -EINVAL);
    cr_assert_str_eq(err, "agent.yaml:2:3: expected a mapping at the top level, got a scalar");
}

Test(config_yaml_check, one_document_and_bounded_size)
{
    char err[256];
    cr_assert_eq(yaml_check("a: 1\n---\nb: 2\n", err, sizeof(err)), -EINVAL);
    cr_assert_str_eq(err, "agent.yaml:2:1: only one YAML document is allowed");
    size_t n = KD_CONFIG_YAML_DOC_MAX + 1;
    char *big = malloc(n);
    cr_assert_not_null(big);
    memset(big, '#', n);
    cr_assert_eq(kd_config_yaml_check("big.yaml", big, n, err, sizeof(err)), -EFBIG);
    cr_assert_str_eq(err, "big.yaml: larger than 1048576 bytes");
    memset(big, ' ', n - 1);
    cr_assert_eq(kd_config_yaml_check("big.yaml", big, n - 1, err, sizeof(err)), 0, "%s", err);
    free(big);
}

Test(config_keys, gitlab_external_url_and_configuration_dir)
{
    struct kd_config c;
    char err[256];
    cr_assert_eq(kd_config_defaults(&c), 0);
    cr_assert_null(c.gitlab.external_url);
    cr_assert_null(c.agent.configuration_dir);
    const char *y = "gitlab:\n  external_url: https://gitlab.example.com\nagent:\n  configuration_dir: "
                    "/etc/kasd/agents\n";
    cr_assert_eq(kd_config_load_string(&c, "k.yaml", y, strlen(y), err, sizeof(err)), 0, "%s", err);
    cr_assert_str_eq(c.gitlab.external_url, "https://gitlab.example.com");
    cr_assert_str_eq(c.agent.configuration_dir, "/etc/kasd/agents");
    const char *bad = "gitlab:\n  external_uri: x\n";
    cr_assert_eq(kd_config_load_string(&c, "k.yaml", bad, strlen(bad), err, sizeof(err)), -EINVAL);
    cr_assert(strstr(err, "k.yaml:2:3: gitlab") != NULL, "%s", err);
    kd_config_free(&c);
}

/* The fleet's keys and private_api.advertise_address (docs/configuration.md). */
Test(config, fleet_keys)
{
    struct kd_config c;

    cr_assert_eq(kd_config_defaults(&c), 0);
    cr_assert_eq(c.fleet.recheck_ms, 5000);
    cr_assert_eq(c.fleet.route_cache_size, 10000);
    cr_assert_eq(c.fleet.peer_idle_ms, 60000);
    cr_assert_eq(c.fleet.second_delay_ms, 50);
    cr_assert_null(c.fleet.discovery);
    cr_assert_null(c.private_api.advertise_address);
    kd_config_free(&c);

    expect_ok(&c, "fleet:\n  recheck_interval: 2s\n  discovery: poll\n  route_cache_size: 7\n"
                  "  peer_idle_timeout: 90s\n  second_candidate_delay: 20ms\n"
                  "private_api:\n  advertise_address: \"[::1]:8155\"\n");
    /* a wildcard listener with an advertised address, or without the private secret (no fleet) */
    cr_assert_str_eq(c.private_api.advertise_address, "[::1]:8155");
    kd_config_free(&c);
    expect_ok(&c, "private_api:\n  listen:\n    address: 0.0.0.0:8155\n    authentication_secret_file: /s\n"
                  "  advertise_address: 10.1.2.3:8155\n");
    kd_config_free(&c);
    expect_ok(&c, "private_api:\n  listen:\n    address: \"[::]:8155\"\n");
    kd_config_free(&c);
    expect_ok(&c, "fleet:\n  recheck_interval: 2s\n  discovery: poll\n  route_cache_size: 7\n"
                  "  peer_idle_timeout: 90s\n  second_candidate_delay: 20ms\n"
                  "private_api:\n  advertise_address: \"[::1]:8155\"\n");
    cr_assert_eq(c.fleet.recheck_ms, 2000);
    cr_assert_str_eq(c.fleet.discovery, "poll");
    cr_assert_eq(c.fleet.route_cache_size, 7);
    cr_assert_eq(c.fleet.peer_idle_ms, 90000);
    cr_assert_eq(c.fleet.second_delay_ms, 20);
    cr_assert_str_eq(c.private_api.advertise_address, "[::1]:8155");
    kd_config_free(&c);

    static const struct error_case cases[] = {
        {"fleet:\n  discovery: sometimes\n", "kasd.yaml:2:3: fleet.discovery: expected events or poll, got \"sometimes\""},
        {"private_api:\n  advertise_address: kas-1.example:8155\n",
         "kasd.yaml:2:3: private_api.advertise_address: expected a numeric ip:port or [v6]:port that peers can "
         "dial, got \"kas-1.example:8155\""},
        {"private_api:\n  listen:\n    address: 0.0.0.0:8155\n    authentication_secret_file: /s\n",
         "kasd.yaml:2:3: private_api: private_api.listen.address 0.0.0.0:8155 is a wildcard that peers cannot "
         "dial: set private_api.advertise_address to this instance's routable ip:port"},
        {"private_api:\n  advertise_address: 10.0.0.1:0\n  listen:\n    authentication_secret_file: /s\n",
         "kasd.yaml:2:3: private_api.advertise_address: \"10.0.0.1:0\" is not an address peers can dial (a "
         "wildcard or port 0)"},
        {"private_api:\n  client:\n    certificate_file: /c.pem\n",
         "kasd.yaml:2:3: private_api.client.key_file: required with private_api.client.certificate_file"},
        {"private_api:\n  listen:\n    authentication_secret_file: /s\n    certificate_file: /c\n    key_file: /k\n"
         "    client_ca_file: /ca\n",
         "kasd.yaml:2:3: private_api.client.certificate_file: required: the private listener asks peers for a "
         "client certificate (private_api.listen.client_ca_file), and this instance calls its peers there"},
        {"fleet:\n  route_cache_size: 0\n", NULL},
        {"fleet:\n  second_candidate_delay: 0s\n", NULL},
        {"fleet:\n  recheck:\n", "kasd.yaml:2:3: fleet.recheck: unknown key (expected one of: recheck_interval, "
                                 "discovery, route_cache_size, peer_idle_timeout, second_candidate_delay, "
                                 "peer_connect_timeout)"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char err[512] = "";
        cr_assert_neq(load(&c, cases[i].yaml, err, sizeof(err)), 0, "accepted <<%s>>", cases[i].yaml);
        if (cases[i].want != NULL)
            cr_assert_str_eq(err, cases[i].want, "for <<%s>>", cases[i].yaml);
        else
            cr_assert(strstr(err, "fleet.") != NULL, "for <<%s>>: %s", cases[i].yaml, err);
        kd_config_free(&c); /* the defaults load() set */
    }
}

Test(config, kubernetes_api_keys)
{
    struct kd_config c;

    cr_assert_eq(kd_config_defaults(&c), 0);
    cr_assert(!c.kubernetes_api.enabled); /* no section: nothing listens on 8154 */
    cr_assert_str_eq(c.kubernetes_api.listen.address, "127.0.0.1:8154");
    cr_assert_eq(c.kubernetes_api.max_request_body_size, 16u << 20);
    kd_config_free(&c);

    expect_ok(&c, "kubernetes_api: {}\n");
    cr_assert(c.kubernetes_api.enabled);
    cr_assert_null(c.kubernetes_api.url_path_prefix);
    kd_config_free(&c);

    expect_ok(&c, "kubernetes_api:\n  listen:\n    address: 127.0.0.1:0\n    certificate_file: /c.pem\n"
                  "    key_file: /k.pem\n  url_path_prefix: /proxy\n  access_token_file: /a.yaml\n"
                  "  allowed_origins: [https://gitlab.example.com, \"http://localhost:3000\"]\n"
                  "  max_request_body_size: 2048\n");
    cr_assert(c.kubernetes_api.enabled);
    cr_assert_str_eq(c.kubernetes_api.url_path_prefix, "/proxy/"); /* a final / added, as kas does */
    cr_assert_str_eq(c.kubernetes_api.access_token_file, "/a.yaml");
    cr_assert_str_eq(c.kubernetes_api.allowed_origins, "https://gitlab.example.com\nhttp://localhost:3000");
    cr_assert_eq(c.kubernetes_api.n_allowed_origins, 2);
    cr_assert_eq(c.kubernetes_api.max_request_body_size, 2048);
    cr_assert_str_eq(c.kubernetes_api.listen.certificate_file, "/c.pem");
    kd_config_free(&c);

    static const struct error_case cases[] = {
        {"kubernetes_api:\n  url_path_prefix: k8s-proxy\n",
         "kasd.yaml:2:3: kubernetes_api.url_path_prefix: expected a URL path starting with / (like /k8s-proxy/)"},
        {"kubernetes_api:\n  allowed_origins: [gitlab.example.com]\n",
         "kasd.yaml:2:21: kubernetes_api.allowed_origins: expected an origin like https://gitlab.example.com, got "
         "\"gitlab.example.com\""},
        {"kubernetes_api:\n  allowed_origins: [\"https://gitlab.example.com/\"]\n", NULL},
        {"kubernetes_api:\n  allowed_origins: https://x\n",
         "kasd.yaml:2:20: kubernetes_api.allowed_origins: expected a list of origins, got a scalar"},
        {"kubernetes_api:\n  max_request_body_size: 10\n", NULL},
        {"kubernetes_api:\n  listen:\n    certificate_file: /c.pem\n",
         "kasd.yaml:3:5: kubernetes_api.listen.key_file: required with certificate_file (TLS needs a certificate "
         "and its key)"},
        {"kubernetes_api:\n  lisen: {}\n",
         "kasd.yaml:2:3: kubernetes_api.lisen: unknown key (expected one of: listen, url_path_prefix, "
         "access_token_file, allowed_origins, max_request_body_size)"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char err[512] = "";
        cr_assert_neq(load(&c, cases[i].yaml, err, sizeof(err)), 0, "accepted <<%s>>", cases[i].yaml);
        if (cases[i].want != NULL)
            cr_assert_str_eq(err, cases[i].want);
        kd_config_free(&c);
    }
}

/* The HTTP/2 abuse limits (issue 16): defaults are core/h2.h's (what kasd used before they were
 * configurable), every key can be set, and a value out of range is an error naming the key. */
Test(config, h2_abuse_limits)
{
    struct kd_config c;
    char err[512];

    kd_config_defaults(&c);
    cr_assert_eq(c.limits.h2_rapid_reset_burst, 1000);
    cr_assert_eq(c.limits.h2_rapid_reset_rate, 33);
    cr_assert_eq(c.limits.h2_settings_burst, 100);
    cr_assert_eq(c.limits.h2_settings_rate, 10);
    cr_assert_eq(c.limits.h2_ping_strikes, 2);
    cr_assert_eq(c.limits.h2_rapid_reset_burst, KD_H2_RESET_BURST);
    cr_assert_eq(c.limits.h2_rapid_reset_rate, KD_H2_RESET_RATE);
    cr_assert_eq(c.limits.h2_settings_burst, KD_H2_SETTINGS_BURST);
    cr_assert_eq(c.limits.h2_settings_rate, KD_H2_SETTINGS_RATE);
    cr_assert_eq(c.limits.h2_ping_strikes, KD_H2_PING_STRIKES);
    static const char set[] = "limits:\n  h2_rapid_reset_burst: 50\n  h2_rapid_reset_rate: 1\n"
                              "  h2_settings_burst: 2\n  h2_settings_rate: 1000000\n  h2_ping_strikes: 0\n";
    cr_assert_eq(kd_config_load_string(&c, "kasd.yaml", set, sizeof(set) - 1, err, sizeof(err)), 0, "%s",
                 err);
    cr_assert_eq(c.limits.h2_rapid_reset_burst, 50);
    cr_assert_eq(c.limits.h2_rapid_reset_rate, 1);
    cr_assert_eq(c.limits.h2_settings_burst, 2);
    cr_assert_eq(c.limits.h2_settings_rate, 1000000);
    cr_assert_eq(c.limits.h2_ping_strikes, 0);
    cr_assert_eq(c.limits.grpc_max_header_list_size, 1u << 20, "other limits keep theirs");
    kd_config_free(&c);

    static const struct error_case cases[] = {
        {"limits:\n  h2_rapid_reset_burst: 0\n",
         "kasd.yaml:2:25: limits.h2_rapid_reset_burst: must be between 1 and 1000000, got \"0\""},
        {"limits:\n  h2_rapid_reset_burst: 1000001\n",
         "kasd.yaml:2:25: limits.h2_rapid_reset_burst: must be between 1 and 1000000, got \"1000001\""},
        {"limits:\n  h2_rapid_reset_rate: 0\n",
         "kasd.yaml:2:24: limits.h2_rapid_reset_rate: must be between 1 and 1000000, got \"0\""},
        {"limits:\n  h2_settings_burst: 1\n",
         "kasd.yaml:2:22: limits.h2_settings_burst: must be between 2 and 1000000, got \"1\""},
        {"limits:\n  h2_settings_rate: 0\n",
         "kasd.yaml:2:21: limits.h2_settings_rate: must be between 1 and 1000000, got \"0\""},
        {"limits:\n  h2_ping_strikes: 1000001\n",
         "kasd.yaml:2:20: limits.h2_ping_strikes: must be between 0 and 1000000, got \"1000001\""},
        {"limits:\n  h2_ping_strikes: -1\n",
         "kasd.yaml:2:20: limits.h2_ping_strikes: expected a decimal integer, got \"-1\""},
        {"limits:\n  h2_rapid_reset_rate: 33/s\n",
         "kasd.yaml:2:24: limits.h2_rapid_reset_rate: expected a decimal integer, got \"33/s\""},
    };
    EXPECT_ERRORS(cases);
}

Test(config, gitlab_token_source_keys)
{
    struct kd_config c;

    cr_assert_eq(kd_config_defaults(&c), 0);
    cr_assert_null(c.agent.token_source);
    cr_assert_eq(c.gitlab.timeout_ms, 10000);
    cr_assert_eq(c.gitlab.agent_info_cache_ttl_ms, 300000);
    cr_assert_eq(c.gitlab.agent_info_cache_error_ttl_ms, 60000);
    kd_config_free(&c);

    expect_ok(&c, "agent:\n  token_source: gitlab\ngitlab:\n  address: http://gitlab-webservice:8181/prefix\n"
                  "  authentication_secret_file: /s\n  timeout: 2s\n  agent_info_cache_ttl: 10m\n"
                  "  agent_info_cache_error_ttl: 5s\n");
    cr_assert_str_eq(c.agent.token_source, "gitlab");
    cr_assert_str_eq(c.gitlab.address, "http://gitlab-webservice:8181/prefix");
    cr_assert_eq(c.gitlab.timeout_ms, 2000);
    cr_assert_eq(c.gitlab.agent_info_cache_ttl_ms, 600000);
    cr_assert_eq(c.gitlab.agent_info_cache_error_ttl_ms, 5000);
    kd_config_free(&c);

    static const struct error_case cases[] = {
        {"gitlab:\n  address: ftp://gitlab.example.com\n",
         "kasd.yaml:2:3: gitlab.address: expected http://host[:port][/path] or https://..., got "
         "\"ftp://gitlab.example.com\""},
        {"gitlab:\n  address: https://\n", NULL},
        {"gitlab:\n  address: gitlab:8181\n", NULL},
        {"gitlab:\n  timeout: 0s\n", NULL},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char err[512] = "";
        cr_assert_neq(load(&c, cases[i].yaml, err, sizeof(err)), 0, "accepted <<%s>>", cases[i].yaml);
        if (cases[i].want != NULL)
            cr_assert_str_eq(err, cases[i].want);
        kd_config_free(&c);
    }
}
