"""The PASID namespace as a sparse hierarchical bitmap.

Level 0 has one bit per PASID (1 = in use). Each higher level has one bit per 64-bit word
of the level below, set when that word is full. Words are kept in dicts and only while
non-zero, so memory follows what is held (about 8 bytes per 64 dense PASIDs), and the
lowest free PASID at or above x is found in O(levels) = O(pasid_bits / 6) word operations,
whatever the fill level. No scan of the range, ever.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

_FULL = (1 << 64) - 1


class Namespace:
    """Which PASIDs in [0, 2^pasid_bits) are in use; knows nothing of owners."""

    __slots__ = ("_levels", "pasid_bits", "size", "used")

    def __init__(self, pasid_bits: int) -> None:
        if not 1 <= pasid_bits <= 32:
            raise ValueError(f"pasid_bits {pasid_bits} outside 1..32")
        self.pasid_bits = pasid_bits
        self.size = 1 << pasid_bits
        self.used = 0
        levels = 1
        bits = self.size
        while bits > 64:
            bits = (bits + 63) >> 6
            levels += 1
        self._levels: list[dict[int, int]] = [{} for _ in range(levels)]

    def is_used(self, pasid: int) -> bool:
        return bool(self._levels[0].get(pasid >> 6, 0) >> (pasid & 63) & 1)

    def lowest_free(self, lo: int, hi: int) -> int | None:
        """The lowest free PASID in [lo, hi], or None."""
        found = self._find_zero(0, lo)
        if found is None or found > hi:
            return None
        return found

    def _find_zero(self, level: int, x: int) -> int | None:
        words = self._levels[level]
        top = len(self._levels) - 1
        while True:
            w = x >> 6
            word = words.get(w, 0) | ((1 << (x & 63)) - 1)
            if word != _FULL:
                inv = ~word & _FULL
                return (w << 6) | ((inv & -inv).bit_length() - 1)
            if level == top:
                return None
            nxt = self._find_zero(level + 1, w + 1)
            if nxt is None:
                return None
            x = nxt << 6

    def take(self, pasid: int) -> None:
        """Mark one free PASID used. The caller has checked it is free."""
        self.used += 1
        level = 0
        x = pasid
        while True:
            words = self._levels[level]
            w = x >> 6
            word = words.get(w, 0) | (1 << (x & 63))
            words[w] = word
            if word != _FULL or level == len(self._levels) - 1:
                return
            level += 1
            x = w

    def release(self, pasid: int) -> None:
        """Mark one used PASID free. The caller has checked it is used."""
        self.used -= 1
        level = 0
        x = pasid
        while True:
            words = self._levels[level]
            w = x >> 6
            old = words[w]
            word = old & ~(1 << (x & 63))
            if word:
                words[w] = word
            else:
                del words[w]
            if old != _FULL or level == len(self._levels) - 1:
                return
            level += 1
            x = w

    def take_range(self, lo: int, hi: int) -> int:
        """Mark every free PASID in [lo, hi] used; returns how many were taken."""
        taken = 0
        p = self.lowest_free(lo, hi)
        while p is not None:
            self.take(p)
            taken += 1
            p = self.lowest_free(p + 1, hi) if p < hi else None
        return taken

    def iter_used(self) -> Iterator[int]:
        """Every used PASID, ascending (for checks and tests; O(words held))."""
        words = self._levels[0]
        for w in sorted(words):
            word = words[w]
            while word:
                low = word & -word
                yield (w << 6) | (low.bit_length() - 1)
                word ^= low


def runs(pasids: Iterable[int]) -> list[tuple[int, int]]:
    """Compress ascending PASIDs into inclusive runs [(lo, hi), ...]."""
    out: list[tuple[int, int]] = []
    for p in pasids:
        if out and out[-1][1] + 1 == p:
            out[-1] = (out[-1][0], p)
        else:
            out.append((p, p))
    return out
