/* httpmap_fuzz.c — the Kubernetes API front door's mapping (core/httpmap.h) on arbitrary bytes:
 * an agent's HttpResponse message (parse, then every header it would pass on, checked for bytes
 * HTTP forbids), and an HTTP request head (path decoding, query parsing, header rules) encoded as
 * the HttpRequest header message, which must decode with kasd's own protobuf reader.
 *
 * Input: byte 0 = mode (even: response message; odd: request); the rest is the message, or, for a
 * request, lines: path, query, then "name:value" headers. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/httpmap.h"
#include "core/pb.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int check_header(void *ud, const char *n, size_t nl, const char *v, size_t vl)
{
    (void)ud;
    if (nl == 0)
        abort();
    for (size_t i = 0; i < nl; i++)
        if (n[i] <= ' ' || n[i] == ':' || (unsigned char)n[i] >= 0x7f)
            abort(); /* never a name HTTP forbids */
    for (size_t i = 0; i < vl; i++)
        if (v[i] == '\r' || v[i] == '\n' || v[i] == '\0')
            abort(); /* never response splitting */
    return 0;
}

static void walk(const uint8_t *p, size_t n, int depth)
{
    struct kd_pb_reader r;
    struct kd_pb_field f;
    kd_pb_reader_init(&r, p, n);
    int rc;
    while ((rc = kd_pb_next(&r, &f)) == 1)
        if (f.wt == KD_PB_LEN && depth < 6 && (f.num == 1 || f.num == 2 || f.num == 4))
            (void)0; /* values are strings or nested messages: a string need not parse */
    if (rc < 0)
        abort(); /* what we encode is always well-formed protobuf */
}

static void request(const uint8_t *data, size_t size)
{
    const char *lines[66];
    size_t lens[66], n = 0;
    const char *p = (const char *)data, *end = p + size;
    while (p <= end && n < 66) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *e = nl ? nl : end;
        lines[n] = p;
        lens[n++] = (size_t)(e - p);
        if (!nl)
            break;
        p = nl + 1;
    }
    if (n < 2)
        return;
    char *path = malloc(lens[0] + 1);
    long pl = kd_hm_path_decode(lines[0], lens[0], path);
    if (pl < 0) {
        free(path);
        return;
    }
    if ((size_t)pl > lens[0] || memchr(path, '\0', (size_t)pl))
        abort();
    struct kd_hm_header hs[64];
    size_t nh = 0;
    for (size_t i = 2; i < n && nh < 64; i++) {
        const char *c = memchr(lines[i], ':', lens[i]);
        if (c == NULL)
            continue;
        hs[nh++] = (struct kd_hm_header){lines[i], (size_t)(c - lines[i]), c + 1,
                                         lens[i] - (size_t)(c - lines[i]) - 1};
    }
    const char *const groups[] = {"g1", "g2"};
    struct kd_hm_imp imp = {
        .username = size % 3 == 0 ? "u" : NULL, .groups = groups, .ngroups = 2, .uid = "1"};
    struct kd_hm_request rq = {
        .method = "GET",
        .method_len = 3,
        .url_path = path,
        .url_path_len = (size_t)pl,
        .query = lines[1],
        .query_len = lens[1],
        .headers = hs,
        .nheaders = nh,
        .via = "gRPC/1.0 kasd",
        .imp = &imp,
        .content_length = (int64_t)size - 1,
    };
    uint8_t *out;
    size_t olen;
    if (kd_hm_encode_request_header(&rq, 1 << 20, &out, &olen) == 0) {
        walk(out, olen, 0);
        free(out);
    }
    free(path);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    if (data[0] & 1) {
        request(data + 1, size - 1);
        return 0;
    }
    struct kd_hm_response r;
    if (kd_hm_parse_response(data + 1, size - 1, &r) != 0)
        return 0;
    if (r.kind < KD_HM_HEADER || r.kind > KD_HM_UPGRADE)
        abort();
    if (r.data != NULL && (r.data < data || r.data + r.data_len > data + size))
        abort();
    if (r.kind == KD_HM_HEADER) {
        int64_t cl;
        (void)kd_hm_response_headers(&r, &cl, check_header, NULL);
        if (cl < -1)
            abort();
    }
    return 0;
}
