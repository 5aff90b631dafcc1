/* benchlib.c — see benchlib.h. */
#include "bench/benchlib.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "core/hash.h"

/* ---- histogram ---- */

void bench_hist_init(struct bench_hist *h)
{
    memset(h, 0, sizeof(*h));
    h->min = UINT64_MAX;
}

unsigned bench_hist_index(uint64_t v)
{
    unsigned msb = v ? 63u - (unsigned)__builtin_clzll(v) : 0;
    unsigned shift = msb > 6 ? msb - 6 : 0;
    unsigned idx = shift * BENCH_HIST_SUB + (unsigned)(v >> shift);
    return idx < BENCH_HIST_BUCKETS ? idx : BENCH_HIST_BUCKETS - 1;
}

uint64_t bench_hist_lower(unsigned idx)
{
    if (idx < 2 * BENCH_HIST_SUB)
        return idx;
    unsigned shift = idx / BENCH_HIST_SUB - 1;
    return (uint64_t)(idx - shift * BENCH_HIST_SUB) << shift;
}

uint64_t bench_hist_upper(unsigned idx)
{
    if (idx < 2 * BENCH_HIST_SUB)
        return idx;
    unsigned shift = idx / BENCH_HIST_SUB - 1;
    return bench_hist_lower(idx) + ((uint64_t)1 << shift) - 1;
}

void bench_hist_add(struct bench_hist *h, uint64_t v)
{
    h->counts[bench_hist_index(v)]++;
    h->n++;
    h->sum += v;
    if (v < h->min)
        h->min = v;
    if (v > h->max)
        h->max = v;
}

void bench_hist_merge(struct bench_hist *into, const struct bench_hist *from)
{
    for (unsigned i = 0; i < BENCH_HIST_BUCKETS; i++)
        into->counts[i] += from->counts[i];
    into->n += from->n;
    into->sum += from->sum;
    if (from->min < into->min)
        into->min = from->min;
    if (from->max > into->max)
        into->max = from->max;
}

uint64_t bench_hist_quantile(const struct bench_hist *h, double q)
{
    if (h->n == 0)
        return 0;
    /* rank of the q-quantile, 1-based: ceil(q * n), at least 1 */
    uint64_t rank = (uint64_t)(q * (double)h->n);
    if ((double)rank < q * (double)h->n)
        rank++;
    if (rank == 0)
        rank = 1;
    uint64_t seen = 0;
    for (unsigned i = 0; i < BENCH_HIST_BUCKETS; i++) {
        seen += h->counts[i];
        if (seen >= rank) {
            uint64_t up = bench_hist_upper(i);
            return up < h->max ? up : h->max;
        }
    }
    return h->max;
}

int bench_hist_selfcheck(char *err, size_t errlen)
{
    static const uint64_t probes[] = {0,   1,    63,   64,   127,    128,     129,      255,
                                      256, 1000, 4095, 4096, 100000, 1234567, 60000000, 1ull << 38};
    for (size_t i = 0; i < sizeof(probes) / sizeof(probes[0]); i++) {
        uint64_t v = probes[i];
        unsigned idx = bench_hist_index(v);
        uint64_t lo = bench_hist_lower(idx), hi = bench_hist_upper(idx);
        if (v < lo || v > hi || (double)(hi - lo) > (double)v / 60.0 + 1.0) {
            snprintf(err, errlen, "value %llu in bucket %u [%llu, %llu]", (unsigned long long)v, idx,
                     (unsigned long long)lo, (unsigned long long)hi);
            return -1;
        }
        if (idx + 1 < BENCH_HIST_BUCKETS && bench_hist_lower(idx + 1) != hi + 1) {
            snprintf(err, errlen, "bucket %u ends at %llu, next starts at %llu", idx, (unsigned long long)hi,
                     (unsigned long long)bench_hist_lower(idx + 1));
            return -1;
        }
    }
    struct bench_hist *h = malloc(sizeof(*h));
    if (h == NULL)
        return -1;
    bench_hist_init(h);
    for (uint64_t v = 1; v <= 10000; v++)
        bench_hist_add(h, v);
    uint64_t p50 = bench_hist_quantile(h, 0.5), p99 = bench_hist_quantile(h, 0.99);
    free(h);
    if (p50 < 5000 || p50 > 5000 + 5000 / 60 + 1 || p99 < 9900 || p99 > 9900 + 9900 / 60 + 1) {
        snprintf(err, errlen, "quantiles of 1..10000: p50 %llu p99 %llu", (unsigned long long)p50,
                 (unsigned long long)p99);
        return -1;
    }
    return 0;
}

/* ---- tokens ---- */

void bench_token(uint64_t seed, int64_t id, char out[BENCH_TOKEN_MAX])
{
    uint64_t h = kd_hash_u64(seed ^ kd_hash_u64((uint64_t)id + 0x9e3779b97f4a7c15ull));
    snprintf(out, BENCH_TOKEN_MAX, "bench-%08x-%016llx-%016llx", (unsigned)(seed & 0xffffffffu),
             (unsigned long long)id, (unsigned long long)h);
}

int bench_tokens_write(const char *path, uint64_t seed, int64_t first, int64_t n)
{
    char tmp[4096];
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (f == NULL)
        return -errno;
    fprintf(f, "# written by bench/agentsim (seed %llu): agents %lld..%lld\nagents:\n",
            (unsigned long long)seed, (long long)first, (long long)(first + n - 1));
    for (int64_t i = 0; i < n; i++) {
        char tok[BENCH_TOKEN_MAX];
        bench_token(seed, first + i, tok);
        fprintf(f, "  - {token: \"%s\", agent_id: %lld, project_id: %lld, agent_name: bench-%lld}\n", tok,
                (long long)(first + i), (long long)(1000000 + first + i), (long long)(first + i));
    }
    if (fclose(f) != 0 || rename(tmp, path) != 0)
        return -errno;
    return 0;
}

/* The value after `key:` in a flow mapping line, unquoted; NULL when absent. */
static const char *flow_value(const char *line, const char *key, char *out, size_t cap)
{
    const char *p = strstr(line, key);
    if (p == NULL)
        return NULL;
    p += strlen(key);
    while (*p == ' ')
        p++;
    char quote = 0;
    if (*p == '"' || *p == '\'')
        quote = *p++;
    size_t n = 0;
    while (*p != '\0' && n + 1 < cap) {
        if (quote ? *p == quote : (*p == ',' || *p == '}' || *p == ' ' || *p == '\n'))
            break;
        out[n++] = *p++;
    }
    out[n] = '\0';
    return out;
}

long bench_tokens_read(const char *path, int64_t *ids, char *tokens, size_t cap)
{
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return -errno;
    char line[2048];
    size_t n = 0;
    long rc = 0;
    while (fgets(line, sizeof(line), f) != NULL) {
        char tok[BENCH_TOKEN_MAX], id[32];
        if (strstr(line, "token:") == NULL)
            continue;
        if (flow_value(line, "token:", tok, sizeof(tok)) == NULL ||
            flow_value(line, "agent_id:", id, sizeof(id)) == NULL || strlen(tok) < 16) {
            rc = -EINVAL;
            break;
        }
        if (n == cap)
            break;
        ids[n] = strtoll(id, NULL, 10);
        memcpy(tokens + n * BENCH_TOKEN_MAX, tok, BENCH_TOKEN_MAX);
        n++;
    }
    fclose(f);
    return rc < 0 ? rc : (long)n;
}

/* ---- addresses ---- */

int bench_parse_loopback(const char *s, struct sockaddr_in *out)
{
    char host[64];
    const char *colon = strrchr(s, ':');
    if (colon == NULL || (size_t)(colon - s) >= sizeof(host))
        return -EINVAL;
    memcpy(host, s, (size_t)(colon - s));
    host[colon - s] = '\0';
    char *end;
    long port = strtol(colon + 1, &end, 10);
    if (*end != '\0' || port < 0 || port > 65535)
        return -EINVAL;
    memset(out, 0, sizeof(*out));
    out->sin_family = AF_INET;
    out->sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &out->sin_addr) != 1)
        return -EINVAL;
    if ((ntohl(out->sin_addr.s_addr) >> 24) != 127)
        return -EINVAL; /* the bench only ever talks to loopback */
    return 0;
}

/* ---- payloads ---- */

static uint8_t pattern_byte(size_t j)
{
    return (uint8_t)('a' + j % 26);
}

/* The tail of a message is compared in long runs against 64 periods of the pattern:
 * period[off + k] == pattern_byte(j + k) whenever off == j % 26. Filled before main() runs, so
 * shard threads only ever read it. */
static uint8_t period[26 * 64];

__attribute__((constructor)) static void period_init(void)
{
    for (size_t j = 0; j < sizeof(period); j++)
        period[j] = pattern_byte(j);
}

void bench_pattern_fill(uint8_t *buf, size_t len, uint64_t seq)
{
    size_t hb = len < 8 ? len : 8;
    for (size_t j = 0; j < hb; j++)
        buf[j] = (uint8_t)(seq >> (8 * j));
    size_t j = hb;
    while (j < len) {
        size_t off = j % 26;
        size_t n = len - j < sizeof(period) - off ? len - j : sizeof(period) - off;
        memcpy(buf + j, period + off, n);
        j += n;
    }
}

bool bench_pattern_check(const uint8_t *buf, size_t len, uint64_t seq)
{
    size_t hb = len < 8 ? len : 8;
    for (size_t j = 0; j < hb; j++)
        if (buf[j] != (uint8_t)(seq >> (8 * j)))
            return false;
    size_t j = hb;
    while (j < len) {
        size_t off = j % 26;
        size_t n = len - j < sizeof(period) - off ? len - j : sizeof(period) - off;
        if (memcmp(buf + j, period + off, n) != 0)
            return false;
        j += n;
    }
    return true;
}

/* ---- process ---- */

uint64_t bench_cpu_us(void)
{
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) != 0)
        return 0;
    return (uint64_t)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000u +
           (uint64_t)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
}

uint64_t bench_rss_kib(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    if (f == NULL)
        return 0;
    char line[256];
    uint64_t kib = 0;
    while (fgets(line, sizeof(line), f) != NULL)
        if (strncmp(line, "VmRSS:", 6) == 0) {
            kib = strtoull(line + 6, NULL, 10);
            break;
        }
    fclose(f);
    return kib;
}

void bench_json_str(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            fprintf(f, "\\%c", c);
        else if (c < 0x20)
            fprintf(f, "\\u%04x", c);
        else
            fputc(c, f);
    }
    fputc('"', f);
}
