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

static void append_raw(struct kd_logline *l, const char *s, size_t n)
{
    /* Keep room for the closing "}\n" and a truncation marker. */
    size_t room = KD_LOG_LINE_MAX - 40;
    if (l->off)
        return;
    if (l->len + n > room) {
        n = l->len < room ? room - l->len : 0;
        l->truncated = true;
    }
    memcpy(l->buf + l->len, s, n);
    l->len += n;
}

size_t kd_log_escape(char *dst, size_t dstlen, const char *src, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    size_t o = 0;
    if (dstlen == 0)
        return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)src[i];
        char esc[7];
        size_t el;
        if (c == '"' || c == '\\') {
            esc[0] = '\\';
            esc[1] = (char)c;
            el = 2;
        } else if (c == '\n') {
            memcpy(esc, "\\n", 2);
            el = 2;
        } else if (c == '\t') {
            memcpy(esc, "\\t", 2);
            el = 2;
        } else if (c == '\r') {
            memcpy(esc, "\\r", 2);
            el = 2;
        } else if (c < 0x20 || c == 0x7f) {
            memcpy(esc, "\\u00", 4);
            esc[4] = hex[c >> 4];
            esc[5] = hex[c & 15];
            el = 6;
        } else {
            /* Bytes >= 0x80 pass through; invalid UTF-8 is the caller's problem to avoid, and
             * every caller logs either ASCII or bytes it already validated. */
            esc[0] = (char)c;
            el = 1;
        }
        if (o + el + 1 > dstlen)
            break;
        memcpy(dst + o, esc, el);
        o += el;
    }
    dst[o] = '\0';
    return o;
}

static void append_escaped(struct kd_logline *l, const char *s, size_t n)
{
    char tmp[1024];
    while (n > 0 && !l->truncated && !l->off) {
        /* Escape in chunks; worst case 6 output bytes per input byte. */
        size_t take = n < 160 ? n : 160;
        size_t w = kd_log_escape(tmp, sizeof(tmp), s, take);
        append_raw(l, tmp, w);
        s += take;
        n -= take;
    }
}

static void append_key(struct kd_logline *l, const char *key)
{
    append_raw(l, ",\"", 2);
    append_escaped(l, key, strlen(key));
    append_raw(l, "\":", 2);
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
    append_key(l, key);
    append_raw(l, "\"", 1);
    append_escaped(l, value, n);
    append_raw(l, "\"", 1);
}

void kd_log_str(struct kd_logline *l, const char *key, const char *value)
{
    if (value == NULL) {
        append_key(l, key);
        append_raw(l, "null", 4);
        return;
    }
    kd_log_strn(l, key, value, strlen(value));
}

void kd_log_int(struct kd_logline *l, const char *key, int64_t value)
{
    char tmp[32];
    int n = snprintf(tmp, sizeof(tmp), "%lld", (long long)value);
    append_key(l, key);
    append_raw(l, tmp, (size_t)n);
}

void kd_log_uint(struct kd_logline *l, const char *key, uint64_t value)
{
    char tmp[32];
    int n = snprintf(tmp, sizeof(tmp), "%llu", (unsigned long long)value);
    append_key(l, key);
    append_raw(l, tmp, (size_t)n);
}

void kd_log_bool(struct kd_logline *l, const char *key, bool value)
{
    append_key(l, key);
    append_raw(l, value ? "true" : "false", value ? 4 : 5);
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
    if (l->truncated)
        memcpy(l->buf + l->len, ",\"truncated\":true", 17), l->len += 17;
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
