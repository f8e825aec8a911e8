# Compiled topic trie. Contract used by cascade_fast/_protocol.pyx:
# the fields are the trie's own business; the protocol only calls match_shared.
from cpython.ref cimport PyObject
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t


cdef enum:
    _INLINE_KEY = 16        # level keys up to this many bytes live inside the node
    _INLINE_SLOTS = 1       # literal children held inside the node before it gets a table


# A child reference: the child's index plus the top 32 bits of its level
# hash, so a probe rejects most non-matching children without touching them.
ctypedef struct _Slot:
    uint32_t tag            # level hash >> 32
    int32_t index           # child node index, -1 for an empty table slot


ctypedef union _Key:
    char bytes_[_INLINE_KEY]  # the level's UTF-8 bytes when keylen <= _INLINE_KEY
    char *heap              # a malloc'd copy when longer


# One filter level, the part every match reads: 64 bytes, one cache line
# (72 on a 32-bit build, where it just takes a little more memory).
# Nodes live in one array (TopicTrie._nodes) and refer to each other by
# index, so growing the array moves no pointer anyone holds and freeing the
# trie needs no recursion. No Python object is stored here: a node's values
# are the list TopicTrie._values[index].
ctypedef struct _Node:
    uint32_t keylen         # length of the level in bytes (literal nodes)
    int32_t plus            # index of the '+' child, -1 if none
    int32_t hash            # index of the '#' child, -1 if none
    uint32_t kids_len       # literal children
    uint32_t table_mask     # 0: the kids are inline_slots[:kids_len]; else slots is a table of table_mask + 1
    uint32_t nvalues        # values ending here (== len(TopicTrie._values[index]))
    _Slot *slots            # open-addressing table of the literal children (-1 = empty), NULL while inline
    _Key key                # the level's bytes (see _Key)
    _Slot inline_slots[_INLINE_SLOTS]  # the literal children while there are at most _INLINE_SLOTS
    PyObject *values        # borrowed TopicTrie._values[index] (which owns it), NULL when nvalues == 0


# The rest of a node, read only by add/remove and when merging several
# nodes' values: kept apart so the walk touches fewer cache lines.
ctypedef struct _NodeCold:
    uint64_t khash          # full level hash, for rebuilding the parent's table
    int64_t *seqs           # add() sequence number of each value, in list order
    uint32_t seqs_cap       # allocated length of seqs
    int32_t parent          # parent index, -1 for the root; next free index while on the free list
    bint used               # False while on the free list


# A result-cache slot (8 bytes, so a 65536-topic cache's table is 1 MiB).
ctypedef struct _CacheSlot:
    uint32_t tag            # high half of cf_hash of the topic's UTF-8 bytes; also picks the slot
    uint32_t entry          # 1 + index into TopicTrie._cache_keys/_cache_results; 0 = empty slot


cdef class TopicTrie:
    cdef:
        list _cache_keys     # cache entry -> topic str (append-only until the cache is reset)
        list _cache_results  # cache entry -> result list (shared, never mutated by anyone)
        _CacheSlot *_cache_table  # open addressing over the entries, NULL while the cache is empty
        uint32_t _cache_mask # table size - 1 (0 while the table is NULL)
        Py_ssize_t _cache_size   # most topics cached before a reset; 0 disables caching
        list _empty          # the one shared result for topics matching nothing
        list _values         # node index -> list of the values ending there (never mutated: replaced), or None
        _Node *_nodes        # every node (64-byte aligned inside _nodes_block); index 0 is the root
        _NodeCold *_cold     # the rest of each node, same indices
        void *_nodes_block   # the allocation _nodes points into
        int32_t _nnodes      # slots of _nodes in use or on the free list
        int32_t _capacity    # allocated slots of _nodes
        int32_t _free        # first free slot (linked through _Node.parent), -1 if none
        Py_ssize_t _count    # (filter, value) pairs
        int64_t _seq         # last add() sequence number handed out
        uint64_t _generation # bumped by every add/remove/clear; detects changes made by a value's __eq__

    # The cached match list for `topic`: the same list object is returned
    # until the next add/remove/clear; callers must not mutate it.
    # Raises (returns NULL) only on MemoryError or a non-str topic.
    cdef list match_shared(self, str topic)
