/* json.h — a strict RFC 8259 JSON reader over a caller's buffer, for GitLab's internal API answers
 * (agent_info, authorize_proxy_user, ...). No allocation, no tree: kd_json_parse validates the whole
 * document once, then values are small handles into the buffer, read with a cursor or by path.
 * Concurrency: pure functions. Ownership: everything borrows the caller's buffer, which must outlive
 * (and not change under) every handle taken from it; decoded strings go to caller memory.
 *
 * Strict means: UTF-8 only (overlong forms, encoded surrogates and code points past U+10FFFF are
 * refused), no raw control characters in strings, \u escapes with surrogates properly paired, no
 * leading zeros, no NaN/Infinity/comments/trailing commas/BOM, and nothing but whitespace after the
 * one top-level value (any JSON value, RFC 8259 section 2). Limits: KD_JSON_MAX_LEN bytes and
 * KD_JSON_MAX_DEPTH nested containers.
 *
 * Duplicate member names are valid JSON and pass kd_json_parse. The iterator yields every member
 * as written; the path lookups compare names after unescaping, take the LAST occurrence (as Go's
 * encoding/json does) and report that there was more than one with -ENOTUNIQ, so a caller that must
 * refuse them (as protojson does) can, and one that accepts them reads *out anyway.
 *
 * Example: authorize_proxy_user's answer, in buf/len.
 *
 *     struct kd_json root, projects, p, key, val;
 *     struct kd_json_err err;
 *     struct kd_json_iter it;
 *     int64_t user_id, id;
 *     char name[256];
 *
 *     if (kd_json_parse(buf, len, &root, &err) < 0) {
 *         log("bad answer: %s at byte %zu", err.why, err.off);
 *         return -EBADMSG;
 *     }
 *     if (kd_json_get_int64(&root, "user.id", &user_id) < 0 ||
 *         kd_json_get_str(&root, "user.username", name, sizeof(name)) < 0)
 *         ...;                                      // missing, wrong type, duplicated or too long
 *     if (kd_json_get(&root, "access_as.user.projects", &projects) == 0 &&
 *         kd_json_enter(&projects, &it) == 0)       // -EINVAL unless an array or object
 *         while (kd_json_next(&it, NULL, &p))       // each array element
 *             ... kd_json_get_int64(&p, "id", &id) ...
 *     kd_json_get(&root, "access_as", &val);        // then, to see which of its members is there:
 *     kd_json_enter(&val, &it);
 *     while (kd_json_next(&it, &key, &val))
 *         if (kd_json_eq(&key, "agent")) ...
 *
 * Handles only ever come from kd_json_parse and the functions below, so they always point into a
 * validated document; the readers still check bounds and re-validate what they decode, so a handle
 * forged by hand can give an error but never a read outside [p, p + len).
 */
#ifndef KD_CORE_JSON_H
#define KD_CORE_JSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define KD_JSON_MAX_LEN   (8u << 20) /* bytes of a document; more is -EMSGSIZE */
#define KD_JSON_MAX_DEPTH 32         /* open objects/arrays at once, the outermost included */

enum kd_json_type {
    KD_JSON_NONE, /* the key of an array element: there is none */
    KD_JSON_NULL,
    KD_JSON_FALSE,
    KD_JSON_TRUE,
    KD_JSON_NUMBER,
    KD_JSON_STRING,
    KD_JSON_ARRAY,
    KD_JSON_OBJECT,
};

/* One value of a validated document: its raw text p[0..len), quotes and brackets included (a
 * string's raw bytes between the quotes are p + 1, len - 2, escapes not decoded). */
struct kd_json {
    const char *p;
    size_t len;
    enum kd_json_type type;
};

/* Where and why kd_json_parse refused: off is the offset of the first offending byte. */
struct kd_json_err {
    size_t off;
    const char *why; /* static text, e.g. "control character in string" */
};

/* A cursor over the members of an object or the elements of an array. p is the next member or the
 * closing bracket; once kd_json_next has returned false, p is just past the closing bracket. */
struct kd_json_iter {
    const char *p, *end;
    bool object;
};

/* Validate buf[0..len) as one JSON document and hand out its top-level value (leading and trailing
 * whitespace not included). 0; -EBADMSG not valid JSON; -EMSGSIZE longer than KD_JSON_MAX_LEN;
 * -E2BIG nested deeper than KD_JSON_MAX_DEPTH. On error *err (may be NULL) says where and why. */
int kd_json_parse(const void *buf, size_t len, struct kd_json *root, struct kd_json_err *err);

/* Start iterating an object or array: 0, or -EINVAL when v is neither. */
int kd_json_enter(const struct kd_json *v, struct kd_json_iter *it);
/* Next member (key: a KD_JSON_STRING, raw) or element (key->type KD_JSON_NONE); key may be NULL.
 * false at the end. Values are not entered: call kd_json_enter on them to descend. */
bool kd_json_next(struct kd_json_iter *it, struct kd_json *key, struct kd_json *val);

/* Look a value up by path: member names separated by '.', a segment applied to an array is a
 * decimal index ("projects.0.id"); "" is v itself. A name containing '.' can only be reached with
 * the iterator. 0; -ENOENT no such member or index; -EINVAL a segment meets a scalar or the path is
 * malformed ("a..b"); -ENOTUNIQ a name along the way occurs more than once in its object: *out is
 * then set to the last occurrence, and the lookup went on from there. */
int kd_json_get(const struct kd_json *v, const char *path, struct kd_json *out);

/* A number without fraction or exponent, within int64_t: 0; -EINVAL not a number or not an
 * integer ("1.0", "1e3"); -ERANGE out of range. */
int kd_json_int64(const struct kd_json *v, int64_t *out);
/* 0 with *out for true/false, -EINVAL otherwise. */
int kd_json_bool(const struct kd_json *v, bool *out);

/* Decode a string (all escapes, surrogate pairs joined) into buf as UTF-8 and NUL-terminate it.
 * Returns the decoded length (which may include NUL bytes from \u0000); -EINVAL not a string;
 * -ENOSPC it needs more than cap - 1 bytes (buf then holds a NUL-terminated prefix if cap > 0);
 * -EBADMSG invalid UTF-8, a lone surrogate or a bad escape (only from a forged handle). The decoded
 * length never exceeds the raw length len - 2. */
ssize_t kd_json_str(const struct kd_json *v, char *buf, size_t cap);
/* true when v is a string that decodes to exactly the C string s ("a\u0062" equals "ab"). */
bool kd_json_eq(const struct kd_json *v, const char *s);

/* kd_json_get, then kd_json_int64 / kd_json_str. Both fail on -ENOTUNIQ (a duplicated name is
 * refused here, not resolved). kd_json_get_str is for C strings: a value that decodes to a NUL byte
 * is refused with -EILSEQ; returns the length like kd_json_str. */
int kd_json_get_int64(const struct kd_json *v, const char *path, int64_t *out);
ssize_t kd_json_get_str(const struct kd_json *v, const char *path, char *buf, size_t cap);

#endif
