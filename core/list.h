/*
 * Intrusive circular doubly linked list (as libuv's queue.h): the node lives
 * inside the object, so linking never allocates. An unlinked node points to
 * itself, which makes "is it on a list?" a pointer compare and removal of an
 * unlinked node harmless.
 */
#ifndef ZEV_LIST_H
#define ZEV_LIST_H

#include <stddef.h>

typedef struct zev__list {
    struct zev__list *next, *prev;
} zev__list_t;

#define zev__container_of(ptr, type, member) ((type *)((char *)(ptr)-offsetof(type, member)))

static inline void zev__list_init(zev__list_t *l)
{
    l->next = l->prev = l;
}

static inline int zev__list_empty(const zev__list_t *l)
{
    return l->next == l;
}

/* Also "is this node unlinked?" for a node initialised with zev__list_init. */
static inline int zev__list_linked(const zev__list_t *n)
{
    return n->next != n;
}

static inline void zev__list_push_tail(zev__list_t *head, zev__list_t *n)
{
    n->prev = head->prev;
    n->next = head;
    head->prev->next = n;
    head->prev = n;
}

static inline void zev__list_remove(zev__list_t *n)
{
    n->prev->next = n->next;
    n->next->prev = n->prev;
    zev__list_init(n);
}

static inline zev__list_t *zev__list_pop_head(zev__list_t *head)
{
    zev__list_t *n = head->next;
    if (n == head)
        return NULL;
    zev__list_remove(n);
    return n;
}

#endif /* ZEV_LIST_H */
