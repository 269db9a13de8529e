"""A generated classification dataset in which the right attribution is known.

Every image shows one *target* object, which alone decides the label, and one to three
*distractor* objects on a natural-image background (a random crop of a photo that ships with
scikit-image or scikit-learn, rotated, flipped and colour-jittered). The target carries its class
twice, in its shape and in its two-tone fill pattern; distractors have other shapes (never a class
shape) and a solid fill. Targets and distractors share one distribution of size (18-40% of the
image side), position, rotation, colour and shading, and everything but the target is drawn
independently of the label, so no pixel outside the target tells the class and a model has to look
at the target. Objects never overlap (their bounding circles stay 2 px apart), so the ground-truth
mask, the pixels that the target covers at least half of, is exact.

Everything is drawn from ``numpy`` generators seeded by ``(seed, split, index)``: an image does not
depend on how many others are generated, and the same seed gives the same pixels and (PNG being
deterministic for a given zlib) the same bytes. ``docs/benchmark.md`` describes the files.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

#: bump when the images a seed produces change
GENERATOR_VERSION = 1
#: the class-deciding shapes, in label order
CLASSES = ("disk", "square", "triangle", "plus", "star", "ring")
#: each class's fill pattern (two tones of the object's colour), a second cue of the same object
PATTERNS = ("rings", "checker", "stripes", "dots", "grid", "waves")
#: shapes that only ever appear as distractors (never a class shape: the mask stays unambiguous)
DISTRACTORS = ("ellipse", "bar", "crescent", "corner")
SPLITS = ("train", "validation", "test")
#: fraction of ``images`` per split
SPLIT_FRACTIONS = {"train": 0.7, "validation": 0.1, "test": 0.2}
#: an object's bounding-circle diameter as a fraction of the image side
SCALE_RANGE = (0.18, 0.40)
#: the target's pattern period in pixels at DEFAULT_SIZE (scaled with the size)
PERIOD_RANGE = (6.0, 10.0)
#: distractors per image (inclusive)
DISTRACTOR_RANGE = (1, 3)
#: minimum distance in pixels between two objects' bounding circles
GAP = 2.0
#: supersampling factor of the object rasteriser (anti-aliased edges)
SUPERSAMPLE = 4
#: a target's pixels: where it covers at least this fraction of the pixel
MASK_THRESHOLD = 0.5
MIN_SIZE, MAX_SIZE = 64, 224
DEFAULT_SIZE = 128
DEFAULT_IMAGES = 6000
#: backgrounds: (library, name); scikit-image's bundled photos and textures, scikit-learn's two
#: sample photos. Left out: photos dominated by round things (coins, clock, cells, moon craters),
#: which would look like the disk and ring classes, and the text pages (letters look like rings).
BACKGROUNDS = (
    ("skimage", "astronaut"), ("skimage", "coffee"), ("skimage", "chelsea"), ("skimage", "rocket"),
    ("skimage", "camera"), ("skimage", "brick"), ("skimage", "grass"), ("skimage", "gravel"),
    ("skimage", "immunohistochemistry"), ("skimage", "hubble_deep_field"),
    ("sklearn", "china.jpg"), ("sklearn", "flower.jpg"),
)
_SPLIT_CODE = {"train": 0, "validation": 1, "test": 2}


@dataclass(frozen=True)
class ObjectSpec:
    """One object as placed: enough to draw it again (``render_alpha``).

    ``cx``, ``cy``: centre in pixels (x right, y down; pixel ``i`` spans [i, i+1)); ``radius``: of
    the bounding circle in pixels; ``angle``: rotation in radians; ``aspect``: the distractors'
    free shape parameter (1 for class shapes); ``color``: RGB in [0, 1]; ``pattern``: the fill
    (``PATTERNS`` for targets, "solid" for distractors), ``period`` (pixels) and ``phase`` (in
    periods) of the pattern, in the object's own rotated frame. Not recorded: the shading ramp and
    the pixel noise."""

    role: str  # "target" | "distractor"
    shape: str
    cx: float
    cy: float
    radius: float
    angle: float
    aspect: float
    color: tuple[float, float, float]
    pattern: str = "solid"
    period: float = 0.0
    phase: float = 0.0


@dataclass
class Example:
    image: np.ndarray  # (size, size, 3) uint8
    mask: np.ndarray  # (size, size) bool: the target's pixels
    label: int
    objects: list[ObjectSpec]
    background: str


# ------------------------------------------------------------------------------------------------
# Shapes
# ------------------------------------------------------------------------------------------------


def _circle(r: float = 1.0, cx: float = 0.0, cy: float = 0.0, n: int = 96) -> np.ndarray:
    t = np.arange(n) * (2 * math.pi / n)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)


def _ellipse(a: float, b: float, n: int = 96) -> np.ndarray:
    t = np.arange(n) * (2 * math.pi / n)
    return np.stack([a * np.cos(t), b * np.sin(t)], 1)


def _regular(k: int, r: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    t = phase + np.arange(k) * (2 * math.pi / k)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def shape_polygons(shape: str, aspect: float = 1.0) -> list[tuple[np.ndarray, int]]:
    """The shape in unit coordinates (inside the unit circle) as polygons drawn in order, each
    with its fill (1 adds, 0 cuts a hole)."""
    if shape == "disk":
        return [(_circle(0.95), 1)]
    if shape == "square":
        h = 0.68  # circumradius 0.96
        return [(np.array([[-h, -h], [h, -h], [h, h], [-h, h]]), 1)]
    if shape == "triangle":
        return [(_regular(3, 0.98), 1)]
    if shape == "plus":
        a, w = 0.95, 0.3
        return [(np.array([[-w, -a], [w, -a], [w, -w], [a, -w], [a, w], [w, w], [w, a], [-w, a],
                           [-w, w], [-a, w], [-a, -w], [-w, -w]]), 1)]
    if shape == "star":
        outer, inner = _regular(5, 0.98), _regular(5, 0.42, -math.pi / 2 + math.pi / 5)
        return [(np.stack([outer, inner], 1).reshape(-1, 2), 1)]
    if shape == "ring":
        return [(_circle(0.95), 1), (_circle(0.55), 0)]
    if shape == "ellipse":
        return [(_ellipse(0.97, 0.97 * aspect), 1)]
    if shape == "bar":
        a = 0.97 / math.sqrt(1 + aspect ** 2)  # the corners on the unit circle
        return [(np.array([[-a, -a * aspect], [a, -a * aspect], [a, a * aspect], [-a, a * aspect]]), 1)]
    if shape == "crescent":
        return [(_circle(0.95), 1), (_circle(0.8, cx=0.95 * aspect), 0)]
    if shape == "corner":
        a = 0.68
        w = -a + 2 * a * aspect  # an L: two arms of width aspect x the side
        return [(np.array([[-a, -a], [a, -a], [a, w], [w, w], [w, a], [-a, a]]), 1)]
    raise ValueError(f"unknown shape {shape!r}; classes {CLASSES}, distractors {DISTRACTORS}")


def _draw_aspect(shape: str, rng: np.random.Generator) -> float:
    """The distractors' free parameter (class shapes have none: 1.0)."""
    if shape == "ellipse":
        return float(rng.uniform(0.3, 0.5))  # minor/major axis
    if shape == "bar":
        return float(rng.uniform(0.16, 0.3))  # width/length
    if shape == "crescent":
        return float(rng.uniform(0.4, 0.6))  # offset of the cut, in radii
    if shape == "corner":
        return float(rng.uniform(0.25, 0.35))  # arm width / side
    return 1.0


def render_alpha(obj: ObjectSpec, size: int) -> np.ndarray:
    """The object's coverage of each pixel, float32 (size, size) in [0, 1], rasterised at
    ``SUPERSAMPLE`` x the resolution and averaged."""
    from PIL import Image, ImageDraw

    s = SUPERSAMPLE
    x0 = max(0, math.floor(obj.cx - obj.radius) - 1)
    y0 = max(0, math.floor(obj.cy - obj.radius) - 1)
    x1 = min(size, math.ceil(obj.cx + obj.radius) + 2)
    y1 = min(size, math.ceil(obj.cy + obj.radius) + 2)
    canvas = Image.new("L", ((x1 - x0) * s, (y1 - y0) * s), 0)
    draw = ImageDraw.Draw(canvas)
    c, sn = math.cos(obj.angle), math.sin(obj.angle)
    for poly, fill in shape_polygons(obj.shape, obj.aspect):
        x = obj.cx + obj.radius * (c * poly[:, 0] - sn * poly[:, 1])
        y = obj.cy + obj.radius * (sn * poly[:, 0] + c * poly[:, 1])
        # supersampled pixel j spans [j, j+1); PIL fills by pixel centre: shift by half a pixel
        pts = [((xi - x0) * s - 0.5, (yi - y0) * s - 0.5) for xi, yi in zip(x.tolist(), y.tolist())]
        draw.polygon(pts, fill=255 if fill else 0)
    sub = np.asarray(canvas, dtype=np.float32).reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3)) / 255.0
    alpha = np.zeros((size, size), np.float32)
    alpha[y0:y1, x0:x1] = sub
    return alpha


# ------------------------------------------------------------------------------------------------
# Backgrounds
# ------------------------------------------------------------------------------------------------


@functools.cache
def _photo(lib: str, name: str) -> np.ndarray:
    """A bundled photo as uint8 (H, W, 3) (grey ones replicated to 3 channels)."""
    if lib == "skimage":
        try:
            import skimage.data
        except ImportError:
            raise ImportError("the benchmark's backgrounds are scikit-image's bundled photos: "
                              "pip install scikit-image") from None
        img = getattr(skimage.data, name)()
    else:
        from sklearn.datasets import load_sample_image

        img = load_sample_image(name)
    img = np.asarray(img)
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3])


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def pattern_value(pattern: str, u: np.ndarray, v: np.ndarray, period: float, phase: float) -> np.ndarray:
    """The pattern at object-frame coordinates ``u``, ``v`` (pixels): 1 = the object's colour, 0 =
    its second tone, soft edges (no pattern is sharper than a sine's steepest part x 2)."""
    w = 2 * math.pi / period
    pu, pv = w * u + 2 * math.pi * phase, w * v + 2 * math.pi * phase
    if pattern == "solid":
        return np.ones_like(u)
    if pattern == "stripes":
        s = np.sin(pu)
    elif pattern == "checker":
        s = 1.5 * np.sin(pu) * np.sin(pv)
    elif pattern == "rings":
        s = np.sin(w * np.hypot(u, v) + 2 * math.pi * phase)
    elif pattern == "dots":
        s = np.cos(pu) + np.cos(pv) - 0.6
    elif pattern == "grid":
        s = 0.75 - np.maximum(np.cos(pu), np.cos(pv))
    elif pattern == "waves":
        s = np.sin(pu + 1.6 * np.sin(pv * 0.6))
    else:
        raise ValueError(f"unknown pattern {pattern!r}; valid: {PATTERNS + ('solid',)}")
    return np.clip(0.5 + 2.0 * s, 0.0, 1.0)


def second_tone(color: tuple[float, float, float]) -> np.ndarray:
    """The pattern's other tone: the same hue, much darker for a light colour, lighter for a dark one."""
    c = np.asarray(color, np.float32)
    return c * 0.3 if float(_luma(c)) > 0.5 else c + (1.0 - c) * 0.65


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """A random square crop (30-100% of the photo's shorter side) of a random photo, resized to
    ``size``, rotated by a multiple of 90 degrees, maybe mirrored, colour-jittered: float32 in [0, 1]."""
    from PIL import Image

    lib, name = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    photo = _photo(lib, name)
    h, w = photo.shape[:2]
    side = max(16, round(rng.uniform(0.3, 1.0) * min(h, w)))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(photo[top:top + side, left:left + side]).resize((size, size), Image.Resampling.BILINEAR)
    bg = np.asarray(crop, dtype=np.float32) / 255.0
    bg = np.rot90(bg, int(rng.integers(4)))
    if rng.random() < 0.5:
        bg = bg[:, ::-1]
    grey = _luma(bg)[..., None]
    saturation = rng.uniform(0.5, 1.4)
    tint = 1.0 + rng.uniform(-0.15, 0.15, 3)  # tints grey photos too
    bg = (grey + saturation * (bg - grey)) * tint
    mean = float(bg.mean())
    bg = (bg - mean) * rng.uniform(0.6, 1.3) + mean * rng.uniform(0.75, 1.25)  # contrast, brightness
    return np.clip(bg, 0.0, 1.0).astype(np.float32), name


# ------------------------------------------------------------------------------------------------
# One image
# ------------------------------------------------------------------------------------------------


def _rng(seed: int, split: str, index: int, stream: int = 0) -> np.random.Generator:
    if split not in _SPLIT_CODE:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), _SPLIT_CODE[split], stream, int(index)]))


def label_of(seed: int, split: str, index: int) -> int:
    """The label of image ``index``: every block of ``len(CLASSES)`` consecutive images holds each
    class once, in a seeded order (balanced labels that do not depend on the split's length)."""
    k = len(CLASSES)
    order = _rng(seed, split, index // k, stream=1).permutation(k)
    return int(order[index % k])


def _place(rng: np.random.Generator, size: int, radius: float, placed: list[ObjectSpec], tries: int = 100):
    """A centre for a circle of ``radius`` inside the image, at least ``GAP`` from every placed
    object's circle; None after ``tries`` draws."""
    lo, hi = radius + 1.0, size - radius - 1.0
    for _ in range(tries):
        cx, cy = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
        if all(math.hypot(cx - o.cx, cy - o.cy) >= radius + o.radius + GAP for o in placed):
            return cx, cy
    return None


def _color(rng: np.random.Generator, bg: np.ndarray, cx: float, cy: float, radius: float) -> tuple[float, float, float]:
    """A random colour whose luminance differs by >= 0.2 from the background under the object
    (so that it can be seen); the most distant of 20 draws otherwise."""
    y0, y1 = max(0, int(cy - radius)), int(cy + radius) + 1
    x0, x1 = max(0, int(cx - radius)), int(cx + radius) + 1
    under = float(_luma(bg[y0:y1, x0:x1]).mean())
    best, best_d = None, -1.0
    for _ in range(20):
        c = rng.uniform(0.0, 1.0, 3)
        d = abs(float(_luma(c)) - under)
        if d >= 0.2:
            return tuple(float(v) for v in c)
        if d > best_d:
            best, best_d = c, d
    return tuple(float(v) for v in best)


def generate_example(seed: int, split: str, index: int, size: int = DEFAULT_SIZE) -> Example:
    """Image ``index`` of ``split`` for ``seed``, at ``size`` px: a pure function of its arguments."""
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be in [{MIN_SIZE}, {MAX_SIZE}], got {size}")
    label = label_of(seed, split, index)
    rng = _rng(seed, split, index)
    bg, bg_name = _background(rng, size)

    def radius() -> float:
        return float(rng.uniform(*SCALE_RANGE)) * size / 2

    placed: list[ObjectSpec] = []
    shapes = [("target", CLASSES[label])]
    n_distractors = int(rng.integers(DISTRACTOR_RANGE[0], DISTRACTOR_RANGE[1] + 1))
    shapes += [("distractor", DISTRACTORS[int(rng.integers(len(DISTRACTORS)))]) for _ in range(n_distractors)]
    for role, shape in shapes:
        r = radius()
        at = _place(rng, size, r, placed)
        # the target always fits in an empty image; the first distractor shrinks until it fits
        # (there must be one), later ones that do not fit are left out
        while at is None and role == "distractor" and not any(o.role == "distractor" for o in placed):
            r *= 0.85
            at = _place(rng, size, r, placed)
        if at is None:
            continue
        angle = float(rng.uniform(0, 2 * math.pi))
        aspect = _draw_aspect(shape, rng)
        color = _color(rng, bg, at[0], at[1], r)
        if role == "target":
            period = float(rng.uniform(*PERIOD_RANGE)) * size / DEFAULT_SIZE
            pattern, phase = PATTERNS[label], float(rng.random())
        else:
            pattern, period, phase = "solid", 0.0, 0.0
        placed.append(ObjectSpec(role, shape, at[0], at[1], r, angle, aspect, color, pattern, period, phase))

    img = bg
    mask = None
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    for obj in placed:
        alpha = render_alpha(obj, size)
        # shading: a linear ramp across the object (up to +-25%) in a random direction
        t = float(rng.uniform(0, 2 * math.pi))
        ramp = 1.0 + float(rng.uniform(0, 0.25)) * ((xx - obj.cx) * math.cos(t) + (yy - obj.cy) * math.sin(t)) / obj.radius
        tone = np.asarray(obj.color, np.float32)
        if obj.pattern != "solid":
            # the object's own frame: rotated with it
            c, sn = math.cos(obj.angle), math.sin(obj.angle)
            u = c * (xx - obj.cx) + sn * (yy - obj.cy)
            v = -sn * (xx - obj.cx) + c * (yy - obj.cy)
            p = pattern_value(obj.pattern, u, v, obj.period, obj.phase)[..., None]
            tone = tone * p + second_tone(obj.color) * (1 - p)
        fill = np.clip(tone * ramp[..., None], 0, 1)
        img = img * (1 - alpha[..., None]) + fill * alpha[..., None]
        if obj.role == "target":
            mask = alpha >= MASK_THRESHOLD
    noise = float(rng.uniform(0.0, 0.03))
    img = img + rng.normal(0.0, 1.0, img.shape).astype(np.float32) * noise
    image = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return Example(image, mask, label, placed, bg_name)


def generate_split(seed: int, split: str, n: int, size: int = DEFAULT_SIZE, start: int = 0) -> Iterator[Example]:
    for i in range(start, start + n):
        yield generate_example(seed, split, i, size)


def split_counts(images: int) -> dict[str, int]:
    """Images per split for a total of ``images`` (train takes the rounding remainder)."""
    val = round(images * SPLIT_FRACTIONS["validation"])
    test = round(images * SPLIT_FRACTIONS["test"])
    return {"train": images - val - test, "validation": val, "test": test}


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------


def png_bytes(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W) or (H, W, 3) array, or of a bool mask (8-bit, 0 or 255)."""
    from PIL import Image

    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.array(im)


_OBJECT_FIELDS = ("role", "shape", "cx", "cy", "radius", "angle", "aspect", "color", "pattern", "period", "phase")


def _schema():
    import pyarrow as pa

    blob = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    obj = pa.struct([("role", pa.string()), ("shape", pa.string()), ("cx", pa.float64()), ("cy", pa.float64()),
                     ("radius", pa.float64()), ("angle", pa.float64()), ("aspect", pa.float64()),
                     ("color", pa.list_(pa.float64(), 3)), ("pattern", pa.string()), ("period", pa.float64()),
                     ("phase", pa.float64())])
    return pa.schema([("image", blob), ("label", pa.int64()), ("mask", blob), ("objects", pa.list_(obj)),
                      ("background", pa.string())])


def _table(examples: list[Example], split: str, first: int):
    import pyarrow as pa

    rows = {"image": [], "label": [], "mask": [], "objects": [], "background": []}
    for j, ex in enumerate(examples):
        name = f"{split}/{first + j:06d}"
        rows["image"].append({"bytes": png_bytes(ex.image), "path": f"{name}.png"})
        rows["label"].append(ex.label)
        rows["mask"].append({"bytes": png_bytes(ex.mask), "path": f"{name}-mask.png"})
        rows["objects"].append([{**asdict(o), "color": list(o.color)} for o in ex.objects])
        rows["background"].append(ex.background)
    return pa.Table.from_pydict(rows, schema=_schema())


def objects_from_row(objects: list[dict]) -> list[ObjectSpec]:
    """The ``objects`` column of one row back as ``ObjectSpec`` s (for ``render_alpha``)."""
    return [ObjectSpec(**{**{k: o[k] for k in _OBJECT_FIELDS}, "color": tuple(o["color"])}) for o in objects]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import PIL
    import pyarrow

    out = {"numpy": np.__version__, "pillow": PIL.__version__, "pyarrow": pyarrow.__version__}
    try:
        import skimage

        out["scikit-image"] = skimage.__version__
    except ImportError:
        pass
    return out


def manifest_key(seed: int, size: int, images: int) -> dict:
    """What decides the dataset's content (a manifest with these values describes the same data)."""
    return {"generator_version": GENERATOR_VERSION, "seed": int(seed), "size": int(size), "images": int(images)}


def read_manifest(out_dir: str | Path) -> dict | None:
    path = Path(out_dir) / "benchmark.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def is_built(out_dir: str | Path, seed: int, size: int, images: int) -> bool:
    """True when ``out_dir`` holds this dataset already: same manifest key, every file present
    with the recorded size."""
    m = read_manifest(out_dir)
    if not m or any(m.get(k) != v for k, v in manifest_key(seed, size, images).items()):
        return False
    root = Path(out_dir)
    return all((root / f["path"]).is_file() and (root / f["path"]).stat().st_size == f["bytes"]
               for files in m["files"].values() for f in files)


def check_settings(size: int, images: int) -> None:
    """ValueError unless ``size`` is in [MIN_SIZE, MAX_SIZE] and every split gets >= 10 images per class."""
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be in [{MIN_SIZE}, {MAX_SIZE}], got {size}")
    if images < 100 * len(CLASSES):
        raise ValueError(f"images must be >= {100 * len(CLASSES)} (10 per class in the validation split), got {images}")


def write_benchmark(out_dir: str | Path, seed: int = 0, size: int = DEFAULT_SIZE, images: int = DEFAULT_IMAGES,
                    shard_rows: int = 1000, row_group_size: int = 64, progress=None) -> dict:
    """Write the dataset under ``out_dir``: ``data/{split}-NNNNN-of-NNNNN.parquet`` and
    ``benchmark.json`` (the manifest, written last). Returns the manifest."""
    import pyarrow.parquet as pq

    check_settings(size, images)
    root = Path(out_dir)
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    (root / "benchmark.json").unlink(missing_ok=True)  # an unfinished write leaves no manifest
    counts = split_counts(images)
    files: dict[str, list[dict]] = {}
    label_counts: dict[str, list[int]] = {}
    distractor_counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        n = counts[split]
        shards = max(1, math.ceil(n / shard_rows))
        files[split] = []
        labels = np.zeros(len(CLASSES), np.int64)
        per_image = {str(k): 0 for k in range(DISTRACTOR_RANGE[0], DISTRACTOR_RANGE[1] + 1)}
        for s, idx in enumerate(np.array_split(np.arange(n), shards)):
            first = int(idx[0])
            examples = list(generate_split(seed, split, len(idx), size, start=first))
            for ex in examples:
                labels[ex.label] += 1
                per_image[str(sum(o.role == "distractor" for o in ex.objects))] += 1
            path = data / f"{split}-{s:05d}-of-{shards:05d}.parquet"
            tmp = path.with_suffix(".parquet.tmp")
            pq.write_table(_table(examples, split, first), tmp, row_group_size=row_group_size)
            tmp.replace(path)
            files[split].append({"path": str(path.relative_to(root)), "rows": len(idx), "bytes": path.stat().st_size,
                                 "sha256": _sha256(path)})
            if progress:
                progress(split, first + len(idx), n)
        label_counts[split] = labels.tolist()
        distractor_counts[split] = per_image
    manifest = {
        "name": "distributed_attr shapes-on-photos attribution benchmark",
        **manifest_key(seed, size, images),
        "classes": list(CLASSES),
        "class_patterns": list(PATTERNS),
        "distractor_shapes": list(DISTRACTORS),
        "counts": counts,
        "label_counts": label_counts,
        "distractors_per_image": distractor_counts,
        "scale_range": list(SCALE_RANGE),
        "mask": {"column": "mask", "format": "PNG, 8-bit grey, 0 or 255", "threshold": MASK_THRESHOLD},
        "columns": {
            "image": "struct {bytes: PNG RGB, path}",
            "label": "int64, index into classes",
            "mask": "struct {bytes: PNG 8-bit grey (255 = target pixel), path}",
            "objects": "list of struct {role, shape, cx, cy, radius, angle, aspect, color, pattern, period, phase}",
            "background": "string, the photo the background was cut from",
        },
        "backgrounds": [f"{lib}:{name}" for lib, name in BACKGROUNDS],
        "files": files,
        "library_versions": _versions(),
    }
    tmp = root / "benchmark.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(root / "benchmark.json")
    return manifest


def split_files(out_dir: str | Path, split: str) -> list[Path]:
    m = read_manifest(out_dir)
    if m is None:
        raise FileNotFoundError(f"no benchmark.json in {str(out_dir)!r}: run `distributed-attr benchmark build`")
    return [Path(out_dir) / f["path"] for f in m["files"][split]]


def load_split(out_dir: str | Path, split: str, masks: bool = False):
    """A split's images as uint8 (N, size, size, 3) and labels (N,), plus the masks (N, size, size)
    bool when ``masks``, decoded from the Parquet files."""
    import pyarrow.parquet as pq

    images, labels, mask_list = [], [], []
    for path in split_files(out_dir, split):
        cols = ["image", "label"] + (["mask"] if masks else [])
        t = pq.read_table(path, columns=cols)
        images += [decode_png(v["bytes"]) for v in t.column("image").to_pylist()]
        labels += t.column("label").to_pylist()
        if masks:
            mask_list += [decode_png(v["bytes"]) > 127 for v in t.column("mask").to_pylist()]
    out = (np.stack(images), np.asarray(labels, np.int64))
    return out + (np.stack(mask_list),) if masks else out
