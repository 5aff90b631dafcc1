/* tokens_fuzz.c — libFuzzer driver for the agent token file loader.
 * Loads the bytes with kd_tokens_load_string() and checks what the contract promises:
 *  - an error is -EINVAL/-ENOMEM/-EFBIG and one NUL-terminated line starting with the source name,
 *    and never echoes a value of 16 bytes or more (the message is scanned for long runs of
 *    non-space characters, and each must be one of the forms the loader itself writes);
 *  - the outcome does not depend on the random hash key (a second load gives the same result);
 *  - a loaded table answers lookups of strings cut from the input and of fixed strings, and every
 *    hit names a valid agent.
 * Seeds: test/fuzz/corpus/tokens/. */
#include "core/tokens.h"

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define NAME "f"

static bool is_digit(char c)
{
    return c >= '0' && c <= '9';
}

/* Digits from s, at least one; returns the position after them, or NULL. */
static const char *digits(const char *s, const char *end)
{
    const char *p = s;

    while (p < end && is_digit(*p))
        p++;
    return p > s ? p : NULL;
}

/* Is run[0..n) (no spaces) something the loader writes itself, rather than an echoed value? */
static bool allowed_run(const char *run, size_t n)
{
    const char *end = run + n, *p;

    /* Trailing punctuation after a value or a path. */
    while (end > run && (end[-1] == ',' || end[-1] == ')' || end[-1] == ';' || end[-1] == ':'))
        end--;
    /* "f:LINE:COL:" (": " always separates it from the path). */
    if (end - run > 2 && run[0] == 'f' && run[1] == ':') {
        p = digits(run + 2, end);
        if (p && p < end && *p == ':' && (p = digits(p + 1, end)) && p == end)
            return true;
    }
    /* agents[N] or agents[N].field */
    if ((size_t)(end - run) > 7 && memcmp(run, "agents[", 7) == 0) {
        p = digits(run + 7, end);
        if (p && p < end && *p == ']') {
            p++;
            if (p == end)
                return true;
            if (*p == '.') {
                static const char *const fields[] = {"token", "agent_id", "project_id", "agent_name"};

                for (size_t i = 0; i < 4; i++)
                    if ((size_t)(end - p - 1) == strlen(fields[i]) &&
                        memcmp(p + 1, fields[i], strlen(fields[i])) == 0)
                        return true;
            }
        }
    }
    /* The one word of 16+ characters in libyaml's problem strings. */
    if (end - run == 16 && memcmp(run, "non-alphabetical", 16) == 0)
        return true;
    /* A number: validated ids and limits are shown. */
    if (digits(run, end) == end)
        return true;
    return false;
}

/* The message as the loader writes it: quoted values ("...", escapes as \" \\ \xNN) of at most 15
 * bytes, and otherwise runs of non-space characters that are the loader's own text. */
static void check_message(const char *err, size_t cap)
{
    const char *p = err, *run = NULL;

    if (!memchr(err, '\0', cap) || strchr(err, '\n') || strncmp(err, NAME ":", strlen(NAME ":")) != 0)
        abort();
    for (;;) {
        bool word = *p > ' ' && *p <= '~' && *p != '"';

        if (word && !run)
            run = p;
        if (!word && run) {
            if ((size_t)(p - run) >= KD_TOKENS_MIN_LEN && !allowed_run(run, (size_t)(p - run)))
                abort();
            run = NULL;
        }
        if (!*p)
            break;
        if (*p == '"') {
            size_t bytes = 0;

            for (p++; *p && *p != '"'; bytes++) {
                size_t step = *p != '\\' ? 1 : p[1] == 'x' ? 4 : 2;

                /* Never step over the terminating NUL (a cut-off escape is a malformed message). */
                for (size_t k = 1; k < step; k++)
                    if (!p[k])
                        abort();
                p += step;
            }
            if (*p != '"' || bytes > KD_TOKENS_MIN_LEN - 1)
                abort();
        }
        p++;
    }
}

static void check_hit(const struct kd_tokens *t, const char *s, size_t n)
{
    struct kd_agent_ident id;
    size_t nl;

    if (kd_tokens_lookup(t, s, n, &id) != 0)
        return;
    if (n < KD_TOKENS_MIN_LEN || n > KD_TOKENS_MAX_LEN || id.agent_id <= 0 || id.project_id <= 0 ||
        !id.agent_name)
        abort();
    nl = strlen(id.agent_name);
    if (nl < 1 || nl > KD_TOKENS_NAME_MAX)
        abort();
    /* A hit is stable: the same bytes from another buffer resolve to the same agent. */
    {
        char copy[KD_TOKENS_MAX_LEN];
        struct kd_agent_ident again;

        memcpy(copy, s, n);
        if (kd_tokens_lookup(t, copy, n, &again) != 0 || again.agent_id != id.agent_id ||
            again.agent_name != id.agent_name)
            abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct kd_tokens *t = NULL, *t2 = NULL;
    char err[512], err2[512];
    int r, r2;

    memset(err, 'Z', sizeof(err));
    r = kd_tokens_load_string(NAME, (const char *)data, size, &t, err, sizeof(err));
    r2 = kd_tokens_load_string(NAME, (const char *)data, size, &t2, err2, sizeof(err2));
    if (r != r2 || (r < 0 && strcmp(err, err2) != 0))
        abort();
    if (r < 0) {
        if (r != -EINVAL && r != -ENOMEM && r != -EFBIG)
            abort();
        if (t || t2)
            abort();
        check_message(err, sizeof(err));
        return 0;
    }
    if (!t || !t2 || kd_tokens_count(t) != kd_tokens_count(t2) || kd_tokens_agents(t) > kd_tokens_count(t) ||
        kd_tokens_count(t) > KD_TOKENS_MAX_ENTRIES)
        abort();
    kd_tokens_free(t2);

    /* Fixed strings, then windows of the input: a token given in it is one of them only if it
     * starts at a window start, so cut at every quote, space, or line start as well. */
    check_hit(t, "", 0);
    check_hit(t, "glagent-0000000000000000", 24);
    for (size_t i = 0; i < size && i < 4096; i++) {
        if (i == 0 || data[i - 1] == ' ' || data[i - 1] == '"' || data[i - 1] == '\'' ||
            data[i - 1] == '\n') {
            size_t n = 0;

            while (i + n < size && n < KD_TOKENS_MAX_LEN && data[i + n] > ' ' && data[i + n] <= '~' &&
                   data[i + n] != '"' && data[i + n] != '\'' && data[i + n] != ',' && data[i + n] != '}')
                n++;
            if (n >= KD_TOKENS_MIN_LEN)
                check_hit(t, (const char *)data + i, n);
        }
    }
    kd_tokens_free(t);
    return 0;
}
