/* tls_openssl.c — core/tls.h on OpenSSL 3. This file is the only one that includes OpenSSL headers
 * for TLS (wolfSSL's OpenSSL-compatible headers must never meet them, see tls_wolfssl.c).
 *
 * Bytes move through a small custom BIO that reads from kd_tls.in and appends to kd_tls.out, rather
 * than through BIO_s_mem: a memory BIO keeps its high-water allocation for the life of the
 * connection, while our queues are freed the moment they empty, so an idle connection holds no I/O
 * buffer at all. With SSL_MODE_RELEASE_BUFFERS OpenSSL frees its own record buffers between
 * records, and it drops the handshake buffer once the handshake is done.
 *
 *   kd_tls_feed ──> in ──bio_read──> SSL ──bio_write──> out ──> kd_tls_take_output
 *   kd_tls_write ──> (pending, until the handshake is done) ──> SSL_write
 */
#include "core/tls.h"
#include "core/tls_common.h"

#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

/* TLS 1.2: forward secrecy and AEAD only. TLS 1.3 suites are all AEAD; these are the defaults,
 * spelled out so a system-wide openssl.cnf cannot widen them. */
#define CIPHERS_TLS12                                                                                        \
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"               \
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
#define CIPHERS_TLS13 "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
#define GROUPS        "X25519:P-256:P-384"

/* ---- types ------------------------------------------------------------------------------------ */

struct kd_tls_ctx {
    SSL_CTX *ssl;
    char *alpn; /* NULL: no ALPN */
    bool server;
    bool verify; /* client: verify the server's certificate and name */
};

struct kd_tls {
    SSL *ssl;
    const struct kd_tls_ctx *ctx;
    struct kd_bq in;      /* ciphertext fed, not yet consumed by OpenSSL */
    struct kd_bq out;     /* ciphertext produced, not yet taken */
    struct kd_bq pending; /* plaintext written before the handshake finished */
    char *err;            /* first failure, allocated only when one happens */
    int fatal;            /* 0, or the negative errno every later read/write returns */
    bool hs_done;
    bool shut;  /* close_notify queued */
    bool nomem; /* the BIO could not grow a queue: report -ENOMEM, not a TLS error */
};

/* ---- errors ----------------------------------------------------------------------------------- */

/* Keeps the first error: later ones are consequences (e.g. the alert we send after a failure). */
#define set_err(t, ...) kd_tls_first_err(&(t)->err, __VA_ARGS__)
#define ctx_err         kd_tls_ctx_err
#define alert_name      kd_tls_alert_name

/* The root cause from OpenSSL's (thread-local) error queue, in the project's words. */
static void describe_failure(struct kd_tls *t)
{
    /* The first SSL-library entry is the protocol-level cause; entries from other libraries
     * (ASN.1, EVP) are details of it. Popping them all leaves the queue clean for the next
     * connection on this thread. */
    unsigned long first = 0, e = 0;
    for (unsigned long x; (x = ERR_get_error()) != 0;) {
        if (first == 0)
            first = x;
        if (e == 0 && ERR_GET_LIB(x) == ERR_LIB_SSL)
            e = x;
    }
    if (e == 0)
        e = first;
    int reason = ERR_GET_REASON(e);
    const char *lib_text = e ? ERR_reason_error_string(e) : NULL;
    if (lib_text == NULL)
        lib_text = "unknown error";

    if (e == 0) {
        set_err(t, "TLS failure without a library error");
    } else if (reason == SSL_R_CERTIFICATE_VERIFY_FAILED) {
        long v = SSL_get_verify_result(t->ssl);
        X509_VERIFY_PARAM *p = SSL_get0_param(t->ssl);
        if (v == X509_V_ERR_HOSTNAME_MISMATCH || v == X509_V_ERR_IP_ADDRESS_MISMATCH) {
            char *ip = X509_VERIFY_PARAM_get1_ip_asc(p);
            const char *host = X509_VERIFY_PARAM_get0_host(p, 0);
            const char *name = ip ? ip : host ? host : "?";
            set_err(t,
                    "certificate verify failed: %s (certificate is not valid for \"%s\") (openssl x509 error "
                    "%ld)",
                    X509_verify_cert_error_string(v), name, v);
            OPENSSL_free(ip);
        } else {
            set_err(t, "certificate verify failed: %s (openssl x509 error %ld)",
                    X509_verify_cert_error_string(v), v);
        }
    } else if (reason == SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE) {
        set_err(t, "peer did not send a certificate (a client certificate is required) (openssl 0x%08lX)", e);
    } else if (reason == SSL_R_NO_SHARED_CIPHER) {
        set_err(t, "no shared cipher (openssl 0x%08lX)", e);
    } else if (reason == SSL_R_UNSUPPORTED_PROTOCOL || reason == SSL_R_WRONG_SSL_VERSION ||
               reason == SSL_R_UNSUPPORTED_SSL_VERSION || reason == SSL_R_VERSION_TOO_LOW ||
               reason == SSL_R_VERSION_TOO_HIGH) {
        set_err(t, "protocol version not supported by both sides: %s (openssl 0x%08lX)", lib_text, e);
    } else if (reason == SSL_R_NO_APPLICATION_PROTOCOL) {
        set_err(t, "no shared ALPN protocol (openssl 0x%08lX)", e);
    } else if (reason == SSL_R_HTTP_REQUEST || reason == SSL_R_HTTPS_PROXY_REQUEST ||
               reason == SSL_R_WRONG_VERSION_NUMBER || reason == SSL_R_PACKET_LENGTH_TOO_LONG ||
               reason == SSL_R_RECORD_LENGTH_MISMATCH) {
        set_err(t, "not TLS or a malformed record: %s (openssl 0x%08lX)", lib_text, e);
    } else if (reason == SSL_R_DECRYPTION_FAILED_OR_BAD_RECORD_MAC || reason == SSL_R_DECRYPTION_FAILED) {
        set_err(t, "record authentication failed (bad record mac): %s (openssl 0x%08lX)", lib_text, e);
    } else if (reason >= SSL_AD_REASON_OFFSET && reason < SSL_AD_REASON_OFFSET + 256) {
        set_err(t, "alert from peer: %s (openssl 0x%08lX)", alert_name(reason - SSL_AD_REASON_OFFSET), e);
    } else {
        set_err(t, "TLS error: %s (openssl 0x%08lX)", lib_text, e);
    }
}

/* Translates the result of an SSL_* call: 0 when it only needs more input (or could not write yet,
 * which our BIO never refuses), else the fatal negative errno, remembered for later calls. */
static int ssl_result(struct kd_tls *t, int ret)
{
    int e = SSL_get_error(t->ssl, ret);
    switch (e) {
    case SSL_ERROR_WANT_READ:
    case SSL_ERROR_WANT_WRITE:
        ERR_clear_error();
        return 0;
    case SSL_ERROR_ZERO_RETURN:
        set_err(t, "connection closed by peer (close_notify)");
        t->fatal = -ECONNRESET;
        break;
    default: /* SSL_ERROR_SSL; SSL_ERROR_SYSCALL means our BIO failed to grow a queue */
        if (t->nomem) {
            set_err(t, "out of memory for TLS buffers");
            t->fatal = -ENOMEM;
            ERR_clear_error();
            break;
        }
        describe_failure(t);
        t->fatal = -EPROTO;
        break;
    }
    return t->fatal;
}

/* ---- the BIO between OpenSSL and our queues ---------------------------------------------------- */

static BIO_METHOD *bio_method;
static pthread_once_t bio_once = PTHREAD_ONCE_INIT;

static int bio_write(BIO *b, const char *buf, int len)
{
    struct kd_tls *t = BIO_get_data(b);
    BIO_clear_retry_flags(b);
    if (len <= 0)
        return 0;
    if (kd_bq_push(&t->out, buf, (size_t)len) < 0) {
        t->nomem = true;
        return -1;
    }
    return len;
}

static int bio_read(BIO *b, char *buf, int len)
{
    struct kd_tls *t = BIO_get_data(b);
    BIO_clear_retry_flags(b);
    if (len <= 0)
        return 0;
    if (kd_bq_used(&t->in) == 0) {
        BIO_set_retry_read(b); /* "no data yet", never EOF: the caller feeds more later */
        return -1;
    }
    return (int)kd_bq_pop(&t->in, buf, (size_t)len);
}

static long bio_ctrl(BIO *b, int cmd, long num, void *ptr)
{
    struct kd_tls *t = BIO_get_data(b);
    switch (cmd) {
    case BIO_CTRL_FLUSH:
        return 1;
    case BIO_CTRL_PENDING:
        return t ? (long)kd_bq_used(&t->in) : 0;
    default:
        return 0;
    }
}

static int bio_create(BIO *b)
{
    BIO_set_init(b, 1);
    return 1;
}

static void bio_method_init(void)
{
    BIO_METHOD *m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "kd_tls");
    if (m == NULL)
        return;
    if (!BIO_meth_set_write(m, bio_write) || !BIO_meth_set_read(m, bio_read) ||
        !BIO_meth_set_ctrl(m, bio_ctrl) || !BIO_meth_set_create(m, bio_create)) {
        BIO_meth_free(m);
        return;
    }
    bio_method = m;
}

/* ---- context ---------------------------------------------------------------------------------- */

const char *kd_tls_backend(void)
{
    return "openssl";
}

/* Reports an unreadable file with the open() errno, which OpenSSL's own message buries. */
static int check_readable(const char *what, const char *path, char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        int e = errno;
        ctx_err(err, errlen, "cannot read %s \"%s\": %s", what, path, strerror(e));
        return -e;
    }
    fclose(f);
    return 0;
}

/* The innermost cause ("no start line"), not the outermost wrapper ("PEM lib"). */
static const char *ossl_reason(void)
{
    unsigned long e = ERR_peek_error();
    const char *s = e ? ERR_reason_error_string(e) : NULL;
    return s ? s : "unknown error";
}

/* Appends one protocol name to a comma-separated, printable list for an error text: the client
 * chose these bytes, they may be anything. */
static void list_append(char *buf, size_t cap, size_t *len, const unsigned char *p, size_t n)
{
    if (*len > 0 && *len + 1 < cap)
        buf[(*len)++] = ',';
    for (size_t i = 0; i < n && *len + 1 < cap; i++)
        buf[(*len)++] = p[i] >= 0x20 && p[i] < 0x7f ? (char)p[i] : '?';
    buf[*len] = 0;
}

/* Server: accept our protocol if the client offers it. A client that offers ALPN without it gets a
 * no_application_protocol alert; a client that sends no ALPN never reaches this callback and
 * proceeds (the caller decides from kd_tls_alpn). */
static int alpn_select(SSL *ssl, const unsigned char **out, unsigned char *outlen, const unsigned char *in,
                       unsigned int inlen, void *arg)
{
    const struct kd_tls_ctx *ctx = arg;
    size_t want = strlen(ctx->alpn);
    char offered[200] = "";
    size_t o = 0;
    for (unsigned i = 0; i < inlen;) {
        unsigned l = in[i];
        if (l == 0 || i + 1 + l > inlen)
            break;
        if (l == want && memcmp(in + i + 1, ctx->alpn, l) == 0) {
            *out = in + i + 1;
            *outlen = (unsigned char)l;
            return SSL_TLSEXT_ERR_OK;
        }
        list_append(offered, sizeof(offered), &o, in + i + 1, l);
        i += 1 + l;
    }
    struct kd_tls *t = SSL_get_app_data(ssl);
    if (t != NULL)
        set_err(t, "no shared ALPN protocol (client offered none of: %s; it offered: %s)", ctx->alpn,
                offered);
    return SSL_TLSEXT_ERR_ALERT_FATAL;
}

static int load_cert_key(SSL_CTX *sc, const struct kd_tls_ctx_opts *o, char *err, size_t errlen)
{
    int rc;
    if ((rc = check_readable("certificate file", o->cert_file, err, errlen)) < 0)
        return rc;
    if ((rc = check_readable("key file", o->key_file, err, errlen)) < 0)
        return rc;
    if (SSL_CTX_use_certificate_chain_file(sc, o->cert_file) != 1) {
        ctx_err(err, errlen, "certificate file \"%s\": no usable PEM certificate (openssl: %s)", o->cert_file,
                ossl_reason());
        return -EPROTO;
    }
    if (SSL_CTX_use_PrivateKey_file(sc, o->key_file, SSL_FILETYPE_PEM) != 1) {
        unsigned long e = ERR_peek_last_error();
        if (ERR_GET_LIB(e) == ERR_LIB_X509 && ERR_GET_REASON(e) == X509_R_KEY_VALUES_MISMATCH)
            ctx_err(err, errlen, "key file \"%s\" does not match certificate file \"%s\"", o->key_file,
                    o->cert_file);
        else
            ctx_err(err, errlen, "key file \"%s\": no usable PEM private key (openssl: %s)", o->key_file,
                    ossl_reason());
        return -EPROTO;
    }
    if (SSL_CTX_check_private_key(sc) != 1) {
        ctx_err(err, errlen, "key file \"%s\" does not match certificate file \"%s\"", o->key_file,
                o->cert_file);
        return -EPROTO;
    }
    return 0;
}

static int load_ca(SSL_CTX *sc, const struct kd_tls_ctx_opts *o, char *err, size_t errlen)
{
    int rc;
    if (o->ca_file == NULL) {
        if (SSL_CTX_set_default_verify_paths(sc) != 1) {
            ctx_err(err, errlen, "cannot load the system CA store (openssl: %s)", ossl_reason());
            return -EPROTO;
        }
        return 0;
    }
    if ((rc = check_readable("CA file", o->ca_file, err, errlen)) < 0)
        return rc;
    if (SSL_CTX_load_verify_locations(sc, o->ca_file, NULL) != 1) {
        ctx_err(err, errlen, "CA file \"%s\": no usable PEM certificate (openssl: %s)", o->ca_file,
                ossl_reason());
        return -EPROTO;
    }
    if (o->server) {
        /* The CertificateRequest names the acceptable issuers, which helps clients pick a cert. */
        STACK_OF(X509_NAME) *names = SSL_load_client_CA_file(o->ca_file);
        if (names == NULL) {
            ctx_err(err, errlen, "CA file \"%s\": no CA names (openssl: %s)", o->ca_file, ossl_reason());
            return -EPROTO;
        }
        SSL_CTX_set_client_CA_list(sc, names);
    }
    return 0;
}

static int check_opts(const struct kd_tls_ctx_opts *o, unsigned *minv, unsigned *maxv, char *err,
                      size_t errlen)
{
    *minv = o->min_version ? o->min_version : 12;
    *maxv = o->max_version ? o->max_version : 13;
    if ((*minv != 12 && *minv != 13) || (*maxv != 12 && *maxv != 13) || *minv > *maxv) {
        ctx_err(err, errlen, "TLS versions must be 12 or 13 with min <= max (got min %u, max %u)",
                o->min_version, o->max_version);
        return -EINVAL;
    }
    if (o->server && (o->cert_file == NULL || o->key_file == NULL)) {
        ctx_err(err, errlen, "a TLS server needs a certificate file and a key file");
        return -EINVAL;
    }
    if ((o->cert_file == NULL) != (o->key_file == NULL)) {
        ctx_err(err, errlen, "a certificate file needs a key file and vice versa");
        return -EINVAL;
    }
    if (o->server && o->require_client_cert && o->ca_file == NULL) {
        ctx_err(err, errlen, "require_client_cert needs a CA file to verify client certificates");
        return -EINVAL;
    }
    if (o->alpn != NULL && (strlen(o->alpn) == 0 || strlen(o->alpn) > 255 || strchr(o->alpn, ',') != NULL)) {
        /* No comma: wolfSSL takes ALPN lists comma-separated, and both backends accept the same. */
        ctx_err(err, errlen, "ALPN protocol name must be 1..255 bytes without a comma");
        return -EINVAL;
    }
    return 0;
}

int kd_tls_ctx_create(const struct kd_tls_ctx_opts *o, struct kd_tls_ctx **out, char *err, size_t errlen)
{
    unsigned minv, maxv;
    int rc = check_opts(o, &minv, &maxv, err, errlen);
    if (rc < 0)
        return rc;
    pthread_once(&bio_once, bio_method_init);
    if (bio_method == NULL) {
        ctx_err(err, errlen, "out of memory creating the TLS BIO method");
        return -ENOMEM;
    }
    struct kd_tls_ctx *ctx = calloc(1, sizeof(*ctx));
    if (ctx == NULL) {
        ctx_err(err, errlen, "out of memory");
        return -ENOMEM;
    }
    ctx->server = o->server;
    ctx->verify = !o->server && !o->insecure_skip_verify;
    ERR_clear_error();
    rc = -ENOMEM;
    ctx->ssl = SSL_CTX_new(o->server ? TLS_server_method() : TLS_client_method());
    if (ctx->ssl == NULL) {
        ctx_err(err, errlen, "SSL_CTX_new failed (openssl: %s)", ossl_reason());
        goto fail;
    }
    if (o->alpn != NULL && (ctx->alpn = strdup(o->alpn)) == NULL) {
        ctx_err(err, errlen, "out of memory");
        goto fail;
    }
    SSL_CTX *sc = ctx->ssl;
    rc = -EPROTO;
    if (!SSL_CTX_set_min_proto_version(sc, minv == 13 ? TLS1_3_VERSION : TLS1_2_VERSION) ||
        !SSL_CTX_set_max_proto_version(sc, maxv == 13 ? TLS1_3_VERSION : TLS1_2_VERSION) ||
        !SSL_CTX_set_cipher_list(sc, CIPHERS_TLS12) || !SSL_CTX_set_ciphersuites(sc, CIPHERS_TLS13) ||
        !SSL_CTX_set1_groups_list(sc, GROUPS)) {
        ctx_err(err, errlen, "cannot set TLS versions/ciphers/groups (openssl: %s)", ossl_reason());
        goto fail;
    }
    /* No renegotiation (an old attack surface we do not need) and no resumption: agents keep long
     * connections, and without a session cache or tickets the context stays read-only and
     * lock-free across shards, and a connection keeps no session for later. The server picks the
     * cipher, but lets a client that prefers ChaCha20 (no AES hardware) have it. */
    SSL_CTX_set_options(sc, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_TICKET | SSL_OP_NO_COMPRESSION |
                                (o->server ? SSL_OP_CIPHER_SERVER_PREFERENCE | SSL_OP_PRIORITIZE_CHACHA : 0));
    SSL_CTX_set_session_cache_mode(sc, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_num_tickets(sc, 0);
    /* Idle connections matter: give the record buffers back between records. */
    SSL_CTX_set_mode(sc, SSL_MODE_RELEASE_BUFFERS);

    if (o->cert_file != NULL && (rc = load_cert_key(sc, o, err, errlen)) < 0)
        goto fail;
    if (o->server) {
        if (o->ca_file != NULL) {
            if ((rc = load_ca(sc, o, err, errlen)) < 0)
                goto fail;
            SSL_CTX_set_verify(
                sc, SSL_VERIFY_PEER | (o->require_client_cert ? SSL_VERIFY_FAIL_IF_NO_PEER_CERT : 0), NULL);
        }
        if (ctx->alpn != NULL)
            SSL_CTX_set_alpn_select_cb(sc, alpn_select, ctx);
    } else {
        if (ctx->verify) {
            if ((rc = load_ca(sc, o, err, errlen)) < 0)
                goto fail;
            SSL_CTX_set_verify(sc, SSL_VERIFY_PEER, NULL);
        }
        if (ctx->alpn != NULL) {
            unsigned char wire[256];
            size_t l = strlen(ctx->alpn);
            wire[0] = (unsigned char)l;
            memcpy(wire + 1, ctx->alpn, l);
            if (SSL_CTX_set_alpn_protos(sc, wire, (unsigned)l + 1) != 0) { /* 0 is success here */
                ctx_err(err, errlen, "cannot set ALPN (openssl: %s)", ossl_reason());
                goto fail;
            }
        }
    }
    ERR_clear_error();
    *out = ctx;
    return 0;
fail:
    ERR_clear_error();
    kd_tls_ctx_destroy(ctx);
    return rc;
}

void kd_tls_ctx_destroy(struct kd_tls_ctx *ctx)
{
    if (ctx == NULL)
        return;
    SSL_CTX_free(ctx->ssl);
    free(ctx->alpn);
    free(ctx);
}

/* ---- connections ------------------------------------------------------------------------------ */

static bool is_ip_literal(const char *s)
{
    unsigned char buf[16];
    return inet_pton(AF_INET, s, buf) == 1 || inet_pton(AF_INET6, s, buf) == 1;
}

struct kd_tls *kd_tls_new(struct kd_tls_ctx *ctx, const char *server_name)
{
    if (!ctx->server && ctx->verify && (server_name == NULL || server_name[0] == 0)) {
        errno = EINVAL;
        return NULL;
    }
    struct kd_tls *t = calloc(1, sizeof(*t));
    if (t == NULL)
        return NULL;
    t->ctx = ctx;
    BIO *bio = NULL;
    ERR_clear_error();
    if ((t->ssl = SSL_new(ctx->ssl)) == NULL || (bio = BIO_new(bio_method)) == NULL)
        goto nomem;
    BIO_set_data(bio, t);
    SSL_set_bio(t->ssl, bio, bio); /* one reference, used both ways */
    SSL_set_app_data(t->ssl, t);
    if (ctx->server) {
        SSL_set_accept_state(t->ssl);
    } else {
        SSL_set_connect_state(t->ssl);
        if (server_name != NULL && server_name[0] != 0) {
            bool ip = is_ip_literal(server_name);
            if (!ip && !SSL_set_tlsext_host_name(t->ssl, server_name))
                goto nomem;
            if (ctx->verify) {
                X509_VERIFY_PARAM *p = SSL_get0_param(t->ssl);
                X509_VERIFY_PARAM_set_hostflags(p, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
                if (!(ip ? X509_VERIFY_PARAM_set1_ip_asc(p, server_name)
                         : X509_VERIFY_PARAM_set1_host(p, server_name, 0)))
                    goto nomem;
            }
        }
    }
    return t;
nomem:
    ERR_clear_error();
    kd_tls_free(t);
    errno = ENOMEM;
    return NULL;
}

void kd_tls_free(struct kd_tls *t)
{
    if (t == NULL)
        return;
    SSL_free(t->ssl);
    kd_bq_free(&t->in);
    kd_bq_free(&t->out);
    kd_bq_free(&t->pending);
    free(t->err);
    free(t);
}

int kd_tls_feed(struct kd_tls *t, const uint8_t *in, size_t n)
{
    return kd_bq_push(&t->in, in, n);
}

/* Encrypts everything; our BIO accepts all output, so SSL_write only stops for a real error (or
 * WANT_READ in a corner of the protocol, where the rest waits in pending for the next read). */
static int write_now(struct kd_tls *t, const uint8_t *in, size_t n)
{
    while (n > 0) {
        size_t done = 0;
        ERR_clear_error();
        int ret = SSL_write_ex(t->ssl, in, n, &done);
        if (ret <= 0) {
            int rc = ssl_result(t, ret);
            if (rc < 0)
                return rc;
            return kd_bq_push(&t->pending, in, n);
        }
        in += done;
        n -= done;
    }
    return 0;
}

static int flush_pending(struct kd_tls *t)
{
    while (kd_bq_used(&t->pending) > 0) {
        /* Take the queue so write_now may refill it if it has to wait again. */
        struct kd_bq q = t->pending;
        memset(&t->pending, 0, sizeof(t->pending));
        int rc = write_now(t, q.data + q.off, kd_bq_used(&q));
        kd_bq_free(&q);
        if (rc < 0)
            return rc;
        if (kd_bq_used(&t->pending) > 0)
            return 0;
    }
    return 0;
}

ssize_t kd_tls_read(struct kd_tls *t, uint8_t *out, size_t cap)
{
    if (t->fatal)
        return t->fatal;
    if (!t->hs_done) {
        ERR_clear_error();
        int ret = SSL_do_handshake(t->ssl);
        if (ret != 1)
            return ssl_result(t, ret);
        t->hs_done = true;
    }
    int rc = flush_pending(t);
    if (rc < 0)
        return rc;
    if (cap == 0)
        return 0;
    if (cap > SSIZE_MAX)
        cap = SSIZE_MAX;
    size_t got = 0;
    ERR_clear_error();
    int ret = SSL_read_ex(t->ssl, out, cap, &got);
    if (ret > 0)
        return (ssize_t)got;
    return ssl_result(t, ret);
}

int kd_tls_write(struct kd_tls *t, const uint8_t *in, size_t n)
{
    if (t->fatal)
        return t->fatal;
    if (t->shut)
        return -EPIPE;
    if (n == 0)
        return 0;
    if (!t->hs_done || kd_bq_used(&t->pending) > 0)
        return kd_bq_push(&t->pending, in, n);
    return write_now(t, in, n);
}

int kd_tls_connect(struct kd_tls *t)
{
    if (t->ctx->server)
        return -EINVAL;
    if (t->fatal)
        return t->fatal;
    if (t->hs_done)
        return 0;
    ERR_clear_error();
    int ret = SSL_do_handshake(t->ssl);
    if (ret == 1) {
        t->hs_done = true; /* cannot happen before the server answers, but harmless */
        return 0;
    }
    return ssl_result(t, ret);
}

size_t kd_tls_output_pending(const struct kd_tls *t)
{
    return kd_bq_used(&t->out);
}

size_t kd_tls_take_output(struct kd_tls *t, uint8_t *out, size_t cap)
{
    return kd_bq_pop(&t->out, out, cap);
}

bool kd_tls_handshake_done(const struct kd_tls *t)
{
    return t->hs_done;
}

const char *kd_tls_alpn(const struct kd_tls *t)
{
    const unsigned char *p = NULL;
    unsigned int l = 0;
    if (!t->hs_done || t->ctx->alpn == NULL)
        return NULL;
    SSL_get0_alpn_selected(t->ssl, &p, &l);
    /* Only our one protocol can be negotiated (we offer/accept nothing else), so hand out the
     * context's NUL-terminated copy rather than keeping one per connection. */
    if (l == 0 || l != strlen(t->ctx->alpn) || memcmp(p, t->ctx->alpn, l) != 0)
        return NULL;
    return t->ctx->alpn;
}

const char *kd_tls_version(const struct kd_tls *t)
{
    if (!t->hs_done)
        return NULL;
    return SSL_get_version(t->ssl);
}

const char *kd_tls_error(const struct kd_tls *t)
{
    return t->err ? t->err : "";
}

void kd_tls_shutdown(struct kd_tls *t)
{
    if (t->shut)
        return;
    t->shut = true;
    /* A failed connection has already sent its alert, and before the handshake there is no
     * session to close; either way nothing else may follow. */
    if (!t->hs_done || (t->fatal != 0 && t->fatal != -ECONNRESET))
        return;
    flush_pending(t);
    ERR_clear_error();
    SSL_shutdown(t->ssl);
    ERR_clear_error();
}
