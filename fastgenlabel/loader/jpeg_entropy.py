"""Numba walks over a JPEG's entropy-coded data: where a scan ends, and whether it holds all its blocks.

A JPEG cut short and closed with an end-of-image marker passes the decoders: libjpeg reads zero
bits past the marker, fills the missing blocks with grey and only prints "premature end of data
segment". :func:`walk` decodes a scan's Huffman codes (the code lengths and the lengths of their
extra bits: no coefficients, no IDCT) over a range of its MCUs and reports SHORT when they need
bits past the data, which is exactly when libjpeg warns. Tables are looked up 9 bits at a time
(:func:`build_tables`); longer codes take the canonical slow path.

Compiled on first use and cached on disk (``cache=True``); where no cache folder can be written
(numba tries ``NUMBA_CACHE_DIR``, the package's ``__pycache__``, then the user's cache) the
functions compile in memory instead.
"""
from __future__ import annotations

import numba
import numpy as np

OK, SHORT, BAD_CODE, BAD_RESTART = range(4)
LOOKAHEAD = 9


def _jit(fn, **kw):
    try:
        return numba.njit(cache=True, nogil=True, **kw)(fn)
    except RuntimeError:  # "cannot cache function": no writable cache location
        return numba.njit(nogil=True, **kw)(fn)


@_jit
def next_marker(data, pos):
    """(offset of the next marker's 0xFF at or after pos, restart markers passed, offset just after
    the last of them or -1). Stuffed 0xFF00, fill bytes 0xFFFF.. and RSTn are not markers here;
    ``len(data)`` when no marker follows."""
    n = len(data)
    rst, after = 0, -1
    while pos + 1 < n:
        if data[pos] != 0xFF:
            pos += 1
            continue
        m = data[pos + 1]
        if m == 0 or m == 0xFF:
            pos += 1 if m == 0xFF else 2
        elif 0xD0 <= m <= 0xD7:
            rst += 1
            pos += 2
            after = pos
        else:
            return pos, rst, after
    return n, rst, after


@_jit
def build_tables(spec, look, maxcode, valoff, vals):
    """Decoding tables of Huffman tables ``spec[t]`` (16 code counts, then the symbols): ``look[t, i]``
    = (code length << 8) | symbol for the codes of at most LOOKAHEAD bits starting with the bits of i
    (0: a longer code); ``maxcode[t, l]`` (-1: none) and ``valoff[t, l]`` for a code of length l.
    Returns False for a malformed table (more codes than fit their lengths, or than 256 symbols)."""
    for t in range(spec.shape[0]):
        look[t, :] = 0
        code, k = 0, 0
        for length in range(1, 17):
            count = np.int64(spec[t, length - 1])
            if k + count > 256 or code + count > (1 << length):
                return False
            valoff[t, length] = k - code
            maxcode[t, length] = code + count - 1 if count else -1
            for _ in range(count):
                vals[t, k] = spec[t, 16 + k]
                if length <= LOOKAHEAD:
                    span = 1 << (LOOKAHEAD - length)
                    look[t, code * span:(code + 1) * span] = (length << 8) | spec[t, 16 + k]
                k += 1
                code += 1
            code <<= 1
    return True


@_jit
def _fill(data, pos, stop, buf, nbits, pad):
    """Top the bit buffer up to more than 48 bits: 0xFF00 is a 0xFF byte; a marker or ``stop`` ends
    the data, after which zero bits are added and counted in ``pad`` (consuming them is the error)."""
    while nbits <= 48:
        byte = 0
        if pad == 0 and pos < stop:
            byte = data[pos]
            if byte == 0xFF:
                if data[pos + 1] == 0:
                    pos += 2
                else:
                    byte = 0
                    pad = 8
            else:
                pos += 1
        else:
            pad += 8
        buf = (buf << 8) | byte
        nbits += 8
    return pos, buf, nbits, pad


@_jit
def _decode(buf, nbits, t, look, maxcode, valoff, vals):
    """(symbol, code length) of the code at the top of the buffer (>= 16 bits) in table t; (-1, 0): none."""
    e = look[t, (buf >> (nbits - LOOKAHEAD)) & ((1 << LOOKAHEAD) - 1)]
    if e:
        return e & 255, e >> 8
    for n in range(LOOKAHEAD + 1, 17):
        code = (buf >> (nbits - n)) & ((1 << n) - 1)
        if code <= maxcode[t, n]:
            return vals[t, valoff[t, n] + code], n
    return -1, 0


@_jit
def walk(data, start, stop, u0, u1, restart, nblk, dct, act, mode, ss, se, nz, look, maxcode, valoff, vals):
    """Walk MCUs u0..u1-1 of a scan whose entropy-coded data for MCU u0 start at ``start`` and whose
    data end at the marker at ``stop``. Returns OK, SHORT (the codes need bits past the data: the
    scan was cut), BAD_CODE or BAD_RESTART (no restart marker where an interval ends).

    ``nblk[j]``: blocks of scan component j per MCU, ``dct[j]``/``act[j]`` its tables; ``mode``
    0: sequential, 1: DC first, 2: DC refinement, 3: AC first, 4: AC refinement (``ss..se``: the
    band). Progressive AC scans have one component and MCU u is its block u: ``nz[u, k]`` marks the
    coefficients known to be nonzero, set by both AC kinds and read by refinements (which spend a
    correction bit on each), as in libjpeg's decode_mcu_AC_refine.
    """
    pos, buf, nbits, pad, eobrun = start, np.int64(0), 0, 0, 0
    ns = len(nblk)
    for u in range(u0, u1):
        if restart > 0 and u > u0 and u % restart == 0:  # the bits left are padding; then RSTn
            if nbits < pad:
                return SHORT
            while pos < stop and not (data[pos] == 0xFF and data[pos + 1] != 0 and data[pos + 1] != 0xFF):
                pos += 1
            if pos >= stop:
                return SHORT
            if not 0xD0 <= data[pos + 1] <= 0xD7:
                return BAD_RESTART
            pos, buf, nbits, pad, eobrun = pos + 2, np.int64(0), 0, 0, 0
        for j in range(ns):
            for _ in range(nblk[j]):
                if nbits < 32:
                    pos, buf, nbits, pad = _fill(data, pos, stop, buf, nbits, pad)
                if mode <= 1:  # the DC difference: a code, then as many bits as it says
                    s, length = _decode(buf, nbits, dct[j], look, maxcode, valoff, vals)
                    if s < 0 or s > 16:
                        return BAD_CODE
                    nbits -= length + s
                elif mode == 2:
                    nbits -= 1
                if mode == 0:
                    k = 1
                    while k < 64:
                        if nbits < 32:
                            pos, buf, nbits, pad = _fill(data, pos, stop, buf, nbits, pad)
                        rs, length = _decode(buf, nbits, act[j], look, maxcode, valoff, vals)
                        if rs < 0:
                            return BAD_CODE
                        nbits -= length
                        r, s = rs >> 4, rs & 15
                        if s:
                            k += r + 1
                            nbits -= s
                        elif r == 15:
                            k += 16
                        else:
                            break
                elif mode == 3:
                    if eobrun > 0:
                        eobrun -= 1
                        continue
                    k = ss
                    while k <= se:
                        if nbits < 32:
                            pos, buf, nbits, pad = _fill(data, pos, stop, buf, nbits, pad)
                        rs, length = _decode(buf, nbits, act[j], look, maxcode, valoff, vals)
                        if rs < 0:
                            return BAD_CODE
                        nbits -= length
                        r, s = rs >> 4, rs & 15
                        if s:
                            k += r
                            nbits -= s
                            if k <= 63:
                                nz[u, k] = True
                            k += 1
                        elif r == 15:
                            k += 16
                        else:  # an end-of-band run of 2**r + (r bits) blocks, this one included
                            eobrun = (1 << r) - 1
                            if r:
                                eobrun += (buf >> (nbits - r)) & ((1 << r) - 1)
                                nbits -= r
                            break
                elif mode == 4:
                    k = ss
                    if eobrun == 0:
                        while k <= se:
                            if nbits < 32:
                                pos, buf, nbits, pad = _fill(data, pos, stop, buf, nbits, pad)
                            rs, length = _decode(buf, nbits, act[j], look, maxcode, valoff, vals)
                            if rs < 0:
                                return BAD_CODE
                            nbits -= length
                            r, s = rs >> 4, rs & 15
                            if s:
                                nbits -= 1  # the new coefficient's sign
                            elif r != 15:
                                eobrun = 1 << r
                                if r:
                                    eobrun += (buf >> (nbits - r)) & ((1 << r) - 1)
                                    nbits -= r
                                break
                            while k <= se:  # a correction bit per nonzero coefficient, up to the (r+1)-th zero
                                if nz[u, k]:
                                    if nbits < 8:
                                        pos, buf, nbits, pad = _fill(data, pos, stop, buf, nbits, pad)
                                    nbits -= 1
                                elif r == 0:
                                    break
                                else:
                                    r -= 1
                                k += 1
                            if s and k <= 63:
                                nz[u, k] = True
                            k += 1
                    if eobrun > 0:  # in an end-of-band run: correction bits only
                        while k <= se:
                            if nz[u, k]:
                                if nbits < 8:
                                    pos, buf, nbits, pad = _fill(data, pos, stop, buf, nbits, pad)
                                nbits -= 1
                            k += 1
                        eobrun -= 1
    return SHORT if nbits < pad else OK
