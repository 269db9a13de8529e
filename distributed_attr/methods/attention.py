"""Attention-based maps for vision transformers: ``attention_rollout`` (Abnar & Zuidema 2020) and
``attention_relevance`` (Chefer, Gur & Wolf, ICCV 2021).

Both read the attention probabilities A_b (N, heads, T, T) of every block b, in the order the
blocks run, and combine them into a (T, T) matrix per image whose class-token row over the patch
tokens is the map (laid out on the patch grid as ``base.grid_layout`` does for CAM layers, then
upsampled bilinearly to the input size):

- rollout: Ā_b = heads fused (mean, max or min), optionally its lowest entries discarded;
  Â_b = (Ā_b + I) with rows renormalised to sum to 1 (the identity stands for the residual);
  R = Â_L ... Â_2 Â_1. Forward passes only.
- relevance: R = I, then for each block in order R <- R + Ē_b R, Ē_b = mean over heads of
  (dS/dA_b ⊙ A_b)^+, S the target logit. One forward and one backward pass.

Where the probabilities come from (the model is put back exactly as it was after every chunk,
also when the forward fails; hooks and patches live only while the chunk runs):

- torch ``nn.MultiheadAttention`` (torchvision's ``VisionTransformer`` calls it with
  ``need_weights=False``, which runs a fused kernel that never forms A): its ``forward`` is
  replaced, for the call, by an explicit computation from the module's own weights,
  A = softmax(q k^T / sqrt(d)) with q, k, v = x W_in^T + b_in split into heads, output
  ``out_proj``(A v). Only self-attention with one packed input projection and no masks, bias_k or
  zero attention is accepted (what torchvision's ViT uses); the logits equal the model's own up
  to rounding (tested).
- timm attention modules (those with a ``fused_attn`` flag and an ``attn_drop`` module: ViT,
  DeiT, ViT with registers, ...): ``fused_attn`` is set to False for the call, so timm's own
  explicit path runs, and a forward hook on ``attn_drop`` catches the probabilities it returns,
  the tensor timm multiplies with v.
- Hugging Face models (``PreTrainedModel``, also inside ``io.models.LogitsOf``): the modules their
  class lists under ``_can_record_outputs["attentions"]`` (``ViTAttention``, ...), switched to the
  "eager" attention implementation for the call (the config's ``_attn_implementation``); a forward
  hook takes the probabilities from their output (index 1 unless the ``OutputRecorder`` says
  otherwise), as ``output_attentions=True`` would. Eager attention computes the softmax in float32
  even for float64 models (transformers' choice).

The probabilities are the ones the model multiplies with the values: after attention dropout,
which is the identity in eval mode. Every block must run once per forward and give one square
(n, heads, T, T) matrix per image, with the same T in every block; windowed attention (Swin),
pooling attention (a latent query) or a block that did not run fail with the module named.
"""
from __future__ import annotations

import contextlib
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import (
    Context,
    GridLayout,
    GroupedMethod,
    Method,
    ModelCheckError,
    autocast_ctx,
    grid_layout,
    register,
    run_in_chunks,
    select_scores,
    working_dtype,
)
from .gradient import upsample_to

#: what the methods can read, for error messages
SUPPORTED = (
    "torch nn.MultiheadAttention (self-attention, packed input projection; torchvision ViT), "
    "timm attention modules (fused_attn flag and attn_drop: ViT, DeiT, registers), "
    "Hugging Face attention modules listed in the model class's _can_record_outputs['attentions'] (ViT, DeiT, ...)"
)


# --------------------------------------------------------------------------------------------
# Finding the attention modules
# --------------------------------------------------------------------------------------------


@dataclass
class AttentionSite:
    """One attention module the methods read: its dotted name, the module, the library whose
    conventions apply ("torch", "timm" or "huggingface"), and for Hugging Face the config whose
    attention implementation is switched and the output index holding the probabilities."""

    name: str
    module: nn.Module
    library: str
    config: Any = None
    index: int = 1


def _is_hf_pretrained(module: nn.Module) -> bool:
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers")
               for c in type(module).__mro__)


def _hf_specs(model: nn.Module) -> dict[int, tuple[list[tuple[Any, str | None, str | None, int]], Any]]:
    """For every Hugging Face ``PreTrainedModel`` inside ``model``: (its attention specs, its
    config), keyed by id. A spec is (class or None, class-name suffix or None, layer name or None,
    output index), read from ``_can_record_outputs["attentions"]``."""
    out = {}
    for module in model.modules():
        if not _is_hf_pretrained(module):
            continue
        entries = (getattr(type(module), "_can_record_outputs", None) or {}).get("attentions")
        if entries is None:
            continue
        specs = []
        for entry in entries if isinstance(entries, (list, tuple)) else [entries]:
            if isinstance(entry, type):
                specs.append((entry, None, None, 1))
            elif isinstance(entry, str):
                specs.append((None, entry, None, 1))
            elif hasattr(entry, "target_class") or hasattr(entry, "class_name"):  # an OutputRecorder
                specs.append((getattr(entry, "target_class", None), getattr(entry, "class_name", None),
                              getattr(entry, "layer_name", None), int(getattr(entry, "index", 0) or 0)))
        out[id(module)] = (specs, getattr(module, "config", None))
    return out


def _hf_match(name: str, module: nn.Module, spec: tuple) -> bool:
    cls, class_name, layer_name, _ = spec
    hit = (cls is not None and isinstance(module, cls)) or (class_name is not None and name.endswith(class_name))
    if hit and layer_name:
        hit = f".{layer_name.strip('.')}." in f".{name}."
    return hit


def find_attention(model: nn.Module) -> tuple[list[AttentionSite], list[str]]:
    """The attention modules the methods can read, in ``named_modules()`` order, and notes on
    attention-like modules found but not readable (for the error message)."""
    sites: list[AttentionSite] = []
    notes: list[str] = []
    hf = _hf_specs(model)
    # the Hugging Face model a module belongs to: the innermost PreTrainedModel above it
    owner: dict[int, int] = {}
    for _name, module in model.named_modules():
        if id(module) in hf:
            for sub in module.modules():
                owner[id(sub)] = id(module)
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
                notes.append(f"nn.MultiheadAttention {name!r} with separate key/value sizes, bias_k/bias_v or "
                             "add_zero_attn (not supported)")
            else:
                sites.append(AttentionSite(name, module, "torch"))
        elif type(module).__module__.startswith("timm.") and hasattr(module, "fused_attn"):
            if isinstance(getattr(module, "attn_drop", None), nn.Module):
                sites.append(AttentionSite(name, module, "timm"))
            else:
                notes.append(f"timm {type(module).__name__} {name!r} without an attn_drop module (not supported)")
        elif id(module) in owner:
            specs, config = hf[owner[id(module)]]
            spec = next((s for s in specs if _hf_match(name, module, s)), None)
            if spec is not None:
                cfg = getattr(module, "config", None)
                cfg = cfg if hasattr(cfg, "_attn_implementation") else config
                if cfg is None or not hasattr(cfg, "_attn_implementation"):
                    notes.append(f"Hugging Face {type(module).__name__} {name!r} without a config whose attention "
                                 "implementation can be set to 'eager' (not supported)")
                else:
                    sites.append(AttentionSite(name, module, "huggingface", config=cfg, index=spec[3]))
    if not sites:
        for name, module in model.named_modules():
            if "attention" in type(module).__name__.lower() and not any(f"{name!r}" in n for n in notes):
                notes.append(f"{type(module).__name__} {name!r} (no known way to read its probabilities)")
    return sites, notes


def _describe_model(model: nn.Module, notes: list[str]) -> str:
    if notes:
        more = f"; ... ({len(notes)} in all)" if len(notes) > 6 else ""
        return "attention-like modules: " + "; ".join(notes[:6]) + more
    if isinstance(model, torch.jit.ScriptModule):
        return "a TorchScript module (its layers cannot be hooked)"
    leaves = Counter(type(m).__name__ for m in model.modules() if not list(m.children()))
    layers = ", ".join(f"{k} x {v}" for k, v in leaves.most_common(6)) or "none"
    return f"no attention module (the model's layers: {layers})"


# --------------------------------------------------------------------------------------------
# Recording the probabilities
# --------------------------------------------------------------------------------------------


@dataclass
class AttentionCall:
    """One call of an attention module: the probabilities it produced (normally exactly one
    (n, heads, T, T) tensor)."""

    site: AttentionSite
    probs: list[Any] = field(default_factory=list)


def _set_attr(obj: Any, name: str, value: Any, undo: list[Callable[[], None]]) -> None:
    """Set ``obj.name``, recording how to put back exactly what was there (an instance attribute
    with its value, or none)."""
    own = vars(obj)
    if name in own:
        old = own[name]
        undo.append(lambda: setattr(obj, name, old))
    else:
        undo.append(lambda: delattr(obj, name))
    setattr(obj, name, value)


def _explicit_mha(site: AttentionSite, record: Callable[[AttentionSite, Any], None]):
    """A ``forward`` for ``nn.MultiheadAttention`` that forms the probabilities explicitly from the
    module's weights (torch's own computation, written out) and records them."""
    mha = site.module

    def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise ValueError(f"attention module {site.name!r}: masked attention is not supported")
        if not (query is key and key is value) or query.dim() != 3:
            raise ValueError(f"attention module {site.name!r}: only batched self-attention (query is key is value) "
                             "is supported")
        x = query if mha.batch_first else query.transpose(0, 1)  # (n, T, E)
        n, t, e = x.shape
        h, d = mha.num_heads, mha.head_dim
        q, k, v = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).view(n, t, 3, h, d).permute(2, 0, 3, 1, 4)
        probs = torch.softmax((q * math.sqrt(1.0 / d)) @ k.transpose(-2, -1), dim=-1)  # (n, h, T, T)
        if mha.training and mha.dropout > 0:
            probs = F.dropout(probs, p=mha.dropout)
        record(site, probs)
        out = (probs @ v).transpose(1, 2).reshape(n, t, e)
        out = F.linear(out, mha.out_proj.weight, mha.out_proj.bias)
        if not mha.batch_first:
            out = out.transpose(0, 1)
        weights = (probs.mean(dim=1) if average_attn_weights else probs) if need_weights else None
        return out, weights

    return forward


@contextlib.contextmanager
def recording_attention(model: nn.Module, sites: Sequence[AttentionSite]) -> Iterator[list[AttentionCall]]:
    """While open, every call of every site is recorded, in call order, with the probabilities
    it produced. On exit (also on an error) every hook is removed and every attribute changed
    (``forward`` of torch modules, timm's ``fused_attn``, the Hugging Face configs' attention
    implementation) is put back as it was."""
    calls: list[AttentionCall] = []
    undo: list[Callable[[], None]] = []

    def record(site: AttentionSite, probs: Any) -> None:
        if not calls or calls[-1].site is not site:
            raise RuntimeError(f"attention module {site.name!r} produced probabilities outside its own call")
        calls[-1].probs.append(probs)

    def started(site: AttentionSite):
        return lambda _module, _args: calls.append(AttentionCall(site))

    switched: set[int] = set()
    try:
        for site in sites:
            undo.append(site.module.register_forward_pre_hook(started(site)).remove)
            if site.library == "torch":
                _set_attr(site.module, "forward", _explicit_mha(site, record), undo)
            elif site.library == "timm":
                _set_attr(site.module, "fused_attn", False, undo)
                hook = site.module.attn_drop.register_forward_hook(
                    lambda _m, _i, out, site=site: record(site, out))
                undo.append(hook.remove)
            else:
                if id(site.config) not in switched:
                    switched.add(id(site.config))
                    config = site.config
                    if "_attn_implementation_internal" in vars(config):
                        # the field behind the property, so that sub-configs are left alone (the
                        # property's setter recurses into them)
                        _set_attr(config, "_attn_implementation_internal", "eager", undo)
                    else:  # other transformers versions: through the attribute, put back the same way
                        old = config._attn_implementation
                        undo.append(lambda config=config, old=old: setattr(config, "_attn_implementation", old))
                        config._attn_implementation = "eager"

                def take(_m, _i, out, site=site):
                    probs = out[site.index] if isinstance(out, (tuple, list)) and len(out) > site.index else None
                    record(site, probs)

                undo.append(site.module.register_forward_hook(take).remove)
        yield calls
    finally:
        for step in reversed(undo):
            step()


def check_calls(calls: Sequence[AttentionCall], sites: Sequence[AttentionSite], n: int, who: str) -> list[Tensor]:
    """The probabilities of every block, in call order, as (n, heads, T, T) tensors; a
    ``ValueError`` naming ``who`` (the methods) and the module when a call does not give that."""
    ran = {id(c.site) for c in calls}
    missing = [s.name for s in sites if id(s) not in ran]
    if missing:
        raise ValueError(f"{who}: attention module(s) {missing} did not run in the model's forward; every attention "
                         "module found must run (a fused path that bypasses the module hides its probabilities)")
    out: list[Tensor] = []
    for c in calls:
        name = c.site.name
        if len(c.probs) != 1 or not isinstance(c.probs[0], Tensor):
            got = "none" if not c.probs or c.probs[0] is None else f"{len(c.probs)} tensors"
            raise ValueError(f"{who}: attention module {name!r} gave {got} as attention probabilities in one call, "
                             "expected one (n, heads, T, T) tensor"
                             + (" (the Hugging Face model did not run the 'eager' attention)"
                                if c.site.library == "huggingface" else ""))
        p = c.probs[0]
        heads = getattr(c.site.module, "num_heads", getattr(c.site.module, "num_attention_heads", None))
        if p.dim() != 4 or p.shape[0] != n or p.shape[2] != p.shape[3] or (
                isinstance(heads, int) and p.shape[1] != heads):
            raise ValueError(
                f"{who}: attention module {name!r} gave probabilities of shape {tuple(p.shape)} for {n} images; "
                "these methods need one square (T x T) matrix per image and head over the whole token sequence "
                "(not windowed attention as in Swin, nor a pooling query)")
        if out and p.shape[-1] != out[0].shape[-1]:
            raise ValueError(f"{who}: attention module {name!r} attends over {p.shape[-1]} tokens, the first block "
                             f"over {out[0].shape[-1]}; the blocks must share one token sequence")
        out.append(p)
    if not out:
        raise ValueError(f"{who}: no attention module ran in the model's forward")
    return out


# --------------------------------------------------------------------------------------------
# The maps
# --------------------------------------------------------------------------------------------


def fuse_heads(probs: Tensor, how: str) -> Tensor:
    """(n, heads, T, T) -> (n, T, T): mean, max or min over the heads."""
    if how == "mean":
        return probs.mean(dim=1)
    if how == "max":
        return probs.amax(dim=1)
    if how == "min":
        return probs.amin(dim=1)
    raise ValueError(f"head_fusion must be 'mean', 'max' or 'min', got {how!r}")


def discard_lowest(fused: Tensor, ratio: float) -> Tensor:
    """(n, T, T) with, per image, the floor(ratio * T^2) smallest entries set to 0, chosen among all
    entries but (0, 0) (the class token's attention to itself, which is kept)."""
    n, t, _ = fused.shape
    k = math.floor(ratio * t * t)
    if k == 0:
        return fused
    flat = fused.reshape(n, t * t)
    candidates = flat.clone()
    candidates[:, 0] = math.inf
    idx = candidates.topk(k, dim=1, largest=False).indices
    return flat.scatter(1, idx, 0.0).view(n, t, t)


def rollout(probs: Sequence[Tensor], head_fusion: str = "mean", discard_ratio: float = 0.0) -> Tensor:
    """(n, T, T) attention rollout of the blocks' probabilities, first block first."""
    result = None
    for p in probs:
        fused = fuse_heads(p, head_fusion)
        if discard_ratio > 0:
            fused = discard_lowest(fused, discard_ratio)
        a = fused + torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
        a = a / a.sum(dim=-1, keepdim=True)
        result = a if result is None else a @ result
    assert result is not None
    return result


def relevance(probs: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
    """(n, T, T) relevance of Chefer et al. 2021 (their eq. for self-attention): R = I, then
    R <- R + mean_heads((grad * A)^+) R for every block, first block first."""
    n, _, t, _ = probs[0].shape
    r = torch.eye(t, dtype=probs[0].dtype, device=probs[0].device).expand(n, t, t)
    for p, g in zip(probs, grads):
        r = r + (g * p).clamp(min=0).mean(dim=1) @ r
    return r


def token_layout(tokens: int, prefix: int | None, size: Sequence[int], who: str) -> GridLayout:
    """How the ``tokens`` attention columns map to the patch grid: the leading (class, distillation,
    register) tokens inferred as ``base.grid_layout`` does for CAM layers, or exactly ``prefix``;
    at least one (the class token, whose row the maps read)."""
    try:
        layout = grid_layout((1, tokens, 1), "tokens" if prefix is None else prefix, size)
    except ValueError as exc:
        raise ValueError(f"{who}: the attention runs over {tokens} tokens, which cannot be mapped to the patch grid "
                         f"of the {size[0]} x {size[1]} image: {exc}. Set 'prefix_tokens'") from None
    if layout.prefix == 0:
        raise ValueError(
            f"{who}: the attention's {tokens} tokens are all patch tokens ({layout.grid[0]} x {layout.grid[1]}): the "
            "model has no class token, whose row these methods read (a model that pools its patch tokens). If the "
            "first tokens are not patches, set 'prefix_tokens'")
    return layout


def class_row_map(r: Tensor, layout: GridLayout, size: Sequence[int]) -> Tensor:
    """(n, T, T) -> (n, H, W): the class token's row (token 0) over the patch tokens, on the
    patch grid, upsampled bilinearly."""
    row = r[:, 0, :].unsqueeze(-1)  # (n, T, 1)
    return upsample_to(layout.apply(row)[:, 0], (int(size[0]), int(size[1])))


# --------------------------------------------------------------------------------------------
# The methods
# --------------------------------------------------------------------------------------------


def _validate_prefix(prefix: int | None) -> None:
    if prefix is not None and prefix < 1:
        raise ValueError(f"prefix_tokens must be >= 1 (the class token comes first), got {prefix}")


class AttentionMethod(GroupedMethod):
    """Base of the share group "attention": one forward (plus one backward when a member needs
    gradients) per chunk records every block's probabilities; each member turns them into its
    map with ``from_attention``."""

    share_group = "attention"
    signed = False
    compile_safe = False  # hooks and patches the attention modules
    channel_rule = "none needed (read from the attention over patch tokens; input channels never enter)"
    #: whether ``from_attention`` needs d(target logit)/d(probabilities)
    needs_gradient: ClassVar[bool] = False

    @dataclass
    class Params:
        prefix_tokens: int | None = None

    def from_attention(self, probs: list[Tensor], grads: list[Tensor] | None, size: Sequence[int]) -> Tensor:
        raise NotImplementedError

    def layout(self, tokens: int, size: Sequence[int]) -> GridLayout:
        return token_layout(tokens, self.params.prefix_tokens, size, self.name)

    def check_model(self, model: nn.Module, example: Tensor, ctx: Context) -> None:
        """Every attention module found runs and gives one square probability matrix per head,
        and its tokens map to the patch grid with ``prefix_tokens``: one forward of ``example``
        (a model without attention is refused before, by ``unsupported_reason``)."""
        sites, _ = find_attention(model)
        if not sites:
            return
        with recording_attention(model, sites) as calls:
            with torch.no_grad(), autocast_ctx(ctx, example.device):
                model(example.detach().to(working_dtype(example)))
        try:
            probs = check_calls(calls, sites, example.shape[0], self.name)
        except ValueError as exc:
            raise ModelCheckError(str(exc)) from None
        try:
            self.layout(probs[-1].shape[-1], tuple(example.shape[-2:]))
        except ValueError as exc:
            raise ModelCheckError(str(exc), "prefix_tokens") from None

    def resolved_choices(self, model: nn.Module, x: Tensor, ctx: Context) -> dict[str, Any]:
        """The token sequence the attention runs over (``tokens``), the leading tokens dropped
        (``prefix_tokens``) and the patch grid (h, w) the map is laid out on, from one forward
        pass of ``x``."""
        sites, notes = find_attention(model)
        if not sites:
            raise ValueError(f"{self.name}: the model has no attention these methods can read ({SUPPORTED}); "
                             f"found {_describe_model(model, notes)}")
        xi = x[:1].detach().to(working_dtype(x))
        with recording_attention(model, sites) as calls, torch.no_grad():
            model(xi)
        tokens = int(check_calls(calls, sites, 1, self.name)[0].shape[-1])
        layout = self.layout(tokens, tuple(x.shape[-2:]))
        assert layout.grid is not None
        return {"tokens": tokens, "prefix_tokens": int(layout.prefix),
                "grid": [int(layout.grid[0]), int(layout.grid[1])]}

    @classmethod
    def unsupported_reason(cls, model: nn.Module) -> str | None:
        """Why the model offers no attention these methods read (from its modules, no forward), or
        None when it has some."""
        sites, notes = find_attention(model)
        if sites:
            return None
        return f"the model has no attention these methods can read ({SUPPORTED}); found {_describe_model(model, notes)}"

    @classmethod
    def attribute_group(
        cls, methods: Sequence[Method], model: nn.Module, x: Tensor, target: Tensor, ctx: Context
    ) -> dict[str, Tensor]:
        members: list[AttentionMethod] = list(methods)  # type: ignore[arg-type]
        who = ", ".join(m.name for m in members)
        sites, notes = find_attention(model)
        if not sites:
            raise ValueError(f"{who}: the model has no attention these methods can read ({SUPPORTED}); "
                             f"found {_describe_model(model, notes)}")
        need_grad = any(m.needs_gradient for m in members)
        dtype = working_dtype(x)
        size = tuple(x.shape[-2:])

        def one(sl: slice) -> Tensor:
            xi = x[sl].detach().to(dtype)
            k = xi.shape[0]
            with recording_attention(model, sites) as calls:
                if need_grad:
                    xi.requires_grad_(True)  # the probabilities join the graph even with frozen weights
                    with torch.enable_grad(), autocast_ctx(ctx, xi.device):
                        out = model(xi)
                        score = select_scores(out, target[sl].to(out.device)).to(dtype).sum()
                else:
                    with torch.no_grad(), autocast_ctx(ctx, xi.device):
                        model(xi)
            probs = check_calls(calls, sites, k, who)
            grads = None
            if need_grad:
                raw = torch.autograd.grad(score, probs, allow_unused=True)
                grads = [torch.zeros(p.shape, dtype=dtype, device=p.device) if g is None else g.detach().to(dtype)
                         for p, g in zip(probs, raw)]
            probs = [p.detach().to(dtype) for p in probs]
            return torch.stack([m.from_attention(probs, grads, size) for m in members], dim=1)

        maps = run_in_chunks(one, x.shape[0], ctx)
        return {m.name: maps[:, i] for i, m in enumerate(members)}


@register
class AttentionRollout(AttentionMethod):
    """Attention rollout (Abnar & Zuidema 2020): the head-fused attention plus identity, rows
    renormalised, multiplied over the blocks; the class token's row over the patches."""

    name = "attention_rollout"
    family = "prediction"  # forward passes only, no gradient (the contract's families; see docs/methods.md)
    cost_unit = "forward"

    @dataclass
    class Params:
        #: how the heads' probabilities become one matrix per block: "mean" (the paper), "max", "min"
        head_fusion: Literal["mean", "max", "min"] = "mean"
        #: fraction of each fused matrix's entries set to 0 before the identity is added: the
        #: floor(discard_ratio * T^2) smallest, the class token's attention to itself excepted
        discard_ratio: float = 0.0
        #: leading non-patch tokens (class, distillation, registers); None: inferred from the count
        prefix_tokens: int | None = None

        def validate(self) -> None:
            if not 0.0 <= self.discard_ratio < 1.0:
                raise ValueError(f"discard_ratio must be in [0, 1), got {self.discard_ratio}")
            _validate_prefix(self.prefix_tokens)

    def cost(self) -> float:
        return 1.0

    def from_attention(self, probs: list[Tensor], grads: list[Tensor] | None, size: Sequence[int]) -> Tensor:
        r = rollout(probs, self.params.head_fusion, self.params.discard_ratio)
        return class_row_map(r, self.layout(r.shape[-1], size), size)


@register
class AttentionRelevance(AttentionMethod):
    """Relevance of Chefer, Gur & Wolf 2021: R = I, R += mean over heads of (grad * A)^+ times R,
    block by block; the class token's row over the patches."""

    name = "attention_relevance"
    family = "gradient"
    needs_gradient = True

    @dataclass
    class Params:
        #: leading non-patch tokens (class, distillation, registers); None: inferred from the count
        prefix_tokens: int | None = None

        def validate(self) -> None:
            _validate_prefix(self.prefix_tokens)

    def cost(self) -> float:
        return 1.0

    def from_attention(self, probs: list[Tensor], grads: list[Tensor] | None, size: Sequence[int]) -> Tensor:
        assert grads is not None
        r = relevance(probs, grads)
        return class_row_map(r, self.layout(r.shape[-1], size), size)


#: the classes this module defines, in the order they would be registered
ATTENTION_METHODS: tuple[type[AttentionMethod], ...] = (AttentionRollout, AttentionRelevance)
