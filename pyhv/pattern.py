"""The correctness oracle: what a page must hold, as a function of
(partition, page, generation).  Every byte of a page depends on all three,
so a page written for another partition, another page or an older
generation, or a page of zeros, never passes."""

from __future__ import annotations

import hashlib

from pyhv.uffd import PAGE_SIZE


def page_pattern(partition: str, page: int, generation: int) -> bytes:
    seed = hashlib.blake2b(f"{partition}/{page}/{generation}".encode(), digest_size=64).digest()
    return seed * (PAGE_SIZE // len(seed))
