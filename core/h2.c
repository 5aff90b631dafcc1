/* h2.c — gRPC over HTTP/2 on nghttp2; the only file that includes nghttp2 (style.md rule 9).
 *
 * Why this shape: nghttp2 is driven purely from memory (mem_recv / mem_send), so the shard loop
 * stays the only place that does I/O. A call's life is split in two:
 *   - "done": the handler has had on_done and may no longer be called (handler = NULL);
 *   - "freed": nghttp2 closed the stream (on_stream_close); only then is the struct freed, because
 *     nghttp2 may still call us about the stream (data provider, frame sent) until then.
 * Outbound messages wait in the call's queue; a deferred data provider pulls them, so HTTP/2 flow
 * control (the peer's window) decides how fast they leave. Inbound bytes are acknowledged with
 * nghttp2_session_consume only after the handler took them (manual window updates), so a peer
 * can never make us hold more than its window per stream.
 */
#include "core/h2.h"

#include <errno.h>
#include <nghttp2/nghttp2.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "core/chunkpool.h"
#include "core/clock.h"
#include "core/compress.h"
#include "core/grpc.h"
#include "core/list.h"

#define LOW_WATER (KD_H2_CALL_HIGH_WATER / 2)
/* A refused header block that decoded to more than this many times its wire bytes was built from
 * the dynamic table on purpose (one-byte references to a large entry): an HPACK bomb. */
#define HPACK_AMPLIFY_MAX 32
#define LIB_ERR_MAX       96  /* nghttp2's error text kept for the log */
#define FAIL_MSG_MAX      160 /* a refused message's status text */

/* A token bucket: `burst` tokens at most, `rate` regained per second; take() fails when empty. */
struct bucket {
    uint64_t tokens_x1000; /* thousandths of a token, so slow rates regain between frames */
    uint64_t at_us;
};

static bool bucket_take(struct bucket *b, uint64_t now, uint64_t burst, uint64_t rate)
{
    if (b->at_us == 0) {
        b->tokens_x1000 = burst * 1000;
    } else {
        uint64_t gain = (now - b->at_us) * rate / 1000;
        b->tokens_x1000 = b->tokens_x1000 + gain > burst * 1000 ? burst * 1000 : b->tokens_x1000 + gain;
    }
    b->at_us = now;
    if (b->tokens_x1000 < 1000)
        return false;
    b->tokens_x1000 -= 1000;
    return true;
}

struct hdr_ref {
    uint32_t noff, nlen, voff, vlen;
};

/* Header block storage: copies in one growable arena, entries as offsets (arena may move). Once a
 * block is complete it may be compacted (hdrs_compact): entries and arena then share one block of
 * exactly their size (one), instead of two grown by doubling. */
struct hdrs {
    struct hdr_ref *v;
    size_t n, cap;
    char *arena;
    size_t len, acap;
    size_t bytes; /* name + value + 32 per entry, as SETTINGS_MAX_HEADER_LIST_SIZE counts */
    bool one;     /* v and arena are one block (v first) */
};

struct chunk {
    struct chunk *next;
    uint32_t off, len, cap;
    uint8_t data[];
};

struct kd_h2_call {
    struct kd_h2 *h;
    int32_t sid;
    const struct kd_h2_handler *handler; /* NULL once done */
    void *user;
    struct hdrs hdr; /* server: request headers; client: response headers */
    struct hdrs trl; /* client: trailers (or the only block of a trailers-only response) */
    struct hdrs fin; /* server: trailers to send */
    uint64_t deadline;
    struct kd_grpc_deframer df;
    struct chunk *out_head, *out_tail;
    size_t out_bytes;
    size_t unconsumed; /* inbound bytes not yet acknowledged (held input) */
    bool hold_input;
    bool headers_sent;      /* server: response HEADERS submitted */
    bool provider_live;     /* a data provider is attached to the stream */
    bool deferred;          /* the provider returned DEFERRED and waits for resume */
    bool finish_pending;    /* server: trailers go after the queued data */
    bool finished;          /* server: finish called */
    bool close_pending;     /* client: END_STREAM after the queued data */
    bool remote_closed;     /* peer sent END_STREAM */
    bool got_headers;       /* client: response headers seen */
    bool over_high;         /* send_message returned 1: on_writable owed */
    bool writable_due;      /* on_writable to run after mem_send */
    bool in_trailers;       /* receiving the second header block */
    bool end_on_goaway;     /* server: kd_h2_end_marked finishes it with OK */
    bool hdr_overflow;      /* server: request headers over a limit, the rest not stored */
    uint8_t pseudo_seen;    /* server: bit per request pseudo-header received (PS_*) */
    bool regular_seen;      /* server: a regular header came, so no pseudo-header may follow */
    const char *bad_header; /* server: why the request's header block is malformed (RST PROTOCOL_ERROR) */
    uint8_t recv_alg;       /* enum kd_compress_alg of the peer's grpc-encoding */
    uint8_t send_alg;       /* what our messages on this call are compressed with */
    int fin_status;
    struct kd_list link;     /* h->calls */
    struct kd_list writable; /* h->writable_list */
};

struct kd_h2 {
    nghttp2_session *s;
    struct kd_h2_opts o;
    struct kd_list calls;
    struct kd_list writable_list;
    size_t live;
    uint64_t last_ping_us;
    uint64_t ping_sent_us; /* our keepalive PING outstanding since then; 0: none */
    unsigned strikes;
    /* Received header bytes held by live calls (request headers, response headers and trailers),
     * against header_budget: max_header_list bounds one block, this bounds the connection. */
    size_t hdr_bytes, hdr_budget;
    bool fatal;
    const char *fatal_msg;
    /* GOAWAY: the graceful one (no error) at most once, then at most one final one (an error:
     * ours, or nghttp2's for a connection error it found). ours_queued: GOAWAYs we submitted that
     * are not written yet, so on_frame_send tells nghttp2's own apart (nghttp2 queues in order). */
    bool goaway_graceful, goaway_final;
    unsigned goaway_ours_queued;
    struct kd_h2_limits lim; /* opts.limits, or the defaults */
    struct bucket resets, settings;
    uint64_t settings_received;
    /* The header block being received: its wire bytes (HEADERS + CONTINUATION payloads) and what
     * it decoded to (as max_header_list counts), to tell an HPACK bomb from plain large metadata. */
    size_t hb_wire, hb_decoded;
    char *lib_err; /* nghttp2's last error text (error_callback2), for the log; made on the first */
    struct kd_h2_counters counters;
    /* zlib state, made on first use and reused by every call of the session (messages are inflated
     * and deflated whole, one at a time): an idle call holds none. */
    struct kd_inflater *inf;
    struct kd_deflater *def;
    /* A lower bound on the deadlines of live calls (UINT64_MAX: none was set since the last walk).
     * kd_h2_expire runs on every flush; while now is below this bound nothing can be due, so it
     * answers without walking every call of the connection. */
    uint64_t next_deadline;
    /* deliver() refused a message: status and message for on_data_chunk, which reads them right
     * after the deframer returns (per session, not per call: an idle call should not carry them;
     * the text is made on the first refusal, as lib_err: a healthy connection carries neither) */
    int fail_status;
    char *fail_msg;
    /* nghttp2's allocator for this session (ng_mem with mem_user_data = this), so the output frame
     * buffer it makes while the session is created (creating) can live in pages of its own (fb,
     * fb_len): see ng_malloc and kd_h2_shed. */
    nghttp2_mem mem;
    bool creating;
    void *fb;
    size_t fb_len;
};

/* ---- small helpers ---- */

static int hdrs_add(struct hdrs *hs, const uint8_t *name, size_t nlen, const uint8_t *value, size_t vlen)
{
    if (hs->one)
        return -EINVAL; /* compacted: complete, it takes no more entries (see hdrs_compact) */
    if (hs->n == hs->cap) {
        size_t ncap = hs->cap ? hs->cap * 2 : 8;
        struct hdr_ref *nv = kd_chunkpool_realloc(hs->v, ncap * sizeof(*nv));
        if (nv == NULL)
            return -ENOMEM;
        hs->v = nv;
        hs->cap = ncap;
    }
    if (hs->len + nlen + vlen + 2 > hs->acap) {
        size_t ncap = hs->acap ? hs->acap : 256;
        while (ncap < hs->len + nlen + vlen + 2)
            ncap *= 2;
        char *na = kd_chunkpool_realloc(hs->arena, ncap);
        if (na == NULL)
            return -ENOMEM;
        hs->arena = na;
        hs->acap = ncap;
    }
    struct hdr_ref *r = &hs->v[hs->n++];
    r->noff = (uint32_t)hs->len;
    r->nlen = (uint32_t)nlen;
    memcpy(hs->arena + hs->len, name, nlen);
    hs->len += nlen;
    hs->arena[hs->len++] = '\0';
    r->voff = (uint32_t)hs->len;
    r->vlen = (uint32_t)vlen;
    memcpy(hs->arena + hs->len, value, vlen);
    hs->len += vlen;
    hs->arena[hs->len++] = '\0';
    hs->bytes += nlen + vlen + 32;
    return 0;
}

static void hdrs_free(struct hdrs *hs)
{
    kd_chunkpool_free(hs->v);
    if (!hs->one)
        kd_chunkpool_free(hs->arena);
    memset(hs, 0, sizeof(*hs));
}

/* A complete block that stays as long as its call (an idle tunnel keeps its request headers for
 * hours): entries and names/values move into one block of exactly their size. About 1 KiB of
 * doubling slack per call otherwise. Left as it is when memory is short. Only a server's request
 * headers are compacted (on lean sessions, kd_h2_opts), once the block has ended: on_header stores
 * nothing more for that call. */
static void hdrs_compact(struct hdrs *hs)
{
    if (hs->one || hs->n == 0)
        return;
    size_t vbytes = hs->n * sizeof(*hs->v);
    char *blk = kd_chunkpool_malloc_exact(vbytes + hs->len);
    if (blk == NULL)
        return;
    memcpy(blk, hs->v, vbytes);
    memcpy(blk + vbytes, hs->arena, hs->len);
    kd_chunkpool_free(hs->v);
    kd_chunkpool_free(hs->arena);
    hs->v = (struct hdr_ref *)(void *)blk;
    hs->cap = hs->n;
    hs->arena = blk + vbytes;
    hs->acap = hs->len;
    hs->one = true;
}

static bool hdrs_get(const struct hdrs *hs, size_t i, struct kd_h2_header *out)
{
    if (i >= hs->n)
        return false;
    out->name = hs->arena + hs->v[i].noff;
    out->namelen = hs->v[i].nlen;
    out->value = hs->arena + hs->v[i].voff;
    out->valuelen = hs->v[i].vlen;
    return true;
}

static const char *hdrs_find(const struct hdrs *hs, const char *name, size_t *len)
{
    size_t nl = strlen(name);
    for (size_t i = 0; i < hs->n; i++) {
        if (hs->v[i].nlen == nl && memcmp(hs->arena + hs->v[i].noff, name, nl) == 0) {
            if (len)
                *len = hs->v[i].vlen;
            return hs->arena + hs->v[i].voff;
        }
    }
    return NULL;
}

static nghttp2_nv mknv(const char *name, size_t nlen, const char *value, size_t vlen)
{
    nghttp2_nv nv = {(uint8_t *)(uintptr_t)name, (uint8_t *)(uintptr_t)value, nlen, vlen,
                     NGHTTP2_NV_FLAG_NONE};
    return nv;
}

#define NV_LIT(n, v) mknv(n, sizeof(n) - 1, v, strlen(v))

static uint64_t now_us(void)
{
    return kd_clock_ns() / 1000u;
}

/* Queue one framed message (prefix + payload), contiguous in one chunk: appended to the tail chunk
 * when it has room (small messages of a stream share a chunk), otherwise in a new chunk from the
 * shard's pool sized to the message, never a fixed 16 KiB per message (see core/chunkpool.h). */
static int queue_message(struct kd_h2_call *c, const uint8_t pfx[KD_GRPC_PREFIX], const uint8_t *data,
                         size_t len)
{
    size_t need = KD_GRPC_PREFIX + len;
    struct chunk *t = c->out_tail;
    if (t == NULL || t->cap - t->len < need) {
        size_t bsize;
        t = kd_chunkpool_get(sizeof(*t) + need, &bsize);
        if (t == NULL)
            return -ENOMEM;
        t->next = NULL;
        t->off = t->len = 0;
        t->cap = (uint32_t)(bsize - sizeof(*t));
        if (c->out_tail)
            c->out_tail->next = t;
        else
            c->out_head = t;
        c->out_tail = t;
    }
    memcpy(t->data + t->len, pfx, KD_GRPC_PREFIX);
    if (len > 0)
        memcpy(t->data + t->len + KD_GRPC_PREFIX, data, len);
    t->len += (uint32_t)need;
    c->out_bytes += need;
    return 0;
}

static void chunk_free(struct chunk *ch)
{
    kd_chunkpool_put(ch, sizeof(*ch) + ch->cap);
}

static void drop_output(struct kd_h2_call *c)
{
    struct chunk *ch = c->out_head;
    while (ch) {
        struct chunk *n = ch->next;
        chunk_free(ch);
        ch = n;
    }
    c->out_head = c->out_tail = NULL;
    c->out_bytes = 0;
}

static void call_free(struct kd_h2_call *c)
{
    if (kd_list_is_linked(&c->link))
        kd_list_unlink(&c->link);
    if (kd_list_is_linked(&c->writable))
        kd_list_unlink(&c->writable);
    c->h->hdr_bytes -= c->hdr.bytes + c->trl.bytes;
    hdrs_free(&c->hdr);
    hdrs_free(&c->trl);
    hdrs_free(&c->fin);
    kd_grpc_deframer_free(&c->df);
    drop_output(c);
    kd_chunkpool_free(c);
}

static void set_deadline(struct kd_h2_call *c, uint64_t deadline)
{
    c->deadline = deadline;
    if (deadline < c->h->next_deadline)
        c->h->next_deadline = deadline;
}

static struct kd_h2_call *call_new(struct kd_h2 *h)
{
    struct kd_h2_call *c = kd_chunkpool_calloc(1, sizeof(*c));
    if (c == NULL)
        return NULL;
    c->h = h;
    kd_grpc_deframer_init(&c->df, h->o.max_message);
    kd_list_node_init(&c->writable);
    kd_list_push_back(&h->calls, &c->link);
    h->counters.calls_started++;
    return c;
}

/* Tell the handler the call is over (once). */
static void call_done(struct kd_h2_call *c, int status, const char *message)
{
    const struct kd_h2_handler *hd = c->handler;
    if (hd == NULL)
        return;
    if (c->unconsumed > 0) {
        /* Bytes held back (hold_input) count against the connection's window too: give them
         * back, or every call ending while held would shrink the connection for good. */
        nghttp2_session_consume(c->h->s, c->sid, c->unconsumed);
        c->unconsumed = 0;
    }
    c->hold_input = false;
    c->handler = NULL;
    c->h->live--;
    if (kd_list_is_linked(&c->writable))
        kd_list_unlink(&c->writable);
    if (hd->on_done)
        hd->on_done(c, status, message ? message : "");
}

static void resume(struct kd_h2_call *c)
{
    if (c->provider_live && c->deferred) {
        c->deferred = false;
        nghttp2_session_resume_data(c->h->s, c->sid);
    }
}

/* ---- data provider: pulls queued messages, ends with trailers or END_STREAM ---- */

static ssize_t read_cb(nghttp2_session *s, int32_t sid, uint8_t *buf, size_t length, uint32_t *flags,
                       nghttp2_data_source *src, void *ud)
{
    struct kd_h2_call *c = src->ptr;
    size_t n = 0;
    while (n < length && c->out_head != NULL) {
        struct chunk *ch = c->out_head;
        size_t take = ch->len - ch->off;
        if (take > length - n)
            take = length - n;
        memcpy(buf + n, ch->data + ch->off, take);
        ch->off += (uint32_t)take;
        n += take;
        c->out_bytes -= take;
        if (ch->off == ch->len) {
            c->out_head = ch->next;
            if (c->out_head == NULL)
                c->out_tail = NULL;
            chunk_free(ch);
        }
    }
    if (c->over_high && c->out_bytes < LOW_WATER && c->handler != NULL) {
        c->over_high = false;
        c->writable_due = true;
        if (!kd_list_is_linked(&c->writable))
            kd_list_push_back(&c->h->writable_list, &c->writable);
    }
    if (c->out_bytes > 0)
        return (ssize_t)n;
    if (c->finish_pending) {
        /* Last data: end it here and put the status in trailers. */
        nghttp2_nv nva[64];
        size_t nn = 0;
        struct kd_h2_header hh;
        for (size_t i = 0; hdrs_get(&c->fin, i, &hh) && nn < 64; i++)
            nva[nn++] = mknv(hh.name, hh.namelen, hh.value, hh.valuelen);
        *flags |= NGHTTP2_DATA_FLAG_EOF | NGHTTP2_DATA_FLAG_NO_END_STREAM;
        c->finish_pending = false;
        c->provider_live = false;
        if (nghttp2_submit_trailer(s, sid, nva, nn) != 0)
            return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
        return (ssize_t)n;
    }
    if (c->close_pending) {
        *flags |= NGHTTP2_DATA_FLAG_EOF;
        c->close_pending = false;
        c->provider_live = false;
        return (ssize_t)n;
    }
    if (n == 0) {
        c->deferred = true;
        return NGHTTP2_ERR_DEFERRED;
    }
    return (ssize_t)n;
}

/* ---- server: request side ---- */

static int fail_server_call(struct kd_h2_call *c, int status, const char *msg)
{
    if (!c->finished)
        kd_h2_call_finish(c, status, msg, NULL, 0);
    call_done(c, status, msg);
    return 0;
}

static void consume(struct kd_h2_call *c, size_t len)
{
    if (c->hold_input) {
        c->unconsumed += len;
    } else {
        nghttp2_session_consume(c->h->s, c->sid, len);
    }
}

static int refuse(struct kd_h2_call *c, int status, const char *msg)
{
    struct kd_h2 *h = c->h;
    if (h->fail_msg == NULL && (h->fail_msg = malloc(FAIL_MSG_MAX)) == NULL)
        return -ENOMEM; /* the call fails with "handler failed" instead */
    h->fail_status = status;
    snprintf(h->fail_msg, FAIL_MSG_MAX, "%s", msg);
    return -ECANCELED;
}

static int deliver(void *ud, const uint8_t *msg, size_t len, bool compressed)
{
    struct kd_h2_call *c = ud;
    if (c->handler == NULL || c->handler->on_message == NULL)
        return 0;
    if (!compressed)
        return c->handler->on_message(c, msg, len);
    /* grpc-go's wording for each refusal, so callers see what a kas would say. */
    if (c->recv_alg == KD_COMPRESS_IDENTITY)
        return refuse(c, KD_GRPC_INTERNAL, "grpc: compressed flag set with identity or empty encoding");
    struct kd_h2 *h = c->h;
    if (h->inf == NULL && (h->inf = kd_inflater_new()) == NULL)
        return -ENOMEM;
    struct kd_compress_buf out;
    int rc = kd_inflater_run(h->inf, c->recv_alg, msg, len, h->o.max_message, &out);
    if (rc == -EMSGSIZE) {
        char m[FAIL_MSG_MAX];
        snprintf(m, sizeof(m), "grpc: received message after decompression larger than max (%llu vs. %u)%s%s",
                 (unsigned long long)h->o.max_message + 1, h->o.max_message, h->o.max_message_key ? "; " : "",
                 h->o.max_message_key ? h->o.max_message_key : "");
        return refuse(c, KD_GRPC_RESOURCE_EXHAUSTED, m);
    }
    if (rc == -EBADMSG)
        return refuse(c, KD_GRPC_INTERNAL,
                      "grpc: failed to decompress the received message: corrupt, truncated or trailing data");
    if (rc < 0)
        return rc;
    rc = c->handler->on_message(c, out.data, out.len);
    kd_compress_buf_release(&out);
    return rc;
}

static int on_data_chunk(nghttp2_session *s, uint8_t flags, int32_t sid, const uint8_t *data, size_t len,
                         void *ud)
{
    struct kd_h2_call *c = nghttp2_session_get_stream_user_data(s, sid);
    if (c == NULL) {
        nghttp2_session_consume(s, sid, len);
        return 0;
    }
    if (c->handler == NULL) {
        /* Done already (e.g. finished early): drop, but keep the windows open. */
        nghttp2_session_consume(s, sid, len);
        return 0;
    }
    struct kd_h2 *h = c->h;
    h->fail_status = KD_GRPC_INTERNAL;
    if (h->fail_msg != NULL)
        snprintf(h->fail_msg, FAIL_MSG_MAX, "grpc: message refused");
    int rc = kd_grpc_deframer_feed(&c->df, data, len, deliver, c);
    consume(c, len);
    if (rc == -EMSGSIZE) {
        char msg[160];
        const char *key = c->h->o.max_message_key;
        snprintf(msg, sizeof(msg), "grpc: received message larger than max (%u bytes)%s%s",
                 c->h->o.max_message, key ? "; " : "", key ? key : "");
        if (c->h->o.server) {
            fail_server_call(c, KD_GRPC_RESOURCE_EXHAUSTED, msg);
        } else {
            kd_h2_call_cancel(c, KD_GRPC_RESOURCE_EXHAUSTED, msg);
        }
    } else if (rc == -ECANCELED || rc == -EPROTO) {
        const char *msg = rc == -EPROTO         ? "grpc: reserved flag bits set in a message prefix"
                          : h->fail_msg != NULL ? h->fail_msg
                                                : "grpc: message refused";
        int st = rc == -EPROTO ? KD_GRPC_INTERNAL : h->fail_status;
        if (c->h->o.server)
            fail_server_call(c, st, msg);
        else
            kd_h2_call_cancel(c, st, msg);
    } else if (rc < 0) {
        if (c->h->o.server)
            fail_server_call(c, KD_GRPC_INTERNAL, "grpc: handler failed");
        else
            kd_h2_call_cancel(c, KD_GRPC_CANCELLED, "grpc: handler failed");
    }
    return 0;
}

static int on_begin_headers(nghttp2_session *s, const nghttp2_frame *f, void *ud)
{
    struct kd_h2 *h = ud;
    if (!h->o.server || f->hd.type != NGHTTP2_HEADERS || f->headers.cat != NGHTTP2_HCAT_REQUEST)
        return 0;
    struct kd_h2_call *c = call_new(h);
    if (c == NULL)
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    c->sid = f->hd.stream_id;
    nghttp2_session_set_stream_user_data(s, c->sid, c);
    return 0;
}

/* Server request headers are checked here rather than by nghttp2's HTTP messaging layer, which
 * the server session turns off: nghttp2 refuses an :authority outside RFC 3986's host syntax, and
 * grpc-go clients dialling through a custom dialer (agentk's ws:// and wss:// addresses through
 * "passthrough:") send the whole URL there ("ws://kas.example.com"), which grpc-go servers (GitLab
 * kas) accept. Everything else nghttp2 would refuse in a request header block is refused here:
 * names that are not lower-case tokens, NUL/CR/LF in values, unknown, repeated or late
 * pseudo-headers, connection-specific headers, TE other than "trailers". */
enum { PS_METHOD = 1, PS_SCHEME = 2, PS_PATH = 4, PS_AUTHORITY = 8 };

static bool lit_eq(const uint8_t *p, size_t n, const char *lit)
{
    return n == strlen(lit) && memcmp(p, lit, n) == 0;
}

static const char *request_header_check(struct kd_h2_call *c, const uint8_t *name, size_t nlen,
                                        const uint8_t *value, size_t vlen)
{
    for (size_t i = 0; i < vlen; i++)
        if (value[i] == 0 || value[i] == '\r' || value[i] == '\n')
            return "NUL, CR or LF in a header value";
    if (nlen == 0)
        return "empty header name";
    if (name[0] == ':') {
        uint8_t bit = lit_eq(name, nlen, ":method")      ? PS_METHOD
                      : lit_eq(name, nlen, ":scheme")    ? PS_SCHEME
                      : lit_eq(name, nlen, ":path")      ? PS_PATH
                      : lit_eq(name, nlen, ":authority") ? PS_AUTHORITY
                                                         : 0;
        if (bit == 0)
            return "unknown pseudo-header";
        if (c->regular_seen)
            return "pseudo-header after a regular header";
        if (c->pseudo_seen & bit)
            return "repeated pseudo-header";
        if (bit == PS_PATH && vlen == 0)
            return "empty :path";
        c->pseudo_seen |= bit;
        return NULL;
    }
    c->regular_seen = true;
    for (size_t i = 0; i < nlen; i++) {
        uint8_t ch = name[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') ||
              strchr("!#$%&'*+-.^_`|~", ch) != NULL) ||
            ch == 0)
            return "header name is not a lower-case token";
    }
    if (lit_eq(name, nlen, "connection") || lit_eq(name, nlen, "keep-alive") ||
        lit_eq(name, nlen, "proxy-connection") || lit_eq(name, nlen, "transfer-encoding") ||
        lit_eq(name, nlen, "upgrade"))
        return "connection-specific header";
    if (lit_eq(name, nlen, "te") && !lit_eq(value, vlen, "trailers"))
        return "te other than trailers";
    return NULL;
}

static int on_header(nghttp2_session *s, const nghttp2_frame *f, const uint8_t *name, size_t nlen,
                     const uint8_t *value, size_t vlen, uint8_t flags, void *ud)
{
    struct kd_h2 *h = ud;
    if (f->hd.type != NGHTTP2_HEADERS)
        return 0;
    h->hb_decoded += nlen + vlen + 32;
    struct kd_h2_call *c = nghttp2_session_get_stream_user_data(s, f->hd.stream_id);
    if (c == NULL)
        return 0;
    struct hdrs *hs;
    if (h->o.server) {
        if (f->headers.cat != NGHTTP2_HCAT_REQUEST)
            return 0; /* client trailers carry nothing gRPC uses */
        if (c->bad_header != NULL)
            return 0; /* refused already: reset when the block is complete */
        if ((c->bad_header = request_header_check(c, name, nlen, value, vlen)) != NULL)
            return 0;
        hs = &c->hdr;
    } else {
        /* A response HEADERS with END_STREAM and no earlier headers is trailers-only. */
        bool trailers = c->got_headers || (f->hd.flags & NGHTTP2_FLAG_END_STREAM);
        hs = trailers ? &c->trl : &c->hdr;
    }
    size_t add = nlen + vlen + 32;
    if (h->o.server && c->hdr_overflow)
        return 0; /* refused already: answered when the block is complete */
    if (hs->bytes + add > h->o.max_header_list || h->hdr_bytes + add > h->hdr_budget) {
        h->counters.headers_refused++;
        if (!h->o.server)
            return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE; /* nghttp2 resets the stream */
        /* Keep reading the block (HPACK state must follow it) but store nothing more; the call
         * gets a gRPC status instead of a bare RST_STREAM. */
        c->hdr_overflow = true;
        return 0;
    }
    if (hdrs_add(hs, name, nlen, value, vlen) < 0)
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    h->hdr_bytes += add;
    return 0;
}

static int server_request_ready(struct kd_h2 *h, struct kd_h2_call *c, bool end_stream)
{
    size_t ctlen = 0;
    if (c->bad_header == NULL &&
        (c->pseudo_seen & (PS_METHOD | PS_SCHEME | PS_PATH)) != (PS_METHOD | PS_SCHEME | PS_PATH))
        c->bad_header = "missing :method, :scheme or :path";
    if (c->bad_header != NULL) {
        /* A malformed request (RFC 9113 8.1.1): the stream is reset, as nghttp2 would. */
        c->finished = true;
        nghttp2_submit_rst_stream(h->s, NGHTTP2_FLAG_NONE, c->sid, NGHTTP2_PROTOCOL_ERROR);
        return 0;
    }
    if (c->hdr_overflow) {
        char msg[160];
        if (h->o.on_abuse) {
            char why[96];
            bool bomb = h->hb_decoded > HPACK_AMPLIFY_MAX * h->hb_wire;
            snprintf(why, sizeof(why), "request headers of %zu bytes (%zu on the wire) over the limit",
                     h->hb_decoded, h->hb_wire);
            h->o.on_abuse(h->o.ud, bomb ? KD_H2_ABUSE_HPACK : KD_H2_ABUSE_HEADER_OVERFLOW, why);
        }
        snprintf(msg, sizeof(msg),
                 "grpc: request metadata larger than the server accepts (%u bytes per call, fewer "
                 "while other calls of the connection hold large metadata)",
                 h->o.max_header_list);
        kd_h2_call_finish(c, KD_GRPC_RESOURCE_EXHAUSTED, msg, NULL, 0);
        return 0;
    }
    const char *method = hdrs_find(&c->hdr, ":method", NULL);
    const char *ct = hdrs_find(&c->hdr, "content-type", &ctlen);
    if (method == NULL || strcmp(method, "POST") != 0 || ct == NULL || ctlen < 16 ||
        memcmp(ct, "application/grpc", 16) != 0 || (ctlen > 16 && ct[16] != '+' && ct[16] != ';')) {
        /* Not gRPC: answer in HTTP terms (415), as gRPC servers do. */
        nghttp2_nv nva[] = {NV_LIT(":status", "415"), NV_LIT("content-type", "text/plain")};
        c->finished = true;
        nghttp2_submit_response(h->s, c->sid, nva, 2, NULL);
        return 0;
    }
    size_t tlen;
    const char *t = hdrs_find(&c->hdr, "grpc-timeout", &tlen);
    if (t != NULL) {
        uint64_t us;
        if (kd_grpc_timeout_parse(t, tlen, &us) == 0) {
            set_deadline(c, now_us() + us);
        } else {
            kd_h2_call_finish(c, KD_GRPC_INTERNAL, "grpc: malformed grpc-timeout", NULL, 0);
            return 0;
        }
    }
    size_t elen = 0, alen = 0;
    const char *enc = hdrs_find(&c->hdr, "grpc-encoding", &elen);
    if (enc != NULL) {
        int alg = kd_compress_alg_parse(enc, elen);
        if (alg < 0) {
            char m[160];
            snprintf(m, sizeof(m), "grpc: Decompressor is not installed for grpc-encoding \"%.*s\"",
                     (int)(elen > 64 ? 64 : elen), enc);
            /* the trailers-only response carries grpc-accept-encoding, as grpc-go's does */
            kd_h2_call_finish(c, KD_GRPC_UNIMPLEMENTED, m, NULL, 0);
            return 0;
        }
        c->recv_alg = (uint8_t)alg;
    }
    const char *acc = hdrs_find(&c->hdr, "grpc-accept-encoding", &alen);
    if (h->o.send_compression != KD_COMPRESS_IDENTITY && acc != NULL &&
        kd_compress_accepts(acc, alen, h->o.send_compression))
        c->send_alg = h->o.send_compression;
    c->remote_closed = end_stream;
    if (h->o.lean)
        hdrs_compact(&c->hdr); /* complete: a request's headers get no more entries */
    int rc = h->o.on_call ? h->o.on_call(h->o.ud, c) : KD_GRPC_UNIMPLEMENTED;
    if (rc != 0 || c->handler == NULL) {
        /* Rejected, or answered already inside on_call without a handler. */
        if (!c->finished)
            kd_h2_call_finish(c, rc > 0 ? rc : KD_GRPC_UNIMPLEMENTED, rc > 0 ? NULL : "no handler", NULL, 0);
        call_done(c, rc > 0 ? rc : KD_GRPC_UNIMPLEMENTED, NULL);
        return 0;
    }
    if (end_stream && c->handler && c->handler->on_half_close)
        c->handler->on_half_close(c);
    return 0;
}

static void client_final(struct kd_h2_call *c)
{
    /* Status from the trailers (or the trailers-only block). */
    size_t len = 0, mlen = 0;
    const char *st = hdrs_find(&c->trl, "grpc-status", &len);
    const char *msg = hdrs_find(&c->trl, "grpc-message", &mlen);
    char decoded[1024];
    int status;
    if (st != NULL) {
        status = 0;
        for (size_t i = 0; i < len && i < 4; i++)
            status = status * 10 + (st[i] - '0');
        if (len == 0 || len > 2 || st[0] < '0' || st[0] > '9')
            status = KD_GRPC_UNKNOWN;
    } else {
        const char *hs = hdrs_find(&c->hdr, ":status", NULL);
        if (hs == NULL)
            hs = hdrs_find(&c->trl, ":status", NULL);
        int http = hs ? atoi(hs) : 0;
        /* The gRPC mapping of HTTP statuses for responses without grpc-status. */
        status = http == 400                                                  ? KD_GRPC_INTERNAL
                 : http == 401                                                ? KD_GRPC_UNAUTHENTICATED
                 : http == 403                                                ? KD_GRPC_PERMISSION_DENIED
                 : http == 404                                                ? KD_GRPC_UNIMPLEMENTED
                 : (http == 429 || http == 502 || http == 503 || http == 504) ? KD_GRPC_UNAVAILABLE
                                                                              : KD_GRPC_UNKNOWN;
        msg = "missing grpc-status";
        mlen = strlen(msg);
    }
    if (msg != NULL)
        kd_grpc_message_decode(msg, mlen, decoded, sizeof(decoded));
    else
        decoded[0] = '\0';
    call_done(c, status, decoded);
}

static void submit_goaway(struct kd_h2 *h, uint32_t code, const char *debug)
{
    int32_t last = h->o.server ? nghttp2_session_get_last_proc_stream_id(h->s) : 0;
    if (nghttp2_submit_goaway(h->s, NGHTTP2_FLAG_NONE, last, code, (const uint8_t *)debug,
                              debug ? strlen(debug) : 0) == 0)
        h->goaway_ours_queued++;
}

/* The peer is abusive: one final GOAWAY (unless one went already), report it, and stop reading.
 * The caller returns NGHTTP2_ERR_CALLBACK_FAILURE so nghttp2 parses nothing more of the buffer: a
 * flood's remaining frames would otherwise each be acted on (each PING past the strikes used to
 * queue one more GOAWAY). */
static int abuse_fatal(struct kd_h2 *h, enum kd_h2_abuse reason, const char *debug, const char *msg)
{
    if (h->fatal)
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    h->fatal = true;
    h->fatal_msg = msg;
    if (!h->goaway_final) {
        h->goaway_final = true;
        submit_goaway(h, NGHTTP2_ENHANCE_YOUR_CALM, debug);
    }
    if (h->o.on_abuse)
        h->o.on_abuse(h->o.ud, reason, msg);
    return NGHTTP2_ERR_CALLBACK_FAILURE;
}

static int on_begin_frame(nghttp2_session *s, const nghttp2_frame_hd *hd, void *ud)
{
    struct kd_h2 *h = ud;
    if (hd->type == NGHTTP2_HEADERS) {
        h->hb_wire = hd->length;
        h->hb_decoded = 0;
    } else if (hd->type == NGHTTP2_CONTINUATION) {
        h->hb_wire += hd->length;
    }
    return 0;
}

static int on_error(nghttp2_session *s, int lib_error_code, const char *msg, size_t len, void *ud)
{
    struct kd_h2 *h = ud;
    if (h->lib_err == NULL && (h->lib_err = malloc(LIB_ERR_MAX)) == NULL)
        return 0; /* the log line says "connection error" instead */
    snprintf(h->lib_err, LIB_ERR_MAX, "%.*s", (int)len, msg);
    return 0;
}

static int on_frame_recv(nghttp2_session *s, const nghttp2_frame *f, void *ud)
{
    struct kd_h2 *h = ud;
    bool end = (f->hd.flags & NGHTTP2_FLAG_END_STREAM) != 0;
    struct kd_h2_call *c = f->hd.stream_id ? nghttp2_session_get_stream_user_data(s, f->hd.stream_id) : NULL;
    switch (f->hd.type) {
    case NGHTTP2_HEADERS:
        if (c == NULL)
            break;
        if (h->o.server) {
            if (f->headers.cat == NGHTTP2_HCAT_REQUEST)
                return server_request_ready(h, c, end);
            /* trailers from the client: a half-close */
            if (end && !c->remote_closed) {
                c->remote_closed = true;
                if (c->handler && c->handler->on_half_close)
                    c->handler->on_half_close(c);
            }
        } else {
            if (!c->got_headers && !end) {
                c->got_headers = true;
                size_t elen = 0;
                const char *enc = hdrs_find(&c->hdr, "grpc-encoding", &elen);
                int alg = enc ? kd_compress_alg_parse(enc, elen) : KD_COMPRESS_IDENTITY;
                if (alg < 0) {
                    char m[160];
                    snprintf(m, sizeof(m), "grpc: Decompressor is not installed for grpc-encoding \"%.*s\"",
                             (int)(elen > 64 ? 64 : elen), enc);
                    kd_h2_call_cancel(c, KD_GRPC_INTERNAL, m);
                    break;
                }
                c->recv_alg = (uint8_t)alg;
                if (c->handler && c->handler->on_headers && c->handler->on_headers(c) < 0)
                    kd_h2_call_cancel(c, KD_GRPC_CANCELLED, "grpc: handler refused headers");
            } else if (end) {
                c->remote_closed = true;
                if (!kd_grpc_deframer_idle(&c->df))
                    call_done(c, KD_GRPC_INTERNAL, "grpc: stream ended inside a message");
                else
                    client_final(c);
            }
        }
        break;
    case NGHTTP2_DATA:
        if (c == NULL || !end)
            break;
        c->remote_closed = true;
        if (h->o.server) {
            if (!kd_grpc_deframer_idle(&c->df))
                fail_server_call(c, KD_GRPC_INTERNAL, "grpc: stream ended inside a message");
            else if (c->handler && c->handler->on_half_close)
                c->handler->on_half_close(c);
        } else {
            /* DATA with END_STREAM and no trailers: the status is missing. */
            call_done(c, KD_GRPC_INTERNAL, "grpc: response ended without trailers");
        }
        break;
    case NGHTTP2_PING:
        if (f->hd.flags & NGHTTP2_FLAG_ACK) {
            /* Only our own PINGs are acknowledged by the peer (nghttp2 answers theirs). */
            h->ping_sent_us = 0;
            h->counters.ping_acks++;
            h->counters.last_ping_ack_us = now_us();
            break;
        }
        h->counters.pings_received++;
        if (h->o.server && h->o.ping_min_interval_ms > 0) {
            uint64_t t = now_us();
            if (h->last_ping_us != 0 && t - h->last_ping_us < (uint64_t)h->o.ping_min_interval_ms * 1000u) {
                h->strikes++;
                h->counters.ping_strikes++;
                if (h->strikes > h->lim.ping_strikes)
                    return abuse_fatal(h, KD_H2_ABUSE_PING_FLOOD, "too_many_pings",
                                       "client pinged too often (GOAWAY ENHANCE_YOUR_CALM too_many_pings)");
            }
            h->last_ping_us = t;
        }
        break;
    case NGHTTP2_GOAWAY:
        if (h->o.on_goaway)
            h->o.on_goaway(h->o.ud, f->goaway.error_code);
        break;
    case NGHTTP2_RST_STREAM:
        /* Each reset stream cost a call's start (headers, routing) and nothing of the client's:
         * resetting at once, thousands per second, is the rapid reset attack. */
        if (h->o.server && !bucket_take(&h->resets, now_us(), h->lim.reset_burst, h->lim.reset_rate))
            return abuse_fatal(h, KD_H2_ABUSE_RAPID_RESET, "rapid_reset",
                               "client reset streams faster than allowed (GOAWAY ENHANCE_YOUR_CALM)");
        break;
    case NGHTTP2_SETTINGS:
        if (!(f->hd.flags & NGHTTP2_FLAG_ACK))
            h->settings_received++;
        if (!(f->hd.flags & NGHTTP2_FLAG_ACK) &&
            !bucket_take(&h->settings, now_us(), h->lim.settings_burst, h->lim.settings_rate))
            return abuse_fatal(h, KD_H2_ABUSE_SETTINGS_FLOOD, "settings_flood",
                               "peer sent SETTINGS faster than allowed (GOAWAY ENHANCE_YOUR_CALM)");
        break;
    default:
        break;
    }
    return 0;
}

static int on_frame_send(nghttp2_session *s, const nghttp2_frame *f, void *ud)
{
    struct kd_h2 *h = ud;
    if (f->hd.type == NGHTTP2_HEADERS || f->hd.type == NGHTTP2_DATA)
        h->strikes = 0; /* as grpc-go: pings are fine while we are sending */
    if (f->hd.type == NGHTTP2_GOAWAY) {
        h->counters.goaways_sent++;
        if (h->goaway_ours_queued > 0) {
            h->goaway_ours_queued--;
        } else {
            /* nghttp2's own: it found a connection error in what the peer sent. */
            h->goaway_final = true;
            if (h->o.on_abuse && f->goaway.error_code != NGHTTP2_NO_ERROR) {
                char why[160];
                snprintf(why, sizeof(why), "GOAWAY %s: %s", nghttp2_http2_strerror(f->goaway.error_code),
                         h->lib_err != NULL ? h->lib_err : "connection error");
                h->o.on_abuse(h->o.ud,
                              f->goaway.error_code == NGHTTP2_COMPRESSION_ERROR ? KD_H2_ABUSE_HPACK
                                                                                : KD_H2_ABUSE_PROTOCOL_ERROR,
                              why);
            }
        }
    }
    if (h->o.server && f->hd.type == NGHTTP2_HEADERS && (f->hd.flags & NGHTTP2_FLAG_END_STREAM)) {
        /* Status sent. If the client is still sending, stop it: the call is over. */
        if (!nghttp2_session_get_stream_remote_close(s, f->hd.stream_id))
            nghttp2_submit_rst_stream(s, NGHTTP2_FLAG_NONE, f->hd.stream_id, NGHTTP2_NO_ERROR);
    }
    return 0;
}

/* A request nghttp2 will never send (e.g. GOAWAY arrived first): end the call now rather than when
 * the connection finally closes. The struct stays on the list and is freed with the session. */
static int on_frame_not_send(nghttp2_session *s, const nghttp2_frame *f, int lib_error_code, void *ud)
{
    struct kd_h2 *h = ud;
    if (h->o.server || f->hd.type != NGHTTP2_HEADERS || f->headers.cat != NGHTTP2_HCAT_REQUEST)
        return 0;
    struct kd_h2_call *c = nghttp2_session_get_stream_user_data(s, f->hd.stream_id);
    if (c != NULL)
        call_done(c, KD_GRPC_UNAVAILABLE, "request not sent: the connection is going away");
    return 0;
}

static int on_stream_close(nghttp2_session *s, int32_t sid, uint32_t error_code, void *ud)
{
    struct kd_h2 *h = ud;
    struct kd_h2_call *c = nghttp2_session_get_stream_user_data(s, sid);
    if (c == NULL)
        return 0;
    if (c->handler != NULL) {
        if (h->o.server) {
            if (c->finished && error_code == NGHTTP2_NO_ERROR)
                call_done(c, c->fin_status, NULL);
            else
                call_done(c, KD_GRPC_CANCELLED, "stream reset by the client");
        } else {
            call_done(c, error_code == NGHTTP2_REFUSED_STREAM ? KD_GRPC_UNAVAILABLE : KD_GRPC_CANCELLED,
                      error_code == NGHTTP2_REFUSED_STREAM ? "stream refused by the server"
                                                           : "stream reset by the server");
        }
    }
    nghttp2_session_set_stream_user_data(s, sid, NULL);
    call_free(c);
    return 0;
}

/* ---- session ---- */

/* nghttp2's allocations (streams, frames, header copies, HPACK) come from the shard's pool too:
 * with many calls in flight they made up a good part of the malloc traffic per routed call, and
 * glibc's per-thread cache (7 blocks per size) could not absorb it.
 *
 * One exception: the session's output frame buffer. nghttp2 allocates it when the session is made
 * (16,394 bytes: a frame header, a padding byte and a 16 KiB payload) and keeps it for the
 * session's life, yet its bytes are dead between two nghttp2_session_mem_send calls (each frame is
 * copied out at once, kd_h2_send). In the heap, the pages small frames touch stay resident for
 * every idle connection, next to other blocks. So the one big block asked for while the session is
 * being created gets page-aligned memory of its own (a slot, fb_get: untouched pages cost nothing)
 * and kd_h2_shed can give its pages back while the connection is quiet. nghttp2 names no allocation, so "made
 * during creation, at least 16 KiB" is how it is told apart; every other block, and any later frame-buffer
 * chain (long header blocks), stays in the pool and is never shed. */
#define FB_MIN 16384u

/* Frame-buffer slots: page-aligned blocks of FB_SLOT bytes carved from mappings of FB_PER_MAP
 * slots, shared by every thread (a mutex: a slot is taken once per connection). One mapping per
 * buffer would cost a kernel VMA each once frees leave holes, and vm.max_map_count (65,530 by
 * default) is within reach of an instance's agent count. A freed slot's pages go back at once
 * (MADV_DONTNEED), so a slot handed out is zero and costs nothing until written; the free list is
 * a separate array, so it touches no freed slot. Mappings are kept: their address space stays
 * reserved, not their memory. */
#define FB_SLOT    20480u /* 16,394 bytes rounded up to 4 KiB pages */
#define FB_PER_MAP 100u
static pthread_mutex_t fb_lock = PTHREAD_MUTEX_INITIALIZER;
static void **fb_free; /* free slots */
static size_t fb_nfree, fb_cap;

static void *fb_get(void)
{
    void *p = NULL;
    pthread_mutex_lock(&fb_lock);
    if (fb_nfree == 0 && fb_cap < SIZE_MAX / sizeof(void *) / 2 - FB_PER_MAP) {
        void **nf = realloc(fb_free, (fb_cap + FB_PER_MAP) * sizeof(void *));
        uint8_t *m = mmap(NULL, (size_t)FB_SLOT * FB_PER_MAP, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (nf != NULL)
            fb_free = nf;
        if (nf != NULL && m != MAP_FAILED) {
            fb_cap += FB_PER_MAP;
            for (unsigned i = FB_PER_MAP; i-- > 0;) /* slot 0 on top: handed out first */
                fb_free[fb_nfree++] = m + (size_t)i * FB_SLOT;
        } else if (m != MAP_FAILED) {
            munmap(m, (size_t)FB_SLOT * FB_PER_MAP);
        }
    }
    if (fb_nfree > 0)
        p = fb_free[--fb_nfree];
    pthread_mutex_unlock(&fb_lock);
    return p;
}

static void fb_put(void *p)
{
    madvise(p, FB_SLOT, MADV_DONTNEED);
    pthread_mutex_lock(&fb_lock);
    fb_free[fb_nfree++] = p; /* room: fb_cap counts every slot ever made */
    pthread_mutex_unlock(&fb_lock);
}

static void *ng_malloc(size_t size, void *ud)
{
    struct kd_h2 *h = ud;
    if (h->creating && h->fb == NULL && size >= FB_MIN && size <= FB_SLOT) {
        void *p = fb_get();
        if (p != NULL) {
            h->fb = p;
            h->fb_len = FB_SLOT;
            return p;
        }
    }
    /* The rest of what the session is made of lives as long as it does: no class rounding. */
    return h->creating ? kd_chunkpool_malloc_exact(size) : kd_chunkpool_malloc(size);
}

static void ng_free(void *p, void *ud)
{
    struct kd_h2 *h = ud;
    if (p != NULL && p == h->fb) {
        fb_put(p);
        h->fb = NULL;
        return;
    }
    kd_chunkpool_free(p);
}

static void *ng_calloc(size_t n, size_t size, void *ud)
{
    struct kd_h2 *h = ud;
    if (!h->creating)
        return kd_chunkpool_calloc(n, size);
    if (size != 0 && n > SIZE_MAX / size)
        return NULL;
    void *p = ng_malloc(n * size, ud);
    if (p != NULL && p != h->fb)
        memset(p, 0, n * size); /* a slot is zero already (fb_put) */
    return p;
}

static void *ng_realloc(void *p, size_t size, void *ud)
{
    if (p == NULL)
        return ng_malloc(size, ud);
    struct kd_h2 *h = ud;
    if (p == h->fb) {
        if (size <= h->fb_len)
            return p;
        void *q = kd_chunkpool_malloc(size);
        if (q == NULL)
            return NULL;
        memcpy(q, p, h->fb_len);
        ng_free(p, ud);
        return q;
    }
    return kd_chunkpool_realloc(p, size);
}

static nghttp2_mem ng_mem = {NULL, ng_malloc, ng_free, ng_calloc, ng_realloc};

struct kd_h2 *kd_h2_new(const struct kd_h2_opts *o)
{
    struct kd_h2 *h = calloc(1, sizeof(*h));
    nghttp2_session_callbacks *cb;
    nghttp2_option *opt;
    if (h == NULL)
        return NULL;
    h->o = *o;
    h->lim = o->limits != NULL ? *o->limits
                               : (struct kd_h2_limits){.reset_burst = KD_H2_RESET_BURST,
                                                       .reset_rate = KD_H2_RESET_RATE,
                                                       .settings_burst = KD_H2_SETTINGS_BURST,
                                                       .settings_rate = KD_H2_SETTINGS_RATE,
                                                       .ping_strikes = KD_H2_PING_STRIKES};
    h->o.limits = NULL; /* copied into lim: the caller's struct is not kept */
    h->next_deadline = UINT64_MAX;
    kd_list_init(&h->calls);
    kd_list_init(&h->writable_list);
    if (nghttp2_session_callbacks_new(&cb) != 0) {
        free(h);
        return NULL;
    }
    nghttp2_session_callbacks_set_on_begin_headers_callback(cb, on_begin_headers);
    nghttp2_session_callbacks_set_on_header_callback(cb, on_header);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cb, on_frame_recv);
    nghttp2_session_callbacks_set_on_frame_send_callback(cb, on_frame_send);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, on_data_chunk);
    nghttp2_session_callbacks_set_on_stream_close_callback(cb, on_stream_close);
    nghttp2_session_callbacks_set_on_frame_not_send_callback(cb, on_frame_not_send);
    nghttp2_session_callbacks_set_on_begin_frame_callback(cb, on_begin_frame);
    nghttp2_session_callbacks_set_error_callback2(cb, on_error);
    nghttp2_option_new(&opt);
    nghttp2_option_set_no_auto_window_update(opt, 1);
    /* nghttp2 keeps closed streams around for RFC 7540 priorities, which gRPC never uses; an idle
     * agent's finished Register stream cost about 0.3 KiB of its connection. */
    nghttp2_option_set_no_closed_streams(opt, 1);
    if (o->lean)
        nghttp2_option_set_max_deflate_dynamic_table_size(opt, 0);
    nghttp2_option_set_max_send_header_block_length(opt, 65536);
    if (o->server)
        nghttp2_option_set_no_http_messaging(opt, 1); /* see request_header_check() */
    /* nghttp2 refuses (connection error) header blocks spread over more than 8 CONTINUATION
     * frames by default; a client sends a block at our 16 KiB frame size, so a block as large as
     * max_header_list needs about limit / 16 KiB. Twice that, so a client over the limit still gets
     * a gRPC status (RESOURCE_EXHAUSTED) rather than a connection error; the bytes themselves
     * are bounded in on_header whatever the count. */
    nghttp2_option_set_max_continuations(opt, o->max_header_list / 16384u * 2u + 8u);
    /* nghttp2's own reset limit ends the connection with INTERNAL_ERROR and tells us nothing; ours
     * (on_frame_recv) bites first, this stays as a backstop. */
    nghttp2_option_set_stream_reset_rate_limit(opt, 2u * (uint64_t)h->lim.reset_burst,
                                               2u * (uint64_t)h->lim.reset_rate);
    h->mem = ng_mem;
    h->mem.mem_user_data = h;
    h->creating = true;
    int rc = o->server ? nghttp2_session_server_new3(&h->s, cb, h, opt, &h->mem)
                       : nghttp2_session_client_new3(&h->s, cb, h, opt, &h->mem);
    h->creating = false;
    nghttp2_option_del(opt);
    nghttp2_session_callbacks_del(cb);
    if (rc != 0) {
        free(h);
        return NULL;
    }
    nghttp2_settings_entry iv[] = {
        {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS,
         o->max_concurrent_streams ? o->max_concurrent_streams : 100},
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, o->initial_window ? o->initial_window : 65535},
        {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, o->max_header_list},
    };
    h->hdr_budget = o->header_budget
                        ? o->header_budget
                        : 2u * (size_t)o->max_header_list +
                              4096u * (o->max_concurrent_streams ? o->max_concurrent_streams : 100);
    nghttp2_submit_settings(h->s, NGHTTP2_FLAG_NONE, iv, 3);
    /* A connection-level window larger than one stream's, so one slow stream cannot stall the others
     * while its own window is held. */
    nghttp2_session_set_local_window_size(h->s, NGHTTP2_FLAG_NONE, 0, 16 << 20);
    return h;
}

void *kd_h2_ud(const struct kd_h2 *h)
{
    return h->o.ud;
}

void kd_h2_abort(struct kd_h2 *h, int status, const char *message)
{
    /* Handlers hear about it while every call is still valid; a handler may start nothing new on
     * this session (it is going away), so the list cannot grow under us. */
    for (struct kd_list *n = h->calls.next; n != &h->calls; n = n->next) {
        struct kd_h2_call *c = KD_CONTAINER_OF(n, struct kd_h2_call, link);
        call_done(c, status, message);
    }
}

void kd_h2_free(struct kd_h2 *h)
{
    if (h == NULL)
        return;
    struct kd_list *n;
    kd_h2_abort(h, KD_GRPC_UNAVAILABLE, "connection closed");
    while ((n = kd_list_pop_front(&h->calls)) != NULL) {
        struct kd_h2_call *c = KD_CONTAINER_OF(n, struct kd_h2_call, link);
        kd_list_node_init(&c->link);
        call_free(c);
    }
    nghttp2_session_del(h->s);
    free(h->lib_err);
    free(h->fail_msg);
    kd_inflater_free(h->inf);
    kd_deflater_free(h->def);
    free(h);
}

const char *kd_h2_abuse_name(enum kd_h2_abuse reason)
{
    static const char *const names[KD_H2_ABUSE_COUNT] = {
        "rapid_reset", "ping_flood", "settings_flood", "header_overflow", "hpack", "protocol_error",
    };
    return (unsigned)reason < KD_H2_ABUSE_COUNT ? names[reason] : "unknown";
}

int kd_h2_recv(struct kd_h2 *h, const uint8_t *data, size_t len, const char **err)
{
    if (h->fatal) {
        /* Closing after abuse: what else the peer sends is not looked at. */
        *err = h->fatal_msg;
        return -EPROTO;
    }
    ssize_t rc = nghttp2_session_mem_recv(h->s, data, len);
    if (rc < 0 && !h->fatal) {
        *err = nghttp2_strerror((int)rc);
        if (rc == NGHTTP2_ERR_NOMEM)
            return -ENOMEM;
        if (h->o.on_abuse) {
            /* Errors nghttp2 returns without a GOAWAY of its own (those are reported as sent). */
            enum kd_h2_abuse r = KD_H2_ABUSE_PROTOCOL_ERROR;
            if (rc == NGHTTP2_ERR_FLOODED) /* ACKs of PING or SETTINGS the peer does not read */
                r = h->counters.pings_received >= h->settings_received ? KD_H2_ABUSE_PING_FLOOD
                                                                       : KD_H2_ABUSE_SETTINGS_FLOOD;
            else if (rc == NGHTTP2_ERR_TOO_MANY_SETTINGS)
                r = KD_H2_ABUSE_SETTINGS_FLOOD;
            h->o.on_abuse(h->o.ud, r, *err);
        }
        h->fatal = true;
        h->fatal_msg = *err;
        return -EPROTO;
    }
    if (h->fatal) {
        *err = h->fatal_msg;
        return -EPROTO;
    }
    return 0;
}

int kd_h2_send(struct kd_h2 *h, kd_h2_write_fn write, void *ud)
{
    for (;;) {
        const uint8_t *data;
        ssize_t n = nghttp2_session_mem_send(h->s, &data);
        if (n < 0)
            return n == NGHTTP2_ERR_NOMEM ? -ENOMEM : -EPROTO;
        if (n == 0)
            break;
        int rc = write(ud, data, (size_t)n);
        if (rc < 0)
            return rc;
        if (rc > 0)
            break; /* the caller's socket is behind; nghttp2 keeps the rest */
    }
    /* on_writable runs here, outside nghttp2's callbacks, so handlers may do anything. */
    struct kd_list *n;
    while ((n = kd_list_pop_front(&h->writable_list)) != NULL) {
        struct kd_h2_call *c = KD_CONTAINER_OF(n, struct kd_h2_call, writable);
        c->writable_due = false;
        if (c->handler && c->handler->on_writable)
            c->handler->on_writable(c);
    }
    return 0;
}

bool kd_h2_finished(const struct kd_h2 *h)
{
    return !nghttp2_session_want_read(h->s) && !nghttp2_session_want_write(h->s);
}

bool kd_h2_want_write(const struct kd_h2 *h)
{
    return nghttp2_session_want_write(h->s) != 0;
}

size_t kd_h2_shed(struct kd_h2 *h)
{
    /* want_write is also true while a frame returned by mem_send is not yet marked sent (the next
     * mem_send does that): then the buffer is left alone. */
    if (h->fb == NULL || nghttp2_session_want_write(h->s))
        return 0;
    return madvise(h->fb, h->fb_len, MADV_DONTNEED) == 0 ? h->fb_len : 0;
}

void kd_h2_goaway(struct kd_h2 *h, uint32_t error_code, const char *debug)
{
    if (h->goaway_final || (error_code == NGHTTP2_NO_ERROR && h->goaway_graceful))
        return;
    if (error_code == NGHTTP2_NO_ERROR)
        h->goaway_graceful = true;
    else
        h->goaway_final = true;
    submit_goaway(h, error_code, debug);
}

void kd_h2_ping(struct kd_h2 *h)
{
    /* One at a time: the opaque data is not used to tell ACKs apart, so a second PING would let
     * the first one's ACK answer both. */
    if (h->ping_sent_us != 0)
        return;
    if (nghttp2_submit_ping(h->s, NGHTTP2_FLAG_NONE, NULL) == 0) {
        h->ping_sent_us = now_us();
        h->counters.pings_sent++;
    }
}

uint64_t kd_h2_ping_outstanding_since(const struct kd_h2 *h)
{
    return h->ping_sent_us;
}

uint64_t kd_h2_expire(struct kd_h2 *h, uint64_t now)
{
    if (now < h->next_deadline)
        return h->next_deadline; /* nothing due; the bound may be early (its call ended): harmless */
    /* Recomputed by the walk; calls that handlers start meanwhile lower it through set_deadline. */
    h->next_deadline = UINT64_MAX;
    uint64_t next = UINT64_MAX;
    struct kd_list *n, *nx;
    for (n = h->calls.next; n != &h->calls; n = nx) {
        nx = n->next;
        struct kd_h2_call *c = KD_CONTAINER_OF(n, struct kd_h2_call, link);
        if (c->deadline == 0 || c->handler == NULL)
            continue;
        if (c->deadline <= now) {
            if (h->o.server) {
                drop_output(c);
                if (c->finished) {
                    /* trailers were queued behind data the client never read: reset instead */
                    c->finish_pending = false;
                    nghttp2_submit_rst_stream(h->s, NGHTTP2_FLAG_NONE, c->sid, NGHTTP2_CANCEL);
                } else {
                    kd_h2_call_finish(c, KD_GRPC_DEADLINE_EXCEEDED, "deadline exceeded", NULL, 0);
                }
                call_done(c, KD_GRPC_DEADLINE_EXCEEDED, "deadline exceeded");
            } else {
                kd_h2_call_cancel(c, KD_GRPC_DEADLINE_EXCEEDED, "deadline exceeded");
            }
        } else if (c->deadline < next) {
            next = c->deadline;
        }
    }
    if (next < h->next_deadline)
        h->next_deadline = next;
    return h->next_deadline;
}

size_t kd_h2_live_calls(const struct kd_h2 *h)
{
    return h->live;
}

const struct kd_h2_counters *kd_h2_counters(const struct kd_h2 *h)
{
    return &h->counters;
}

/* ---- calls ---- */

struct kd_h2_call *kd_h2_call_start(struct kd_h2 *h, const char *path, const char *authority,
                                    const struct kd_h2_header *md, size_t nmd, uint64_t now,
                                    uint64_t timeout_us, const struct kd_h2_handler *handler, void *user)
{
    nghttp2_nv nva[76];
    size_t n = 0;
    char tbuf[16];
    if (nmd > 64)
        return NULL;
    struct kd_h2_call *c = call_new(h);
    if (c == NULL)
        return NULL;
    kd_h2_call_set_handler(c, handler, user);
    nva[n++] = NV_LIT(":method", "POST");
    nva[n++] = NV_LIT(":scheme", "http");
    nva[n++] = mknv(":path", 5, path, strlen(path));
    nva[n++] = mknv(":authority", 10, authority, strlen(authority));
    nva[n++] = NV_LIT("content-type", "application/grpc");
    nva[n++] = NV_LIT("te", "trailers");
    nva[n++] = NV_LIT("grpc-accept-encoding", KD_COMPRESS_ACCEPT_ENCODING);
    if (h->o.send_compression != KD_COMPRESS_IDENTITY) {
        c->send_alg = h->o.send_compression;
        nva[n++] = NV_LIT("grpc-encoding", kd_compress_alg_name(c->send_alg));
    }
    if (timeout_us > 0) {
        kd_grpc_timeout_format(timeout_us, tbuf);
        nva[n++] = mknv("grpc-timeout", 12, tbuf, strlen(tbuf));
        set_deadline(c, now + timeout_us);
    }
    for (size_t i = 0; i < nmd; i++)
        nva[n++] = mknv(md[i].name, md[i].namelen, md[i].value, md[i].valuelen);
    nghttp2_data_provider prd = {.source.ptr = c, .read_callback = read_cb};
    c->provider_live = true;
    int32_t sid = nghttp2_submit_request(h->s, NULL, nva, n, &prd, c);
    if (sid < 0) {
        c->handler = NULL;
        h->live--;
        call_free(c);
        return NULL;
    }
    c->sid = sid;
    return c;
}

void kd_h2_call_set_handler(struct kd_h2_call *c, const struct kd_h2_handler *handler, void *user)
{
    /* `live` counts calls whose handler has not had on_done yet. */
    if (c->handler == NULL && handler != NULL)
        c->h->live++;
    else if (c->handler != NULL && handler == NULL)
        c->h->live--;
    c->handler = handler;
    c->user = user;
}

void *kd_h2_call_user(const struct kd_h2_call *c)
{
    return c->user;
}

const struct kd_h2_handler *kd_h2_call_handler(const struct kd_h2_call *c)
{
    return c->handler;
}

struct kd_h2 *kd_h2_call_session(const struct kd_h2_call *c)
{
    return c->h;
}

const char *kd_h2_call_path(const struct kd_h2_call *c)
{
    const char *p = hdrs_find(&c->hdr, ":path", NULL);
    return p ? p : "";
}

bool kd_h2_call_header(const struct kd_h2_call *c, size_t i, struct kd_h2_header *out)
{
    return hdrs_get(&c->hdr, i, out);
}

const char *kd_h2_call_header_value(const struct kd_h2_call *c, const char *name, size_t *len)
{
    return hdrs_find(&c->hdr, name, len);
}

bool kd_h2_call_trailer(const struct kd_h2_call *c, size_t i, struct kd_h2_header *out)
{
    return hdrs_get(&c->trl, i, out);
}

uint64_t kd_h2_call_deadline(const struct kd_h2_call *c)
{
    return c->deadline;
}

static int submit_response_headers(struct kd_h2_call *c, const struct kd_h2_header *md, size_t n)
{
    nghttp2_nv nva[72];
    size_t k = 0;
    if (n > 64)
        return -EINVAL;
    nva[k++] = NV_LIT(":status", "200");
    nva[k++] = NV_LIT("content-type", "application/grpc");
    nva[k++] = NV_LIT("grpc-accept-encoding", KD_COMPRESS_ACCEPT_ENCODING);
    if (c->send_alg != KD_COMPRESS_IDENTITY)
        nva[k++] = NV_LIT("grpc-encoding", kd_compress_alg_name(c->send_alg));
    for (size_t i = 0; i < n; i++)
        nva[k++] = mknv(md[i].name, md[i].namelen, md[i].value, md[i].valuelen);
    nghttp2_data_provider prd = {.source.ptr = c, .read_callback = read_cb};
    c->headers_sent = true;
    c->provider_live = true;
    return nghttp2_submit_response(c->h->s, c->sid, nva, k, &prd) == 0 ? 0 : -EPROTO;
}

int kd_h2_call_send_headers(struct kd_h2_call *c, const struct kd_h2_header *md, size_t n)
{
    if (!c->h->o.server || c->headers_sent || c->finished)
        return -EINVAL;
    return submit_response_headers(c, md, n);
}

int kd_h2_call_send_message(struct kd_h2_call *c, const uint8_t *data, size_t len)
{
    uint8_t pfx[KD_GRPC_PREFIX];
    if (c->finished || c->handler == NULL || (!c->h->o.server && !c->provider_live))
        return -EPIPE;
    if (len > UINT32_MAX - KD_CHUNKPOOL_SLACK - sizeof(struct chunk))
        return -EMSGSIZE;
    if (c->send_alg != KD_COMPRESS_IDENTITY && len > 0) {
        /* Empty messages go uncompressed, as grpc-go sends them (a gzip of nothing is 20 bytes). */
        struct kd_h2 *h = c->h;
        struct kd_compress_buf z;
        if (h->def == NULL && (h->def = kd_deflater_new(0)) == NULL)
            return -ENOMEM;
        int rc = kd_deflater_run(h->def, c->send_alg, data, len, &z);
        if (rc < 0)
            return rc;
        if (z.len > UINT32_MAX - KD_CHUNKPOOL_SLACK - sizeof(struct chunk)) {
            kd_compress_buf_release(&z);
            return -EMSGSIZE;
        }
        kd_grpc_frame_prefix_flag(pfx, (uint32_t)z.len, true);
        rc = queue_message(c, pfx, z.data, z.len);
        kd_compress_buf_release(&z);
        if (rc < 0)
            return -ENOMEM;
    } else {
        kd_grpc_frame_prefix(pfx, (uint32_t)len);
        if (queue_message(c, pfx, data, len) < 0)
            return -ENOMEM;
    }
    if (c->h->o.server && !c->headers_sent) {
        int rc = submit_response_headers(c, NULL, 0);
        if (rc < 0)
            return rc;
    } else {
        resume(c);
    }
    if (c->out_bytes > KD_H2_CALL_HIGH_WATER) {
        c->over_high = true;
        return 1;
    }
    return 0;
}

int kd_h2_call_finish(struct kd_h2_call *c, int status, const char *message, const struct kd_h2_header *md,
                      size_t n)
{
    char st[8], enc[1024];
    if (!c->h->o.server || c->finished)
        return -EINVAL;
    c->finished = true;
    c->fin_status = status;
    snprintf(st, sizeof(st), "%d", status);
    size_t elen = message ? kd_grpc_message_encode(message, strlen(message), enc, sizeof(enc)) : 0;
    if (!c->headers_sent) {
        /* Trailers-only: one HEADERS frame with END_STREAM carries the status. */
        nghttp2_nv nva[72];
        size_t k = 0;
        if (n > 64)
            n = 64;
        nva[k++] = NV_LIT(":status", "200");
        nva[k++] = NV_LIT("content-type", "application/grpc");
        nva[k++] = NV_LIT("grpc-accept-encoding", KD_COMPRESS_ACCEPT_ENCODING);
        nva[k++] = mknv("grpc-status", 11, st, strlen(st));
        if (elen > 0)
            nva[k++] = mknv("grpc-message", 12, enc, elen);
        for (size_t i = 0; i < n; i++)
            nva[k++] = mknv(md[i].name, md[i].namelen, md[i].value, md[i].valuelen);
        c->headers_sent = true;
        return nghttp2_submit_response(c->h->s, c->sid, nva, k, NULL) == 0 ? 0 : -EPROTO;
    }
    hdrs_add(&c->fin, (const uint8_t *)"grpc-status", 11, (const uint8_t *)st, strlen(st));
    if (elen > 0)
        hdrs_add(&c->fin, (const uint8_t *)"grpc-message", 12, (const uint8_t *)enc, elen);
    for (size_t i = 0; i < n; i++)
        hdrs_add(&c->fin, (const uint8_t *)md[i].name, md[i].namelen, (const uint8_t *)md[i].value,
                 md[i].valuelen);
    c->finish_pending = true;
    resume(c);
    return 0;
}

int kd_h2_call_close_send(struct kd_h2_call *c)
{
    if (c->h->o.server || !c->provider_live)
        return -EINVAL;
    c->close_pending = true;
    resume(c);
    return 0;
}

void kd_h2_call_cancel(struct kd_h2_call *c, int status, const char *message)
{
    drop_output(c);
    c->finish_pending = c->close_pending = false;
    nghttp2_submit_rst_stream(c->h->s, NGHTTP2_FLAG_NONE, c->sid, NGHTTP2_CANCEL);
    call_done(c, status, message);
}

void kd_h2_call_set_end_on_goaway(struct kd_h2_call *c, bool on)
{
    c->end_on_goaway = on;
}

size_t kd_h2_end_marked(struct kd_h2 *h)
{
    size_t n = 0;
    if (!h->o.server)
        return 0;
    /* on_done may free the handler's state and end other calls (never free them: the structs
     * stay until nghttp2 closes their streams), so the next node is read after each one. */
    for (struct kd_list *l = h->calls.next; l != &h->calls; l = l->next) {
        struct kd_h2_call *c = KD_CONTAINER_OF(l, struct kd_h2_call, link);
        if (!c->end_on_goaway || c->handler == NULL)
            continue;
        c->end_on_goaway = false;
        if (!c->finished)
            kd_h2_call_finish(c, KD_GRPC_OK, NULL, NULL, 0);
        call_done(c, c->fin_status, NULL);
        n++;
    }
    return n;
}

void kd_h2_call_hold_input(struct kd_h2_call *c, bool hold)
{
    c->hold_input = hold;
    if (!hold && c->unconsumed > 0) {
        nghttp2_session_consume(c->h->s, c->sid, c->unconsumed);
        c->unconsumed = 0;
    }
}

size_t kd_h2_call_queued(const struct kd_h2_call *c)
{
    return c->out_bytes;
}
