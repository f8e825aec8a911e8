# cython: language_level=3
# STUB: replaced by the real protocol (issue 4).
from cascade_fast._codec cimport Decoder, PacketSink
from cascade_fast._topics cimport TopicTrie
