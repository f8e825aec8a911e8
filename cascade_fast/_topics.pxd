# Compiled topic trie. Contract used by cascade_fast/_protocol.pyx:
# the fields are the trie's own business; the protocol only calls match_shared.
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t


cdef enum:
    _INLINE_KEY = 16        # level keys up to this many bytes live inside the node


# A child reference: the child's index plus the top 32 bits of its level
# hash, so a probe rejects most non-matching children without touching them.
ctypedef struct _Slot:
    uint32_t tag            # level hash >> 32
    int32_t index           # child node index, -1 for an empty table slot


# One filter level. Nodes live in one array (TopicTrie._nodes) and refer to
# each other by index, so growing the array moves no pointer anyone holds and
# freeing the trie needs no recursion. No Python object is stored here: a
# node's values are the list TopicTrie._values[index]. Fields read by every
# match come first.
ctypedef struct _Node:
    uint32_t keylen         # length of the level in bytes (literal nodes)
    int32_t plus            # index of the '+' child, -1 if none
    int32_t hash            # index of the '#' child, -1 if none
    uint32_t kids_len       # literal children
    uint32_t table_mask     # slots is a hash table of table_mask + 1 entries; 0: a dense array of kids_len
    uint32_t nvalues        # values ending here (== len(TopicTrie._values[index]))
    _Slot *slots            # literal children: dense array, or open-addressing table (see table_mask)
    char *key               # the level's UTF-8 bytes when longer than _INLINE_KEY, else NULL
    char inline_key[_INLINE_KEY]  # the level's UTF-8 bytes when short
    uint64_t khash          # full level hash, for rebuilding the parent's table
    int64_t *seqs           # add() sequence number of each value, in list order
    uint32_t seqs_cap       # allocated length of seqs
    uint32_t slots_cap      # allocated entries of slots
    int32_t parent          # parent index, -1 for the root; next free index while on the free list
    bint used               # False while on the free list


# A result-cache slot: the hash of a topic's UTF-8 bytes and its entry.
ctypedef struct _CacheSlot:
    uint64_t hash           # cf_hash of the topic's UTF-8 bytes
    Py_ssize_t entry        # index into TopicTrie._cache_keys/_cache_results, -1 for an empty slot


cdef class TopicTrie:
    cdef:
        list _cache_keys     # cache entry -> topic str (append-only until the cache is reset)
        list _cache_results  # cache entry -> result list (shared, never mutated by anyone)
        _CacheSlot *_cache_table  # open addressing over the entries, NULL while the cache is empty
        size_t _cache_mask   # table size - 1 (0 while the table is NULL)
        Py_ssize_t _cache_size   # most topics cached before a reset; 0 disables caching
        list _empty          # the one shared result for topics matching nothing
        list _values         # node index -> list of the values ending there (never mutated: replaced), or None
        _Node *_nodes        # every node; index 0 is the root
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
