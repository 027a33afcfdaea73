"""What every anomaly dataset in cnc-hf shares: the schema, file checks, error handling, collation.

Schema (one row per image; splits "train" and "test"):

    image        datasets.Image(mode="RGB")   decoded lazily from its file; grayscale -> RGB on decode
    mask         datasets.Image(mode="L")     ground truth, non-zero = defect (see "Masks"); None for good images,
                                              and for defect images known by an image-level label only (own
                                              folders, `cnc_hf.data.folder`): those have no pixel ground truth
    label        ClassLabel(["good", "anomaly"])
    category     string                       product category ("bottle", "pcb1", ...)
    defect_type  string                       "good" or the defect folder name
    path         string                       the source image path

Rows are built from file *paths* (the `Image` columns store the path, not the bytes; colour masks
are the exception, see "Masks"), so indexing all of MVTec AD (5354 files) decodes nothing. Files are
checked cheaply at index time instead (`check_files="header"`): PIL reads only the header (format,
size and EXIF orientation, so an image and its mask can be compared as displayed), and the end of
PNG/JPEG files is looked at, since a truncated copy loses its end marker (JPEG: the last bytes; PNG:
the chunk headers are walked, seeks only, which must reach IEND); only a file that fails that look is
decoded to confirm. Measured on an MVTec-sized copy (5355 images + 1800 masks, 2 busy CPU cores):
0.5 s without checks, 1.9 s with; reading the EXIF orientation added about a fifth (4200 images +
1200 masks of 512x512 PNG: 0.61 -> 0.74 s). Corruption inside intact files only shows with
`check_files="full"` (decodes everything) or when the row is read.

Orientation: decoding (`datasets.Image` and `CNCImageProcessor` alike) applies a file's EXIF
orientation (`PIL.ImageOps.exif_transpose`), to images and masks alike (a mask PNG rarely has one,
but one rule for both keeps a mask on its image), so every size is checked as displayed:
orientations 5-8 swap width and height. The tag is read from the header; a PNG's eXIf chunk, which
may follow the pixel data, from the same chunk walk, so nothing is decoded. A mask is drawn on the
image as it is displayed; one that fits only the stored (unrotated) image is refused naming both
files and both sizes.

Masks: one rule everywhere (this module, the parquet converter, `CNCImageProcessor`): a pixel is a
defect when any of its channels is non-zero: the gray value ("1", "L", "I", "I;16", "F"), the palette
index ("P"), any of R, G, B; alpha is ignored; other modes count through RGB. `Image(mode="L")`
decodes by luminance, which turns e.g. RGB (1, 0, 0) into 0, so a mask whose mode that conversion
does not keep exact (see `LUMINANCE_EXACT_MASK_MODES`) is binarised at index time into a 0/255 PNG
stored in the row (bytes, its path kept); gray masks, MVTec's and VisA's, stay paths, decoded lazily.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import PIL.Image
import PIL.ImageOps
from datasets import ClassLabel, Dataset, DatasetDict, DatasetInfo, Features, Image, Value
from datasets.table import InMemoryTable

from cnc_hf.modeling.image_processing_cnc import mask_defect_pixels  # the one mask rule (no torch needed)

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
EXIF_ORIENTATION = 0x0112
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # transpose, rotate 270, transverse, rotate 90: width and height swap
# Modes whose conversion to "L" (what `Image(mode="L")` does on decode) keeps zero as zero and every
# defect pixel non-zero: gray keeps its value, "1" gives 0/255, LA drops alpha, integers clip to [0, 255].
LUMINANCE_EXACT_MASK_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N")
_EXIF_ERRORS = (OSError, SyntaxError, ValueError, TypeError, KeyError, IndexError, struct.error)


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
    mask_png: bytes | None = None  # the mask binarised at index time, when luminance decoding would lose defects


def _named_like_image(path: Path) -> bool:
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def is_image_file(path: Path) -> bool:
    """Image files by extension; hidden files (.DS_Store, ._x.png from macOS copies) are not images."""
    return path.is_file() and _named_like_image(path)


def is_dangling_link(path: Path) -> bool:
    """A symbolic link whose target is missing (or a link loop): `is_file()` is False for it, so
    without this check a copy made of links whose source moved would silently lose those files."""
    return path.is_symlink() and not path.exists()


def link_note(path: Path) -> str:
    """For messages about a file that cannot be found: names the missing target of a dangling link."""
    return f" (a symbolic link to {os.readlink(path)}, which does not exist)" if is_dangling_link(path) else ""


def sort_entry(path: Path, images: list[Path], dangling: list[Path]) -> None:
    """Add `path` to `images` (an image file) or `dangling` (a dangling link named like an image), or neither."""
    if not _named_like_image(path):
        return
    if path.is_file():
        images.append(path)
    elif is_dangling_link(path):
        dangling.append(path)


def scan_images(folder: Path) -> tuple[list[Path], list[Path]]:
    """(image files, dangling symbolic links named like images) directly in `folder`, both sorted."""
    images, dangling = [], []
    for path in sorted(folder.iterdir()):
        sort_entry(path, images, dangling)
    return images, dangling


def report_dangling_links(links: Iterable[Path], bad: BadFiles) -> None:
    for link in links:
        bad.report(f"dangling symbolic link: {link} -> {os.readlink(link)}, which does not exist; expected an image file")


def list_images(folder: Path, bad: BadFiles | None = None) -> list[Path]:
    """Sorted image files directly in `folder`; readme/license/stray files are ignored.

    A dangling symbolic link named like an image is a bad file: reported to `bad` (an error, or counted
    in the skip warning) rather than dropped unseen.
    """
    images, dangling = scan_images(folder)
    if bad is not None:
        report_dangling_links(dangling, bad)
    return images


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
    """Cheap end-marker test for JPEG: it ends with FF D9 (maybe zero padded). PNG: see `_walk_png`."""
    if image_format != "JPEG":
        return False
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - 64))
        tail = handle.read()
    return not tail.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")


def _walk_png(path: Path) -> tuple[bytes | None, bool]:
    """Walk a PNG's chunk headers (seeks only, no pixel data read): return its eXIf chunk (None if it
    has none) and whether the walk reached the IEND chunk, which a truncated copy has lost.

    PIL finds an eXIf chunk placed after the pixel data (the PNG spec allows it) only by decoding the image.
    """
    exif = None
    with open(path, "rb", buffering=0) as handle:  # unbuffered: read 8 bytes per chunk, not 8 KiB
        handle.seek(8)  # the PNG signature
        while len(head := handle.read(8)) == 8:
            length, kind = int.from_bytes(head[:4], "big"), head[4:]
            if kind == b"IEND":
                return exif, True
            if kind == b"eXIf" and exif is None:
                exif = b"Exif\x00\x00" + handle.read(length)  # the form PIL keeps in info["exif"]
                length = 0
            handle.seek(length + 4, os.SEEK_CUR)  # chunk data and CRC
    return exif, False


@dataclass(frozen=True)
class ImageInfo:
    """What a file's header says: its size as displayed (EXIF orientation applied, as decoding does),
    its PIL mode and its EXIF orientation (1 when it has none)."""

    size: tuple[int, int]
    mode: str
    orientation: int = 1

    def describe(self) -> str:
        """"WxH", plus the stored size when the EXIF orientation turns the image."""
        width, height = self.size
        if self.orientation not in SWAPPING_ORIENTATIONS:
            return f"{width}x{height}"
        return f"{width}x{height} as displayed (EXIF orientation {self.orientation} turns the stored {height}x{width})"


def exif_orientation(image: PIL.Image.Image, png_exif: bytes | None = None) -> int:
    """The EXIF orientation that decoding will apply to `image` (opened, not decoded), 1 if none.

    For a PNG pass the eXIf chunk found by `_walk_png`: PIL's own PNG `getexif` decodes the pixels to
    look for one after them.
    """
    if image.format == "PNG":
        if png_exif is not None and "exif" not in image.info:
            image.info["exif"] = png_exif
        tags = PIL.Image.Image.getexif(image)  # the base method, which reads what the header gave
    else:
        tags = image.getexif()
    orientation = tags.get(EXIF_ORIENTATION)
    return orientation if isinstance(orientation, int) else 1


def check_image_file(path: Path, check_files: str = "header") -> ImageInfo | None:
    """Return the `ImageInfo` of an image file (size as displayed), or raise `AnomalyDatasetError` naming it.

    "header": read the header and the end marker (decode only files whose end looks wrong);
    "full": decode every file; "none": no check, returns None.
    """
    if check_files == "none":
        return None
    try:
        with PIL.Image.open(path) as image:
            size, mode = image.size, image.mode
            if image.format == "PNG":
                png_exif, complete = _walk_png(path)
                truncated = not complete
            else:
                png_exif, truncated = None, _looks_truncated(path, image.format)
            try:
                orientation = exif_orientation(image, png_exif)
            except _EXIF_ERRORS as err:  # decoding reads the orientation too: the row could not be read either
                raise AnomalyDatasetError(f"unreadable EXIF data in {path} ({err!r})") from err
            if check_files == "full" or truncated:
                image.load()  # raises on truncated/corrupt data
    except FileNotFoundError:
        raise AnomalyDatasetError(f"file not found: {path}{link_note(path)}") from None
    except AnomalyDatasetError:
        raise
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as err:
        raise AnomalyDatasetError(f"unreadable or truncated image: {path} ({err})") from err
    if size[0] == 0 or size[1] == 0:
        raise AnomalyDatasetError(f"empty image (size {size}): {path}")
    if orientation in SWAPPING_ORIENTATIONS:
        size = (size[1], size[0])
    return ImageInfo(size, mode, orientation)


def binary_mask_png(mask: PIL.Image.Image) -> bytes:
    """A mask as a 0/255 "L" PNG: EXIF orientation applied (as decoding does), then the mask rule."""
    if mask.getexif().get(EXIF_ORIENTATION) is not None:
        mask = PIL.ImageOps.exif_transpose(mask)
    buffer = io.BytesIO()
    PIL.Image.fromarray(mask_defect_pixels(mask).astype(np.uint8) * 255, "L").save(buffer, format="PNG")
    return buffer.getvalue()


def _with_mask_png(record: Record) -> Record:
    """`record`, plus its mask binarised when `Image(mode="L")` would decode it by luminance and lose
    defect pixels (an RGB (1, 0, 0) pixel becomes 0). Gray masks stay paths: nothing is decoded."""
    path = Path(record.mask)
    try:
        with PIL.Image.open(path) as mask:
            if mask.mode in LUMINANCE_EXACT_MASK_MODES:
                return record
            return replace(record, mask_png=binary_mask_png(mask))
    except FileNotFoundError:
        raise AnomalyDatasetError(f"file not found: {path}{link_note(path)}") from None
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as err:
        raise AnomalyDatasetError(f"unreadable or truncated image: {path} ({err})") from err


def check_option(name: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name}: got {value!r}; expected one of {tuple(allowed)}")
    return value


def checked_record(record: Record, check_files: str, bad: BadFiles) -> Record | None:
    """Check an image and its mask (readable, same size as displayed) and settle how the mask is stored
    (see "Masks" above). Return the record to keep, or None if it was reported and skipped."""
    try:
        image_info = check_image_file(Path(record.image), check_files)
        if image_info is not None and image_info.mode in HIGH_BIT_MODES:
            bad.high_bit.append(record.image)
        if record.mask is None:
            return record
        mask_info = check_image_file(Path(record.mask), check_files)
        if image_info is not None and mask_info is not None and mask_info.size != image_info.size:
            raise AnomalyDatasetError(
                f"mask {record.mask} is {mask_info.describe()} but its image {record.image} is "
                f"{image_info.describe()}; expected a mask of its image's size as displayed"
            )
        return _with_mask_png(record)
    except AnomalyDatasetError as err:
        bad.report(str(err))
        return None


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
        # Stored as {"bytes", "path"} directly: `Dataset.from_dict` would drop the bytes of a binarised
        # mask because its path is an existing file.
        columns = {
            "image": [{"bytes": None, "path": r.image} for r in rows],
            "mask": [None if r.mask is None else {"bytes": r.mask_png, "path": r.mask} for r in rows],
            "label": [r.label for r in rows],
            "category": [r.category for r in rows],
            "defect_type": [r.defect_type for r in rows],
            "path": [r.image for r in rows],
        }
        table = InMemoryTable.from_pydict(columns, schema=FEATURES.arrow_schema)
        splits[split] = Dataset(table, info=DatasetInfo(features=FEATURES.copy()), split=split)
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
            [row["image"] for row in rows], segmentation_maps=[row.get("mask") for row in rows], return_tensors="pt"
        )
        return {
            "pixel_values": batch["pixel_values"],
            "masks": batch["masks"],
            "has_mask": torch.tensor([row.get("mask") is not None for row in rows], dtype=torch.bool),
            "labels": torch.tensor([int(row["label"]) for row in rows], dtype=torch.long),
            "categories": [row.get("category", "") for row in rows],
            "paths": [row.get("path", "") for row in rows],
        }


def make_collate_fn(processor) -> Callable[[Sequence[dict]], dict]:
    """`DataLoader(dataset["train"], batch_size=8, collate_fn=make_collate_fn(processor))`.

    Batches are {"pixel_values": (B,3,S,S) float, "masks": (B,S,S) float in {0,1} (zeros for good
    images and for defect images without a mask), "has_mask": (B,) bool (whether the row has a mask),
    "labels": (B,) long, "categories": list[str], "paths": list[str]}.

    Why "has_mask": a good image's missing mask is ground truth (all its pixels are normal), but a
    defect image without a mask (an image-level label only) has none, and its all-zero `masks` entry
    is a placeholder that pixel metrics must not read as "no defect pixel"
    (`cnc_hf.metrics.compute_anomaly_metrics(..., has_mask=...)`).
    """
    return AnomalyCollator(processor)


def categories_of(dataset: DatasetDict | Dataset) -> list[str]:
    """Sorted category names, read from the `category` column only."""
    parts: Iterable[Dataset] = dataset.values() if isinstance(dataset, DatasetDict) else [dataset]
    return sorted(set().union(*(set(part.unique("category")) for part in parts)))
