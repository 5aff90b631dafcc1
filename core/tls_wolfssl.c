/* tls_wolfssl.c — core/tls.h on wolfSSL (Debian's build: OPENSSL_ALL, ALPN, SNI, TLS 1.3). This
 * is the only file that includes wolfSSL headers: their OpenSSL-compatible names clash with real
 * OpenSSL's, which h2o pulls in elsewhere.
 *
 * wolfSSL's custom I/O callbacks read from kd_tls.in and append to kd_tls.out; both queues are
 * freed the moment they empty, so an idle connection holds no I/O buffer of ours. wolfSSL itself
 * keeps only small static record buffers and allocates a record-sized one while a record is in
 * flight (SSL_MODE_RELEASE_BUFFERS is a no-op there: that is already its behaviour), and it frees
 * its handshake state ("arrays", key shares, transcript hashes) when the handshake completes.
 *
 *   kd_tls_feed ──> in ──io_recv──> WOLFSSL ──io_send──> out ──> kd_tls_take_output
 *   kd_tls_write ──> (pending, until the handshake is done) ──> wolfSSL_write
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

#include <wolfssl/options.h>
#include <wolfssl/ssl.h>
#include <wolfssl/error-ssl.h>
#include <wolfssl/openssl/evp.h>
#include <wolfssl/wolfcrypt/ecc.h>
#include <wolfssl/wolfcrypt/error-crypt.h>

/* TLS 1.3 suites (all AEAD), then TLS 1.2 with forward secrecy and AEAD only; wolfSSL takes both
 * in one list, in its own spelling, and a wolfSSL server picks by its own order. Without AES-NI
 * (Debian builds wolfSSL portable: no WOLFSSL_AESNI) its AES-GCM is table-driven C, measured at
 * ~70 MB/s against ~230 MB/s for ChaCha20-Poly1305 (bench/tls_bench.c), so ChaCha20 goes first
 * there. Peers with AES hardware lose little: ChaCha20 is fast in software everywhere. */
#ifdef WOLFSSL_AESNI
#define CIPHERS                                                                                              \
    "TLS13-AES128-GCM-SHA256:TLS13-AES256-GCM-SHA384:TLS13-CHACHA20-POLY1305-SHA256:"                        \
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"               \
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
#else
#define CIPHERS                                                                                              \
    "TLS13-CHACHA20-POLY1305-SHA256:TLS13-AES128-GCM-SHA256:TLS13-AES256-GCM-SHA384:"                        \
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-GCM-SHA256:"               \
    "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384"
#endif

/* wolfSSL_read/_write take an int length. */
#define IO_CHUNK (1 << 30)

/* ---- types ------------------------------------------------------------------------------------ */

struct kd_tls_ctx {
    WOLFSSL_CTX *ssl;
    char *alpn; /* NULL: no ALPN; mutable because wolfSSL_UseALPN takes a char * */
    bool server;
    bool verify; /* client: verify the server's certificate and name */
};

struct kd_tls {
    WOLFSSL *ssl;
    const struct kd_tls_ctx *ctx;
    struct kd_bq in;      /* ciphertext fed, not yet consumed by wolfSSL */
    struct kd_bq out;     /* ciphertext produced, not yet taken */
    struct kd_bq pending; /* plaintext written before the handshake finished */
    char *err;            /* first failure, allocated only when one happens */
    int fatal;            /* 0, or the negative errno every later read/write returns */
    int verify_err;       /* first error the verify callback saw: X509_V_ERR_* > 0, wolfSSL code < 0 */
    bool hs_done;
    bool shut;  /* close_notify queued */
    bool nomem; /* io_send could not grow the queue: report -ENOMEM, not a TLS error */
};

/* ---- errors ----------------------------------------------------------------------------------- */

/* Keeps the first error: later ones are consequences (e.g. the alert we send after a failure). */
#define set_err(t, ...) kd_tls_first_err(&(t)->err, __VA_ARGS__)
#define ctx_err         kd_tls_ctx_err
#define alert_name      kd_tls_alert_name

static const char *wolf_text(int code)
{
    const char *s = wolfSSL_ERR_reason_error_string((unsigned long)code);
    return s ? s : "unknown error";
}

/* The failure in the project's words, with wolfSSL's code for the log line. */
static void describe_failure(struct kd_tls *t, int code)
{
    WOLFSSL_ALERT_HISTORY h;
    memset(&h, 0, sizeof(h));
    wolfSSL_get_alert_history(t->ssl, &h);

    int v = t->verify_err;
    if (code == DOMAIN_NAME_MISMATCH || code == IPADDR_MISMATCH || v == DOMAIN_NAME_MISMATCH ||
        v == IPADDR_MISMATCH) {
        /* This wolfSSL has no X509_V_ERR_ code for a name mismatch; use OpenSSL's words. */
        WOLFSSL_X509_VERIFY_PARAM *p = wolfSSL_get0_param(t->ssl);
        bool ip = code == IPADDR_MISMATCH || v == IPADDR_MISMATCH || (p != NULL && p->ipasc[0]);
        const char *name = p == NULL ? "?" : p->ipasc[0] ? p->ipasc : p->hostName;
        set_err(t,
                "certificate verify failed: %s mismatch (certificate is not valid for \"%s\") (wolfssl %d)",
                ip ? "IP address" : "hostname", name, v ? v : code);
    } else if (v > 0) {
        set_err(t, "certificate verify failed: %s (wolfssl %d, x509 error %d)",
                wolfSSL_X509_verify_cert_error_string(v), code, v);
    } else if (v < 0 || code == ASN_NO_SIGNER_E || code == VERIFY_CERT_ERROR) {
        set_err(t, "certificate verify failed: %s (wolfssl %d)", wolf_text(v ? v : code), v ? v : code);
    } else if (code == NO_PEER_CERT) {
        set_err(t, "peer did not send a certificate (a client certificate is required) (wolfssl %d)", code);
    } else if (code == MATCH_SUITE_ERROR) {
        set_err(t, "no shared cipher (wolfssl %d)", code);
    } else if (code == VERSION_ERROR || code == UNSUPPORTED_PROTO_VERSION) {
        set_err(t, "protocol version not supported by both sides: %s (wolfssl %d)", wolf_text(code), code);
    } else if (code == UNKNOWN_ALPN_PROTOCOL_NAME_E) {
        set_err(t, "no shared ALPN protocol (wolfssl %d)", code);
    } else if (code == FATAL_ERROR && h.last_rx.level == alert_fatal) {
        set_err(t, "alert from peer: %s (wolfssl %d)", alert_name(h.last_rx.code), code);
    } else if (code == VERIFY_MAC_ERROR || code == DECRYPT_ERROR || code == AES_GCM_AUTH_E ||
               code == MAC_CMP_FAILED_E) {
        set_err(t, "record authentication failed (bad record mac): %s (wolfssl %d)", wolf_text(code), code);
    } else if (code == PARSE_ERROR || code == UNKNOWN_RECORD_TYPE || code == BUFFER_ERROR ||
               code == LENGTH_ERROR || code == RECV_OVERFLOW_E) {
        set_err(t, "not TLS or a malformed record: %s (wolfssl %d)", wolf_text(code), code);
    } else {
        set_err(t, "TLS error: %s (wolfssl %d)", wolf_text(code), code);
    }
}

/* wolfSSL 5.5.4 fails a TLS 1.2 server handshake without any alert in some cases (a client that
 * sends no certificate when one is required), leaving the client to guess from a bare close. Send
 * handshake_failure as OpenSSL does. It is plaintext: a TLS 1.2 server only starts encrypting
 * after its ChangeCipherSpec, the last thing it sends (every handshake is a full one, there is
 * no resumption), so a failed server handshake has not got there. */
static void server_alert_if_silent(struct kd_tls *t)
{
    static const uint8_t alert[] = {21, 3, 3, 0, 2, 2 /* fatal */, 40 /* handshake_failure */};
    WOLFSSL_ALERT_HISTORY h;
    if (!t->ctx->server || t->hs_done || wolfSSL_version(t->ssl) != TLS1_2_VERSION)
        return;
    if (wolfSSL_get_alert_history(t->ssl, &h) != WOLFSSL_SUCCESS || h.last_tx.level > 0)
        return;
    if (kd_bq_push(&t->out, alert, sizeof(alert)) < 0)
        t->nomem = true;
}

/* Translates the result of a wolfSSL call: 0 when it only needs more input, else the fatal negative
 * errno, remembered for later calls. */
static int ssl_result(struct kd_tls *t, int ret)
{
    int e = wolfSSL_get_error(t->ssl, ret);
    switch (e) {
    case WOLFSSL_ERROR_WANT_READ:
    case WOLFSSL_ERROR_WANT_WRITE:
        return 0;
    case WOLFSSL_ERROR_ZERO_RETURN:
        set_err(t, "connection closed by peer (close_notify)");
        t->fatal = -ECONNRESET;
        break;
    default:
        if (t->nomem || e == MEMORY_E || e == MEMORY_ERROR) {
            set_err(t, "out of memory for TLS buffers (wolfssl %d)", e);
            t->fatal = -ENOMEM;
            break;
        }
        describe_failure(t, e);
        server_alert_if_silent(t);
        t->fatal = -EPROTO;
        break;
    }
    /* wolfSSL's compatibility error queue is per thread; do not let it grow across connections. */
    wolfSSL_ERR_clear_error();
    return t->fatal;
}

/* ---- I/O callbacks ---------------------------------------------------------------------------- */

static int io_recv(WOLFSSL *ssl, char *buf, int sz, void *arg)
{
    struct kd_tls *t = arg;
    if (sz <= 0)
        return 0;
    if (kd_bq_used(&t->in) == 0)
        return WOLFSSL_CBIO_ERR_WANT_READ; /* "no data yet", never EOF: the caller feeds more later */
    return (int)kd_bq_pop(&t->in, buf, (size_t)sz);
}

static int io_send(WOLFSSL *ssl, char *buf, int sz, void *arg)
{
    struct kd_tls *t = arg;
    if (sz <= 0)
        return 0;
    if (kd_bq_push(&t->out, buf, (size_t)sz) < 0) {
        t->nomem = true;
        return WOLFSSL_CBIO_ERR_GENERAL;
    }
    return sz;
}

/* Records why a certificate was rejected; wolfSSL calls this for every certificate (it is built
 * with WOLFSSL_ALWAYS_VERIFY_CB) and we keep its verdict. */
static int verify_cb(int preverify, WOLFSSL_X509_STORE_CTX *store)
{
    if (preverify)
        return preverify;
    WOLFSSL *ssl = wolfSSL_X509_STORE_CTX_get_ex_data(store, wolfSSL_get_ex_data_X509_STORE_CTX_idx());
    struct kd_tls *t = ssl ? wolfSSL_GetIOReadCtx(ssl) : NULL;
    if (t != NULL && t->verify_err == 0) {
        int e = wolfSSL_X509_STORE_CTX_get_error(store);
        t->verify_err = e ? e : VERIFY_CERT_ERROR;
    }
    return preverify;
}

/* ---- context ---------------------------------------------------------------------------------- */

static pthread_once_t init_once = PTHREAD_ONCE_INIT;
static int init_rc;

/* Per-thread wolfSSL state, freed when a thread that used it exits. Debian's wolfSSL is built with
 * FP_ECC and HAVE_THREAD_LS: every thread that signs or verifies with ECC keeps its own fixed-point
 * cache (up to FP_ENTRIES base points -- the curve generator, the CA's and the peers' public keys --
 * each with a table of 2^FP_LUT precomputed points: ~0.8 MB per base point at SP_INT_BITS 4096) in
 * a thread-local array, and nothing frees it unless that thread calls wc_ecc_fp_free(). The cache is
 * bounded (it evicts), so this is not a leak per handshake, but each exiting shard thread would
 * lose its ~2.5-3.3 MB. The error queue is also per thread (ERROR_QUEUE_PER_THREAD); we clear it
 * after every failure, and again here. A thread registers itself (thread_uses_tls) before doing
 * any crypto, so callers need no per-thread hook; the main thread's cache stays reachable through
 * its TLS until the process exits. */
static pthread_key_t thread_key;
static bool thread_key_ok;

static void thread_exit(void *arg)
{
    (void)arg;
#if defined(HAVE_ECC) && defined(FP_ECC)
    wc_ecc_fp_free();
#endif
    wolfSSL_ERR_clear_error();
}

static void thread_uses_tls(void)
{
    /* Best effort: if pthread_setspecific cannot allocate, this thread's cache outlives it. */
    if (thread_key_ok && pthread_getspecific(thread_key) == NULL)
        pthread_setspecific(thread_key, &thread_key);
}

static void lib_init(void)
{
    init_rc = wolfSSL_Init();
    thread_key_ok = pthread_key_create(&thread_key, thread_exit) == 0;
}

const char *kd_tls_backend(void)
{
    return "wolfssl";
}

/* Reports an unreadable file with the open() errno, which wolfSSL reduces to a bare code. */
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

/* Server: accept our protocol if the client offers it, otherwise remember what the client offered
 * for the error text. The refusal itself (no_application_protocol alert) comes from the
 * WOLFSSL_ALPN_FAILED_ON_MISMATCH extension set on each server connection: in this wolfSSL a
 * failing select callback only means "no ALPN". A client that sends no ALPN never reaches this
 * callback and proceeds (the caller decides from kd_tls_alpn). */
static int alpn_select(WOLFSSL *ssl, const unsigned char **out, unsigned char *outlen,
                       const unsigned char *in, unsigned int inlen, void *arg)
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
    struct kd_tls *t = wolfSSL_GetIOReadCtx(ssl);
    if (t != NULL)
        set_err(t, "no shared ALPN protocol (client offered none of: %s; it offered: %s)", ctx->alpn,
                offered);
    return SSL_TLSEXT_ERR_ALERT_FATAL;
}

/* wolfSSL_CTX_check_private_key accepts a mismatched ECDSA key in this wolfSSL, which would only
 * show up as failed handshakes. Sign with the key and verify with the certificate instead: it
 * works for any key type, and it is done once per context. */
static bool key_matches_cert(const char *cert_file, const char *key_file)
{
    static const unsigned char msg[] = "kasd: does this key belong to this certificate?";
    unsigned char sig[1024]; /* room for an RSA-8192 signature */
    size_t siglen = sizeof(sig);
    bool ok = false;
    WOLFSSL_X509 *x = wolfSSL_X509_load_certificate_file(cert_file, WOLFSSL_FILETYPE_PEM);
    WOLFSSL_BIO *b = wolfSSL_BIO_new_file(key_file, "r");
    WOLFSSL_EVP_PKEY *priv = b ? wolfSSL_PEM_read_bio_PrivateKey(b, NULL, NULL, NULL) : NULL;
    WOLFSSL_EVP_PKEY *pub = x ? wolfSSL_X509_get_pubkey(x) : NULL;
    WOLFSSL_EVP_MD_CTX *m = wolfSSL_EVP_MD_CTX_new();
    if (priv == NULL || pub == NULL || m == NULL)
        goto out;
    if (wolfSSL_EVP_DigestSignInit(m, NULL, wolfSSL_EVP_sha256(), NULL, priv) != WOLFSSL_SUCCESS ||
        wolfSSL_EVP_DigestSignUpdate(m, msg, sizeof(msg)) != WOLFSSL_SUCCESS ||
        wolfSSL_EVP_DigestSignFinal(m, sig, &siglen) != WOLFSSL_SUCCESS)
        goto out;
    wolfSSL_EVP_MD_CTX_free(m);
    if ((m = wolfSSL_EVP_MD_CTX_new()) == NULL)
        goto out;
    ok = wolfSSL_EVP_DigestVerifyInit(m, NULL, wolfSSL_EVP_sha256(), NULL, pub) == WOLFSSL_SUCCESS &&
         wolfSSL_EVP_DigestVerifyUpdate(m, msg, sizeof(msg)) == WOLFSSL_SUCCESS &&
         wolfSSL_EVP_DigestVerifyFinal(m, sig, siglen) == WOLFSSL_SUCCESS;
out:
    wolfSSL_EVP_MD_CTX_free(m);
    wolfSSL_EVP_PKEY_free(pub);
    wolfSSL_EVP_PKEY_free(priv);
    if (b != NULL)
        wolfSSL_BIO_free(b);
    wolfSSL_X509_free(x);
    return ok;
}

/* wolfSSL returns 0 (WOLFSSL_FAILURE) or a negative code; only the latter has a useful text. */
static const char *load_text(int rc)
{
    return rc < 0 ? wolf_text(rc) : "no PEM block found";
}

static int load_cert_key(WOLFSSL_CTX *sc, const struct kd_tls_ctx_opts *o, char *err, size_t errlen)
{
    int rc;
    if ((rc = check_readable("certificate file", o->cert_file, err, errlen)) < 0)
        return rc;
    if ((rc = check_readable("key file", o->key_file, err, errlen)) < 0)
        return rc;
    if ((rc = wolfSSL_CTX_use_certificate_chain_file(sc, o->cert_file)) != WOLFSSL_SUCCESS) {
        ctx_err(err, errlen, "certificate file \"%s\": no usable PEM certificate (wolfssl %d: %s)",
                o->cert_file, rc, load_text(rc));
        return -EPROTO;
    }
    if ((rc = wolfSSL_CTX_use_PrivateKey_file(sc, o->key_file, WOLFSSL_FILETYPE_PEM)) != WOLFSSL_SUCCESS) {
        ctx_err(err, errlen, "key file \"%s\": no usable PEM private key (wolfssl %d: %s)", o->key_file, rc,
                load_text(rc));
        return -EPROTO;
    }
    if (wolfSSL_CTX_check_private_key(sc) != WOLFSSL_SUCCESS ||
        !key_matches_cert(o->cert_file, o->key_file)) {
        ctx_err(err, errlen, "key file \"%s\" does not match certificate file \"%s\"", o->key_file,
                o->cert_file);
        return -EPROTO;
    }
    return 0;
}

static int load_ca(WOLFSSL_CTX *sc, const struct kd_tls_ctx_opts *o, char *err, size_t errlen)
{
    int rc;
    if (o->ca_file == NULL) {
        if ((rc = wolfSSL_CTX_load_system_CA_certs(sc)) != WOLFSSL_SUCCESS) {
            ctx_err(err, errlen, "cannot load the system CA store (wolfssl %d: %s)", rc, wolf_text(rc));
            return -EPROTO;
        }
        return 0;
    }
    if ((rc = check_readable("CA file", o->ca_file, err, errlen)) < 0)
        return rc;
    if ((rc = wolfSSL_CTX_load_verify_locations(sc, o->ca_file, NULL)) != WOLFSSL_SUCCESS) {
        ctx_err(err, errlen, "CA file \"%s\": no usable PEM certificate (wolfssl %d: %s)", o->ca_file, rc,
                load_text(rc));
        return -EPROTO;
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
        /* wolfSSL_UseALPN takes a comma-separated list: a comma would offer two protocols. */
        ctx_err(err, errlen, "ALPN protocol name must be 1..255 bytes without a comma");
        return -EINVAL;
    }
    return 0;
}

static WOLFSSL_METHOD *method(bool server, unsigned maxv)
{
    /* The flexible method negotiates 1.2 or 1.3 (the floor is set below); the 1.2 one is pinned. */
    if (maxv == 12)
        return server ? wolfTLSv1_2_server_method() : wolfTLSv1_2_client_method();
    return server ? wolfSSLv23_server_method() : wolfSSLv23_client_method();
}

/* Our key exchange groups, in preference order. wolfSSL_CTX_set_groups only accepts a TLS 1.3
 * capable method; a TLS 1.2-only context takes them as supported_groups entries instead (without
 * them, TLS 1.2 handshakes measured 2.3 times slower). */
static int set_groups(WOLFSSL_CTX *sc, unsigned maxv, int *groups, size_t n)
{
    if (maxv == 13)
        return wolfSSL_CTX_set_groups(sc, groups, (int)n);
    for (size_t i = 0; i < n; i++) {
        int r = wolfSSL_CTX_UseSupportedCurve(sc, (unsigned short)groups[i]);
        if (r != WOLFSSL_SUCCESS)
            return r;
    }
    return WOLFSSL_SUCCESS;
}

int kd_tls_ctx_create(const struct kd_tls_ctx_opts *o, struct kd_tls_ctx **out, char *err, size_t errlen)
{
    unsigned minv, maxv;
    int rc = check_opts(o, &minv, &maxv, err, errlen);
    if (rc < 0)
        return rc;
    pthread_once(&init_once, lib_init);
    if (init_rc != WOLFSSL_SUCCESS) {
        ctx_err(err, errlen, "wolfSSL_Init failed (wolfssl %d)", init_rc);
        return -EPROTO;
    }
    thread_uses_tls(); /* the key check below signs and verifies */
    struct kd_tls_ctx *ctx = calloc(1, sizeof(*ctx));
    if (ctx == NULL) {
        ctx_err(err, errlen, "out of memory");
        return -ENOMEM;
    }
    ctx->server = o->server;
    ctx->verify = !o->server && !o->insecure_skip_verify;
    rc = -ENOMEM;
    ctx->ssl = wolfSSL_CTX_new(method(o->server, maxv));
    if (ctx->ssl == NULL) {
        ctx_err(err, errlen, "wolfSSL_CTX_new failed");
        goto fail;
    }
    if (o->alpn != NULL && (ctx->alpn = strdup(o->alpn)) == NULL) {
        ctx_err(err, errlen, "out of memory");
        goto fail;
    }
    WOLFSSL_CTX *sc = ctx->ssl;
    rc = -EPROTO;
    int groups[] = {WOLFSSL_ECC_X25519, WOLFSSL_ECC_SECP256R1, WOLFSSL_ECC_SECP384R1};
    int r;
    if ((r = wolfSSL_CTX_SetMinVersion(sc, minv == 13 ? WOLFSSL_TLSV1_3 : WOLFSSL_TLSV1_2)) !=
            WOLFSSL_SUCCESS ||
        (r = wolfSSL_CTX_set_cipher_list(sc, CIPHERS)) != WOLFSSL_SUCCESS ||
        (r = set_groups(sc, maxv, groups, sizeof(groups) / sizeof(groups[0]))) != WOLFSSL_SUCCESS) {
        ctx_err(err, errlen, "cannot set TLS versions/ciphers/groups (wolfssl %d: %s)", r, wolf_text(r));
        goto fail;
    }
    /* No resumption: agents keep long connections, and without a session cache or tickets the
     * context stays read-only and lock-free across shards, and a connection keeps no session for
     * later. (Renegotiation is off: this build lacks HAVE_SECURE_RENEGOTIATION.) */
    wolfSSL_CTX_set_session_cache_mode(sc, WOLFSSL_SESS_CACHE_OFF);
    if (o->server) {
        wolfSSL_CTX_NoTicketTLSv12(sc);
        if (maxv == 13)
            wolfSSL_CTX_no_ticket_TLSv13(sc);
    }
    wolfSSL_CTX_SetIORecv(sc, io_recv);
    wolfSSL_CTX_SetIOSend(sc, io_send);

    if (o->cert_file != NULL && (rc = load_cert_key(sc, o, err, errlen)) < 0)
        goto fail;
    if (o->server) {
        if (o->ca_file != NULL) {
            if ((rc = load_ca(sc, o, err, errlen)) < 0)
                goto fail;
            wolfSSL_CTX_set_verify(
                sc, WOLFSSL_VERIFY_PEER | (o->require_client_cert ? WOLFSSL_VERIFY_FAIL_IF_NO_PEER_CERT : 0),
                verify_cb);
        } else {
            wolfSSL_CTX_set_verify(sc, WOLFSSL_VERIFY_NONE, NULL);
        }
        if (ctx->alpn != NULL)
            wolfSSL_CTX_set_alpn_select_cb(sc, alpn_select, ctx);
    } else {
        if (ctx->verify) {
            if ((rc = load_ca(sc, o, err, errlen)) < 0)
                goto fail;
            wolfSSL_CTX_set_verify(sc, WOLFSSL_VERIFY_PEER, verify_cb);
        } else {
            wolfSSL_CTX_set_verify(sc, WOLFSSL_VERIFY_NONE, NULL);
        }
    }
    *out = ctx;
    return 0;
fail:
    wolfSSL_ERR_clear_error();
    kd_tls_ctx_destroy(ctx);
    return rc;
}

void kd_tls_ctx_destroy(struct kd_tls_ctx *ctx)
{
    if (ctx == NULL)
        return;
    wolfSSL_CTX_free(ctx->ssl);
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
    if ((t->ssl = wolfSSL_new(ctx->ssl)) == NULL)
        goto nomem;
    wolfSSL_SetIOReadCtx(t->ssl, t);
    wolfSSL_SetIOWriteCtx(t->ssl, t);
    if (ctx->alpn != NULL && wolfSSL_UseALPN(t->ssl, ctx->alpn, (unsigned)strlen(ctx->alpn),
                                             WOLFSSL_ALPN_FAILED_ON_MISMATCH) != WOLFSSL_SUCCESS)
        goto nomem;
    if (!ctx->server && server_name != NULL && server_name[0] != 0) {
        bool ip = is_ip_literal(server_name);
        if (!ip && wolfSSL_UseSNI(t->ssl, WOLFSSL_SNI_HOST_NAME, server_name,
                                  (unsigned short)strlen(server_name)) != WOLFSSL_SUCCESS)
            goto nomem;
        if (ctx->verify) {
            /* wolfSSL_check_domain_name matches DNS names and IP literals against the SANs (the
             * VERIFY_PARAM IP check is not enforced by this wolfSSL). The param copy only keeps the
             * name for the error text. */
            WOLFSSL_X509_VERIFY_PARAM *p = wolfSSL_get0_param(t->ssl);
            if (wolfSSL_check_domain_name(t->ssl, server_name) != WOLFSSL_SUCCESS)
                goto nomem;
            if (p != NULL)
                ip ? wolfSSL_X509_VERIFY_PARAM_set1_ip_asc(p, server_name)
                   : wolfSSL_X509_VERIFY_PARAM_set1_host(p, server_name, (unsigned)strlen(server_name));
        }
    }
    return t;
nomem:
    wolfSSL_ERR_clear_error();
    kd_tls_free(t);
    errno = ENOMEM;
    return NULL;
}

void kd_tls_free(struct kd_tls *t)
{
    if (t == NULL)
        return;
    wolfSSL_free(t->ssl);
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

/* Encrypts everything; io_send accepts all output, so wolfSSL_write only stops for a real error (or
 * WANT_READ in a corner of the protocol, where the rest waits in pending for the next read). */
static int write_now(struct kd_tls *t, const uint8_t *in, size_t n)
{
    while (n > 0) {
        int chunk = n > IO_CHUNK ? IO_CHUNK : (int)n;
        int ret = wolfSSL_write(t->ssl, in, chunk);
        if (ret <= 0) {
            int rc = ssl_result(t, ret);
            if (rc < 0)
                return rc;
            return kd_bq_push(&t->pending, in, n);
        }
        in += ret;
        n -= (size_t)ret;
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

static int handshake(struct kd_tls *t)
{
    /* All of a connection's public-key work happens here, on whichever thread owns it now. */
    thread_uses_tls();
    int ret = t->ctx->server ? wolfSSL_accept(t->ssl) : wolfSSL_connect(t->ssl);
    if (ret != WOLFSSL_SUCCESS)
        return ssl_result(t, ret);
    t->hs_done = true;
    return 0;
}

ssize_t kd_tls_read(struct kd_tls *t, uint8_t *out, size_t cap)
{
    if (t->fatal)
        return t->fatal;
    if (!t->hs_done) {
        int rc = handshake(t);
        if (rc < 0 || !t->hs_done)
            return rc;
    }
    int rc = flush_pending(t);
    if (rc < 0)
        return rc;
    if (cap == 0)
        return 0;
    int ret = wolfSSL_read(t->ssl, out, cap > IO_CHUNK ? IO_CHUNK : (int)cap);
    if (ret > 0)
        return ret;
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
    return handshake(t);
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
    char *p = NULL;
    unsigned short l = 0;
    if (!t->hs_done || t->ctx->alpn == NULL)
        return NULL;
    if (wolfSSL_ALPN_GetProtocol(t->ssl, &p, &l) != WOLFSSL_SUCCESS || p == NULL)
        return NULL;
    /* Only our one protocol can be negotiated (we offer/accept nothing else), so hand out the
     * context's NUL-terminated copy. */
    if (l != strlen(t->ctx->alpn) || memcmp(p, t->ctx->alpn, l) != 0)
        return NULL;
    return t->ctx->alpn;
}

const char *kd_tls_version(const struct kd_tls *t)
{
    if (!t->hs_done)
        return NULL;
    return wolfSSL_get_version(t->ssl);
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
    wolfSSL_shutdown(t->ssl); /* returns "not done" until the peer answers; we do not wait */
    wolfSSL_ERR_clear_error();
}
