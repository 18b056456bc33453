"""Small value classes without ``dataclasses``.

The store's core types (tree nodes, store paths, path records) are imported by every
command, and ``dataclasses`` pulls in ``inspect``, ``ast`` and ``tokenize``: about 20 ms of
a command that takes 150. A class lists its fields in ``__slots__`` and derives from
:class:`Value`, which gives equality, ordering-free hashing and a readable repr by those
fields.
"""

from __future__ import annotations


class Value:
    """Equality and repr by the fields named in ``__slots__`` (in order). Immutable
    subclasses keep the field-based hash; mutable ones set ``__hash__ = None``."""

    __slots__ = ()

    def _fields(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"
