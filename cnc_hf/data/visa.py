"""VisA in its raw published layout, as a multi-class `DatasetDict`.

    <root>/split_csv/1cls.csv                         object,split,label,image,mask
    <root>/<object>/Data/Images/{Normal,Anomaly}/*.JPG
    <root>/<object>/Data/Masks/Anomaly/*.png          non-zero = defect (values 1..N, not always 255)
    <root>/<object>/image_anno.csv                    optional: image,label,mask (defect descriptions)

Paths in the csv are relative to <root>; `label` is "normal"/"anomaly", `split` "train"/"test",
`mask` is empty for normal rows. VisA names no defect folders, so `defect_type` is the description
from `<object>/image_anno.csv` when that file is there, else "anomaly".
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Sequence

from datasets import DatasetDict

from .common import (
    CHECK_FILES,
    AnomalyDatasetError,
    BadFiles,
    Record,
    build_dataset_dict,
    check_option,
    checked_record,
    link_note,
    resolve_categories,
)

CSV_COLUMNS = ("object", "split", "label", "image", "mask")
VISA_LABELS = {"normal": 0, "anomaly": 1}


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"VisA split file not found: {path} (expected split_csv/1cls.csv under the VisA root)")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [name.strip() for name in (reader.fieldnames or [])]
            missing = [c for c in CSV_COLUMNS if c not in header]
            if missing:
                raise AnomalyDatasetError(
                    f"{path}: header {header} lacks column(s) {missing}; expected {','.join(CSV_COLUMNS)}"
                )
            return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (UnicodeDecodeError, csv.Error) as err:  # e.g. an image or a spreadsheet saved under the csv's name
        raise AnomalyDatasetError(f"{path}: not a readable UTF-8 csv file ({err})") from err


def _defect_descriptions(root: Path, category: str) -> dict[str, str]:
    """Map image path -> defect description from <object>/image_anno.csv, if that file exists."""
    path = root / category / "image_anno.csv"
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8-sig") as handle:
        return {
            row["image"].strip(): row["label"].strip()
            for row in csv.DictReader(handle)
            if row.get("image") and row.get("label")
        }


def load_visa(
    root: str | os.PathLike,
    split_csv: str | os.PathLike | None = None,
    categories: str | Sequence[str] | None = None,
    *,
    on_bad_file: str = "error",
    check_files: str = "header",
) -> DatasetDict:
    """Index a raw VisA folder into a DatasetDict with train/test over all (or `categories`) objects.

    Args:
        root: the VisA root (holding candle/, capsules/, ..., split_csv/).
        split_csv: the split file; default `<root>/split_csv/1cls.csv`. A relative path that does not
            exist from the working directory is taken relative to `root`.
        categories, on_bad_file, check_files: as in `load_mvtec_ad`. A bad csv row (unknown split or
            label, an anomaly without mask, a missing file or dangling link, an anomaly in train) is a
            bad file too. Sizes are compared as displayed (EXIF orientation applied): phone JPEGs
            often carry one.
    """
    check_option("check_files", check_files, CHECK_FILES)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"VisA root not found: {root} (expected a folder with split_csv/1cls.csv)")
    csv_path = _split_csv_path(root, split_csv)
    rows = _read_csv(csv_path)
    available = sorted({row["object"] for row in rows if row["object"]})
    if not available:
        raise AnomalyDatasetError(f"{csv_path}: no rows; expected one row per image")
    keep = set(resolve_categories(categories, available, csv_path))

    bad = BadFiles(on_bad_file, csv_path)
    descriptions = {c: _defect_descriptions(root, c) for c in sorted(keep)}
    records: dict[str, list[Record]] = {"train": [], "test": []}
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        if row["object"] not in keep:
            continue
        parsed = _row_record(row, root, descriptions[row["object"]], f"{csv_path}:{line}", bad)
        if parsed is None:
            continue
        split, record = parsed
        record = checked_record(record, check_files, bad)
        if record is not None:
            records[split].append(record)
    bad.warn_if_any()
    return build_dataset_dict(records, csv_path)


def _split_csv_path(root: Path, split_csv: str | os.PathLike | None) -> Path:
    """The split file: `<root>/split_csv/1cls.csv` by default; a relative path missing here is under root."""
    if split_csv is None:
        return root / "split_csv" / "1cls.csv"
    csv_path = Path(split_csv).expanduser()
    if not csv_path.is_absolute() and not csv_path.exists():
        csv_path = root / csv_path
    return csv_path


def _row_record(
    row: dict[str, str], root: Path, descriptions: dict[str, str], where: str, bad: BadFiles
) -> tuple[str, Record] | None:
    """(split, Record) for one csv row, or None after reporting why the row is bad."""
    split, label_name = row["split"].lower(), row["label"].lower()
    if split not in ("train", "test"):
        bad.report(f"{where}: split {row['split']!r}, expected 'train' or 'test'")
        return None
    if label_name not in VISA_LABELS:
        bad.report(f"{where}: label {row['label']!r}, expected 'normal' or 'anomaly'")
        return None
    label = VISA_LABELS[label_name]
    if not row["image"]:
        bad.report(f"{where}: empty image path")
        return None
    image = root / row["image"]
    if not image.is_file():
        bad.report(f"image not found: {image}{link_note(image)} (listed at {where})")
        return None
    if split == "train" and label == 1:
        bad.report(f"{where}: anomalous image {image} in the train split; training uses normal images only")
        return None
    mask = None
    if label == 1:
        if not row["mask"]:
            bad.report(f"anomalous image without its mask: {image} (empty mask column at {where})")
            return None
        mask = root / row["mask"]
        if not mask.is_file():
            bad.report(f"mask not found: {mask}{link_note(mask)} for image {image} (listed at {where})")
            return None
    elif row["mask"]:
        bad.report(f"{where}: normal image {image} has a mask {row['mask']}; expected an empty mask column")
        return None
    defect_type = "good" if label == 0 else descriptions.get(row["image"], "anomaly")
    return split, Record(str(image), None if mask is None else str(mask), label, row["object"], defect_type)
