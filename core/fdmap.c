/*
 * fd -> registered object (an io watcher or a stream), so that one loop
 * never watches an fd twice (EEXIST) whatever the backend. Open addressing
 * with linear probing; grown on demand, never sized by the largest fd.
 */
#include "zev-internal.h"

#include <errno.h>
#include <stdlib.h>

enum { EMPTY = -1, DELETED = -2 };

static size_t slot_of(const zev__fdmap_t *m, int fd)
{
    return ((size_t)(unsigned)fd * 2654435761u) & (m->cap - 1);
}

void *zev__fdmap_get(const zev__fdmap_t *m, int fd)
{
    if (!m->cap)
        return NULL;
    for (size_t i = slot_of(m, fd);; i = (i + 1) & (m->cap - 1)) {
        if (m->slots[i].fd == fd)
            return m->slots[i].obj;
        if (m->slots[i].fd == EMPTY)
            return NULL;
    }
}

static int grow(zev__fdmap_t *m)
{
    zev__fdmap_t bigger = {0};
    bigger.cap = m->cap ? m->cap * 2 : 64;
    if (m->used * 4 < m->cap * 2)
        bigger.cap = m->cap; /* mostly tombstones: rehash in place */
    bigger.slots = malloc(bigger.cap * sizeof *bigger.slots);
    if (!bigger.slots) {
        errno = ENOMEM;
        return -1;
    }
    for (size_t i = 0; i < bigger.cap; i++)
        bigger.slots[i].fd = EMPTY;
    for (size_t i = 0; i < m->cap; i++)
        if (m->slots[i].fd >= 0)
            zev__fdmap_put(&bigger, m->slots[i].fd, m->slots[i].obj);
    free(m->slots);
    *m = bigger;
    return 0;
}

int zev__fdmap_put(zev__fdmap_t *m, int fd, void *obj)
{
    if ((m->used + m->tombs + 1) * 4 > m->cap * 3 && grow(m) < 0)
        return -1;
    size_t i = slot_of(m, fd);
    while (m->slots[i].fd >= 0)
        i = (i + 1) & (m->cap - 1);
    if (m->slots[i].fd == DELETED)
        m->tombs--;
    m->slots[i].fd = fd;
    m->slots[i].obj = obj;
    m->used++;
    return 0;
}

void zev__fdmap_del(zev__fdmap_t *m, int fd)
{
    if (!m->cap)
        return;
    for (size_t i = slot_of(m, fd);; i = (i + 1) & (m->cap - 1)) {
        if (m->slots[i].fd == fd) {
            m->slots[i].fd = DELETED;
            m->used--;
            m->tombs++;
            return;
        }
        if (m->slots[i].fd == EMPTY)
            return;
    }
}

void zev__fdmap_free(zev__fdmap_t *m)
{
    free(m->slots);
    *m = (zev__fdmap_t){0};
}
