/* resp.c — see resp.h. The only file that includes hiredis, used purely as a codec: its reader
 * parses, and calls back into the object functions below, which build kasd's own reply tree.
 *
 * How the limit is enforced: hiredis builds a reply incrementally (an array exists as soon as its
 * header is parsed; elements are attached as they arrive) but buffers a bulk string until it is
 * complete. So one reply costs (tree built so far) + (input buffered, not yet parsed). The first
 * is counted in the object functions (refusing an allocation fails the parse), the second is
 * checked after every parse attempt that needs more input. An array header is charged for its
 * pointer table before it is allocated, so "*2000000000\r\n" fails at once instead of asking
 * malloc for 16 GB. */
#include "core/resp.h"

#include <stdbool.h>
#include <hiredis/hiredis.h>
#include <hiredis/read.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct kd_resp_reader {
    redisReader *rd;
    size_t max;
    size_t used; /* bytes of the reply being built */
    bool over;   /* an object function refused: the limit, not memory */
    bool failed;
    char err[160];
};

/* Charge n bytes to the reply being built; false past the limit. */
static bool charge(const redisReadTask *t, size_t n)
{
    struct kd_resp_reader *r = t->privdata;
    if (r == NULL) /* hiredis 0.14 sets privdata on every task; be defensive anyway */
        return true;
    if (n > r->max || r->used > r->max - n) {
        r->over = true;
        return false;
    }
    r->used += n;
    return true;
}

static void attach(const redisReadTask *t, struct kd_resp *o)
{
    if (t->parent != NULL) {
        struct kd_resp *p = t->parent->obj;
        p->elem[t->idx] = o;
    }
}

static struct kd_resp *new_obj(const redisReadTask *t, enum kd_resp_type type, size_t extra)
{
    if (!charge(t, sizeof(struct kd_resp) + extra))
        return NULL;
    struct kd_resp *o = calloc(1, sizeof(*o));
    if (o != NULL)
        o->type = type;
    return o;
}

static void *create_string(const redisReadTask *t, char *s, size_t len)
{
    enum kd_resp_type type = t->type == REDIS_REPLY_ERROR    ? KD_RESP_ERROR
                             : t->type == REDIS_REPLY_STATUS ? KD_RESP_STATUS
                                                             : KD_RESP_STRING;
    struct kd_resp *o = new_obj(t, type, len + 1);
    if (o == NULL)
        return NULL;
    o->str = malloc(len + 1);
    if (o->str == NULL) {
        free(o);
        return NULL;
    }
    memcpy(o->str, s, len);
    o->str[len] = '\0';
    o->len = len;
    attach(t, o);
    return o;
}

static void *create_array(const redisReadTask *t, int elements)
{
    size_t n = elements > 0 ? (size_t)elements : 0;
    if (n > SIZE_MAX / sizeof(struct kd_resp *)) {
        ((struct kd_resp_reader *)t->privdata)->over = true;
        return NULL;
    }
    struct kd_resp *o = new_obj(t, KD_RESP_ARRAY, n * sizeof(struct kd_resp *));
    if (o == NULL)
        return NULL;
    if (n > 0) {
        o->elem = calloc(n, sizeof(*o->elem));
        if (o->elem == NULL) {
            free(o);
            return NULL;
        }
    }
    o->n = n;
    attach(t, o);
    return o;
}

static void *create_integer(const redisReadTask *t, long long v)
{
    struct kd_resp *o = new_obj(t, KD_RESP_INTEGER, 0);
    if (o == NULL)
        return NULL;
    o->integer = v;
    attach(t, o);
    return o;
}

static void *create_nil(const redisReadTask *t)
{
    struct kd_resp *o = new_obj(t, KD_RESP_NIL, 0);
    if (o == NULL)
        return NULL;
    attach(t, o);
    return o;
}

void kd_resp_free(struct kd_resp *o)
{
    if (o == NULL)
        return;
    if (o->type == KD_RESP_ARRAY)
        for (size_t i = 0; i < o->n; i++)
            kd_resp_free(o->elem[i]); /* NULL for elements not parsed yet (freed mid-reply) */
    free(o->elem);
    free(o->str);
    free(o);
}

static void free_object(void *o)
{
    kd_resp_free(o);
}

static redisReplyObjectFunctions resp_fns = {
    .createString = create_string,
    .createArray = create_array,
    .createInteger = create_integer,
    .createNil = create_nil,
    .freeObject = free_object,
};

struct kd_resp_reader *kd_resp_reader_new(size_t max_reply_bytes)
{
    struct kd_resp_reader *r = calloc(1, sizeof(*r));
    if (r == NULL)
        return NULL;
    r->rd = redisReaderCreateWithFunctions(&resp_fns);
    if (r->rd == NULL) {
        free(r);
        return NULL;
    }
    r->rd->privdata = r;
    r->max = max_reply_bytes ? max_reply_bytes : KD_RESP_DEFAULT_MAX;
    return r;
}

void kd_resp_reader_free(struct kd_resp_reader *r)
{
    if (r == NULL)
        return;
    redisReaderFree(r->rd);
    free(r);
}

static int fail(struct kd_resp_reader *r)
{
    r->failed = true;
    if (r->over)
        snprintf(r->err, sizeof(r->err), "reply larger than max_reply_bytes (%zu bytes)", r->max);
    else if (r->rd->err == REDIS_ERR_OOM)
        snprintf(r->err, sizeof(r->err), "out of memory decoding a reply");
    else
        snprintf(r->err, sizeof(r->err), "protocol error: %s", r->rd->errstr);
    return -1;
}

int kd_resp_reader_feed(struct kd_resp_reader *r, const void *buf, size_t len)
{
    if (r->failed)
        return -1;
    if (redisReaderFeed(r->rd, buf, len) != REDIS_OK)
        return fail(r);
    return 0;
}

int kd_resp_reader_next(struct kd_resp_reader *r, struct kd_resp **out)
{
    void *reply = NULL;
    *out = NULL;
    if (r->failed)
        return -1;
    if (redisReaderGetReply(r->rd, &reply) != REDIS_OK)
        return fail(r);
    if (reply == NULL) {
        /* Incomplete: whatever is buffered belongs to the reply being built. */
        size_t buffered = r->rd->len - r->rd->pos;
        if (buffered > r->max || r->used > r->max - buffered) {
            r->over = true;
            return fail(r);
        }
        return 0;
    }
    r->used = 0;
    *out = reply;
    return 1;
}

const char *kd_resp_reader_error(const struct kd_resp_reader *r)
{
    return r->err;
}

char *kd_resp_format(int argc, const char *const *argv, const size_t *argvlen, size_t *outlen)
{
    char *cmd = NULL;
    if (argc < 1)
        return NULL;
    /* hiredis's prototype lacks the inner const; it only reads the strings. */
    int n = redisFormatCommandArgv(&cmd, argc, (const char **)argv, argvlen);
    if (n < 0 || cmd == NULL)
        return NULL;
    *outlen = (size_t)n;
    return cmd;
}
