"""Attribution methods: our images/s next to Captum's / pytorch-grad-cam's on the same model,
parameters and hardware, in one run; the model's bare forward+backward rate; shared-pass groups
against their members one by one; Soundness Saliency in float32 vs bfloat16 autocast.

    python3 bench/methods.py [--quick] [--model digits_resnet|resnet18] [--images 32] [--max-batch 256]

Every timing is the best of ``--repeats`` runs (the least disturbed by other processes); ratios
come from timings taken in this run. Reference settings (fair, and printed in the table):
Captum IG with ``internal_batch_size = max_batch``; NoiseTunnel with ``nt_samples_batch_size =
max_batch // images`` (same samples per forward as ours); Occlusion with ``perturbations_per_eval =
max_batch // images``; pytorch-grad-cam as shipped (it also min-max scales and resizes on the CPU).
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from distributed_attr import zoo  # noqa: E402
from distributed_attr.methods import Context, build_method, compute_maps, resolve_layer  # noqa: E402


def best_time(fn: Callable[[], object], repeats: int) -> float:
    return best_times([fn], repeats)[0]


def best_times(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Best-of-``repeats`` time of each function, the functions interleaved run by run so that a
    burst of load from other processes hits them alike."""
    for fn in fns:
        fn()  # warm-up (allocator, oneDNN primitives)
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def load_model(name: str, images: int):
    if name == "resnet18":
        import torchvision

        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=10).eval()
        x = torch.rand(images, 3, 64, 64)
        return model, x, model.layer4
    model, _ = zoo.pretrained(name)
    x = torch.from_numpy(zoo.digits_dataset(32)[0][:images])
    return model, x, resolve_layer(model, None, x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer images, samples and repeats")
    ap.add_argument("--model", default="digits_resnet", choices=["digits_resnet", "digits_cnn", "digits_vgg", "resnet18"])
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 by default: on a shared 2-core machine OpenMP's spinning "
                         "threads make multi-threaded timings erratic)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from captum.attr import (
        GuidedBackprop, InputXGradient, IntegratedGradients, LayerAttribution, LayerGradCam,
        NoiseTunnel, Occlusion, Saliency,
    )
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    quick = args.quick
    n = args.images or (8 if quick else 32)
    repeats = args.repeats or (2 if quick else 3)
    mb = args.max_batch
    steps = 16 if quick else 32
    samples = 10 if quick else 50
    rise_masks = 200 if quick else 1000
    sobol_design = 8 if quick else 32
    sound_steps = 5 if quick else 20

    model, x, layer = load_model(args.model, n)
    # Weights keep requires_grad=True, as users have them: Captum and we differentiate w.r.t. the
    # input only, pytorch-grad-cam calls backward() and so also computes weight gradients.
    with torch.no_grad():
        target = model(x).argmax(dim=1)
    size = tuple(x.shape[-2:])
    per_eval = max(1, mb // n)
    ctx = lambda **kw: Context(layer=layer, budget=mb, **kw)  # noqa: E731

    def ours(name: str, **params) -> Callable[[], object]:
        m = build_method(name, params)
        return lambda: compute_maps(model, x, target, [m], ctx())

    def group(names: list[str], **params) -> Callable[[], object]:
        ms = [build_method(nm, params) for nm in names]
        return lambda: compute_maps(model, x, target, ms, ctx())

    def bare() -> None:
        for s in range(0, n, mb):
            xi = x[s:s + mb].detach().requires_grad_(True)
            out = model(xi)
            torch.autograd.grad(out.gather(1, target[s:s + mb, None]).sum(), xi)

    # Multi-pass methods run chunks of max_batch samples; their limit is the model's rate on such
    # chunks (on a CPU, large batches can be slower per sample than the batch of the images).
    x8, target8 = x.repeat(8, 1, 1, 1), target.repeat(8)

    def bare_chunked() -> None:
        for s in range(0, 8 * n, mb):
            xi = x8[s:s + mb].detach().requires_grad_(True)
            torch.autograd.grad(model(xi).gather(1, target8[s:s + mb, None]).sum(), xi)

    def bare_forward() -> None:
        with torch.no_grad():
            for s in range(0, 8 * n, mb):
                model(x8[s:s + mb])

    def cam_ref(cls):
        def run():
            with cls(model=model, target_layers=[layer]) as cam:
                return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in target])
        return run

    sigma = float(0.15 * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))).mean())
    rows: list[tuple] = []  # (method, cost, ours img/s, reference img/s or None, reference setting)

    t_bare, t_chunked, t_fwd = best_times([bare, bare_chunked, bare_forward], repeats + 2)
    bare_rate, chunked_rate, fwd_rate = n / t_bare, 8 * n / t_chunked, 8 * n / t_fwd

    def add(name, cost, ours_fn, ref_fn=None, ref_desc=""):
        if ref_fn is None:
            t_ours, t_ref = best_time(ours_fn, repeats), None
        else:
            t_ours, t_ref = best_times([ours_fn, ref_fn], repeats)
        rows.append((name, cost, n / t_ours, n / t_ref if t_ref else None, ref_desc))

    add("saliency", 1, ours("saliency"),
        lambda: Saliency(model).attribute(x, target=target, abs=True).amax(1), "Captum Saliency")
    add("gradient_x_input", 1, ours("gradient_x_input"),
        lambda: InputXGradient(model).attribute(x, target=target).sum(1), "Captum InputXGradient")
    add("gradcam", 1, ours("gradcam"),
        lambda: LayerAttribution.interpolate(
            LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=True), size, "bilinear"),
        "Captum LayerGradCam + interpolate")
    add("gradcam (vs grad-cam)", 1, ours("gradcam"), cam_ref(GradCAM), "pytorch-grad-cam GradCAM")
    add("gradcam_pp", 1, ours("gradcam_pp"), cam_ref(GradCAMPlusPlus), "pytorch-grad-cam GradCAMPlusPlus")
    add("guided_backprop (relu=all)", 1, ours("guided_backprop"),
        lambda: GuidedBackprop(model).attribute(x, target=target).sum(1), "Captum GuidedBackprop (nn.ReLU only)")
    add("guided_backprop (relu=modules)", 1, ours("guided_backprop", relu="modules"),
        lambda: GuidedBackprop(model).attribute(x, target=target).sum(1), "Captum GuidedBackprop")
    add(f"integrated_gradients ({steps} steps)", steps, ours("integrated_gradients", steps=steps),
        lambda: IntegratedGradients(model).attribute(
            x, target=target, n_steps=steps, method="gausslegendre", internal_batch_size=mb).sum(1),
        f"Captum IG, internal_batch_size={mb}")
    for name, nt_type in [("smoothgrad", "smoothgrad"), ("squaregrad", "smoothgrad_sq"), ("vargrad", "vargrad")]:
        add(f"{name} ({samples} samples)", samples, ours(name, samples=samples),
            lambda nt_type=nt_type: NoiseTunnel(Saliency(model)).attribute(
                x, nt_type=nt_type, nt_samples=samples, nt_samples_batch_size=per_eval, stdevs=sigma,
                target=target, abs=False).sum(1),
            f"Captum NoiseTunnel(Saliency), nt_samples_batch_size={per_eval}")
    occ = build_method("occlusion", {"patch": 8, "stride": 4})
    occ_cost = occ.cost(*size)
    flat = bool(((x == 0).all(dim=1)).any())
    add("occlusion (8 px, stride 4)", occ_cost, ours("occlusion", patch=8, stride=4),
        lambda: Occlusion(model).attribute(
            x, sliding_window_shapes=(x.shape[1], 8, 8), strides=(1, 4, 4), baselines=0.0, target=target,
            perturbations_per_eval=per_eval),
        f"Captum Occlusion, perturbations_per_eval={per_eval}"
        + ("; ours skips windows already at the baseline (exact)" if flat else ""))
    add(f"rise ({rise_masks} masks)", rise_masks, ours("rise", masks=rise_masks))
    sob = build_method("sobol", {"design": sobol_design})
    add(f"sobol (grid 8, design {sobol_design})", sob.cost(), ours("sobol", design=sobol_design))
    # LRP: ours against zennit alone (its Gradient attributor, same composite and canonizers);
    # x is in [0, 1] for both models, so the z-box bounds are 0 and 1
    from zennit.attribution import Gradient as ZennitGradient

    from distributed_attr.methods import lrp

    onehot = torch.eye(int(model(x[:1]).shape[1]))[target]
    lrp_rows = []
    for composite in lrp.COMPOSITES:
        params = {"composite": composite, **({"low": 0.0, "high": 1.0} if composite == "epsilon_gamma_box" else {})}
        m = build_method("lrp", params)

        def zennit_ref(m=m):
            with ZennitGradient(model, m.build_composite(model, x)) as attributor:
                return attributor(x, lambda out: onehot * out)[1].sum(1)

        add(f"lrp ({composite})", m.cost(), ours("lrp", **params), zennit_ref,
            f"zennit Gradient, canonizer {lrp.resolve_canonizer(model)}")
        lrp_rows.append((composite, m.cost(), n / rows[-1][2] / t_bare))

    # Captum's families through Captum: the bridge's cost over Captum called directly.
    from captum.attr import DeepLift, FeatureAblation

    from distributed_attr.methods.captum_families import patch_mask

    add("deeplift", 2, ours("deeplift"),
        lambda: DeepLift(model).attribute(x, target=target, baselines=0.0).sum(1), "Captum DeepLift")
    fa = build_method("feature_ablation", {"patch": 8})
    fa_mask = patch_mask(size[0], size[1], 8).expand(x.shape[0], x.shape[1], *size)
    add("feature_ablation (8 px cells)", fa.cost(*size),
        ours("feature_ablation", patch=8),
        lambda: FeatureAblation(model).attribute(x, target=target, baselines=0.0, feature_mask=fa_mask,
                                                 perturbations_per_eval=per_eval)[:, 0],
        f"Captum FeatureAblation, perturbations_per_eval={per_eval}")

    # Attention methods on the zoo's digit-size ViT, against its own forward and forward+backward.
    vit, _ = zoo.pretrained("digits_vit")
    xv = torch.from_numpy(zoo.digits_dataset(32)[0][:n])
    with torch.no_grad():
        tv = vit(xv).argmax(1)

    def vit_fwd() -> None:
        with torch.no_grad():
            vit(xv)

    def vit_fwd_bwd() -> None:
        xi = xv.detach().requires_grad_(True)
        torch.autograd.grad(vit(xi).gather(1, tv[:, None]).sum(), xi)

    rollout, relevance = build_method("attention_rollout", {}), build_method("attention_relevance", {})
    vit_times = best_times([vit_fwd, vit_fwd_bwd,
                            lambda: compute_maps(vit, xv, tv, [rollout], Context(budget=mb)),
                            lambda: compute_maps(vit, xv, tv, [relevance], Context(budget=mb))], repeats)

    # Shared-pass groups against their members one by one.
    grad_names = ["saliency", "gradient_x_input", "gradcam", "gradcam_pp"]
    grad_times = best_times([group(grad_names)] + [ours(nm) for nm in grad_names], repeats)
    t_grad_group, t_grad_each = grad_times[0], sum(grad_times[1:])
    sg_names = ["smoothgrad", "squaregrad", "vargrad"]
    captum_sg = [
        lambda nt_type=nt: NoiseTunnel(Saliency(model)).attribute(
            x, nt_type=nt_type, nt_samples=samples, nt_samples_batch_size=per_eval, stdevs=sigma,
            target=target, abs=False)
        for nt in ["smoothgrad", "smoothgrad_sq", "vargrad"]
    ]
    sg_times = best_times([group(sg_names, samples=samples)] + [ours(nm, samples=samples) for nm in sg_names]
                          + captum_sg, repeats)
    t_sg_group, t_sg_each, t_sg_captum = sg_times[0], sum(sg_times[1:4]), sum(sg_times[4:])

    # Soundness Saliency: float32 vs bfloat16 autocast (CPU), a few steps, backgrounds = the images.
    sound = build_method("soundness_saliency", {"steps": sound_steps, "backgrounds": 10})
    t32, t16 = best_times([
        lambda: compute_maps(model, x, target, [sound], ctx(references=x)),
        lambda: compute_maps(model, x, target, [sound], ctx(references=x, autocast=torch.bfloat16)),
    ], max(1, repeats - 1))
    m32 = compute_maps(model, x, target, [sound], ctx(references=x))["soundness_saliency"]
    m16 = compute_maps(model, x, target, [sound], ctx(references=x, autocast=torch.bfloat16))["soundness_saliency"]

    print(f"# bench/methods.py  model={args.model} input={tuple(x.shape[1:])} images={n} max_batch={mb} "
          f"threads={torch.get_num_threads()} repeats={repeats} quick={quick}")
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print(f"\nBare model rates: forward+backward (input gradient only) {bare_rate:.1f} images/s in one batch of "
          f"{n}, {chunked_rate:.1f} samples/s in batches of {mb}; forward only (no_grad, batches of {mb}) "
          f"{fwd_rate:.1f} samples/s\n")
    print("'of bare limit' = ours img/s x passes/image / the bare rate that applies (one batch of the images for "
          "one-pass methods, batches of max_batch for multi-pass ones, forward-only for prediction methods): "
          "1.0 = as fast as the model allows.\n")
    print("| method | passes/image | ours img/s | reference img/s | ours/reference | of bare limit | reference setting |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, cost, r_ours, r_ref, desc in rows:
        ratio = f"{r_ours / r_ref:.2f}x" if r_ref else "-"
        fam_gradient = not name.startswith(("occlusion", "rise", "sobol", "feature_ablation"))
        one_batch = cost == 1 or name.startswith("lrp")  # LRP's passes run on the images' batch
        limit_rate = (bare_rate if one_batch else chunked_rate) if fam_gradient else fwd_rate
        limit = f"{r_ours * cost / limit_rate:.2f}"
        ref = f"{r_ref:.1f}" if r_ref else "(none)"
        print(f"| {name} | {cost:g} | {r_ours:.1f} | {ref} | {ratio} | {limit} | {desc or '-'} |")
    print("\nLRP's time per image in forward+backward passes (ours / the bare forward+backward of the images' "
          "batch): " + ", ".join(f"{c} {meas:.2f} (declared cost {decl:g})" for c, decl, meas in lrp_rows))
    t_vf, t_vfb, t_roll, t_rel = vit_times
    print(f"\nAttention methods on digits_vit ({n} images): attention_rollout {n / t_roll:.1f} img/s = "
          f"{t_roll / t_vf:.2f} x the ViT's forward; attention_relevance {n / t_rel:.1f} img/s = "
          f"{t_rel / t_vfb:.2f} x its forward+backward")
    print("\nShared-pass groups (same total work, one call):\n")
    print("| group | together img/s | one by one img/s | speed-up | Captum one by one img/s |")
    print("|---|---:|---:|---:|---:|")
    print(f"| gradient (saliency, gradient_x_input, gradcam, gradcam_pp) | {n / t_grad_group:.1f} | "
          f"{n / t_grad_each:.1f} | {t_grad_each / t_grad_group:.2f}x | - |")
    print(f"| smoothgrad (smoothgrad, squaregrad, vargrad; {samples} samples) | {n / t_sg_group:.1f} | "
          f"{n / t_sg_each:.1f} | {t_sg_each / t_sg_group:.2f}x | {n / t_sg_captum:.1f} "
          f"(ours together: {t_sg_captum / t_sg_group:.2f}x) |")
    diff = float((m32 - m16).abs().max())
    print(f"\nSoundness Saliency ({sound_steps} steps x 10 backgrounds): float32 {n / t32 * sound_steps:.2f} "
          f"image-steps/s, bfloat16 autocast {n / t16 * sound_steps:.2f} image-steps/s "
          f"(bf16/f32 speed {t32 / t16:.2f}x; max |mask difference| {diff:.3f}); "
          f"the default 2000 steps take {t32 / n * 2000 / sound_steps:.1f} s per image in float32.")


if __name__ == "__main__":
    main()
