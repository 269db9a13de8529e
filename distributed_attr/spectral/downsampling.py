"""Where a CNN's gradient high frequencies come from: the downsampling stages.

A stride-s stage (strided convolution, max- or average-pooling) keeps one sample in s along each
axis. In the backward pass it scatters each output gradient back onto one position in s (a
"bed of nails"), which is a zero-insertion upsampling: its spectrum is the stage's output-gradient
spectrum plus s - 1 mirrored copies (images) that fill the band above 1/(2s) cycles per pixel.
Those copies are the high-frequency, grid-like power seen in gradient maps.

``stage_gradient_spectra`` measures the gradient's radial spectrum at the input of every stage
(and at the model input); ``antialiased`` builds the BlurPool version of a model (Zhang, "Making
Convolutional Networks Shift-Invariant Again", ICML 2019): every strided op is run at stride 1,
blurred with a binomial filter, then subsampled, with the same weights. Comparing the input
gradients' spectra of both models isolates the aliasing. docs/spectra.md has the numbers on the
digits zoo models.
"""
from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .radial import radial_spectrum

__all__ = [
    "BlurPool2d",
    "antialiased",
    "compare_input_gradient_spectra",
    "downsampling_stages",
    "stage_gradient_spectra",
]


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _stride_of(module: nn.Module, include_blurpool: bool = False) -> tuple[int, int] | None:
    """The module's stride if it is a downsampling stage (stride > 1 on some axis), else None."""
    if include_blurpool and isinstance(module, BlurPool2d):
        stride = module.stride
    elif isinstance(module, nn.Conv2d):
        stride = _pair(module.stride)
    elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        stride = _pair(module.stride if module.stride is not None else module.kernel_size)
    else:
        return None
    return stride if max(stride) > 1 else None


def downsampling_stages(model: nn.Module, include_blurpool: bool = False) -> list[tuple[str, nn.Module]]:
    """Every strided ``Conv2d``, ``MaxPool2d`` and ``AvgPool2d`` (stride > 1), by dotted name,
    in registration order; with ``include_blurpool`` also every ``BlurPool2d`` (the subsampling
    step of an antialiased model)."""
    return [(name, m) for name, m in model.named_modules()
            if name and _stride_of(m, include_blurpool) is not None]


def _channel_mean_spectrum(grad: Tensor) -> tuple[Tensor, Tensor]:
    """Radial spectrum of each channel's gradient, averaged over channels and images: power is
    additive, so this is the spectrum of the sum of squares spread evenly over channels."""
    n, c, h, w = grad.shape
    freqs, profile = radial_spectrum(grad.reshape(n * c, h, w))
    return freqs, profile.reshape(n, c, -1).mean(dim=(0, 1))


def stage_gradient_spectra(
    model: nn.Module, x: Tensor, target: Tensor | Sequence[int] | int
) -> dict[str, tuple[Tensor, Tensor]]:
    """Radial spectrum of d f_target / d (input of each downsampling stage), and of the input.

    Stages are the strided Conv2d / MaxPool2d / AvgPool2d and, in an ``antialiased`` model, the
    BlurPool2d modules (whose input is the stride-1 op's output, before the blur).

    Returns ``{"input": (freqs, power), "<stage name>": (freqs, power), ...}`` in execution order;
    ``power`` (F,) is the per-channel spectrum averaged over channels and images, ``freqs`` in
    cycles per pixel *of that stage's grid* (a stage at half resolution: multiply by 1/2 for cycles
    per input pixel). A module called several times gets ``name#2``, ``name#3``... Stages that
    share their input (a ResNet block's strided conv and its strided shortcut) see the same total
    gradient. The model runs in its current mode (call ``model.eval()`` first)."""
    x = x.detach()
    t = torch.as_tensor(target, dtype=torch.int64, device=x.device)
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    captured: list[tuple[str, Tensor]] = []
    calls: dict[str, int] = {}

    def make_hook(name: str):
        def hook(_module, args):
            calls[name] = calls.get(name, 0) + 1
            label = name if calls[name] == 1 else f"{name}#{calls[name]}"
            captured.append((label, args[0]))

        return hook

    stages = downsampling_stages(model, include_blurpool=True)
    handles = [m.register_forward_pre_hook(make_hook(name)) for name, m in stages]
    try:
        xi = x.requires_grad_(True)
        with torch.enable_grad():
            logits = model(xi)
            score = logits.gather(1, t.view(-1, 1)).sum()
        tensors = [xi] + [tensor for _, tensor in captured]
        grads = torch.autograd.grad(score, tensors, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for label, grad, tensor in zip(["input"] + [n for n, _ in captured], grads, tensors):
        if grad is None:  # the stage does not influence the target
            grad = torch.zeros_like(tensor)
        out[label] = _channel_mean_spectrum(grad.detach().float())
    return out


def _binomial(size: int) -> list[float]:
    return [float(math.comb(size - 1, k)) for k in range(size)]


class BlurPool2d(nn.Module):
    """Binomial blur then subsampling by ``stride`` (Zhang 2019), channel by channel.

    The filter is the outer product of binomial rows of length ``filter_size`` (3: [1, 2, 1]/4)
    along the strided axes only, normalised to sum 1; the input is padded by reflection so that
    the output keeps the position and size of a plain stride-``stride`` operation."""

    def __init__(self, stride: int | tuple[int, int] = 2, filter_size: int = 3, pad_mode: str = "reflect"):
        super().__init__()
        if filter_size < 1:
            raise ValueError(f"filter_size must be >= 1, got {filter_size}")
        self.stride = _pair(stride)
        self.filter_size = int(filter_size)
        self.pad_mode = pad_mode
        rows = [_binomial(filter_size) if s > 1 else [1.0] for s in self.stride]
        kernel = torch.outer(torch.tensor(rows[0]), torch.tensor(rows[1]))
        self.register_buffer("kernel", (kernel / kernel.sum())[None, None], persistent=False)
        ky, kx = len(rows[0]), len(rows[1])
        # (left, right, top, bottom): odd sizes centred, even sizes one more on the right/bottom
        self.padding = ((kx - 1) // 2, kx // 2, (ky - 1) // 2, ky // 2)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        y = x.reshape(n * c, 1, h, w)
        if any(self.padding):
            y = F.pad(y, self.padding, mode=self.pad_mode)
        y = F.conv2d(y, self.kernel.to(device=y.device, dtype=y.dtype), stride=self.stride)
        return y.reshape(n, c, y.shape[-2], y.shape[-1])

    def extra_repr(self) -> str:
        return f"stride={self.stride}, filter_size={self.filter_size}, pad_mode={self.pad_mode!r}"


def _stride_one_copy(module: nn.Module) -> nn.Module:
    """The same op with stride 1 (and the same weights)."""
    if isinstance(module, nn.Conv2d):
        conv = nn.Conv2d(
            module.in_channels, module.out_channels, module.kernel_size, stride=1,
            padding=module.padding, dilation=module.dilation, groups=module.groups,
            bias=module.bias is not None, padding_mode=module.padding_mode,
            device=module.weight.device, dtype=module.weight.dtype,
        )
        conv.load_state_dict(module.state_dict())
        return conv
    if isinstance(module, nn.MaxPool2d):
        return nn.MaxPool2d(module.kernel_size, stride=1, padding=module.padding,
                            dilation=module.dilation, ceil_mode=module.ceil_mode)
    if isinstance(module, nn.AvgPool2d):
        return nn.AvgPool2d(module.kernel_size, stride=1, padding=module.padding, ceil_mode=module.ceil_mode,
                            count_include_pad=module.count_include_pad, divisor_override=module.divisor_override)
    raise TypeError(f"not a downsampling op: {type(module).__name__}")


def antialiased(model: nn.Module, filter_size: int = 3) -> nn.Module:
    """A deep copy of ``model`` whose every strided Conv2d / MaxPool2d / AvgPool2d is replaced by
    ``Sequential(<same op at stride 1>, BlurPool2d(stride, filter_size))`` with the same weights.
    The original model is not modified; output shapes are preserved."""
    clone = copy.deepcopy(model)
    for name, module in downsampling_stages(clone):
        parent_name, _, child = name.rpartition(".")
        parent = clone.get_submodule(parent_name) if parent_name else clone
        blurred = nn.Sequential(_stride_one_copy(module), BlurPool2d(_stride_of(module), filter_size))
        blurred.train(module.training)
        setattr(parent, child, blurred)
    return clone


def compare_input_gradient_spectra(
    model: nn.Module, x: Tensor, target: Tensor | Sequence[int] | int, filter_size: int = 3
) -> dict[str, tuple[Tensor, Tensor]]:
    """Side by side: the input gradient's mean radial spectrum for ``model`` and for
    ``antialiased(model, filter_size)`` (same weights, same images, same targets):
    ``{"original": (freqs, power), "antialiased": (freqs, power)}``."""
    blurred = antialiased(model, filter_size)  # a deep copy keeps the train/eval mode
    return {
        "original": stage_gradient_spectra(model, x, target)["input"],
        "antialiased": stage_gradient_spectra(blurred, x, target)["input"],
    }
