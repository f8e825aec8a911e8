# Compiled topic trie. Contract used by cascade_fast/_protocol.pyx:
# the fields are the trie's own business; the protocol only calls match_shared.
from cpython.ref cimport PyObject
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t


cdef enum:
    _INLINE_KEY = 16        # level keys up to this many bytes live inside the node


# A child reference: the child's index plus the top 32 bits of its level
# hash, so a probe rejects most non-matching children without touching them.
ctypedef struct _Slot:
    uint32_t tag            # level hash >> 32
    int32_t index           # child node index, -1 for an empty table slot


# A node's literal children: one is kept inline (the common case under
# `+`, and for most levels of a telemetry filter), more get a table.
ctypedef union _Kids:
    _Slot one               # the only child, while table_mask == 0 (valid when kids_len == 1)
    _Slot *table            # open-addressing table of table_mask + 1 slots (-1 = empty), when table_mask != 0


ctypedef union _Key:
    char bytes_[_INLINE_KEY]  # the level's UTF-8 bytes when keylen <= _INLINE_KEY
    char *heap              # a malloc'd copy when longer


# One filter level, the part every match reads: 64 bytes, one cache line
# (more on a 32-bit build, where it just takes a little more memory).
# Nodes live in one array (TopicTrie._nodes) and refer to each other by
# index, so growing the array moves no pointer anyone holds and freeing the
# trie needs no recursion. No Python object is owned here: a node's values
# are the list TopicTrie._values[index], borrowed as `values`, and its
# first value is borrowed as `value0` so that match() builds a one-value
# result from this cache line alone (the list and its item array are
# separate allocations, each a cache miss on a cold walk).
ctypedef struct _Node:
    uint32_t keylen         # length of the level in bytes (literal nodes)
    int32_t plus            # index of the '+' child, -1 if none
    int32_t hash            # index of the '#' child, -1 if none
    uint32_t kids_len       # literal children
    uint32_t table_mask     # 0: the kids (at most one) are inline in kids.one; else kids.table has table_mask + 1 slots
    uint32_t nvalues        # values ending here (== len(TopicTrie._values[index]))
    _Kids kids              # the literal children (see _Kids)
    _Key key                # the level's bytes (see _Key)
    PyObject *values        # borrowed TopicTrie._values[index] (which owns it), NULL when nvalues == 0
    PyObject *value0        # borrowed values[0], NULL when nvalues == 0


# The rest of a node, read only by add/remove and when merging several
# nodes' values: kept apart so the walk touches fewer cache lines.
ctypedef struct _NodeCold:
    uint64_t khash          # full level hash, for rebuilding the parent's table
    int64_t *seqs           # add() sequence number of each value, in list order
    uint32_t seqs_cap       # allocated length of seqs
    int32_t parent          # parent index, -1 for the root; next free index while on the free list
    bint used               # False while on the free list


# The result cache: an open-addressing table of slots whose occupancy lives
# in a separate bitmap (`_cache_used`, one bit per slot). A topic not in the
# cache -- every topic on a cold walk -- is usually rejected by the bitmap
# alone, which stays in L1/L2, instead of a cache miss into the table; a
# reset (on every add/remove) clears the bitmap only, and the table and
# entry array are kept for reuse.
ctypedef struct _CacheSlot:
    uint32_t tag            # high half of cf_hash of the topic's UTF-8 bytes; also picks the slot
    uint32_t entry          # index into TopicTrie._cache_entries (meaningful only while the slot's bit is set)


# What a cached topic matched: a result id, not a list, so a hit on a
# one-node result touches that node only. Result ids: >= 0 the node whose
# values are the result, _NO_MATCH, or <= -2 for _cache_merged[-2 - id].
ctypedef struct _CacheEntry:
    PyObject *key           # the topic, borrowed (TopicTrie._cache_keys owns it)
    int32_t result          # the result id


cdef class TopicTrie:
    cdef:
        list _cache_keys     # cache entry -> topic str: owns the keys (append-only until the cache is reset)
        list _cache_merged   # the merged result lists the cache refers to (shared, never mutated by anyone)
        _CacheEntry *_cache_entries  # cache entry -> (topic, result id); _cache_capacity long
        Py_ssize_t _cache_capacity   # allocated length of _cache_entries
        Py_ssize_t _cache_len        # entries in use
        _CacheSlot *_cache_table     # open addressing over the entries, NULL until the first insert
        uint64_t *_cache_used        # occupancy bitmap of _cache_table
        uint32_t _cache_mask # table size - 1 (0 while the table is NULL)
        Py_ssize_t _cache_size   # most topics cached before a reset; 0 disables caching
        object _merged_result    # a merged result handed from _lookup to its caller (None at rest)
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
