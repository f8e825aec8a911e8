# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""MQTT topic matching, compiled: the hot-path twin of `cascade_fast._topics_py`.

Same semantics, same errors, same results as the pure twin (its module
docstring is the specification); tests/test_topics_hypothesis.py proves the
two equal. Why a separate .pyx rather than compiling the twin: a cold match
must cost about 200 ns, which rules out a substring and a dict lookup per
level. Here the topic is walked in place on its UTF-8 bytes (free for an
ASCII str, which is its own UTF-8), 8 bytes at a time. A node with one
literal child keeps it inline, a node with more finds the child through a
hand-written table; either way a child is a (hash tag, index) slot, and the
level, hashed in the same pass that finds its end, is compared with the tag
before the child node is loaded (then length + memcmp): a cold walk is
bound by cache misses, not by hashing. Each node's hot half is one
64-byte line; the rest lives apart.

The result cache is a second hand-written table, keyed by a hash of the
topic's UTF-8 bytes: a topic decoded from the network is a new str each
time, and siphash plus dict upkeep would cost more than the walk itself.
Its occupancy is a bitmap of one bit per slot, small enough to stay in
L1/L2, so a topic not cached yet is usually turned away without a cache
miss into the table, and a reset (every add/remove) clears only the bitmap.
A cached result is a result id, not a list: the one node whose values
are the result (the common case), "no match", or a merged list.

Python objects stay owned by Python lists (`_values`, `_cache_keys`,
`_cache_merged`), so the garbage collector sees every reference, and
refcounts are handled by hand only when a result list is filled. A node's
value list is never changed once built (add/remove build a new one), so a
match that hits a single node shares that list (`match_shared`, for the
protocol: no allocation at all), and `match` builds its fresh one-value
list from the node's borrowed `value0` without touching the shared list.

Lone surrogates in a topic str have no UTF-8; such a topic is encoded with
"surrogatepass" for the walk, and since no valid filter contains those
bytes, a level with a surrogate matches only wildcards (as in the pure twin).
"""

cimport cython
from cpython.list cimport PyList_GET_ITEM, PyList_GetSlice
from cpython.ref cimport PyObject, Py_INCREF
from libc.stdint cimport UINT32_MAX, int32_t, int64_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free, malloc, qsort, realloc
from libc.string cimport memcmp, memcpy, memmove, memset

from cascade_fast._debug cimport CASCADE_FAST_DEBUG

from cascade_fast._topics_py import DEFAULT_CACHE_SIZE
from cascade_fast._topics_py import _MAX_CACHE_SIZE, _matching_filter


cdef extern from "Python.h":
    # Declared without an exception clause: a NULL return (lone surrogates)
    # is handled here, not propagated.
    const char *PyUnicode_AsUTF8AndSize(object unicode, Py_ssize_t *size)
    void PyErr_Clear()
    object PyList_New(Py_ssize_t size)
    void PyList_SET_ITEM_STEAL "PyList_SET_ITEM" (object lst, Py_ssize_t index, PyObject *item)
    Py_ssize_t PY_SSIZE_T_MAX
    bint PyUnicode_CheckExact(object o)


cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>

    #ifndef CF_SWAR  /* word-at-a-time scanning (needs ctz and little-endian loads) */
    #if defined(__GNUC__) && defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    #define CF_SWAR 1
    #else
    #define CF_SWAR 0
    #endif
    #endif

    /* Hashes are defined on the bytes alone -- 8-byte little-endian words,
       the last one zero-padded, then the length -- so every way of loading
       them (SWAR or byte by byte) gives the same value for a level of a
       filter and the same level of a topic. Nothing reads outside the
       buffer: `back` says how many bytes before `s` are readable. */
    static inline uint64_t cf_mix(uint64_t h, uint64_t w) {
        h ^= w;
        h *= 0xFF51AFD7ED558CCDULL;
        return h ^ (h >> 32);
    }

    static inline uint64_t cf_final(uint64_t h, size_t len) {
        h ^= (uint64_t)len;
        h ^= h >> 33;
        h *= 0xC4CEB9FE1A85EC53ULL;
        return h ^ (h >> 33);
    }

    /* The k (0..8) bytes at s as one little-endian word, zero-padded. With
       at least 8 - k readable bytes before s it is one (overlapping) load. */
    static inline uint64_t cf_load_short(const char *s, size_t k, size_t back) {
        uint64_t w = 0;
        size_t i;
        if (!k) return 0;
    #if CF_SWAR
        if (k == 8 || back + k >= 8) {
            memcpy(&w, s - (8 - k), 8);
            return k == 8 ? w : w >> (8 * (8 - k));
        }
    #endif
        for (i = 0; i < k; i++) w |= (uint64_t)(unsigned char)s[i] << (8 * i);
        return w;
    }

    #if CF_SWAR
    /* Nonzero where a byte of w is '/': the lowest set bit marks the first
       one (bits above it may be false hits, never bits below). */
    static inline uint64_t cf_slashes(uint64_t w) {
        uint64_t v = w ^ 0x2F2F2F2F2F2F2F2FULL;
        return (v - 0x0101010101010101ULL) & ~v & 0x8080808080808080ULL;
    }
    #endif

    /* One level of a topic or filter at s (n bytes left in the buffer):
       its length (bytes before the next '/', or n) into *len, and its hash. */
    static inline uint64_t cf_level(const char *s, size_t n, size_t back, size_t *len) {
        uint64_t h = 0x9E3779B97F4A7C15ULL;
        size_t i = 0, k;
    #if CF_SWAR
        uint64_t w, t;
        for (;;) {
            size_t rem = n - i < 8 ? n - i : 8;
            if (rem == 8) memcpy(&w, s + i, 8);
            else w = cf_load_short(s + i, rem, back + i);
            t = cf_slashes(w);
            if (t) {
                k = (size_t)__builtin_ctzll(t) >> 3;  /* < rem: padding bytes are not '/' */
                if (k) h = cf_mix(h, w & (~0ULL >> (64 - 8 * k)));
                *len = i + k;
                return cf_final(h, i + k);
            }
            if (rem) h = cf_mix(h, w);
            i += rem;
            if (rem < 8) {
                *len = n;
                return cf_final(h, n);
            }
        }
    #else
        (void)back;
        for (;;) {
            uint64_t w = 0;
            for (k = 0; k < 8 && i + k < n && s[i + k] != '/'; k++)
                w |= (uint64_t)(unsigned char)s[i + k] << (8 * k);
            if (k) h = cf_mix(h, w);
            if (k < 8) {
                *len = i + k;
                return cf_final(h, i + k);
            }
            i += 8;
        }
    #endif
    }

    /* Bytes before the next '/' (or n): cf_level without the hash, for
       nodes that have no table to look the level up in. */
    static inline size_t cf_span(const char *s, size_t n, size_t back) {
        size_t i = 0;
    #if CF_SWAR
        uint64_t w, t;
        while (n - i >= 8) {
            memcpy(&w, s + i, 8);
            t = cf_slashes(w);
            if (t) return i + ((size_t)__builtin_ctzll(t) >> 3);
            i += 8;
        }
        if (i == n) return n;
        w = cf_load_short(s + i, n - i, back + i);
        t = cf_slashes(w);
        return t ? i + ((size_t)__builtin_ctzll(t) >> 3) : n;
    #else
        (void)back;
        while (i < n && s[i] != '/') i++;
        return i;
    #endif
    }

    /* A 64-bit hash of a whole topic's bytes, for the result cache. */
    static inline uint64_t cf_hash(const char *s, size_t n) {
        /* Two independent lanes over alternate words: half the chain of
           dependent multiplies of one lane, on a hash every match pays. */
        uint64_t h = 0x243F6A8885A308D3ULL, g = 0x13198A2E03707344ULL;
        size_t i = 0;
        for (; n - i >= 16; i += 16) {
            uint64_t w, v;
            memcpy(&w, s + i, 8);
            memcpy(&v, s + i + 8, 8);
            h = cf_mix(h, w);
            g = cf_mix(g, v);
        }
        if (n - i >= 8) {
            uint64_t w;
            memcpy(&w, s + i, 8);
            h = cf_mix(h, w);
            i += 8;
        }
        if (n - i) g = cf_mix(g, cf_load_short(s + i, n - i, i));
        return cf_final(h ^ (g * 0x9E3779B97F4A7C15ULL), n);
    }
    """
    uint64_t cf_level(const char *s, size_t n, size_t back, size_t *len) nogil
    size_t cf_span(const char *s, size_t n, size_t back) nogil
    uint64_t cf_hash(const char *s, size_t n) nogil


cdef enum:
    INLINE_STACK = 64     # walk stack entries before it moves to the heap
    INLINE_FOUND = 32     # matched nodes before the list moves to the heap
    INLINE_PAIRS = 64     # (seq, value) pairs merged on the C stack


cdef enum:
    # Result ids (besides node indexes >= 0) -- see _CacheEntry.
    _NO_MATCH = -1
    _MERGED = -2        # the result is the list left in TopicTrie._merged_result
    _LOOKUP_ERROR = -3  # an exception is set
    _TRIE_CHANGED = -4  # a finalizer changed the trie during a walk: walk again


ctypedef struct _Step:
    int32_t node          # node reached
    Py_ssize_t start      # byte offset of the next topic level, -1 when every level is consumed

ctypedef struct _Pair:
    int64_t seq
    PyObject *value       # borrowed from a node's value list


cdef inline const char *_key(const _Node *node) noexcept nogil:
    if node.keylen <= _INLINE_KEY:
        return node.key.bytes_
    return node.key.heap


cdef inline int32_t _child(const _Node *nodes, const _Node *parent, const char *s, uint32_t n,
                           uint64_t h) noexcept nogil:
    """The literal child of `parent` whose level is the `n` bytes at `s`, or -1.

    `h` is cf_level's hash of the level. Its top half is checked against
    the slot's tag before the child node is read, inline slots included:
    hashing a level costs a few nanoseconds, loading a child that does not
    match costs a cache miss (with a cold cache, the common case under a
    node whose one literal child is not the topic's level).
    """
    cdef uint32_t tag = <uint32_t>(h >> 32)
    cdef uint32_t j
    cdef int32_t c
    cdef const _Node *node
    cdef const _Slot *slots
    if parent.table_mask == 0:
        if parent.kids_len == 0 or parent.kids.one.tag != tag:
            return -1  # rejected without loading the child (likely a cache miss)
        c = parent.kids.one.index
        node = &nodes[c]
        if node.keylen == n and memcmp(_key(node), s, n) == 0:
            return c
        return -1
    slots = parent.kids.table
    j = <uint32_t>h & parent.table_mask
    while True:
        c = slots[j].index
        if c < 0:
            return -1
        if slots[j].tag == tag:
            node = &nodes[c]
            if node.keylen == n and memcmp(_key(node), s, n) == 0:
                return c
        j = (j + 1) & parent.table_mask


cdef int _set_slots(TopicTrie trie, int32_t index, int32_t skip, uint32_t room) except -1:
    """Re-lay node `index`'s literal children without child `skip`, with room for `room` more.

    Inline while there is at most one, else a table at most half full.
    """
    cdef _Node *parent = &trie._nodes[index]
    cdef _Slot inline_copy
    cdef const _Slot *old
    cdef _Slot *old_table = NULL
    cdef uint32_t old_len, count = 0, size = 16, k, j, mask
    cdef _Slot *table = NULL
    if parent.table_mask == 0:
        inline_copy = parent.kids.one
        old = &inline_copy
        old_len = parent.kids_len
    else:
        old_table = parent.kids.table
        old = old_table
        old_len = parent.table_mask + 1
    for k in range(old_len):
        if old[k].index >= 0 and old[k].index != skip:
            count += 1
    if count + room > 1:
        while size < (count + room) * 2:
            size <<= 1
        table = <_Slot *>malloc(size * sizeof(_Slot))
        if table == NULL:
            raise MemoryError()
        for j in range(size):
            table[j].index = -1
            table[j].tag = 0
    mask = size - 1
    count = 0
    for k in range(old_len):
        if old[k].index < 0 or old[k].index == skip:
            continue
        if table == NULL:
            parent.kids.one = old[k]  # count == 0 here: at most one is kept inline
        else:
            j = <uint32_t>trie._cold[old[k].index].khash & mask
            while table[j].index >= 0:
                j = (j + 1) & mask
            table[j] = old[k]
        count += 1
    free(old_table)  # `old` is not read after this
    if table != NULL:
        parent.kids.table = table
    elif count == 0:
        parent.kids.one.index = -1
        parent.kids.one.tag = 0
    parent.table_mask = mask if table != NULL else 0
    parent.kids_len = count
    return 0


cdef int _attach(TopicTrie trie, int32_t parent_index, int32_t child_index) except -1:
    """Register literal node `child_index` (key and khash set) as a child of `parent_index`."""
    cdef _Node *parent = &trie._nodes[parent_index]
    cdef uint64_t h = trie._cold[child_index].khash
    cdef uint32_t j
    if parent.table_mask == 0 and parent.kids_len == 0:
        parent.kids.one.tag = <uint32_t>(h >> 32)
        parent.kids.one.index = child_index
        parent.kids_len = 1
        return 0
    if parent.table_mask == 0 or (parent.kids_len + 1) * 2 > parent.table_mask + 1:
        _set_slots(trie, parent_index, -1, 1)  # into a (bigger) table first
    j = <uint32_t>h & parent.table_mask
    while parent.kids.table[j].index >= 0:
        j = (j + 1) & parent.table_mask
    parent.kids.table[j].tag = <uint32_t>(h >> 32)
    parent.kids.table[j].index = child_index
    parent.kids_len += 1
    return 0


cdef int _detach(TopicTrie trie, int32_t child_index) except -1:
    """Unlink node `child_index` from its parent (literal, '+' or '#')."""
    cdef int32_t parent_index = trie._cold[child_index].parent
    cdef _Node *parent = &trie._nodes[parent_index]
    if parent.plus == child_index:
        parent.plus = -1
    elif parent.hash == child_index:
        parent.hash = -1
    else:
        # Linear probing cannot just blank a slot, and removals are rare: re-lay.
        _set_slots(trie, parent_index, child_index, 0)
    return 0


cdef void _init_node(TopicTrie trie, int32_t index, int32_t parent) noexcept nogil:
    memset(&trie._nodes[index], 0, sizeof(_Node))
    memset(&trie._cold[index], 0, sizeof(_NodeCold))
    trie._nodes[index].plus = -1
    trie._nodes[index].hash = -1
    trie._nodes[index].kids.one.index = -1
    trie._cold[index].parent = parent
    trie._cold[index].used = True


cdef void _release_node(TopicTrie trie, int32_t index) noexcept nogil:
    """Free a node's own allocations (not its children's) and mark it unused."""
    cdef _Node *node = &trie._nodes[index]
    if node.keylen > _INLINE_KEY:
        free(node.key.heap)
    if node.table_mask:
        free(node.kids.table)
    free(trie._cold[index].seqs)
    memset(node, 0, sizeof(_Node))
    trie._cold[index].seqs = NULL
    trie._cold[index].used = False


cdef int _grow_nodes(TopicTrie trie, int32_t capacity) except -1:
    """Move the node arrays to room for `capacity` nodes (the hot one 64-byte aligned)."""
    cdef void *block = malloc(<size_t>capacity * sizeof(_Node) + 63)
    cdef _NodeCold *cold
    cdef _Node *nodes
    if block == NULL:
        raise MemoryError()
    cold = <_NodeCold *>realloc(trie._cold, <size_t>capacity * sizeof(_NodeCold))
    if cold == NULL:
        free(block)
        raise MemoryError()
    trie._cold = cold
    nodes = <_Node *>((<uintptr_t>block + 63) & ~(<uintptr_t>63))
    if trie._nodes != NULL:
        memcpy(nodes, trie._nodes, <size_t>trie._nnodes * sizeof(_Node))
    free(trie._nodes_block)
    trie._nodes_block = block
    trie._nodes = nodes
    trie._capacity = capacity
    return 0


cdef int32_t _new_node(TopicTrie trie, int32_t parent, const char *key, size_t keylen, uint64_t khash) except -1:
    """A fresh node under `parent`, holding a copy of `key` when `key` is not NULL. May move trie._nodes."""
    cdef int32_t index
    cdef _Node *node
    cdef char *copy = NULL
    if keylen > _INLINE_KEY:
        copy = <char *>malloc(keylen)
        if copy == NULL:
            raise MemoryError()
        memcpy(copy, key, keylen)
    try:
        if trie._free >= 0:
            index = trie._free
            trie._free = trie._cold[index].parent
        else:
            if trie._nnodes == trie._capacity:
                if trie._capacity >= 0x20000000:
                    raise MemoryError("TopicTrie has too many nodes")
                _grow_nodes(trie, trie._capacity * 2)
            trie._values.append(None)  # this node's slot in _values
            index = trie._nnodes
            trie._nnodes += 1
    except BaseException:
        free(copy)
        raise
    _init_node(trie, index, parent)
    node = &trie._nodes[index]
    if key != NULL:
        node.keylen = <uint32_t>keylen
        trie._cold[index].khash = khash
        if copy != NULL:
            node.key.heap = copy
        else:
            memcpy(node.key.bytes_, key, keylen)
    return index


cdef int32_t _find_or_create(TopicTrie trie, const char *pattern, size_t size, bint create) except -2:
    """The node a (validated, share-stripped) filter ends at; -1 if absent and not `create`."""
    cdef int32_t index = 0
    cdef int32_t child
    cdef size_t start = 0
    cdef size_t length
    cdef uint64_t h
    while True:
        h = cf_level(pattern + start, size - start, start, &length)
        if length == 1 and pattern[start] == b'+':
            child = trie._nodes[index].plus
            if child < 0 and create:
                child = _new_node(trie, index, NULL, 0, 0)
                trie._nodes[index].plus = child
        elif length == 1 and pattern[start] == b'#':
            child = trie._nodes[index].hash
            if child < 0 and create:
                child = _new_node(trie, index, NULL, 0, 0)
                trie._nodes[index].hash = child
        else:
            child = _child(trie._nodes, &trie._nodes[index], pattern + start, <uint32_t>length, h)
            if child < 0 and create:
                child = _new_node(trie, index, pattern + start, length, h)
                _attach(trie, index, child)
        if child < 0:
            return -1
        index = child
        start += length
        if start == size:
            return index
        start += 1  # the '/'


cdef int _cmp_pairs(const void *a, const void *b) noexcept nogil:
    cdef int64_t x = (<const _Pair *>a).seq
    cdef int64_t y = (<const _Pair *>b).seq
    return (x > y) - (x < y)


cdef class TopicTrie:
    """Maps MQTT topic filters to values; `match(topic)` returns every value whose filter matches.

    Compiled twin of `cascade_fast._topics_py.TopicTrie`: same constructor,
    methods, errors and results (see that module for the semantics). Results
    are cached per topic, up to `cache_size` topics (0 disables the cache),
    cleared when full and on every add/remove/clear. Clearing keeps the
    cache's C arrays (about 32 bytes per cached topic at their largest,
    2 MiB at the default size) for the next fill: a subscription change
    then costs wiping a bitmap of one bit per slot (16 KiB at the default
    size), not a regrowth. The Cython protocol calls `match_shared`, which
    returns the cached list itself.
    """

    def __cinit__(self, *args, **kwargs):
        self._nodes = NULL
        self._cold = NULL
        self._nodes_block = NULL
        self._nnodes = 0
        _grow_nodes(self, 16)
        self._nnodes = 1
        self._free = -1
        _init_node(self, 0, -1)
        self._values = [None]
        self._cache_keys = []
        self._cache_merged = []
        self._cache_entries = NULL
        self._cache_capacity = 0
        self._cache_len = 0
        self._cache_table = NULL
        self._cache_used = NULL
        self._cache_mask = 0
        self._merged_result = None
        self._empty = []
        self._cache_size = DEFAULT_CACHE_SIZE

    def __init__(self, cache_size=DEFAULT_CACHE_SIZE):
        if not isinstance(cache_size, int) or not 0 <= cache_size <= _MAX_CACHE_SIZE:
            raise ValueError(f"cache_size must be an int from 0 to 2**30, not {cache_size!r}")
        self._cache_size = cache_size
        if self._nnodes > 1 or self._cache_keys:
            # Called again on a used trie (nodes, or only cached lookups):
            # start empty, cache included, as the pure twin does.
            self.clear()

    def __dealloc__(self):
        cdef int32_t i
        if self._nodes != NULL:
            for i in range(self._nnodes):
                if self._cold[i].used:
                    _release_node(self, i)
        free(self._nodes_block)
        free(self._cold)
        self._nodes_block = NULL
        self._nodes = NULL
        self._cold = NULL
        free(self._cache_table)
        free(self._cache_used)
        free(self._cache_entries)
        self._cache_table = NULL
        self._cache_used = NULL
        self._cache_entries = NULL

    def __len__(self):
        """The number of ``(filter, value)`` pairs."""
        return self._count

    def __repr__(self):
        return f"<{type(self).__module__}.{type(self).__name__} pairs={self._count} cached={self._cache_len}>"

    @property
    def cache_size(self) -> int:
        """The most topics whose results are cached (0: no cache)."""
        return self._cache_size

    @property
    def cached_topics(self) -> int:
        """How many topics have a cached result right now (for tests and stats).

        The compiled twin does not cache topics with lone surrogates (never
        received from a broker), so only there may the twins' counts differ.
        """
        return self._cache_len

    def __reduce__(self):
        # Nodes are C memory; the pure twin refuses too, so both behave alike.
        raise TypeError(f"cannot pickle {type(self).__name__!r} object")

    def add(self, topic_filter, value):
        """Add the pair ``(topic_filter, value)``; adding the same pair twice stores it twice.

        Raises `ValueError` for an invalid filter (see `validate_filter`). A
        ``$share/{group}/{filter}`` pair is stored under ``{filter}``.
        """
        cdef bytes pattern = (<str>_matching_filter(topic_filter)).encode("utf-8")
        cdef int32_t index
        cdef _Node *node
        cdef _NodeCold *cold
        cdef uint32_t cap
        cdef int64_t *seqs
        cdef uint64_t generation
        while True:
            index = _find_or_create(self, pattern, len(pattern), True)
            generation = self._generation
            # A new list, never an append: the old one may be a cached result or
            # be held by a match_shared caller. Allocating it may run the cyclic
            # GC, and so finalizers that change the trie (moving or freeing
            # nodes): take node pointers only after, and start over if it did.
            old = self._values[index]
            new = [value] if old is None else (<list>old) + [value]
            if self._generation == generation:
                break
        node = &self._nodes[index]
        cold = &self._cold[index]
        if node.nvalues == UINT32_MAX:
            raise OverflowError("too many values under one topic filter")
        if node.nvalues == cold.seqs_cap:
            cap = cold.seqs_cap * 2 if cold.seqs_cap else 1
            seqs = <int64_t *>realloc(cold.seqs, <size_t>cap * sizeof(int64_t))
            if seqs == NULL:
                raise MemoryError()
            cold.seqs = seqs
            cold.seqs_cap = cap
        self._values[index] = new
        node.values = <PyObject *>new  # _values owns it
        node.value0 = PyList_GET_ITEM(new, 0)
        self._seq += 1
        cold.seqs[node.nvalues] = self._seq
        node.nvalues += 1
        self._count += 1
        self._generation += 1
        _invalidate(self)

    def remove(self, topic_filter, value):
        """Remove one ``(topic_filter, value)`` pair, the earliest added; return whether one was there.

        Values compare with ``==`` (identity first). The filter is validated
        as in `add`, and ``$share/{group}/{filter}`` names the pairs stored
        under ``{filter}``.
        """
        cdef bytes pattern = (<str>_matching_filter(topic_filter)).encode("utf-8")
        cdef int32_t index = _find_or_create(self, pattern, len(pattern), False)
        cdef uint64_t generation = self._generation
        cdef Py_ssize_t position = 0
        cdef int32_t parent
        cdef _Node *node
        cdef int64_t *seqs
        if index < 0 or self._values[index] is None:
            return False
        values = self._values[index]
        for candidate in <list>values:
            if candidate is value or candidate == value:
                break
            position += 1
        else:
            return False
        if self._generation != generation:
            # `==` ran user code that changed the trie: `index` may be stale.
            raise RuntimeError("TopicTrie changed during remove() (by a value's __eq__)")
        # Built before the node is touched: allocating may run the cyclic GC,
        # whose finalizers may change the trie (then `index` may be stale).
        new = (<list>values)[:position] + (<list>values)[position + 1:] if len(<list>values) > 1 else None
        if self._generation != generation:
            raise RuntimeError("TopicTrie changed during remove() (by a finalizer)")
        node = &self._nodes[index]
        node.nvalues -= 1
        seqs = self._cold[index].seqs
        memmove(&seqs[position], &seqs[position + 1], <size_t>(node.nvalues - position) * sizeof(int64_t))
        # `values` and `candidate` stay referenced until we return, so no
        # finalizer runs while the structure is half updated.
        self._values[index] = new
        node.values = <PyObject *>new if new is not None else NULL  # _values owns it
        node.value0 = PyList_GET_ITEM(new, 0) if new is not None else NULL
        self._count -= 1
        self._generation += 1
        # Forgotten before any node is released: pruning may raise MemoryError
        # (re-laying a parent's table), and no cached result id may outlive
        # the node it names. C only, so no finalizer runs in between.
        _cache_forget(self)
        while index != 0:
            node = &self._nodes[index]
            if node.nvalues or node.kids_len or node.plus >= 0 or node.hash >= 0:
                break
            parent = self._cold[index].parent
            _detach(self, index)
            _release_node(self, index)
            self._cold[index].parent = self._free
            self._free = index
            index = parent
        _invalidate(self)
        return True

    def clear(self):
        """Remove every pair (and the cache)."""
        cdef int32_t i
        # Allocated first: allocating may run finalizers (cyclic GC) that use
        # the trie, which must not see nodes released but _values still long.
        fresh = [None]
        for i in range(self._nnodes):
            if self._cold[i].used:
                _release_node(self, i)
        self._nnodes = 1
        self._free = -1
        _init_node(self, 0, -1)
        self._count = 0
        self._generation += 1
        old_values = self._values
        self._values = fresh
        _invalidate(self)
        del old_values  # finalizers of the old values run now, on a consistent trie

    @cython.always_allow_keywords(False)
    def match(self, topic, /):
        """The values of every filter matching `topic`, in the order their pairs were added.

        A new list on each call: the caller may keep or change it. The topic
        is not validated (see `cascade_fast._topics_py`).
        """
        cdef int32_t result_id
        cdef uint64_t generation
        cdef PyObject *value
        if not PyUnicode_CheckExact(topic):
            if not isinstance(topic, str):
                raise TypeError(f"topic must be str, not {type(topic).__name__}")
            # A str subclass may override __eq__/__hash__ or run code when
            # the cache drops it; match its exact-str copy (as the pure twin).
            topic = str.__str__(topic)
        while True:
            result_id = _lookup(self, topic)
            if result_id == _MERGED:
                return PyList_GetSlice(_take_merged(self), 0, PY_SSIZE_T_MAX)
            if result_id == _NO_MATCH:
                return []
            if self._nodes[result_id].nvalues != 1:
                shared = <list>self._nodes[result_id].values  # a strong reference while it is copied
                return PyList_GetSlice(shared, 0, PY_SSIZE_T_MAX)
            # The common case, one value: built from the node's own cache line.
            # Allocating may run the cyclic GC, whose finalizers may change
            # the trie: read the value only after, and look up again if it did.
            generation = self._generation
            result = PyList_New(1)
            if self._generation != generation:
                continue
            value = self._nodes[result_id].value0
            Py_INCREF(<object>value)
            PyList_SET_ITEM_STEAL(result, 0, value)
            return result

    cdef list match_shared(self, str topic):
        cdef int32_t result_id
        if topic is None:  # a typed str is exact or None
            raise TypeError("topic must be str, not NoneType")
        result_id = _lookup(self, topic)
        if result_id >= 0:
            # One node's list: in add() order and never changed once built.
            return <list>self._nodes[result_id].values
        if result_id == _NO_MATCH:
            return self._empty
        return _take_merged(self)


cdef inline list _take_merged(TopicTrie self):
    """The merged result _lookup left in self._merged_result, which goes back to None."""
    merged = <list>self._merged_result
    self._merged_result = None
    return merged


cdef inline bint _used(const uint64_t *bitmap, uint32_t j) noexcept nogil:
    return (bitmap[j >> 6] >> (j & 63)) & 1


cdef int32_t _lookup(TopicTrie self, str topic) except _LOOKUP_ERROR:
    """The result id for `topic` (see _CacheEntry): from the cache, else from a walk that is then cached.

    For _MERGED the list is in self._merged_result, set as the very last step
    so that nothing (no allocation, no finalizer) runs before the caller
    takes it.
    """
    # The cache is keyed by the topic's UTF-8 bytes under cf_hash rather
    # than a dict keyed by str: a topic decoded from the network is a new
    # str each time, and siphash plus dict upkeep cost more than the walk.
    cdef Py_ssize_t size
    cdef const char *data = PyUnicode_AsUTF8AndSize(topic, &size)
    cdef uint32_t tag, j
    cdef const _CacheEntry *entry
    cdef const char *key_data
    cdef Py_ssize_t key_size
    cdef int32_t result_id
    cdef uint64_t generation
    if data == NULL:
        # Lone surrogates: no UTF-8 exists. Their "surrogatepass" bytes
        # occur in no valid filter, so such a level matches only
        # wildcards, as in the pure twin. Not cached (never from a broker).
        PyErr_Clear()
        encoded = topic.encode("utf-8", "surrogatepass")
        return _walk_stable(self, <bytes>encoded, len(<bytes>encoded))
    if self._cache_size == 0:
        return _walk_stable(self, data, size)
    tag = <uint32_t>(cf_hash(data, <size_t>size) >> 32)
    while True:
        # Drop a previous round's result before anything else: it may hold
        # the last references to values a finalizer removed, whose __del__ may
        # use the trie -- not while a new merged result waits in _merged_result.
        merged = None
        if self._cache_table != NULL:
            j = tag & self._cache_mask
            while _used(self._cache_used, j):
                if self._cache_table[j].tag == tag:
                    entry = &self._cache_entries[self._cache_table[j].entry]
                    if entry.key == <PyObject *>topic:
                        return _cached_result(self, entry.result)
                    # A cached key has UTF-8 already (it was asked for at insert): cannot fail.
                    key_data = PyUnicode_AsUTF8AndSize(<object>entry.key, &key_size)
                    if key_size == size and memcmp(key_data, data, <size_t>size) == 0:
                        return _cached_result(self, entry.result)
                j = (j + 1) & self._cache_mask
        generation = self._generation
        result_id = _walk_stable(self, data, size)
        if result_id == _MERGED:
            merged = self._merged_result
            self._merged_result = None
        _cache_insert(self, topic, tag, result_id, merged, generation)
        if self._generation == generation:
            break
        # A finalizer (the GC, run by an allocation in the walk or in the reset
        # of a full cache) changed the trie: `result_id` may name a node it
        # released, or a merged list of values it removed. Look up again.
    if result_id == _MERGED:
        self._merged_result = merged
    return result_id


cdef inline int32_t _cached_result(TopicTrie self, int32_t result_id) noexcept:
    """A cached result id as _lookup returns it: a merged list goes to self._merged_result."""
    if result_id <= _MERGED:
        self._merged_result = <object>PyList_GET_ITEM(self._cache_merged, _MERGED - result_id)
        return _MERGED
    return result_id


cdef int _cache_insert(TopicTrie self, str topic, uint32_t tag, int32_t result_id, object merged,
                       uint64_t generation) except -1:
    """Remember `result_id` (with the list `merged` for _MERGED) for `topic`, resetting the cache when it is full.

    `generation` is the trie's before the walk: nothing is cached if a
    finalizer (run by the GC during the walk or the reset) changed it since.
    """
    cdef Py_ssize_t entry
    cdef uint32_t j
    if self._cache_len >= self._cache_size:
        # Full: start over. Every cached value is still in the trie, so
        # dropping the old lists runs no finalizer.
        _cache_reset(self)
    entry = self._cache_len  # 0 after a reset, unless a finalizer matched meanwhile
    if self._generation != generation or entry >= self._cache_size:
        return 0
    # Room first (C memory only: nothing below runs Python code or the GC).
    if self._cache_table == NULL or <size_t>(entry + 1) * 2 > <size_t>self._cache_mask + 1:
        _cache_grow_table(self)
    if entry == self._cache_capacity:
        _cache_grow_entries(self)
    if result_id == _MERGED:
        self._cache_merged.append(merged)
        result_id = _MERGED - <int32_t>(len(self._cache_merged) - 1)
    self._cache_keys.append(topic)
    self._cache_entries[entry].key = <PyObject *>topic
    self._cache_entries[entry].result = result_id
    j = tag & self._cache_mask
    while _used(self._cache_used, j):
        j = (j + 1) & self._cache_mask
    self._cache_used[j >> 6] |= (<uint64_t>1) << (j & 63)
    self._cache_table[j].tag = tag
    self._cache_table[j].entry = <uint32_t>entry
    self._cache_len = entry + 1
    return 0


cdef int _cache_grow_table(TopicTrie self) except -1:
    """Start the table (64 slots) or double it, re-placing the used slots by their stored tags."""
    cdef uint32_t old_size = self._cache_mask + 1 if self._cache_table != NULL else 0
    cdef uint32_t size = old_size * 2 if old_size else 64
    cdef uint32_t k, j
    cdef _CacheSlot *table = <_CacheSlot *>malloc(<size_t>size * sizeof(_CacheSlot))
    cdef uint64_t *used = <uint64_t *>calloc(size // 64, sizeof(uint64_t))
    if table == NULL or used == NULL:
        free(table)
        free(used)
        raise MemoryError()
    for k in range(old_size):
        if _used(self._cache_used, k):
            j = self._cache_table[k].tag & (size - 1)
            while _used(used, j):
                j = (j + 1) & (size - 1)
            used[j >> 6] |= (<uint64_t>1) << (j & 63)
            table[j] = self._cache_table[k]
    free(self._cache_table)
    free(self._cache_used)
    self._cache_table = table
    self._cache_used = used
    self._cache_mask = size - 1
    return 0


cdef int _cache_grow_entries(TopicTrie self) except -1:
    """Double the entry array (from 64), never past cache_size."""
    cdef Py_ssize_t capacity = self._cache_capacity * 2 if self._cache_capacity else 64
    cdef _CacheEntry *entries
    if capacity > self._cache_size:
        capacity = self._cache_size
    entries = <_CacheEntry *>realloc(self._cache_entries, <size_t>capacity * sizeof(_CacheEntry))
    if entries == NULL:
        raise MemoryError()
    self._cache_entries = entries
    self._cache_capacity = capacity
    return 0


cdef int _cache_reset(TopicTrie self) except -1:
    """Empty the cache: the bitmap is cleared, the table and entry array are kept for reuse.

    The old key and merged lists are let go only once the cache is
    consistent and empty, so a finalizer they trigger may use the trie.
    """
    # Emptied before anything is allocated: on add/remove/clear the trie has
    # already changed, and a cached result id may name a node just released.
    # Allocating the new lists may run the cyclic GC, and a finalizer that
    # matches must miss (not read a stale entry); it may cache topics in the
    # old lists, which stay current (entries and lists in step) until the
    # swap, and whose entries are dropped again just before it.
    _cache_forget(self)
    keys = []
    merged = []
    _cache_forget(self)
    old_keys, old_merged = self._cache_keys, self._cache_merged
    self._cache_keys = keys
    self._cache_merged = merged
    del old_keys, old_merged
    return 0


cdef inline void _cache_forget(TopicTrie self) noexcept:
    """Mark every cache entry unused (C memory only: runs no Python code)."""
    if self._cache_used != NULL:
        memset(self._cache_used, 0, <size_t>(self._cache_mask + 1) // 8)
    self._cache_len = 0


cdef int _invalidate(TopicTrie self) except -1:
    """Drop every cached result (after an add/remove/clear)."""
    if self._cache_keys:  # every entry has its key there, even after a _cache_forget
        _cache_reset(self)
    return 0


cdef int32_t _walk_stable(TopicTrie self, const char *data, Py_ssize_t size) except _LOOKUP_ERROR:
    """`_walk`, again until no finalizer changed the trie while it collected the result."""
    cdef int32_t result_id
    while True:
        result_id = _walk(self, data, size)
        if result_id != _TRIE_CHANGED:
            return result_id


cdef int32_t _walk(TopicTrie self, const char *data, Py_ssize_t size) except _LOOKUP_ERROR:
    """Match the topic whose UTF-8 bytes are `data`: the result id (see `_collect`)."""
    cdef const _Node *nodes = self._nodes
    cdef const _Node *node
    cdef _Step inline_stack[INLINE_STACK]
    cdef _Step *stack = inline_stack
    cdef _Step *grown
    cdef Py_ssize_t depth
    cdef Py_ssize_t stack_cap = INLINE_STACK
    cdef int32_t inline_found[INLINE_FOUND]
    cdef int32_t *found = inline_found
    cdef int32_t *found_grown
    cdef Py_ssize_t nfound = 0
    cdef Py_ssize_t found_cap = INLINE_FOUND
    cdef int32_t index, child
    cdef Py_ssize_t start, following
    cdef size_t length
    cdef uint64_t h = 0  # set by cf_level whenever _child reads it (node.kids_len != 0)
    cdef bint wild
    # MQTT 3.1.1 §4.7.2: wildcards at the first level skip "$" topics.
    cdef bint dollar = size > 0 and data[0] == b'$'
    stack[0].node = 0
    stack[0].start = 0
    depth = 1
    try:
        while depth:
            depth -= 1
            index = stack[depth].node
            start = stack[depth].start
            node = &nodes[index]
            wild = not (dollar and index == 0)
            # Room for what this step may add: 2 stack entries, 2 found nodes.
            if depth + 2 > stack_cap:
                grown = <_Step *>malloc(<size_t>stack_cap * 2 * sizeof(_Step))
                if grown == NULL:
                    raise MemoryError()
                memcpy(grown, stack, <size_t>depth * sizeof(_Step))
                if stack != inline_stack:
                    free(stack)
                stack = grown
                stack_cap *= 2
            if nfound + 2 > found_cap:
                found_grown = <int32_t *>malloc(<size_t>found_cap * 2 * sizeof(int32_t))
                if found_grown == NULL:
                    raise MemoryError()
                memcpy(found_grown, found, <size_t>nfound * sizeof(int32_t))
                if found != inline_found:
                    free(found)
                found = found_grown
                found_cap *= 2
            if wild and node.hash >= 0 and nodes[node.hash].nvalues:
                found[nfound] = node.hash  # "#" matches the rest, or nothing more (§4.7.1.2)
                nfound += 1
            if start < 0:
                if node.nvalues:
                    found[nfound] = index
                    nfound += 1
                continue
            if node.kids_len:
                h = cf_level(data + start, <size_t>(size - start), <size_t>start, &length)
            elif wild and node.plus >= 0:
                length = cf_span(data + start, <size_t>(size - start), <size_t>start)  # no literal child: no hash
            else:
                continue  # nothing below this node can match
            following = start + <Py_ssize_t>length + 1
            if following > size:
                following = -1  # that was the last level
            if wild and node.plus >= 0:
                stack[depth].node = node.plus
                stack[depth].start = following
                depth += 1
            if node.kids_len and length <= UINT32_MAX:
                child = _child(nodes, node, data + start, <uint32_t>length, h)
                if child >= 0:
                    stack[depth].node = child
                    stack[depth].start = following
                    depth += 1
        return _collect(self, found, nfound)
    finally:
        if stack != inline_stack:
            free(stack)
        if found != inline_found:
            free(found)


cdef int32_t _collect(TopicTrie self, const int32_t *found, Py_ssize_t nfound) except _LOOKUP_ERROR:
    """The result id of the matched nodes: _NO_MATCH, the one node, or _MERGED.

    For _MERGED, their values merged into add() order are left in
    self._merged_result; _TRIE_CHANGED if a finalizer changed the trie meanwhile.
    """
    cdef Py_ssize_t total = 0
    cdef Py_ssize_t i, j, k
    cdef const _Node *node
    cdef _Pair inline_pairs[INLINE_PAIRS]
    cdef _Pair *pairs = inline_pairs
    cdef _Pair pair
    cdef PyObject *values
    if nfound == 0:
        return _NO_MATCH
    if nfound == 1:
        # One node: its list is in add() order and never changes; share it.
        return found[0]
    cdef uint64_t generation = self._generation
    for i in range(nfound):
        total += self._nodes[found[i]].nvalues
    # Allocated before any value pointer is read: PyList_New may run the
    # cyclic GC, whose finalizers may change the trie (freeing the values,
    # moving the nodes). The caller walks again.
    result = PyList_New(total)
    if self._generation != generation:
        return _TRIE_CHANGED
    if total > INLINE_PAIRS:
        pairs = <_Pair *>malloc(<size_t>total * sizeof(_Pair))
        if pairs == NULL:
            raise MemoryError()
    try:
        k = 0
        for i in range(nfound):
            node = &self._nodes[found[i]]
            values = node.values
            if CASCADE_FAST_DEBUG:
                assert len(<list>values) == node.nvalues, "node value count out of step with its list"
            for j in range(node.nvalues):
                pairs[k].seq = self._cold[found[i]].seqs[j]
                pairs[k].value = PyList_GET_ITEM(<object>values, j)
                k += 1
        if total <= 16:
            for i in range(1, total):  # insertion sort: a handful of pairs
                pair = pairs[i]
                j = i - 1
                while j >= 0 and pairs[j].seq > pair.seq:
                    pairs[j + 1] = pairs[j]
                    j -= 1
                pairs[j + 1] = pair
        else:
            qsort(pairs, <size_t>total, sizeof(_Pair), _cmp_pairs)
        for i in range(total):
            Py_INCREF(<object>pairs[i].value)
            PyList_SET_ITEM_STEAL(result, i, pairs[i].value)
        self._merged_result = result  # None before: dropping it runs nothing
        return _MERGED
    finally:
        if pairs != inline_pairs:
            free(pairs)
