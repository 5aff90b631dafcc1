/* base64.c — see base64.h. */
#include "core/base64.h"

#include <errno.h>

const char kd_base64_alphabet[65] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
static const char url_alphabet[65] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

size_t kd_base64_encoded_len(size_t n, unsigned flags)
{
    if (flags & KD_B64_NOPAD)
        return n / 3 * 4 + (n % 3 ? n % 3 + 1 : 0);
    return KD_BASE64_LEN(n);
}

size_t kd_base64_encode_ex(const uint8_t *in, size_t n, char *out, unsigned flags)
{
    const char *abc = flags & KD_B64_URL ? url_alphabet : kd_base64_alphabet;
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < n)
            v |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < n)
            v |= in[i + 2];
        out[o++] = abc[(v >> 18) & 63];
        out[o++] = abc[(v >> 12) & 63];
        if (i + 1 < n)
            out[o++] = abc[(v >> 6) & 63];
        else if (!(flags & KD_B64_NOPAD))
            out[o++] = '=';
        if (i + 2 < n)
            out[o++] = abc[v & 63];
        else if (!(flags & KD_B64_NOPAD))
            out[o++] = '=';
    }
    return o;
}

size_t kd_base64_encode(const uint8_t *in, size_t n, char *out)
{
    size_t o = kd_base64_encode_ex(in, n, out, 0);
    out[o] = '\0';
    return o;
}

static int symbol(unsigned char c, unsigned flags)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == (flags & KD_B64_URL ? '-' : '+'))
        return 62;
    if (c == (flags & KD_B64_URL ? '_' : '/'))
        return 63;
    return -1;
}

long kd_base64_decode(const char *in, size_t len, uint8_t *out, size_t cap, unsigned flags)
{
    if (len > 0 && in[len - 1] == '=') {
        if ((flags & KD_B64_NOPAD) || len % 4 != 0)
            return -EINVAL;
        len--;
        if (in[len - 1] == '=')
            len--;
    }
    if (len % 4 == 1)
        return -EINVAL;
    size_t n = len / 4 * 3 + (len % 4 ? len % 4 - 1 : 0);
    if (n > cap)
        return -ENOSPC;
    uint32_t acc = 0;
    unsigned bits = 0;
    size_t o = 0;
    for (size_t i = 0; i < len; i++) {
        int v = symbol((unsigned char)in[i], flags);
        if (v < 0)
            return -EINVAL;
        acc = acc << 6 | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = (uint8_t)(acc >> bits);
            acc &= (1u << bits) - 1;
        }
    }
    if ((flags & KD_B64_STRICT) && acc != 0)
        return -EINVAL;
    return (long)o;
}
