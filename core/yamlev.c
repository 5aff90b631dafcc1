/* yamlev.c — see yamlev.h. The only file that includes libyaml. */
#include "core/yamlev.h"

#include <stdlib.h>
#include <string.h>
#include <yaml.h>

struct kd_yaml {
    yaml_parser_t parser;
    yaml_event_t ev;
    bool have_ev;
    bool wipe;
    const char *buf;
    size_t len;
};

static void release(struct kd_yaml *y)
{
    if (!y->have_ev)
        return;
    if (y->wipe && y->ev.type == YAML_SCALAR_EVENT && y->ev.data.scalar.value)
        explicit_bzero(y->ev.data.scalar.value, y->ev.data.scalar.length);
    yaml_event_delete(&y->ev);
    y->have_ev = false;
}

struct kd_yaml *kd_yaml_new(const char *buf, size_t len, bool wipe)
{
    struct kd_yaml *y = calloc(1, sizeof(*y));
    if (y == NULL)
        return NULL;
    if (!yaml_parser_initialize(&y->parser)) {
        free(y);
        return NULL;
    }
    y->wipe = wipe;
    y->buf = buf;
    y->len = len;
    yaml_parser_set_input_string(&y->parser, (const unsigned char *)buf, len);
    return y;
}

static struct kd_yaml_mark mark(yaml_mark_t m)
{
    return (struct kd_yaml_mark){m.index, m.line, m.column};
}

int kd_yaml_next(struct kd_yaml *y, struct kd_yaml_event *ev)
{
    release(y);
    memset(ev, 0, sizeof(*ev));
    if (!yaml_parser_parse(&y->parser, &y->ev))
        return -1;
    y->have_ev = true;
    yaml_event_t *e = &y->ev;
    ev->start_mark = mark(e->start_mark);
    ev->end_mark = mark(e->end_mark);
    switch (e->type) {
    case YAML_STREAM_START_EVENT:
        ev->type = KD_YAML_STREAM_START;
        break;
    case YAML_STREAM_END_EVENT:
        ev->type = KD_YAML_STREAM_END;
        break;
    case YAML_DOCUMENT_START_EVENT:
        ev->type = KD_YAML_DOCUMENT_START;
        break;
    case YAML_DOCUMENT_END_EVENT:
        ev->type = KD_YAML_DOCUMENT_END;
        break;
    case YAML_ALIAS_EVENT:
        ev->type = KD_YAML_ALIAS;
        ev->anchor = (const char *)e->data.alias.anchor;
        break;
    case YAML_SCALAR_EVENT:
        ev->type = KD_YAML_SCALAR;
        ev->value = (char *)e->data.scalar.value;
        ev->length = e->data.scalar.length;
        ev->plain = e->data.scalar.style == YAML_PLAIN_SCALAR_STYLE;
        ev->anchor = (const char *)e->data.scalar.anchor;
        ev->tag = (const char *)e->data.scalar.tag;
        break;
    case YAML_SEQUENCE_START_EVENT:
        ev->type = KD_YAML_SEQUENCE_START;
        ev->anchor = (const char *)e->data.sequence_start.anchor;
        ev->tag = (const char *)e->data.sequence_start.tag;
        break;
    case YAML_SEQUENCE_END_EVENT:
        ev->type = KD_YAML_SEQUENCE_END;
        break;
    case YAML_MAPPING_START_EVENT:
        ev->type = KD_YAML_MAPPING_START;
        ev->anchor = (const char *)e->data.mapping_start.anchor;
        ev->tag = (const char *)e->data.mapping_start.tag;
        break;
    case YAML_MAPPING_END_EVENT:
        ev->type = KD_YAML_MAPPING_END;
        break;
    default:
        ev->type = KD_YAML_NONE;
        break;
    }
    return 0;
}

/* libyaml counts lines and columns of characters; a reader error only carries a byte offset. */
static struct kd_yaml_mark mark_of_offset(const struct kd_yaml *y, size_t off)
{
    struct kd_yaml_mark m = {.index = off, .line = 0, .column = 0};
    for (size_t i = 0; i < off && i < y->len; i++) {
        unsigned char ch = (unsigned char)y->buf[i];
        if (ch == '\n') {
            m.line++;
            m.column = 0;
        } else if ((ch & 0xc0) != 0x80) {
            m.column++;
        }
    }
    return m;
}

void kd_yaml_last_error(const struct kd_yaml *y, struct kd_yaml_error *out)
{
    const yaml_parser_t *p = &y->parser;
    memset(out, 0, sizeof(*out));
    out->problem = p->problem ? p->problem : "unknown error";
    out->byte = -1;
    if (p->error == YAML_MEMORY_ERROR) {
        out->kind = KD_YAML_ERR_MEMORY;
    } else if (p->error == YAML_READER_ERROR) {
        out->kind = KD_YAML_ERR_READER;
        out->at = mark_of_offset(y, p->problem_offset);
        out->byte = p->problem_value;
    } else {
        out->kind = KD_YAML_ERR_SYNTAX;
        out->at = mark(p->problem_mark);
        out->context = p->context;
        out->context_at = mark(p->context_mark);
    }
}

/* Wipe libyaml's copies of the input that are still reachable: its raw and decoded input buffers
 * and any scalar tokens still queued. */
static void wipe_parser(yaml_parser_t *p)
{
    if (p->raw_buffer.start && p->raw_buffer.end > p->raw_buffer.start)
        explicit_bzero(p->raw_buffer.start, (size_t)(p->raw_buffer.end - p->raw_buffer.start));
    if (p->buffer.start && p->buffer.end > p->buffer.start)
        explicit_bzero(p->buffer.start, (size_t)(p->buffer.end - p->buffer.start));
    for (yaml_token_t *tk = p->tokens.head; tk && tk < p->tokens.tail; tk++)
        if (tk->type == YAML_SCALAR_TOKEN && tk->data.scalar.value)
            explicit_bzero(tk->data.scalar.value, tk->data.scalar.length);
}

void kd_yaml_free(struct kd_yaml *y)
{
    if (y == NULL)
        return;
    release(y);
    if (y->wipe)
        wipe_parser(&y->parser);
    yaml_parser_delete(&y->parser);
    free(y);
}
