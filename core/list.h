/* list.h — intrusive circular doubly-linked list (the h2o/Linux shape).
 * Concurrency: none; a list and its nodes belong to one thread.
 * Ownership: the list never allocates; nodes are embedded in their owners.
 *
 *   head <-> n1 <-> n2 <-> ... <-> head      (empty: head.next == head.prev == &head)
 *
 * Invariant: a node is linked in at most one list; an unlinked node has next == prev == NULL,
 * so kd_list_is_linked() can be asked of any initialised node.
 */
#ifndef KD_CORE_LIST_H
#define KD_CORE_LIST_H

#include <stdbool.h>
#include <stddef.h>

struct kd_list {
    struct kd_list *next, *prev;
};

#define KD_CONTAINER_OF(ptr, type, member) ((type *)(void *)((char *)(ptr)-offsetof(type, member)))

static inline void kd_list_init(struct kd_list *head)
{
    head->next = head->prev = head;
}

static inline void kd_list_node_init(struct kd_list *node)
{
    node->next = node->prev = NULL;
}

static inline bool kd_list_is_empty(const struct kd_list *head)
{
    return head->next == head;
}

static inline bool kd_list_is_linked(const struct kd_list *node)
{
    return node->next != NULL;
}

/* Insert `node` before `pos` (before the head means at the tail). */
static inline void kd_list_insert_before(struct kd_list *pos, struct kd_list *node)
{
    node->prev = pos->prev;
    node->next = pos;
    pos->prev->next = node;
    pos->prev = node;
}

static inline void kd_list_push_back(struct kd_list *head, struct kd_list *node)
{
    kd_list_insert_before(head, node);
}

static inline void kd_list_unlink(struct kd_list *node)
{
    node->prev->next = node->next;
    node->next->prev = node->prev;
    node->next = node->prev = NULL;
}

static inline struct kd_list *kd_list_pop_front(struct kd_list *head)
{
    struct kd_list *n = head->next;
    if (n == head)
        return NULL;
    kd_list_unlink(n);
    return n;
}

/* Move every node of `from` to the tail of `to`, leaving `from` empty. */
static inline void kd_list_splice_back(struct kd_list *to, struct kd_list *from)
{
    if (kd_list_is_empty(from))
        return;
    from->next->prev = to->prev;
    to->prev->next = from->next;
    from->prev->next = to;
    to->prev = from->prev;
    kd_list_init(from);
}

#endif
