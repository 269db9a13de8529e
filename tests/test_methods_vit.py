"""Grad-CAM and Grad-CAM++ on transformers: token and channels-last layers mapped to grids, the
automatic layer of a ViT, against pytorch-grad-cam with its ``reshape_transform``.

Tiny configurations of the real architectures (torchvision ``VisionTransformer``, timm ViT, DeiT
with its distillation token, ViT with register tokens, Swin), float64, random weights."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distributed_attr.methods import Context, build_method, compute_maps, resolve_layer
from distributed_attr.methods.base import GridLayout, grid_layout
from distributed_attr.registry import RegistryError

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")
base_cam = pytest.importorskip("pytorch_grad_cam.base_cam")
from pytorch_grad_cam import GradCAM as RefGradCAM, GradCAMPlusPlus as RefGradCAMPlusPlus  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")

TINY_VIT = {"pretrained": False, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 10}


def make(kind: str) -> tuple[nn.Module, torch.Tensor, dict]:
    """(model, images, facts): facts name the layer pytorch-grad-cam's docs use (the last block's
    first LayerNorm), the patch embedding, and how the layer's output is laid out."""
    torch.manual_seed(0)
    size = (32, 32)
    if kind == "torchvision_vit":
        model = torchvision.models.VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
        )
        nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision starts the head at zero
        facts = {"layer": "encoder.layers.encoder_layer_1.ln_1", "patch": "conv_proj", "prefix": 1, "grid": (4, 4)}
    elif kind == "timm_vit_nonsquare":
        size = (32, 48)
        model = timm.create_model("vit_tiny_patch16_224", img_size=size, **TINY_VIT)
        facts = {"layer": "blocks.1.norm1", "patch": "patch_embed.proj", "prefix": 1, "grid": (4, 6)}
    elif kind == "timm_deit_distilled":
        model = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, **TINY_VIT)
        facts = {"layer": "blocks.1.norm1", "patch": "patch_embed.proj", "prefix": 2, "grid": (4, 4)}
    elif kind == "timm_vit_registers":
        model = timm.create_model("vit_tiny_patch16_224", img_size=32, reg_tokens=4, **TINY_VIT)
        facts = {"layer": "blocks.1.norm1", "patch": "patch_embed.proj", "prefix": 5, "grid": (4, 4)}
    elif kind == "timm_swin":
        model = timm.create_model(
            "swin_tiny_patch4_window7_224", pretrained=False, img_size=32, embed_dim=16, depths=(1, 1),
            num_heads=(1, 2), window_size=4, num_classes=10,
        )
        facts = {"layer": "layers.1.blocks.0.norm1", "patch": "patch_embed.proj", "prefix": None, "grid": (4, 4)}
    else:
        raise ValueError(kind)
    model = model.double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, *size, generator=g, dtype=torch.float64) * 2 - 1
    return model, x, facts


KINDS = ["torchvision_vit", "timm_vit_nonsquare", "timm_deit_distilled", "timm_vit_registers", "timm_swin"]
TARGETS = torch.tensor([0, 3, 7])


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ref = torch.as_tensor(ref).detach().double()
    return float((ours.detach().double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def oracle_transform(facts: dict):
    """pytorch-grad-cam's documented ``reshape_transform``s, written for these models: for a ViT,
    drop the leading tokens, tokens -> (h, w, C), channels first; for timm's Swin, whose blocks
    already run on (N, h, w, C), only channels first."""
    h, w = facts["grid"]
    if facts["prefix"] is None:
        return lambda t: t.permute(0, 3, 1, 2)
    p = facts["prefix"]
    return lambda t: t[:, p:, :].reshape(t.size(0), h, w, t.size(2)).transpose(2, 3).transpose(1, 2)


def reference_cam(cls, model, layer_name, x, targets, facts, monkeypatch) -> torch.Tensor:
    """pytorch-grad-cam's map before its min-max scaling and resize (at layer resolution, after
    its ReLU), upsampled as ours is (bilinear, half-pixel centres: what its OpenCV resize does)."""
    monkeypatch.setattr(base_cam, "scale_cam_image", lambda cam, target_size=None: np.asarray(cam, dtype=np.float64))
    ref_model = copy.deepcopy(model)  # pytorch-grad-cam calls backward() on the weights
    with cls(model=ref_model, target_layers=[ref_model.get_submodule(layer_name)],
             reshape_transform=oracle_transform(facts)) as cam:
        small = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in targets])
    small = torch.from_numpy(np.asarray(small, dtype=np.float64))
    assert small.shape[-2:] == facts["grid"]
    return F.interpolate(small[:, None], size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]


@pytest.mark.parametrize("kind", KINDS)
def test_automatic_layer_is_the_last_blocks_first_norm(kind):
    """Not the patch embedding (what the old rule, "last module with an (N, K, h, w) output",
    picked on a ViT) nor the last block's output (its patch tokens get no gradient)."""
    model, x, facts = make(kind)
    layer = resolve_layer(model, None, x[:1])
    assert layer is model.get_submodule(facts["layer"])
    assert layer is not model.get_submodule(facts["patch"])


@pytest.mark.parametrize("name,cls", [("gradcam", RefGradCAM), ("gradcam_pp", RefGradCAMPlusPlus)])
@pytest.mark.parametrize("kind", KINDS)
def test_cams_match_pytorch_grad_cam_with_reshape_transform(kind, name, cls, monkeypatch):
    model, x, facts = make(kind)
    ours = compute_maps(model, x, TARGETS, [build_method(name)],
                        Context(layer=resolve_layer(model, None, x[:1]), budget=2))[name]
    assert ours.shape == (3, *x.shape[-2:]) and ours.min() >= 0
    assert (ours.amax(dim=(1, 2)) > 0).all()  # a non-trivial map per image, so the check bites
    ref = reference_cam(cls, model, facts["layer"], x, TARGETS, facts, monkeypatch)
    assert rel_err(ours, ref) < 1e-6  # float64 on both sides


@pytest.mark.parametrize("name", ["gradcam", "gradcam_pp"])
def test_a_named_transformer_block_works(name, monkeypatch):
    """Naming a block (its output is (N, 17, 32) tokens) used to fail with "must output (N, K, h,
    w)"; the first block's output reaches the class token through the second block."""
    model, x, facts = make("torchvision_vit")
    block = "encoder.layers.encoder_layer_0"
    ours = compute_maps(model, x, TARGETS, [build_method(name, {"layer": block})], Context())[name]
    assert (ours.amax(dim=(1, 2)) > 0).all()
    ref = reference_cam(RefGradCAM if name == "gradcam" else RefGradCAMPlusPlus, model, block, x, TARGETS,
                        facts, monkeypatch)
    assert rel_err(ours, ref) < 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_token_layout_inverts_the_models_own_patch_flattening(kind):
    """Independent of the oracle's transform: the patch embedding's convolution outputs an (N, C,
    h, w) grid, which the model itself flattens to tokens (row by row) or keeps channels last;
    mapping the model's token sequence back with the automatic layout gives that grid exactly."""
    model, x, facts = make(kind)
    seen = {}
    model.get_submodule(facts["patch"]).register_forward_hook(lambda m, i, o: seen.setdefault("grid", o))
    if kind == "torchvision_vit":  # the encoder's input: class token + patch tokens
        model.encoder.register_forward_pre_hook(lambda m, i: seen.setdefault("seq", i[0]))
    else:  # timm's patch embedding flattens (ViT) or permutes to channels last (Swin), then norms
        model.patch_embed.norm.register_forward_pre_hook(lambda m, i: seen.setdefault("seq", i[0]))
    with torch.no_grad():
        model(x)
    seq = seen["seq"]
    layout = grid_layout(seq.shape, "auto", x.shape[-2:])
    if facts["prefix"] is None:
        assert layout == GridLayout("nhwc")
    else:  # timm adds its class/register tokens after the patch embedding: none here yet
        expected_prefix = 1 if kind == "torchvision_vit" else 0
        assert layout == GridLayout("tokens", expected_prefix, facts["grid"])
    torch.testing.assert_close(layout.apply(seq), seen["grid"], rtol=0, atol=0)


def test_grid_layout_by_hand():
    """Shapes of real models at 224 px, and the choices made for them."""
    at224 = (224, 224)
    assert grid_layout((2, 197, 768), "auto", at224) == GridLayout("tokens", 1, (14, 14))  # ViT-B/16
    assert grid_layout((2, 198, 192), "auto", at224) == GridLayout("tokens", 2, (14, 14))  # DeiT distilled
    assert grid_layout((2, 201, 768), "auto", at224) == GridLayout("tokens", 5, (14, 14))  # + 4 registers
    assert grid_layout((2, 196, 768), "auto", at224) == GridLayout("tokens", 0, (14, 14))  # no class token
    assert grid_layout((2, 1 + 14 * 20, 768), "tokens", (224, 320)) == GridLayout("tokens", 1, (14, 20))
    assert grid_layout((2, 197, 768), 1, at224) == GridLayout("tokens", 1, (14, 14))
    assert grid_layout((2, 7, 7, 768), "auto", at224) == GridLayout("nhwc")  # timm Swin-T, last stage
    assert grid_layout((2, 2048, 7, 7), "auto", at224) == GridLayout("nchw")  # ResNet-50 layer4
    assert grid_layout((2, 7, 7, 7), "auto", at224) == GridLayout("nchw")  # ambiguous: channels first
    assert grid_layout((2, 7, 7, 7), "nhwc", at224) == GridLayout("nhwc")
    # tokens in row-major order: token p + i * w + j lands at (i, j)
    seq = torch.arange(2 + 6, dtype=torch.float64).view(1, 8, 1)
    grid = grid_layout(seq.shape, 2, (20, 30)).apply(seq)
    assert grid.shape == (1, 1, 2, 3) and grid[0, 0].tolist() == [[2, 3, 4], [5, 6, 7]]
    with pytest.raises(ValueError, match="do not form a grid"):
        grid_layout((2, 197, 768), 3, at224)  # 194 tokens are no 14 x 14 grid
    with pytest.raises(ValueError, match="give the number of leading tokens"):
        grid_layout((2, 196 + 21, 768), "auto", at224)  # 21 leading tokens: more than it looks for
    assert grid_layout((2, 196 + 21, 768), 21, at224) == GridLayout("tokens", 21, (14, 14))


def test_explicit_reshape_agrees_with_auto_and_bad_layers_are_named():
    model, x, _ = make("torchvision_vit")
    ctx = Context(layer=resolve_layer(model, None, x[:1]))
    auto = compute_maps(model, x, TARGETS, [build_method("gradcam")], ctx)["gradcam"]
    for reshape in ("tokens", 1):
        same = compute_maps(model, x, TARGETS, [build_method("gradcam", {"reshape": reshape})], ctx)["gradcam"]
        assert torch.equal(same, auto), reshape
    swin, xs, _ = make("timm_swin")
    sctx = Context(layer=resolve_layer(swin, None, xs[:1]))
    s_auto = compute_maps(swin, xs, TARGETS, [build_method("gradcam")], sctx)["gradcam"]
    s_nhwc = compute_maps(swin, xs, TARGETS, [build_method("gradcam", {"reshape": "nhwc"})], sctx)["gradcam"]
    assert torch.equal(s_auto, s_nhwc)
    # a layer that does not map fails naming the method, the layer and its output shape
    with pytest.raises(ValueError, match=r"gradcam: .*'encoder\.layers\.encoder_layer_1\.ln_1', shape \(3, 17, 32\).*"
                                         r"reshape='nchw' needs a 4-d"):
        compute_maps(model, x, TARGETS, [build_method("gradcam", {"reshape": "nchw"})], ctx)
    with pytest.raises(ValueError, match=r"gradcam_pp: .*'heads', shape \(3, 10\)"):
        compute_maps(model, x, TARGETS, [build_method("gradcam_pp", {"layer": "heads"})], Context())
    with pytest.raises(ValueError, match=r"'encoder\.layers\.encoder_layer_1\.ln_1', shape \(3, 17, 32\).*"
                                         r"the 14 tokens after the first 3 do not form a grid"):
        compute_maps(model, x, TARGETS, [build_method("gradcam", {"reshape": 3})], ctx)


def test_reshape_is_validated_by_the_registry():
    assert build_method("gradcam").params.reshape == "auto"
    assert build_method("gradcam_pp", {"reshape": 2.0}).params.reshape == 2
    valid = r"\['auto', 'nchw', 'nhwc', 'tokens'\]"
    with pytest.raises(RegistryError, match=r"methods\.gradcam\.reshape: 'flat' is not one of " + valid):
        build_method("gradcam", {"reshape": "flat"})
    with pytest.raises(RegistryError, match="leading tokens must be >= 0"):
        build_method("gradcam", {"reshape": -1})
    with pytest.raises(RegistryError, match="reshape"):
        build_method("gradcam", {"reshape": True})
