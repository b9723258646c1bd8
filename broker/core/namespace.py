"""The PASID namespace as a sparse hierarchical bitmap.

Level 0 has one bit per PASID (1 = in use). Each higher level has one bit per 64-bit word
of the level below, set exactly when that word is full; the top level is a single word.
Words are kept in dicts and only while non-zero, so memory follows what is held (about
8 bytes per 64 dense PASIDs) and a 31-bit space costs nothing until used. The lowest free
PASID at or above x is found in O(levels) = O(pasid_bits / 6) word operations, whatever
the fill level: at most one climb and one descent. No scan of the range, ever.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

_FULL = (1 << 64) - 1


class Namespace:
    """Which PASIDs in [0, 2^pasid_bits) are in use; knows nothing of owners.

    Invariants (checked by `check()`): no zero word is stored; a bit at level L+1 is set
    iff the word it stands for at level L is full; `used` is the number of bits set at
    level 0; no bit at or beyond `size` is ever set.
    """

    __slots__ = ("_levels", "pasid_bits", "size", "used")

    def __init__(self, pasid_bits: int) -> None:
        # Up to 64 so that a backend reporting too wide a space can be opened and then
        # refused with a clear message (the allocator's bound is WIRE_PASID_BITS).
        if not 1 <= pasid_bits <= 64:
            raise ValueError(f"pasid_bits {pasid_bits} outside 1..64")
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
        # Fast path: the free bit is in lo's own word (the common case at any fill level).
        word = self._levels[0].get(lo >> 6, 0) | ((1 << (lo & 63)) - 1)
        if word != _FULL:
            inv = ~word & _FULL
            found: int | None = (lo & ~63) | ((inv & -inv).bit_length() - 1)
        else:
            found = self._find_zero(0, lo)
        if found is None or found > hi:
            return None
        return found

    def _find_zero(self, level: int, x: int) -> int | None:
        """The lowest zero bit at `level` at or above index x; None if there is none.

        May return an index >= the level's width (bits past the end of the last word are
        zero); callers bound the result by their own `hi`, which is always < size.
        """
        words = self._levels[level]
        w = x >> 6
        word = words.get(w, 0) | ((1 << (x & 63)) - 1)
        if word == _FULL:
            if level == len(self._levels) - 1:
                return None
            # The next word at this level that is not full: one bit lookup a level up.
            nxt = self._find_zero(level + 1, w + 1)
            if nxt is None:
                return None
            w = nxt
            # The bit above is clear, so this word is not full (a missing word is 0).
            word = words.get(w, 0)
        inv = ~word & _FULL
        return (w << 6) | ((inv & -inv).bit_length() - 1)

    def take(self, pasid: int) -> None:
        """Mark one free PASID used. The caller has checked it is free."""
        self.used += 1
        self._set_bit(0, pasid)

    def take_lowest(self, lo: int, hi: int, count: int) -> list[int]:
        """Take the `count` lowest free PASIDs in [lo, hi], ascending, a word at a time
        (a batch alloc: one bit walk per word, not per PASID). Fewer when [lo, hi] has
        fewer free: the caller checks, and releases them if it wants all or none."""
        words = self._levels[0]
        got: list[int] = []
        p = self.lowest_free(lo, hi)
        while p is not None:
            w = p >> 6
            base = w << 6
            free = ~words.get(w, 0) & _FULL & (_FULL << (p & 63))
            if base + 63 > hi:
                free &= _FULL >> (63 - (hi - base))
            need = count - len(got)
            if free == _FULL and need >= 64:
                mask = _FULL
                got.extend(range(base, base + 64))
            else:
                mask = 0
                while free and len(got) < count:
                    b = free & -free
                    free ^= b
                    mask |= b
                    got.append(base | (b.bit_length() - 1))
            word = words.get(w, 0) | mask
            words[w] = word
            if word == _FULL and len(self._levels) > 1:
                self._set_bit(1, w)
            if len(got) == count or base + 64 > hi:
                break
            p = self.lowest_free(base + 64, hi)
        self.used += len(got)
        return got

    def _set_bit(self, level: int, x: int) -> None:
        top = len(self._levels) - 1
        while True:
            words = self._levels[level]
            w = x >> 6
            word = words.get(w, 0) | (1 << (x & 63))
            words[w] = word
            if word != _FULL or level == top:
                return
            level += 1
            x = w

    def release(self, pasid: int) -> None:
        """Mark one used PASID free. The caller has checked it is used."""
        self.used -= 1
        self._clear_bits(0, pasid >> 6, 1 << (pasid & 63))

    def _clear_bits(self, level: int, w: int, mask: int) -> None:
        """Clear `mask` in word w of `level` (all its bits set), keeping the levels above."""
        top = len(self._levels) - 1
        while True:
            words = self._levels[level]
            old = words[w]
            word = old & ~mask
            if word:
                words[w] = word
            else:
                del words[w]
            if old != _FULL or level == top:
                return
            level += 1
            mask = 1 << (w & 63)
            w >>= 6

    def release_many(self, pasids: Iterable[int]) -> int:
        """Mark used PASIDs free, one word at a time; returns how many.

        The caller has checked each is used and listed it once. Ascending input (a set's
        sorted holdings) costs one dict update per word touched instead of one per PASID.
        """
        n = 0
        cur = -1
        mask = 0
        for p in pasids:
            w = p >> 6
            if w != cur:
                if mask:
                    self._clear_bits(0, cur, mask)
                cur = w
                mask = 0
            mask |= 1 << (p & 63)
            n += 1
        if mask:
            self._clear_bits(0, cur, mask)
        self.used -= n
        return n

    def take_many(self, pasids: Iterable[int]) -> int:
        """Mark these free PASIDs used, one word at a time; returns how many.

        All or nothing: ValueError (nothing changed) if one is out of range, in use, or
        listed twice. Ascending input (a restart's million held PASIDs) costs a few
        operations per run and per word instead of one bit walk per PASID: 1 M in runs
        take 0.05-0.09 s (0.45-0.93 s one PASID at a time).
        """
        masks: dict[int, int] = {}
        n = 0
        # By runs, then whole words: a set's holdings are mostly runs, so this is one
        # comparison per PASID (in runs) and a few operations per word.
        for lo, hi in runs(pasids):
            if lo < 0 or hi >= self.size:
                bad = lo if lo < 0 else max(lo, self.size)
                raise ValueError(f"PASID {bad} outside [0, {self.size - 1}]")
            n += hi - lo + 1
            first, last = lo >> 6, hi >> 6
            for w in range(first, last + 1):
                if lo == hi:  # a lone PASID (scattered holdings): one bit
                    mask = 1 << (lo & 63)
                else:
                    mask = _FULL
                    if w == first:
                        mask &= _FULL << (lo & 63)
                    if w == last:
                        mask &= _FULL >> (63 - (hi & 63))
                m = masks.get(w, 0)
                if m & mask:
                    dup = m & mask
                    raise ValueError(
                        f"PASID {(w << 6) | ((dup & -dup).bit_length() - 1)} listed twice"
                    )
                masks[w] = m | mask
        words = self._levels[0]
        for w, m in masks.items():
            if words.get(w, 0) & m:
                used = words[w] & m
                raise ValueError(f"PASID {(w << 6) | ((used & -used).bit_length() - 1)} in use")
        for w, m in masks.items():
            word = words.get(w, 0) | m
            words[w] = word
            if word == _FULL and len(self._levels) > 1:
                self._set_bit(1, w)
        self.used += n
        return n

    def release_range(self, lo: int, hi: int) -> int:
        """Mark every used PASID in [lo, hi] free, a word at a time; returns how many."""
        words = self._levels[0]
        hi = min(hi, self.size - 1)
        freed = 0
        for w in range(lo >> 6, (hi >> 6) + 1):
            word = words.get(w)
            if word is None:
                continue
            mask = _FULL
            if w == lo >> 6:
                mask &= _FULL << (lo & 63)
            if w == hi >> 6:
                mask &= _FULL >> (63 - (hi & 63))
            mask &= word
            if mask:
                freed += mask.bit_count()
                self._clear_bits(0, w, mask)
        self.used -= freed
        return freed

    def take_range(self, lo: int, hi: int) -> int:
        """Mark every free PASID in [lo, hi] used; returns how many were taken.

        Sets whole words (O((hi - lo) / 64)), so reserving half of a 20-bit space at start
        is cheap. Bounds: 0 <= lo <= hi < size.
        """
        if not 0 <= lo <= hi < self.size:
            raise ValueError(f"range [{lo}, {hi}] outside [0, {self.size - 1}]")
        words = self._levels[0]
        taken = 0
        first, last = lo >> 6, hi >> 6
        for w in range(first, last + 1):
            mask = _FULL
            if w == first:
                mask &= _FULL << (lo & 63)
            if w == last:
                mask &= _FULL >> (63 - (hi & 63))
            old = words.get(w, 0)
            word = old | mask
            if word == old:
                continue
            taken += (word ^ old).bit_count()
            words[w] = word
            if word == _FULL and len(self._levels) > 1:
                self._set_bit(1, w)
        self.used += taken
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

    def words_held(self) -> int:
        """Words stored across all levels (the memory the bitmap uses, in 64-bit units)."""
        return sum(len(level) for level in self._levels)

    def check(self) -> None:
        """Raise AssertionError if an invariant (see the class docstring) is broken."""
        count = 0
        for level, words in enumerate(self._levels):
            above = self._levels[level + 1] if level + 1 < len(self._levels) else None
            for w, word in words.items():
                if not 0 < word <= _FULL:
                    raise AssertionError(f"level {level} word {w} is {word:#x}")
                full_bit = above is not None and above.get(w >> 6, 0) >> (w & 63) & 1
                if above is not None and bool(full_bit) != (word == _FULL):
                    raise AssertionError(f"level {level} word {w}: full bit above is wrong")
                if level == 0:
                    count += word.bit_count()
                    if (w << 6) + word.bit_length() > self.size:
                        raise AssertionError(f"word {w} has bits at or beyond {self.size}")
            if above is not None:
                for w, word in above.items():
                    m = word
                    while m:
                        low = m & -m
                        below = (w << 6) | (low.bit_length() - 1)
                        if words.get(below) != _FULL:
                            raise AssertionError(f"level {level + 1} marks word {below} full")
                        m ^= low
        if count != self.used:
            raise AssertionError(f"used is {self.used}, bits set {count}")


def runs(pasids: Iterable[int]) -> list[tuple[int, int]]:
    """Compress ascending PASIDs into inclusive runs [(lo, hi), ...]."""
    out: list[tuple[int, int]] = []
    it = iter(pasids)
    first = next(it, None)
    if first is None:
        return out
    lo = hi = first
    # One comparison per PASID, one tuple per run (this is on every commit's path).
    for p in it:
        if p == hi + 1:
            hi = p
        else:
            out.append((lo, hi))
            lo = hi = p
    out.append((lo, hi))
    return out
