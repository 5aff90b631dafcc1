/* tls.h — TLS on memory buffers, whatever library is behind it (wolfSSL or OpenSSL, chosen at
 * build time with -Dtls_backend=...). The connection layer moves bytes with io_uring; TLS only
 * transforms them: ciphertext in -> plaintext out, plaintext in -> ciphertext out.
 * Concurrency: a kd_tls belongs to the thread that owns its connection (it may move with the
 * connection at a quiescent point); a kd_tls_ctx is created before shards start and is read-only
 * and shareable across threads afterwards.
 * Ownership: kd_tls_ctx and kd_tls are opaque, create/destroy pairs. Input bytes are copied.
 *
 *   socket ──ciphertext──> kd_tls_feed ──> kd_tls_read ──plaintext──> protocol
 *   protocol ──plaintext──> kd_tls_write ──> kd_tls_take_output ──ciphertext──> socket
 *
 * Handshake records come out of kd_tls_take_output like any other, so the caller's loop is the
 * same before and after the handshake: after feeding, read until 0, then take output and send it.
 * Errors are negative errno values (-EPROTO for TLS failures, -ENOMEM, -EINVAL); the library's own
 * error is kept as text in kd_tls_error() for the log line (never a bare "i/o error").
 */
#ifndef KD_CORE_TLS_H
#define KD_CORE_TLS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

struct kd_tls_ctx;
struct kd_tls;

struct kd_tls_ctx_opts {
    bool server;
    const char *cert_file;     /* PEM chain; required for a server, optional for a client (mTLS) */
    const char *key_file;      /* PEM private key matching cert_file */
    const char *ca_file;       /* client: CAs to verify the server (NULL: system default store);
                                  server: CAs to verify client certificates (mTLS) */
    bool require_client_cert;  /* server: mTLS, reject clients without a valid certificate */
    bool insecure_skip_verify; /* client: tests only; logged loudly by callers */
    const char *alpn;          /* protocol to offer/require, e.g. "h2"; NULL: no ALPN */
    unsigned min_version;      /* 12 or 13 (TLS 1.2 / 1.3); 0 = 12 */
    unsigned max_version;      /* 12 or 13; 0 = 13. Pinning 12 exists for tests and odd peers. */
};

/* Which library this build uses: "wolfssl" or "openssl". */
const char *kd_tls_backend(void);

/* 0, or a negative errno with err naming the cause: -EINVAL (inconsistent options), the open()
 * errno of a file that cannot be read (-ENOENT, -EACCES), -EPROTO (a file that does not parse, a
 * key that does not match its certificate), -ENOMEM. File errors name the path. */
int kd_tls_ctx_create(const struct kd_tls_ctx_opts *o, struct kd_tls_ctx **out, char *err, size_t errlen);
void kd_tls_ctx_destroy(struct kd_tls_ctx *ctx);

/* A new connection. server_name: client side SNI and the name verified in the server's
 * certificate (required for a client unless insecure_skip_verify); ignored on a server. An IP
 * literal is matched against the certificate's IP SANs and sent without SNI (RFC 6066).
 * NULL with errno set: EINVAL (client without server_name) or ENOMEM. */
struct kd_tls *kd_tls_new(struct kd_tls_ctx *ctx, const char *server_name);
void kd_tls_free(struct kd_tls *t);

/* Ciphertext received from the peer (copied). 0 or -ENOMEM. */
int kd_tls_feed(struct kd_tls *t, const uint8_t *in, size_t n);

/* Plaintext available from what was fed: > 0 bytes, 0 when more input is needed, -EPROTO on a
 * TLS error (handshake failure, bad record, alert), -ECONNRESET on a clean close_notify.
 * Drives the handshake: call it after every feed even before the handshake is done. */
ssize_t kd_tls_read(struct kd_tls *t, uint8_t *out, size_t cap);

/* Encrypt plaintext (all of it, or an error). Before the handshake completes the bytes are
 * queued and sent once it does. 0 or negative errno (-EPIPE after kd_tls_shutdown; after a read
 * error, that error). */
int kd_tls_write(struct kd_tls *t, const uint8_t *in, size_t n);

/* Client: start the handshake (produces the ClientHello in the output). 0 or negative errno. */
int kd_tls_connect(struct kd_tls *t);

/* Ciphertext waiting to be sent. */
size_t kd_tls_output_pending(const struct kd_tls *t);
/* Move up to cap bytes of waiting ciphertext into out; returns how many. */
size_t kd_tls_take_output(struct kd_tls *t, uint8_t *out, size_t cap);

bool kd_tls_handshake_done(const struct kd_tls *t);
/* The negotiated ALPN protocol ("h2") or NULL. */
const char *kd_tls_alpn(const struct kd_tls *t);
/* "TLSv1.3", "TLSv1.2" once the handshake is done, else NULL. */
const char *kd_tls_version(const struct kd_tls *t);
/* The last error, as text naming what failed (e.g. "certificate verify failed: unable to get
 * local issuer certificate", "no shared ALPN protocol (client offered none of: h2)"), with the
 * library's own code in parentheses; "" while there is none. Valid until kd_tls_free. */
const char *kd_tls_error(const struct kd_tls *t);

/* Queue a close_notify alert in the output (after queued plaintext). Nothing is queued before the
 * handshake completes or after a TLS error, whose alert has already been queued. */
void kd_tls_shutdown(struct kd_tls *t);

#endif
