# Compiled topic trie. Contract used by cascade_fast/_protocol.pyx:
# the fields are the trie's own business; the protocol only calls match_shared.
cdef class TopicTrie:
    cdef:
        dict _cache          # topic -> list of values (shared, never mutated by callers)

    # The cached match list for `topic`: the same list object is returned
    # until the next add/remove/clear; callers must not mutate it.
    cdef list match_shared(self, str topic)
