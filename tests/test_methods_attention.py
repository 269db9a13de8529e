"""attention_rollout and attention_relevance against hand computations.

The oracle: every attention module of the model is replaced, in the test, by multi-head
self-attention written out head by head from the module's own weights (explicit exponentials,
one head at a time), which keeps the probabilities it forms. The model's logits through it equal
the model's own (checked), so those probabilities and their gradients are the model's. Rollout
(Abnar & Zuidema's 0.5 A + 0.5 I, multiplied from the first block) and Chefer et al.'s relevance
are then written as explicit matrix products over them, the class token's row reshaped to the
patch grid and upsampled. Tiny torchvision, timm (ViT on a non-square image, DeiT with its
distillation token, ViT with 4 registers) and Hugging Face ViTs, float64, random weights.

The methods are not registered yet (the registry-wide contract runs every method on CNNs), so
the classes are used directly, through ``compute_maps`` where the share group matters."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distributed_attr.io.models import LogitsOf
from distributed_attr.methods import Context, compute_maps
from distributed_attr.methods.attention import (
    AttentionRelevance,
    AttentionRollout,
    find_attention,
    recording_attention,
)
from distributed_attr.registry import RegistryError

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_TIMM = {"pretrained": False, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 10}
KINDS = ["torchvision", "timm_vit_nonsquare", "timm_deit_distilled", "timm_vit_registers", "hf_vit"]


def make(kind: str):
    """(model, images, targets, facts): facts give the leading tokens and the patch grid."""
    torch.manual_seed(0)
    size = (32, 32)
    if kind == "torchvision":
        size = (16, 16)
        model = torchvision.models.VisionTransformer(
            image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16, num_classes=3)
        nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision starts the head at zero
        facts = {"prefix": 1, "grid": (2, 2)}
    elif kind == "timm_vit_nonsquare":
        size = (32, 48)
        model = timm.create_model("vit_tiny_patch16_224", img_size=size, **TINY_TIMM)
        facts = {"prefix": 1, "grid": (4, 6)}
    elif kind == "timm_deit_distilled":
        model = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, **TINY_TIMM)
        facts = {"prefix": 2, "grid": (4, 4)}
    elif kind == "timm_vit_registers":
        model = timm.create_model("vit_tiny_patch16_224", img_size=32, reg_tokens=4, **TINY_TIMM)
        facts = {"prefix": 5, "grid": (4, 4)}
    elif kind == "hf_vit":
        transformers = pytest.importorskip("transformers")
        config = transformers.ViTConfig(image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=32,
                                        num_attention_heads=2, intermediate_size=64, num_labels=10)
        hf = transformers.ViTForImageClassification(config)
        nn.init.normal_(hf.classifier.weight, std=0.5)
        model = LogitsOf(hf)
        facts = {"prefix": 1, "grid": (4, 4)}
    else:
        raise ValueError(kind)
    model = model.double().eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, *size, dtype=torch.float64))  # transformers installs its own hooks on the first call
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, *size, generator=g, dtype=torch.float64) * 2 - 1
    n_classes = 3 if kind == "torchvision" else 10
    return model, x, torch.tensor([0, 2, 1, 2]) % n_classes, facts


# --------------------------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------------------------


def hand_attention(x, w, b, wo, bo, heads, store):
    """Multi-head self-attention, one head at a time: w, b stack the query, key and value
    projections (3E rows, heads contiguous inside each); the (n, heads, T, T) probabilities are
    kept in ``store``, and the output is computed from that very tensor."""
    n, t, e = x.shape
    d = e // heads
    wq, wk, wv = w[:e], w[e:2 * e], w[2 * e:]
    bq, bk, bv = (b[:e], b[e:2 * e], b[2 * e:]) if b is not None else (0, 0, 0)
    q, k, v = x @ wq.T + bq, x @ wk.T + bk, x @ wv.T + bv
    probs = []
    for h in range(heads):
        c = slice(h * d, (h + 1) * d)
        s = torch.einsum("nid,njd->nij", q[..., c], k[..., c]) / math.sqrt(d)
        ex = torch.exp(s - s.amax(dim=-1, keepdim=True))
        probs.append(ex / ex.sum(dim=-1, keepdim=True))
    a = torch.stack(probs, dim=1)
    store.append(a)
    out = torch.cat([torch.einsum("nij,njd->nid", a[:, h], v[..., h * d:(h + 1) * d]) for h in range(heads)], dim=-1)
    return out @ wo.T + (bo if bo is not None else 0)


@contextlib.contextmanager
def hand_attention_in(model, kind):
    """The model with every attention module computed by ``hand_attention``; yields the list the
    probabilities land in, block by block."""
    store: list[torch.Tensor] = []
    patched = []
    if kind == "torchvision":
        for blk in model.encoder.layers:
            mha = blk.self_attention

            def fwd(query, key, value, *args, mha=mha, **kwargs):
                return hand_attention(query, mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight,
                                      mha.out_proj.bias, mha.num_heads, store), None

            patched.append((mha, fwd))
    elif kind.startswith("timm"):
        for blk in model.blocks:
            at = blk.attn
            assert isinstance(at.q_norm, nn.Identity) and isinstance(at.norm, nn.Identity)

            def fwd(x, *args, at=at, **kwargs):
                return hand_attention(x, at.qkv.weight, at.qkv.bias, at.proj.weight, at.proj.bias, at.num_heads, store)

            patched.append((at, fwd))
    else:
        for at in [m for m in model.modules() if type(m).__name__ == "ViTAttention"]:

            def fwd(hidden_states, *args, at=at, **kwargs):
                w = torch.cat([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight])
                b = torch.cat([at.q_proj.bias, at.k_proj.bias, at.v_proj.bias])
                out = hand_attention(hidden_states, w, b, at.o_proj.weight, at.o_proj.bias, at.num_attention_heads,
                                     store)
                return out, store[-1]

            patched.append((at, fwd))
    assert len(patched) == 2
    try:
        for module, fwd in patched:
            module.forward = fwd
        yield store
    finally:
        for module, _ in patched:
            del module.forward


def hand_rollout(probs, fusion="mean", discard=0.0):
    """Abnar & Zuidema: 0.5 W + 0.5 I with W the heads' mean (rows already sum to 1); with another
    fusion or entries discarded, W + I with each row divided by its sum. Discarding: per image,
    the floor(discard * T^2) smallest entries of W other than (0, 0), one by one."""
    n, _, t, _ = probs[0].shape
    eye = torch.eye(t, dtype=torch.float64)
    r = eye.expand(n, t, t)
    for a in probs:
        if fusion == "mean" and discard == 0:
            step = 0.5 * a.mean(dim=1) + 0.5 * eye
        else:
            w = {"mean": a.mean(dim=1), "max": a.max(dim=1).values, "min": a.min(dim=1).values}[fusion].clone()
            for i in range(n):
                flat = w[i].reshape(-1)
                order = sorted(range(1, t * t), key=lambda j: float(flat[j]))
                for j in order[: math.floor(discard * t * t)]:
                    flat[j] = 0.0
            m = w + eye
            step = m / m.sum(dim=-1, keepdim=True)
        r = step @ r
    return r


def hand_relevance(probs, grads):
    """Chefer et al. 2021: R = I; R = R + E_h[(grad A)^+] R for each block."""
    n, _, t, _ = probs[0].shape
    r = torch.eye(t, dtype=torch.float64).expand(n, t, t)
    for a, g in zip(probs, grads):
        r = r + (g * a).clamp(min=0).mean(dim=1) @ r
    return r


def to_map(r, facts, size):
    """Class token's row (token 0) over the patch tokens -> (h, w) row by row -> bilinear."""
    n = r.shape[0]
    grid = r[:, 0, facts["prefix"]:].reshape(n, *facts["grid"])
    return F.interpolate(grid[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def oracle(model, kind, x, target):
    """(logits, probabilities, gradients of the summed target logits) through the hand attention."""
    with hand_attention_in(model, kind) as store:
        logits = model(x.clone().requires_grad_(True))
    score = logits[torch.arange(x.shape[0]), target].sum()
    grads = torch.autograd.grad(score, store)
    return logits.detach(), [a.detach() for a in store], [g.detach() for g in grads]


def rel_err(ours, ref):
    return float((ours - ref).abs().max() / ref.abs().max())


#: HF's eager attention computes its softmax in float32 even for a float64 model
TOL = {"hf_vit": 1e-5}


# --------------------------------------------------------------------------------------------
# Equal to the hand computation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_maps_equal_the_hand_computation(kind):
    model, x, target, facts = make(kind)
    with torch.no_grad():
        own = model(x)
    logits, probs, grads = oracle(model, kind, x, target)
    torch.testing.assert_close(logits, own, rtol=1e-10, atol=1e-12)  # the oracle is the model
    size = x.shape[-2:]
    ctx = Context(budget=3)  # chunks of 3 and 1
    roll = AttentionRollout().attribute(model, x, target, ctx)
    rel = AttentionRelevance().attribute(model, x, target, ctx)
    assert roll.dtype == rel.dtype == torch.float64 and roll.shape == rel.shape == (4, *size)
    tol = TOL.get(kind, 1e-10)
    assert rel_err(roll, to_map(hand_rollout(probs), facts, size)) < tol
    ref = to_map(hand_relevance(probs, grads), facts, size)
    assert (ref.amax(dim=(1, 2)) > 0).all()  # gradients reach every image's map
    assert rel_err(rel, ref) < tol
    assert roll.min() >= 0 and rel.min() >= 0


@pytest.mark.parametrize("fusion, discard", [("max", 0.0), ("min", 0.0), ("mean", 0.5), ("max", 0.3)])
@pytest.mark.parametrize("kind", ["torchvision", "timm_deit_distilled"])
def test_rollout_options_equal_the_hand_computation(kind, fusion, discard):
    model, x, target, facts = make(kind)
    _, probs, _ = oracle(model, kind, x, target)
    ours = AttentionRollout(head_fusion=fusion, discard_ratio=discard).attribute(model, x, target, Context())
    assert rel_err(ours, to_map(hand_rollout(probs, fusion, discard), facts, x.shape[-2:])) < 1e-10
    if discard:  # the option bites
        plain = AttentionRollout(head_fusion=fusion).attribute(model, x, target, Context())
        assert rel_err(ours, plain) > 1e-3


def test_rollout_ignores_the_target_relevance_follows_it():
    model, x, target, _ = make("torchvision")
    other = (target + 1) % 3
    roll = AttentionRollout()
    rel = AttentionRelevance()
    assert torch.equal(roll.attribute(model, x, target, Context()), roll.attribute(model, x, other, Context()))
    assert rel_err(rel.attribute(model, x, target, Context()), rel.attribute(model, x, other, Context())) > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_recording_leaves_the_logits_as_the_model_computes_them(kind):
    """The switched paths (torch's attention written out, timm's unfused path, Hugging Face's eager
    attention) compute what the model computes, and every block gives (n, heads, T, T)."""
    model, x, _, facts = make(kind)
    with torch.no_grad():
        own = model(x)
        sites, _ = find_attention(model)
        assert len(sites) == 2
        with recording_attention(model, sites) as calls:
            seen = model(x)
    torch.testing.assert_close(seen, own, rtol=TOL.get(kind, 1e-10), atol=1e-12)
    tokens = facts["prefix"] + facts["grid"][0] * facts["grid"][1]
    assert [c.site for c in calls] == sites
    assert all(len(c.probs) == 1 and c.probs[0].shape == (4, 2, tokens, tokens) for c in calls)


# --------------------------------------------------------------------------------------------
# Batches, the shared pass, the model afterwards
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["torchvision", "timm_vit_registers", "hf_vit"])
def test_maps_do_not_depend_on_the_batch(kind):
    """Images 2 and 3 alone give the maps they get inside the batch; chunks of one image give the
    maps of one chunk of four (to rounding: a matrix product's last bits may follow the batch)."""
    model, x, target, _ = make(kind)
    for cls in (AttentionRollout, AttentionRelevance):
        whole = cls().attribute(model, x, target, Context(budget=64))
        part = cls().attribute(model, x[2:], target[2:], Context(budget=64))
        ones = cls().attribute(model, x, target, Context(budget=1))
        torch.testing.assert_close(part, whole[2:], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(ones, whole, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kind", ["torchvision", "hf_vit"])
def test_the_shared_pass_gives_each_map_computed_alone(kind):
    model, x, target, _ = make(kind)
    both = compute_maps(model, x, target, [AttentionRollout(discard_ratio=0.2), AttentionRelevance()], Context())
    assert list(both) == ["attention_rollout", "attention_relevance"]
    for m in (AttentionRollout(discard_ratio=0.2), AttentionRelevance()):
        alone = compute_maps(model, x, target, [m], Context())[m.name]
        assert alone.dtype == torch.float32 and alone.shape == (4, *x.shape[-2:])
        torch.testing.assert_close(both[m.name], alone, rtol=1e-6, atol=0)


def snapshot(model):
    """Everything a call could leave changed: tensors, parameter objects, every module's instance
    attributes (hook tables and submodule/parameter tables by content), training flags, configs."""

    def plain(v):
        if isinstance(v, dict):
            return {k: id(x) for k, x in v.items()}
        return v if isinstance(v, (bool, int, float, str, type(None))) else id(v)

    modules = {name: {k: plain(v) for k, v in vars(m).items()} for name, m in model.named_modules()}
    configs = {name: dict(vars(m.config)) for name, m in model.named_modules()
               if hasattr(getattr(m, "config", None), "_attn_implementation")}
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "params": [(id(p), p.requires_grad, p.grad) for p in model.parameters()],
        "modules": modules,
        "configs": configs,
    }


def assert_same(before, after):
    assert before["params"] == after["params"]
    assert before["modules"] == after["modules"]
    assert before["configs"] == after["configs"]
    assert before["state"].keys() == after["state"].keys()
    assert all(torch.equal(before["state"][k], after["state"][k]) for k in before["state"])


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("kind", KINDS)
def test_the_model_is_left_exactly_as_it_was(kind):
    model, x, target, _ = make(kind)
    sites, _ = find_attention(model)
    flags = {s.name: getattr(s.module, "fused_attn", None) for s in sites}
    if kind.startswith("timm"):
        assert all(flags.values())  # fused attention was on, and must be again
    before = snapshot(model)
    compute_maps(model, x, target, [AttentionRollout(), AttentionRelevance()], Context(budget=3))
    assert_same(before, snapshot(model))
    assert all(p.grad is None for p in model.parameters())  # no weight gradient
    if kind == "hf_vit":
        assert model.model.config._attn_implementation == "sdpa"
    # an error in the middle of the forward (in the second block, after the first recorded)
    last = sites[-1].module
    handle = last.register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(Boom("in the forward")))
    before = snapshot(model)
    for m in (AttentionRollout(), AttentionRelevance()):
        with pytest.raises(Boom):
            m.attribute(model, x, target, Context())
        assert_same(before, snapshot(model))
    handle.remove()
    assert {s.name: getattr(s.module, "fused_attn", None) for s in sites} == flags


def test_training_flag_untouched():
    """A model in training mode stays so (these tiny models have no dropout, so the maps are the
    eval maps); the methods never call train() or eval()."""
    model, x, target, _ = make("timm_deit_distilled")
    ref = AttentionRelevance().attribute(model, x, target, Context())
    model.train()
    model.blocks[0].attn.eval()  # a mixed state is kept as well
    out = AttentionRelevance().attribute(model, x, target, Context())
    assert model.training and model.blocks[1].attn.training and not model.blocks[0].attn.training
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind", ["torchvision", "hf_vit"])
def test_autocast_bfloat16_stays_close_to_float32(kind):
    model, x, target, _ = make(kind)
    model, x = model.float(), x.float()
    for cls in (AttentionRollout, AttentionRelevance):
        ref = cls().attribute(model, x, target, Context())
        low = cls().attribute(model, x, target, Context(autocast=torch.bfloat16))
        assert low.dtype == torch.float32 and torch.isfinite(low).all()
        cos = F.cosine_similarity(low.flatten(1), ref.flatten(1)).min()
        assert cos > 0.99, (cls.name, float(cos))


# --------------------------------------------------------------------------------------------
# Errors and the description
# --------------------------------------------------------------------------------------------


def test_a_model_without_supported_attention_is_refused_by_name():
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 3)).double()
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    t = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"^attention_rollout: the model has no attention these methods can read .*"
                                         r"found no attention module \(the model's layers: Conv2d x 1, "):
        AttentionRollout().attribute(cnn, x, t, Context())
    with pytest.raises(ValueError, match=r"^attention_rollout, attention_relevance: the model has no attention"):
        compute_maps(cnn, x, t, [AttentionRollout(), AttentionRelevance()], Context())
    assert "Conv2d x 1" in AttentionRelevance.unsupported_reason(cnn)
    assert AttentionRelevance.unsupported_reason(make("torchvision")[0]) is None
    # attention-like modules it cannot read are named
    odd = nn.Sequential(nn.MultiheadAttention(8, 2, kdim=4, vdim=4, batch_first=True))
    with pytest.raises(ValueError, match=r"found attention-like modules: nn\.MultiheadAttention '0' with separate"):
        AttentionRelevance().attribute(odd, x, t, Context())


def test_windowed_attention_no_class_token_and_idle_modules_are_refused():
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, embed_dim=16,
                             depths=(1, 1), num_heads=(1, 2), window_size=4, num_classes=10).double().eval()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    t = torch.tensor([0, 1])
    fused = swin.layers[0].blocks[0].attn.fused_attn
    with pytest.raises(ValueError, match=r"attention_relevance: attention module 'layers\.0\.blocks\.0\.attn' gave "
                                         r"probabilities of shape \(8, 1, 16, 16\) for 2 images.*windowed"):
        AttentionRelevance().attribute(swin, x, t, Context())
    assert swin.layers[0].blocks[0].attn.fused_attn == fused  # restored after the error
    pooled = timm.create_model("vit_tiny_patch16_224", img_size=32, class_token=False, global_pool="avg",
                               **TINY_TIMM).double().eval()
    with pytest.raises(ValueError, match=r"attention_rollout: the attention's 16 tokens are all patch tokens "
                                         r"\(4 x 4\): the model has no class token"):
        AttentionRollout().attribute(pooled, x, t, Context())
    model, x, t, _ = make("torchvision")
    with pytest.raises(ValueError, match=r"attention_rollout: the attention runs over 5 tokens, which cannot be "
                                         r"mapped .*the 2 tokens after the first 3 do not form a grid"):
        AttentionRollout(prefix_tokens=3).attribute(model, x, t, Context())
    assert torch.equal(AttentionRollout(prefix_tokens=1).attribute(model, x, t, Context()),
                       AttentionRollout().attribute(model, x, t, Context()))
    model.unused = nn.MultiheadAttention(8, 2, batch_first=True).double()
    with pytest.raises(ValueError, match=r"attention module\(s\) \['unused'\] did not run"):
        AttentionRollout().attribute(model, x, t, Context())
    assert "forward" not in vars(model.unused) and "forward" not in vars(model.encoder.layers[0].self_attention)


def test_parameters_are_validated_and_described():
    for params, match in [({"discard_ratio": 1.0}, "discard_ratio must be in"),
                          ({"discard_ratio": -0.1}, "discard_ratio must be in"),
                          ({"head_fusion": "median"}, "head_fusion: 'median' is not one of"),
                          ({"prefix_tokens": 0}, "prefix_tokens must be >= 1")]:
        with pytest.raises(RegistryError, match=match):
            AttentionRollout(**params)
    with pytest.raises(RegistryError, match=r"unknown parameter\(s\) \['head_fusion'\]"):
        AttentionRelevance(head_fusion="max")
    roll, rel = AttentionRollout.describe(), AttentionRelevance.describe()
    assert roll["params"] == {"head_fusion": "mean", "discard_ratio": 0.0, "prefix_tokens": None}
    assert rel["params"] == {"prefix_tokens": None}
    assert (roll["family"], roll["cost_unit"], rel["family"], rel["cost_unit"]) == (
        "prediction", "forward", "gradient", "forward+backward")
    assert not roll["signed"] and not rel["signed"] and roll["share_group"] == rel["share_group"] == "attention"
    assert not roll["needs_layer"] and not roll["compile_safe"] and roll["doc"] and rel["channel_rule"]
    assert AttentionRollout().cost() == AttentionRelevance().cost() == 1.0
