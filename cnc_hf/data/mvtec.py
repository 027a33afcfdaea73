"""MVTec AD in its published folder layout, as a multi-class `DatasetDict`.

    <root>/readme.txt, license.txt, ...            (ignored)
    <root>/<category>/train/good/000.png           defect-free training images
    <root>/<category>/test/good/000.png            defect-free test images (no mask)
    <root>/<category>/test/<defect>/000.png        defective test images
    <root>/<category>/ground_truth/<defect>/000_mask.png   their masks (0/255)

grid, screw and zipper are grayscale; the `image` feature converts them to RGB on decode. The demo
set (`make_demo_dataset`) uses the same layout.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from datasets import DatasetDict

from .common import (
    AnomalyDatasetError,
    CHECK_FILES,
    BadFiles,
    Record,
    build_dataset_dict,
    check_option,
    check_record,
    list_images,
    resolve_categories,
)

MASK_SUFFIX = "_mask"


def mvtec_categories(root: str | os.PathLike) -> list[str]:
    """Category folders of an MVTec-layout root: sub-folders that hold a train/ or test/ folder."""
    root = Path(root)
    return sorted(d.name for d in root.iterdir() if d.is_dir() and ((d / "train").is_dir() or (d / "test").is_dir()))


def _masks_by_stem(folder: Path) -> dict[str, Path]:
    """ground_truth/<defect>/<stem>_mask.png -> {stem: path}. Files without the suffix are not masks."""
    if not folder.is_dir():
        return {}
    return {p.stem[: -len(MASK_SUFFIX)]: p for p in list_images(folder) if p.stem.endswith(MASK_SUFFIX)}


def _category_records(root: Path, category: str, bad: BadFiles) -> dict[str, list[Record]]:
    base = root / category
    train_dir, test_dir, truth_dir = base / "train" / "good", base / "test", base / "ground_truth"
    for folder in (train_dir, test_dir):
        if not folder.is_dir():
            raise AnomalyDatasetError(f"MVTec AD category {category!r}: missing folder {folder}")

    train = [Record(str(p), None, 0, category, "good") for p in list_images(train_dir)]
    test: list[Record] = []
    defect_dirs = sorted(d for d in test_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    for defect_dir in defect_dirs:
        defect = defect_dir.name
        images = list_images(defect_dir)
        if defect == "good":
            test += [Record(str(p), None, 0, category, "good") for p in images]
            continue
        masks = _masks_by_stem(truth_dir / defect)
        for image in images:
            mask = masks.pop(image.stem, None)
            if mask is None:
                bad.report(
                    f"defect image without its mask: {image} (expected {truth_dir / defect / (image.stem + MASK_SUFFIX)}.png)"
                )
                continue
            test.append(Record(str(image), str(mask), 1, category, defect))
        for stem, mask in sorted(masks.items()):
            bad.report(f"mask without its image: {mask} (expected {defect_dir / stem}.<png|jpg|...>)")

    # A category folder without images (a partial copy or extraction) would otherwise just vanish from the set.
    for split, rows, folder in (("train", train, train_dir), ("test", test, test_dir)):
        if not rows:
            bad.report(f"empty {split!r} split for MVTec AD category {category!r}: no usable images in {folder}")

    # Masks of a defect type that has no test folder at all.
    if truth_dir.is_dir():
        known = {d.name for d in defect_dirs}
        for folder in sorted(d for d in truth_dir.iterdir() if d.is_dir() and d.name not in known):
            for mask in _masks_by_stem(folder).values():
                bad.report(f"mask without its image: {mask} (no folder {test_dir / folder.name})")
    return {"train": train, "test": test}


def load_mvtec_ad(
    root: str | os.PathLike,
    categories: str | Sequence[str] | None = None,
    *,
    on_bad_file: str = "error",
    check_files: str = "header",
) -> DatasetDict:
    """Index an MVTec AD folder (all categories, or `categories`) into a DatasetDict with train/test.

    Args:
        root: the folder holding one sub-folder per category (bottle, cable, ...).
        categories: a name or list of names; None = every category found.
        on_bad_file: "error" (default) raises on the first bad file (missing mask, mask without image,
            unreadable/truncated image, mask of another size) or empty category (no train or no test
            images) naming it; "skip" leaves such files out and warns once with their count.
        check_files: "header" (default; cheap, see `cnc_hf.data.common`), "full" (decode every file)
            or "none".

    Nothing is decoded up front: rows store file paths, images decode when a row is read.
    """
    check_option("check_files", check_files, CHECK_FILES)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"MVTec AD root not found: {root} (expected a folder with <category>/train/good, <category>/test/...)"
        )
    available = mvtec_categories(root)
    if not available:
        raise AnomalyDatasetError(
            f"no MVTec AD categories in {root}: expected sub-folders like bottle/train/good and bottle/test/<defect>"
        )
    bad = BadFiles(on_bad_file, root)
    records: dict[str, list[Record]] = {"train": [], "test": []}
    for category in resolve_categories(categories, available, root):
        for split, rows in _category_records(root, category, bad).items():
            records[split] += [r for r in rows if check_record(r, check_files, bad)]
    bad.warn_if_any()
    return build_dataset_dict(records, root)
