/* secret_fuzz.c — arbitrary bytes as the JWT secret file (core/jwt.c kd_jwt_secret_load: trailing
 * whitespace, optional padding, standard base64). The bytes are written to a memfd read back through
 * /proc/self/fd, once with room for any secret and once with a small cap. Checks: only the documented
 * return codes; an accepted file is exactly the canonical base64 of the decoded secret (padding
 * optional, trailing whitespace ignored); a secret over the cap is -ENOSPC, never truncated. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "core/jwt.h"
#include "test/fuzz/fuzz.h"

static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* Standard base64 without padding. */
static size_t encode(const uint8_t *in, size_t n, char *out)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v =
            (uint32_t)in[i] << 16 | (i + 1 < n ? (uint32_t)in[i + 1] << 8 : 0) | (i + 2 < n ? in[i + 2] : 0);
        size_t k = n - i >= 3 ? 4 : n - i + 1;
        for (size_t j = 0; j < k; j++)
            out[o++] = alphabet[(v >> (18 - 6 * j)) & 63];
    }
    return o;
}

static int fd = -1;
static char path[64];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (fd < 0) {
        fd = memfd_create("secret_fuzz", MFD_CLOEXEC);
        CHECK(fd >= 0);
        snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    }
    CHECK(ftruncate(fd, 0) == 0);
    CHECK(pwrite(fd, data, size, 0) == (ssize_t)size);

    static uint8_t out[4096], small[16];
    static char enc[8192];
    char err[256];
    size_t len = 0, slen = 0;
    int rc = kd_jwt_secret_load(path, out, sizeof(out), &len, err, sizeof(err));
    CHECK(rc == 0 || rc == -EINVAL || rc == -EFBIG || rc == -ENOSPC);
    if (size > 4096)
        CHECK(rc == -EFBIG);
    int src = kd_jwt_secret_load(path, small, sizeof(small), &slen, err, sizeof(err));
    CHECK(src == 0 || src == -EINVAL || src == -EFBIG || src == -ENOSPC);
    if (rc != 0) {
        /* The small cap is checked before the characters are. */
        CHECK(src == rc || (rc == -EINVAL && src == -ENOSPC));
        return 0;
    }
    CHECK(len <= 3072);
    if (len > sizeof(small)) {
        CHECK(src == -ENOSPC);
    } else {
        CHECK(src == 0 && slen == len && memcmp(small, out, len) == 0);
    }
    /* The file, whitespace and padding off, is the canonical encoding of what was decoded. */
    size_t n = size;
    while (n > 0 && (data[n - 1] == '\n' || data[n - 1] == '\r' || data[n - 1] == ' ' || data[n - 1] == '\t'))
        n--;
    size_t pad = 0;
    while (n > 0 && pad < 2 && data[n - 1] == '=') {
        n--;
        pad++;
    }
    size_t e = encode(out, len, enc);
    CHECK(e == n && memcmp(enc, data, n) == 0);
    if (pad > 0)
        CHECK((n + pad) % 4 == 0);
    return 0;
}
