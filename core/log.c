/* log.c — see log.h. The pipe is the queue: the kernel gives us an atomic, bounded, lock-free
 * multi-producer FIFO with a non-blocking "full" answer, which is exactly what a shard needs. */
#include "core/log.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

_Static_assert(KD_LOG_LINE_MAX <= PIPE_BUF, "log lines must fit one atomic pipe write");

static struct {
    _Atomic int min_level;
    _Atomic int out_fd;
    _Atomic int pipe_w; /* -1 when synchronous */
    int pipe_r;
    pthread_t thread;
    bool running;
    _Atomic uint64_t dropped;
} g = {.min_level = KD_LOG_INFO, .out_fd = 2, .pipe_w = -1, .pipe_r = -1};

static _Thread_local int tls_shard = -1;

static const char *level_names[] = {"debug", "info", "warn", "error"};

void kd_log_configure(enum kd_log_level min, int out_fd)
{
    atomic_store(&g.min_level, (int)min);
    atomic_store(&g.out_fd, out_fd);
}

void kd_log_set_shard(int shard)
{
    tls_shard = shard;
}

bool kd_log_enabled(enum kd_log_level level)
{
    return (int)level >= atomic_load_explicit(&g.min_level, memory_order_relaxed);
}

uint64_t kd_log_dropped(void)
{
    return atomic_load(&g.dropped);
}

/* Write all of buf to fd, retrying on EINTR/short writes; used only where blocking is allowed. */
static void write_all(int fd, const char *buf, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, buf, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        buf += w;
        n -= (size_t)w;
    }
}

static void *logger_main(void *arg)
{
    (void)arg;
    static char buf[65536];
    uint64_t reported = 0;
    for (;;) {
        ssize_t n = read(g.pipe_r, buf, sizeof(buf));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break; /* write end closed: kd_log_stop() */
        write_all(atomic_load(&g.out_fd), buf, (size_t)n);
        uint64_t d = atomic_load(&g.dropped);
        if (d != reported) {
            char line[160];
            int len = snprintf(line, sizeof(line),
                               "{\"level\":\"warn\",\"event\":\"log_lines_dropped\",\"total\":%llu}\n",
                               (unsigned long long)d);
            write_all(atomic_load(&g.out_fd), line, (size_t)len);
            reported = d;
        }
    }
    return NULL;
}

int kd_log_start(void)
{
    int fds[2];
    if (g.running)
        return 0;
    if (pipe2(fds, O_CLOEXEC) < 0)
        return -errno;
    /* Only the write end is non-blocking: shards must never wait, the logger may. */
    fcntl(fds[1], F_SETFL, fcntl(fds[1], F_GETFL) | O_NONBLOCK);
    /* A larger pipe absorbs bursts (e.g. a reconnect storm logging per connection); best effort. */
    fcntl(fds[1], F_SETPIPE_SZ, 1 << 20);
    g.pipe_r = fds[0];
    int rc = pthread_create(&g.thread, NULL, logger_main, NULL);
    if (rc != 0) {
        close(fds[0]);
        close(fds[1]);
        return -rc;
    }
    pthread_setname_np(g.thread, "kasd-log");
    g.running = true;
    atomic_store(&g.pipe_w, fds[1]);
    return 0;
}

void kd_log_stop(void)
{
    if (!g.running)
        return;
    int w = atomic_exchange(&g.pipe_w, -1);
    close(w);
    pthread_join(g.thread, NULL);
    close(g.pipe_r);
    g.pipe_r = -1;
    g.running = false;
}

/* How a line is cut. Every line keeps TAIL_MAX bytes back for its end: the closing quote of a
 * string cut short, the ,"truncated":true marker and "}\n". Anything else is added only while it
 * fits in front of that reserve:
 *   - a key, a number, a bool or null goes in whole or not at all (the field is rolled back);
 *   - a string value is cut between two characters (never inside an escape sequence or a UTF-8
 *     sequence), then closed;
 *   - once anything was cut, later fields are dropped, so a truncated line holds a prefix of its
 *     fields and the last one may be cut short.
 * So a line is always one JSON object, at most KD_LOG_LINE_MAX bytes (docs/operations.md). */
#define TAIL_MAX (sizeof("\",\"truncated\":true}\n") - 1)
#define ROOM     (KD_LOG_LINE_MAX - TAIL_MAX)

/* Whole or not at all. */
static bool append_raw(struct kd_logline *l, const char *s, size_t n)
{
    if (l->off || l->truncated)
        return false;
    if (l->len + n > ROOM) {
        l->truncated = true;
        return false;
    }
    memcpy(l->buf + l->len, s, n);
    l->len += n;
    return true;
}

/* Length of the well-formed UTF-8 sequence at s[0..n) (lead byte s[0] >= 0x80), or 0 when it is
 * not one; then *bad is how many bytes to replace with one U+FFFD (the longest prefix that could
 * have begun a valid sequence, at least 1: Unicode's "maximal subpart" practice, as browsers and
 * Go's encoding/json do). Overlongs, surrogates and code points beyond U+10FFFF are not valid. */
static size_t utf8_len(const unsigned char *s, size_t n, size_t *bad)
{
    unsigned char c = s[0], lo = 0x80, hi = 0xbf;
    size_t need;
    if (c >= 0xc2 && c <= 0xdf)
        need = 2;
    else if (c >= 0xe0 && c <= 0xef)
        need = 3, lo = c == 0xe0 ? 0xa0 : 0x80, hi = c == 0xed ? 0x9f : 0xbf;
    else if (c >= 0xf0 && c <= 0xf4)
        need = 4, lo = c == 0xf0 ? 0x90 : 0x80, hi = c == 0xf4 ? 0x8f : 0xbf;
    else {
        *bad = 1;
        return 0;
    }
    size_t i = 1;
    for (; i < need && i < n; i++) {
        if (s[i] < lo || s[i] > hi)
            break;
        lo = 0x80, hi = 0xbf; /* only the second byte has a narrower range */
    }
    if (i == need)
        return need;
    *bad = i;
    return 0;
}

/* The JSON form of the character at s[0..n) (n >= 1) into out (up to 6 bytes); returns its length
 * and sets *used to the input bytes it stands for. */
static size_t escape_one(const unsigned char *s, size_t n, char out[6], size_t *used)
{
    static const char hex[] = "0123456789abcdef";
    unsigned char c = s[0];
    *used = 1;
    if (c == '"' || c == '\\') {
        out[0] = '\\';
        out[1] = (char)c;
        return 2;
    }
    if (c == '\n' || c == '\t' || c == '\r') {
        out[0] = '\\';
        out[1] = c == '\n' ? 'n' : c == '\t' ? 't' : 'r';
        return 2;
    }
    if (c < 0x20 || c == 0x7f) {
        memcpy(out, "\\u00", 4);
        out[4] = hex[c >> 4];
        out[5] = hex[c & 15];
        return 6;
    }
    if (c < 0x80) {
        out[0] = (char)c;
        return 1;
    }
    /* Values can come from peers (a request's :path); bytes that are not UTF-8 would make the
     * whole line invalid JSON, so they are replaced, visibly. */
    size_t bad = 0, u = utf8_len(s, n, &bad);
    if (u == 0) {
        memcpy(out, "\\ufffd", 6);
        *used = bad;
        return 6;
    }
    memcpy(out, s, u);
    *used = u;
    return u;
}

size_t kd_log_escape(char *dst, size_t dstlen, const char *src, size_t n)
{
    const unsigned char *s = (const unsigned char *)src;
    size_t o = 0;
    if (dstlen == 0)
        return 0;
    while (n > 0) {
        char esc[6];
        size_t used, el = escape_one(s, n, esc, &used);
        if (o + el + 1 > dstlen)
            break;
        memcpy(dst + o, esc, el);
        o += el;
        s += used;
        n -= used;
    }
    dst[o] = '\0';
    return o;
}

/* Escape s[0..n) onto the line, character by character, while it fits before ROOM. Returns false
 * (and marks the line) when it had to stop early. */
static bool append_escaped(struct kd_logline *l, const char *src, size_t n)
{
    const unsigned char *s = (const unsigned char *)src;
    if (l->off || l->truncated)
        return false;
    while (n > 0) {
        char esc[6];
        size_t used, el = escape_one(s, n, esc, &used);
        if (l->len + el > ROOM) {
            l->truncated = true;
            return false;
        }
        memcpy(l->buf + l->len, esc, el);
        l->len += el;
        s += used;
        n -= used;
    }
    return true;
}

/* ,"key": whole or rolled back. */
static bool append_key(struct kd_logline *l, const char *key)
{
    size_t start = l->len;
    if (append_raw(l, ",\"", 2) && append_escaped(l, key, strlen(key)) && append_raw(l, "\":", 2))
        return true;
    if (!l->off)
        l->len = start;
    return false;
}

/* ,"key":<value> for a value that must not be cut (numbers, true/false/null). */
static void append_field(struct kd_logline *l, const char *key, const char *v, size_t n)
{
    size_t start = l->len;
    if (append_key(l, key) && !append_raw(l, v, n))
        l->len = start;
}

void kd_log_begin(struct kd_logline *l, enum kd_log_level level, const char *event)
{
    struct timespec ts;
    struct tm tm;
    char head[128];
    l->len = 0;
    l->truncated = false;
    l->off = !kd_log_enabled(level);
    if (l->off)
        return;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    int n = snprintf(head, sizeof(head), "{\"ts\":\"%04d-%02d-%02dT%02d:%02d:%02d.%06ldZ\",\"level\":\"%s\"",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                     ts.tv_nsec / 1000, level_names[level & 3]);
    append_raw(l, head, (size_t)n);
    if (tls_shard >= 0) {
        n = snprintf(head, sizeof(head), ",\"shard\":%d", tls_shard);
        append_raw(l, head, (size_t)n);
    }
    kd_log_str(l, "event", event);
}

void kd_log_strn(struct kd_logline *l, const char *key, const char *value, size_t n)
{
    size_t start = l->len;
    if (!append_key(l, key))
        return;
    if (!append_raw(l, "\"", 1)) {
        l->len = start; /* a key without its value would leave the object unfinished */
        return;
    }
    /* Cut or not, the string is closed: the reserve always has room for this quote. */
    append_escaped(l, value, n);
    l->buf[l->len++] = '"';
}

void kd_log_str(struct kd_logline *l, const char *key, const char *value)
{
    if (value == NULL) {
        append_field(l, key, "null", 4);
        return;
    }
    kd_log_strn(l, key, value, strlen(value));
}

void kd_log_int(struct kd_logline *l, const char *key, int64_t value)
{
    char tmp[32];
    int n = snprintf(tmp, sizeof(tmp), "%lld", (long long)value);
    append_field(l, key, tmp, (size_t)n);
}

void kd_log_uint(struct kd_logline *l, const char *key, uint64_t value)
{
    char tmp[32];
    int n = snprintf(tmp, sizeof(tmp), "%llu", (unsigned long long)value);
    append_field(l, key, tmp, (size_t)n);
}

void kd_log_bool(struct kd_logline *l, const char *key, bool value)
{
    append_field(l, key, value ? "true" : "false", value ? 4 : 5);
}

void kd_log_errno(struct kd_logline *l, int err)
{
    char buf[128];
    int e = err < 0 ? -err : err;
    kd_log_str(l, "error", strerror_r(e, buf, sizeof(buf)));
    kd_log_int(l, "errno", e);
}

void kd_log_end(struct kd_logline *l)
{
    if (l->off)
        return;
    /* Within the TAIL_MAX reserve, whatever was cut before. */
    if (l->truncated) {
        memcpy(l->buf + l->len, ",\"truncated\":true", 17);
        l->len += 17;
    }
    memcpy(l->buf + l->len, "}\n", 2);
    l->len += 2;
    int w = atomic_load_explicit(&g.pipe_w, memory_order_acquire);
    if (w < 0) {
        write_all(atomic_load(&g.out_fd), l->buf, l->len);
        return;
    }
    ssize_t n = write(w, l->buf, l->len);
    if (n < 0)
        atomic_fetch_add(&g.dropped, 1);
}

void kd_log_msg(enum kd_log_level level, const char *event, const char *fmt, ...)
{
    struct kd_logline l;
    char msg[1024];
    va_list ap;
    if (!kd_log_enabled(level))
        return;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    kd_log_begin(&l, level, event);
    kd_log_str(&l, "msg", msg);
    kd_log_end(&l);
}
