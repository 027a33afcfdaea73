"""What every anomaly dataset in cnc-hf shares: the schema, file checks, error handling, collation.

Schema (one row per image; splits "train" and "test"):

    image        datasets.Image(mode="RGB")   decoded lazily from its file; grayscale -> RGB on decode
    mask         datasets.Image(mode="L")     ground truth, non-zero = defect; None for good images
    label        ClassLabel(["good", "anomaly"])
    category     string                       product category ("bottle", "pcb1", ...)
    defect_type  string                       "good" or the defect folder name
    path         string                       the source image path

Rows are built from file *paths* (`Dataset.from_dict` with `Image` features stores the path, not the
bytes), so indexing all of MVTec AD (5354 files) decodes nothing. Files are checked cheaply at index
time instead (`check_files="header"`): PIL reads only the header (format and size, so an image and
its mask can be compared), and the last bytes of PNG/JPEG files are looked at, since a truncated copy
loses its end marker; only a file that fails that look is decoded to confirm. Measured on an
MVTec-sized copy (5355 images + 1800 masks, 2 busy CPU cores): 0.5 s without checks, 1.9 s with.
Corruption inside intact files only shows with `check_files="full"` (decodes everything) or when
the row is read.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import PIL.Image
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value

LABEL_NAMES = ["good", "anomaly"]
SPLITS = ("train", "test")
FEATURES = Features(
    {
        "image": Image(mode="RGB"),
        "mask": Image(mode="L"),
        "label": ClassLabel(names=LABEL_NAMES),
        "category": Value("string"),
        "defect_type": Value("string"),
        "path": Value("string"),
    }
)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
HIGH_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")
ON_BAD_FILE = ("error", "skip")
CHECK_FILES = ("header", "full", "none")


class AnomalyDatasetError(ValueError):
    """A dataset on disk does not match its published layout; the message names the path."""


@dataclass(frozen=True)
class Record:
    """One row before it becomes a `datasets` row: paths only, nothing decoded."""

    image: str
    mask: str | None
    label: int
    category: str
    defect_type: str


def is_image_file(path: Path) -> bool:
    """Image files by extension; hidden files (.DS_Store, ._x.png from macOS copies) are not images."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: Path) -> list[Path]:
    """Sorted image files directly in `folder`; readme/license/stray files are ignored."""
    return sorted(p for p in folder.iterdir() if is_image_file(p))


class BadFiles:
    """Collects per-file problems: raise at once (`on_bad_file="error"`) or skip and warn with a count."""

    def __init__(self, on_bad_file: str, source: str | os.PathLike):
        self.on_bad_file = check_option("on_bad_file", on_bad_file, ON_BAD_FILE)
        self.source = str(source)
        self.skipped: list[str] = []
        self.high_bit: list[str] = []  # 16-bit/float images: decoding to 8-bit RGB clips them

    def report(self, message: str) -> None:
        if self.on_bad_file == "error":
            raise AnomalyDatasetError(message + " (pass on_bad_file='skip' to skip such files with a warning)")
        self.skipped.append(message)

    def warn_if_any(self) -> None:
        if self.high_bit:
            warnings.warn(
                f"{self.source}: {len(self.high_bit)} image(s) have 16-bit or float pixels (e.g. {self.high_bit[0]}); "
                "the `image` column decodes to 8-bit RGB with PIL, which clips such values. Convert them to 8-bit "
                "first (CNCImageProcessor itself scales 16-bit input correctly).",
                UserWarning,
                stacklevel=3,
            )
        if self.skipped:
            examples = "\n  ".join(self.skipped[:5])
            more = f"\n  ... and {len(self.skipped) - 5} more" if len(self.skipped) > 5 else ""
            warnings.warn(
                f"{self.source}: skipped {len(self.skipped)} bad file(s):\n  {examples}{more}",
                UserWarning,
                stacklevel=3,
            )


def _looks_truncated(path: Path, image_format: str | None) -> bool:
    """Cheap end-marker test: PNG ends with an IEND chunk, JPEG with FF D9 (maybe zero padded)."""
    if image_format not in ("PNG", "JPEG"):
        return False
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - 64))
        tail = handle.read()
    if image_format == "PNG":
        return not tail.endswith(b"IEND\xaeB`\x82")
    return not tail.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")


def check_image_file(path: Path, check_files: str = "header") -> tuple[tuple[int, int], str] | None:
    """Return ((width, height), PIL mode) of an image file, or raise `AnomalyDatasetError` naming it.

    "header": read the header and the end marker (decode only files whose end looks wrong);
    "full": decode every file; "none": no check, returns None.
    """
    if check_files == "none":
        return None
    try:
        with PIL.Image.open(path) as image:
            size, mode = image.size, image.mode
            if check_files == "full" or _looks_truncated(path, image.format):
                image.load()  # raises on truncated/corrupt data
    except FileNotFoundError:
        raise AnomalyDatasetError(f"file not found: {path}") from None
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as err:
        raise AnomalyDatasetError(f"unreadable or truncated image: {path} ({err})") from err
    if size[0] == 0 or size[1] == 0:
        raise AnomalyDatasetError(f"empty image (size {size}): {path}")
    return size, mode


def check_option(name: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name}: got {value!r}; expected one of {tuple(allowed)}")
    return value


def check_record(record: Record, check_files: str, bad: BadFiles) -> bool:
    """Check an image (and its mask: readable, same size). Return False if the record was skipped."""
    try:
        image_info = check_image_file(Path(record.image), check_files)
        if image_info is not None and image_info[1] in HIGH_BIT_MODES:
            bad.high_bit.append(record.image)
        if record.mask is not None:
            mask_info = check_image_file(Path(record.mask), check_files)
            image_size, mask_size = (image_info or (None,))[0], (mask_info or (None,))[0]
            if image_size is not None and mask_size != image_size:
                raise AnomalyDatasetError(
                    f"mask {record.mask} is {mask_size[0]}x{mask_size[1]} but its image {record.image} is "
                    f"{image_size[0]}x{image_size[1]}; expected the same size"
                )
    except AnomalyDatasetError as err:
        bad.report(str(err))
        return False
    return True


def resolve_categories(categories: str | Sequence[str] | None, available: Sequence[str], source) -> list[str]:
    """None -> all available; otherwise the requested ones, which must all exist."""
    if categories is None:
        return list(available)
    if isinstance(categories, str):
        categories = [categories]
    categories = list(dict.fromkeys(categories))
    unknown = [c for c in categories if c not in available]
    if unknown:
        raise AnomalyDatasetError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {unknown} in {source}; "
                                  f"available: {list(available)}")
    if not categories:
        raise ValueError(f"categories: got an empty list for {source}; expected at least one of {list(available)}")
    return categories


def build_dataset_dict(records: dict[str, list[Record]], source) -> DatasetDict:
    """Records per split -> DatasetDict with the schema above. An empty split is an error."""
    splits = {}
    for split in SPLITS:
        rows = records.get(split, [])
        if not rows:
            raise AnomalyDatasetError(f"empty {split!r} split in {source}: no usable images found")
        columns = {
            "image": [r.image for r in rows],
            "mask": [r.mask for r in rows],
            "label": [r.label for r in rows],
            "category": [r.category for r in rows],
            "defect_type": [r.defect_type for r in rows],
            "path": [r.image for r in rows],
        }
        splits[split] = Dataset.from_dict(columns, features=FEATURES, split=split)
    return DatasetDict(splits)


def validate_schema(dataset: DatasetDict, source) -> DatasetDict:
    """Raise a clear error unless `dataset` has train/test splits with the cnc-hf columns and types."""
    if not isinstance(dataset, DatasetDict):
        raise AnomalyDatasetError(f"{source}: expected a DatasetDict with splits {SPLITS}, got {type(dataset).__name__}")
    missing_splits = [s for s in SPLITS if s not in dataset]
    if missing_splits:
        raise AnomalyDatasetError(f"{source}: missing split(s) {missing_splits}; found {list(dataset)}")
    for split in SPLITS:
        features = dataset[split].features
        problems = []
        for name, expected in FEATURES.items():
            found = features.get(name)
            if found is None:
                problems.append(f"missing column {name!r}")
            elif isinstance(expected, Image) and not isinstance(found, Image):
                problems.append(f"column {name!r} is {found}, expected an Image feature")
            elif isinstance(expected, ClassLabel) and (not isinstance(found, ClassLabel) or found.names != LABEL_NAMES):
                problems.append(f"column 'label' is {found}, expected ClassLabel(names={LABEL_NAMES})")
            elif isinstance(expected, Value) and not (isinstance(found, Value) and found.dtype in ("string", "large_string")):
                problems.append(f"column {name!r} is {found}, expected a string Value")
        if problems:
            raise AnomalyDatasetError(f"{source} [{split}]: " + "; ".join(problems) + f". Expected schema: {FEATURES}")
        if len(dataset[split]) == 0:
            raise AnomalyDatasetError(f"{source}: empty {split!r} split")
    return dataset


def filter_categories(dataset: DatasetDict, categories: str | Sequence[str] | None, source) -> DatasetDict:
    """Keep the requested categories; reads only the `category` column (no image decoding)."""
    if categories is None:
        return dataset
    available = sorted(set(dataset["train"].unique("category")) | set(dataset["test"].unique("category")))
    keep = set(resolve_categories(categories, available, source))
    return DatasetDict(
        {split: ds.filter(lambda c: c in keep, input_columns=["category"]) for split, ds in dataset.items()}
    )


class AnomalyCollator:
    """Collate decoded dataset rows into model inputs with `processor` (a CNCImageProcessor).

    A module-level class rather than a closure so that DataLoader workers started with "spawn"
    (macOS, Windows) can pickle it.
    """

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, rows: Sequence[dict]) -> dict:
        import torch

        if not rows:
            raise ValueError("collate: got an empty batch")
        batch = self.processor(
            [row["image"] for row in rows], masks=[row.get("mask") for row in rows], return_tensors="pt"
        )
        return {
            "pixel_values": batch["pixel_values"],
            "masks": batch["masks"],
            "labels": torch.tensor([int(row["label"]) for row in rows], dtype=torch.long),
            "categories": [row.get("category", "") for row in rows],
            "paths": [row.get("path", "") for row in rows],
        }


def make_collate_fn(processor) -> Callable[[Sequence[dict]], dict]:
    """`DataLoader(dataset["train"], batch_size=8, collate_fn=make_collate_fn(processor))`.

    Batches are {"pixel_values": (B,3,S,S) float, "masks": (B,S,S) float in {0,1} (zeros for good
    images), "labels": (B,) long, "categories": list[str], "paths": list[str]}.
    """
    return AnomalyCollator(processor)


def categories_of(dataset: DatasetDict | Dataset) -> list[str]:
    """Sorted category names, read from the `category` column only."""
    parts: Iterable[Dataset] = dataset.values() if isinstance(dataset, DatasetDict) else [dataset]
    return sorted(set().union(*(set(part.unique("category")) for part in parts)))
