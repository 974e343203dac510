"""Label Studio brush RLE, vectorised with numpy.

The frontend decodes a bitstream (MSB first) into ``width * height * 4`` bytes (RGBA):

    header  32 bits  number of bytes
             5 bits  word size - 1            (7: one byte per value)
          4 x 4 bits run-length field size - 1 (fields of 3, 4, 8, 16 bits)
    chunk    1 bit   repeat flag
             2 bits  index k into the field sizes
       sizes[k] bits length - 1
             then one 8-bit value (repeat) or ``length`` 8-bit values (literal)

A mask pixel is four equal bytes (0 or 255), so every run is at least 4 bytes long and a
repeat chunk (14 bits at best) always beats a literal one (32 bits a pixel): we emit repeat
chunks only, picking the field size exactly as ``label_studio_sdk.converter.brush.encode_rle``
does, so for a mask our output is byte for byte the SDK's (its trailing padding included).
The SDK is fast enough on smooth masks (its runs come from numpy, only the chunks from a Python
loop) but takes seconds on noisy ones; we are 10x to 40x faster (bench/rle.py).
"""

from __future__ import annotations

import numpy as np

_RLE_SIZES = (3, 4, 8, 16)  # bits of the (length - 1) field, chosen by the 2-bit index
_WORD_SIZE = 8
_MAX_RUN_PX = 1 << 14  # one chunk holds at most 65536 bytes: 16384 pixels
# wordSize-1 in 5 bits, then each rle size-1 in 4 bits: 21 bits after the 32-bit byte count.
_HEADER_TAIL = (_WORD_SIZE - 1) << 16 | sum((s - 1) << (12 - 4 * i) for i, s in enumerate(_RLE_SIZES))
# Chunk kind (the 2-bit index) by run length in pixels, as the SDK picks it: the smallest field
# that holds the run's byte length - 1 (up to 2, 4, 64 pixels; longer runs take 16 bits).
_KIND_BY_PX = np.searchsorted(np.array([2, 4, 64]), np.arange(66))
# By kind: the repeat flag and index shifted above length and value; the chunk's width in bits.
_CHUNK_HEAD = np.array([(0b100 | k) << (s + _WORD_SIZE) for k, s in enumerate(_RLE_SIZES)], dtype=np.uint64)
_CHUNK_BITS = np.array([3 + s + _WORD_SIZE for s in _RLE_SIZES], dtype=np.int64)


def encode_mask(mask: np.ndarray) -> list[int]:
    """Encode a mask as Label Studio brush RLE.

    Arguments:
      mask: (H, W) bool, 0/1 or uint8 array; nonzero is "on". It is encoded as the RGBA image
        whose four channels are 255 where the mask is on and 0 elsewhere.

    Returns:
      The RLE as a list of ints in 0..255 (the ``rle`` field of a brushlabels result); it
      decodes to ``H * W * 4`` bytes.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    on = mask.reshape(-1) if mask.dtype == np.bool_ else mask.reshape(-1) != 0  # (H*W,) bool
    n_px = on.size
    if n_px * 4 >= 1 << 32:
        raise ValueError(f"mask of {mask.shape} is too big for brush RLE (32-bit byte count)")
    header = np.array([n_px * 4, _HEADER_TAIL], dtype=np.uint64)
    if n_px == 0:
        return _pack_codes(header, np.array([32, 21])).tolist()

    # (R,) runs of equal pixels: length in pixels, chunk kind, byte value (runs alternate).
    bounds = np.concatenate(([0], np.flatnonzero(on[1:] != on[:-1]) + 1, [n_px]))
    run_px = np.diff(bounds)
    kind = _KIND_BY_PX[np.minimum(run_px, _KIND_BY_PX.size - 1)]
    value = np.zeros(run_px.size, dtype=np.uint64)
    value[0 if on[0] else 1 :: 2] = 255

    # (C,) chunks: a run too long for one chunk becomes full chunks then the remainder, all
    # of the run's kind (16-bit field), as the SDK does.
    if run_px.max() > _MAX_RUN_PX:
        n_chunks = -(-run_px // _MAX_RUN_PX)
        run = np.repeat(np.arange(run_px.size), n_chunks)
        index_in_run = np.arange(run.size) - np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
        run_px = np.minimum(run_px[run] - index_in_run * _MAX_RUN_PX, _MAX_RUN_PX)
        kind, value = kind[run], value[run]

    # Each chunk as one code: repeat flag, index, length - 1 (bytes), value; the header first.
    length_field = (run_px.astype(np.uint64) << np.uint64(10)) - np.uint64(1 << 8)  # (4*px - 1) << 8
    codes = np.concatenate((header, _CHUNK_HEAD[kind] | length_field | value))
    widths = np.concatenate(([32, 21], _CHUNK_BITS[kind]))
    return _pack_codes(codes, widths).tolist()


def _pack_codes(codes: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Concatenate variable-width codes MSB first into bytes.

    Arguments:
      codes: (N,) uint64, each below ``2 ** widths[i]``.
      widths: (N,) int, bits of each code, at most 32.

    Returns:
      (B,) uint8, with B = total_bits // 8 + 1: like the SDK, the zero padding is 1 to 8 bits.
    """
    ends = np.cumsum(widths)
    offsets = ends - widths
    n_out = int(ends[-1]) // 8 + 1
    # Left-align each code in a 64-bit value at its bit offset within its first 32-bit output
    # word: the high half goes to that word, the low half to the next. Codes never share a bit,
    # so summing the halves per word (bincount, exact in float64 below 2**53) OR-s them.
    shifted = codes << (64 - widths - (offsets & 31)).astype(np.uint64)
    word = offsets >> 5
    n_words = n_out // 4 + 2
    high = np.bincount(word, weights=(shifted >> np.uint64(32)).astype(np.float64), minlength=n_words)
    low = np.bincount(
        word + 1, weights=(shifted & np.uint64(0xFFFFFFFF)).astype(np.float64), minlength=n_words
    )
    return (high + low).astype(">u4").view(np.uint8)[:n_out]


def decode_mask(rle: list[int], height: int, width: int) -> np.ndarray:
    """Decode Label Studio brush RLE back to a mask, bounded by the image it belongs to.

    Arguments:
      rle: the RLE as a list of ints in 0..255 (from an annotation: untrusted).
      height, width: the image size in pixels (the real image's, checked by the caller).

    Returns:
      (height, width) bool, True where the alpha byte is nonzero.

    Raises:
      ValueError for anything malformed: not bytes, a header whose byte count is not
      height*width*4 (checked before anything is allocated), a run past that count, data that
      ends early. Nothing larger than the image is ever allocated.
    """
    if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0):
        raise ValueError(f"brush RLE needs a positive image size, got {height!r} x {width!r}")
    try:
        data = bytes(rle)
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"brush RLE is not a list of bytes (0..255): {e}") from None
    expected = height * width * 4
    bits = "".join(f"{b:08b}" for b in data)  # MSB first, as Label Studio writes it
    total = len(bits)
    pos = 0

    def read(size: int) -> int:
        nonlocal pos
        if pos + size > total:
            raise ValueError(f"brush RLE ends early (bit {pos} of {total}, {size} more needed)")
        value = int(bits[pos : pos + size], 2)
        pos += size
        return value

    num = read(32)
    if num != expected:
        raise ValueError(f"RLE holds {num} bytes, expected {height}*{width}*4 = {expected}")
    word = read(5) + 1
    if word > 8:
        raise ValueError(f"brush RLE word size {word} is not a byte")
    sizes = [read(4) + 1 for _ in range(4)]
    out = np.zeros(num, dtype=np.uint8)
    i = 0
    while i < num:
        repeat = read(1)
        j = i + 1 + read(sizes[read(2)])
        if j > num:
            raise ValueError(f"brush RLE run ends at byte {j}, past the image's {num}")
        if repeat:
            out[i:j] = read(word)
        else:
            for k in range(i, j):
                out[k] = read(word)
        i = j
    return out.reshape(height, width, 4)[:, :, 3] != 0
