/* config.c — YAML configuration loader (libyaml event API) and the small parsers it uses.
 *
 * Why the event API and not libyaml's document loader: the loader silently expands aliases into
 * shared nodes (a billion-laughs vector and invisible in the result), while events show every anchor
 * and alias so they can be refused at their exact position. The walk is driven by a static schema
 * (struct field tables below): each mapping event is matched against the table of the section it
 * belongs to, so the descent never goes deeper than the schema (3 levels) whatever the input nests,
 * and the first problem in document order is the one reported.
 *
 * Loads are transactional: the YAML is applied to a deep copy of *c, which replaces *c only when the
 * whole stream parsed and validated; on error *c is left exactly as it was.
 *
 * Policy decisions (documented in docs/configuration.md):
 *  - anchors (&a), aliases (*a) and explicit tags (!!int, !foo) are refused;
 *  - a section written with an empty/null value ("agent:", "limits: ~") is an empty mapping;
 *  - one YAML document per file; an empty stream or empty document means "all defaults";
 *  - integers are plain decimal: no sign, no 0x, no leading zeros (YAML 1.1 would read 010 as octal).
 */
#include "core/config.h"
#include "core/h2.h" /* the defaults of limits.h2_* */
#include "core/secretfile.h"
#include "core/yamlev.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/un.h>
#include <unistd.h>

/* Quoted values in messages show at most this many input bytes, then "...". */
#define VALUE_SHOW_MAX 60
/* A config file is a few hundred bytes; refuse to slurp something that is clearly not one. */
#define FILE_MAX (1024 * 1024)

/* ---------------------------------------------------------------------------------------------- */
/* Small helpers                                                                                  */

static bool is_digit(char ch)
{
    return ch >= '0' && ch <= '9';
}

static bool is_pow2(uint64_t v)
{
    return v != 0 && (v & (v - 1)) == 0;
}

/* Append s[0..n) to dst (capacity cap, current length *len), escaping so the result is one line of
 * printable ASCII: '"' and '\\' are backslashed, anything outside 0x20..0x7e becomes \xNN. Stops
 * (and appends "...") after max input bytes. Always NUL-terminates; never writes past cap. */
static void append_escaped(char *dst, size_t cap, size_t *len, const char *s, size_t n, size_t max)
{
    static const char hex[] = "0123456789abcdef";
    size_t l = *len;

    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        char tmp[4];
        size_t t = 0;

        if (i == max) {
            if (l + 3 < cap) {
                memcpy(dst + l, "...", 3);
                l += 3;
            }
            break;
        }
        if (ch == '"' || ch == '\\') {
            tmp[t++] = '\\';
            tmp[t++] = (char)ch;
        } else if (ch < 0x20 || ch > 0x7e) {
            tmp[t++] = '\\';
            tmp[t++] = 'x';
            tmp[t++] = hex[ch >> 4];
            tmp[t++] = hex[ch & 15];
        } else {
            tmp[t++] = (char)ch;
        }
        if (l + t >= cap)
            break;
        memcpy(dst + l, tmp, t);
        l += t;
    }
    if (cap > 0)
        dst[l < cap ? l : cap - 1] = '\0';
    *len = l;
}

/* "value" quoted and escaped for an error message; the ellipsis goes outside the quotes so the
 * quoted part is always an exact (escaped) prefix of the input. */
static void quote_value(char *dst, size_t cap, const char *s, size_t n)
{
    size_t len = 0;

    /* cap >= 8: room for the quotes, the ellipsis and the NUL is kept back from the escaper. */
    dst[len++] = '"';
    append_escaped(dst, cap - 4, &len, s, n < VALUE_SHOW_MAX ? n : VALUE_SHOW_MAX, SIZE_MAX);
    dst[len++] = '"';
    if (n > VALUE_SHOW_MAX) {
        memcpy(dst + len, "...", 3);
        len += 3;
    }
    dst[len] = '\0';
}

/* ---------------------------------------------------------------------------------------------- */
/* Exported scalar parsers                                                                        */

/* 1..5 decimal digits, at most 65535. Leading zeros are harmless for a port, so they are allowed. */
static int parse_port(const char *s, uint16_t *port)
{
    uint32_t v = 0;
    size_t n = 0;

    for (; is_digit(s[n]); n++) {
        if (n == 5)
            return -EINVAL;
        v = v * 10 + (uint32_t)(s[n] - '0');
    }
    if (n == 0 || s[n] != '\0' || v > 65535)
        return -EINVAL;
    *port = (uint16_t)v;
    return 0;
}

int kd_config_parse_hostport(const char *s, struct sockaddr_storage *ss, socklen_t *len)
{
    char host[INET6_ADDRSTRLEN + 1];
    struct sockaddr_storage tmp;
    const char *colon;
    uint16_t port;
    size_t hl;

    if (!s)
        return -EINVAL;
    colon = strrchr(s, ':');
    if (!colon || parse_port(colon + 1, &port) < 0)
        return -EINVAL;
    hl = (size_t)(colon - s);
    memset(&tmp, 0, sizeof(tmp));

    if (hl >= 2 && s[0] == '[' && s[hl - 1] == ']') {
        /* Only IPv6 goes in brackets; "[1.2.3.4]:80" fails inet_pton(AF_INET6) as it should. Zone
         * ids ("%eth0") are not accepted by inet_pton either; nobody listens on link-local here. */
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&tmp;

        if (hl - 2 >= sizeof(host))
            return -EINVAL;
        memcpy(host, s + 1, hl - 2);
        host[hl - 2] = '\0';
        if (inet_pton(AF_INET6, host, &sin6->sin6_addr) != 1)
            return -EINVAL;
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons(port);
        *len = sizeof(*sin6);
    } else {
        /* Unbracketed: IPv4 only. "::1:80" lands here with host "::1" and fails, which is right:
         * without brackets the port cannot be told apart from the address. */
        struct sockaddr_in *sin = (struct sockaddr_in *)&tmp;

        if (hl >= sizeof(host))
            return -EINVAL;
        memcpy(host, s, hl);
        host[hl] = '\0';
        if (inet_pton(AF_INET, host, &sin->sin_addr) != 1)
            return -EINVAL;
        sin->sin_family = AF_INET;
        sin->sin_port = htons(port);
        *len = sizeof(*sin);
    }
    *ss = tmp;
    return 0;
}

int kd_config_parse_duration(const char *s, uint64_t *ms)
{
    uint64_t total = 0;
    const char *q = s;

    if (!s || !*s)
        return -EINVAL;
    /* Go accepts a unitless zero and nothing else unitless. */
    if (strcmp(s, "0") == 0) {
        *ms = 0;
        return 0;
    }
    while (*q) {
        uint64_t v = 0, mult;
        const char *unit;
        size_t ul;

        if (!is_digit(*q))
            return -EINVAL;
        for (; is_digit(*q); q++) {
            unsigned d = (unsigned)(*q - '0');

            if (v > (UINT64_MAX - d) / 10)
                return -EINVAL;
            v = v * 10 + d;
        }
        /* Like Go, the unit is everything up to the next digit: "1ms" is ms, "1m5s" is m then s. */
        unit = q;
        while (*q && !is_digit(*q))
            q++;
        ul = (size_t)(q - unit);
        if (ul == 2 && memcmp(unit, "ms", 2) == 0)
            mult = 1;
        else if (ul == 1 && *unit == 's')
            mult = 1000;
        else if (ul == 1 && *unit == 'm')
            mult = 60 * 1000;
        else if (ul == 1 && *unit == 'h')
            mult = 60 * 60 * 1000;
        else
            return -EINVAL;
        if (v > UINT64_MAX / mult)
            return -EINVAL;
        v *= mult;
        if (total > UINT64_MAX - v)
            return -EINVAL;
        total += v;
    }
    *ms = total;
    return 0;
}

const char *kd_log_level_name(enum kd_log_level l)
{
    switch (l) {
    case KD_LOG_DEBUG:
        return "debug";
    case KD_LOG_INFO:
        return "info";
    case KD_LOG_WARN:
        return "warn";
    case KD_LOG_ERROR:
        return "error";
    }
    return "unknown";
}

/* ---------------------------------------------------------------------------------------------- */
/* Ownership: every string of a kd_config                                                         */

/* Every heap string a kd_config owns. A new char * member of struct kd_config must be added here,
 * or it will leak on free and be shared (then double-freed) by the transactional copy. */
#define NSTRINGS 55

static void string_slots(struct kd_config *c, char **s[NSTRINGS])
{
    size_t i = 0;

    s[i++] = &c->source;
    s[i++] = &c->agent.listen.address;
    s[i++] = &c->agent.listen.authentication_secret_file;
    s[i++] = &c->agent.token_file;
    s[i++] = &c->agent.configuration_dir;
    s[i++] = &c->gitlab.external_url;
    s[i++] = &c->gitlab.address;
    s[i++] = &c->gitlab.authentication_secret_file;
    s[i++] = &c->gitlab.ca_file;
    s[i++] = &c->agent.token_source;
    s[i++] = &c->api.listen.address;
    s[i++] = &c->api.listen.authentication_secret_file;
    s[i++] = &c->private_api.listen.address;
    s[i++] = &c->private_api.listen.authentication_secret_file;
    s[i++] = &c->private_api.advertise_address;
    s[i++] = &c->private_api.client.ca_file;
    s[i++] = &c->private_api.client.server_name;
    s[i++] = &c->private_api.client.certificate_file;
    s[i++] = &c->private_api.client.key_file;
    s[i++] = &c->fleet.discovery;
    s[i++] = &c->observability.listen.address;
    s[i++] = &c->observability.listen.authentication_secret_file;
    s[i++] = &c->redis.address;
    s[i++] = &c->redis.username;
    s[i++] = &c->redis.password_file;
    s[i++] = &c->redis.key_prefix;
    s[i++] = &c->redis.password;
    s[i++] = &c->redis.tls.ca_file;
    s[i++] = &c->redis.tls.server_name;
    s[i++] = &c->redis.tls.certificate_file;
    s[i++] = &c->redis.tls.key_file;
    s[i++] = &c->redis.sentinel.master_name;
    s[i++] = &c->redis.sentinel.addresses;
    s[i++] = &c->redis.sentinel.password_file;
    s[i++] = &c->redis.sentinel.password;
    s[i++] = &c->kubernetes_api.listen.address;
    s[i++] = &c->kubernetes_api.listen.authentication_secret_file;
    s[i++] = &c->kubernetes_api.url_path_prefix;
    s[i++] = &c->kubernetes_api.access_token_file;
    s[i++] = &c->kubernetes_api.allowed_origins;
    struct kd_listen_cfg *ls[] = {&c->agent.listen, &c->api.listen, &c->private_api.listen,
                                  &c->observability.listen, &c->kubernetes_api.listen};
    for (size_t j = 0; j < 5; j++) {
        s[i++] = &ls[j]->certificate_file;
        s[i++] = &ls[j]->key_file;
        s[i++] = &ls[j]->client_ca_file;
    }
}

void kd_config_free(struct kd_config *c)
{
    char **s[NSTRINGS];

    if (!c)
        return;
    string_slots(c, s);
    for (size_t i = 0; i < NSTRINGS; i++)
        free(*s[i]);
    /* Zeroed, so a second free (or a load into it) is harmless. */
    memset(c, 0, sizeof(*c));
}

/* Deep copy; on failure dst is zeroed and -ENOMEM returned. */
static int config_copy(struct kd_config *dst, const struct kd_config *src)
{
    char **s[NSTRINGS];

    *dst = *src;
    string_slots(dst, s);
    for (size_t i = 0; i < NSTRINGS; i++) {
        char *d;

        if (!*s[i])
            continue;
        d = strdup(*s[i]);
        if (!d) {
            /* The slots from i on still point at src's strings: forget them before freeing. */
            for (size_t j = i; j < NSTRINGS; j++)
                *s[j] = NULL;
            kd_config_free(dst);
            return -ENOMEM;
        }
        *s[i] = d;
    }
    return 0;
}

static int set_listen(struct kd_listen_cfg *l, const char *address)
{
    char *a = strdup(address);

    if (!a)
        return -ENOMEM;
    if (kd_config_parse_hostport(a, &l->addr, &l->addrlen) < 0) {
        free(a);
        return -EINVAL;
    }
    free(l->address);
    l->address = a;
    return 0;
}

int kd_config_defaults(struct kd_config *c)
{
    /* *c may be uninitialised: it is overwritten, never freed. */
    memset(c, 0, sizeof(*c));
    c->shards = 0;
    c->redis.configured = false;
    c->redis.database = 0;
    c->redis.dial_timeout_ms = 5000;
    c->redis.read_timeout_ms = 5000;
    c->redis.write_timeout_ms = 5000;
    c->redis.heartbeat_ms = 10000;
    c->redis.instance_ttl_ms = 30000;
    c->redis.sweep_ms = 30000;
    c->redis.tls.enabled = -1;
    c->limits.connections_per_shard = 65536;
    c->limits.recv_buffers = 1024;
    c->limits.recv_buffer_size = 16384;
    c->limits.router_ring_size = 4096;
    c->limits.shutdown_grace_ms = 10000;
    c->limits.grpc_max_message_size = 4u << 20;
    c->limits.grpc_max_concurrent_streams = 500;
    c->limits.grpc_max_header_list_size = 1u << 20;
    c->limits.h2_rapid_reset_burst = KD_H2_RESET_BURST;
    c->limits.h2_rapid_reset_rate = KD_H2_RESET_RATE;
    c->limits.h2_settings_burst = KD_H2_SETTINGS_BURST;
    c->limits.h2_settings_rate = KD_H2_SETTINGS_RATE;
    c->limits.h2_ping_strikes = KD_H2_PING_STRIKES;
    c->limits.routing_timeout_ms = 20000; /* GitLab kas: 20 s */
    c->fleet.recheck_ms = 5000;
    c->fleet.route_cache_size = 10000;
    c->fleet.peer_idle_ms = 60000;
    c->fleet.second_delay_ms = 50;
    c->fleet.peer_connect_ms = 5000;
    c->limits.pods_per_connection = 16;
    c->limits.pods_per_agent = 1000;
    c->limits.agent_meta_max_size = 16384;
    c->limits.connected_agents_max_size = (4u << 20) - (64u << 10);
    struct kd_listen_cfg *grpc_listeners[] = {&c->agent.listen, &c->api.listen, &c->private_api.listen};
    for (size_t i = 0; i < 3; i++) {
        struct kd_listen_cfg *l = grpc_listeners[i];
        l->max_connection_age_ms = 24u * 3600u * 1000u;
        l->max_connection_age_grace_ms = 60000;
        l->keepalive_time_ms = 50000;     /* GitLab kas: server pings every 50 s of idle */
        l->keepalive_timeout_ms = 20000;  /* grpc-go's server default */
        l->keepalive_min_time_ms = 20000; /* GitLab kas permits client pings every >= 20 s */
    }
    c->agent.listen.max_connection_age_ms = 2u * 3600u * 1000u; /* GitLab kas: 2 h */
    c->agent.listen.websocket = 1; /* agentk's ws:// and wss:// addresses (GitLab.com's default) */
    c->log.level = KD_LOG_INFO;
    c->kubernetes_api.max_request_body_size = 16u << 20;
    c->gitlab.timeout_ms = 10000;                    /* GitLab kas: 10 s per request */
    c->gitlab.agent_info_cache_ttl_ms = 300000;      /* GitLab kas: agent_info_cache_ttl 5 min */
    c->gitlab.agent_info_cache_error_ttl_ms = 60000; /* GitLab kas: agent_info_cache_error_ttl 1 min */

    c->source = strdup("<defaults>");
    c->redis.key_prefix = strdup("gitlab-kas");
    if (!c->source || !c->redis.key_prefix || set_listen(&c->agent.listen, "127.0.0.1:8150") < 0 ||
        set_listen(&c->api.listen, "127.0.0.1:8153") < 0 ||
        set_listen(&c->private_api.listen, "127.0.0.1:8155") < 0 ||
        set_listen(&c->observability.listen, "127.0.0.1:8151") < 0 ||
        set_listen(&c->kubernetes_api.listen, "127.0.0.1:8154") < 0) {
        kd_config_free(c);
        return -ENOMEM;
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------- */
/* Schema                                                                                         */

struct parse;

enum kind {
    K_MAP,         /* a section: sub lists its keys, done (optional) validates it afterwards */
    K_LISTEN,      /* numeric host:port into the struct kd_listen_cfg at off */
    K_STRING,      /* non-empty string into the char * at off */
    K_UINT,        /* decimal integer in [min, max] into the unsigned at off */
    K_POW2,        /* like K_UINT, and a power of two */
    K_DURATION,    /* Go-style duration, in [min, max] milliseconds, into the uint32_t at off */
    K_LOG_LEVEL,   /* debug | info | warn | error into the enum kd_log_level at off */
    K_REDIS_ADDR,  /* host:port (DNS names allowed: redis is dialled, not bound) or unix:/path */
    K_KEY_PREFIX,  /* non-empty, no whitespace or control bytes */
    K_BOOL,        /* true | false into the int at off (1 / 0) */
    K_SECRET,      /* a file name into the char * at off; its contents, read now, into the char * at off2 */
    K_ADDR_LIST,   /* a sequence of K_REDIS_ADDR: '\n'-joined into the char * at off, count at off2 */
    K_COMPRESSION, /* identity | gzip into the unsigned at off (enum kd_compress_alg) */
    K_ORIGIN_LIST, /* a sequence of http(s)://host[:port] origins: '\n'-joined at off, count at off2 */
};

struct field {
    const char *key;
    enum kind kind;
    size_t off;
    uint64_t min, max;
    size_t off2;             /* K_SECRET, K_ADDR_LIST: second destination */
    const struct field *sub; /* K_MAP: NULL-key terminated */
    const char *example;     /* K_LISTEN: shown in the error message */
    int (*done)(struct parse *p, struct kd_yaml_mark at);
};

#define OFF(member) offsetof(struct kd_config, member)
#define LISTEN_ADDRESS(section, ex)                                                                          \
    {                                                                                                        \
        .key = "address", .kind = K_LISTEN, .off = OFF(section.listen), .example = ex                        \
    }
#define SECRET_FILE(section)                                                                                 \
    {                                                                                                        \
        .key = "authentication_secret_file", .kind = K_STRING,                                               \
        .off = OFF(section.listen.authentication_secret_file)                                                \
    }

#define TLS_FILES(section)                                                                                   \
    {.key = "certificate_file", .kind = K_STRING, .off = OFF(section.listen.certificate_file)},              \
    {                                                                                                        \
        .key = "key_file", .kind = K_STRING, .off = OFF(section.listen.key_file)                             \
    }

static int redis_done(struct parse *p, struct kd_yaml_mark at);
static int agent_listen_done(struct parse *p, struct kd_yaml_mark at);
static int api_listen_done(struct parse *p, struct kd_yaml_mark at);
static int private_api_listen_done(struct parse *p, struct kd_yaml_mark at);

/* Connection policy of a gRPC listener: max age (0 = never) and its grace, keepalive PING after
 * keepalive_time of silence, closed when unanswered for keepalive_timeout, client pings closer
 * than keepalive_min_time are strikes. */
#define GRPC_CONN_KEYS(section)                                                                              \
    {.key = "max_connection_age",                                                                            \
     .kind = K_DURATION,                                                                                     \
     .off = OFF(section.listen.max_connection_age_ms),                                                       \
     .min = 0,                                                                                               \
     .max = UINT32_MAX},                                                                                     \
        {.key = "max_connection_age_grace",                                                                  \
         .kind = K_DURATION,                                                                                 \
         .off = OFF(section.listen.max_connection_age_grace_ms),                                             \
         .min = 1,                                                                                           \
         .max = 86400000},                                                                                   \
        {.key = "keepalive_time",                                                                            \
         .kind = K_DURATION,                                                                                 \
         .off = OFF(section.listen.keepalive_time_ms),                                                       \
         .min = 100,                                                                                         \
         .max = 86400000},                                                                                   \
        {.key = "keepalive_timeout",                                                                         \
         .kind = K_DURATION,                                                                                 \
         .off = OFF(section.listen.keepalive_timeout_ms),                                                    \
         .min = 100,                                                                                         \
         .max = 3600000},                                                                                    \
    {                                                                                                        \
        .key = "keepalive_min_time", .kind = K_DURATION, .off = OFF(section.listen.keepalive_min_time_ms),   \
        .min = 1, .max = 86400000                                                                            \
    }

static const struct field agent_listen_keys[] = {
    LISTEN_ADDRESS(agent, "127.0.0.1:8150"),
    TLS_FILES(agent),
    GRPC_CONN_KEYS(agent),
    {.key = "websocket", .kind = K_BOOL, .off = OFF(agent.listen.websocket)},
    {0},
};
static const struct field agent_keys[] = {
    {.key = "listen", .kind = K_MAP, .sub = agent_listen_keys, .done = agent_listen_done},
    {.key = "token_file", .kind = K_STRING, .off = OFF(agent.token_file)},
    {.key = "configuration_dir", .kind = K_STRING, .off = OFF(agent.configuration_dir)},
    {.key = "token_source", .kind = K_STRING, .off = OFF(agent.token_source)},
    {0},
};
static int gitlab_done(struct parse *p, struct kd_yaml_mark at);
static const struct field gitlab_keys[] = {
    {.key = "external_url", .kind = K_STRING, .off = OFF(gitlab.external_url)},
    {.key = "address", .kind = K_STRING, .off = OFF(gitlab.address)},
    {.key = "authentication_secret_file", .kind = K_STRING, .off = OFF(gitlab.authentication_secret_file)},
    {.key = "ca_file", .kind = K_STRING, .off = OFF(gitlab.ca_file)},
    {.key = "timeout", .kind = K_DURATION, .off = OFF(gitlab.timeout_ms), .min = 100, .max = 600000},
    {.key = "agent_info_cache_ttl",
     .kind = K_DURATION,
     .off = OFF(gitlab.agent_info_cache_ttl_ms),
     .min = 1000,
     .max = 86400000},
    {.key = "agent_info_cache_error_ttl",
     .kind = K_DURATION,
     .off = OFF(gitlab.agent_info_cache_error_ttl_ms),
     .min = 1000,
     .max = 86400000},
    {0},
};
static const struct field api_listen_keys[] = {
    LISTEN_ADDRESS(api, "127.0.0.1:8153"), SECRET_FILE(api), TLS_FILES(api), GRPC_CONN_KEYS(api), {0},
};
static const struct field api_keys[] = {
    {.key = "listen", .kind = K_MAP, .sub = api_listen_keys, .done = api_listen_done},
    {0},
};
static const struct field private_api_listen_keys[] = {
    LISTEN_ADDRESS(private_api, "127.0.0.1:8155"),
    SECRET_FILE(private_api),
    TLS_FILES(private_api),
    {.key = "client_ca_file", .kind = K_STRING, .off = OFF(private_api.listen.client_ca_file)},
    GRPC_CONN_KEYS(private_api),
    {0},
};
static const struct field private_api_client_keys[] = {
    {.key = "ca_file", .kind = K_STRING, .off = OFF(private_api.client.ca_file)},
    {.key = "server_name", .kind = K_STRING, .off = OFF(private_api.client.server_name)},
    {.key = "certificate_file", .kind = K_STRING, .off = OFF(private_api.client.certificate_file)},
    {.key = "key_file", .kind = K_STRING, .off = OFF(private_api.client.key_file)},
    {0},
};
static const struct field private_api_keys[] = {
    {.key = "listen", .kind = K_MAP, .sub = private_api_listen_keys, .done = private_api_listen_done},
    {.key = "advertise_address", .kind = K_STRING, .off = OFF(private_api.advertise_address)},
    {.key = "client", .kind = K_MAP, .sub = private_api_client_keys},
    {0},
};
static int private_api_done(struct parse *p, struct kd_yaml_mark at);
static int fleet_done(struct parse *p, struct kd_yaml_mark at);
/* Kas-to-kas routing (docs/operations.md, "Running a fleet"). */
static const struct field fleet_keys[] = {
    {.key = "recheck_interval", .kind = K_DURATION, .off = OFF(fleet.recheck_ms), .min = 100, .max = 3600000},
    {.key = "discovery", .kind = K_STRING, .off = OFF(fleet.discovery)},
    {.key = "route_cache_size",
     .kind = K_UINT,
     .off = OFF(fleet.route_cache_size),
     .min = 1,
     .max = 100000000},
    {.key = "peer_idle_timeout",
     .kind = K_DURATION,
     .off = OFF(fleet.peer_idle_ms),
     .min = 1000,
     .max = 86400000},
    {.key = "second_candidate_delay",
     .kind = K_DURATION,
     .off = OFF(fleet.second_delay_ms),
     .min = 1,
     .max = 60000},
    {.key = "peer_connect_timeout",
     .kind = K_DURATION,
     .off = OFF(fleet.peer_connect_ms),
     .min = 10,
     .max = 600000},
    {0},
};
static const struct field observability_listen_keys[] = {LISTEN_ADDRESS(observability, "127.0.0.1:8151"),
                                                         {0}};
static const struct field observability_keys[] = {
    {.key = "listen", .kind = K_MAP, .sub = observability_listen_keys},
    {0},
};
static int kubernetes_api_done(struct parse *p, struct kd_yaml_mark at);
static int kubernetes_api_listen_done(struct parse *p, struct kd_yaml_mark at);
static const struct field kubernetes_api_listen_keys[] = {
    LISTEN_ADDRESS(kubernetes_api, "127.0.0.1:8154"), TLS_FILES(kubernetes_api), {0}};
static const struct field kubernetes_api_keys[] = {
    {.key = "listen", .kind = K_MAP, .sub = kubernetes_api_listen_keys, .done = kubernetes_api_listen_done},
    {.key = "url_path_prefix", .kind = K_STRING, .off = OFF(kubernetes_api.url_path_prefix)},
    {.key = "access_token_file", .kind = K_STRING, .off = OFF(kubernetes_api.access_token_file)},
    {.key = "allowed_origins",
     .kind = K_ORIGIN_LIST,
     .off = OFF(kubernetes_api.allowed_origins),
     .off2 = OFF(kubernetes_api.n_allowed_origins)},
    {.key = "max_request_body_size",
     .kind = K_UINT,
     .off = OFF(kubernetes_api.max_request_body_size),
     .min = 1024,
     .max = 1073741824},
    {0},
};
static const struct field redis_server_keys[] = {
    {.key = "address", .kind = K_REDIS_ADDR, .off = OFF(redis.address)},
    {0},
};
static int redis_tls_done(struct parse *p, struct kd_yaml_mark at);
static int redis_sentinel_done(struct parse *p, struct kd_yaml_mark at);
static const struct field redis_tls_keys[] = {
    {.key = "enabled", .kind = K_BOOL, .off = OFF(redis.tls.enabled)},
    {.key = "ca_file", .kind = K_STRING, .off = OFF(redis.tls.ca_file)},
    {.key = "server_name", .kind = K_STRING, .off = OFF(redis.tls.server_name)},
    {.key = "certificate_file", .kind = K_STRING, .off = OFF(redis.tls.certificate_file)},
    {.key = "key_file", .kind = K_STRING, .off = OFF(redis.tls.key_file)},
    {0},
};
static const struct field redis_sentinel_keys[] = {
    {.key = "master_name", .kind = K_STRING, .off = OFF(redis.sentinel.master_name)},
    {.key = "addresses",
     .kind = K_ADDR_LIST,
     .off = OFF(redis.sentinel.addresses),
     .off2 = OFF(redis.sentinel.n_addresses)},
    {.key = "password_file",
     .kind = K_SECRET,
     .off = OFF(redis.sentinel.password_file),
     .off2 = OFF(redis.sentinel.password)},
    {0},
};
static const struct field redis_keys[] = {
    {.key = "server", .kind = K_MAP, .sub = redis_server_keys},
    {.key = "username", .kind = K_STRING, .off = OFF(redis.username)},
    {.key = "password_file", .kind = K_SECRET, .off = OFF(redis.password_file), .off2 = OFF(redis.password)},
    {.key = "database", .kind = K_UINT, .off = OFF(redis.database), .min = 0, .max = INT32_MAX},
    {.key = "key_prefix", .kind = K_KEY_PREFIX, .off = OFF(redis.key_prefix)},
    /* 0 would mean "no timeout" to some clients and "fail at once" to others: refuse it. */
    {.key = "dial_timeout",
     .kind = K_DURATION,
     .off = OFF(redis.dial_timeout_ms),
     .min = 1,
     .max = UINT32_MAX},
    {.key = "read_timeout",
     .kind = K_DURATION,
     .off = OFF(redis.read_timeout_ms),
     .min = 1,
     .max = UINT32_MAX},
    {.key = "write_timeout",
     .kind = K_DURATION,
     .off = OFF(redis.write_timeout_ms),
     .min = 1,
     .max = UINT32_MAX},
    /* Fleet tracking (docs/redis.md): the instance's heartbeat, its TTL, the dead-instance sweeper. */
    {.key = "heartbeat_interval",
     .kind = K_DURATION,
     .off = OFF(redis.heartbeat_ms),
     .min = 100,
     .max = 3600000},
    {.key = "instance_ttl",
     .kind = K_DURATION,
     .off = OFF(redis.instance_ttl_ms),
     .min = 300,
     .max = 86400000},
    {.key = "sweep_interval", .kind = K_DURATION, .off = OFF(redis.sweep_ms), .min = 100, .max = 86400000},
    {.key = "tls", .kind = K_MAP, .sub = redis_tls_keys, .done = redis_tls_done},
    {.key = "sentinel", .kind = K_MAP, .sub = redis_sentinel_keys, .done = redis_sentinel_done},
    {0},
};
static const struct field limits_keys[] = {
    {.key = "connections_per_shard",
     .kind = K_UINT,
     .off = OFF(limits.connections_per_shard),
     .min = 1,
     .max = 16777216},
    {.key = "recv_buffers_per_shard",
     .kind = K_POW2,
     .off = OFF(limits.recv_buffers),
     .min = 16,
     .max = 32768},
    {.key = "recv_buffer_size",
     .kind = K_UINT,
     .off = OFF(limits.recv_buffer_size),
     .min = 1024,
     .max = 1048576},
    {.key = "router_ring_size",
     .kind = K_POW2,
     .off = OFF(limits.router_ring_size),
     .min = 64,
     .max = 1048576},
    {.key = "shutdown_grace",
     .kind = K_DURATION,
     .off = OFF(limits.shutdown_grace_ms),
     .min = 0,
     .max = UINT32_MAX},
    {.key = "grpc_max_message_size",
     .kind = K_UINT,
     .off = OFF(limits.grpc_max_message_size),
     .min = 1024,
     .max = 1073741824},
    {.key = "grpc_max_concurrent_streams",
     .kind = K_UINT,
     .off = OFF(limits.grpc_max_concurrent_streams),
     .min = 1,
     .max = 1000000},
    /* Up to 16 MiB (grpc-go's own receive default); at least 8 KiB, so ordinary calls fit. */
    {.key = "grpc_max_header_list_size",
     .kind = K_UINT,
     .off = OFF(limits.grpc_max_header_list_size),
     .min = 8192,
     .max = 16777216},
    /* HTTP/2 abuse limits (core/h2.h): token buckets of a burst and a rate per second; past one,
     * GOAWAY ENHANCE_YOUR_CALM. A rate of 0 would end every long-lived connection sooner or later,
     * and a settings burst under 2 a client that sends its SETTINGS twice: both refused. */
    {.key = "h2_rapid_reset_burst",
     .kind = K_UINT,
     .off = OFF(limits.h2_rapid_reset_burst),
     .min = 1,
     .max = 1000000},
    {.key = "h2_rapid_reset_rate",
     .kind = K_UINT,
     .off = OFF(limits.h2_rapid_reset_rate),
     .min = 1,
     .max = 1000000},
    {.key = "h2_settings_burst",
     .kind = K_UINT,
     .off = OFF(limits.h2_settings_burst),
     .min = 2,
     .max = 1000000},
    {.key = "h2_settings_rate",
     .kind = K_UINT,
     .off = OFF(limits.h2_settings_rate),
     .min = 1,
     .max = 1000000},
    {.key = "h2_ping_strikes", .kind = K_UINT, .off = OFF(limits.h2_ping_strikes), .min = 0, .max = 1000000},
    {.key = "routing_timeout",
     .kind = K_DURATION,
     .off = OFF(limits.routing_timeout_ms),
     .min = 1,
     .max = 3600000},
    /* Pods (Register pod_ids) one agent connection, and one agent on this instance, may hold
     * (docs/configuration.md): each is an entry in Redis and in GetConnectedAgents. */
    {.key = "pods_per_connection",
     .kind = K_UINT,
     .off = OFF(limits.pods_per_connection),
     .min = 1,
     .max = 1000000},
    {.key = "pods_per_agent", .kind = K_UINT, .off = OFF(limits.pods_per_agent), .min = 1, .max = 1000000},
    {.key = "agent_meta_max_size",
     .kind = K_UINT,
     .off = OFF(limits.agent_meta_max_size),
     .min = 256,
     .max = 1048576},
    /* Bytes of one GetConnectedAgentsResponse; at least 1 KiB so one ordinary entry fits. */
    {.key = "connected_agents_max_size",
     .kind = K_UINT,
     .off = OFF(limits.connected_agents_max_size),
     .min = 1024,
     .max = 1073741824},
    {0},
};
static const struct field log_keys[] = {{.key = "level", .kind = K_LOG_LEVEL, .off = OFF(log.level)}, {0}};
static const struct field grpc_keys[] = {
    {.key = "response_compression", .kind = K_COMPRESSION, .off = OFF(grpc.response_compression)},
    {0},
};
static const struct field top_keys[] = {
    {.key = "shards", .kind = K_UINT, .off = OFF(shards), .min = 0, .max = 1024},
    {.key = "agent", .kind = K_MAP, .sub = agent_keys},
    {.key = "api", .kind = K_MAP, .sub = api_keys},
    {.key = "private_api", .kind = K_MAP, .sub = private_api_keys, .done = private_api_done},
    {.key = "fleet", .kind = K_MAP, .sub = fleet_keys, .done = fleet_done},
    {.key = "observability", .kind = K_MAP, .sub = observability_keys},
    {.key = "kubernetes_api", .kind = K_MAP, .sub = kubernetes_api_keys, .done = kubernetes_api_done},
    {.key = "redis", .kind = K_MAP, .sub = redis_keys, .done = redis_done},
    {.key = "gitlab", .kind = K_MAP, .sub = gitlab_keys, .done = gitlab_done},
    {.key = "limits", .kind = K_MAP, .sub = limits_keys},
    {.key = "log", .kind = K_MAP, .sub = log_keys},
    {.key = "grpc", .kind = K_MAP, .sub = grpc_keys},
    {0},
};

/* ---------------------------------------------------------------------------------------------- */
/* The walk                                                                                       */

/* State of one load. ev is the event under consideration (its strings belong to the parser y and are
 * valid until the next next_event() or the end of the load). path is the dotted key of the node
 * being parsed ("" at the top level), already escaped for messages. */
struct parse {
    struct kd_yaml *y;
    struct kd_yaml_event ev;
    struct kd_config *c;
    char name[512]; /* escaped source name */
    char path[256];
    size_t pathlen;
    char *err;
    size_t errlen;
};

static void set_error(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void set_error(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;

    if (!err || errlen == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* "NAME:LINE:COL: PATH: MESSAGE" (PATH and its ": " are left out at the top level). Returns code. */
static int fail_code(struct parse *p, int code, struct kd_yaml_mark at, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int fail_code(struct parse *p, int code, struct kd_yaml_mark at, const char *fmt, ...)
{
    char msg[512];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    set_error(p->err, p->errlen, "%s:%zu:%zu: %s%s%s", p->name, at.line + 1, at.column + 1, p->path,
              p->pathlen ? ": " : "", msg);
    return code;
}

#define fail(p, at, ...) fail_code(p, -EINVAL, at, __VA_ARGS__)

static int fail_oom(struct parse *p, struct kd_yaml_mark at)
{
    return fail_code(p, -ENOMEM, at, "out of memory");
}

/* Push a key onto the dotted path; returns the length to restore with pop. Keys that are not plain
 * identifiers are shown quoted and escaped, so `agent."li sen"` and `agent.""` stay readable. */
static size_t push(struct parse *p, const char *key, size_t n)
{
    size_t saved = p->pathlen;
    bool plain = n > 0;

    for (size_t i = 0; i < n && plain; i++) {
        char ch = key[i];

        plain =
            (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || is_digit(ch) || ch == '_' || ch == '-';
    }
    if (p->pathlen)
        append_escaped(p->path, sizeof(p->path), &p->pathlen, ".", 1, 1);
    if (plain) {
        append_escaped(p->path, sizeof(p->path), &p->pathlen, key, n, VALUE_SHOW_MAX);
    } else {
        char q[4 * VALUE_SHOW_MAX + 8];
        size_t ql;

        quote_value(q, sizeof(q), key, n);
        ql = strlen(q);
        /* Already escaped: copy as is (append_escaped would double the backslashes). */
        if (p->pathlen + ql < sizeof(p->path)) {
            memcpy(p->path + p->pathlen, q, ql + 1);
            p->pathlen += ql;
        }
    }
    return saved;
}

static void pop(struct parse *p, size_t saved)
{
    p->pathlen = saved;
    p->path[saved] = '\0';
}

/* Translate libyaml's error state into our message; the code is decided here, at the boundary. A
 * syntax error belongs to the text, not to a key, so it is reported without the dotted path. */
static int syntax_error(struct parse *p)
{
    struct kd_yaml_error ye;
    char ctx[160] = "";

    kd_yaml_last_error(p->y, &ye);
    const char *problem = ye.problem;
    struct kd_yaml_mark at = ye.at;

    if (ye.kind == KD_YAML_ERR_MEMORY) {
        set_error(p->err, p->errlen, "%s: out of memory", p->name);
        return -ENOMEM;
    }
    if (ye.kind == KD_YAML_ERR_READER) {
        if (ye.byte != -1)
            snprintf(ctx, sizeof(ctx), " (0x%02X)", (unsigned)ye.byte);
    } else if (ye.context) {
        snprintf(ctx, sizeof(ctx), " (%s at %zu:%zu)", ye.context, ye.context_at.line + 1,
                 ye.context_at.column + 1);
    }
    set_error(p->err, p->errlen, "%s:%zu:%zu: YAML syntax error: %s%s", p->name, at.line + 1, at.column + 1,
              problem, ctx);
    return -EINVAL;
}

static const char *event_kind(const struct kd_yaml_event *e)
{
    switch (e->type) {
    case KD_YAML_SCALAR:
        return "a scalar";
    case KD_YAML_SEQUENCE_START:
        return "a sequence";
    case KD_YAML_MAPPING_START:
        return "a mapping";
    case KD_YAML_ALIAS:
        return "an alias";
    default:
        return "nothing";
    }
}

/* Fetch the next event into p->ev, refusing aliases, anchors and explicit tags on sight. */
static int next_event(struct parse *p)
{
    struct kd_yaml_event *e = &p->ev;
    const char *anchor = NULL, *tag = NULL;
    char q[4 * VALUE_SHOW_MAX + 8];

    if (kd_yaml_next(p->y, e) < 0)
        return syntax_error(p);

    switch (e->type) {
    case KD_YAML_ALIAS:
        anchor = e->anchor;
        quote_value(q, sizeof(q), (const char *)anchor, strlen((const char *)anchor));
        return fail(p, e->start_mark, "aliases are not supported (alias %s)", q);
    case KD_YAML_SCALAR:
        anchor = e->anchor;
        tag = e->tag;
        break;
    case KD_YAML_SEQUENCE_START:
        anchor = e->anchor;
        tag = e->tag;
        break;
    case KD_YAML_MAPPING_START:
        anchor = e->anchor;
        tag = e->tag;
        break;
    default:
        break;
    }
    if (anchor) {
        quote_value(q, sizeof(q), (const char *)anchor, strlen((const char *)anchor));
        return fail(p, e->start_mark, "anchors are not supported (anchor %s)", q);
    }
    if (tag) {
        quote_value(q, sizeof(q), (const char *)tag, strlen((const char *)tag));
        return fail(p, e->start_mark, "tags are not supported (tag %s)", q);
    }
    return 0;
}

/* An unquoted empty, "~" or "null" scalar: YAML's null, written e.g. as "agent:" with all of its
 * children commented out. */
static bool is_null(const struct kd_yaml_event *e)
{
    const char *v;

    if (e->type != KD_YAML_SCALAR || !e->plain)
        return false;
    v = (const char *)e->value;
    return !strcmp(v, "") || !strcmp(v, "~") || !strcmp(v, "null") || !strcmp(v, "Null") ||
           !strcmp(v, "NULL");
}

/* Strict decimal: digits only, no leading zero unless "0". -EINVAL on syntax, -ERANGE on overflow. */
static int parse_u64(const char *s, size_t n, uint64_t *out)
{
    uint64_t v = 0;

    if (n == 0 || (n > 1 && s[0] == '0'))
        return -EINVAL;
    for (size_t i = 0; i < n; i++) {
        unsigned d;

        if (!is_digit(s[i]))
            return -EINVAL;
        d = (unsigned)(s[i] - '0');
        if (v > (UINT64_MAX - d) / 10) {
            /* Keep scanning: "99999999999999999999x" is a syntax error, not a range error. */
            for (; i < n; i++)
                if (!is_digit(s[i]))
                    return -EINVAL;
            return -ERANGE;
        }
        v = v * 10 + d;
    }
    *out = v;
    return 0;
}

static bool valid_redis_addr(const char *s)
{
    const char *colon, *h;
    uint16_t port;
    size_t hl;

    if (strncmp(s, "unix:", 5) == 0) {
        const char *path = s + 5;

        return path[0] == '/' && strlen(path) < sizeof(((struct sockaddr_un *)0)->sun_path);
    }
    colon = strrchr(s, ':');
    if (!colon || parse_port(colon + 1, &port) < 0 || port == 0)
        return false;
    hl = (size_t)(colon - s);
    if (hl >= 2 && s[0] == '[' && s[hl - 1] == ']') {
        char host[INET6_ADDRSTRLEN + 1];
        struct in6_addr a6;

        if (hl - 2 >= sizeof(host))
            return false;
        memcpy(host, s + 1, hl - 2);
        host[hl - 2] = '\0';
        return inet_pton(AF_INET6, host, &a6) == 1;
    }
    /* A DNS name or IPv4 literal; resolving it is the redis client's business, at dial time. */
    if (hl == 0 || hl > 253)
        return false;
    for (h = s; h < colon; h++) {
        char ch = *h;

        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || is_digit(ch) || ch == '.' ||
              ch == '-' || ch == '_'))
            return false;
    }
    return true;
}

static int set_string(struct parse *p, char **slot, const char *v, size_t n, struct kd_yaml_mark at)
{
    char *d = strndup(v, n);

    if (!d)
        return fail_oom(p, at);
    free(*slot);
    *slot = d;
    return 0;
}

/* A secret's file is read while loading, so a missing or empty file fails the load (with the key
 * and position) instead of the first connection much later. One trailing newline ("\n" or "\r\n",
 * as editors leave it) is not part of the secret. */
static int read_secret(struct parse *p, const struct field *f, const char *v, size_t n,
                       struct kd_yaml_mark at)
{
    char *base = (char *)p->c, *buf = NULL, got[4 * VALUE_SHOW_MAX + 8];
    size_t len = 0;
    int r;

    quote_value(got, sizeof(got), v, n);
    r = kd_secretfile_read(v, FILE_MAX, &buf, &len);
    if (r < 0)
        return fail(p, at, "cannot read %s: %s", got, r == -EFBIG ? "file too large" : strerror(-r));
    if (len > 0 && buf[len - 1] == '\n')
        len--;
    if (len > 0 && buf[len - 1] == '\r')
        len--;
    if (len == 0 || memchr(buf, '\0', len) != NULL) {
        free(buf);
        return fail(p, at, "%s %s", got, len == 0 ? "is empty" : "contains a NUL byte");
    }
    char *secret = strndup(buf, len);
    memset(buf, 0, len);
    free(buf);
    if (!secret)
        return fail_oom(p, at);
    if ((r = set_string(p, (char **)(base + f->off), v, n, at)) < 0) {
        free(secret);
        return r;
    }
    char **slot = (char **)(base + f->off2);
    free(*slot);
    *slot = secret;
    return 0;
}

/* scheme://host[:port], as browsers send Origin: no path, query, whitespace or control bytes. */
static bool valid_origin(const char *v, size_t n)
{
    size_t s = 0;
    if (n > 7 && memcmp(v, "http://", 7) == 0)
        s = 7;
    else if (n > 8 && memcmp(v, "https://", 8) == 0)
        s = 8;
    else
        return false;
    if (n > 1024)
        return false;
    for (size_t i = s; i < n; i++)
        if (v[i] <= ' ' || v[i] == 0x7f || v[i] == '/' || v[i] == '?' || v[i] == '#')
            return false;
    return true;
}

/* p->ev is a SEQUENCE-START for a K_ADDR_LIST field; consume up to its SEQUENCE-END. The list
 * replaces any earlier layer's list as a whole. */
static int parse_addr_list(struct parse *p, const struct field *f)
{
    char *base = (char *)p->c, *joined = NULL;
    size_t jl = 0;
    unsigned count = 0;
    struct kd_yaml_mark start = p->ev.start_mark;
    int r;

    for (;;) {
        if ((r = next_event(p)) < 0)
            goto out;
        if (p->ev.type == KD_YAML_SEQUENCE_END)
            break;
        const struct kd_yaml_event *e = &p->ev;
        bool origins = f->kind == K_ORIGIN_LIST;
        if (e->type != KD_YAML_SCALAR) {
            r = fail(p, e->start_mark, "expected a list of %s, got %s inside it",
                     origins ? "origins" : "host:port addresses", event_kind(e));
            goto out;
        }
        const char *v = (const char *)e->value;
        size_t n = e->length;
        char got[4 * VALUE_SHOW_MAX + 8];
        quote_value(got, sizeof(got), v, n);
        if (origins) {
            if (!valid_origin(v, n)) {
                r = fail(p, e->start_mark, "expected an origin like https://gitlab.example.com, got %s", got);
                goto out;
            }
        } else if (memchr(v, '\0', n) || strncmp(v, "unix:", 5) == 0 || !valid_redis_addr(v)) {
            r = fail(p, e->start_mark, "expected host:port (like 127.0.0.1:26379), got %s", got);
            goto out;
        }
        char *nj = realloc(joined, jl + n + 2);
        if (!nj) {
            r = fail_oom(p, e->start_mark);
            goto out;
        }
        joined = nj;
        if (jl)
            joined[jl++] = '\n';
        memcpy(joined + jl, v, n);
        jl += n;
        joined[jl] = '\0';
        count++;
    }
    if (count == 0 && f->kind == K_ADDR_LIST) {
        r = fail(p, start, "must list at least one address");
        goto out;
    }
    free(*(char **)(base + f->off));
    *(char **)(base + f->off) = joined;
    *(unsigned *)(base + f->off2) = count;
    return 0;
out:
    free(joined);
    return r;
}

/* p->ev is the scalar for field f. */
static int parse_scalar(struct parse *p, const struct field *f)
{
    const struct kd_yaml_event *e = &p->ev;
    const char *v = (const char *)e->value;
    size_t n = e->length;
    struct kd_yaml_mark at = e->start_mark;
    char *base = (char *)p->c;
    char got[4 * VALUE_SHOW_MAX + 8];
    uint64_t u;
    int r;

    quote_value(got, sizeof(got), v, n);
    /* A double-quoted "\0" puts a NUL inside the value; C strings would silently cut it there. */
    if (memchr(v, '\0', n))
        return fail(p, at, "must not contain NUL bytes, got %s", got);

    switch (f->kind) {
    case K_LISTEN: {
        struct kd_listen_cfg *l = (struct kd_listen_cfg *)(base + f->off);
        struct sockaddr_storage ss;
        socklen_t sl;

        if (kd_config_parse_hostport(v, &ss, &sl) < 0)
            return fail(p, at, "expected host:port (like %s), got %s", f->example, got);
        if ((r = set_string(p, &l->address, v, n, at)) < 0)
            return r;
        l->addr = ss;
        l->addrlen = sl;
        return 0;
    }
    case K_STRING:
        if (n == 0)
            return fail(p, at, "must not be empty");
        return set_string(p, (char **)(base + f->off), v, n, at);
    case K_KEY_PREFIX:
        for (size_t i = 0; i < n; i++)
            if ((unsigned char)v[i] <= 0x20 || (unsigned char)v[i] == 0x7f)
                return fail(p, at, "must not contain spaces or control characters, got %s", got);
        if (n == 0)
            return fail(p, at, "must not be empty");
        return set_string(p, (char **)(base + f->off), v, n, at);
    case K_REDIS_ADDR:
        if (!valid_redis_addr(v))
            return fail(p, at, "expected host:port (like 127.0.0.1:6379) or unix:/path/to/socket, got %s",
                        got);
        return set_string(p, (char **)(base + f->off), v, n, at);
    case K_UINT:
    case K_POW2:
        r = parse_u64(v, n, &u);
        if (r == -EINVAL)
            return fail(p, at, "expected a decimal integer, got %s", got);
        if (f->kind == K_POW2 && (r < 0 || u < f->min || u > f->max || !is_pow2(u)))
            return fail(p, at, "must be a power of two between %llu and %llu, got %s",
                        (unsigned long long)f->min, (unsigned long long)f->max, got);
        if (r < 0 || u < f->min || u > f->max)
            return fail(p, at, "must be between %llu and %llu, got %s", (unsigned long long)f->min,
                        (unsigned long long)f->max, got);
        *(unsigned *)(base + f->off) = (unsigned)u;
        return 0;
    case K_DURATION:
        if (kd_config_parse_duration(v, &u) < 0)
            return fail(p, at, "expected a duration like 250ms, 10s, 1m30s or 2h, got %s", got);
        if (u < f->min || u > f->max)
            return fail(p, at, "must be between %llums and %llums, got %s", (unsigned long long)f->min,
                        (unsigned long long)f->max, got);
        *(uint32_t *)(base + f->off) = (uint32_t)u;
        return 0;
    case K_BOOL:
        if (!strcmp(v, "true")) {
            *(int *)(base + f->off) = 1;
            return 0;
        }
        if (!strcmp(v, "false")) {
            *(int *)(base + f->off) = 0;
            return 0;
        }
        return fail(p, at, "expected true or false, got %s", got);
    case K_SECRET:
        if (n == 0)
            return fail(p, at, "must not be empty");
        return read_secret(p, f, v, n, at);
    case K_ADDR_LIST:
    case K_ORIGIN_LIST:
        break;
    case K_COMPRESSION:
        /* values as grpc-encoding names them (core/compress.h: identity 0, gzip 1) */
        if (!strcmp(v, "identity") || !strcmp(v, "gzip")) {
            *(unsigned *)(base + f->off) = v[0] == 'g' ? 1u : 0u;
            return 0;
        }
        return fail(p, at, "expected identity or gzip, got %s", got);
    case K_LOG_LEVEL: {
        static const enum kd_log_level levels[] = {KD_LOG_DEBUG, KD_LOG_INFO, KD_LOG_WARN, KD_LOG_ERROR};

        for (size_t i = 0; i < sizeof(levels) / sizeof(levels[0]); i++) {
            if (!strcmp(v, kd_log_level_name(levels[i]))) {
                *(enum kd_log_level *)(base + f->off) = levels[i];
                return 0;
            }
        }
        return fail(p, at, "expected one of: debug, info, warn, error, got %s", got);
    }
    case K_MAP:
        break;
    }
    return fail(p, at, "internal error: unhandled field kind");
}

static int parse_map(struct parse *p, const struct field *fields);

/* p->ev is the value node for field f. */
static int parse_value(struct parse *p, const struct field *f)
{
    const struct kd_yaml_event *e = &p->ev;
    struct kd_yaml_mark at = e->start_mark;
    int r;

    if (f->kind == K_ADDR_LIST || f->kind == K_ORIGIN_LIST) {
        if (e->type != KD_YAML_SEQUENCE_START)
            return fail(p, at, "expected a list of %s, got %s",
                        f->kind == K_ADDR_LIST ? "host:port addresses" : "origins", event_kind(e));
        return parse_addr_list(p, f);
    }
    if (f->kind != K_MAP) {
        if (e->type != KD_YAML_SCALAR)
            return fail(p, at, "expected a scalar, got %s", event_kind(e));
        return parse_scalar(p, f);
    }
    if (e->type == KD_YAML_MAPPING_START) {
        if ((r = parse_map(p, f->sub)) < 0)
            return r;
    } else if (!is_null(e)) {
        return fail(p, at, "expected a mapping, got %s", event_kind(e));
    }
    return f->done ? f->done(p, at) : 0;
}

/* p->ev is a MAPPING-START; consume up to and including its MAPPING-END. */
static int parse_map(struct parse *p, const struct field *fields)
{
    struct kd_yaml_mark first[32]; /* where each key of fields was first seen; bit i of seen says it was */
    uint32_t seen = 0;
    int r;

    for (;;) {
        const struct kd_yaml_event *k = &p->ev;
        const char *key;
        size_t kl, i, saved;
        struct kd_yaml_mark at;

        if ((r = next_event(p)) < 0)
            return r;
        if (k->type == KD_YAML_MAPPING_END)
            return 0;
        at = k->start_mark;
        if (k->type != KD_YAML_SCALAR)
            return fail(p, at, "keys must be scalars, got %s", event_kind(k));
        key = (const char *)k->value;
        kl = k->length;
        for (i = 0; fields[i].key; i++)
            if (strlen(fields[i].key) == kl && memcmp(fields[i].key, key, kl) == 0)
                break;
        saved = push(p, key, kl);
        if (!fields[i].key) {
            char expected[448];
            size_t el = 0, nfields = 0;

            /* The tables are short: the list always fits (limits, the longest, is ~300 bytes). */
            expected[0] = '\0';
            for (size_t j = 0; fields[j].key && el < sizeof(expected); j++, nfields++)
                el += (size_t)snprintf(expected + el, sizeof(expected) - el, "%s%s", j ? ", " : "",
                                       fields[j].key);
            return fail(p, at, "unknown key (expected%s%s)", nfields == 1 ? ": " : " one of: ", expected);
        }
        if (seen & (1u << i))
            return fail(p, at, "duplicate key (first given at line %zu)", first[i].line + 1);
        seen |= 1u << i;
        first[i] = at;
        if ((r = next_event(p)) < 0 || (r = parse_value(p, &fields[i])) < 0)
            return r;
        pop(p, saved);
    }
}

/* TLS needs both halves: a certificate without its key (or the reverse) is a mistake, not h2c. */
static int tls_pair_done(struct parse *p, struct kd_yaml_mark at, const struct kd_listen_cfg *l)
{
    size_t saved;
    int r = 0;
    if ((l->certificate_file == NULL) != (l->key_file == NULL)) {
        saved = push(p, l->certificate_file ? "key_file" : "certificate_file", l->certificate_file ? 8 : 16);
        r = fail(p, at, "required with %s (TLS needs a certificate and its key)",
                 l->certificate_file ? "certificate_file" : "key_file");
        pop(p, saved);
    } else if (l->client_ca_file != NULL && l->certificate_file == NULL) {
        saved = push(p, "client_ca_file", 14);
        r = fail(p, at, "needs certificate_file and key_file (client certificates are checked over TLS)");
        pop(p, saved);
    }
    return r;
}

static int agent_listen_done(struct parse *p, struct kd_yaml_mark at)
{
    return tls_pair_done(p, at, &p->c->agent.listen);
}

static int api_listen_done(struct parse *p, struct kd_yaml_mark at)
{
    return tls_pair_done(p, at, &p->c->api.listen);
}

static int private_api_listen_done(struct parse *p, struct kd_yaml_mark at)
{
    return tls_pair_done(p, at, &p->c->private_api.listen);
}

static int kubernetes_api_listen_done(struct parse *p, struct kd_yaml_mark at)
{
    return tls_pair_done(p, at, &p->c->kubernetes_api.listen);
}

/* Peers dial the advertised address as it is: a numeric ip:port (no DNS on the shards). */
/* http(s)://host[:port][/prefix] of GitLab's internal API. */
static int gitlab_done(struct parse *p, struct kd_yaml_mark at)
{
    const char *a = p->c->gitlab.address;
    if (a == NULL)
        return 0;
    size_t sl = strncmp(a, "https://", 8) == 0 ? 8 : strncmp(a, "http://", 7) == 0 ? 7 : 0;
    bool ok = sl > 0 && a[sl] != '\0' && a[sl] != '/';
    for (const char *q = a; ok && *q; q++)
        ok = *q > ' ' && *q < 0x7f && *q != '?' && *q != '#';
    if (!ok) {
        size_t saved = push(p, "address", 7);
        int r = fail(p, at, "expected http://host[:port][/path] or https://..., got \"%s\"", a);
        pop(p, saved);
        return r;
    }
    return 0;
}

static int kubernetes_api_done(struct parse *p, struct kd_yaml_mark at)
{
    p->c->kubernetes_api.enabled = true;
    char *pre = p->c->kubernetes_api.url_path_prefix;
    if (pre == NULL)
        return 0;
    size_t n = strlen(pre);
    bool ok = pre[0] == '/';
    for (size_t i = 0; ok && i < n; i++)
        ok = pre[i] > ' ' && pre[i] < 0x7f && pre[i] != '?' && pre[i] != '#' && pre[i] != '%';
    if (!ok) {
        size_t saved = push(p, "url_path_prefix", 15);
        int r = fail(p, at, "expected a URL path starting with / (like /k8s-proxy/)");
        pop(p, saved);
        return r;
    }
    if (pre[n - 1] != '/') { /* as GitLab kas: the prefix always ends with / */
        char *np = realloc(pre, n + 2);
        if (np == NULL)
            return fail_oom(p, at);
        np[n] = '/';
        np[n + 1] = '\0';
        p->c->kubernetes_api.url_path_prefix = np;
    }
    return 0;
}

static int private_api_done(struct parse *p, struct kd_yaml_mark at)
{
    const char *a = p->c->private_api.advertise_address;
    struct sockaddr_storage ss;
    socklen_t sl;
    int r = 0;
    if (a != NULL && kd_config_parse_hostport(a, &ss, &sl) < 0) {
        size_t saved = push(p, "advertise_address", 17);
        r = fail(p, at, "expected a numeric ip:port or [v6]:port that peers can dial, got \"%s\"", a);
        pop(p, saved);
        return r;
    }
    /* A fleet member (it has the private secret) advertises where peers dial it: a wildcard or a
     * port-0 address is no such place. */
    const struct kd_listen_cfg *l = &p->c->private_api.listen;
    const struct sockaddr_storage *adv = a != NULL ? &ss : &l->addr;
    bool unusable = false;
    if (adv->ss_family == AF_INET) {
        const struct sockaddr_in *v4 = (const struct sockaddr_in *)adv;
        unusable = v4->sin_addr.s_addr == htonl(INADDR_ANY) || (a != NULL && v4->sin_port == 0);
    } else if (adv->ss_family == AF_INET6) {
        const struct sockaddr_in6 *v6 = (const struct sockaddr_in6 *)adv;
        unusable = IN6_IS_ADDR_UNSPECIFIED(&v6->sin6_addr) || (a != NULL && v6->sin6_port == 0);
    }
    /* Peers call this listener as this instance calls theirs: with mTLS on it, a fleet member
     * needs a client certificate; a client certificate needs its key. */
    const char *ccert = p->c->private_api.client.certificate_file, *ckey = p->c->private_api.client.key_file;
    if ((ccert == NULL) != (ckey == NULL)) {
        size_t saved = push(p, "client", 6);
        push(p, ccert == NULL ? "certificate_file" : "key_file", ccert == NULL ? 16 : 8);
        r = fail(p, at, "required with private_api.client.%s",
                 ccert == NULL ? "key_file" : "certificate_file");
        pop(p, saved);
        return r;
    }
    if (l->client_ca_file != NULL && l->authentication_secret_file != NULL && ccert == NULL) {
        size_t saved = push(p, "client", 6);
        push(p, "certificate_file", 16);
        r = fail(p, at,
                 "required: the private listener asks peers for a client certificate "
                 "(private_api.listen.client_ca_file), and this instance calls its peers there");
        pop(p, saved);
        return r;
    }
    if (unusable && l->authentication_secret_file != NULL) {
        if (a != NULL) {
            size_t saved = push(p, "advertise_address", 17);
            r = fail(p, at, "\"%s\" is not an address peers can dial (a wildcard or port 0)", a);
            pop(p, saved);
        } else {
            r = fail(p, at,
                     "private_api.listen.address %s is a wildcard that peers cannot dial: set "
                     "private_api.advertise_address to this instance's routable ip:port",
                     l->address != NULL ? l->address : "");
        }
    }
    return r;
}

static int fleet_done(struct parse *p, struct kd_yaml_mark at)
{
    const char *d = p->c->fleet.discovery;
    int r = 0;
    if (d != NULL && strcmp(d, "events") != 0 && strcmp(d, "poll") != 0) {
        size_t saved = push(p, "discovery", 9);
        r = fail(p, at, "expected events or poll, got \"%s\"", d);
        pop(p, saved);
    }
    return r;
}

/* A tls section turns TLS on unless it says enabled: false; a client certificate needs its key. */
static int redis_tls_done(struct parse *p, struct kd_yaml_mark at)
{
    size_t saved;
    int r = 0;

    if (p->c->redis.tls.enabled < 0)
        p->c->redis.tls.enabled = 1;
    if ((p->c->redis.tls.certificate_file == NULL) != (p->c->redis.tls.key_file == NULL)) {
        bool cert = p->c->redis.tls.certificate_file != NULL;
        saved = push(p, cert ? "key_file" : "certificate_file", cert ? 8 : 16);
        r = fail(p, at, "required with %s (a client certificate needs its key)",
                 cert ? "certificate_file" : "key_file");
        pop(p, saved);
    }
    return r;
}

/* Sentinel needs both the master's name and somewhere to ask for it. */
static int redis_sentinel_done(struct parse *p, struct kd_yaml_mark at)
{
    size_t saved;
    int r = 0;

    if ((p->c->redis.sentinel.master_name == NULL) != (p->c->redis.sentinel.n_addresses == 0)) {
        bool name = p->c->redis.sentinel.master_name != NULL;
        saved = push(p, name ? "addresses" : "master_name", name ? 9 : 11);
        r = fail(p, at, "required with %s (Sentinel needs the master's name and the sentinels' addresses)",
                 name ? "master_name" : "addresses");
        pop(p, saved);
    }
    return r;
}

/* A redis section means "use this external server", which is meaningless without its address
 * (or Sentinel, which tells the address). */
static int redis_done(struct parse *p, struct kd_yaml_mark at)
{
    size_t saved;
    int r;

    p->c->redis.configured = true;
    if (p->c->redis.instance_ttl_ms <= p->c->redis.heartbeat_ms) {
        saved = push(p, "instance_ttl", 12);
        r = fail(p, at, "must be longer than redis.heartbeat_interval (%ums), got %ums",
                 (unsigned)p->c->redis.heartbeat_ms, (unsigned)p->c->redis.instance_ttl_ms);
        pop(p, saved);
        return r;
    }
    if (p->c->redis.address || p->c->redis.sentinel.master_name)
        return 0;
    saved = push(p, "server", 6);
    push(p, "address", 7);
    r = fail(p, at,
             "required when a redis section is given without sentinel (like 127.0.0.1:6379 or "
             "unix:/path/to/socket)");
    pop(p, saved);
    return r;
}

/* STREAM-START, at most one document whose root is a mapping (or null), STREAM-END. */
static int parse_stream(struct parse *p)
{
    int r;

    if ((r = next_event(p)) < 0)
        return r;
    /* STREAM-START, then DOCUMENT-START or (empty stream) STREAM-END. */
    if ((r = next_event(p)) < 0)
        return r;
    if (p->ev.type == KD_YAML_STREAM_END)
        return 0;
    if ((r = next_event(p)) < 0)
        return r;
    if (p->ev.type == KD_YAML_MAPPING_START) {
        if ((r = parse_map(p, top_keys)) < 0)
            return r;
    } else if (!is_null(&p->ev)) {
        return fail(p, p->ev.start_mark, "expected a mapping at the top level, got %s", event_kind(&p->ev));
    }
    /* DOCUMENT-END, then STREAM-END; reading to the end also surfaces trailing syntax errors. */
    if ((r = next_event(p)) < 0 || (r = next_event(p)) < 0)
        return r;
    if (p->ev.type != KD_YAML_STREAM_END)
        return fail(p, p->ev.start_mark, "only one YAML document is allowed");
    return 0;
}

int kd_config_load_string(struct kd_config *c, const char *name, const char *yaml, size_t len, char *err,
                          size_t errlen)
{
    struct kd_config work;
    struct parse *p;
    size_t nl = 0;
    int r;

    if (!name)
        name = "<string>";
    if (!yaml) {
        yaml = "";
        len = 0;
    }
    if (err && errlen)
        err[0] = '\0';
    /* The parse state is ~1 KiB plus libyaml's parser; keep it off the (possibly small) stack. */
    p = calloc(1, sizeof(*p));
    if (!p) {
        set_error(err, errlen, "%s: out of memory", name);
        return -ENOMEM;
    }
    if (config_copy(&work, c) < 0) {
        free(p);
        set_error(err, errlen, "%s: out of memory", name);
        return -ENOMEM;
    }
    p->c = &work;
    p->err = err;
    p->errlen = errlen;
    append_escaped(p->name, sizeof(p->name), &nl, name, strlen(name), sizeof(p->name) / 4 - 4);
    if ((p->y = kd_yaml_new(yaml, len, false)) == NULL) {
        kd_config_free(&work);
        free(p);
        set_error(err, errlen, "%s: out of memory", name);
        return -ENOMEM;
    }

    r = parse_stream(p);
    if (r == 0) {
        char *src = strdup(name);

        if (src) {
            free(work.source);
            work.source = src;
        } else {
            r = -ENOMEM;
            set_error(err, errlen, "%s: out of memory", name);
        }
    }
    kd_yaml_free(p->y);
    free(p);

    if (r < 0) {
        kd_config_free(&work);
        return r;
    }
    kd_config_free(c);
    *c = work;
    return 0;
}

int kd_config_load_file(struct kd_config *c, const char *path, char *err, size_t errlen)
{
    char name[512];
    size_t nl = 0, len = 0;
    char *buf = NULL;
    int r;

    r = kd_secretfile_read(path, FILE_MAX, &buf, &len);
    if (r < 0) {
        append_escaped(name, sizeof(name), &nl, path, strlen(path), sizeof(name) / 4 - 4);
        if (r == -EFBIG)
            set_error(err, errlen, "%s: cannot read config: larger than %d bytes", name, FILE_MAX);
        else
            set_error(err, errlen, "%s: cannot read config: %s", name, strerror(-r));
        return r;
    }
    r = kd_config_load_string(c, path, buf, len, err, errlen);
    free(buf);
    return r;
}

/* ---------------------------------------------------------------------------------------------- */
/* A YAML document checked for well-formedness only (agent configuration files)                   */

/* Events are pulled one by one and dropped at the next one, so memory stays at libyaml's token queue and
 * nesting stack (both bounded by the input, itself bounded by KD_CONFIG_YAML_DOC_MAX). Anchors and
 * aliases are accepted: nothing is expanded, so they cost nothing here. */
int kd_config_yaml_check(const char *name, const char *buf, size_t len, char *err, size_t errlen)
{
    struct parse *p;
    size_t nl = 0;
    int r = 0, depth = 0, docs = 0;
    bool root_seen = false;

    if (!name)
        name = "<string>";
    if (err && errlen)
        err[0] = '\0';
    if (len > KD_CONFIG_YAML_DOC_MAX) {
        set_error(err, errlen, "%s: larger than %u bytes", name, KD_CONFIG_YAML_DOC_MAX);
        return -EFBIG;
    }
    if (!buf) {
        buf = "";
        len = 0;
    }
    p = calloc(1, sizeof(*p));
    if (!p) {
        set_error(err, errlen, "%s: out of memory", name);
        return -ENOMEM;
    }
    p->err = err;
    p->errlen = errlen;
    append_escaped(p->name, sizeof(p->name), &nl, name, strlen(name), sizeof(p->name) / 4 - 4);
    if ((p->y = kd_yaml_new(buf, len, false)) == NULL) {
        free(p);
        set_error(err, errlen, "%s: out of memory", name);
        return -ENOMEM;
    }
    for (;;) {
        struct kd_yaml_event *e = &p->ev;

        if (kd_yaml_next(p->y, e) < 0) {
            r = syntax_error(p);
            break;
        }
        if (e->type == KD_YAML_STREAM_END)
            break;
        if (e->type == KD_YAML_DOCUMENT_START && ++docs > 1) {
            r = fail(p, e->start_mark, "only one YAML document is allowed");
            break;
        }
        if (depth == 0 && !root_seen &&
            (e->type == KD_YAML_SCALAR || e->type == KD_YAML_SEQUENCE_START ||
             e->type == KD_YAML_MAPPING_START || e->type == KD_YAML_ALIAS)) {
            root_seen = true;
            if (e->type != KD_YAML_MAPPING_START && !is_null(e)) {
                r = fail(p, e->start_mark, "expected a mapping at the top level, got %s", event_kind(e));
                break;
            }
        }
        if (e->type == KD_YAML_MAPPING_START || e->type == KD_YAML_SEQUENCE_START)
            depth++;
        else if (e->type == KD_YAML_MAPPING_END || e->type == KD_YAML_SEQUENCE_END)
            depth--;
        else if (e->type == KD_YAML_DOCUMENT_END)
            root_seen = false;
    }
    kd_yaml_free(p->y);
    free(p);
    return r;
}
