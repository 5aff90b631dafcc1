/* yamlev.h — libyaml's event parser over an in-memory document (core/yamlev.c is the one file
 * that includes libyaml), seen through kasd's own event and error structs (core/config.c, core/tokens.c and,
 * through config.c, the agent configuration files use it). Concurrency: a parser belongs to its caller.
 * Ownership: an event's strings belong to the parser and are valid until the next kd_yaml_next() or
 * kd_yaml_free(); the input buffer must outlive the parser. With `wipe`, every scalar's bytes and libyaml's
 * copies of the input are overwritten before they are released (token files hold secrets).
 */
#ifndef KD_CORE_YAMLEV_H
#define KD_CORE_YAMLEV_H

#include <stdbool.h>
#include <stddef.h>

/* A position: byte index, 0-based line and column (columns count characters, as libyaml does). */
struct kd_yaml_mark {
    size_t index, line, column;
};

enum kd_yaml_type {
    KD_YAML_NONE,
    KD_YAML_STREAM_START,
    KD_YAML_STREAM_END,
    KD_YAML_DOCUMENT_START,
    KD_YAML_DOCUMENT_END,
    KD_YAML_ALIAS,
    KD_YAML_SCALAR,
    KD_YAML_SEQUENCE_START,
    KD_YAML_SEQUENCE_END,
    KD_YAML_MAPPING_START,
    KD_YAML_MAPPING_END,
};

struct kd_yaml_event {
    enum kd_yaml_type type;
    char *value;        /* scalar: NUL-terminated (may hold NULs: use length); NULL otherwise */
    size_t length;      /* scalar */
    bool plain;         /* scalar: plain style (unquoted, not a block scalar) */
    const char *anchor; /* alias: its name; scalar, sequence and mapping starts: the anchor, or NULL */
    const char *tag;    /* scalar, sequence and mapping starts: the explicit tag, or NULL */
    struct kd_yaml_mark start_mark, end_mark;
};

enum kd_yaml_error_kind { KD_YAML_ERR_MEMORY, KD_YAML_ERR_READER, KD_YAML_ERR_SYNTAX };

struct kd_yaml_error {
    enum kd_yaml_error_kind kind;
    const char *problem;    /* libyaml's text (static, never input); "unknown error" if none */
    struct kd_yaml_mark at; /* where (a reader error's byte offset turned into line and column) */
    int byte;               /* reader errors: the offending byte, or -1 */
    const char *context;    /* syntax errors: what was being parsed, or NULL */
    struct kd_yaml_mark context_at;
};

struct kd_yaml;

/* A parser over buf[len]. NULL when out of memory. */
struct kd_yaml *kd_yaml_new(const char *buf, size_t len, bool wipe);
/* The next event into *ev (the previous one is released): 0, or -1 after an error
 * (kd_yaml_last_error tells it). */
int kd_yaml_next(struct kd_yaml *y, struct kd_yaml_event *ev);
void kd_yaml_last_error(const struct kd_yaml *y, struct kd_yaml_error *out);
void kd_yaml_free(struct kd_yaml *y);

#endif
