"""MVTec AD in its published folder layout, as a multi-class `DatasetDict`.

    <root>/readme.txt, license.txt, ...            (ignored)
    <root>/<category>/train/good/000.png           defect-free training images
    <root>/<category>/test/good/000.png            defect-free test images (no mask)
    <root>/<category>/test/<defect>/000.png        defective test images
    <root>/<category>/ground_truth/<defect>/000_mask.png   their masks (0/255)

grid, screw and zipper are grayscale; the `image` feature converts them to RGB on decode. A mask is
drawn on its image as displayed (EXIF orientation applied; see `cnc_hf.data.common`). The demo set
(`make_demo_dataset`) uses the same layout.
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
    checked_record,
    list_images,
    report_dangling_links,
    resolve_categories,
    scan_images,
)

MASK_SUFFIX = "_mask"


def mvtec_categories(root: str | os.PathLike) -> list[str]:
    """Category folders of an MVTec-layout root: sub-folders that hold a train/ or test/ folder."""
    root = Path(root)
    return sorted(d.name for d in root.iterdir() if d.is_dir() and ((d / "train").is_dir() or (d / "test").is_dir()))


def _masks_by_stem(folder: Path, bad: BadFiles) -> dict[str, Path | None]:
    """ground_truth/<defect>/<stem>_mask.png -> {stem: path}. Files without the suffix are not masks.

    A mask that is a dangling symbolic link is reported here and maps to None, so that its image is
    left out without a second report ("defect image without its mask").
    """
    if not folder.is_dir():
        return {}
    images, dangling = scan_images(folder)
    report_dangling_links(dangling, bad)
    masks: dict[str, Path | None] = {}
    for path, value in [(p, None) for p in dangling] + [(p, p) for p in images]:
        if path.stem.endswith(MASK_SUFFIX):
            masks[path.stem[: -len(MASK_SUFFIX)]] = value
    return masks


def _test_records(category: str, test_dir: Path, truth_dir: Path, bad: BadFiles) -> list[Record]:
    """Rows of test/<defect>/ folders, each defect image paired with its ground_truth mask."""
    test: list[Record] = []
    defect_dirs = sorted(d for d in test_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    for defect_dir in defect_dirs:
        defect = defect_dir.name
        images = list_images(defect_dir, bad)
        if defect == "good":
            test += [Record(str(p), None, 0, category, "good") for p in images]
            continue
        masks = _masks_by_stem(truth_dir / defect, bad)
        for image in images:
            if image.stem not in masks:
                bad.report(
                    f"defect image without its mask: {image} (expected {truth_dir / defect / (image.stem + MASK_SUFFIX)}.png)"
                )
                continue
            mask = masks.pop(image.stem)
            if mask is not None:  # None: a dangling link, reported already
                test.append(Record(str(image), str(mask), 1, category, defect))
        for stem, mask in sorted(masks.items()):
            if mask is not None:
                bad.report(f"mask without its image: {mask} (expected {defect_dir / stem}.<png|jpg|...>)")

    # Masks of a defect type that has no test folder at all.
    if truth_dir.is_dir():
        known = {d.name for d in defect_dirs}
        for folder in sorted(d for d in truth_dir.iterdir() if d.is_dir() and d.name not in known):
            for mask in _masks_by_stem(folder, bad).values():
                if mask is not None:
                    bad.report(f"mask without its image: {mask} (no folder {test_dir / folder.name})")
    return test


def _category_records(root: Path, category: str, bad: BadFiles) -> dict[str, list[Record]]:
    base = root / category
    train_dir, test_dir, truth_dir = base / "train" / "good", base / "test", base / "ground_truth"
    # A missing folder is a bad entry like a bad file: with on_bad_file="skip" the category keeps its other split.
    for folder in (train_dir, test_dir):
        if not folder.is_dir():
            bad.report(f"MVTec AD category {category!r}: missing folder {folder}")

    train_images = list_images(train_dir, bad) if train_dir.is_dir() else []
    train = [Record(str(p), None, 0, category, "good") for p in train_images]
    test = _test_records(category, test_dir, truth_dir, bad) if test_dir.is_dir() else []

    # A category folder without images (a partial copy or extraction) would otherwise just vanish from the set.
    for split, rows, folder in (("train", train, train_dir), ("test", test, test_dir)):
        if not rows and folder.is_dir():  # a missing folder was reported above
            bad.report(f"empty {split!r} split for MVTec AD category {category!r}: no usable images in {folder}")
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
            unreadable/truncated image, dangling symbolic link, mask of another size than its image as
            displayed) or bad category (no train or no test images, a missing train/good or test
            folder) naming it; "skip" leaves such files out (a category keeps its other split) and
            warns once with their count.
        check_files: "header" (default; cheap, see `cnc_hf.data.common`), "full" (decode every file)
            or "none" (masks' headers are still read: their mode decides how they are stored).

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
            checked = (checked_record(r, check_files, bad) for r in rows)
            records[split] += [r for r in checked if r is not None]
    bad.warn_if_any()
    return build_dataset_dict(records, root)
