/* http1.h — the client side of HTTP/1.1 (RFC 9112): write a request, parse the response as its
 * bytes arrive, in any split. For kasd's calls to GitLab's internal API (agent_info and friends)
 * over a plain or TLS byte stream the caller owns. No I/O, no allocation after kd_h1_parser_new.
 * Concurrency: none inside; a parser belongs to one connection (shard-local, no locks).
 * Ownership: request fields and input bytes are borrowed for the call. Body bytes come back as
 * slices of the caller's input (valid while that input is); the response head is copied into the
 * parser's one buffer (head_max bytes, allocated at creation) and stays readable until the next
 * kd_h1_parser_reset or kd_h1_parser_free.
 *
 * What the parser accepts (RFC 9112 unless noted; anything else is a specific error below):
 *   - status line `HTTP/1.1` or `HTTP/1.0`, SP, three digits 100..599, then SP and a reason (the
 *     SP and reason may be absent); lines end in CRLF (a bare CR or LF is refused);
 *   - header lines `token ":" OWS value OWS`; no whitespace before the colon, no obs-fold; values
 *     hold no control characters but HTAB; at most headers_max lines and head_max bytes a head;
 *   - interim 1xx responses are read and dropped (at most KD_H1_INTERIM_MAX); 101 is refused
 *     (the writer never asks for an upgrade);
 *   - framing (RFC 9112 6.3): no body for a HEAD request, 1xx, 204 and 304; else
 *     `Transfer-Encoding: chunked` (the only coding taken; with Content-Length, or in HTTP/1.0,
 *     refused); else Content-Length (repeated or listed only with equal values); else until the
 *     peer closes, only when the limits allow it;
 *   - chunked bodies: hex sizes (overflow refused), extensions skipped, CRLF after each chunk's
 *     data, trailer lines checked for shape and limits and dropped.
 * Everything is decided by the bytes alone: feeding a response one byte at a time gives the same
 * events (body slices aside: their concatenation is the same) as feeding it at once.
 */
#ifndef KD_CORE_HTTP1_H
#define KD_CORE_HTTP1_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KD_H1_HEAD_MAX_DEFAULT    16384 /* bytes of one response head (status line + headers) */
#define KD_H1_HEAD_MAX_LIMIT      (1u << 20)
#define KD_H1_HEADERS_MAX_DEFAULT 64 /* header lines of one head; trailer lines likewise */
#define KD_H1_HEADERS_MAX_LIMIT   1024
#define KD_H1_BODY_MAX_DEFAULT    (1u << 20)
#define KD_H1_INTERIM_MAX         8    /* 1xx responses before the final one */
#define KD_H1_CHUNK_LINE_MAX      1024 /* a chunk-size line, extensions included */
/* Largest Content-Length or chunk size taken: more is refused as malformed, whatever body_max. */
#define KD_H1_LENGTH_MAX ((uint64_t)1 << 62)

/* Errors: negative, each with a fixed text (kd_h1_strerror). */
enum kd_h1_error {
    KD_H1_E_FIELD = -1,         /* writer: a field holds CR, LF, NUL or a byte its syntax forbids */
    KD_H1_E_NOSPACE = -2,       /* writer: the output buffer is too small (*len says how much) */
    KD_H1_E_STATUS_LINE = -3,   /* malformed status line */
    KD_H1_E_VERSION = -4,       /* neither HTTP/1.1 nor HTTP/1.0 */
    KD_H1_E_STATUS = -5,        /* status code outside 100..599 */
    KD_H1_E_LINE_END = -6,      /* a bare CR or LF where CRLF belongs */
    KD_H1_E_HEADER = -7,        /* header line: no colon, bad name, whitespace before the colon */
    KD_H1_E_HEADER_VALUE = -8,  /* header value with a control character */
    KD_H1_E_OBS_FOLD = -9,      /* a line folded onto the previous one */
    KD_H1_E_HEAD_TOO_BIG = -10, /* head over head_max bytes */
    KD_H1_E_TOO_MANY_HEADERS = -11,
    KD_H1_E_CONTENT_LENGTH = -12,  /* Content-Length malformed or over KD_H1_LENGTH_MAX */
    KD_H1_E_LENGTH_CONFLICT = -13, /* Content-Length values that differ */
    KD_H1_E_TRANSFER_CODING = -14, /* Transfer-Encoding other than a single chunked, or in HTTP/1.0 */
    KD_H1_E_TE_AND_CL = -15,       /* both Transfer-Encoding and Content-Length */
    KD_H1_E_NO_LENGTH = -16,       /* body delimited by close, and the limits do not allow it */
    KD_H1_E_CHUNK_SIZE = -17,      /* chunk size missing, not hex, or over KD_H1_LENGTH_MAX */
    KD_H1_E_CHUNK_EXT = -18,       /* chunk-size line malformed after the size, or too long */
    KD_H1_E_CHUNK_END = -19,       /* chunk data not followed by CRLF */
    KD_H1_E_TRAILER = -20,         /* trailer line malformed, or trailers over the limits */
    KD_H1_E_BODY_TOO_BIG = -21,    /* body over body_max */
    KD_H1_E_UPGRADE = -22,         /* 101 Switching Protocols: never asked for */
    KD_H1_E_INTERIM = -23,         /* more than KD_H1_INTERIM_MAX 1xx responses */
    KD_H1_E_TRUNCATED = -24,       /* the peer closed before the response was complete */
    KD_H1_E_EXTRA = -25,           /* bytes after a complete response (the parser stays done) */
};
#define KD_H1_E_LAST KD_H1_E_EXTRA

/* A fixed text for an error code ("unknown error" for anything else); never NULL. */
const char *kd_h1_strerror(int err);

/* ---- request writer ---- */

struct kd_h1_header {
    const char *name;
    size_t name_len;
    const char *value;
    size_t value_len;
};

/* Strings are NUL-terminated. body NULL: no body and no Content-Length; otherwise
 * `Content-Length: body_len` and the body follow the head (body_len 0 is allowed). The writer owns
 * Host, Content-Length and Transfer-Encoding: extra headers with those names are refused. */
struct kd_h1_request {
    const char *method; /* a token, e.g. "GET" */
    const char *target; /* origin-form, e.g. "/api/v4/internal/kubernetes/agent_info" */
    const char *host;   /* Host value, e.g. "gitlab.example.com:8080" */
    const struct kd_h1_header *headers;
    size_t nheaders;
    const void *body;
    size_t body_len;
};

/* Write the request (head, then body) to out. Returns 0 and sets *len to the bytes written;
 * KD_H1_E_NOSPACE when cap is too small (out may be NULL to ask: *len is set to the size needed,
 * nothing is written); KD_H1_E_FIELD when a field is malformed: err (may be NULL) then names it,
 * e.g. "header 2 value: CR". Checks: method a token; target and host non-empty printable ASCII
 * without spaces; header names tokens; header values without CR, LF, NUL or other controls but
 * HTAB. */
int kd_h1_request_write(const struct kd_h1_request *rq, char *out, size_t cap, size_t *len, char *err,
                        size_t errlen);

/* ---- response parser ---- */

struct kd_h1_limits {
    size_t head_max;            /* 0: KD_H1_HEAD_MAX_DEFAULT; at most KD_H1_HEAD_MAX_LIMIT */
    size_t headers_max;         /* 0: KD_H1_HEADERS_MAX_DEFAULT; at most KD_H1_HEADERS_MAX_LIMIT */
    uint64_t body_max;          /* 0: KD_H1_BODY_MAX_DEFAULT */
    bool allow_close_delimited; /* a body without length, read until the peer closes */
};

enum kd_h1_framing {
    KD_H1_BODY_NONE,    /* HEAD request, 1xx, 204, 304 */
    KD_H1_BODY_LENGTH,  /* Content-Length */
    KD_H1_BODY_CHUNKED, /* Transfer-Encoding: chunked */
    KD_H1_BODY_CLOSE,   /* until the peer closes */
};

/* The final response's head, filled when kd_h1_parser_feed returns KD_H1_EV_HEAD. Slices point
 * into the parser's buffer. */
struct kd_h1_response {
    int status;
    int minor; /* 1: HTTP/1.1, 0: HTTP/1.0 */
    const char *reason;
    size_t reason_len;
    enum kd_h1_framing framing;
    uint64_t content_length; /* KD_H1_BODY_LENGTH only; 0 otherwise */
    size_t nheaders;
    unsigned interim;      /* 1xx responses skipped before this one */
    bool connection_close; /* Connection lists "close" */
    bool connection_keep;  /* Connection lists "keep-alive" */
};

enum kd_h1_event {
    KD_H1_EV_NEED_MORE = 0, /* all input taken; feed more (or kd_h1_parser_eof) */
    KD_H1_EV_HEAD = 1,      /* the final response's head is complete: kd_h1_parser_response */
    KD_H1_EV_BODY = 2,      /* *body holds the next body bytes (never empty) */
    KD_H1_EV_DONE = 3,      /* the response is complete; *used ends at its last byte */
};

struct kd_h1_slice {
    const uint8_t *p;
    size_t len;
};

struct kd_h1_parser;

/* NULL on ENOMEM or limits over their caps. One allocation: the head buffer and header table. */
struct kd_h1_parser *kd_h1_parser_new(const struct kd_h1_limits *lim);
void kd_h1_parser_free(struct kd_h1_parser *p);
/* Get ready for the next response (new parsers start ready, as if for a non-HEAD request).
 * head_request: the request was HEAD, so the response has no body whatever its headers say. */
void kd_h1_parser_reset(struct kd_h1_parser *p, bool head_request);

/* Take bytes up to the next event. Returns an enum kd_h1_event (>= 0) or an enum kd_h1_error;
 * *used is the count of data's bytes taken (all of them for NEED_MORE). Call in a loop on what is
 * left until NEED_MORE, DONE or an error: events that need no input (DONE after an empty body) come
 * on a call with len 0 too. Errors are sticky (the same error, nothing taken), except
 * KD_H1_E_EXTRA: input after DONE (the parser stays done; len 0 after DONE returns DONE). */
int kd_h1_parser_feed(struct kd_h1_parser *p, const void *data, size_t len, size_t *used,
                      struct kd_h1_slice *body);
/* The peer closed. DONE when that ends the response (close-delimited body, or already done);
 * KD_H1_E_TRUNCATED otherwise; a sticky error is returned as is. */
int kd_h1_parser_eof(struct kd_h1_parser *p);

/* The final head, or NULL before KD_H1_EV_HEAD. */
const struct kd_h1_response *kd_h1_parser_response(const struct kd_h1_parser *p);
/* Header i (0-based, in arrival order) of the final head; false when out of range or no head. */
bool kd_h1_parser_header(const struct kd_h1_parser *p, size_t i, struct kd_h1_header *out);
/* The first header named `name` (case-insensitive), or NULL; *len gets the value's length. */
const char *kd_h1_parser_find(const struct kd_h1_parser *p, const char *name, size_t *len);
/* Once DONE: whether the connection may carry the next request. HTTP/1.1 unless Connection: close;
 * HTTP/1.0 only with Connection: keep-alive; never after a close-delimited body. False before DONE. */
bool kd_h1_parser_keep_alive(const struct kd_h1_parser *p);
/* Body bytes delivered so far for this response. */
uint64_t kd_h1_parser_body_seen(const struct kd_h1_parser *p);

/* Checks the invariants (buffer and table bounds, counters within limits); 0 or -EINVAL. For tests. */
int kd_h1_parser_validate(const struct kd_h1_parser *p);

#endif
