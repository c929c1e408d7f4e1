/*
 * fd -> registered object (an io watcher or a stream), so that one loop
 * never watches an fd twice (EEXIST) whatever the backend, and so that a
 * backend's event, which carries a (serial, fd) token rather than a
 * pointer, finds its object only while that registration lives. Open addressing
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

static const struct zev__fdslot *find(const zev__fdmap_t *m, int fd)
{
    if (!m->cap || fd < 0)
        return NULL;
    for (size_t i = slot_of(m, fd);; i = (i + 1) & (m->cap - 1)) {
        if (m->slots[i].fd == fd)
            return &m->slots[i];
        if (m->slots[i].fd == EMPTY)
            return NULL;
    }
}

void *zev__fdmap_get(const zev__fdmap_t *m, int fd)
{
    const struct zev__fdslot *slot = find(m, fd);
    return slot ? slot->obj : NULL;
}

uint64_t zev__fdmap_token(const zev__fdmap_t *m, int fd)
{
    const struct zev__fdslot *slot = find(m, fd);
    return slot ? (uint64_t)slot->serial << 32 | (uint32_t)fd : 0;
}

void *zev__fdmap_by_token(const zev__fdmap_t *m, uint64_t token)
{
    uint32_t serial = (uint32_t)(token >> 32);
    const struct zev__fdslot *slot = find(m, (int)(uint32_t)token);
    return slot && (slot->serial == serial || !serial) ? slot->obj : NULL;
}

/* Into a free slot (the caller made room). */
static void insert(zev__fdmap_t *m, int fd, uint32_t serial, void *obj)
{
    size_t i = slot_of(m, fd);
    while (m->slots[i].fd >= 0)
        i = (i + 1) & (m->cap - 1);
    if (m->slots[i].fd == DELETED)
        m->tombs--;
    m->slots[i] = (struct zev__fdslot){.fd = fd, .serial = serial, .obj = obj};
    m->used++;
}

static int grow(zev__fdmap_t *m)
{
    zev__fdmap_t bigger = {.serial = m->serial};
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
        if (m->slots[i].fd >= 0) /* each keeps its serial: tokens stay valid */
            insert(&bigger, m->slots[i].fd, m->slots[i].serial, m->slots[i].obj);
    free(m->slots);
    *m = bigger;
    return 0;
}

int zev__fdmap_put(zev__fdmap_t *m, int fd, void *obj)
{
    if ((m->used + m->tombs + 1) * 4 > m->cap * 3 && grow(m) < 0)
        return -1;
    if (++m->serial == 0) /* 0 means "no serial" in a token */
        m->serial = 1;
    insert(m, fd, m->serial, obj);
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
