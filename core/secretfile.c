/* secretfile.c — shared helpers of the token file loaders (contract in secretfile.h). Moved here
 * from core/tokens.c when core/access.c needed the same ones. */
#include "core/secretfile.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

int kd_secretfile_read(const char *path, size_t max, char **out, size_t *outlen)
{
    size_t cap = 4096, len = 0;
    char *buf = NULL;
    struct stat st;
    int fd, r = 0;

    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    if (fstat(fd, &st) == 0 && st.st_size > 0) {
        if ((uint64_t)st.st_size > max) {
            close(fd);
            return -EFBIG;
        }
        cap = (size_t)st.st_size + 1; /* +1: EOF is seen without a grow */
    }
    for (;;) {
        ssize_t n;

        if (!buf || len == cap) {
            size_t nc = buf ? cap * 2 : cap;
            char *nb = malloc(nc);

            if (!nb) {
                r = -ENOMEM;
                break;
            }
            if (buf) {
                memcpy(nb, buf, len);
                explicit_bzero(buf, cap);
                free(buf);
            }
            buf = nb;
            cap = nc;
        }
        n = read(fd, buf + len, cap - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            r = -errno;
            break;
        }
        if (n == 0)
            break;
        len += (size_t)n;
        if (len > max) {
            r = -EFBIG;
            break;
        }
    }
    close(fd);
    if (r < 0) {
        if (buf)
            explicit_bzero(buf, cap);
        free(buf);
        return r;
    }
    *out = buf;
    *outlen = len;
    return 0;
}

/* All ones when a < b, else 0; no branch. Both below 2^63 (lengths are). */
static inline uint64_t ct_lt_mask(uint64_t a, uint64_t b)
{
    return (uint64_t)0 - ((a - b) >> 63);
}

bool kd_secretfile_equal(const void *av, size_t alen, const void *bv, size_t blen)
{
    static const uint8_t dummy = 0;
    const uint8_t *a = av, *b = bv;
    size_t n = alen > blen ? alen : blen;
    uint64_t diff = (uint64_t)alen ^ (uint64_t)blen;

    /* An empty side reads a dummy byte (at index 0, masked to 0). */
    if (alen == 0)
        a = &dummy;
    if (blen == 0)
        b = &dummy;
    for (size_t i = 0; i < n; i++) {
        uint64_t ma = ct_lt_mask(i, alen), mb = ct_lt_mask(i, blen);
        uint8_t x = a[i & ma] & (uint8_t)ma, y = b[i & mb] & (uint8_t)mb;

        diff |= (uint64_t)(x ^ y);
        /* Keep the compiler from turning the accumulation into a loop with an early exit. */
        __asm__ volatile("" : "+r"(diff));
    }
    return ((diff | ((uint64_t)0 - diff)) >> 63) == 0;
}

int kd_secretfile_random(uint8_t *key, size_t n)
{
    size_t got = 0;

    while (got < n) {
        ssize_t r = getrandom(key + got, n - got, 0);

        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        got += (size_t)r;
    }
    return 0;
}

void kd_secretfile_escape(char *dst, size_t cap, size_t *len, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    size_t l = *len;

    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        char tmp[4];
        size_t k = 0;

        if (ch == '"' || ch == '\\') {
            tmp[k++] = '\\';
            tmp[k++] = (char)ch;
        } else if (ch < 0x20 || ch > 0x7e) {
            tmp[k++] = '\\';
            tmp[k++] = 'x';
            tmp[k++] = hex[ch >> 4];
            tmp[k++] = hex[ch & 15];
        } else {
            tmp[k++] = (char)ch;
        }
        if (l + k >= cap)
            break;
        memcpy(dst + l, tmp, k);
        l += k;
    }
    if (cap > 0)
        dst[l < cap ? l : cap - 1] = '\0';
    *len = l;
}

void kd_secretfile_describe(char *dst, size_t cap, const char *s, size_t n)
{
    size_t len = 0;

    if (n > KD_SECRETFILE_SHOW_MAX) {
        snprintf(dst, cap, "<%zu bytes, not shown>", n);
        return;
    }
    dst[len++] = '"';
    kd_secretfile_escape(dst, cap - 1, &len, s, n);
    dst[len++] = '"';
    dst[len] = '\0';
}
