"""A small PNG reader (and writer) for 8/16-bit grey, grey+alpha, RGB and RGBA images.

Pillow has no multi-channel 16-bit mode: it opens a 16-bit RGB PNG as 8-bit RGB holding the
high byte of every sample, which is zero for SYNTHIA's class ids (all < 256). This module
decodes such files exactly with numpy + zlib, so no OpenCV is needed.

Unfiltering is the only costly part. Rows filtered with None, Sub or Up are undone with whole-row
numpy operations. Average and Paeth make each pixel depend on its left neighbour *after*
reconstruction, so they cannot be undone with a cumulative sum; instead every pixel of an
anti-diagonal (row + column = k) is reconstructed at once, since its left, upper and upper-left
neighbours all lie on the two previous anti-diagonals. That is H + W - 1 vectorized steps instead
of H * W scalar ones.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel (palette, 3, excluded)


class PngError(ValueError):
    """The bytes are not a PNG this reader can decode; the message says why."""


@dataclass(frozen=True)
class PngHeader:
    width: int
    height: int
    bit_depth: int
    color_type: int
    interlace: int

    @property
    def channels(self) -> int:
        return _CHANNELS.get(self.color_type, 1)


def read_png_header(path: str | Path) -> PngHeader | None:
    """The IHDR of ``path``, or None when the file does not start with a PNG signature."""
    with open(path, "rb") as f:
        head = f.read(33)
    if len(head) < 33 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    return PngHeader(*struct.unpack(">IIBB", head[16:26]), head[28])


def _chunks(data: bytes, name: str):
    if data[:8] != PNG_SIGNATURE:
        raise PngError(f"{name}: not a PNG file (bad signature)")
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        crc = data[pos + 8 + length : pos + 12 + length]
        if len(body) != length or len(crc) != 4:
            raise PngError(f"{name}: truncated {kind.decode('latin-1')} chunk at byte {pos}")
        if zlib.crc32(kind + body) != struct.unpack(">I", crc)[0]:
            raise PngError(f"{name}: CRC mismatch in {kind.decode('latin-1')} chunk at byte {pos}")
        yield kind, body
        if kind == b"IEND":
            return
        pos += 12 + length
    raise PngError(f"{name}: no IEND chunk (file truncated)")


def decode_png(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode a non-interlaced 8/16-bit grey(+alpha)/RGB(A) PNG.

    Returns (H, W) for grey, else (H, W, C); dtype uint8 or uint16 (native byte order).
    ``name`` only appears in error messages.
    """
    header = None
    idat = []
    for kind, body in _chunks(data, name):
        if kind == b"IHDR":
            header = PngHeader(*struct.unpack(">IIBB", body[:10]), body[12])
        elif kind == b"IDAT":
            idat.append(body)
    if header is None:
        raise PngError(f"{name}: no IHDR chunk")
    if header.color_type not in _CHANNELS or header.bit_depth not in (8, 16):
        raise PngError(
            f"{name}: colour type {header.color_type} at {header.bit_depth} bits is not handled here "
            "(only 8/16-bit grey, grey+alpha, RGB, RGBA); Pillow reads the others correctly"
        )
    if header.interlace:
        raise PngError(f"{name}: interlaced (Adam7) PNGs are not supported")
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as e:
        raise PngError(f"{name}: corrupt image data ({e})") from None
    bpp = header.channels * header.bit_depth // 8
    row_bytes = header.width * bpp
    expected = header.height * (row_bytes + 1)
    if len(raw) < expected:
        raise PngError(f"{name}: image data has {len(raw)} bytes, {expected} expected (truncated)")
    rows = np.frombuffer(raw, np.uint8, count=expected).reshape(header.height, row_bytes + 1)
    pixels = unfilter(rows[:, 0], rows[:, 1:], bpp)
    if header.bit_depth == 16:
        pixels = pixels.view(">u2").astype(np.uint16)
    shape = (header.height, header.width) + ((header.channels,) if header.channels > 1 else ())
    return pixels.reshape(shape)


def read_png(path: str | Path) -> np.ndarray:
    """:func:`decode_png` of a file."""
    return decode_png(Path(path).read_bytes(), str(path))


def unfilter(filter_types: np.ndarray, filtered: np.ndarray, bpp: int) -> np.ndarray:
    """Undo PNG scanline filters.

    filter_types: (H,) uint8 in 0..4; filtered: (H, W * bpp) uint8; bpp: bytes per pixel.
    Returns the reconstructed (H, W * bpp) uint8 bytes.
    """
    height, row_bytes = filtered.shape
    bad = np.unique(filter_types[filter_types > 4])
    if bad.size:
        raise PngError(f"unknown PNG filter type(s) {bad.tolist()}")
    if np.all(filter_types <= 2):
        return _unfilter_rows(filter_types, filtered, bpp)
    return _unfilter_wavefront(filter_types, filtered, bpp)


def _unfilter_rows(filter_types: np.ndarray, filtered: np.ndarray, bpp: int) -> np.ndarray:
    """None / Sub / Up only: Sub rows are a cumulative sum along the row, Up rows one down."""
    height, row_bytes = filtered.shape
    out = filtered.copy()
    sub = filter_types == 1
    if sub.any():
        # uint8 accumulation wraps modulo 256, exactly as the filter arithmetic does.
        block = filtered[sub].reshape(int(sub.sum()), row_bytes // bpp, bpp)
        out[sub] = np.cumsum(block, axis=1, dtype=np.uint8).reshape(-1, row_bytes)
    for r in np.flatnonzero(filter_types == 2):
        if r > 0:
            out[r] += out[r - 1]
    return out


def _unfilter_wavefront(filter_types: np.ndarray, filtered: np.ndarray, bpp: int) -> np.ndarray:
    height, row_bytes = filtered.shape
    width = row_bytes // bpp
    ndiag = height + width - 1
    # Skewed copies: filt[k, r] holds pixel (r, x = k - r). Reconstructed values live in `recon`
    # with two leading pad diagonals and one leading pad row, all zero, which are exactly the
    # "outside the image" neighbours the filters define as 0. Both are filled / read through
    # strided views: pixel (r, x) sits at a flat offset linear in r and x.
    filt = np.zeros((ndiag, height, bpp), np.int16)
    _pixel_view(filt, height, width, bpp, (height + 1, height), 0)[...] = filtered.reshape(
        height, width, bpp
    )
    recon = np.zeros((ndiag + 2, height + 1, bpp), np.int16)
    # Per-row 0/1 weights select the predictor without branching (np.choose is far slower);
    # predictors no row uses are skipped.
    weights = {t: (filter_types == t).astype(np.int16)[:, None] for t in (1, 2, 3, 4)}
    weights = {t: w for t, w in weights.items() if w.any()}
    for k in range(ndiag):
        r0, r1 = max(0, k - width + 1), min(height - 1, k) + 1  # rows on this diagonal
        a = recon[k + 1, r0 + 1 : r1 + 1]  # left: (r, x-1), diagonal k-1
        b = recon[k + 1, r0:r1]  # up: (r-1, x), diagonal k-1
        pred = filt[k, r0:r1].copy()
        if 4 in weights:
            c = recon[k, r0:r1]  # up-left: (r-1, x-1), diagonal k-2
            db, da = b - c, a - c
            pa, pb, pc = np.abs(db), np.abs(da), np.abs(db + da)
            paeth = np.where(pa <= np.minimum(pb, pc), a, np.where(pb <= pc, b, c))
            paeth *= weights[4][r0:r1]
            pred += paeth
        if 1 in weights:
            pred += weights[1][r0:r1] * a
        if 2 in weights:
            pred += weights[2][r0:r1] * b
        if 3 in weights:
            pred += weights[3][r0:r1] * ((a + b) >> 1)
        pred &= 0xFF
        recon[k + 2, r0 + 1 : r1 + 1] = pred
    out = _pixel_view(recon, height, width, bpp, (height + 2, height + 1), 2 * height + 3)
    return out.astype(np.uint8).reshape(height, row_bytes)


def _pixel_view(buf: np.ndarray, height: int, width: int, bpp: int, steps: tuple[int, int], offset: int):
    """(height, width, bpp) view of contiguous ``buf`` whose pixel (r, x) starts at
    flat pixel index ``offset + r * steps[0] + x * steps[1]``."""
    item = buf.itemsize
    flat = buf.reshape(-1)[offset * bpp :]
    return np.lib.stride_tricks.as_strided(
        flat,
        shape=(height, width, bpp),
        strides=(steps[0] * bpp * item, steps[1] * bpp * item, item),
        writeable=True,
    )


# ---------------------------------------------------------------------------------------------
# Writer: used to produce files in the exact SYNTHIA on-disk format (16-bit RGB), and by tests to
# exercise every filter type. Filtering reads only unfiltered bytes, so it is fully vectorized.


def _filter_all(raw: np.ndarray, bpp: int) -> np.ndarray:
    """(5, H, R) candidate filtered rows for filter types 0..4 of raw (H, R) uint8."""
    x = raw.astype(np.int16)
    a = np.zeros_like(x)
    a[:, bpp:] = x[:, :-bpp]
    b = np.zeros_like(x)
    b[1:] = x[:-1]
    c = np.zeros_like(x)
    c[1:, bpp:] = x[:-1, :-bpp]
    pa, pb, pc = np.abs(b - c), np.abs(a - c), np.abs(a + b - 2 * c)
    paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    preds = np.stack([np.zeros_like(x), a, b, (a + b) >> 1, paeth])
    return ((x[None] - preds) & 0xFF).astype(np.uint8)


def encode_png(array: np.ndarray, filters: str | int | np.ndarray = "adaptive", level: int = 6) -> bytes:
    """Encode (H, W) or (H, W, C) uint8/uint16 as a PNG.

    filters: "adaptive" (libpng's minimum-sum-of-absolute-differences choice per row), a single
    filter type 0..4 for every row, or an (H,) array of per-row types.
    """
    array = np.asarray(array)
    if array.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"encode_png needs uint8 or uint16, got {array.dtype}")
    channels = 1 if array.ndim == 2 else array.shape[2]
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    bit_depth = 8 * array.dtype.itemsize
    height, width = array.shape[:2]
    raw = np.ascontiguousarray(array.astype(array.dtype.newbyteorder(">"))).view(np.uint8)
    raw = raw.reshape(height, -1)
    bpp = channels * array.dtype.itemsize
    candidates = _filter_all(raw, bpp)
    if isinstance(filters, str):
        cost = np.abs(candidates.view(np.int8).astype(np.int32)).sum(axis=2)
        cost[0] = raw.astype(np.int32).sum(axis=1)  # libpng scores None on the unsigned bytes
        types = cost.argmin(axis=0)
    else:
        types = np.broadcast_to(np.asarray(filters, dtype=np.int64), (height,))
    body = candidates[types, np.arange(height)]
    scanlines = np.concatenate([types.astype(np.uint8)[:, None], body], axis=1)

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + payload))
        return struct.pack(">I", len(payload)) + kind + payload + crc

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(scanlines.tobytes(), level))
        + chunk(b"IEND", b"")
    )


def write_png(path: str | Path, array: np.ndarray, filters: str | int | np.ndarray = "adaptive") -> None:
    Path(path).write_bytes(encode_png(array, filters))
