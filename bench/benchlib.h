/* benchlib.h — what the bench programs (agentsim, loadgen) share: a log-linear latency histogram,
 * deterministic agent tokens and the token file kasd reads, loopback address parsing, payload
 * patterns, and small /proc readers.
 * Concurrency: a histogram belongs to one thread (merge them after the threads joined); the other
 * functions are pure or do blocking file I/O at start-up only.
 * Ownership: everything is borrowed for the call; results go to caller memory.
 *
 * Histogram (HDR-style, 64 sub-buckets per power of two, so every bucket is within 1/64 = 1.6 %
 * of its value; microsecond resolution below 128 µs):
 *
 *   value v (µs)   shift = max(0, msb(v) - 6)   index = shift * 64 + (v >> shift)
 *   0..127         0                            0..127       (exact)
 *   128..255       1                            128..191     (2 µs wide)
 *   256..511       2                            192..255     (4 µs wide) ...
 */
#ifndef KD_BENCH_BENCHLIB_H
#define KD_BENCH_BENCHLIB_H

#include <netinet/in.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define BENCH_HIST_SUB     64
#define BENCH_HIST_BUCKETS (BENCH_HIST_SUB * 40) /* up to 2^40 µs (12 days): never clipped here */

struct bench_hist {
    uint64_t n;
    uint64_t sum;
    uint64_t min, max;
    uint64_t counts[BENCH_HIST_BUCKETS];
};

void bench_hist_init(struct bench_hist *h);
void bench_hist_add(struct bench_hist *h, uint64_t v);
void bench_hist_merge(struct bench_hist *into, const struct bench_hist *from);
/* The value at quantile q (0..1): the upper edge of the bucket holding it, capped at max. */
uint64_t bench_hist_quantile(const struct bench_hist *h, double q);
/* index <-> value, exposed for the self-check */
unsigned bench_hist_index(uint64_t v);
uint64_t bench_hist_lower(unsigned idx);
uint64_t bench_hist_upper(unsigned idx);
/* Run a self-check of the bucket maths; 0 when it holds. */
int bench_hist_selfcheck(char *err, size_t errlen);

/* Agent tokens: token of agent `id` under `seed`, like "bench-5eed-00000000000000a1-3f9c2b17d0e4a865"
 * (printable, 16..1024 bytes as docs/tokens.md requires). */
#define BENCH_TOKEN_MAX 64
void bench_token(uint64_t seed, int64_t id, char out[BENCH_TOKEN_MAX]);
/* Write the token file for agents first..first+n-1 (docs/tokens.md, flow-style YAML, one line
 * each). 0 or negative errno. */
int bench_tokens_write(const char *path, uint64_t seed, int64_t first, int64_t n);
/* Read a token file written by bench_tokens_write (or any file with one flow mapping per line
 * holding `token:` and `agent_id:`): fills ids/tokens (tokens: n * BENCH_TOKEN_MAX bytes) up to
 * cap entries. Returns the count or negative errno (-EINVAL: a line it does not understand). */
long bench_tokens_read(const char *path, int64_t *ids, char *tokens, size_t cap);

/* "127.0.0.1:PORT" (any 127.0.0.0/8 address) into *out. 0, or -EINVAL (not loopback IPv4). */
int bench_parse_loopback(const char *s, struct sockaddr_in *out);

/* Payload pattern: byte j of every bench message is 'a' + j % 26, except the first min(8, len)
 * bytes, which carry a little-endian sequence number so echoes cannot be confused. */
void bench_pattern_fill(uint8_t *buf, size_t len, uint64_t seq);
bool bench_pattern_check(const uint8_t *buf, size_t len, uint64_t seq);

/* CPU time (user + system) of this process, microseconds. */
uint64_t bench_cpu_us(void);
/* VmRSS / VmHWM of this process in KiB (0 when unreadable). */
uint64_t bench_rss_kib(void);

/* Write s as a JSON string (quotes included). */
void bench_json_str(FILE *f, const char *s);

#endif
