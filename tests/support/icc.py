"""Minimal ICC v2 profiles written byte by byte, so that tests can embed a real colour profile
whose effect is known in closed form (no profile files exist on the test machines, and LittleCMS
can only create sRGB, Lab and XYZ profiles itself).

- ``rgb_swapped_primaries()``: an RGB display profile whose red and green colorants are sRGB's green
  and red: a pixel (255, 0, 0) in it is sRGB's pure green, (0, 255, 0) pure red.
- ``linear_named_srgb()``: sRGB's colorants with a linear tone curve, named like an sRGB profile.
- ``grey_linear()``: a grey profile with a linear tone curve.
- ``cmyk_rotated()``: a CMYK printer profile (Lab PCS, a 2-point CLUT) in which a corner of the
  CMYK cube has the colour that the naive formula (R = (1-C)(1-K), ...) gives, with the RGB
  channels rotated (R <- G, G <- B, B <- R): pure cyan ink (255, 0, 0, 0) is sRGB yellow where
  the naive conversion says cyan.

The layouts follow the ICC.1:2001-04 specification (header, tag table, ``desc``, ``XYZ``, ``curv``,
``mft2``).
"""
from __future__ import annotations

import itertools
import struct

import numpy as np

D50 = (0.9642, 1.0, 0.8249)
#: sRGB's colorants adapted to D50 (the values of the sRGB profile's rXYZ, gXYZ, bXYZ tags)
SRGB_D50 = np.array([[0.4361, 0.3851, 0.1431], [0.2225, 0.7169, 0.0606], [0.0139, 0.0971, 0.7141]])


def _s15(v: float) -> bytes:
    return struct.pack(">i", int(round(v * 65536)))


def _xyz(x: float, y: float, z: float) -> bytes:
    return b"XYZ " + b"\0" * 4 + _s15(x) + _s15(y) + _s15(z)


def _desc(text: str) -> bytes:
    ascii_ = text.encode() + b"\0"
    return (b"desc" + b"\0" * 4 + struct.pack(">I", len(ascii_)) + ascii_
            + struct.pack(">II", 0, 0) + struct.pack(">HB", 0, 0) + b"\0" * 67)


def _curv_gamma(gamma: float) -> bytes:
    return b"curv" + b"\0" * 4 + struct.pack(">IH", 1, int(round(gamma * 256))) + b"\0\0"


def _profile(cls: bytes, space: bytes, pcs: bytes, tags: list[tuple[bytes, bytes]]) -> bytes:
    table, data = [], b""
    offset = 128 + 4 + 12 * len(tags)
    for sig, body in tags:
        table.append(struct.pack(">4sII", sig, offset + len(data), len(body)))
        data += body + b"\0" * (-len(body) % 4)
    size = offset + len(data)
    header = (struct.pack(">I", size) + b"\0" * 4 + struct.pack(">I", 0x02100000) + cls + space + pcs
              + struct.pack(">6H", 2024, 1, 1, 0, 0, 0) + b"acsp" + b"\0" * 4 + struct.pack(">I", 0)
              + b"\0" * 8 + b"\0" * 8 + struct.pack(">I", 0) + _s15(D50[0]) + _s15(D50[1]) + _s15(D50[2])
              + b"\0" * 4 + b"\0" * 16 + b"\0" * 28)
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + b"".join(table) + data


def _rgb_display(description: str, colorants: tuple, gamma: float) -> bytes:
    """An RGB display profile: ``colorants`` the XYZ (D50) of red, green and blue, one gamma curve."""
    red, green, blue = colorants
    return _profile(b"mntr", b"RGB ", b"XYZ ", [
        (b"desc", _desc(description)),
        (b"wtpt", _xyz(*D50)),
        (b"rXYZ", _xyz(*red)), (b"gXYZ", _xyz(*green)), (b"bXYZ", _xyz(*blue)),
        (b"rTRC", _curv_gamma(gamma)), (b"gTRC", _curv_gamma(gamma)), (b"bTRC", _curv_gamma(gamma)),
    ])


def rgb_swapped_primaries() -> bytes:
    r, g, b = SRGB_D50.T  # columns: the XYZ of each colorant
    return _rgb_display("test: sRGB with red and green swapped", (g, r, b), 2.2)


def linear_named_srgb() -> bytes:
    """sRGB's colorants with a linear (gamma 1.0) tone curve, described as "sRGB-elle-V2-g10.icc"
    (the name of a real linear profile): a stored value v is the linear light v, whose sRGB
    encoding is brighter."""
    return _rgb_display("sRGB-elle-V2-g10.icc", tuple(SRGB_D50.T), 1.0)


def grey_linear() -> bytes:
    """A grey display profile with a linear tone curve: a stored grey v is the linear light v."""
    return _profile(b"mntr", b"GRAY", b"XYZ ", [
        (b"desc", _desc("test: linear grey")), (b"wtpt", _xyz(*D50)), (b"kTRC", _curv_gamma(1.0)),
    ])


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1] -> CIE Lab relative to D50 (the ICC PCS)."""
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = SRGB_D50 @ lin / np.array(D50)
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def cmyk_rotated() -> bytes:
    clut = b""
    for c, m, y, k in itertools.product((0, 1), repeat=4):  # the first input varies slowest
        naive = np.array([(1 - c) * (1 - k), (1 - m) * (1 - k), (1 - y) * (1 - k)], dtype=float)
        L, a, b = _srgb_to_lab(naive[[1, 2, 0]])
        # lut16 legacy Lab encoding: L 0..100 -> 0..0xFF00, a/b -128..127.996 -> 0..0xFFFF
        clut += struct.pack(">3H", round(L / 100 * 0xFF00), round((a + 128) * 256), round((b + 128) * 256))
    identity = b"".join(_s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
    ramp = struct.pack(">2H", 0, 0xFFFF)
    mft2 = (b"mft2" + b"\0" * 4 + struct.pack(">BBBB", 4, 3, 2, 0) + identity + struct.pack(">HH", 2, 2)
            + ramp * 4 + clut + ramp * 3)
    return _profile(b"prtr", b"CMYK", b"Lab ", [
        (b"desc", _desc("test: naive CMYK with the RGB channels rotated")),
        (b"wtpt", _xyz(*D50)),
        (b"A2B0", mft2),
    ])
