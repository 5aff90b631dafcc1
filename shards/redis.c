/* redis.c — see redis.h. One struct kd_redis per logical connection; each physical connection
 * (to a sentinel or to the server) has a small struct rconn as its kd_conn ctx, holding the RESP
 * reader and the TLS state, so abandoning a connection is just "detach and close": its late
 * completions find rconn->r == NULL and do nothing, and on_close frees it.
 *
 * Commands waiting for replies form a FIFO (struct pending); replies are matched in order. Output
 * of a loop turn is gathered in r->out and handed to the connection once, in on_flush (style.md
 * rule 7): a burst of commands leaves in one write, one TLS record batch.
 *
 * Timers: `retry` (backoff between dials) and `io` (dial deadline while connecting, read/write
 * deadlines while up). The io timer is lazy: it is armed for the oldest outstanding deadline and,
 * when it fires, recomputes; replies never touch it, so 10k pipelined replies cost no timer work.
 *
 * Re-entrancy: user callbacks may issue commands or free the connection. Every entry point that
 * can run a user callback brackets it with enter()/leave(); kd_redis_free during a callback marks
 * the struct dead and the outermost leave() frees it. */
#include "shards/redis.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "core/clock.h"
#include "core/config.h"
#include "core/log.h"
#include "core/sha1.h"
#include "core/tls.h"
#include "shards/conn.h"
#include "shards/shard.h"

#define BACKOFF_BASE_MS 100
#define BACKOFF_CAP_MS  5000
#define DEFAULT_TIMEOUT 5000
#define OUT_MAX         (64u << 20) /* r->out beyond this: commands refused with -ENOBUFS */
#define TLS_READ_CHUNK  16384
#define ERR_MAX         320

enum rstate { R_DOWN, R_CONNECTING, R_UP };

enum pkind {
    P_USER,   /* the caller's command: cb(arg, reply) */
    P_SKIP,   /* MULTI and queued commands: the reply is dropped */
    P_SCRIPT, /* EVALSHA: on NOSCRIPT, EVAL again with the stored arguments */
    P_AUTH,   /* handshake steps */
    P_SELECT,
    P_ROLE,
    P_PING,
    P_SETNAME,  /* CLIENT SETNAME: an error is ignored (some proxies refuse it) */
    P_SENTINEL, /* SENTINEL get-master-addr-by-name */
    P_SUB,      /* (un)subscribe confirmations */
};

struct pending {
    struct pending *next;
    kd_redis_cb cb;
    void *arg;
    uint64_t at_ms;
    enum pkind kind;
    /* P_SCRIPT */
    const struct kd_redis_script *sc;
    int nkeys, argc;
    size_t *argvlen;
    char **argv;
};

struct rconn {
    struct kd_redis *r; /* NULL once abandoned */
    struct kd_conn *c;
    struct kd_resp_reader *rd;
    struct kd_tls *tls;
    bool sentinel; /* a connection to a sentinel, asking for the master */
};

struct chan {
    char *name;
    size_t len;
};

struct kd_redis {
    struct kd_shard *s;
    struct kd_redis_hooks h;
    void *arg;

    /* options, copied */
    char *address, *username, *password, *server_name, *sentinel_master, *sentinel_password, *name;
    char *client_name; /* CLIENT SETNAME on every connect (NULL: none) */
    bool in_multi;     /* kd_redis_multi is queueing a transaction */
    char **sentinels;
    unsigned nsentinels;
    unsigned database;
    uint32_t dial_ms, read_ms, write_ms;
    struct kd_tls_ctx *tls;
    bool subscriber;
    size_t max_reply;
    struct kd_redis_stats own_stats, *st;

    enum rstate state;
    struct rconn *rc;      /* the current physical connection, or NULL */
    char target[160];      /* address being dialled or connected: the server, a sentinel, the master */
    char master[160];      /* with Sentinel: the master's address as last reported */
    unsigned sentinel_idx; /* sentinel being asked in this round */
    char sentinel_err[ERR_MAX];
    unsigned handshake_left;
    uint64_t dial_deadline;
    uint64_t out_since; /* output stuck since (0: none pending) */
    size_t out_seen;
    char *out;
    size_t out_len, out_cap;
    struct pending *head, *tail;
    struct kd_timer retry, io;
    unsigned attempt; /* consecutive failures: backoff exponent */
    uint64_t retries; /* dials since the last up (for the redis_up log line) */
    bool down_logged; /* redis_down logged for the current down period */
    uint64_t rng;
    char last_err[ERR_MAX];
    struct chan *chans;
    size_t nchans, capchans;
    int busy;
    bool dead;
    bool stopping;
};

static const struct kd_conn_ops redis_ops;
static void start_dial(struct kd_redis *r);
static void arm_io(struct kd_redis *r);

/* ---- small helpers ---- */

static void enter(struct kd_redis *r)
{
    r->busy++;
}

static void really_free(struct kd_redis *r);

static void leave(struct kd_redis *r)
{
    if (--r->busy == 0 && r->dead)
        really_free(r);
}

static uint64_t now_ms(struct kd_redis *r)
{
    return kd_shard_now_ms(r->s) ? kd_shard_now_ms(r->s) : kd_clock_ms();
}

static char *dupn(const char *s)
{
    return s != NULL ? strdup(s) : NULL;
}

/* A cause in words, lower case, for "redis ADDR: <cause>". */
static void errno_text(int err, char *buf, size_t len)
{
    const char *t = NULL;
    switch (-err) {
    case ECONNREFUSED:
        t = "connection refused";
        break;
    case ETIMEDOUT:
        t = "timeout";
        break;
    case ECONNRESET:
        t = "connection reset by peer";
        break;
    case EPIPE:
        t = "broken pipe";
        break;
    case ENETUNREACH:
        t = "network unreachable";
        break;
    case EHOSTUNREACH:
        t = "host unreachable";
        break;
    case ENOENT:
        t = "no such socket file";
        break;
    case EACCES:
        t = "permission denied";
        break;
    case 0:
        t = "connection closed by server";
        break;
    default:
        break;
    }
    if (t != NULL) {
        snprintf(buf, len, "%s", t);
        return;
    }
    snprintf(buf, len, "%s", strerror(-err));
    if (buf[0] >= 'A' && buf[0] <= 'Z')
        buf[0] = (char)(buf[0] - 'A' + 'a');
}

static uint64_t rnd(struct kd_redis *r)
{
    /* xorshift64: jitter only, no need for quality */
    r->rng ^= r->rng << 13;
    r->rng ^= r->rng >> 7;
    r->rng ^= r->rng << 17;
    return r->rng;
}

/* "unix:/path", "1.2.3.4:6379", "[::1]:6379". -EINVAL for anything else (host names). */
static int parse_addr(const char *a, struct sockaddr_storage *ss, socklen_t *len)
{
    memset(ss, 0, sizeof(*ss));
    if (strncmp(a, "unix:", 5) == 0) {
        struct sockaddr_un *un = (struct sockaddr_un *)ss;
        size_t pl = strlen(a + 5);
        if (pl == 0 || pl >= sizeof(un->sun_path))
            return -EINVAL;
        un->sun_family = AF_UNIX;
        memcpy(un->sun_path, a + 5, pl + 1);
        *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + pl + 1);
        return 0;
    }
    return kd_config_parse_hostport(a, ss, len);
}

static void log_event(struct kd_redis *r, enum kd_log_level lvl, const char *event, const char *reason)
{
    struct kd_logline l;
    kd_log_begin(&l, lvl, event);
    kd_log_str(&l, "connection", r->name);
    kd_log_str(&l, "address", r->target[0] ? r->target : r->address);
    if (r->sentinel_master != NULL)
        kd_log_str(&l, "sentinel_master", r->sentinel_master);
    if (reason != NULL)
        kd_log_str(&l, "reason", reason);
    kd_log_uint(&l, "retries", r->retries);
    kd_log_end(&l);
}

/* ---- output ---- */

static int out_append(struct kd_redis *r, const char *data, size_t len)
{
    if (r->out_len + len > r->out_cap) {
        size_t ncap = r->out_cap ? r->out_cap : 4096;
        while (ncap < r->out_len + len)
            ncap *= 2;
        char *n = realloc(r->out, ncap);
        if (n == NULL)
            return -ENOMEM;
        r->out = n;
        r->out_cap = ncap;
    }
    memcpy(r->out + r->out_len, data, len);
    r->out_len += len;
    if (r->rc != NULL)
        kd_conn_want_flush(r->rc->c);
    return 0;
}

static int out_cmd(struct kd_redis *r, int argc, const char *const *argv, const size_t *argvlen)
{
    size_t len;
    char *cmd = kd_resp_format(argc, argv, argvlen, &len);
    if (cmd == NULL)
        return -ENOMEM;
    int rc = out_append(r, cmd, len);
    free(cmd);
    return rc;
}

static int drain_tls(struct rconn *rc)
{
    uint8_t buf[16384];
    while (kd_tls_output_pending(rc->tls) > 0) {
        size_t n = kd_tls_take_output(rc->tls, buf, sizeof(buf));
        int e = kd_conn_write(rc->c, buf, n);
        if (e < 0)
            return e;
    }
    return 0;
}

/* ---- pending FIFO ---- */

static struct pending *pending_push(struct kd_redis *r, enum pkind kind, kd_redis_cb cb, void *arg)
{
    struct pending *p = calloc(1, sizeof(*p));
    if (p == NULL)
        return NULL;
    p->kind = kind;
    p->cb = cb;
    p->arg = arg;
    p->at_ms = now_ms(r);
    if (r->tail != NULL)
        r->tail->next = p;
    else
        r->head = p;
    r->tail = p;
    return p;
}

static struct pending *pending_pop(struct kd_redis *r)
{
    struct pending *p = r->head;
    if (p != NULL) {
        r->head = p->next;
        if (r->head == NULL)
            r->tail = NULL;
    }
    return p;
}

static void pending_free(struct pending *p)
{
    free(p->argv); /* one block with argvlen and the bytes */
    free(p);
}

static bool user_kind(enum pkind k)
{
    return k == P_USER || k == P_SCRIPT;
}

/* Fail every pending command with err (callbacks run; they may issue new commands, which see the
 * connection already down and fail at once). */
static void fail_all(struct kd_redis *r, const char *err)
{
    struct pending *list = r->head;
    r->head = r->tail = NULL;
    while (list != NULL) {
        struct pending *p = list;
        list = p->next;
        if (user_kind(p->kind)) {
            kd_stat_inc(&r->st->errors);
            if (p->cb != NULL)
                p->cb(p->arg, NULL, err);
        }
        pending_free(p);
    }
}

/* ---- connection state ---- */

/* Detach and close the current physical connection (if any). Handshake entries die with it; the
 * caller's commands stay queued for fail_all (their error names the cause). */
static void abandon(struct kd_redis *r)
{
    struct rconn *rc = r->rc;
    struct pending **pp = &r->head;
    r->tail = NULL;
    while (*pp != NULL) {
        struct pending *p = *pp;
        if (user_kind(p->kind) || p->kind == P_SKIP) {
            r->tail = p;
            pp = &p->next;
        } else {
            *pp = p->next;
            pending_free(p);
        }
    }
    r->rc = NULL;
    r->out_len = 0;
    r->out_since = 0;
    r->handshake_left = 0;
    kd_timerwheel_cancel(kd_shard_timers(r->s), &r->io);
    if (rc != NULL) {
        rc->r = NULL;
        kd_conn_close(rc->c, -ECONNABORTED);
    }
}

static void schedule_retry(struct kd_redis *r)
{
    if (r->stopping || r->dead || r->s->stopping)
        return;
    uint64_t d = BACKOFF_BASE_MS;
    for (unsigned i = 0; i < r->attempt && d < BACKOFF_CAP_MS; i++)
        d *= 2;
    if (d > BACKOFF_CAP_MS)
        d = BACKOFF_CAP_MS;
    if (r->attempt < 32)
        r->attempt++;
    /* Full jitter over the upper half: a fleet that lost Redis together does not return together. */
    d = d / 2 + rnd(r) % (d / 2 + 1);
    kd_timerwheel_add(kd_shard_timers(r->s), &r->retry, now_ms(r) + d);
}

/* The connection (or the attempt) failed: reason is the cause without the address. */
static void conn_fail(struct kd_redis *r, const char *reason)
{
    bool was_up = r->state == R_UP;
    abandon(r);
    r->state = R_DOWN;
    atomic_store_explicit(&r->st->up, 0, memory_order_relaxed);
    snprintf(r->last_err, sizeof(r->last_err), "redis %s: %s", r->target[0] ? r->target : r->address, reason);
    if (!r->down_logged) {
        log_event(r, KD_LOG_WARN, "redis_down", r->last_err);
        r->down_logged = true;
    }
    enter(r);
    fail_all(r, r->last_err);
    if (was_up && r->h.on_down != NULL && !r->dead)
        r->h.on_down(r->arg, r->last_err);
    schedule_retry(r);
    leave(r);
}

static void go_up(struct kd_redis *r)
{
    r->state = R_UP;
    r->attempt = 0;
    atomic_store_explicit(&r->st->up, 1, memory_order_relaxed);
    log_event(r, KD_LOG_INFO, "redis_up", NULL);
    r->retries = 0;
    r->down_logged = false;
    r->last_err[0] = '\0';
    kd_timerwheel_cancel(kd_shard_timers(r->s), &r->io);
    /* Subscriptions first, so nothing published after on_up's re-publishing is missed. */
    for (size_t i = 0; i < r->nchans; i++) {
        const char *argv[] = {"SUBSCRIBE", r->chans[i].name};
        size_t lens[] = {9, r->chans[i].len};
        if (pending_push(r, P_SUB, NULL, NULL) == NULL || out_cmd(r, 2, argv, lens) < 0) {
            conn_fail(r, "out of memory re-subscribing");
            return;
        }
    }
    arm_io(r);
    if (r->h.on_up != NULL)
        r->h.on_up(r->arg);
}

/* Queue a handshake command (before UP; replies are checked in order). */
static int hs_cmd(struct kd_redis *r, enum pkind kind, int argc, const char *const *argv)
{
    size_t lens[8];
    for (int i = 0; i < argc; i++)
        lens[i] = strlen(argv[i]);
    if (pending_push(r, kind, NULL, NULL) == NULL)
        return -ENOMEM;
    r->handshake_left++;
    return out_cmd(r, argc, argv, lens);
}

static void dial(struct kd_redis *r, const char *addr, bool sentinel)
{
    struct sockaddr_storage ss;
    socklen_t sl;
    snprintf(r->target, sizeof(r->target), "%s", addr);
    r->state = R_CONNECTING;
    if (parse_addr(addr, &ss, &sl) < 0) {
        conn_fail(r, "host name not resolved: kasd resolves Redis host names once at start, and a shard "
                     "never blocks on DNS (give an IP address, or check the start log)");
        return;
    }
    struct rconn *rc = calloc(1, sizeof(*rc));
    if (rc == NULL || (rc->rd = kd_resp_reader_new(r->max_reply)) == NULL) {
        free(rc);
        conn_fail(r, "out of memory");
        return;
    }
    rc->r = r;
    rc->sentinel = sentinel;
    if (r->tls != NULL && !sentinel) {
        const char *sn = r->server_name;
        char host[160];
        if (sn == NULL) { /* the host part of the address, without brackets */
            snprintf(host, sizeof(host), "%s", addr[0] == '[' ? addr + 1 : addr);
            char *colon = strrchr(host, addr[0] == '[' ? ']' : ':');
            if (colon != NULL)
                *colon = '\0';
            sn = host;
        }
        rc->tls = kd_tls_new(r->tls, sn);
        if (rc->tls == NULL || kd_tls_connect(rc->tls) < 0) {
            if (rc->tls)
                kd_tls_free(rc->tls);
            kd_resp_reader_free(rc->rd);
            free(rc);
            conn_fail(r, "TLS set-up failed");
            return;
        }
    }
    rc->c = kd_conn_connect(r->s, (struct sockaddr *)&ss, sl, &redis_ops, rc);
    if (rc->c == NULL) {
        if (rc->tls)
            kd_tls_free(rc->tls);
        kd_resp_reader_free(rc->rd);
        free(rc);
        conn_fail(r, "no free connection slot or socket (limits.connections_per_shard, ulimit -n)");
        return;
    }
    r->rc = rc;
    r->dial_deadline = now_ms(r) + r->dial_ms;
    if (rc->tls != NULL && drain_tls(rc) < 0) {
        conn_fail(r, "TLS set-up failed");
        return;
    }
    int e = 0;
    if (sentinel) {
        if (r->sentinel_password != NULL) {
            const char *a[] = {"AUTH", r->sentinel_password};
            e = hs_cmd(r, P_AUTH, 2, a);
        }
        const char *q[] = {"SENTINEL", "get-master-addr-by-name", r->sentinel_master};
        if (e == 0)
            e = hs_cmd(r, P_SENTINEL, 3, q);
    } else {
        if (r->password != NULL && r->username != NULL) {
            const char *a[] = {"AUTH", r->username, r->password};
            e = hs_cmd(r, P_AUTH, 3, a);
        } else if (r->password != NULL) {
            const char *a[] = {"AUTH", r->password};
            e = hs_cmd(r, P_AUTH, 2, a);
        }
        if (e == 0 && r->database != 0) {
            char db[16];
            snprintf(db, sizeof(db), "%u", r->database);
            const char *a[] = {"SELECT", db};
            e = hs_cmd(r, P_SELECT, 2, a);
        }
        if (e == 0 && r->client_name != NULL) {
            const char *a[] = {"CLIENT", "SETNAME", r->client_name};
            e = hs_cmd(r, P_SETNAME, 3, a);
        }
        if (e == 0) {
            /* ROLE with Sentinel (a demoted master must not be used); PING otherwise, so "up" means
             * the server answered (TLS verified, auth accepted) and not merely that TCP connected. */
            const char *role[] = {"ROLE"}, *ping[] = {"PING"};
            e = r->sentinel_master != NULL ? hs_cmd(r, P_ROLE, 1, role) : hs_cmd(r, P_PING, 1, ping);
        }
    }
    if (e < 0) {
        conn_fail(r, "out of memory");
        return;
    }
    arm_io(r);
}

static void start_dial(struct kd_redis *r)
{
    if (r->stopping || r->dead || r->s->stopping)
        return;
    if (r->sentinel_master != NULL) {
        r->sentinel_idx = 0;
        r->sentinel_err[0] = '\0';
        dial(r, r->sentinels[0], true);
    } else {
        dial(r, r->address, false);
    }
}

/* A sentinel could not tell us the master: ask the next, or give up for this round. */
static void sentinel_next(struct kd_redis *r, const char *why)
{
    snprintf(r->sentinel_err, sizeof(r->sentinel_err), "sentinel %s: %s", r->target, why);
    abandon(r);
    if (++r->sentinel_idx < r->nsentinels) {
        dial(r, r->sentinels[r->sentinel_idx], true);
        return;
    }
    char reason[ERR_MAX + 64];
    snprintf(reason, sizeof(reason), "no sentinel answered for master \"%s\" (last: %s)", r->sentinel_master,
             r->sentinel_err);
    r->target[0] = '\0';
    snprintf(r->target, sizeof(r->target), "sentinel %s", r->sentinel_master);
    conn_fail(r, reason);
}

static void retry_cb(struct kd_timer *t)
{
    struct kd_redis *r = KD_CONTAINER_OF(t, struct kd_redis, retry);
    kd_stat_inc(&r->st->reconnects);
    r->retries++;
    start_dial(r);
}

/* ---- timeouts ---- */

static void arm_io(struct kd_redis *r)
{
    uint64_t next = UINT64_MAX;
    if (r->rc == NULL)
        return;
    if (r->state != R_UP) {
        next = r->dial_deadline;
    } else {
        if (r->head != NULL)
            next = r->head->at_ms + r->read_ms;
        if (r->out_since != 0 && r->out_since + r->write_ms < next)
            next = r->out_since + r->write_ms;
    }
    if (next == UINT64_MAX)
        return;
    struct kd_timer *t = &r->io;
    if (!kd_timer_is_armed(t) || t->expire_ms > next)
        kd_timerwheel_add(kd_shard_timers(r->s), t, next);
}

/* Track output progress: stuck output (nothing sent for write_ms) is a write timeout. */
static void note_output(struct kd_redis *r)
{
    size_t ob = r->rc != NULL ? r->rc->c->out_bytes : 0;
    if (ob == 0)
        r->out_since = 0;
    else if (r->out_since == 0 || ob < r->out_seen)
        r->out_since = now_ms(r);
    r->out_seen = ob;
}

static void io_cb(struct kd_timer *t)
{
    struct kd_redis *r = KD_CONTAINER_OF(t, struct kd_redis, io);
    uint64_t now = now_ms(r);
    char why[128];
    if (r->rc == NULL)
        return;
    if (r->state != R_UP) {
        if (now >= r->dial_deadline) {
            snprintf(why, sizeof(why), "%s timeout after %u ms", r->rc->c->connecting ? "dial" : "handshake",
                     r->dial_ms);
            if (r->rc->sentinel)
                sentinel_next(r, why);
            else
                conn_fail(r, why);
            return;
        }
    } else {
        note_output(r);
        if (r->head != NULL && now >= r->head->at_ms + r->read_ms) {
            snprintf(why, sizeof(why), "read timeout after %u ms", r->read_ms);
            conn_fail(r, why);
            return;
        }
        if (r->out_since != 0 && now >= r->out_since + r->write_ms) {
            snprintf(why, sizeof(why), "write timeout after %u ms", r->write_ms);
            conn_fail(r, why);
            return;
        }
    }
    arm_io(r);
}

/* ---- replies ---- */

static bool is_str(const struct kd_resp *o, const char *s)
{
    size_t n = strlen(s);
    return o != NULL && (o->type == KD_RESP_STRING || o->type == KD_RESP_STATUS) && o->len == n &&
           strncasecmp(o->str, s, n) == 0;
}

int kd_redis_handshake_reply(enum kd_redis_hs_step step, const struct kd_resp *o, unsigned database,
                             const char *sentinel_master, char *master, size_t mastercap, char *why,
                             size_t whylen)
{
    const char *err = o->type == KD_RESP_ERROR ? o->str : NULL;
    switch (step) {
    case KD_REDIS_HS_AUTH:
        if (err != NULL) {
            snprintf(why, whylen, "authentication failed: %.200s", err);
            return KD_REDIS_HS_FAIL;
        }
        break;
    case KD_REDIS_HS_SELECT:
        if (err != NULL) {
            snprintf(why, whylen, "SELECT %u failed: %.200s", database, err);
            return KD_REDIS_HS_FAIL;
        }
        break;
    case KD_REDIS_HS_PING:
        if (err != NULL) {
            if (strncmp(err, "NOAUTH", 6) == 0 || strncmp(err, "WRONGPASS", 9) == 0)
                snprintf(why, whylen, "authentication failed: %.200s", err);
            else
                snprintf(why, whylen, "PING failed: %.200s", err);
            return KD_REDIS_HS_FAIL;
        }
        break;
    case KD_REDIS_HS_ROLE:
        if (err != NULL || o->type != KD_RESP_ARRAY || o->n < 1 || !is_str(o->elem[0], "master")) {
            if (err != NULL && (strncmp(err, "NOAUTH", 6) == 0 || strncmp(err, "WRONGPASS", 9) == 0))
                snprintf(why, whylen, "authentication failed: %.200s", err);
            else
                snprintf(why, whylen,
                         "ROLE is %.40s, not master (Sentinel's answer is stale: failover in progress?)",
                         err                                                         ? err
                         : (o->type == KD_RESP_ARRAY && o->n > 0 && o->elem[0]->str) ? o->elem[0]->str
                                                                                     : "unknown");
            return KD_REDIS_HS_FAIL;
        }
        break;
    case KD_REDIS_HS_SETNAME: /* an error is ignored: some proxies refuse CLIENT SETNAME */
        break;
    case KD_REDIS_HS_SENTINEL:
        if (err != NULL) {
            /* The error is the whole reason: an empty one (or one starting with NUL) still says something. */
            snprintf(why, whylen, "%.200s", err[0] != '\0' ? err : "empty error reply");
            return KD_REDIS_HS_FAIL;
        }
        if (o->type == KD_RESP_NIL || (o->type == KD_RESP_ARRAY && o->n == 0)) {
            snprintf(why, whylen, "does not know master \"%.100s\"", sentinel_master);
            return KD_REDIS_HS_FAIL;
        }
        if (kd_redis_sentinel_master(o, master, mastercap) < 0) {
            snprintf(why, whylen, "answered an unusable address for master \"%.100s\"", sentinel_master);
            return KD_REDIS_HS_FAIL;
        }
        return KD_REDIS_HS_MASTER;
    }
    return KD_REDIS_HS_NEXT;
}

/* Handshake reply (p->kind is one of the handshake kinds: on_reply sends only those here): false
 * when the connection was failed or moved on. */
static bool handshake_reply(struct kd_redis *r, struct pending *p, const struct kd_resp *o)
{
    static const enum kd_redis_hs_step steps[P_SENTINEL + 1] = {
        [P_AUTH] = KD_REDIS_HS_AUTH, [P_SELECT] = KD_REDIS_HS_SELECT,   [P_ROLE] = KD_REDIS_HS_ROLE,
        [P_PING] = KD_REDIS_HS_PING, [P_SETNAME] = KD_REDIS_HS_SETNAME, [P_SENTINEL] = KD_REDIS_HS_SENTINEL,
    };
    char why[ERR_MAX];
    switch (kd_redis_handshake_reply(steps[p->kind], o, r->database, r->sentinel_master, r->master,
                                     sizeof(r->master), why, sizeof(why))) {
    case KD_REDIS_HS_FAIL:
        /* AUTH and SENTINEL are what a sentinel is asked: its failure means asking the next one. */
        if (r->rc->sentinel)
            sentinel_next(r, why);
        else
            conn_fail(r, why);
        return false;
    case KD_REDIS_HS_MASTER:
        abandon(r);
        dial(r, r->master, false);
        return false; /* this connection is done */
    default:
        break;
    }
    if (--r->handshake_left == 0)
        go_up(r);
    return r->state == R_UP || r->rc != NULL;
}

int kd_redis_sentinel_master(const struct kd_resp *o, char *out, size_t cap)
{
    if (o == NULL || o->type != KD_RESP_ARRAY || o->n != 2 || o->elem[0]->type != KD_RESP_STRING ||
        o->elem[1]->type != KD_RESP_STRING)
        return -1;
    const struct kd_resp *host = o->elem[0], *port = o->elem[1];
    if (host->len == 0 || port->len == 0 || port->len > 5)
        return -1;
    for (size_t i = 0; i < host->len; i++) /* an IP literal or a host name: nothing else */
        if (!((host->str[i] >= '0' && host->str[i] <= '9') || (host->str[i] >= 'a' && host->str[i] <= 'z') ||
              (host->str[i] >= 'A' && host->str[i] <= 'Z') || host->str[i] == '.' || host->str[i] == '-' ||
              host->str[i] == ':' || host->str[i] == '_' || host->str[i] == '%'))
            return -1;
    unsigned p = 0;
    for (size_t i = 0; i < port->len; i++) {
        if (port->str[i] < '0' || port->str[i] > '9')
            return -1;
        p = p * 10 + (unsigned)(port->str[i] - '0');
    }
    if (p == 0 || p > 65535)
        return -1;
    bool v6 = memchr(host->str, ':', host->len) != NULL;
    int n = snprintf(out, cap, v6 ? "[%.*s]:%u" : "%.*s:%u", (int)host->len, host->str, p);
    return n > 0 && (size_t)n < cap ? 0 : -1; /* never a cut address */
}

static void script_fallback(struct kd_redis *r, struct pending *p)
{
    /* EVAL source nkeys args...: also loads the script, so the next EVALSHA finds it. */
    int argc = p->argc + 3;
    const char **argv = malloc((size_t)argc * sizeof(*argv));
    size_t *lens = malloc((size_t)argc * sizeof(*lens));
    char nk[16];
    if (argv == NULL || lens == NULL) {
        free(argv);
        free(lens);
        kd_stat_inc(&r->st->errors);
        if (p->cb)
            p->cb(p->arg, NULL, "out of memory re-sending a script with EVAL");
        return;
    }
    snprintf(nk, sizeof(nk), "%d", p->nkeys);
    argv[0] = "EVAL";
    lens[0] = 4;
    argv[1] = p->sc->source;
    lens[1] = strlen(p->sc->source);
    argv[2] = nk;
    lens[2] = strlen(nk);
    for (int i = 0; i < p->argc; i++) {
        argv[3 + i] = p->argv[i];
        lens[3 + i] = p->argvlen[i];
    }
    int rc = kd_redis_cmd(r, p->cb, p->arg, argc, argv, lens);
    if (rc < 0 && p->cb) {
        kd_stat_inc(&r->st->errors);
        p->cb(p->arg, NULL, "could not re-send a script with EVAL");
    }
    free(argv);
    free(lens);
}

static bool is_push(struct kd_redis *r, const struct kd_resp *o)
{
    if (!r->subscriber || o->type != KD_RESP_ARRAY || o->n < 3)
        return false;
    return (o->n == 3 && is_str(o->elem[0], "message")) || (o->n == 4 && is_str(o->elem[0], "pmessage"));
}

/* One reply. false when the connection changed (failed, moved on): stop reading this one. */
static bool on_reply(struct kd_redis *r, struct rconn *rc, struct kd_resp *o)
{
    if (is_push(r, o)) {
        const struct kd_resp *ch = o->elem[o->n - 2], *msg = o->elem[o->n - 1];
        if (r->h.on_message != NULL && ch->str != NULL && msg->str != NULL)
            r->h.on_message(r->arg, ch->str, ch->len, msg->str, msg->len);
        return r->rc == rc && !r->dead;
    }
    struct pending *p = pending_pop(r);
    if (p == NULL) {
        conn_fail(r, "protocol error: a reply arrived for no command");
        return false;
    }
    bool go_on = true;
    switch (p->kind) {
    case P_USER:
        if (o->type == KD_RESP_ERROR)
            kd_stat_inc(&r->st->errors);
        if (p->cb != NULL)
            p->cb(p->arg, o, NULL);
        break;
    case P_SCRIPT:
        if (o->type == KD_RESP_ERROR && strncmp(o->str, "NOSCRIPT", 8) == 0) {
            script_fallback(r, p);
            break;
        }
        if (o->type == KD_RESP_ERROR)
            kd_stat_inc(&r->st->errors);
        if (p->cb != NULL)
            p->cb(p->arg, o, NULL);
        break;
    case P_SKIP:
        break;
    case P_SUB:
        if (o->type == KD_RESP_ERROR)
            kd_log_msg(KD_LOG_WARN, "redis_subscribe_failed", "%s: %s", r->target, o->str);
        else if (r->h.on_subscribed != NULL && o->type == KD_RESP_ARRAY && o->n == 3 &&
                 is_str(o->elem[0], "subscribe") && o->elem[1]->str != NULL)
            r->h.on_subscribed(r->arg, o->elem[1]->str, o->elem[1]->len);
        break;
    default:
        go_on = handshake_reply(r, p, o);
        break;
    }
    pending_free(p);
    if (r->stopping && r->head == NULL && r->rc != NULL) {
        abandon(r); /* the shard is stopping and nothing is left in flight */
        if (r->state == R_UP)
            atomic_store_explicit(&r->st->up, 0, memory_order_relaxed);
        r->state = R_DOWN;
        return false;
    }
    return go_on && r->rc == rc && !r->dead;
}

/* ---- kd_conn hooks ---- */

static int rc_data(struct kd_conn *c, const uint8_t *data, size_t len)
{
    struct rconn *rc = c->ctx;
    struct kd_redis *r = rc->r;
    if (r == NULL)
        return 0;
    uint8_t buf[TLS_READ_CHUNK];
    enter(r);
    if (rc->tls != NULL) {
        if (kd_tls_feed(rc->tls, data, len) < 0) {
            conn_fail(r, "out of memory");
            goto out;
        }
        for (;;) {
            ssize_t n = kd_tls_read(rc->tls, buf, sizeof(buf));
            if (n == 0)
                break;
            if (n < 0) {
                char why[ERR_MAX];
                if (n == -ECONNRESET)
                    snprintf(why, sizeof(why), "connection closed by server (TLS close_notify)");
                else
                    snprintf(why, sizeof(why), "TLS %.280s", kd_tls_error(rc->tls));
                conn_fail(r, why);
                goto out;
            }
            if (kd_resp_reader_feed(rc->rd, buf, (size_t)n) < 0)
                break;
        }
        if (drain_tls(rc) < 0) {
            conn_fail(r, "output queue full");
            goto out;
        }
    } else if (kd_resp_reader_feed(rc->rd, data, len) < 0) {
        /* reported by next() below */
    }
    for (;;) {
        struct kd_resp *o;
        int n = kd_resp_reader_next(rc->rd, &o);
        if (n == 0)
            break;
        if (n < 0) {
            conn_fail(r, kd_resp_reader_error(rc->rd));
            break;
        }
        bool go_on = on_reply(r, rc, o);
        kd_resp_free(o);
        if (!go_on)
            break;
    }
out:
    leave(r);
    return 0;
}

static void rc_flush(struct kd_conn *c)
{
    struct rconn *rc = c->ctx;
    struct kd_redis *r = rc->r;
    if (r == NULL)
        return;
    if (r->state == R_UP)
        note_output(r); /* sends completed since the last hand-off are progress (write timeout) */
    /* Hand over as much as the connection's queue takes (a big batch, e.g. a re-sync of many
     * agents, may exceed it); the rest stays here until the queue drains below KD_CONN_OUT_LOW,
     * when the conn layer asks for on_flush again. TLS records add a little: keep headroom. */
    size_t room = KD_CONN_OUT_MAX - (KD_CONN_OUT_MAX / 16);
    room = c->out_bytes < room ? room - c->out_bytes : 0;
    if (r->out_len > 0 && room > 0) {
        size_t n = r->out_len < room ? r->out_len : room;
        int e =
            rc->tls != NULL ? kd_tls_write(rc->tls, (const uint8_t *)r->out, n) : kd_conn_write(c, r->out, n);
        if (e == 0 && rc->tls != NULL)
            e = drain_tls(rc);
        if (e < 0) {
            enter(r);
            conn_fail(r, "write failed (output queue full)");
            leave(r);
            return;
        }
        memmove(r->out, r->out + n, r->out_len - n);
        r->out_len -= n;
    }
    if (r->state == R_UP) {
        note_output(r);
        arm_io(r);
    }
}

static void rc_connect(struct kd_conn *c, int err)
{
    struct rconn *rc = c->ctx;
    struct kd_redis *r = rc->r;
    if (r == NULL || err == 0)
        return;
    char why[128];
    errno_text(err, why, sizeof(why));
    enter(r);
    /* The conn layer closes c after this; it is no longer ours. */
    if (rc->sentinel)
        sentinel_next(r, why);
    else
        conn_fail(r, why);
    leave(r);
}

static void rc_shutdown(struct kd_conn *c)
{
    /* The shard's own connection stays open while the shard drains: services still write to Redis
     * on their way out (removing their entries); the shard loop calls kd_redis_stop once nothing
     * else is left. Any other connection (a subscriber, a test's) finishes what is in flight now. */
    struct rconn *rc = c->ctx;
    if (rc->r != NULL && rc->r != rc->r->s->redis) {
        struct kd_redis *r = rc->r;
        enter(r);
        kd_redis_stop(r);
        leave(r);
    }
}

static void rc_close(struct kd_conn *c, int err)
{
    struct rconn *rc = c->ctx;
    struct kd_redis *r = rc->r;
    if (r != NULL) {
        char why[128];
        rc->r = NULL;
        r->rc = NULL; /* closing already: conn_fail must not close it again */
        errno_text(err, why, sizeof(why));
        enter(r);
        if (rc->sentinel)
            sentinel_next(r, why);
        else
            conn_fail(r, why);
        leave(r);
    }
    kd_resp_reader_free(rc->rd);
    if (rc->tls != NULL)
        kd_tls_free(rc->tls);
    free(rc);
    c->ctx = NULL;
}

static const struct kd_conn_ops redis_ops = {
    .name = "redis",
    .on_data = rc_data,
    .on_flush = rc_flush,
    .on_connect = rc_connect,
    .on_shutdown = rc_shutdown,
    .on_close = rc_close,
};

/* ---- public ---- */

struct kd_redis *kd_redis_new(struct kd_shard *s, const struct kd_redis_opts *o,
                              const struct kd_redis_hooks *h, void *arg)
{
    if (o == NULL || (o->address == NULL && o->sentinel_master == NULL) ||
        (o->sentinel_master != NULL && o->n_sentinel_addrs == 0))
        return NULL;
    struct kd_redis *r = calloc(1, sizeof(*r));
    if (r == NULL)
        return NULL;
    r->s = s;
    if (h != NULL)
        r->h = *h;
    r->arg = arg;
    r->address = dupn(o->address ? o->address : "");
    r->username = dupn(o->username);
    r->password = dupn(o->password);
    r->server_name = dupn(o->server_name);
    r->sentinel_master = dupn(o->sentinel_master);
    r->sentinel_password = dupn(o->sentinel_password);
    r->name = dupn(o->name ? o->name : "redis");
    r->client_name = dupn(o->client_name);
    r->database = o->database;
    r->dial_ms = o->dial_timeout_ms ? o->dial_timeout_ms : DEFAULT_TIMEOUT;
    r->read_ms = o->read_timeout_ms ? o->read_timeout_ms : DEFAULT_TIMEOUT;
    r->write_ms = o->write_timeout_ms ? o->write_timeout_ms : DEFAULT_TIMEOUT;
    r->tls = o->tls;
    r->subscriber = o->subscriber;
    r->max_reply = o->max_reply_bytes;
    r->st = o->stats ? o->stats : &r->own_stats;
    r->rng = kd_clock_ns() ^ ((uint64_t)kd_shard_id(s) << 32) ^ (uintptr_t)r;
    if (r->rng == 0)
        r->rng = 1;
    bool oom = r->address == NULL || r->name == NULL || (o->username && !r->username) ||
               (o->password && !r->password) || (o->server_name && !r->server_name) ||
               (o->sentinel_master && !r->sentinel_master) ||
               (o->sentinel_password && !r->sentinel_password) || (o->client_name && !r->client_name);
    if (o->sentinel_master != NULL) {
        r->sentinels = calloc(o->n_sentinel_addrs, sizeof(*r->sentinels));
        oom = oom || r->sentinels == NULL;
        for (unsigned i = 0; !oom && i < o->n_sentinel_addrs; i++) {
            r->sentinels[i] = strdup(o->sentinel_addrs[i]);
            oom = r->sentinels[i] == NULL;
            r->nsentinels = i + 1;
        }
    }
    kd_timer_init(&r->retry, retry_cb);
    kd_timer_init(&r->io, io_cb);
    if (oom) {
        really_free(r);
        return NULL;
    }
    atomic_store_explicit(&r->st->configured, 1, memory_order_relaxed);
    atomic_store_explicit(&r->st->up, 0, memory_order_relaxed);
    snprintf(r->last_err, sizeof(r->last_err), "redis %s: connecting",
             r->sentinel_master ? r->sentinel_master : r->address);
    enter(r);
    start_dial(r);
    leave(r);
    return r;
}

static void really_free(struct kd_redis *r)
{
    kd_timerwheel_cancel(kd_shard_timers(r->s), &r->retry);
    kd_timerwheel_cancel(kd_shard_timers(r->s), &r->io);
    free(r->address);
    free(r->username);
    if (r->password)
        memset(r->password, 0, strlen(r->password));
    free(r->password);
    free(r->server_name);
    free(r->sentinel_master);
    free(r->sentinel_password);
    free(r->name);
    free(r->client_name);
    for (unsigned i = 0; i < r->nsentinels; i++)
        free(r->sentinels[i]);
    free(r->sentinels);
    for (size_t i = 0; i < r->nchans; i++)
        free(r->chans[i].name);
    free(r->chans);
    free(r->out);
    free(r);
}

void kd_redis_free(struct kd_redis *r)
{
    if (r == NULL || r->dead)
        return;
    char err[ERR_MAX];
    r->dead = true;
    abandon(r);
    kd_timerwheel_cancel(kd_shard_timers(r->s), &r->retry);
    if (r->state == R_UP)
        atomic_store_explicit(&r->st->up, 0, memory_order_relaxed);
    r->state = R_DOWN;
    snprintf(err, sizeof(err), "redis %s: shutting down", r->target[0] ? r->target : r->address);
    enter(r);
    fail_all(r, err);
    leave(r); /* frees r unless a callback up the stack still runs */
}

void kd_redis_set_hooks(struct kd_redis *r, const struct kd_redis_hooks *h, void *arg)
{
    if (h != NULL)
        r->h = *h;
    else
        memset(&r->h, 0, sizeof(r->h));
    r->arg = arg;
}

bool kd_redis_up(const struct kd_redis *r)
{
    return r != NULL && r->state == R_UP;
}

const char *kd_redis_last_error(const struct kd_redis *r)
{
    return r->last_err;
}

const char *kd_redis_address(const struct kd_redis *r)
{
    return r->target[0] ? r->target : r->address;
}

struct kd_redis_stats *kd_redis_stats(struct kd_redis *r)
{
    return r->st;
}

/* Fail one command now, "not connected (cause)". */
static void fail_now(struct kd_redis *r, kd_redis_cb cb, void *arg)
{
    char err[ERR_MAX + 64];
    const char *cause = r->last_err;
    /* last_err is "redis ADDR: cause": show the address once. */
    const char *colon = strstr(cause, ": ");
    snprintf(err, sizeof(err), "redis %s: not connected (%s)", r->target[0] ? r->target : r->address,
             r->stopping ? "shutting down"
             : colon     ? colon + 2
                         : "connecting");
    kd_stat_inc(&r->st->errors);
    if (cb != NULL) {
        enter(r);
        cb(arg, NULL, err);
        leave(r);
    }
}

static int cmd_common(struct kd_redis *r, enum pkind kind, kd_redis_cb cb, void *arg, int argc,
                      const char *const *argv, const size_t *argvlen, struct pending **out)
{
    if (argc < 1)
        return -EINVAL;
    if (r->state != R_UP || r->stopping || r->dead) {
        fail_now(r, cb, arg);
        return 0;
    }
    if (r->out_len > OUT_MAX && !r->in_multi)
        return -ENOBUFS;
    struct pending *p = pending_push(r, kind, cb, arg);
    if (p == NULL)
        return -ENOMEM;
    if (out_cmd(r, argc, argv, argvlen) < 0) {
        /* Unlink the just-pushed tail again. */
        struct pending **pp = &r->head;
        while (*pp != p)
            pp = &(*pp)->next;
        *pp = NULL;
        r->tail = NULL;
        for (struct pending *q = r->head; q != NULL; q = q->next)
            r->tail = q;
        pending_free(p);
        return -ENOMEM;
    }
    kd_stat_inc(&r->st->commands);
    if (!kd_timer_is_armed(&r->io))
        arm_io(r);
    if (out != NULL)
        *out = p;
    return 0;
}

int kd_redis_cmd(struct kd_redis *r, kd_redis_cb cb, void *arg, int argc, const char *const *argv,
                 const size_t *argvlen)
{
    if (r->subscriber)
        return -EINVAL;
    return cmd_common(r, P_USER, cb, arg, argc, argv, argvlen, NULL);
}

void kd_redis_script_init(struct kd_redis_script *sc, const char *source)
{
    sc->source = source;
    kd_sha1_hex(source, strlen(source), sc->sha1);
}

int kd_redis_eval(struct kd_redis *r, const struct kd_redis_script *sc, kd_redis_cb cb, void *arg, int nkeys,
                  int argc, const char *const *argv, const size_t *argvlen)
{
    if (r->subscriber || argc < 0 || nkeys < 0 || nkeys > argc)
        return -EINVAL;
    int n = argc + 3;
    const char **av = malloc((size_t)n * sizeof(*av));
    size_t *al = malloc((size_t)n * sizeof(*al));
    char nk[16];
    int rc = -ENOMEM;
    if (av == NULL || al == NULL)
        goto out;
    snprintf(nk, sizeof(nk), "%d", nkeys);
    av[0] = "EVALSHA";
    al[0] = 7;
    av[1] = sc->sha1;
    al[1] = 40;
    av[2] = nk;
    al[2] = strlen(nk);
    size_t bytes = 0;
    for (int i = 0; i < argc; i++) {
        av[3 + i] = argv[i];
        al[3 + i] = argvlen[i];
        bytes += argvlen[i];
    }
    struct pending *p = NULL;
    rc = cmd_common(r, P_SCRIPT, cb, arg, n, av, al, &p);
    if (rc < 0 || p == NULL)
        goto out;
    /* Keep the arguments for a NOSCRIPT fallback: one block of pointers, lengths and bytes. */
    size_t need = (size_t)argc * (sizeof(char *) + sizeof(size_t)) + bytes + 1;
    char *blk = malloc(need);
    if (blk == NULL) {
        p->sc = NULL; /* fallback impossible: the NOSCRIPT error reaches the caller as is */
        p->kind = P_USER;
        goto out;
    }
    p->argv = (char **)blk;
    p->argvlen = (size_t *)(blk + (size_t)argc * sizeof(char *));
    char *data = blk + (size_t)argc * (sizeof(char *) + sizeof(size_t));
    for (int i = 0; i < argc; i++) {
        memcpy(data, argv[i], argvlen[i]);
        p->argv[i] = data;
        p->argvlen[i] = argvlen[i];
        data += argvlen[i];
    }
    p->argc = argc;
    p->nkeys = nkeys;
    p->sc = sc;
out:
    free(av);
    free(al);
    return rc;
}

int kd_redis_multi(struct kd_redis *r, kd_redis_cb cb, void *arg, int ncmds, const struct kd_redis_cmdv *cmds)
{
    if (r->subscriber || ncmds < 0)
        return -EINVAL;
    if (r->state != R_UP || r->stopping || r->dead) {
        fail_now(r, cb, arg);
        return 0;
    }
    /* Refusals that are the caller's (bad arguments) or momentary (output full) are answered
     * before anything is queued: failing the connection for them would fail everyone's commands. */
    for (int i = 0; i < ncmds; i++)
        if (cmds[i].argc < 1)
            return -EINVAL;
    if (r->out_len > OUT_MAX)
        return -ENOBUFS;
    static const char *const multi[] = {"MULTI"}, *const exec[] = {"EXEC"};
    static const size_t ml[] = {5}, el[] = {4};
    /* Every part is queued before anything can fail half-way: a failure here is out of memory, and
     * the connection is then failed as a whole so no half transaction reaches the server. */
    int rc = cmd_common(r, P_SKIP, NULL, NULL, 1, multi, ml, NULL);
    r->in_multi = true; /* MULTI is queued: the rest must follow it, past OUT_MAX if need be */
    for (int i = 0; rc == 0 && i < ncmds; i++)
        rc = cmd_common(r, P_SKIP, NULL, NULL, cmds[i].argc, cmds[i].argv, cmds[i].argvlen, NULL);
    if (rc == 0)
        rc = cmd_common(r, P_USER, cb, arg, 1, exec, el, NULL);
    r->in_multi = false;
    if (rc < 0) {
        enter(r);
        conn_fail(r, "out of memory queueing MULTI/EXEC");
        leave(r);
        return rc;
    }
    return 0;
}

static ssize_t chan_find(struct kd_redis *r, const char *ch, size_t len)
{
    for (size_t i = 0; i < r->nchans; i++)
        if (r->chans[i].len == len && memcmp(r->chans[i].name, ch, len) == 0)
            return (ssize_t)i;
    return -1;
}

static int sub_cmd(struct kd_redis *r, const char *verb, const char *ch, size_t len)
{
    if (r->state != R_UP)
        return 0; /* sent at the next connect */
    const char *argv[] = {verb, ch};
    size_t lens[] = {strlen(verb), len};
    if (pending_push(r, P_SUB, NULL, NULL) == NULL)
        return -ENOMEM;
    int rc = out_cmd(r, 2, argv, lens);
    if (rc == 0 && !kd_timer_is_armed(&r->io))
        arm_io(r);
    return rc;
}

int kd_redis_subscribe(struct kd_redis *r, const char *channel, size_t len)
{
    if (!r->subscriber)
        return -EINVAL;
    if (chan_find(r, channel, len) >= 0)
        return 0;
    if (r->nchans == r->capchans) {
        size_t ncap = r->capchans ? r->capchans * 2 : 8;
        struct chan *n = realloc(r->chans, ncap * sizeof(*n));
        if (n == NULL)
            return -ENOMEM;
        r->chans = n;
        r->capchans = ncap;
    }
    char *name = malloc(len + 1);
    if (name == NULL)
        return -ENOMEM;
    memcpy(name, channel, len);
    name[len] = '\0';
    r->chans[r->nchans].name = name;
    r->chans[r->nchans].len = len;
    r->nchans++;
    return sub_cmd(r, "SUBSCRIBE", channel, len);
}

int kd_redis_unsubscribe(struct kd_redis *r, const char *channel, size_t len)
{
    if (!r->subscriber)
        return -EINVAL;
    ssize_t i = chan_find(r, channel, len);
    if (i < 0)
        return 0;
    free(r->chans[i].name);
    r->chans[i] = r->chans[--r->nchans];
    return sub_cmd(r, "UNSUBSCRIBE", channel, len);
}

void kd_redis_stop(struct kd_redis *r)
{
    if (r == NULL || r->stopping)
        return;
    r->stopping = true;
    kd_timerwheel_cancel(kd_shard_timers(r->s), &r->retry);
    /* A subscriber's pending entries are only confirmations: nothing worth waiting for. */
    bool user_pending = false;
    for (struct pending *p = r->head; p != NULL; p = p->next)
        user_pending = user_pending || user_kind(p->kind) || p->kind == P_SKIP;
    if (!user_pending || r->state != R_UP) {
        char err[ERR_MAX];
        abandon(r);
        if (r->state == R_UP)
            atomic_store_explicit(&r->st->up, 0, memory_order_relaxed);
        r->state = R_DOWN;
        snprintf(err, sizeof(err), "redis %s: shutting down", kd_redis_address(r));
        enter(r);
        fail_all(r, err);
        leave(r);
    }
}

bool kd_redis_stopped(const struct kd_redis *r)
{
    return r == NULL || (r->stopping && r->rc == NULL);
}

unsigned kd_redis_nconns(const struct kd_redis *r)
{
    return r != NULL && r->rc != NULL ? 1 : 0;
}

int kd_redis_resolve(const char *address, char *out, size_t outlen, char *err, size_t errlen)
{
    struct sockaddr_storage ss;
    socklen_t sl;
    if (parse_addr(address, &ss, &sl) == 0) {
        snprintf(out, outlen, "%s", address);
        return 0;
    }
    const char *colon = strrchr(address, ':');
    if (colon == NULL || colon == address) {
        snprintf(err, errlen, "redis address \"%s\": expected host:port", address);
        return -EINVAL;
    }
    char host[256];
    snprintf(host, sizeof(host), "%.*s", (int)(colon - address), address);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res = NULL;
    int rc = getaddrinfo(host, colon + 1, &hints, &res);
    if (rc != 0) {
        snprintf(err, errlen, "redis %s: cannot resolve host name: %s", address, gai_strerror(rc));
        return -ENOENT;
    }
    const struct addrinfo *pick = NULL;
    for (const struct addrinfo *ai = res; ai != NULL && pick == NULL; ai = ai->ai_next)
        if (ai->ai_family == AF_INET)
            pick = ai;
    for (const struct addrinfo *ai = res; ai != NULL && pick == NULL; ai = ai->ai_next)
        if (ai->ai_family == AF_INET6)
            pick = ai;
    if (pick == NULL) {
        freeaddrinfo(res);
        snprintf(err, errlen, "redis %s: no IPv4 or IPv6 address", address);
        return -ENOENT;
    }
    char ip[INET6_ADDRSTRLEN];
    if (pick->ai_family == AF_INET) {
        inet_ntop(AF_INET, &((struct sockaddr_in *)pick->ai_addr)->sin_addr, ip, sizeof(ip));
        snprintf(out, outlen, "%s:%s", ip, colon + 1);
    } else {
        inet_ntop(AF_INET6, &((struct sockaddr_in6 *)pick->ai_addr)->sin6_addr, ip, sizeof(ip));
        snprintf(out, outlen, "[%s]:%s", ip, colon + 1);
    }
    freeaddrinfo(res);
    return 0;
}
