/* base64_test.c — core/base64.c: RFC 4648 vectors, round trips for every flag set and length, and
 * the decoder's refusals (alphabet, length, padding, stray bits, capacity). */
#include <criterion/criterion.h>
#include <errno.h>
#include <string.h>

#include "core/base64.h"

static const unsigned FLAGS[] = {0, KD_B64_NOPAD, KD_B64_URL, KD_B64_URL | KD_B64_NOPAD};

Test(base64, rfc4648_vectors)
{
    static const char *const plain[] = {"", "f", "fo", "foo", "foob", "fooba", "foobar"};
    static const char *const enc[] = {"", "Zg==", "Zm8=", "Zm9v", "Zm9vYg==", "Zm9vYmE=", "Zm9vYmFy"};
    for (size_t i = 0; i < 7; i++) {
        char out[16];
        cr_assert_eq(kd_base64_encode((const uint8_t *)plain[i], strlen(plain[i]), out), strlen(enc[i]));
        cr_assert_str_eq(out, enc[i]);
        uint8_t dec[16];
        cr_assert_eq(kd_base64_decode(enc[i], strlen(enc[i]), dec, sizeof(dec), KD_B64_STRICT),
                     (long)strlen(plain[i]));
        cr_assert(memcmp(dec, plain[i], strlen(plain[i])) == 0);
    }
}

Test(base64, round_trips_every_flag_and_length)
{
    uint8_t in[70], dec[70];
    char out[100];
    for (size_t i = 0; i < sizeof(in); i++)
        in[i] = (uint8_t)(i * 37 + 0xfb);
    for (size_t f = 0; f < 4; f++)
        for (size_t n = 0; n <= sizeof(in); n++) {
            size_t len = kd_base64_encode_ex(in, n, out, FLAGS[f]);
            cr_assert_eq(len, kd_base64_encoded_len(n, FLAGS[f]));
            for (size_t i = 0; i < len; i++) {
                cr_assert(FLAGS[f] & KD_B64_URL ? out[i] != '+' && out[i] != '/' : out[i] != '-' && out[i] != '_');
                cr_assert(!(FLAGS[f] & KD_B64_NOPAD) || out[i] != '=');
            }
            long d = kd_base64_decode(out, len, dec, n, FLAGS[f] | KD_B64_STRICT);
            cr_assert_eq(d, (long)n, "flags %u n %zu: %ld", FLAGS[f], n, d);
            cr_assert(memcmp(dec, in, n) == 0);
            if (n > 0)
                cr_assert_eq(kd_base64_decode(out, len, dec, n - 1, FLAGS[f]), -ENOSPC);
        }
}

Test(base64, refusals)
{
    uint8_t d[16];
    /* a symbol of the other alphabet */
    cr_assert_eq(kd_base64_decode("a+b/", 4, d, sizeof(d), KD_B64_URL), -EINVAL);
    cr_assert_eq(kd_base64_decode("a-b_", 4, d, sizeof(d), 0), -EINVAL);
    cr_assert_eq(kd_base64_decode("ab c", 4, d, sizeof(d), 0), -EINVAL);
    /* 4k + 1 symbols cannot be an encoding */
    cr_assert_eq(kd_base64_decode("abcde", 5, d, sizeof(d), 0), -EINVAL);
    /* padding: only to a multiple of 4, at most two, refused under NOPAD */
    cr_assert_eq(kd_base64_decode("Zg=", 3, d, sizeof(d), 0), -EINVAL);
    cr_assert_eq(kd_base64_decode("Z===", 4, d, sizeof(d), 0), -EINVAL);
    cr_assert_eq(kd_base64_decode("Zg==", 4, d, sizeof(d), KD_B64_NOPAD), -EINVAL);
    cr_assert_eq(kd_base64_decode("Z=g=", 4, d, sizeof(d), 0), -EINVAL);
    /* padding is optional otherwise */
    cr_assert_eq(kd_base64_decode("Zg", 2, d, sizeof(d), KD_B64_STRICT), 1);
    cr_assert_eq(d[0], 'f');
    /* stray bits in the last symbol: refused when strict, ignored otherwise (as grpc-go does) */
    cr_assert_eq(kd_base64_decode("Zh==", 4, d, sizeof(d), KD_B64_STRICT), -EINVAL);
    cr_assert_eq(kd_base64_decode("Zh==", 4, d, sizeof(d), 0), 1);
    cr_assert_eq(d[0], 'f');
}
