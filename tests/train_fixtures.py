"""Tiny anomaly data sets written on disk in the MVTec AD layout, for the training/evaluation tests.

Normal images are smooth, low-frequency patterns (a tilted colour gradient plus a slow sinusoid);
anomalous images are the same patterns with high-contrast noise blobs, and their masks mark the blobs.
Even a random CNN/ViT separates the two once the decoder has learned to reconstruct the smooth
patterns, which makes a robust learning check.

    root/<category>/train/good/000.png
    root/<category>/test/good/000.png
    root/<category>/test/noise/000.png
    root/<category>/ground_truth/noise/000_mask.png
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image

CATEGORIES = ("waves", "rings")


def smooth_pattern(rng: np.random.Generator, category: str, size: int) -> np.ndarray:
    """A low-frequency RGB pattern in [0, 1], (size, size, 3); the family depends on the category."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    phase, angle = rng.uniform(0, 2 * np.pi), rng.uniform(0, np.pi)
    if category == "rings":
        cy, cx = rng.uniform(0.3, 0.7, size=2)
        base = np.sin(2 * np.pi * 1.5 * np.hypot(y - cy, x - cx) + phase)
    else:
        base = np.sin(2 * np.pi * 1.2 * (np.cos(angle) * x + np.sin(angle) * y) + phase)
    tint = rng.uniform(0.3, 0.7, size=3)
    image = 0.5 + 0.25 * base[..., None] * tint + 0.1 * (x[..., None] - 0.5)
    return np.clip(image, 0.0, 1.0)


def add_noise_blobs(rng: np.random.Generator, image: np.ndarray, num_blobs: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Paste high-contrast salt-and-pepper discs; return the image and its (size, size) bool mask."""
    size = image.shape[0]
    y, x = np.mgrid[0:size, 0:size]
    mask = np.zeros((size, size), dtype=bool)
    for _ in range(num_blobs):
        cy, cx = rng.integers(size // 5, size - size // 5, size=2)
        radius = rng.uniform(size / 8, size / 5)
        mask |= (y - cy) ** 2 + (x - cx) ** 2 <= radius**2
    noise = rng.integers(0, 2, size=image.shape).astype(np.float32)
    return np.where(mask[..., None], noise, image), mask


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.dtype == bool:
        PIL.Image.fromarray(array.astype(np.uint8) * 255, "L").save(path)
    else:
        PIL.Image.fromarray(np.round(array * 255).astype(np.uint8), "RGB").save(path)


def write_mvtec_layout(
    root: str | Path,
    categories: tuple[str, ...] = CATEGORIES,
    n_train: int = 8,
    n_test_good: int = 3,
    n_test_bad: int = 3,
    size: int = 32,
    seed: int = 0,
) -> Path:
    """Write a tiny MVTec-layout data set under `root` and return `root`."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for category in categories:
        base = root / category
        for i in range(n_train):
            _save(smooth_pattern(rng, category, size), base / "train" / "good" / f"{i:03d}.png")
        for i in range(n_test_good):
            _save(smooth_pattern(rng, category, size), base / "test" / "good" / f"{i:03d}.png")
        for i in range(n_test_bad):
            image, mask = add_noise_blobs(rng, smooth_pattern(rng, category, size))
            _save(image, base / "test" / "noise" / f"{i:03d}.png")
            _save(mask, base / "ground_truth" / "noise" / f"{i:03d}_mask.png")
    return root


def write_folder_layout(
    root: str | Path,
    category: str = "waves",
    n_good: int = 10,
    defects: tuple[str, ...] = ("noise", "blobs"),
    n_bad: int = 2,
    masks_for: int = 0,
    size: int = 32,
    seed: int = 0,
) -> Path:
    """Your own data, no MVTec layout: root/good/*.png, root/<defect>/*.png for each of `defects` and, for the
    first `masks_for` images of each defect folder, root/masks/<defect>/<stem>.png. Returns `root`."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for i in range(n_good):
        _save(smooth_pattern(rng, category, size), root / "good" / f"{i:03d}.png")
    for defect in defects:
        for i in range(n_bad):
            image, mask = add_noise_blobs(rng, smooth_pattern(rng, category, size))
            _save(image, root / defect / f"{i:03d}.png")
            if i < masks_for:
                _save(mask, root / "masks" / defect / f"{i:03d}.png")
    return root
