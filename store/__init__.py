"""fimio.store: the content-addressed store library (no click, no CLI imports)."""

import sys

__version__ = "0.1.0"

# The code that walks trees recurses about twice per directory level (a directory's
# encoding needs its children's digests), and trees may nest 512 levels (spec/tree.md §3):
# make room for that above whatever the caller's own stack needs.
sys.setrecursionlimit(max(sys.getrecursionlimit(), 5000))
