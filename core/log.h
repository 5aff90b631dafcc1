/* log.h — structured logs: one JSON object per line, never blocking a shard's loop.
 * Concurrency: any thread may log. A line is built on the caller's stack, then written with one
 * write(2) of at most PIPE_BUF bytes to a non-blocking pipe (atomic, never interleaved); a logger
 * thread copies the pipe to the output fd, where blocking is harmless. A full pipe drops the line and
 * counts it; the logger reports the count ("log_lines_dropped") at its next write.
 * Before kd_log_start() (and after kd_log_stop()) lines go straight to the output fd, synchronously.
 * Ownership: the logger borrows nothing; strings are copied into the line.
 *
 *   {"ts":"2026-11-25T09:39:28.123456Z","level":"info","shard":0,"event":"listening","listener":"agent",...}
 *
 * "shard" is the calling thread's shard id, or absent on non-shard threads.
 */
#ifndef KD_CORE_LOG_H
#define KD_CORE_LOG_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/config.h"

/* Lines longer than this are cut and marked "truncated":true, and stay valid JSON: a string value is
 * cut between characters and closed, later fields are dropped (log.c). PIPE_BUF keeps writes
 * atomic. Bytes that are not UTF-8 are logged as \ufffd. */
#define KD_LOG_LINE_MAX 4096

struct kd_logline {
    size_t len;
    bool truncated;
    bool off; /* below the configured level: every call is a no-op */
    char buf[KD_LOG_LINE_MAX];
};

/* Set the minimum level and output fd (default: info, stderr). Any thread, before shards start. */
void kd_log_configure(enum kd_log_level min, int out_fd);
/* Start the logger thread and the pipe. 0 or -errno (then logging stays synchronous). */
int kd_log_start(void);
/* Flush everything queued and stop the logger thread; later lines are synchronous again. */
void kd_log_stop(void);
/* Tag this thread's lines with a shard id (-1: none). */
void kd_log_set_shard(int shard);
bool kd_log_enabled(enum kd_log_level level);
/* Lines dropped because the pipe was full, since start. */
uint64_t kd_log_dropped(void);

/* Builder: begin, add fields, end (end writes the line). */
void kd_log_begin(struct kd_logline *l, enum kd_log_level level, const char *event);
void kd_log_str(struct kd_logline *l, const char *key, const char *value);
void kd_log_strn(struct kd_logline *l, const char *key, const char *value, size_t n);
void kd_log_int(struct kd_logline *l, const char *key, int64_t value);
void kd_log_uint(struct kd_logline *l, const char *key, uint64_t value);
void kd_log_bool(struct kd_logline *l, const char *key, bool value);
/* "error": strerror(-err), "errno": -err, for a negative errno. */
void kd_log_errno(struct kd_logline *l, int err);
void kd_log_end(struct kd_logline *l);

/* One-liner: an event with a formatted "msg" field. */
void kd_log_msg(enum kd_log_level level, const char *event, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* JSON-escape src[0..n) into dst (NUL-terminated, cut to fit between characters; invalid UTF-8 becomes
 * \ufffd). Returns bytes written. For tests. */
size_t kd_log_escape(char *dst, size_t dstlen, const char *src, size_t n);

#endif
