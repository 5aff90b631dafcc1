#include "core/base64.h"

const char kd_base64_alphabet[65] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

size_t kd_base64_encode(const uint8_t *in, size_t n, char *out)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < n)
            v |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < n)
            v |= in[i + 2];
        out[o++] = kd_base64_alphabet[(v >> 18) & 63];
        out[o++] = kd_base64_alphabet[(v >> 12) & 63];
        out[o++] = i + 1 < n ? kd_base64_alphabet[(v >> 6) & 63] : '=';
        out[o++] = i + 2 < n ? kd_base64_alphabet[v & 63] : '=';
    }
    out[o] = '\0';
    return o;
}
