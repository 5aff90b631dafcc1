/* tunnel_fuzz.c — arbitrary bytes as a sequence of ConnectRequest messages (each prefixed by a
 * length byte) through the decoder, the descriptor walker, the metadata conversion and the order
 * automaton, as the tunnel handler applies them. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "shards/tunnel_codec.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int on_method(void *ud, const char *s, size_t sl, const char *m, size_t ml)
{
    size_t *n = ud;
    *n += sl + ml;
    return 0;
}

static int on_md(void *ud, const char *k, size_t kl, const uint8_t *v, size_t vl)
{
    size_t *n = ud;
    *n += kl + vl;
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    enum kd_tun_state st = KD_TUN_WAIT_DESCRIPTOR;
    size_t off = 0, acc = 0;
    while (off < size) {
        size_t len = data[off++];
        if (len > size - off)
            len = size - off;
        const uint8_t *m = data + off;
        off += len;
        struct kd_tun_msg t;
        if (kd_tun_decode_request(m, len, &t) < 0)
            continue;
        const char *why;
        int ns = kd_tun_step(st, t.kind, &why);
        if (ns < 0) {
            st = KD_TUN_WAIT_DESCRIPTOR; /* a new tunnel */
            continue;
        }
        st = (enum kd_tun_state)ns;
        if (st == KD_TUN_IDLE)
            st = KD_TUN_BOUND; /* pretend kasd bound a call, so responses are reachable */
        if (t.kind == KD_TUN_DESCRIPTOR)
            kd_tun_descriptor_each(t.body, t.len, on_method, &acc);
        if (t.kind == KD_TUN_HEADER || t.kind == KD_TUN_TRAILER) {
            uint8_t *blob = malloc(t.len + 1);
            long bl = kd_tun_meta_to_blob(t.body, t.len, blob, t.len);
            if (bl >= 0)
                kd_tun_blob_each(blob, (size_t)bl, on_md, &acc);
            free(blob);
        }
    }
    return acc == (size_t)-1;
}
