/* access_test.c — the Kubernetes API access-token file: YAML and JSON files, grants (impersonation or
 * none), unknown tokens and agents not in a token's list, near misses, every error path with its exact
 * message and position (and never a token in it), large files (many users, one long agent list). */
#include "core/access.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define NAME "t.yaml"

/* Every token in these tests carries this marker; no message may contain it. */
#define MARK "s3cr3t"
#define TOK1 "k8s-" MARK "-AAAAAAAAAAAAAAAAAAAA1"
#define TOK2 "k8s-" MARK "-BBBBBBBBBBBBBBBBBBBB2"
#define TOK3 "k8s-" MARK "-CCCCCCCCCCCCCCCCCCCC3"
#define TOK4 "k8s-" MARK "-DDDDDDDDDDDDDDDDDDDD4"

static struct kd_access *load_ok(const char *text)
{
    struct kd_access *t = NULL;
    char err[512] = "";
    int r = kd_access_load_string(NAME, text, strlen(text), &t, err, sizeof(err));

    cr_assert_eq(r, 0, "load failed for <<%.300s>>: %s", text, err);
    cr_assert_not_null(t);
    return t;
}

/* Token known, agent allowed, and the grant as given; groups is a NULL-terminated list (NULL: none). */
static void expect_grant(const struct kd_access *t, const char *tok, int64_t agent, const char *username,
                         const char *uid, const char *const *groups)
{
    struct kd_access_grant g;
    size_t n = 0;

    memset(&g, 0x5a, sizeof(g));
    cr_assert_eq(kd_access_check(t, tok, strlen(tok), agent, &g), 0, "check refused %s for agent %lld", tok,
                 (long long)agent);
    if (username)
        cr_assert_str_eq(g.username, username);
    else
        cr_assert_null(g.username);
    if (uid)
        cr_assert_str_eq(g.uid, uid);
    else
        cr_assert_null(g.uid);
    while (groups && groups[n])
        n++;
    cr_assert_eq(g.ngroups, n);
    if (n == 0)
        cr_assert_null(g.groups);
    for (size_t i = 0; i < n; i++)
        cr_assert_str_eq(g.groups[i], groups[i]);
}

/* A refusal (-ENOENT or -EPERM) leaves *out alone. */
static void expect_refused(const struct kd_access *t, const char *tok, size_t len, int64_t agent, int want)
{
    struct kd_access_grant g = {.username = "untouched", .ngroups = 77};

    cr_assert_eq(kd_access_check(t, tok, len, agent, &g), want, "check of <<%.*s>> for agent %lld", (int)len,
                 tok ? tok : "", (long long)agent);
    cr_assert_str_eq(g.username, "untouched");
    cr_assert_eq(g.ngroups, 77);
}

#define expect_unknown(t, tok, len) expect_refused(t, tok, len, 1, -ENOENT)
#define expect_eperm(t, tok, agent) expect_refused(t, tok, strlen(tok), agent, -EPERM)

/* The exact message (one line, no token in it), -EINVAL, and no table. */
static void expect_error(const char *text, const char *want)
{
    struct kd_access *t = NULL;
    char err[512] = "";
    int r = kd_access_load_string(NAME, text, strlen(text), &t, err, sizeof(err));

    cr_expect_eq(r, -EINVAL, "want -EINVAL for <<%.300s>>, got %d (%s)", text, r, err);
    cr_expect_null(t);
    cr_expect_str_eq(err, want, "for <<%.300s>>\n got: %s\nwant: %s", text, err, want);
    cr_expect_null(strchr(err, '\n'), "message is not one line: %s", err);
    cr_expect_null(strstr(err, MARK), "message shows a token: %s", err);
    kd_access_free(t);
}

struct error_case {
    const char *text;
    const char *want;
};

static void expect_errors(const struct error_case *cases, size_t n)
{
    for (size_t i = 0; i < n; i++)
        expect_error(cases[i].text, cases[i].want);
}

#define EXPECT_ERRORS(cases) expect_errors(cases, sizeof(cases) / sizeof(cases[0]))

/* One user: token on line 2 (value at column 12), agents on line 3 (value at column 13). */
#define USER(tok, agents) "users:\n  - token: " tok "\n    agents: " agents "\n"
#define USER_T(v)         USER(v, "[1]")
#define USER_A(v)         USER(TOK1, v)
/* USER_T(TOK1) with impersonate on line 4 and its body from line 5 (keys at column 7). */
#define IMP(body)     USER_T(TOK1) "    impersonate:\n" body
#define IMP_NAME(v)   IMP("      username: " v "\n")                  /* value at 5:17 */
#define IMP_GROUPS(v) IMP("      username: a\n      groups: " v "\n") /* value at 6:15 */
#define IMP_UID(v)    IMP("      username: a\n      uid: " v "\n")    /* value at 6:12 */

/* ---------------------------------------------------------------------------------------------- */
/* Valid files                                                                                     */

Test(access, yaml_file)
{
    static const char *const devs_ops[] = {"devs", "ops", NULL};
    struct kd_access *t =
        load_ok("# Kubernetes API access tokens.\n"
                "users:\n"
                "  - token: \"" TOK1 "\"\n"
                "    agents: [1, 42]\n"
                "    impersonate:\n"
                "      username: alice\n"
                "      groups: [devs, ops]\n"
                "      uid: \"1234\"\n"
                "  - agents:              # keys in any order\n"
                "      - 9223372036854775807\n"
                "      - 42\n"
                "    token: " TOK2 "\n"
                "  - {token: '" TOK3 "', agents: [7], impersonate: {uid: 5, username: bob}}\n");

    cr_assert_eq(kd_access_count(t), 3);
    expect_grant(t, TOK1, 1, "alice", "1234", devs_ops);
    expect_grant(t, TOK1, 42, "alice", "1234", devs_ops);
    expect_eperm(t, TOK1, 2);
    expect_eperm(t, TOK1, 41);
    expect_eperm(t, TOK1, 43);
    /* No impersonate: the agent's own service account (everything NULL). */
    expect_grant(t, TOK2, 42, NULL, NULL, NULL);
    expect_grant(t, TOK2, INT64_MAX, NULL, NULL, NULL);
    expect_eperm(t, TOK2, 1);
    expect_grant(t, TOK3, 7, "bob", "5", NULL);
    expect_eperm(t, TOK3, 42);
    /* Ids that no file can list. */
    expect_eperm(t, TOK1, 0);
    expect_eperm(t, TOK1, -1);
    expect_eperm(t, TOK1, INT64_MIN);
    expect_unknown(t, TOK4, strlen(TOK4));
    kd_access_free(t);
}

Test(access, json_file)
{
    static const char *const g[] = {"system:masters", "caf\xc3\xa9", NULL};
    struct kd_access *t =
        load_ok("{\n"
                "  \"users\": [\n"
                "    {\"token\": \"" TOK1 "\", \"agents\": [5, 6],\n"
                "     \"impersonate\": {\"username\": \"ci-bot\", \"groups\": [\"system:masters\","
                " \"caf\\u00e9\"]}},\n"
                "    {\"token\": \"" TOK2 "\", \"agents\": [6]}\n"
                "  ]\n"
                "}\n");

    cr_assert_eq(kd_access_count(t), 2);
    expect_grant(t, TOK1, 5, "ci-bot", NULL, g);
    expect_grant(t, TOK1, 6, "ci-bot", NULL, g);
    expect_grant(t, TOK2, 6, NULL, NULL, NULL);
    expect_eperm(t, TOK2, 5);
    kd_access_free(t);
}

Test(access, values_taken_as_written)
{
    static const char *const one[] = {"1", NULL};
    struct kd_access *t =
        load_ok("users: [{token: " TOK1 ", agents: [\"42\", '7'], impersonate: {username: 7, uid: 1234, "
                "groups: [1]}}]\n");

    expect_grant(t, TOK1, 42, "7", "1234", one);
    expect_grant(t, TOK1, 7, "7", "1234", one);
    kd_access_free(t);
}

Test(access, empty_list_is_an_empty_table)
{
    static const char *inputs[] = {"users: []\n", "users:\n", "users: ~\n", "{\"users\": []}"};

    for (size_t i = 0; i < sizeof(inputs) / sizeof(inputs[0]); i++) {
        struct kd_access *t = load_ok(inputs[i]);

        cr_assert_eq(kd_access_count(t), 0);
        expect_unknown(t, TOK1, strlen(TOK1));
        kd_access_free(t);
    }
}

Test(access, limits)
{
    char longest[KD_ACCESS_MAX_LEN + 1], name[KD_ACCESS_NAME_MAX + 1], groups[1024], text[4096];
    const char *want[KD_ACCESS_MAX_GROUPS + 1];
    static char gnames[KD_ACCESS_MAX_GROUPS][8];
    size_t len = 0;
    struct kd_access *t;

    memset(longest, 'x', KD_ACCESS_MAX_LEN);
    longest[KD_ACCESS_MAX_LEN] = '\0';
    memset(name, 'n', KD_ACCESS_NAME_MAX);
    name[KD_ACCESS_NAME_MAX] = '\0';
    for (int i = 0; i < KD_ACCESS_MAX_GROUPS; i++) {
        snprintf(gnames[i], sizeof(gnames[i]), "g%d", i);
        want[i] = gnames[i];
        len += (size_t)snprintf(groups + len, sizeof(groups) - len, "%s%s", i ? ", " : "[", gnames[i]);
    }
    want[KD_ACCESS_MAX_GROUPS] = NULL;
    snprintf(groups + len, sizeof(groups) - len, "]");
    snprintf(text, sizeof(text),
             "users:\n- {token: '0123456789abcdef', agents: [1]}\n"
             "- {token: %s, agents: [2], impersonate: {username: %s, groups: %s, uid: %s}}\n",
             longest, name, groups, name);
    t = load_ok(text);
    expect_grant(t, "0123456789abcdef", 1, NULL, NULL, NULL);
    expect_grant(t, longest, 2, name, name, want);
    /* A group list may be empty: impersonation without groups. */
    kd_access_free(t);
    t = load_ok(IMP_GROUPS("[]"));
    expect_grant(t, TOK1, 1, "a", NULL, NULL);
    kd_access_free(t);
}

Test(access, load_file)
{
    char path[] = "/tmp/kd_access_test_XXXXXX";
    static const char text[] = "users:\n  - {token: " TOK1 ", agents: [3], impersonate: {username: f}}\n";
    struct kd_access *t = NULL;
    char err[512] = "";
    int fd = mkstemp(path);

    cr_assert_geq(fd, 0);
    cr_assert_eq(write(fd, text, sizeof(text) - 1), (ssize_t)sizeof(text) - 1);
    close(fd);
    cr_assert_eq(kd_access_load_file(path, &t, err, sizeof(err)), 0, "%s", err);
    expect_grant(t, TOK1, 3, "f", NULL, NULL);
    kd_access_free(t);
    unlink(path);

    t = NULL;
    cr_assert_eq(kd_access_load_file("/nonexistent/access.yaml", &t, err, sizeof(err)), -ENOENT);
    cr_assert_str_eq(err,
                     "/nonexistent/access.yaml: cannot read access-token file: No such file or directory");
    cr_assert_null(t);
}

/* ---------------------------------------------------------------------------------------------- */
/* Checks                                                                                          */

Test(access, near_misses)
{
    struct kd_access *t = load_ok(USER_T(TOK1));
    char buf[128];

    expect_grant(t, TOK1, 1, NULL, NULL, NULL);
    /* A prefix of the real token, and the real token with one more byte. */
    expect_unknown(t, TOK1, strlen(TOK1) - 1);
    expect_unknown(t, TOK1, 16);
    snprintf(buf, sizeof(buf), "%sx", TOK1);
    expect_unknown(t, buf, strlen(buf));
    /* Same length, last byte different; first byte different. */
    snprintf(buf, sizeof(buf), "%s", TOK1);
    buf[strlen(buf) - 1] ^= 1;
    expect_unknown(t, buf, strlen(buf));
    snprintf(buf, sizeof(buf), "%s", TOK1);
    buf[0] ^= 1;
    expect_unknown(t, buf, strlen(buf));
    /* Empty, NULL, short, oversized: unknown, whatever the agent. */
    expect_unknown(t, "", 0);
    expect_unknown(t, NULL, 0);
    expect_unknown(t, "k8s", 3);
    {
        static char big[KD_ACCESS_MAX_LEN + 2];

        memset(big, 'k', sizeof(big) - 1);
        expect_unknown(t, big, sizeof(big) - 1);
    }
    /* An unknown token is -ENOENT even for an agent some token may reach: never -EPERM. */
    expect_refused(t, TOK2, strlen(TOK2), 1, -ENOENT);
    expect_refused(t, TOK2, strlen(TOK2), 2, -ENOENT);
    /* No table at all. */
    expect_unknown(NULL, TOK1, strlen(TOK1));
    cr_assert_eq(kd_access_count(NULL), 0);
    kd_access_free(NULL);
    kd_access_free(t);
}

Test(access, check_is_length_delimited)
{
    struct kd_access *t = load_ok(USER_T(TOK1));
    struct kd_access_grant g;
    char buf[128];

    /* The token inside a larger buffer (like "pat:1:<token>" in a header), not NUL-terminated. */
    snprintf(buf, sizeof(buf), "pat:1:%s, more", TOK1);
    cr_assert_eq(kd_access_check(t, buf + 6, strlen(TOK1), 1, &g), 0);
    expect_unknown(t, buf + 6, strlen(TOK1) + 1);
    expect_unknown(t, buf, strlen(TOK1) + 6);
    kd_access_free(t);
}

Test(access, many_users)
{
    enum { N = 50000 };
    size_t cap = (size_t)N * 96, len = 0;
    char *text = malloc(cap), tok[64];
    struct kd_access *t;

    cr_assert_not_null(text);
    len += (size_t)snprintf(text + len, cap - len, "users:\n");
    /* User i reaches agents i+1 and i+2 (in descending order: the table sorts them). */
    for (size_t i = 0; i < N; i++) {
        len += (size_t)snprintf(text + len, cap - len, "- {token: k8s-%020zu, agents: [%zu, %zu]}\n", i,
                                i + 2, i + 1);
        cr_assert_lt(len, cap);
    }
    t = load_ok(text);
    free(text);
    cr_assert_eq(kd_access_count(t), N);
    for (size_t i = 0; i < N; i++) {
        snprintf(tok, sizeof(tok), "k8s-%020zu", i);
        expect_grant(t, tok, (int64_t)i + 1, NULL, NULL, NULL);
        expect_grant(t, tok, (int64_t)i + 2, NULL, NULL, NULL);
        expect_eperm(t, tok, (int64_t)i + 3);
        snprintf(tok, sizeof(tok), "k8s-%020zu", i + N);
        expect_unknown(t, tok, strlen(tok));
    }
    kd_access_free(t);
}

Test(access, long_agent_lists)
{
    /* Two users with 100,000 agents each (ids shuffled by a multiplicative step), then short lists:
     * the duplicate check's set grows past many rebuilds and shrinks back. */
    enum { M = 100000, STEP = 7919 };
    size_t cap = (size_t)M * 2 * 12 + 4096, len = 0;
    char *text = malloc(cap);
    struct kd_access *t;

    cr_assert_not_null(text);
    len += (size_t)snprintf(text + len, cap - len, "users:\n");
    for (int u = 0; u < 2; u++) {
        len += (size_t)snprintf(text + len, cap - len, "- token: %s\n  agents: [", u ? TOK2 : TOK1);
        for (size_t i = 0; i < M; i++)
            len += (size_t)snprintf(text + len, cap - len, "%s%zu", i ? "," : "", (i * STEP) % M + 1);
        len += (size_t)snprintf(text + len, cap - len, "]\n");
    }
    len += (size_t)snprintf(text + len, cap - len, "- {token: %s, agents: [5, 3]}\n", TOK3);
    cr_assert_lt(len, cap);
    t = load_ok(text);
    for (int64_t id = 1; id <= M; id++) {
        expect_grant(t, TOK1, id, NULL, NULL, NULL);
        expect_grant(t, TOK2, id, NULL, NULL, NULL);
    }
    expect_eperm(t, TOK1, M + 1);
    expect_grant(t, TOK3, 3, NULL, NULL, NULL);
    expect_eperm(t, TOK3, 4);
    kd_access_free(t);

    /* The same long list with one id repeated at the very end. */
    len -= strlen("]\n- {token: " TOK3 ", agents: [5, 3]}\n");
    len += (size_t)snprintf(text + len, cap - len, ",%d]\n", STEP % M + 1);
    {
        char err[512];
        struct kd_access *none = NULL;

        cr_assert_eq(kd_access_load_string(NAME, text, len, &none, err, sizeof(err)), -EINVAL);
        cr_assert(strstr(err, "users[1].agents[100000]: duplicate agent id 7920 (also given at agents[1])") !=
                      NULL,
                  "%s", err);
    }
    free(text);
}

/* ---------------------------------------------------------------------------------------------- */
/* Errors                                                                                          */

Test(access, errors_document_shape)
{
    static const struct error_case cases[] = {
        {"", "t.yaml:1:1: empty file (an access-token file is a mapping with a users: list)"},
        {"# only a comment\n",
         "t.yaml:2:1: empty file (an access-token file is a mapping with a users: list)"},
        {"- a\n", "t.yaml:1:1: expected a mapping with a users: list at the top level, got a sequence"},
        {"text\n", "t.yaml:1:1: expected a mapping with a users: list at the top level, got a scalar"},
        {"~\n", "t.yaml:1:1: expected a mapping with a users: list at the top level, got null"},
        {"{}\n", "t.yaml:1:1: users: missing (an access-token file is a mapping with a users: list)"},
        {"agents: []\n", "t.yaml:1:1: unknown key \"agents\" (expected: users)"},
        {TOK1 ": []\n", "t.yaml:1:1: unknown key <32 bytes, not shown> (expected: users)"},
        {"? [a]\n: 1\n", "t.yaml:1:3: keys must be scalars, got a sequence"},
        {"users: []\nusers: []\n", "t.yaml:2:1: users: duplicate key (first given at line 1)"},
        {"users: 3\n", "t.yaml:1:8: users: expected a list of users, got a scalar"},
        {"users: {a: 1}\n", "t.yaml:1:8: users: expected a list of users, got a mapping"},
        {"users: [1]\n", "t.yaml:1:9: users[0]: expected a mapping with token, agents and impersonate, got a "
                         "scalar"},
        {"users: [[]]\n",
         "t.yaml:1:9: users[0]: expected a mapping with token, agents and impersonate, got a "
         "sequence"},
        {"users:\n  - {[a]: 1}\n", "t.yaml:2:6: users[0]: keys must be scalars, got a sequence"},
        {"users: []\n---\nusers: []\n", "t.yaml:2:1: only one YAML document is allowed"},
        {"users: []\n...\n---\nusers: []\n", "t.yaml:3:1: only one YAML document is allowed"},

        /* Anchors, aliases and tags wherever they stand, each at its own path. */
        {"users: &a []\n", "t.yaml:1:8: users: anchors are not supported (anchor \"a\")"},
        {"users:\n  - &u {token: " TOK1 ", agents: [1]}\n",
         "t.yaml:2:5: users[0]: anchors are not supported (anchor \"u\")"},
        {USER_A("*x"), "t.yaml:3:13: users[0].agents: aliases are not supported (alias \"x\")"},
        {USER_A("[1, *x]"), "t.yaml:3:17: users[0].agents[1]: aliases are not supported (alias \"x\")"},
        {USER_A("[!!int 1]"),
         "t.yaml:3:14: users[0].agents[0]: tags are not supported (tag <21 bytes, not shown>)"},
        {"users:\n  - token: !t " TOK1 "\n",
         "t.yaml:2:12: users[0].token: tags are not supported (tag \"!t\")"},
        {IMP_GROUPS("[&g a]"),
         "t.yaml:6:16: users[0].impersonate.groups[0]: anchors are not supported (anchor "
         "\"g\")"},
        {IMP_NAME("*n"),
         "t.yaml:5:17: users[0].impersonate.username: aliases are not supported (alias \"n\")"},
    };

    EXPECT_ERRORS(cases);
}

Test(access, errors_user_keys)
{
    static const struct error_case cases[] = {
        {"users:\n  - {}\n", "t.yaml:2:5: users[0].token: missing (every user needs token and agents)"},
        {"users:\n  - agents: [1]\n",
         "t.yaml:2:5: users[0].token: missing (every user needs token and agents)"},
        {"users:\n  - token: " TOK1 "\n", "t.yaml:2:5: users[0].agents: missing (every user needs token and "
                                          "agents)"},
        {"users:\n  - token: " TOK1 "\n    impersonate: {username: a}\n",
         "t.yaml:2:5: users[0].agents: missing (every user needs token and agents)"},
        {"users:\n  - token: " TOK1 "\n    agent: [1]\n",
         "t.yaml:3:5: users[0]: unknown key \"agent\" (expected one of: token, agents, impersonate)"},
        /* A token pasted where a key goes is not echoed. */
        {"users:\n  - " TOK1 ": x\n",
         "t.yaml:2:5: users[0]: unknown key <32 bytes, not shown> (expected one of: token, agents, "
         "impersonate)"},
        {"users:\n  - token: " TOK1 "\n    token: " TOK2 "\n",
         "t.yaml:3:5: users[0].token: duplicate key (first given at line 2)"},
        {USER_A("[1]") "    agents: [2]\n",
         "t.yaml:4:5: users[0].agents: duplicate key (first given at line 3)"},
        {IMP("      username: a\n") "    impersonate: {username: b}\n",
         "t.yaml:6:5: users[0].impersonate: duplicate key (first given at line 4)"},
        {"users:\n  - {token: " TOK1 ", agents: [1]}\n  - {token: " TOK2 ", agents: [1], agents: [2]}\n",
         "t.yaml:3:60: users[1].agents: duplicate key (first given at line 3)"},
    };

    EXPECT_ERRORS(cases);
}

Test(access, errors_token)
{
    static char long_text[2048];
    static const struct error_case cases[] = {
        {USER_T("short"), "t.yaml:2:12: users[0].token: must be 16 to 1024 bytes long, got 5"},
        {USER_T("''"), "t.yaml:2:12: users[0].token: must be 16 to 1024 bytes long, got 0"},
        {USER_T("~"), "t.yaml:2:12: users[0].token: must be 16 to 1024 bytes long, got 1"},
        {USER_T("0123456789abcde"), "t.yaml:2:12: users[0].token: must be 16 to 1024 bytes long, got 15"},
        {USER_T("'k8s-" MARK " 0123456789'"), "t.yaml:2:12: users[0].token: must be printable ASCII without "
                                              "spaces"},
        {USER_T("\"k8s-" MARK "\\t0123456789\""), "t.yaml:2:12: users[0].token: must be printable ASCII "
                                                  "without spaces"},
        {USER_T("\"k8s-" MARK "\\x000123456789\""), "t.yaml:2:12: users[0].token: must be printable ASCII "
                                                    "without spaces"},
        {USER_T("k8s-" MARK "-\xc3\xa9-0123456789"), "t.yaml:2:12: users[0].token: must be printable ASCII "
                                                     "without spaces"},
        {USER_T("{a: 1}"), "t.yaml:2:12: users[0].token: expected a string, got a mapping"},
        {USER_T("[" TOK1 "]"), "t.yaml:2:12: users[0].token: expected a string, got a sequence"},
        /* Syntax errors around a token: libyaml's text and a position, nothing from the input. */
        {"users:\n  - token: \"" TOK1 "\n",
         "t.yaml:3:1: YAML syntax error: found unexpected end of stream (while scanning a quoted scalar at "
         "2:12)"},
        {"users:\n  - token: k8s-" MARK "-\xff\xfe-0123456789\n",
         "t.yaml:2:23: YAML syntax error: invalid leading UTF-8 octet"},
    };

    EXPECT_ERRORS(cases);
    memset(long_text, 0, sizeof(long_text));
    memcpy(long_text, "users:\n  - token: " MARK, strlen("users:\n  - token: " MARK));
    memset(long_text + strlen(long_text), 'x', KD_ACCESS_MAX_LEN + 1 - strlen(MARK));
    strcat(long_text, "\n    agents: [1]\n");
    expect_error(long_text, "t.yaml:2:12: users[0].token: must be 16 to 1024 bytes long, got 1025");
}

Test(access, errors_agents)
{
    static const struct error_case cases[] = {
        {USER_A("[x]"), "t.yaml:3:14: users[0].agents[0]: must be a positive integer, got \"x\""},
        {USER_A("[0]"), "t.yaml:3:14: users[0].agents[0]: must be a positive integer, got \"0\""},
        {USER_A("[-1]"), "t.yaml:3:14: users[0].agents[0]: must be a positive integer, got \"-1\""},
        {USER_A("[+1]"), "t.yaml:3:14: users[0].agents[0]: must be a positive integer, got \"+1\""},
        {USER_A("[007]"), "t.yaml:3:14: users[0].agents[0]: must be a positive integer, got \"007\""},
        {USER_A("[1.5]"), "t.yaml:3:14: users[0].agents[0]: must be a positive integer, got \"1.5\""},
        {USER_A("[0x10]"), "t.yaml:3:14: users[0].agents[0]: must be a positive integer, got \"0x10\""},
        {USER_A("['']"), "t.yaml:3:14: users[0].agents[0]: must be a positive integer, got \"\""},
        {USER_A("[1, 2, x]"), "t.yaml:3:20: users[0].agents[2]: must be a positive integer, got \"x\""},
        {USER_A("[9223372036854775808]"),
         "t.yaml:3:14: users[0].agents[0]: must be at most 9223372036854775807, got <19 bytes, not shown>"},
        /* A token in the wrong field is described, not shown. */
        {USER_A("[" TOK2 "]"), "t.yaml:3:14: users[0].agents[0]: must be a positive integer, got <32 bytes, "
                               "not shown>"},
        {USER_A(TOK2), "t.yaml:3:13: users[0].agents: expected a list of agent ids, got a scalar"},
        {USER_A("[[1]]"), "t.yaml:3:14: users[0].agents[0]: expected an integer, got a sequence"},
        {USER_A("[{}]"), "t.yaml:3:14: users[0].agents[0]: expected an integer, got a mapping"},
        {USER_A("3"), "t.yaml:3:13: users[0].agents: expected a list of agent ids, got a scalar"},
        {USER_A("{a: 1}"), "t.yaml:3:13: users[0].agents: expected a list of agent ids, got a mapping"},
        {USER_A("[]"), "t.yaml:3:13: users[0].agents: must list at least one agent id"},
        {USER_A("~"), "t.yaml:3:13: users[0].agents: must list at least one agent id"},
        {USER_A(""), "t.yaml:3:12: users[0].agents: must list at least one agent id"},
        {USER_A("[1, 42, 1]"), "t.yaml:3:21: users[0].agents[2]: duplicate agent id 1 (also given at "
                               "agents[0])"},
        {USER_A("[42, 7, 7]"), "t.yaml:3:21: users[0].agents[2]: duplicate agent id 7 (also given at "
                               "agents[1])"},
        {USER_A("\n      - 5\n      - 6\n      - 5"),
         "t.yaml:6:9: users[0].agents[2]: duplicate agent id 5 (also given at agents[0])"},
        /* The first problem in document order: the duplicate, not the bad id after it. */
        {USER_A("[1, 1, x]"), "t.yaml:3:17: users[0].agents[1]: duplicate agent id 1 (also given at "
                              "agents[0])"},
    };

    EXPECT_ERRORS(cases);
}

Test(access, errors_impersonate)
{
    static char long_name[512], text[1024];
    static const struct error_case cases[] = {
        {USER_T(TOK1) "    impersonate: alice\n",
         "t.yaml:4:18: users[0].impersonate: expected a mapping with "
         "username, groups and uid, got a scalar"},
        {USER_T(TOK1) "    impersonate:\n", "t.yaml:4:17: users[0].impersonate: expected a mapping with "
                                            "username, groups and uid, got null"},
        {USER_T(TOK1) "    impersonate: ~\n", "t.yaml:4:18: users[0].impersonate: expected a mapping with "
                                              "username, groups and uid, got null"},
        {USER_T(TOK1) "    impersonate: [a]\n", "t.yaml:4:18: users[0].impersonate: expected a mapping with "
                                                "username, groups and uid, got a sequence"},
        {USER_T(TOK1) "    impersonate: {}\n",
         "t.yaml:4:18: users[0].impersonate.username: missing (impersonate needs a username)"},
        {IMP("      groups: [a]\n      uid: u\n"),
         "t.yaml:5:7: users[0].impersonate.username: missing (impersonate needs a username)"},
        {IMP("      user: a\n"), "t.yaml:5:7: users[0].impersonate: unknown key \"user\" (expected one of: "
                                 "username, groups, uid)"},
        {IMP("      username: a\n      username: b\n"),
         "t.yaml:6:7: users[0].impersonate.username: duplicate key (first given at line 5)"},
        {IMP("      username: a\n      groups: []\n      groups: []\n"),
         "t.yaml:7:7: users[0].impersonate.groups: duplicate key (first given at line 6)"},
        /* username */
        {IMP_NAME("''"), "t.yaml:5:17: users[0].impersonate.username: must be 1 to 255 bytes long, got 0"},
        {IMP_NAME("\"a\\tb\""), "t.yaml:5:17: users[0].impersonate.username: must not contain control "
                                "characters, got \"a\\x09b\""},
        {IMP_NAME("\"a\\x7f\""), "t.yaml:5:17: users[0].impersonate.username: must not contain control "
                                 "characters, got \"a\\x7f\""},
        {IMP_NAME("\"" TOK2 "\\n\""), "t.yaml:5:17: users[0].impersonate.username: must not contain control "
                                      "characters, got <33 bytes, not shown>"},
        {IMP_NAME("{}"), "t.yaml:5:17: users[0].impersonate.username: expected a string, got a mapping"},
        {IMP_NAME("[a]"), "t.yaml:5:17: users[0].impersonate.username: expected a string, got a sequence"},
        /* uid */
        {IMP_UID("''"), "t.yaml:6:12: users[0].impersonate.uid: must be 1 to 255 bytes long, got 0"},
        {IMP_UID("\"\\e\""),
         "t.yaml:6:12: users[0].impersonate.uid: must not contain control characters, got "
         "\"\\x1b\""},
        {IMP_UID("[1]"), "t.yaml:6:12: users[0].impersonate.uid: expected a string, got a sequence"},
        /* groups */
        {IMP_GROUPS("devs"),
         "t.yaml:6:15: users[0].impersonate.groups: expected a list of group names, got a "
         "scalar"},
        {IMP_GROUPS("~"), "t.yaml:6:15: users[0].impersonate.groups: expected a list of group names, got "
                          "null"},
        {IMP_GROUPS("{a: b}"),
         "t.yaml:6:15: users[0].impersonate.groups: expected a list of group names, got "
         "a mapping"},
        {IMP_GROUPS("[a, '']"),
         "t.yaml:6:19: users[0].impersonate.groups[1]: must be 1 to 255 bytes long, got "
         "0"},
        {IMP_GROUPS("[[a]]"),
         "t.yaml:6:16: users[0].impersonate.groups[0]: expected a string, got a sequence"},
        {IMP_GROUPS("[devs, ops, devs]"),
         "t.yaml:6:27: users[0].impersonate.groups[2]: duplicate group (also given at groups[0])"},
        {IMP_GROUPS("[\"a\\nb\"]"), "t.yaml:6:16: users[0].impersonate.groups[0]: must not contain control "
                                    "characters, got \"a\\x0ab\""},
    };

    EXPECT_ERRORS(cases);
    memset(long_name, 'n', 256);
    snprintf(text, sizeof(text), IMP_NAME("%s"), long_name);
    expect_error(text, "t.yaml:5:17: users[0].impersonate.username: must be 1 to 255 bytes long, got 256");
    snprintf(text, sizeof(text), IMP_GROUPS("[x, %s]"), long_name);
    expect_error(text, "t.yaml:6:19: users[0].impersonate.groups[1]: must be 1 to 255 bytes long, got 256");
}

Test(access, error_too_many_groups)
{
    char groups[1024], text[2048], want[256];
    size_t len = 0, col;

    for (int i = 0; i <= KD_ACCESS_MAX_GROUPS; i++)
        len += (size_t)snprintf(groups + len, sizeof(groups) - len, "%sg%d", i ? ", " : "[", i);
    snprintf(groups + len, sizeof(groups) - len, "]");
    snprintf(text, sizeof(text), IMP_GROUPS("%s"), groups);
    col = (size_t)(strstr(groups, "g64") - groups) + 15;
    snprintf(want, sizeof(want),
             "t.yaml:6:%zu: users[0].impersonate.groups[64]: too many groups (at most 64)", col);
    expect_error(text, want);

    /* The same as a block list (the example in docs/tokens.md). */
    len = 0;
    for (int i = 0; i <= KD_ACCESS_MAX_GROUPS; i++)
        len += (size_t)snprintf(groups + len, sizeof(groups) - len, "\n        - g%d", i);
    snprintf(text, sizeof(text), IMP_GROUPS("%s"), groups);
    expect_error(text, "t.yaml:71:11: users[0].impersonate.groups[64]: too many groups (at most 64)");
}

Test(access, errors_duplicate_tokens)
{
    static const struct error_case cases[] = {
        {"users:\n"
         "  - {token: " TOK1 ", agents: [1]}\n"
         "  - {token: " TOK2 ", agents: [2]}\n"
         "  - {token: " TOK1 ", agents: [3]}\n",
         "t.yaml:4:13: users[2].token: duplicate token (also given at users[0], line 2)"},
        /* The same token with the same agents is still a duplicate. */
        {"users:\n"
         "  - {token: " TOK1 ", agents: [1]}\n"
         "  - agents: [1]\n"
         "    token: \"" TOK1 "\"\n",
         "t.yaml:4:12: users[1].token: duplicate token (also given at users[0], line 2)"},
    };

    EXPECT_ERRORS(cases);
}

Test(access, error_leaves_out_alone_and_tolerates_no_buffer)
{
    struct kd_access *sentinel = (struct kd_access *)&sentinel, *t = sentinel;

    cr_assert_eq(kd_access_load_string(NAME, USER_A("[x]"), strlen(USER_A("[x]")), &t, NULL, 0), -EINVAL);
    cr_assert_eq(t, sentinel);
    cr_assert_eq(kd_access_load_string(NULL, NULL, 0, &t, NULL, 0), -EINVAL);
    cr_assert_eq(t, sentinel);
}

Test(access, message_is_cut_to_the_buffer)
{
    struct kd_access *t = NULL;
    char err[24];

    memset(err, 'Z', sizeof(err));
    cr_assert_eq(kd_access_load_string(NAME, USER_A("[x]"), strlen(USER_A("[x]")), &t, err, sizeof(err)),
                 -EINVAL);
    cr_assert_str_eq(err, "t.yaml:3:14: users[0].a");
}

Test(access, too_large)
{
    size_t len = KD_ACCESS_MAX_FILESIZE + 1;
    char *big = malloc(len), err[256];
    struct kd_access *t = NULL;

    cr_assert_not_null(big);
    memset(big, ' ', len);
    cr_assert_eq(kd_access_load_string(NAME, big, len, &t, err, sizeof(err)), -EFBIG);
    cr_assert_str_eq(err, "t.yaml: access-token file larger than 16777216 bytes");
    cr_assert_null(t);
    free(big);
}
