/* tokens_test.c — the token resolver: YAML and JSON files, hits and near misses, every error path
 * with its exact message (and never a token in it), rotation, duplicates, a 100k-entry table,
 * SipHash-2-4 against the reference vectors, and table reclamation through the epoch under threads.
 * Build with -fsanitize=address: the epoch test relies on ASan to catch a use after free. */
#include "core/tokens.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define NAME "t.yaml"

/* Every token in these tests carries this marker; no message may contain it. */
#define MARK "s3cr3t"
#define TOK1 "glagent-" MARK "-AAAAAAAAAAAAAAAAAAAA1"
#define TOK2 "glagent-" MARK "-BBBBBBBBBBBBBBBBBBBB2"
#define TOK3 "glagent-" MARK "-CCCCCCCCCCCCCCCCCCCC3"

static struct kd_tokens *load_ok(const char *text)
{
    struct kd_tokens *t = NULL;
    char err[512] = "";
    int r = kd_tokens_load_string(NAME, text, strlen(text), &t, err, sizeof(err));

    cr_assert_eq(r, 0, "load failed for <<%s>>: %s", text, err);
    cr_assert_not_null(t);
    return t;
}

static void expect_hit(const struct kd_tokens *t, const char *tok, int64_t agent_id, int64_t project_id,
                       const char *name)
{
    struct kd_agent_ident id = {0};

    cr_assert_eq(kd_tokens_lookup(t, tok, strlen(tok), &id), 0, "lookup missed for %s", tok);
    cr_assert_eq(id.agent_id, agent_id);
    cr_assert_eq(id.project_id, project_id);
    cr_assert_str_eq(id.agent_name, name);
}

static void expect_miss(const struct kd_tokens *t, const char *tok, size_t len)
{
    struct kd_agent_ident id = {.agent_id = -7};

    cr_assert_eq(kd_tokens_lookup(t, tok, len, &id), -ENOENT, "lookup hit for <<%.*s>>", (int)len,
                 tok ? tok : "");
    cr_assert_eq(id.agent_id, -7, "a miss must leave *out alone");
}

/* The exact message (one line, no token in it), -EINVAL, and no table. */
static void expect_error(const char *text, const char *want)
{
    struct kd_tokens *t = NULL;
    char err[512] = "";
    int r = kd_tokens_load_string(NAME, text, strlen(text), &t, err, sizeof(err));

    cr_expect_eq(r, -EINVAL, "want -EINVAL for <<%s>>, got %d (%s)", text, r, err);
    cr_expect_null(t);
    cr_expect_str_eq(err, want, "for <<%s>>\n got: %s\nwant: %s", text, err, want);
    cr_expect_null(strchr(err, '\n'), "message is not one line: %s", err);
    cr_expect_null(strstr(err, MARK), "message shows a token: %s", err);
    kd_tokens_free(t);
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

/* One valid entry (lines 2..5: token, agent_id, project_id, agent_name) with one value replaced. */
#define ENTRY(tok, aid, pid, name)                                                                           \
    "agents:\n  - token: " tok "\n    agent_id: " aid "\n    project_id: " pid "\n    agent_name: " name "\n"
#define ENTRY_T(v) ENTRY(v, "1", "2", "a")
#define ENTRY_A(v) ENTRY(TOK1, v, "2", "a")
#define ENTRY_P(v) ENTRY(TOK1, "1", v, "a")
#define ENTRY_N(v) ENTRY(TOK1, "1", "2", v)

/* ---------------------------------------------------------------------------------------------- */
/* Valid files                                                                                     */

Test(tokens, yaml_file)
{
    /* The shape cmd/dev.c writes, plus a second agent and comments. */
    struct kd_tokens *t = load_ok("# Agent tokens for kasd's embedded token resolver.\n"
                                  "agents:\n"
                                  "  - token: \"" TOK1 "\"\n"
                                  "    agent_id: 1\n"
                                  "    project_id: 1\n"
                                  "    agent_name: dev-agent\n"
                                  "  - agent_name: 'other agent'   # keys in any order\n"
                                  "    project_id: 9223372036854775807\n"
                                  "    token: " TOK2 "\n"
                                  "    agent_id: 42\n");

    cr_assert_eq(kd_tokens_count(t), 2);
    cr_assert_eq(kd_tokens_agents(t), 2);
    expect_hit(t, TOK1, 1, 1, "dev-agent");
    expect_hit(t, TOK2, 42, INT64_MAX, "other agent");
    expect_miss(t, TOK3, strlen(TOK3));
    kd_tokens_free(t);
}

Test(tokens, json_file)
{
    struct kd_tokens *t = load_ok("{\n"
                                  "  \"agents\": [\n"
                                  "    {\"token\": \"" TOK1 "\", \"agent_id\": 5, \"project_id\": 6,\n"
                                  "     \"agent_name\": \"json-agent\"},\n"
                                  "    {\"token\": \"" TOK2 "\", \"agent_id\": 7, \"project_id\": 8,"
                                  " \"agent_name\": \"caf\\u00e9\"}\n"
                                  "  ]\n"
                                  "}\n");

    cr_assert_eq(kd_tokens_count(t), 2);
    expect_hit(t, TOK1, 5, 6, "json-agent");
    expect_hit(t, TOK2, 7, 8, "caf\xc3\xa9");
    kd_tokens_free(t);
}

Test(tokens, empty_list_is_an_empty_table)
{
    static const char *inputs[] = {"agents: []\n", "agents:\n", "agents: ~\n", "{\"agents\": []}"};

    for (size_t i = 0; i < sizeof(inputs) / sizeof(inputs[0]); i++) {
        struct kd_tokens *t = load_ok(inputs[i]);

        cr_assert_eq(kd_tokens_count(t), 0);
        expect_miss(t, TOK1, strlen(TOK1));
        kd_tokens_free(t);
    }
}

Test(tokens, length_bounds)
{
    char longest[KD_TOKENS_MAX_LEN + 1], name[KD_TOKENS_NAME_MAX + 1], text[2048];
    struct kd_tokens *t;

    memset(longest, 'x', KD_TOKENS_MAX_LEN);
    longest[KD_TOKENS_MAX_LEN] = '\0';
    memset(name, 'n', KD_TOKENS_NAME_MAX);
    name[KD_TOKENS_NAME_MAX] = '\0';
    snprintf(text, sizeof(text),
             "agents:\n- {token: '0123456789abcdef', agent_id: 1, project_id: 1, agent_name: n}\n"
             "- {token: %s, agent_id: 2, project_id: 1, agent_name: %s}\n",
             longest, name);
    t = load_ok(text);
    expect_hit(t, "0123456789abcdef", 1, 1, "n");
    expect_hit(t, longest, 2, 1, name);
    kd_tokens_free(t);
}

Test(tokens, load_file)
{
    char path[] = "/tmp/kd_tokens_test_XXXXXX";
    static const char text[] = "agents:\n  - {token: " TOK1 ", agent_id: 3, project_id: 4, agent_name: f}\n";
    struct kd_tokens *t = NULL;
    char err[512] = "";
    int fd = mkstemp(path);

    cr_assert_geq(fd, 0);
    cr_assert_eq(write(fd, text, sizeof(text) - 1), (ssize_t)sizeof(text) - 1);
    close(fd);
    cr_assert_eq(kd_tokens_load_file(path, &t, err, sizeof(err)), 0, "%s", err);
    expect_hit(t, TOK1, 3, 4, "f");
    kd_tokens_free(t);
    unlink(path);

    t = NULL;
    cr_assert_eq(kd_tokens_load_file("/nonexistent/tokens.yaml", &t, err, sizeof(err)), -ENOENT);
    cr_assert_str_eq(err, "/nonexistent/tokens.yaml: cannot read token file: No such file or directory");
    cr_assert_null(t);
}

/* ---------------------------------------------------------------------------------------------- */
/* Lookups                                                                                         */

Test(tokens, near_misses)
{
    struct kd_tokens *t = load_ok(ENTRY_T(TOK1));
    char buf[128];

    expect_hit(t, TOK1, 1, 2, "a");
    /* A prefix of the real token, and the real token with one more byte. */
    expect_miss(t, TOK1, strlen(TOK1) - 1);
    expect_miss(t, TOK1, 16);
    snprintf(buf, sizeof(buf), "%sx", TOK1);
    expect_miss(t, buf, strlen(buf));
    /* Same length, last byte different; first byte different. */
    snprintf(buf, sizeof(buf), "%s", TOK1);
    buf[strlen(buf) - 1] ^= 1;
    expect_miss(t, buf, strlen(buf));
    snprintf(buf, sizeof(buf), "%s", TOK1);
    buf[0] ^= 1;
    expect_miss(t, buf, strlen(buf));
    /* Empty, NULL, short, oversized. */
    expect_miss(t, "", 0);
    expect_miss(t, NULL, 0);
    expect_miss(t, "glagent", 7);
    {
        static char big[KD_TOKENS_MAX_LEN + 2];

        memset(big, 'g', sizeof(big) - 1);
        expect_miss(t, big, sizeof(big) - 1);
    }
    /* No table at all. */
    expect_miss(NULL, TOK1, strlen(TOK1));
    kd_tokens_free(t);
}

Test(tokens, lookup_is_length_delimited)
{
    struct kd_tokens *t = load_ok(ENTRY_T(TOK1));
    struct kd_agent_ident id;
    char buf[128];

    /* The token inside a larger buffer (like a header value), not NUL-terminated. */
    snprintf(buf, sizeof(buf), "Bearer %s, more", TOK1);
    cr_assert_eq(kd_tokens_lookup(t, buf + 7, strlen(TOK1), &id), 0);
    cr_assert_eq(id.agent_id, 1);
    expect_miss(t, buf + 7, strlen(TOK1) + 1);
    expect_miss(t, buf, strlen(TOK1) + 7);
    kd_tokens_free(t);
}

Test(tokens, rotation)
{
    /* Two tokens for one agent (the old one still valid while agents switch over). */
    struct kd_tokens *t = load_ok("agents:\n"
                                  "  - {token: " TOK1 ", agent_id: 9, project_id: 4, agent_name: rot}\n"
                                  "  - {token: " TOK3 ", agent_id: 10, project_id: 4, agent_name: other}\n"
                                  "  - {token: " TOK2 ", agent_id: 9, project_id: 4, agent_name: rot}\n");
    struct kd_agent_ident a, b;

    cr_assert_eq(kd_tokens_count(t), 3);
    cr_assert_eq(kd_tokens_agents(t), 2);
    cr_assert_eq(kd_tokens_lookup(t, TOK1, strlen(TOK1), &a), 0);
    cr_assert_eq(kd_tokens_lookup(t, TOK2, strlen(TOK2), &b), 0);
    cr_assert_eq(a.agent_id, 9);
    cr_assert_eq(b.agent_id, 9);
    cr_assert_eq(a.project_id, b.project_id);
    /* One agent, one name: both tokens borrow the same string. */
    cr_assert_eq(a.agent_name, b.agent_name);
    cr_assert_str_eq(a.agent_name, "rot");
    expect_hit(t, TOK3, 10, 4, "other");
    kd_tokens_free(t);
}

Test(tokens, hundred_thousand_entries)
{
    enum { N = 100000 };
    size_t cap = (size_t)N * 128, len = 0;
    char *text = malloc(cap), tok[64];
    struct kd_tokens *t;

    cr_assert_not_null(text);
    len += (size_t)snprintf(text + len, cap - len, "agents:\n");
    /* Two tokens per agent: ids 1..N/2. */
    for (size_t i = 0; i < N; i++) {
        size_t agent = i / 2 + 1;

        len += (size_t)snprintf(
            text + len, cap - len,
            "- {token: glagent-%020zu, agent_id: %zu, project_id: %zu, agent_name: agent-%zu}\n", i, agent,
            agent * 3, agent);
        cr_assert_lt(len, cap);
    }
    t = load_ok(text);
    free(text);
    cr_assert_eq(kd_tokens_count(t), N);
    cr_assert_eq(kd_tokens_agents(t), N / 2);
    for (size_t i = 0; i < N; i++) {
        struct kd_agent_ident id;
        size_t agent = i / 2 + 1;
        char name[32];

        snprintf(tok, sizeof(tok), "glagent-%020zu", i);
        cr_assert_eq(kd_tokens_lookup(t, tok, strlen(tok), &id), 0, "missed %s", tok);
        cr_assert_eq(id.agent_id, (int64_t)agent);
        cr_assert_eq(id.project_id, (int64_t)agent * 3);
        snprintf(name, sizeof(name), "agent-%zu", agent);
        cr_assert_str_eq(id.agent_name, name);
        /* Same length, not in the table. */
        snprintf(tok, sizeof(tok), "glagent-%020zu", i + N);
        cr_assert_eq(kd_tokens_lookup(t, tok, strlen(tok), &id), -ENOENT, "hit %s", tok);
    }
    kd_tokens_free(t);
}

/* ---------------------------------------------------------------------------------------------- */
/* Errors                                                                                          */

Test(tokens, errors_document_shape)
{
    static const struct error_case cases[] = {
        {"", "t.yaml:1:1: empty file (a token file is a mapping with an agents: list)"},
        {"# only a comment\n", "t.yaml:2:1: empty file (a token file is a mapping with an agents: list)"},
        {"- a\n", "t.yaml:1:1: expected a mapping with an agents: list at the top level, got a sequence"},
        {"text\n", "t.yaml:1:1: expected a mapping with an agents: list at the top level, got a scalar"},
        {"{}\n", "t.yaml:1:1: agents: missing (a token file is a mapping with an agents: list)"},
        {"agentz: []\n", "t.yaml:1:1: unknown key \"agentz\" (expected: agents)"},
        {TOK1 ": []\n", "t.yaml:1:1: unknown key <36 bytes, not shown> (expected: agents)"},
        {"? [a]\n: 1\n", "t.yaml:1:3: keys must be scalars, got a sequence"},
        {"agents: []\nagents: []\n", "t.yaml:2:1: agents: duplicate key (first given at line 1)"},
        {"agents: 3\n", "t.yaml:1:9: agents: expected a list of agents, got a scalar"},
        {"agents: {a: 1}\n", "t.yaml:1:9: agents: expected a list of agents, got a mapping"},
        {"agents: [1]\n", "t.yaml:1:10: agents[0]: expected a mapping with token, agent_id, project_id and "
                          "agent_name, got a scalar"},
        {"agents: [[]]\n", "t.yaml:1:10: agents[0]: expected a mapping with token, agent_id, project_id and "
                           "agent_name, got a sequence"},
        {"agents:\n  - {[a]: 1}\n", "t.yaml:2:6: agents[0]: keys must be scalars, got a sequence"},
        {"agents: []\n---\nagents: []\n", "t.yaml:2:1: only one YAML document is allowed"},
        {"agents: &a []\n", "t.yaml:1:9: agents: anchors are not supported (anchor \"a\")"},
        {"agents:\n  - token: " TOK1 "\n    agent_id: *x\n",
         "t.yaml:3:15: agents[0].agent_id: aliases are not supported (alias \"x\")"},
        {"agents:\n  - token: " TOK1 "\n    agent_id: !!int 1\n",
         "t.yaml:3:15: agents[0].agent_id: tags are not supported (tag <21 bytes, not shown>)"},
        {"agents:\n  - token: !t " TOK1 "\n",
         "t.yaml:2:12: agents[0].token: tags are not supported (tag \"!t\")"},
    };

    EXPECT_ERRORS(cases);
}

Test(tokens, errors_entry_keys)
{
    static const struct error_case cases[] = {
        {"agents:\n  - {}\n", "t.yaml:2:5: agents[0].token: missing (every entry needs token, agent_id, "
                              "project_id and agent_name)"},
        {"agents:\n  - token: " TOK1 "\n    project_id: 2\n    agent_name: a\n",
         "t.yaml:2:5: agents[0].agent_id: missing (every entry needs token, agent_id, project_id and "
         "agent_name)"},
        {"agents:\n  - token: " TOK1 "\n    agent_id: 1\n    agent_name: a\n",
         "t.yaml:2:5: agents[0].project_id: missing (every entry needs token, agent_id, project_id and "
         "agent_name)"},
        {"agents:\n  - token: " TOK1 "\n    agent_id: 1\n    project_id: 2\n",
         "t.yaml:2:5: agents[0].agent_name: missing (every entry needs token, agent_id, project_id and "
         "agent_name)"},
        {"agents:\n  - agent_id: 1\n    project_id: 2\n    agent_name: a\n",
         "t.yaml:2:5: agents[0].token: missing (every entry needs token, agent_id, project_id and "
         "agent_name)"},
        {"agents:\n  - token: " TOK1 "\n    agent_idd: 1\n",
         "t.yaml:3:5: agents[0]: unknown key \"agent_idd\" (expected one of: token, agent_id, project_id, "
         "agent_name)"},
        /* A token pasted where a key goes is not echoed. */
        {"agents:\n  - " TOK1 ": x\n",
         "t.yaml:2:5: agents[0]: unknown key <36 bytes, not shown> (expected one "
         "of: token, agent_id, project_id, agent_name)"},
        {"agents:\n  - token: " TOK1 "\n    token: " TOK2 "\n",
         "t.yaml:3:5: agents[0].token: duplicate key (first given at line 2)"},
        {"agents:\n  - {token: " TOK1 ", agent_id: 1, project_id: 2, agent_name: a}\n  - {token: " TOK2
         ", agent_id: 1, agent_id: 1}\n",
         "t.yaml:3:64: agents[1].agent_id: duplicate key (first given at line 3)"},
    };

    EXPECT_ERRORS(cases);
}

Test(tokens, errors_token)
{
    static char long_text[2048];
    static const struct error_case cases[] = {
        {ENTRY_T("short"), "t.yaml:2:12: agents[0].token: must be 16 to 1024 bytes long, got 5"},
        {ENTRY_T("''"), "t.yaml:2:12: agents[0].token: must be 16 to 1024 bytes long, got 0"},
        {ENTRY_T("0123456789abcde"), "t.yaml:2:12: agents[0].token: must be 16 to 1024 bytes long, got 15"},
        {ENTRY_T("'glagent-" MARK " 0123456789'"),
         "t.yaml:2:12: agents[0].token: must be printable ASCII without spaces"},
        {ENTRY_T("\"glagent-" MARK "\\t0123456789\""),
         "t.yaml:2:12: agents[0].token: must be printable ASCII without spaces"},
        {ENTRY_T("\"glagent-" MARK "\\x000123456789\""),
         "t.yaml:2:12: agents[0].token: must be printable ASCII without spaces"},
        {ENTRY_T("glagent-" MARK "-\xc3\xa9-0123456789"),
         "t.yaml:2:12: agents[0].token: must be printable ASCII without spaces"},
        {ENTRY_T("{a: 1}"), "t.yaml:2:12: agents[0].token: expected a string, got a mapping"},
        {ENTRY_T("[" TOK1 "]"), "t.yaml:2:12: agents[0].token: expected a string, got a sequence"},
        /* Syntax errors around a token: libyaml's text and a position, nothing from the input. */
        {"agents:\n  - token: \"" TOK1 "\n",
         "t.yaml:3:1: YAML syntax error: found unexpected end of stream (while scanning a quoted scalar at "
         "2:12)"},
        {"agents:\n  - token: glagent-" MARK "-\xff\xfe-0123456789\n",
         "t.yaml:2:27: YAML syntax error: invalid leading UTF-8 octet"},
    };

    EXPECT_ERRORS(cases);
    memset(long_text, 0, sizeof(long_text));
    memcpy(long_text, "agents:\n  - token: " MARK, strlen("agents:\n  - token: " MARK));
    memset(long_text + strlen(long_text), 'x', KD_TOKENS_MAX_LEN + 1 - strlen(MARK));
    strcat(long_text, "\n    agent_id: 1\n    project_id: 2\n    agent_name: a\n");
    expect_error(long_text, "t.yaml:2:12: agents[0].token: must be 16 to 1024 bytes long, got 1025");
}

Test(tokens, errors_ids)
{
    static const struct error_case cases[] = {
        {ENTRY_A("x"), "t.yaml:3:15: agents[0].agent_id: must be a positive integer, got \"x\""},
        {ENTRY_A("0"), "t.yaml:3:15: agents[0].agent_id: must be a positive integer, got \"0\""},
        {ENTRY_A("-1"), "t.yaml:3:15: agents[0].agent_id: must be a positive integer, got \"-1\""},
        {ENTRY_A("+1"), "t.yaml:3:15: agents[0].agent_id: must be a positive integer, got \"+1\""},
        {ENTRY_A("007"), "t.yaml:3:15: agents[0].agent_id: must be a positive integer, got \"007\""},
        {ENTRY_A("1.5"), "t.yaml:3:15: agents[0].agent_id: must be a positive integer, got \"1.5\""},
        {ENTRY_A("1e3"), "t.yaml:3:15: agents[0].agent_id: must be a positive integer, got \"1e3\""},
        {ENTRY_A("0x10"), "t.yaml:3:15: agents[0].agent_id: must be a positive integer, got \"0x10\""},
        {ENTRY_A("''"), "t.yaml:3:15: agents[0].agent_id: must be a positive integer, got \"\""},
        {ENTRY_A("\"1\\t\""), "t.yaml:3:15: agents[0].agent_id: must be a positive integer, got \"1\\x09\""},
        {ENTRY_A("9223372036854775808"),
         "t.yaml:3:15: agents[0].agent_id: must be at most 9223372036854775807, got <19 bytes, not shown>"},
        /* A token in the wrong field is described, not shown. */
        {ENTRY_A(TOK2),
         "t.yaml:3:15: agents[0].agent_id: must be a positive integer, got <36 bytes, not shown>"},
        {ENTRY_A("[1]"), "t.yaml:3:15: agents[0].agent_id: expected an integer, got a sequence"},
        {ENTRY_P("abc"), "t.yaml:4:17: agents[0].project_id: must be a positive integer, got \"abc\""},
        {ENTRY_P("0"), "t.yaml:4:17: agents[0].project_id: must be a positive integer, got \"0\""},
        {ENTRY_P("{}"), "t.yaml:4:17: agents[0].project_id: expected an integer, got a mapping"},
    };

    EXPECT_ERRORS(cases);
}

Test(tokens, errors_agent_name)
{
    static char long_name[512], text[1024];
    static const struct error_case cases[] = {
        {ENTRY_N("''"), "t.yaml:5:17: agents[0].agent_name: must be 1 to 255 bytes long, got 0"},
        {ENTRY_N("\"a\\tb\""), "t.yaml:5:17: agents[0].agent_name: must not contain control characters, got "
                               "\"a\\x09b\""},
        {ENTRY_N("\"" TOK2 "\\n\""),
         "t.yaml:5:17: agents[0].agent_name: must not contain control characters, got <37 bytes, not shown>"},
        {ENTRY_N("{}"), "t.yaml:5:17: agents[0].agent_name: expected a string, got a mapping"},
    };

    EXPECT_ERRORS(cases);
    memset(long_name, 'n', 256);
    snprintf(text, sizeof(text), ENTRY_N("%s"), long_name);
    expect_error(text, "t.yaml:5:17: agents[0].agent_name: must be 1 to 255 bytes long, got 256");
}

Test(tokens, errors_duplicates_and_rotation)
{
    static const struct error_case cases[] = {
        {"agents:\n"
         "  - {token: " TOK1 ", agent_id: 1, project_id: 2, agent_name: a}\n"
         "  - {token: " TOK2 ", agent_id: 2, project_id: 2, agent_name: b}\n"
         "  - {token: " TOK1 ", agent_id: 3, project_id: 2, agent_name: c}\n",
         "t.yaml:4:13: agents[2].token: duplicate token (also given at agents[0], line 2)"},
        /* The same token twice for the same agent is still a duplicate. */
        {"agents:\n"
         "  - {token: " TOK1 ", agent_id: 1, project_id: 2, agent_name: a}\n"
         "  - {token: " TOK1 ", agent_id: 1, project_id: 2, agent_name: a}\n",
         "t.yaml:3:13: agents[1].token: duplicate token (also given at agents[0], line 2)"},
        {"agents:\n"
         "  - {token: " TOK1 ", agent_id: 1, project_id: 2, agent_name: a}\n"
         "  - {token: " TOK2 ", agent_id: 1, project_id: 3, agent_name: a}\n",
         "t.yaml:3:76: agents[1].project_id: agent_id 1 has project_id 2 at agents[0] (line 2); every token "
         "of "
         "an agent must agree, got 3"},
        {"agents:\n"
         "  - {token: " TOK1 ", agent_id: 1, project_id: 2, agent_name: a}\n"
         "  - {token: " TOK3 ", agent_id: 5, project_id: 2, agent_name: a}\n"
         "  - {token: " TOK2 ", agent_id: 1, project_id: 2, agent_name: b}\n",
         "t.yaml:4:91: agents[2].agent_name: agent_id 1 has another agent_name at agents[0] (line 2); every "
         "token of an agent must agree"},
    };

    EXPECT_ERRORS(cases);
}

Test(tokens, error_leaves_out_alone_and_tolerates_no_buffer)
{
    struct kd_tokens *sentinel = (struct kd_tokens *)&sentinel, *t = sentinel;

    cr_assert_eq(kd_tokens_load_string(NAME, ENTRY_A("x"), strlen(ENTRY_A("x")), &t, NULL, 0), -EINVAL);
    cr_assert_eq(t, sentinel);
    cr_assert_eq(kd_tokens_load_string(NULL, NULL, 0, &t, NULL, 0), -EINVAL);
    cr_assert_eq(t, sentinel);
}

Test(tokens, too_large)
{
    size_t len = KD_TOKENS_MAX_FILESIZE + 1;
    char *big = malloc(len), err[256];
    struct kd_tokens *t = NULL;

    cr_assert_not_null(big);
    memset(big, ' ', len);
    cr_assert_eq(kd_tokens_load_string(NAME, big, len, &t, err, sizeof(err)), -EFBIG);
    cr_assert_str_eq(err, "t.yaml: token file larger than 16777216 bytes");
    cr_assert_null(t);
    free(big);
}

/* ---------------------------------------------------------------------------------------------- */
/* SipHash-2-4                                                                                     */

/* vectors_sip64 of the reference implementation (github.com/veorq/SipHash, vectors.h): key 00..0f,
 * message i = 00 01 .. (i-1), output bytes as the reference writes them (little-endian). Entry 15
 * is the worked example of the paper's appendix A (0xa129ca6149be45e5). */
static const uint8_t sip64_vectors[64][8] = {
    {0x31, 0x0e, 0x0e, 0xdd, 0x47, 0xdb, 0x6f, 0x72}, {0xfd, 0x67, 0xdc, 0x93, 0xc5, 0x39, 0xf8, 0x74},
    {0x5a, 0x4f, 0xa9, 0xd9, 0x09, 0x80, 0x6c, 0x0d}, {0x2d, 0x7e, 0xfb, 0xd7, 0x96, 0x66, 0x67, 0x85},
    {0xb7, 0x87, 0x71, 0x27, 0xe0, 0x94, 0x27, 0xcf}, {0x8d, 0xa6, 0x99, 0xcd, 0x64, 0x55, 0x76, 0x18},
    {0xce, 0xe3, 0xfe, 0x58, 0x6e, 0x46, 0xc9, 0xcb}, {0x37, 0xd1, 0x01, 0x8b, 0xf5, 0x00, 0x02, 0xab},
    {0x62, 0x24, 0x93, 0x9a, 0x79, 0xf5, 0xf5, 0x93}, {0xb0, 0xe4, 0xa9, 0x0b, 0xdf, 0x82, 0x00, 0x9e},
    {0xf3, 0xb9, 0xdd, 0x94, 0xc5, 0xbb, 0x5d, 0x7a}, {0xa7, 0xad, 0x6b, 0x22, 0x46, 0x2f, 0xb3, 0xf4},
    {0xfb, 0xe5, 0x0e, 0x86, 0xbc, 0x8f, 0x1e, 0x75}, {0x90, 0x3d, 0x84, 0xc0, 0x27, 0x56, 0xea, 0x14},
    {0xee, 0xf2, 0x7a, 0x8e, 0x90, 0xca, 0x23, 0xf7}, {0xe5, 0x45, 0xbe, 0x49, 0x61, 0xca, 0x29, 0xa1},
    {0xdb, 0x9b, 0xc2, 0x57, 0x7f, 0xcc, 0x2a, 0x3f}, {0x94, 0x47, 0xbe, 0x2c, 0xf5, 0xe9, 0x9a, 0x69},
    {0x9c, 0xd3, 0x8d, 0x96, 0xf0, 0xb3, 0xc1, 0x4b}, {0xbd, 0x61, 0x79, 0xa7, 0x1d, 0xc9, 0x6d, 0xbb},
    {0x98, 0xee, 0xa2, 0x1a, 0xf2, 0x5c, 0xd6, 0xbe}, {0xc7, 0x67, 0x3b, 0x2e, 0xb0, 0xcb, 0xf2, 0xd0},
    {0x88, 0x3e, 0xa3, 0xe3, 0x95, 0x67, 0x53, 0x93}, {0xc8, 0xce, 0x5c, 0xcd, 0x8c, 0x03, 0x0c, 0xa8},
    {0x94, 0xaf, 0x49, 0xf6, 0xc6, 0x50, 0xad, 0xb8}, {0xea, 0xb8, 0x85, 0x8a, 0xde, 0x92, 0xe1, 0xbc},
    {0xf3, 0x15, 0xbb, 0x5b, 0xb8, 0x35, 0xd8, 0x17}, {0xad, 0xcf, 0x6b, 0x07, 0x63, 0x61, 0x2e, 0x2f},
    {0xa5, 0xc9, 0x1d, 0xa7, 0xac, 0xaa, 0x4d, 0xde}, {0x71, 0x65, 0x95, 0x87, 0x66, 0x50, 0xa2, 0xa6},
    {0x28, 0xef, 0x49, 0x5c, 0x53, 0xa3, 0x87, 0xad}, {0x42, 0xc3, 0x41, 0xd8, 0xfa, 0x92, 0xd8, 0x32},
    {0xce, 0x7c, 0xf2, 0x72, 0x2f, 0x51, 0x27, 0x71}, {0xe3, 0x78, 0x59, 0xf9, 0x46, 0x23, 0xf3, 0xa7},
    {0x38, 0x12, 0x05, 0xbb, 0x1a, 0xb0, 0xe0, 0x12}, {0xae, 0x97, 0xa1, 0x0f, 0xd4, 0x34, 0xe0, 0x15},
    {0xb4, 0xa3, 0x15, 0x08, 0xbe, 0xff, 0x4d, 0x31}, {0x81, 0x39, 0x62, 0x29, 0xf0, 0x90, 0x79, 0x02},
    {0x4d, 0x0c, 0xf4, 0x9e, 0xe5, 0xd4, 0xdc, 0xca}, {0x5c, 0x73, 0x33, 0x6a, 0x76, 0xd8, 0xbf, 0x9a},
    {0xd0, 0xa7, 0x04, 0x53, 0x6b, 0xa9, 0x3e, 0x0e}, {0x92, 0x59, 0x58, 0xfc, 0xd6, 0x42, 0x0c, 0xad},
    {0xa9, 0x15, 0xc2, 0x9b, 0xc8, 0x06, 0x73, 0x18}, {0x95, 0x2b, 0x79, 0xf3, 0xbc, 0x0a, 0xa6, 0xd4},
    {0xf2, 0x1d, 0xf2, 0xe4, 0x1d, 0x45, 0x35, 0xf9}, {0x87, 0x57, 0x75, 0x19, 0x04, 0x8f, 0x53, 0xa9},
    {0x10, 0xa5, 0x6c, 0xf5, 0xdf, 0xcd, 0x9a, 0xdb}, {0xeb, 0x75, 0x09, 0x5c, 0xcd, 0x98, 0x6c, 0xd0},
    {0x51, 0xa9, 0xcb, 0x9e, 0xcb, 0xa3, 0x12, 0xe6}, {0x96, 0xaf, 0xad, 0xfc, 0x2c, 0xe6, 0x66, 0xc7},
    {0x72, 0xfe, 0x52, 0x97, 0x5a, 0x43, 0x64, 0xee}, {0x5a, 0x16, 0x45, 0xb2, 0x76, 0xd5, 0x92, 0xa1},
    {0xb2, 0x74, 0xcb, 0x8e, 0xbf, 0x87, 0x87, 0x0a}, {0x6f, 0x9b, 0xb4, 0x20, 0x3d, 0xe7, 0xb3, 0x81},
    {0xea, 0xec, 0xb2, 0xa3, 0x0b, 0x22, 0xa8, 0x7f}, {0x99, 0x24, 0xa4, 0x3c, 0xc1, 0x31, 0x57, 0x24},
    {0xbd, 0x83, 0x8d, 0x3a, 0xaf, 0xbf, 0x8d, 0xb7}, {0x0b, 0x1a, 0x2a, 0x32, 0x65, 0xd5, 0x1a, 0xea},
    {0x13, 0x50, 0x79, 0xa3, 0x23, 0x1c, 0xe6, 0x60}, {0x93, 0x2b, 0x28, 0x46, 0xe4, 0xd7, 0x06, 0x66},
    {0xe1, 0x91, 0x5f, 0x5c, 0xb1, 0xec, 0xa4, 0x6c}, {0xf3, 0x25, 0x96, 0x5c, 0xa1, 0x6d, 0x62, 0x9f},
    {0x57, 0x5f, 0xf2, 0x8e, 0x60, 0x38, 0x1b, 0xe5}, {0x72, 0x45, 0x06, 0xeb, 0x4c, 0x32, 0x8a, 0x95},
};

Test(siphash, reference_vectors)
{
    uint8_t key[16], msg[64];

    for (int i = 0; i < 16; i++)
        key[i] = (uint8_t)i;
    for (int i = 0; i < 64; i++)
        msg[i] = (uint8_t)i;
    for (size_t i = 0; i < 64; i++) {
        uint64_t want = 0;

        for (int b = 7; b >= 0; b--)
            want = want << 8 | sip64_vectors[i][b];
        cr_expect_eq(kd_siphash24(key, msg, i), want, "message length %zu: got %016llx, want %016llx", i,
                     (unsigned long long)kd_siphash24(key, msg, i), (unsigned long long)want);
    }
    cr_assert_eq(kd_siphash24(key, msg, 15), 0xa129ca6149be45e5ull);
}

/* ---------------------------------------------------------------------------------------------- */
/* Handle and epoch                                                                                */

Test(epoch, create_bounds)
{
    struct kd_epoch *e = NULL;

    cr_assert_eq(kd_epoch_create(0, &e), -EINVAL);
    cr_assert_eq(kd_epoch_create(4097, &e), -EINVAL);
    cr_assert_eq(kd_epoch_create(4096, &e), 0);
    kd_epoch_destroy(e);
}

struct wake_count {
    struct kd_epoch *e;
    unsigned calls;
    unsigned last_slot;
    int quiesce; /* the callback plays a woken reader */
};

static void count_wake(void *ud, unsigned slot)
{
    struct wake_count *w = ud;

    w->calls++;
    w->last_slot = slot;
    if (w->quiesce)
        kd_epoch_quiescent(w->e, slot);
}

Test(epoch, lagging_offline_and_woken_slots)
{
    struct kd_epoch *e;
    struct wake_count w = {0};

    cr_assert_eq(kd_epoch_create(2, &e), 0);
    w.e = e;
    /* Slots start online and have passed no quiescent point: a grace period cannot end. */
    cr_assert_eq(kd_epoch_synchronize(e, count_wake, &w, 20), -ETIMEDOUT);
    cr_assert_eq(w.calls, 2, "each lagging slot is woken once");
    /* Offline slots are not waited for (nor woken). */
    kd_epoch_offline(e, 0);
    kd_epoch_offline(e, 1);
    w.calls = 0;
    cr_assert_eq(kd_epoch_synchronize(e, count_wake, &w, 20), 0);
    cr_assert_eq(kd_epoch_synchronize(e, NULL, NULL, 0), 0);
    cr_assert_eq(w.calls, 0);
    /* Back online: a quiescent point from before the grace period does not count... */
    kd_epoch_online(e, 1);
    kd_epoch_quiescent(e, 1);
    cr_assert_eq(kd_epoch_synchronize(e, count_wake, &w, 10), -ETIMEDOUT);
    cr_assert_eq(w.calls, 1);
    cr_assert_eq(w.last_slot, 1);
    /* ...one after it (here: the woken reader) does. */
    w.quiesce = 1;
    cr_assert_eq(kd_epoch_synchronize(e, count_wake, &w, 1000), 0);
    kd_epoch_destroy(e);
}

Test(epoch, handle_get_and_swap)
{
    struct kd_tokens_handle h;
    struct kd_tokens *a = load_ok(ENTRY_T(TOK1)), *b = load_ok(ENTRY_T(TOK2));

    kd_tokens_handle_init(&h, NULL);
    cr_assert_null(kd_tokens_handle_get(&h));
    cr_assert_null(kd_tokens_handle_swap(&h, a));
    cr_assert_eq(kd_tokens_handle_get(&h), a);
    cr_assert_eq(kd_tokens_handle_swap(&h, b), a);
    cr_assert_eq(kd_tokens_handle_get(&h), b);
    cr_assert_eq(kd_tokens_handle_swap(&h, NULL), b);
    kd_tokens_free(a);
    kd_tokens_free(b);
}

struct reader {
    pthread_t thread;
    struct kd_tokens_handle *h;
    struct kd_epoch *e;
    unsigned slot;
    int wake_fd[2]; /* sleeping readers block on [0]; the wake callback writes [1] */
    bool sleeps;
    atomic_bool *stop;
    atomic_ulong turns;
    atomic_ulong failures;
};

static void *reader_main(void *arg)
{
    struct reader *r = arg;

    kd_epoch_online(r->e, r->slot);
    while (!atomic_load(r->stop)) {
        /* One loop turn: use the current table, then pass a quiescent point. */
        const struct kd_tokens *t = kd_tokens_handle_get(r->h);
        struct kd_agent_ident id;

        for (int i = 0; i < 4; i++) {
            if (kd_tokens_lookup(t, TOK1, strlen(TOK1), &id) != 0 || id.agent_id != 1 ||
                strncmp(id.agent_name, "gen-", 4) != 0)
                atomic_fetch_add(&r->failures, 1);
            if (kd_tokens_lookup(t, TOK3, strlen(TOK3), &id) != -ENOENT)
                atomic_fetch_add(&r->failures, 1);
        }
        atomic_fetch_add(&r->turns, 1);
        kd_epoch_quiescent(r->e, r->slot);
        if (r->sleeps) {
            char c;

            /* Asleep until woken, like a shard in io_uring_enter with nothing to do. */
            if (read(r->wake_fd[0], &c, 1) != 1)
                break;
        }
    }
    kd_epoch_offline(r->e, r->slot);
    return NULL;
}

static void wake_reader(void *ud, unsigned slot)
{
    struct reader *readers = ud;
    char c = 'w';

    if (readers[slot].sleeps && write(readers[slot].wake_fd[1], &c, 1) != 1)
        abort();
}

static struct kd_tokens *generation(int gen)
{
    char text[512];

    snprintf(text, sizeof(text),
             "agents:\n"
             "  - {token: " TOK1 ", agent_id: 1, project_id: 1, agent_name: gen-%d}\n"
             "  - {token: " TOK2 ", agent_id: 2, project_id: 1, agent_name: two}\n",
             gen);
    return load_ok(text);
}

/* Readers look up in whatever table is current while the main thread swaps in 1000 new ones and
 * frees each old one after a grace period. ASan turns any read of a freed table into a failure. */
Test(epoch, reload_under_readers, .timeout = 120)
{
    enum { NREADERS = 3, ROUNDS = 1000 };
    struct reader readers[NREADERS + 1];
    struct kd_tokens_handle h;
    struct kd_epoch *e;
    atomic_bool stop = false;

    cr_assert_eq(kd_epoch_create(NREADERS + 1, &e), 0);
    kd_tokens_handle_init(&h, generation(0));
    memset(readers, 0, sizeof(readers));
    /* The last slot belongs to a shard that never runs: it is offline. */
    kd_epoch_offline(e, NREADERS);
    for (unsigned i = 0; i < NREADERS; i++) {
        struct reader *r = &readers[i];

        r->h = &h;
        r->e = e;
        r->slot = i;
        r->stop = &stop;
        r->sleeps = i == NREADERS - 1; /* one reader sleeps between turns and needs waking */
        atomic_init(&r->turns, 0);
        atomic_init(&r->failures, 0);
        cr_assert_eq(pipe(r->wake_fd), 0);
        cr_assert_eq(pthread_create(&r->thread, NULL, reader_main, r), 0);
    }
    for (int gen = 1; gen <= ROUNDS; gen++) {
        struct kd_tokens *old = kd_tokens_handle_swap(&h, generation(gen));
        int rc = kd_epoch_synchronize(e, wake_reader, readers, 10000);

        cr_assert_eq(rc, 0, "grace period %d did not end", gen);
        /* Scribble, then free: a reader still in the old table would read garbage or freed memory. */
        kd_tokens_free(old);
    }
    atomic_store(&stop, true);
    for (unsigned i = 0; i < NREADERS; i++) {
        char c = 's';

        if (readers[i].sleeps)
            cr_assert_eq(write(readers[i].wake_fd[1], &c, 1), 1);
        cr_assert_eq(pthread_join(readers[i].thread, NULL), 0);
        cr_expect_eq(atomic_load(&readers[i].failures), 0, "reader %u saw a bad table", i);
        cr_expect_gt(atomic_load(&readers[i].turns), 0);
        close(readers[i].wake_fd[0]);
        close(readers[i].wake_fd[1]);
    }
    /* The sleeping reader ran at least one turn per grace period. */
    cr_expect_geq(atomic_load(&readers[NREADERS - 1].turns), ROUNDS);
    kd_tokens_free(kd_tokens_handle_swap(&h, NULL));
    kd_epoch_destroy(e);
}
