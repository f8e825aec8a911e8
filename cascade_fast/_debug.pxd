# Compile-time debug switch for the Cython core (pattern: UVLOOP_DEBUG, PG_DEBUG).
# Build with CASCADE_FAST_DEBUG=ON (CMake option / env var) to compile the
# invariant checks in; release builds fold `if CASCADE_FAST_DEBUG:` away in C.
cdef extern from *:
    """
    #ifndef CASCADE_FAST_DEBUG
    #define CASCADE_FAST_DEBUG 0
    #endif
    """
    const bint CASCADE_FAST_DEBUG
