/* h2_test.c — a client and a server kd_h2 wired back to back in memory: messages of every size
 * around the output chunk classes (core/chunkpool.h) are echoed byte for byte and in order, many
 * small messages share chunks, and the chunks go back to the thread's pool. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/chunkpool.h"
#include "core/compress.h"
#include "core/grpc.h"
#include "core/h2.h"

struct side {
    struct kd_h2 *h, *peer;
    size_t moved;
    size_t moved_total;
};

static int to_peer(void *ud, const uint8_t *data, size_t len)
{
    struct side *s = ud;
    const char *err = NULL;
    s->moved += len;
    s->moved_total += len;
    int rc = kd_h2_recv(s->peer, data, len, &err);
    cr_assert_eq(rc, 0, "recv: %s", err ? err : "?");
    return 0;
}

/* When set, both sessions give their output frame buffer's pages back at every quiet point (as a
 * shard does for a connection that went quiet), so the next frame is written into fresh pages. */
static bool shed_when_quiet;

/* Move bytes both ways until neither side has anything to say. */
static void pump(struct side *c, struct side *s)
{
    for (int round = 0; round < 100000; round++) {
        c->moved = s->moved = 0;
        cr_assert_eq(kd_h2_send(c->h, to_peer, c), 0);
        cr_assert_eq(kd_h2_send(s->h, to_peer, s), 0);
        if (c->moved == 0 && s->moved == 0) {
            if (shed_when_quiet) {
                cr_assert_geq(kd_h2_shed(c->h), 16384, "a quiet session sheds its frame buffer");
                cr_assert_geq(kd_h2_shed(s->h), 16384, "a quiet session sheds its frame buffer");
            }
            return;
        }
    }
    cr_assert_fail("no quiet point");
}

/* ---- server: echo every message, OK at half-close ---- */

static int echo_message(struct kd_h2_call *c, const uint8_t *msg, size_t len)
{
    return kd_h2_call_send_message(c, msg, len) < 0 ? -1 : 0;
}

static void echo_half_close(struct kd_h2_call *c)
{
    kd_h2_call_finish(c, KD_GRPC_OK, NULL, NULL, 0);
}

static void echo_done(struct kd_h2_call *c, int status, const char *message)
{
    (void)c;
    (void)status;
    (void)message;
}

static const struct kd_h2_handler echo_handler = {
    .on_message = echo_message,
    .on_half_close = echo_half_close,
    .on_done = echo_done,
};

static int on_call(void *ud, struct kd_h2_call *c)
{
    (void)ud;
    kd_h2_call_set_handler(c, &echo_handler, NULL);
    return 0;
}

/* ---- client: check what comes back ---- */

struct expect {
    const size_t *sizes;
    size_t n, got;
    int status;
    bool done;
};

static void fill(uint8_t *p, size_t len, size_t seq)
{
    for (size_t i = 0; i < len; i++)
        p[i] = (uint8_t)(seq * 31 + i * 7 + (i >> 8));
}

static int client_message(struct kd_h2_call *c, const uint8_t *msg, size_t len)
{
    struct expect *e = kd_h2_call_user(c);
    cr_assert_lt(e->got, e->n, "more messages than sent");
    cr_assert_eq(len, e->sizes[e->got], "message %zu: %zu bytes, want %zu", e->got, len, e->sizes[e->got]);
    uint8_t *want = malloc(len + 1);
    fill(want, len, e->got);
    cr_assert(memcmp(msg, want, len) == 0, "message %zu (%zu bytes) differs", e->got, len);
    free(want);
    e->got++;
    return 0;
}

static void client_done(struct kd_h2_call *c, int status, const char *message)
{
    struct expect *e = kd_h2_call_user(c);
    e->status = status;
    e->done = true;
    (void)message;
}

static const struct kd_h2_handler client_handler = {
    .on_message = client_message,
    .on_done = client_done,
};

static void echo_run(const size_t *sizes, size_t n)
{
    struct kd_h2_opts so = {
        .server = true,
        .max_message = 4u << 20,
        .max_concurrent_streams = 100,
        .max_header_list = 16384,
        .initial_window = 1u << 20,
        .on_call = on_call,
    };
    struct kd_h2_opts co = so;
    co.server = false;
    co.on_call = NULL;
    struct kd_h2 *srv = kd_h2_new(&so), *cli = kd_h2_new(&co);
    cr_assert_not_null(srv);
    cr_assert_not_null(cli);
    struct side cs = {.h = cli, .peer = srv}, ss = {.h = srv, .peer = cli};
    struct expect e = {.sizes = sizes, .n = n, .status = -1};
    struct kd_h2_call *call =
        kd_h2_call_start(cli, "/t.Echo/Bidi", "localhost", NULL, 0, 0, 0, &client_handler, &e);
    cr_assert_not_null(call);
    size_t queued = 0;
    for (size_t i = 0; i < n; i++) {
        uint8_t *m = malloc(sizes[i] + 1);
        fill(m, sizes[i], i);
        int rc = kd_h2_call_send_message(call, m, sizes[i]);
        free(m);
        cr_assert_geq(rc, 0);
        queued += KD_GRPC_PREFIX + sizes[i];
        cr_assert_eq(kd_h2_call_queued(call), queued, "queued bytes count the prefix and the payload");
        if (shed_when_quiet)
            cr_assert_eq(kd_h2_shed(cli), 0, "nothing is shed while output is pending");
        if (rc == 1) { /* over the high-water mark: let it drain */
            pump(&cs, &ss);
            queued = kd_h2_call_queued(call);
        }
    }
    cr_assert_eq(kd_h2_call_close_send(call), 0);
    pump(&cs, &ss);
    cr_assert(e.done, "call not finished");
    cr_assert_eq(e.status, KD_GRPC_OK);
    cr_assert_eq(e.got, n);
    kd_h2_free(cli);
    kd_h2_free(srv);
}

Test(h2, echo_sizes_around_chunk_classes)
{
    static const size_t sizes[] = {0,     1,     100,   340,   350,    351,      352,   360,   1000,  1100,
                                   1130,  1200,  4000,  4190,  4200,   16000,    16384, 16480, 16500, 65000,
                                   65536, 65540, 65600, 70000, 300000, 1u << 20, 3,     0,     65536, 17};
    echo_run(sizes, sizeof(sizes) / sizeof(sizes[0]));
    /* The chunks went back to this thread's pool and were reused. */
    struct kd_chunkpool_stats st;
    kd_chunkpool_stats(&st);
    cr_assert_gt(st.hits, 0);
    size_t bound = 0;
    for (unsigned i = 0; i < KD_CHUNKPOOL_CLASSES; i++) {
        cr_assert_leq(st.kept[i], kd_chunkpool_class_max(i));
        bound += kd_chunkpool_class_max(i) * kd_chunkpool_class_size(i);
    }
    cr_assert_leq(st.kept_bytes, bound);
    kd_chunkpool_drain();
}

/* The frame buffer's pages given back between sends: every byte still arrives, in order. */
Test(h2, shed_at_quiet_points_keeps_every_byte)
{
    static const size_t sizes[] = {0, 1, 100, 16000, 16384, 16500, 65536, 70000, 300000, 3, 1u << 20, 17};
    shed_when_quiet = true;
    echo_run(sizes, sizeof(sizes) / sizeof(sizes[0]));
    shed_when_quiet = false;
}

static int discard(void *ud, const uint8_t *data, size_t len)
{
    (void)ud;
    (void)data;
    (void)len;
    return 0;
}

static size_t maps_lines(void)
{
    FILE *f = fopen("/proc/self/maps", "r");
    cr_assert_not_null(f);
    size_t n = 0;
    for (int ch; (ch = fgetc(f)) != EOF;)
        n += ch == '\n';
    fclose(f);
    return n;
}

/* Every session's frame buffer is page-aligned memory of its own, yet thousands of sessions coming
 * and going in any order cost the process a handful of mappings, not one each (vm.max_map_count
 * is 65,530 by default: an instance with that many agents must not run into it). */
Test(h2, frame_buffers_do_not_cost_a_mapping_each)
{
    enum { N = 3000 };
    static struct kd_h2 *hs[N];
    struct kd_h2_opts so = {
        .server = true, .max_message = 1u << 20, .max_header_list = 16384, .on_call = on_call};
    size_t before = maps_lines();
    for (int i = 0; i < N; i++)
        cr_assert_not_null(hs[i] = kd_h2_new(&so));
    for (int i = 0; i < N; i += 2) /* every other one: holes everywhere */
        kd_h2_free(hs[i]);
    size_t holes = maps_lines();
    for (int i = 0; i < N; i += 2)
        cr_assert_not_null(hs[i] = kd_h2_new(&so));
    for (int i = 0; i < N; i++) {
        cr_assert_eq(kd_h2_send(hs[i], discard, NULL), 0); /* its SETTINGS, written into the slot */
        cr_assert_geq(kd_h2_shed(hs[i]), 16384, "session %d sheds its frame buffer", i);
    }
    size_t after = maps_lines();
    for (int i = 0; i < N; i++)
        kd_h2_free(hs[i]);
    cr_assert_lt(holes - before, 100, "%zu mappings -> %zu with %d sessions, every other one freed", before,
                 holes, N / 2);
    cr_assert_lt(after - before, 100, "%zu mappings -> %zu with %d sessions", before, after, N);
}

Test(h2, many_small_messages_share_chunks)
{
    enum { N = 2000 };
    static size_t sizes[N];
    for (size_t i = 0; i < N; i++)
        sizes[i] = (i * 37) % 200;
    echo_run(sizes, N);
}

Test(h2, cancel_drops_queued_output)
{
    struct kd_h2_opts co = {.server = false, .max_message = 1u << 20, .max_header_list = 16384};
    struct kd_h2 *cli = kd_h2_new(&co);
    struct expect e = {.status = -1};
    struct kd_h2_call *call =
        kd_h2_call_start(cli, "/t.Echo/Bidi", "localhost", NULL, 0, 0, 0, &client_handler, &e);
    uint8_t m[5000];
    fill(m, sizeof(m), 0);
    for (int i = 0; i < 100; i++)
        cr_assert_geq(kd_h2_call_send_message(call, m, (size_t)(i * 50)), 0);
    cr_assert_gt(kd_h2_call_queued(call), 0);
    kd_h2_call_cancel(call, KD_GRPC_CANCELLED, "test");
    cr_assert(e.done);
    cr_assert_eq(e.status, KD_GRPC_CANCELLED);
    kd_h2_free(cli); /* ASan: nothing queued leaks */
}

Test(h2, expire_answers_without_walking_and_never_late)
{
    struct kd_h2_opts co = {.server = false, .max_message = 1u << 20, .max_header_list = 16384};
    struct kd_h2 *cli = kd_h2_new(&co);
    cr_assert_eq(kd_h2_expire(cli, 1000), UINT64_MAX);
    struct expect a = {.status = -1}, b = {.status = -1}, c = {.status = -1};
    struct kd_h2_call *ca =
        kd_h2_call_start(cli, "/t.E/A", "localhost", NULL, 0, 1000, 5000, &client_handler, &a);
    struct kd_h2_call *cb =
        kd_h2_call_start(cli, "/t.E/B", "localhost", NULL, 0, 1000, 9000, &client_handler, &b);
    cr_assert_not_null(ca);
    cr_assert_not_null(cb);
    cr_assert_eq(kd_h2_expire(cli, 2000), 6000);
    cr_assert_eq(kd_h2_expire(cli, 5999), 6000);
    cr_assert(!a.done);
    cr_assert_eq(kd_h2_expire(cli, 6000), 10000);
    cr_assert(a.done, "the due call was failed");
    cr_assert_eq(a.status, KD_GRPC_DEADLINE_EXCEEDED);
    cr_assert(!b.done);
    /* A call ended by its owner leaves an early bound: answered again at that time, exactly. */
    kd_h2_call_cancel(cb, KD_GRPC_CANCELLED, "test");
    struct kd_h2_call *cc =
        kd_h2_call_start(cli, "/t.E/C", "localhost", NULL, 0, 7000, 8000, &client_handler, &c);
    cr_assert_not_null(cc);
    cr_assert_leq(kd_h2_expire(cli, 7000), 10000);
    cr_assert_eq(kd_h2_expire(cli, 10000), 15000, "the walk finds the exact next deadline");
    cr_assert(!c.done);
    cr_assert_eq(kd_h2_expire(cli, 15000), UINT64_MAX);
    cr_assert(c.done);
    cr_assert_eq(c.status, KD_GRPC_DEADLINE_EXCEEDED);
    cr_assert_eq(b.status, KD_GRPC_CANCELLED);
    kd_h2_free(cli);
}

/* ---- keepalive PING, end-at-GOAWAY marks, the connection's header budget ---- */

struct pair {
    struct kd_h2 *cli, *srv;
    struct side cs, ss;
};

static void pair_open(struct pair *p, const struct kd_h2_opts *so)
{
    struct kd_h2_opts co = *so;
    co.server = false;
    co.on_call = NULL;
    p->srv = kd_h2_new(so);
    p->cli = kd_h2_new(&co);
    cr_assert_not_null(p->srv);
    cr_assert_not_null(p->cli);
    p->cs = (struct side){.h = p->cli, .peer = p->srv};
    p->ss = (struct side){.h = p->srv, .peer = p->cli};
}

static void pair_close(struct pair *p)
{
    kd_h2_free(p->cli);
    kd_h2_free(p->srv);
}

static const struct kd_h2_opts base_srv = {
    .server = true,
    .max_message = 1u << 20,
    .max_concurrent_streams = 100,
    .max_header_list = 16384,
    .initial_window = 1u << 20,
    .on_call = on_call,
};

/* Bytes the server sends for one echoed message on call number `i` of the connection. */
static size_t one_call_bytes(struct pair *p, size_t i)
{
    static const size_t sizes[] = {10};
    struct expect e = {.sizes = sizes, .n = 1, .status = -1};
    struct kd_h2_call *call =
        kd_h2_call_start(p->cli, "/t.Echo/Bidi", "localhost", NULL, 0, 0, 0, &client_handler, &e);
    cr_assert_not_null(call);
    uint8_t m[10];
    fill(m, sizeof(m), 0);
    cr_assert_geq(kd_h2_call_send_message(call, m, sizeof(m)), 0);
    cr_assert_eq(kd_h2_call_close_send(call), 0);
    size_t before = p->ss.moved_total;
    pump(&p->cs, &p->ss);
    cr_assert(e.done, "call %zu not finished", i);
    cr_assert_eq(e.status, KD_GRPC_OK);
    return p->ss.moved_total - before;
}

/* lean: the server's header blocks never use HPACK's dynamic table, so every call's response
 * costs the same bytes (with indexing the second call's headers shrink to table references), and
 * the client decodes them all the same. */
Test(h2, lean_sends_literal_headers)
{
    for (int off = 0; off < 2; off++) {
        struct kd_h2_opts so = base_srv;
        so.lean = off == 1;
        struct pair p;
        pair_open(&p, &so);
        pump(&p.cs, &p.ss);
        size_t first = one_call_bytes(&p, 0), second = one_call_bytes(&p, 1), third = one_call_bytes(&p, 2);
        if (off) {
            /* the first block also carries the one-byte table size update to 0 */
            cr_assert_eq(third, second, "literal headers: %zu, %zu, %zu bytes", first, second, third);
            cr_assert_leq(first, second + 1, "literal headers: %zu, %zu, %zu bytes", first, second, third);
        } else {
            cr_assert_lt(second + 10, first, "indexed headers shrink: %zu then %zu bytes", first, second);
        }
        pair_close(&p);
    }
}

Test(h2, keepalive_ping_outstanding_until_its_ack)
{
    struct pair p;
    pair_open(&p, &base_srv);
    pump(&p.cs, &p.ss);
    cr_assert_eq(kd_h2_ping_outstanding_since(p.srv), 0);
    kd_h2_ping(p.srv);
    uint64_t since = kd_h2_ping_outstanding_since(p.srv);
    cr_assert_neq(since, 0, "a sent PING is outstanding");
    kd_h2_ping(p.srv); /* one at a time */
    cr_assert_eq(kd_h2_counters(p.srv)->pings_sent, 1);
    /* The peer's own PINGs are answered by nghttp2 and do not clear ours: send one from the
     * client while the server's PING has not reached it yet. */
    cr_assert_eq(kd_h2_send(p.cli, to_peer, &p.cs), 0);
    kd_h2_ping(p.cli);
    cr_assert_eq(kd_h2_send(p.cli, to_peer, &p.cs), 0);
    cr_assert_eq(kd_h2_counters(p.srv)->pings_received, 1);
    cr_assert_eq(kd_h2_ping_outstanding_since(p.srv), since,
                 "answering the peer's PING is not an ACK of ours");
    pump(&p.cs, &p.ss);
    cr_assert_eq(kd_h2_ping_outstanding_since(p.srv), 0, "the ACK clears it");
    cr_assert_eq(kd_h2_counters(p.srv)->ping_acks, 1);
    cr_assert_geq(kd_h2_counters(p.srv)->last_ping_ack_us, since);
    cr_assert_eq(kd_h2_counters(p.srv)->ping_strikes, 0);
    pair_close(&p);
}

static int marked_calls;
static int on_call_mark(void *ud, struct kd_h2_call *c)
{
    (void)ud;
    kd_h2_call_set_handler(c, &echo_handler, NULL);
    /* every other call is marked */
    kd_h2_call_set_end_on_goaway(c, (marked_calls++ & 1) == 0);
    return 0;
}

Test(h2, end_marked_finishes_marked_calls_with_ok_only)
{
    struct kd_h2_opts so = base_srv;
    so.on_call = on_call_mark;
    marked_calls = 0;
    struct pair p;
    pair_open(&p, &so);
    struct expect e[4];
    for (int i = 0; i < 4; i++) {
        e[i] = (struct expect){.status = -1};
        cr_assert_not_null(
            kd_h2_call_start(p.cli, "/t.E/Watch", "localhost", NULL, 0, 0, 0, &client_handler, &e[i]));
    }
    pump(&p.cs, &p.ss);
    cr_assert_eq(kd_h2_live_calls(p.srv), 4);
    kd_h2_goaway(p.srv, 0, "max_age");
    cr_assert_eq(kd_h2_end_marked(p.srv), 2);
    cr_assert_eq(kd_h2_live_calls(p.srv), 2, "on_done ran at once for the marked calls");
    cr_assert_eq(kd_h2_end_marked(p.srv), 0, "each ends once");
    pump(&p.cs, &p.ss);
    for (int i = 0; i < 4; i++) {
        if ((i & 1) == 0) {
            cr_assert(e[i].done, "marked call %d ended", i);
            cr_assert_eq(e[i].status, KD_GRPC_OK);
        } else {
            cr_assert(!e[i].done, "unmarked call %d carries on", i);
        }
    }
    pair_close(&p);
}

static struct kd_h2_call *start_with_md(struct kd_h2 *cli, struct expect *e, size_t mdlen)
{
    static char v[20000];
    memset(v, 'm', sizeof(v));
    struct kd_h2_header md = {"x-big", 5, v, mdlen};
    return kd_h2_call_start(cli, "/t.E/Watch", "localhost", &md, 1, 0, 0, &client_handler, e);
}

Test(h2, header_budget_bounds_the_connection_not_one_call)
{
    struct kd_h2_opts so = base_srv;
    so.max_header_list = 16384;
    so.header_budget = 20000;
    struct pair p;
    pair_open(&p, &so);
    struct expect a = {.status = -1}, b = {.status = -1}, c = {.status = -1}, d = {.status = -1};
    struct kd_h2_call *ca = start_with_md(p.cli, &a, 12000);
    pump(&p.cs, &p.ss);
    cr_assert(!a.done, "within both limits: the call runs");
    start_with_md(p.cli, &b, 12000);
    pump(&p.cs, &p.ss);
    cr_assert(b.done, "over the connection's budget while the first call holds its headers");
    cr_assert_eq(b.status, KD_GRPC_RESOURCE_EXHAUSTED);
    start_with_md(p.cli, &d, 17000);
    pump(&p.cs, &p.ss);
    cr_assert_eq(d.status, KD_GRPC_RESOURCE_EXHAUSTED, "over max_header_list alone");
    kd_h2_call_close_send(ca);
    pump(&p.cs, &p.ss);
    cr_assert_eq(a.status, KD_GRPC_OK);
    struct kd_h2_call *cc = start_with_md(p.cli, &c, 12000);
    pump(&p.cs, &p.ss);
    cr_assert(!c.done, "the budget came back when the first call ended");
    kd_h2_call_close_send(cc);
    pump(&p.cs, &p.ss);
    cr_assert_eq(c.status, KD_GRPC_OK);
    cr_assert_eq(kd_h2_counters(p.srv)->headers_refused, 2);
    pair_close(&p);
}

/* ---- compression: grpc-encoding on both sides, refusals in grpc-go's words ---- */

struct zexpect {
    struct expect e;
    char message[256];
    char resp_encoding[32];
    char trailer_accept[64];
    int n_accept;
};

static int z_headers(struct kd_h2_call *c)
{
    struct zexpect *z = kd_h2_call_user(c);
    size_t n = 0;
    const char *v = kd_h2_call_header_value(c, "grpc-encoding", &n);
    snprintf(z->resp_encoding, sizeof(z->resp_encoding), "%.*s", v ? (int)n : 0, v ? v : "");
    return 0;
}

static void z_done(struct kd_h2_call *c, int status, const char *message)
{
    struct zexpect *z = kd_h2_call_user(c);
    struct kd_h2_header hh;
    for (size_t i = 0; kd_h2_call_trailer(c, i, &hh); i++)
        if (hh.namelen == 20 && memcmp(hh.name, "grpc-accept-encoding", 20) == 0 && ++z->n_accept)
            snprintf(z->trailer_accept, sizeof(z->trailer_accept), "%.*s", (int)hh.valuelen, hh.value);
    snprintf(z->message, sizeof(z->message), "%s", message);
    z->e.status = status;
    z->e.done = true;
}

static const struct kd_h2_handler z_handler = {
    .on_headers = z_headers,
    .on_message = client_message,
    .on_done = z_done,
};

static char seen_req_encoding[32];

static int z_on_call(void *ud, struct kd_h2_call *c)
{
    size_t n = 0;
    const char *v = kd_h2_call_header_value(c, "grpc-encoding", &n);
    snprintf(seen_req_encoding, sizeof(seen_req_encoding), "%.*s", v ? (int)n : 0, v ? v : "");
    return on_call(ud, c);
}

/* Echo sizes through a client sending with cli_alg to a server answering with srv_alg (when the
 * client accepts it, which kasd's client always does). md: extra request metadata. */
static void z_run(uint8_t cli_alg, uint8_t srv_alg, uint32_t max, const size_t *sizes, size_t n,
                  const struct kd_h2_header *md, size_t nmd, struct zexpect *z)
{
    struct kd_h2_opts so = {
        .server = true,
        .max_message = max,
        .max_concurrent_streams = 100,
        .max_header_list = 16384,
        .initial_window = 1u << 20,
        .on_call = z_on_call,
        .send_compression = srv_alg,
    };
    struct kd_h2_opts co = so;
    co.server = false;
    co.on_call = NULL;
    co.max_message = 64u << 20;
    co.send_compression = cli_alg;
    struct kd_h2 *srv = kd_h2_new(&so), *cli = kd_h2_new(&co);
    struct side cs = {.h = cli, .peer = srv}, ss = {.h = srv, .peer = cli};
    z->e = (struct expect){.sizes = sizes, .n = n, .status = -1};
    seen_req_encoding[0] = '\0';
    struct kd_h2_call *call =
        kd_h2_call_start(cli, "/t.Echo/Bidi", "localhost", md, nmd, 0, 0, &z_handler, z);
    cr_assert_not_null(call);
    for (size_t i = 0; i < n; i++) {
        uint8_t *m = malloc(sizes[i] + 1);
        fill(m, sizes[i], i);
        int rc = kd_h2_call_send_message(call, m, sizes[i]);
        free(m);
        if (rc < 0)
            break;
        pump(&cs, &ss);
        if (z->e.done)
            break;
    }
    if (!z->e.done)
        kd_h2_call_close_send(call);
    pump(&cs, &ss);
    cr_assert(z->e.done, "call not finished");
    kd_h2_free(cli);
    kd_h2_free(srv);
}

Test(h2, compressed_both_ways)
{
    static const size_t sizes[] = {0, 1, 100, 5000, 70000, 1u << 20, 3};
    static const uint8_t algs[][2] = {{KD_COMPRESS_GZIP, 0},
                                      {KD_COMPRESS_DEFLATE, 0},
                                      {KD_COMPRESS_GZIP, KD_COMPRESS_GZIP},
                                      {0, KD_COMPRESS_GZIP},
                                      {0, 0}};
    for (size_t k = 0; k < sizeof(algs) / sizeof(algs[0]); k++) {
        struct zexpect z;
        memset(&z, 0, sizeof(z));
        z_run(algs[k][0], algs[k][1], 4u << 20, sizes, 7, NULL, 0, &z);
        cr_assert_eq(z.e.status, KD_GRPC_OK, "case %zu: %d %s", k, z.e.status, z.message);
        cr_assert_eq(z.e.got, 7, "every message echoed inflated, byte for byte");
        cr_assert_str_eq(seen_req_encoding, algs[k][0] ? kd_compress_alg_name(algs[k][0]) : "");
        cr_assert_str_eq(z.resp_encoding, algs[k][1] ? "gzip" : "", "case %zu", k);
    }
}

Test(h2, unknown_encoding_is_unimplemented_with_accept_encoding)
{
    static const struct kd_h2_header md[] = {{"grpc-encoding", 13, "snappy", 6}};
    static const size_t sizes[] = {10};
    struct zexpect z;
    memset(&z, 0, sizeof(z));
    z_run(0, 0, 1u << 20, sizes, 1, md, 1, &z);
    cr_assert_eq(z.e.status, KD_GRPC_UNIMPLEMENTED);
    cr_assert_str_eq(z.message, "grpc: Decompressor is not installed for grpc-encoding \"snappy\"");
    cr_assert_str_eq(z.trailer_accept, KD_COMPRESS_ACCEPT_ENCODING);
    cr_assert_eq(z.n_accept, 1, "grpc-accept-encoding once");
}

Test(h2, inflated_size_bounded_by_max_message)
{
    /* 1 MiB compresses far below the 64 KiB limit on the wire, but inflates above it */
    static const size_t sizes[] = {1000, 1u << 20};
    struct zexpect z;
    memset(&z, 0, sizeof(z));
    z_run(KD_COMPRESS_GZIP, 0, 65536, sizes, 2, NULL, 0, &z);
    cr_assert_eq(z.e.status, KD_GRPC_RESOURCE_EXHAUSTED, "%d %s", z.e.status, z.message);
    cr_assert_str_eq(z.message,
                     "grpc: received message after decompression larger than max (65537 vs. 65536)");
    cr_assert_eq(z.e.got, 1);
}
