"""Structure checks of encoded JPEG and PNG files, without decoding them: declared size and completeness.

A JPEG is walked from SOI through its marker segments (by their lengths) and over each scan's
entropy-coded data to its first EOI; a PNG chunk by chunk from its signature to IEND. A file that
ends first is truncated. A JPEG cut and closed with an EOI (which the decoders serve with the missing
blocks grey) is caught by Huffman-walking its last scan (:mod:`fastgenlabel.loader.jpeg_entropy`):
a cut file ends inside the scan it was cut in, so that scan alone must hold all its blocks; with a
restart interval only its last interval is walked, after counting the restart markers. Bytes after
the end marker (phone motion photos, vendor trailers, padding) are ignored, as the decoders ignore
them. Both give the declared width and height (JPEG SOF, PNG IHDR), so that a decompression bomb is
refused before a decoder allocates its pixels.
"""
from __future__ import annotations

import numpy as np

_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_HUFFMAN_SOF = (0xC0, 0xC1, 0xC2)  # baseline, extended and progressive Huffman: their scans are walked
_CUT = ("the JPEG's image data end before its last block (a truncated file closed with an end-of-image "
        "marker: decoders fill the rest with grey)")
_TABLE_CACHE: dict = {}  # Huffman table specs -> decoding tables: files of one encoder share theirs


def _buffer(data) -> bytes:
    return data if isinstance(data, bytes) else np.ascontiguousarray(data, np.uint8).tobytes()


def _array(data) -> np.ndarray:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(data, np.uint8)
    return np.ascontiguousarray(data, np.uint8).reshape(-1)


def jpeg_structure(data, walk_codes: bool = True) -> tuple[str | None, int, int]:
    """(problem or None, width, height) of an encoded JPEG (that starts with SOI).

    Besides the markers, the last scan before EOI is Huffman-walked (:func:`_last_scan_problem`):
    a file is cut inside the scan it ends in, so that scan alone tells whether it was cut. The walk
    costs up to most of a decode; ``walk_codes=False`` leaves it out (a file already walked).
    """
    from . import jpeg_entropy as je

    a = _array(data)
    b = memoryview(a)
    n = len(a)
    pos, width, height = 2, 0, 0
    frame = None  # (SOF marker, [(component id, h, v)])
    tables: dict = {}  # (class, id) -> the DHT spec in force
    restart = 0
    scans: list = []
    while True:
        if pos + 1 >= n:
            return "the file ends before the JPEG's end-of-image marker (truncated)", width, height
        if b[pos] != 0xFF:  # stray bytes before a marker: decoders skip them with a warning
            pos = je.next_marker(a, pos)[0]
            continue
        m = b[pos + 1]
        if m == 0xFF:  # fill byte
            pos += 1
            continue
        pos += 2
        if m == 0xD9:
            if not scans:
                return "a JPEG end-of-image marker before any image data", width, height
            return (_last_scan_problem(a, frame, scans, width, height) if walk_codes else None), width, height
        if m in (0x00, 0x01, 0xD8) or 0xD0 <= m <= 0xD7:
            continue
        if pos + 2 > n:
            return "the file ends inside a JPEG marker segment (truncated)", width, height
        end = pos + (b[pos] << 8 | b[pos + 1])
        if end > n:
            return "the file ends inside a JPEG marker segment (truncated)", width, height
        seg = bytes(b[pos + 2:end])
        if m in _SOF and len(seg) >= 6:
            height, width = seg[1] << 8 | seg[2], seg[3] << 8 | seg[4]
            comps = [(seg[i], seg[i + 1] >> 4, seg[i + 1] & 15) for i in range(6, len(seg) - 2, 3)]
            if frame is None:
                frame = (m, comps[:seg[5]])
        elif m == 0xC4:
            p = 0
            while p + 17 <= len(seg):
                count = sum(seg[p + 1:p + 17])
                tables[seg[p] >> 4, seg[p] & 15] = seg[p + 1:p + 17 + count]
                p += 17 + count
        elif m == 0xDD and len(seg) >= 2:
            restart = seg[0] << 8 | seg[1]
        pos = end
        if m == 0xDA:  # a scan: its entropy-coded data run to the next marker that is not 0xFF00 or RSTn
            stop, rsts, after = je.next_marker(a, pos)
            if stop + 1 >= n:
                return "the file ends inside the JPEG's entropy-coded data (truncated)", width, height
            scans.append((seg, dict(tables), restart, pos, stop, rsts, after))
            pos = stop


def _last_scan_problem(a, frame, scans, width, height) -> str | None:
    """Whether the last scan holds every MCU of the frame (a progressive refinement also needs the
    earlier scans of its component, walked for which coefficients are nonzero); with a restart
    interval, whether all its restart markers are there and the last interval is whole. Frames that
    are not Huffman-coded (arithmetic, lossless) are left to the decoder."""
    from . import jpeg_entropy as je

    if frame is None:
        return "a JPEG scan before any frame header (corrupt)"
    kind, comps = frame
    if kind not in _HUFFMAN_SOF or height == 0 or width == 0:
        return None  # height 0: set by a DNL marker after the scan
    if not comps or any(not (1 <= h <= 4 and 1 <= v <= 4) for _, h, v in comps):
        return "a malformed JPEG frame header (corrupt)"
    hmax, vmax = max(c[1] for c in comps), max(c[2] for c in comps)
    ids = {c[0]: i for i, c in enumerate(comps)}
    parsed = [_scan_header(seg, ids, kind == 0xC2) for seg, *_ in scans]
    last = parsed[-1]
    if last is None:
        return "a malformed JPEG scan header (corrupt)"
    todo = [len(scans) - 1]
    cs, ss, se, ah, _ = last
    if kind == 0xC2 and ss > 0 and ah > 0:  # a refinement reads the nonzero coefficients of earlier scans
        todo = [i for i, p in enumerate(parsed[:-1]) if p is not None and p[0] == cs and p[1] > 0] + todo
    nz = None
    for i in todo:
        seg, tables, restart, start, stop, rsts, after = scans[i]
        cs, ss, se, ah, tsel = parsed[i]
        if len(cs) == 1:  # non-interleaved: the component's own blocks, one per MCU
            _, h, v = comps[cs[0]]
            units = _ceil(_ceil(width * h, hmax), 8) * _ceil(_ceil(height * v, vmax), 8)
            nblk = np.ones(1, np.int64)
        else:
            units = _ceil(width, 8 * hmax) * _ceil(height, 8 * vmax)
            nblk = np.array([comps[c][1] * comps[c][2] for c in cs], np.int64)
        mode = 0 if kind != 0xC2 else (1 if ah == 0 else 2) if ss == 0 else (3 if ah == 0 else 4)
        decoding = _decoding_tables(tables, tsel, dc=mode <= 1, ac=mode in (0, 3, 4))
        if decoding is None:  # a table not defined (libjpeg-turbo then uses the standard ones): unchecked
            return None
        if decoding is False:
            return "a malformed Huffman table in the JPEG (corrupt)"
        look, maxcode, valoff, vals, dct, act = decoding
        if mode >= 3 and nz is None:
            nz = np.zeros((units, 64), np.bool_)
        u0 = 0
        if restart and i == len(scans) - 1:  # only the last interval can be cut: count the markers
            intervals = -(-units // restart)
            if rsts < intervals - 1:
                return _CUT
            if rsts == intervals - 1 and rsts > 0:
                u0, start = (intervals - 1) * restart, after
        status = je.walk(a, start, stop, u0, units, restart, nblk, dct, act, mode, ss, se,
                         nz if nz is not None else np.zeros((1, 64), np.bool_), look, maxcode, valoff, vals)
        if status == je.SHORT:
            return _CUT
        if status == je.BAD_CODE:
            return "an invalid Huffman code in the JPEG's image data (corrupt)"
        if status == je.BAD_RESTART:
            return "a restart marker missing in the JPEG's image data (corrupt)"
    return None


def _ceil(x: int, y: int) -> int:
    return -(-x // y)


def _scan_header(seg, ids, progressive):
    """(component indices, Ss, Se, Ah, [(DC table, AC table)]) of an SOS segment, or None if malformed."""
    if not seg or len(seg) < 4 + 2 * seg[0] or not 1 <= seg[0] <= 4:
        return None
    ns = seg[0]
    cs, tsel = [], []
    for j in range(ns):
        c = ids.get(seg[1 + 2 * j])
        if c is None:
            return None
        cs.append(c)
        tsel.append((seg[2 + 2 * j] >> 4, seg[2 + 2 * j] & 15))
    ss, se, ah = seg[1 + 2 * ns], seg[2 + 2 * ns], seg[3 + 2 * ns] >> 4
    if progressive and (se < ss or se > 63 or (ss == 0 and se != 0) or (ss > 0 and ns != 1)):
        return None
    return cs, ss, se, ah, tsel


def _decoding_tables(tables, tsel, *, dc, ac):
    """The decoding tables (:func:`~fastgenlabel.loader.jpeg_entropy.build_tables`) of a scan's
    tables, and each component's DC and AC table index in them; None if one is missing, False if one
    is malformed."""
    from . import jpeg_entropy as je

    keys = sorted({(0, d) for d, _ in tsel} if dc else set()) + sorted({(1, t) for _, t in tsel} if ac else set())
    specs = []
    for key in keys:
        spec = tables.get(key)
        if spec is None:
            return None
        if len(spec) < 16 or len(spec) != 16 + sum(spec[:16]):
            return False
        specs.append(spec)
    ckey = tuple(specs)
    built = _TABLE_CACHE.get(ckey)
    if built is None:
        t = len(specs)
        spec = np.zeros((max(t, 1), 272), np.uint8)
        for i, s in enumerate(specs):
            spec[i, :len(s)] = np.frombuffer(s, np.uint8)
        look = np.zeros((max(t, 1), 1 << je.LOOKAHEAD), np.int32)
        maxcode = np.full((max(t, 1), 17), -1, np.int64)
        valoff = np.zeros((max(t, 1), 17), np.int64)
        vals = np.zeros((max(t, 1), 256), np.int64)
        if not je.build_tables(spec[:t], look, maxcode, valoff, vals):
            return False
        if len(_TABLE_CACHE) > 256:
            _TABLE_CACHE.clear()
        built = _TABLE_CACHE[ckey] = (look, maxcode, valoff, vals)
    index = {key: i for i, key in enumerate(keys)}
    dct = np.array([index.get((0, d), 0) for d, _ in tsel], np.int64)
    act = np.array([index.get((1, t), 0) for _, t in tsel], np.int64)
    return (*built, dct, act)


def png_structure(data) -> tuple[str | None, int, int]:
    """(problem or None, width, height) of an encoded PNG (that starts with the PNG signature)."""
    b = _buffer(data)
    n = len(b)
    pos, width, height = 8, 0, 0
    while True:
        if pos + 8 > n:
            return "the file ends before the PNG's IEND chunk (truncated)", width, height
        size = int.from_bytes(b[pos:pos + 4], "big")
        kind = b[pos + 4:pos + 8]
        if pos + 12 + size > n:
            return f"the PNG's {kind.decode('latin-1')!r} chunk runs past the end of the file (truncated)", \
                width, height
        if pos == 8:
            if kind != b"IHDR" or size < 8:
                return "a PNG whose first chunk is not IHDR (corrupt)", width, height
            width, height = int.from_bytes(b[16:20], "big"), int.from_bytes(b[20:24], "big")
        if kind == b"IEND":
            return None, width, height
        pos += 12 + size


def upright_size(data) -> tuple[int, int]:
    """(width, height) of a JPEG or PNG as the decoders return it: turned upright by its EXIF
    orientation (a JPEG's ``Exif`` APP1 segment, a PNG's ``eXIf`` chunk before IDAT), as DALI's
    decoders and PIL's ``exif_transpose`` turn it (orientations 5-8 swap the sides). Reads the
    header only; (0, 0) for anything else."""
    b = _buffer(data)
    exif, width, height = None, 0, 0
    if b[:2] == b"\xff\xd8":
        pos, n = 2, len(b)
        while pos + 4 <= n:
            if b[pos] != 0xFF:
                break
            m = b[pos + 1]
            if m == 0xFF:
                pos += 1
                continue
            if m in (0x01, 0xD8) or 0xD0 <= m <= 0xD7:
                pos += 2
                continue
            end = pos + 2 + (b[pos + 2] << 8 | b[pos + 3])
            seg = b[pos + 4:end]
            if m == 0xE1 and exif is None and seg[:6] == b"Exif\x00\x00":
                exif = seg[6:]
            elif m in _SOF and len(seg) >= 5:
                height, width = seg[1] << 8 | seg[2], seg[3] << 8 | seg[4]
                break
            if m in (0xDA, 0xD9):
                break
            pos = end
    elif b[:8] == b"\x89PNG\r\n\x1a\n" and len(b) >= 24:
        width, height = int.from_bytes(b[16:20], "big"), int.from_bytes(b[20:24], "big")
        pos = 8
        while pos + 8 <= len(b):
            size, kind = int.from_bytes(b[pos:pos + 4], "big"), b[pos + 4:pos + 8]
            if kind in (b"IDAT", b"IEND"):
                break
            if kind == b"eXIf":
                exif = b[pos + 8:pos + 8 + size]
                break
            pos += 12 + size
    return (height, width) if _orientation(exif) >= 5 else (width, height)


def _orientation(tiff) -> int:
    """The Orientation tag (0x0112) of IFD0 of a TIFF-structured EXIF block; 1 when absent or unreadable."""
    if not tiff or len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    order = "little" if tiff[:2] == b"II" else "big"
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return 1
    for e in range(int.from_bytes(tiff[ifd:ifd + 2], order)):
        p = ifd + 2 + 12 * e
        if p + 12 > len(tiff):
            return 1
        if int.from_bytes(tiff[p:p + 2], order) == 0x0112 and int.from_bytes(tiff[p + 2:p + 4], order) == 3:
            value = int.from_bytes(tiff[p + 8:p + 10], order)
            return value if 1 <= value <= 8 else 1
    return 1
