"""The record ids a run has seen, in 16 bytes per id or less.

The duplicate-id check must remember every id the input gives. A Python `set` of ints costs
about 70 bytes per entry (76 MB per million ids, measured by `make bench`); this table keeps
one 64-bit digest per id in a flat `array('Q')` with open addressing (linear probing, at most
half full), so a million ids take 16 MB. Nothing in the standard library or the project's
dependencies holds a compact set of integers.

Digests are BLAKE2b, not `hash()`: the same id gives the same digest in every process, so a
resumed run judges ids as the first one did. Two different ids share a digest with probability
about n²/2⁶⁵ (3·10⁻⁸ for a million ids); such a pair would be reported as a duplicate.
"""

from __future__ import annotations

from array import array
from hashlib import blake2b

_EMPTY = 0
_INITIAL_SLOTS = 1024


def digest(record_id: str) -> int:
    """A stable, non-zero 64-bit digest of an id (0 marks an empty slot)."""
    value = int.from_bytes(blake2b(record_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return value or 1


class IdSet:
    def __init__(self) -> None:
        self._slots = array("Q", bytes(8 * _INITIAL_SLOTS))
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, record_id: str) -> bool:
        """Remember `record_id`; False if it was already there."""
        key = digest(record_id)
        slots = self._slots
        mask = len(slots) - 1
        i = key & mask
        while (current := slots[i]) != _EMPTY:
            if current == key:
                return False
            i = (i + 1) & mask
        slots[i] = key
        self._count += 1
        if 2 * self._count > len(slots):
            self._grow()
        return True

    def _grow(self) -> None:
        old = self._slots
        self._slots = slots = array("Q", bytes(16 * len(old)))
        mask = len(slots) - 1
        for key in old:
            if key != _EMPTY:
                i = key & mask
                while slots[i] != _EMPTY:
                    i = (i + 1) & mask
                slots[i] = key
