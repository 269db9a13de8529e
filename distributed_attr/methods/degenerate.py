"""Degenerate maps: maps that carry no attribution, told apart per image.

A map (H, W) is

- **all zero** (``ALL_ZERO`` = 1): every finite value is exactly 0 (a target whose gradient
  vanishes: a zero-initialised classifier head, a saturated softmax, a layer that blocks
  gradients);
- **constant** (``CONSTANT`` = 2): not all zero, but its finite values span no more than
  ``CONSTANT_ULPS`` roundings of their magnitude: ``max - min <= CONSTANT_ULPS * eps *
  max(|max|, |min|)``, ``eps`` the machine epsilon of the maps' dtype (float32: 1.19e-7, so a
  spread below 1.9e-6 of the value). Values that equal each other up to the rounding of the sums
  that produced them count as equal; any real variation (even a 2 x 2 CAM grid upsampled) does
  not;
- **non-finite** (``NON_FINITE`` = 4): at least one value is NaN or +-inf.

The flags are bits of one uint8 per map. Zero and constant are judged on the finite values, so a
map with NaNs among zeros is ``NON_FINITE | ALL_ZERO`` (5); a map without any finite value is
``NON_FINITE`` alone. 0 = an ordinary map.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

ALL_ZERO = 1
CONSTANT = 2
NON_FINITE = 4
#: the flags by name, as the store records them (``degenerate/<method>``'s ``flags`` attribute)
FLAGS = {"all_zero": ALL_ZERO, "constant": CONSTANT, "non_finite": NON_FINITE}
#: a map whose finite values spread over at most this many machine epsilons of their magnitude
#: is constant
CONSTANT_ULPS = 16


def degenerate_flags(maps: Tensor) -> Tensor:
    """(N, ...) maps -> (N,) uint8 flags (``ALL_ZERO``, ``CONSTANT``, ``NON_FINITE``, or 0), on
    the maps' device. One min and one max reduction over each map (both propagate NaN, so finite
    extremes prove every value finite); maps with non-finite values take a second pass that
    leaves those out."""
    if maps.dim() < 1:
        raise ValueError("degenerate_flags needs a batch of maps (N, ...)")
    n = maps.shape[0]
    flat = maps.detach().reshape(n, -1)
    if not flat.is_floating_point():
        flat = flat.float()
    if flat.shape[1] == 0:
        return torch.zeros(n, dtype=torch.uint8, device=flat.device)
    # the extremes in float64, where their difference is exact: (2, N) = (min, max)
    ext = torch.stack([flat.amin(dim=1), flat.amax(dim=1)]).double()  # (faster than aminmax on the CPU)
    non_finite = ~torch.isfinite(ext).all(dim=0)
    if bool(non_finite.any()):  # the extremes of the finite values alone (none: +-inf, no flag below)
        finite = torch.isfinite(flat)
        big = torch.finfo(flat.dtype).max
        ext = torch.stack([torch.where(finite, flat, flat.new_full((), big)).amin(dim=1),
                           torch.where(finite, flat, flat.new_full((), -big)).amax(dim=1)]).double()
        ext = torch.where(finite.any(dim=1), ext, torch.full_like(ext, math.inf))
    magnitude = ext.abs().amax(dim=0)
    tolerance = CONSTANT_ULPS * torch.finfo(flat.dtype).eps * magnitude
    all_zero = magnitude == 0
    constant = ~all_zero & (ext[1] - ext[0] <= tolerance)  # false for inf magnitudes (inf - inf is NaN)
    # the bits are distinct: the sum is their union
    return all_zero.to(torch.uint8) * ALL_ZERO + constant.to(torch.uint8) * CONSTANT \
        + non_finite.to(torch.uint8) * NON_FINITE


def flag_names(flags: int) -> list[str]:
    """The names of the bits set in one flag value (``FLAGS`` order)."""
    return [name for name, bit in FLAGS.items() if int(flags) & bit]


#: the likely cause of each kind of degenerate map, by the method's family ("" : any family)
CAUSES = {
    ("all_zero", "gradient"): "the target's gradient is zero for these images: a zero-initialised or untrained "
                              "classifier head, a saturated softmax, or a layer that blocks gradients",
    ("all_zero", ""): "the target's score does not change when these images are perturbed: a model whose output "
                      "ignores its input (a zero-initialised or untrained classifier head) or a saturated softmax",
    ("constant", ""): "the map does not vary over the image: the target's score does not depend on the input (a "
                      "zero-initialised or untrained classifier head, a saturated softmax), or a CAM layer of one "
                      "position",
    ("non_finite", ""): "NaN or inf in the maps: an overflow (run.autocast float16, a huge logit), a zero "
                        "denominator in the method, or a model that outputs NaN for these images",
}


def likely_cause(kind: str, family: str = "", cam: bool = False) -> str:
    """The likely cause of maps of ``kind`` ("all_zero", "constant", "non_finite") for a method of
    ``family`` ("gradient", "prediction", ...); ``cam``: a CAM method (its ReLU zeroes a map whose
    gradient-weighted activations are negative everywhere)."""
    cause = CAUSES.get((kind, family)) or CAUSES[(kind, "")]
    if cam and kind == "all_zero":
        cause += ("; or the CAM layer's gradient-weighted activations are negative everywhere (Grad-CAM's ReLU "
                  "keeps none of them)")
    return cause
