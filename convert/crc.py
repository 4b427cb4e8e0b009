"""Combining CRCs: the CRC of ``A + B`` from the CRCs of ``A`` and ``B`` and ``len(B)``.

zlib's ``crc32_combine`` (zlib/crc32.c, the GF(2) matrix method), for any reflected polynomial:
CRC-32 (zip's, :data:`CRC32`) and CRC-32C (Castagnoli's, :data:`CRC32C`, TF bundles and DCP
archives). By hand because neither ``zlib`` nor ``google_crc32c`` exposes it in Python; what it
buys is that tensors stitched from pieces, or a zip member's data after its header, keep their
kernel copies and still have their checksums checked.
"""

from __future__ import annotations

import functools

CRC32 = 0xEDB88320
CRC32C = 0x82F63B78


def _gf2_times(matrix: tuple[int, ...], vector: int) -> int:
    total, i = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[i]
        vector >>= 1
        i += 1
    return total


@functools.cache
def _zero_operators(poly: int) -> tuple[tuple[int, ...], ...]:
    """The GF(2) operators that carry a CRC over 2**k zero bytes, k = 0..63."""
    op = (poly, *(1 << n for n in range(31)))  # one zero bit
    for _ in range(3):  # two, four, eight zero bits
        op = tuple(_gf2_times(op, m) for m in op)
    ops = [op]
    for _ in range(63):
        op = tuple(_gf2_times(op, m) for m in op)
        ops.append(op)
    return tuple(ops)


def shift(crc: int, nbytes: int, poly: int = CRC32) -> int:
    """``crc`` carried over ``nbytes`` zero bytes: ``crc(A + B) == shift(crc(A), len(B)) ^ crc(B)``."""
    ops = _zero_operators(poly)
    k = 0
    while nbytes:
        if nbytes & 1:
            crc = _gf2_times(ops[k], crc)
        nbytes >>= 1
        k += 1
    return crc


def combine(crc1: int, crc2: int, len2: int, poly: int = CRC32) -> int:
    """The CRC of ``A + B`` from ``crc(A)``, ``crc(B)`` and ``len(B)``."""
    return shift(crc1, len2, poly) ^ crc2
