"""A small MVTec-layout demo set made from real photographs that scikit-image ships.

No pretrained CLIP or public dataset is reachable on the project's machines, so the demo trains on
crops of three CC0 texture photographs bundled with scikit-image (`skimage.data.brick`, `grass`,
`gravel`; no download) with synthetic defects whose masks are exact: a mask marks precisely the
pixels that were painted over.

Categories: brick (tinted brick red), grass (tinted green), gravel (gray, stored as RGB as a colour
camera sees it). Defects: "scratch" (a thin bright or dark polyline), "hole" (a dark rotated
ellipse, shaded towards its centre), "stain" (a blob filled with another texture in another colour:
blue on brick, magenta on grass, orange on gravel).

Design rule: the demo's random CLIP must see at least one defect kind in every category, or that
category's decisions measure nothing (tests/test_benchmark.py checks it with the nearest-neighbour
bound of `python -m cnc_hf_train.feature_bound`). Version 1 broke it: gravel was grayscale with
mid-gray stains, and a random, LayerNorm-ed encoder is close to blind to luminance-only defects on
that texture (stains scored image AUROC 0.25-0.66 on seeds 1 and 2). Version 2 keeps gravel's photos
and gives its stains colour; orange was chosen over rust and blue because it stayed visible for the
random CLIPs of seeds 1-5 (0.89-1.00; rust 0.69-1.00, blue 0.38-0.72). Holes in grass and gravel and
most scratches in gravel stay invisible to that encoder: the demo shows that limit as it is.

Same seed, same bytes: every random choice comes from `numpy.random.Generator`s seeded by
(seed, category, split), and PNG encoding is deterministic.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw

# category -> (skimage.data texture, RGB tint (None: stored grayscale), stain texture, stain tint)
DEMO_CATEGORIES = {
    "brick": ("brick", (1.0, 0.55, 0.42), "gravel", (0.35, 0.45, 1.0)),
    "grass": ("grass", (0.55, 0.9, 0.35), "brick", (1.0, 0.3, 0.9)),
    "gravel": ("gravel", (1.0, 1.0, 1.0), "grass", (1.0, 0.4, 0.1)),
}
DEFECT_KINDS = ("scratch", "hole", "stain")
# Written into readme.txt: a folder made by an earlier version is not reused as if it were this one.
DEMO_SET_VERSION = 2
_README_MARK = "cnc-hf demo dataset"


def _texture(name: str) -> np.ndarray:
    import skimage.data  # imported here: only the demo needs scikit-image

    return np.asarray(getattr(skimage.data, name)(), dtype=np.uint8)


def _crop(rng: np.random.Generator, texture: np.ndarray, image_size: int) -> np.ndarray:
    """A random crop of twice the output size (more texture per image), flipped, resized down: uint8 HxW."""
    side = min(texture.shape[0], texture.shape[1], 2 * image_size)
    top = int(rng.integers(0, texture.shape[0] - side + 1))
    left = int(rng.integers(0, texture.shape[1] - side + 1))
    crop = texture[top : top + side, left : left + side]
    # Flips only: a rotated brick wall (vertical courses) would itself look anomalous.
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1, :]
    image = PIL.Image.fromarray(np.ascontiguousarray(crop), "L")
    return np.asarray(image.resize((image_size, image_size), PIL.Image.Resampling.LANCZOS))


def _colorize(gray: np.ndarray, tint: tuple[float, float, float] | None) -> np.ndarray:
    """uint8 HxW -> HxWx3 tinted (colour categories) or HxW unchanged (grayscale category)."""
    if tint is None:
        return gray
    return np.clip(gray[..., None].astype(np.float32) * np.asarray(tint, np.float32), 0, 255).astype(np.uint8)


def _ellipse_polygon(cx: float, cy: float, rx: float, ry: float, angle: float, n: int = 48) -> list[tuple]:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    cos, sin = math.cos(angle), math.sin(angle)
    return list(zip((cx + x * cos - y * sin).tolist(), (cy + x * sin + y * cos).tolist()))


def _draw_mask(size: int, draw_fn) -> np.ndarray:
    canvas = PIL.Image.new("L", (size, size), 0)
    draw_fn(PIL.ImageDraw.Draw(canvas))
    return np.asarray(canvas) > 0


def _scratch(rng: np.random.Generator, image: np.ndarray, context: dict) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    x, y = rng.uniform(0.2, 0.8, size=2) * size
    direction = rng.uniform(0, 2 * math.pi)
    points = [(x, y)]
    for _ in range(int(rng.integers(2, 4))):
        direction += rng.uniform(-0.6, 0.6)
        length = rng.uniform(0.15, 0.3) * size
        x = float(np.clip(x + length * math.cos(direction), 2, size - 3))
        y = float(np.clip(y + length * math.sin(direction), 2, size - 3))
        points.append((x, y))
    width = int(rng.integers(2, 4))
    mask = _draw_mask(size, lambda d: d.line(points, fill=255, width=width, joint="curve"))
    value = rng.uniform(0, 35) if rng.random() < 0.5 else rng.uniform(220, 255)
    fill = np.clip(value + rng.normal(0, 6, size=mask.sum()), 0, 255)
    out = image.copy()
    out[mask] = fill[:, None] if out.ndim == 3 else fill
    return out, mask


def _hole(rng: np.random.Generator, image: np.ndarray, context: dict) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    cx, cy = rng.uniform(0.25, 0.75, size=2) * size
    rx, ry = rng.uniform(0.06, 0.14, size=2) * size
    polygon = _ellipse_polygon(cx, cy, rx, ry, rng.uniform(0, math.pi))
    mask = _draw_mask(size, lambda d: d.polygon(polygon, fill=255))
    yy, xx = np.nonzero(mask)
    depth = np.hypot((xx - cx) / rx, (yy - cy) / ry)  # 0 at the centre, ~1 at the rim
    fill = np.clip(8 + 35 * depth + rng.normal(0, 3, size=depth.shape), 0, 255)
    out = image.copy()
    out[mask] = fill[:, None] if out.ndim == 3 else fill
    return out, mask


def _stain(rng: np.random.Generator, image: np.ndarray, context: dict) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    cx, cy = rng.uniform(0.3, 0.7, size=2) * size
    blobs = []
    for _ in range(int(rng.integers(3, 6))):
        ox, oy = rng.uniform(-0.08, 0.08, size=2) * size
        rx, ry = rng.uniform(0.05, 0.11, size=2) * size
        blobs.append(_ellipse_polygon(cx + ox, cy + oy, rx, ry, rng.uniform(0, math.pi)))
    mask = _draw_mask(size, lambda d: [d.polygon(p, fill=255) for p in blobs])
    other = _crop(rng, context["stain_texture"], size)
    if image.ndim == 2:
        other = np.clip(other.astype(np.float32) * 0.6 + 90, 0, 255).astype(np.uint8)  # flatter, mid-gray
    else:
        other = _colorize(other, context["stain_tint"])
    out = image.copy()
    out[mask] = other[mask]
    return out, mask


DEFECTS = {"scratch": _scratch, "hole": _hole, "stain": _stain}


def apply_defect(rng: np.random.Generator, image: np.ndarray, kind: str, context: dict) -> tuple[np.ndarray, np.ndarray]:
    """Paint one synthetic defect of `kind`; returns (defective uint8 image, bool mask of painted pixels)."""
    return DEFECTS[kind](rng, image, context)


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(array, "RGB" if array.ndim == 3 else "L").save(path, format="PNG")


def _readme(params: str) -> str:
    return (
        f"{_README_MARK}\n{params}\n\n"
        "Made by cnc_hf.data.make_demo_dataset in the MVTec AD folder layout:\n"
        "  <category>/train/good, <category>/test/<good|defect>, <category>/ground_truth/<defect>/<stem>_mask.png\n"
        "Images are crops of texture photographs shipped with scikit-image (skimage.data.brick, grass, gravel;\n"
        "CC0 licensed, see their docstrings), brick and grass tinted, gravel gray (RGB). Defects are\n"
        "synthetic (scratch, hole, stain); each mask (0/255) marks exactly the painted pixels.\n"
        "It is a demo for pipelines and training on CPUs, not a benchmark.\n"
    )


def make_demo_dataset(
    out_dir: str | os.PathLike,
    seed: int = 0,
    image_size: int = 128,
    n_train: int = 24,
    n_test_good: int = 8,
    n_test_defect: int = 8,
) -> Path:
    """Write the demo set (MVTec layout) to `out_dir` and return its path.

    Per category: `n_train` train/good images, `n_test_good` test/good images and `n_test_defect`
    images of EACH defect kind (scratch, hole, stain) with masks. Defaults: 3 x (24 + 8 + 24) = 168
    PNGs of 128x128, about 5 MB, made in about a second.

    If `out_dir` already holds a demo made with the same arguments it is reused as is; any other
    non-empty folder is an error (nothing is ever deleted).
    """
    for name, value, low in (("image_size", image_size, 16), ("n_train", n_train, 1), ("n_test_good", n_test_good, 1),
                             ("n_test_defect", n_test_defect, 1)):
        if not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name}: got {value!r}; expected an int >= {low}")
    out_dir = Path(out_dir).expanduser()
    params = f"parameters: version={DEMO_SET_VERSION} seed={seed} image_size={image_size} n_train={n_train} " \
             f"n_test_good={n_test_good} n_test_defect={n_test_defect}"
    if _holds_same_demo(out_dir, params):
        return out_dir

    # Build in a sibling temp folder and move it into place: an interrupted run leaves no half set.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the demo is an ordinary folder
    try:
        for index, category in enumerate(DEMO_CATEGORIES):
            _write_category(staging / category, category, [seed, index], image_size,
                            (n_train, n_test_good, n_test_defect))
        (staging / "readme.txt").write_text(_readme(params), encoding="utf-8")
        (staging / "license.txt").write_text(
            "Source photographs: scikit-image's skimage.data.brick, grass and gravel, CC0 1.0.\n", encoding="utf-8"
        )
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); os.replace needs the name free
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _holds_same_demo(out_dir: Path, params: str) -> bool:
    """True if `out_dir` holds a demo made with `params`; False if it is missing or empty; else an error."""
    if not (out_dir.exists() and any(out_dir.iterdir())):
        return False
    readme = out_dir / "readme.txt"
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    if text.startswith(_README_MARK) and params in text.splitlines():
        return True
    reason = "holds a demo made with other parameters" if text.startswith(_README_MARK) else "is not empty"
    raise FileExistsError(f"{out_dir} {reason}; pass a new or empty folder to make_demo_dataset")


def _write_category(folder: Path, category: str, seed: list[int], image_size: int,
                    counts: tuple[int, int, int]) -> None:
    """One category's train/good, test/<good|defect> and ground_truth/<defect> PNGs under `folder`.

    `seed` is [seed, category index]; each part (train, test good, each defect kind) draws from its own
    generator, so changing one count leaves the other parts' images as they were.
    """
    n_train, n_test_good, n_test_defect = counts
    texture_name, tint, stain_name, stain_tint = DEMO_CATEGORIES[category]
    texture = _texture(texture_name)
    context = {"stain_texture": _texture(stain_name), "stain_tint": stain_tint}

    def clean(rng):
        return _colorize(_crop(rng, texture, image_size), tint)

    rng = np.random.default_rng([*seed, 0])
    for i in range(n_train):
        _save(clean(rng), folder / "train" / "good" / f"{i:03d}.png")
    rng = np.random.default_rng([*seed, 1])
    for i in range(n_test_good):
        _save(clean(rng), folder / "test" / "good" / f"{i:03d}.png")
    for kind_index, kind in enumerate(DEFECT_KINDS):
        rng = np.random.default_rng([*seed, 2 + kind_index])
        for i in range(n_test_defect):
            image, mask = apply_defect(rng, clean(rng), kind, context)
            _save(image, folder / "test" / kind / f"{i:03d}.png")
            _save(mask.astype(np.uint8) * 255, folder / "ground_truth" / kind / f"{i:03d}_mask.png")
