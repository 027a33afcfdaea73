"""Your own images in plain folders, as a `DatasetDict`: good images, defect folders, masks optional.

The commonest real data set is not MVTec AD: a folder of good images and one or more folders of
defective ones, usually with image-level labels only, sometimes with masks. anomalib calls this the
`Folder` dataset. Any layout works; for example:

    my_part/good/*.png                    normal_dir       (subfolders are read too)
    my_part/scratch/*.png                 abnormal_dir     defect_type "scratch" (the folder's name)
    my_part/dent/*.jpg                    abnormal_dir     defect_type "dent"
    my_part/masks/scratch/001_mask.png    mask_dir         optional; masks for some or all defect images

`load_image_folder(normal_dir, abnormal_dir, mask_dir)` gives the usual schema (`cnc_hf.data.common`):
a seeded `test_fraction` of the good images goes to "test" (or all of `normal_test_dir`), the rest to
"train"; every defect image goes to "test" with label 1. `category` defaults to the name of
`normal_dir`'s parent folder ("my_part" above).

Masks are optional, per image. A defect image without a mask has `mask` None: it counts for image
metrics only; pixel metrics (cnc_hf.metrics) use good images and defect images with a mask, and are
absent (never 0) when no defect image has one. How a mask finds its image (the rule):

- A mask's key is its path inside `mask_dir` without the extension and without a trailing `_mask`:
  `masks/scratch/001_mask.png` and `masks/scratch/001.png` both have the key `scratch/001`.
- A defect image's candidate keys are `<defect_type>/<path inside its abnormal_dir>` without the
  extension, then the same with leading folders dropped one by one, down to the bare file stem:
  `my_part/scratch/sub/001.jpg` tries `scratch/sub/001`, then `sub/001`, then `001`. The first key a
  mask has wins. So a flat `mask_dir` of `<stem>.png` or `<stem>_mask.png` files works while file
  stems are unique over the defect folders; per-defect subfolders (MVTec's ground_truth layout) work
  always.
- Masks are lossless files (.png, .bmp, .tif, .tiff): a JPEG's compression noise turns black pixels
  into small non-zero values, which the one mask rule (any non-zero channel = defect) would count.
- A mask that matches no defect image, a mask that two images would share, and two masks for one
  image are bad files (named in the error, or skipped and counted with `on_bad_file="skip"`); so is a
  mask of another size than its image as displayed (EXIF orientation applied).

Several categories: `concatenate_anomaly_datasets([load_image_folder(...), ...])`, or a small JSON or
YAML file read by `load_image_folders` (one entry per category, paths relative to the file):

    bottle:
      normal_dir: bottle/good
      abnormal_dir: [bottle/broken, bottle/crack]
      mask_dir: bottle/masks          # optional
    cable:
      normal_dir: cable/good
      abnormal_dir: cable/cut
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from datasets import DatasetDict, concatenate_datasets

from .common import (
    CHECK_FILES,
    AnomalyDatasetError,
    BadFiles,
    Record,
    build_dataset_dict,
    categories_of,
    check_option,
    checked_record,
    report_dangling_links,
    resolve_categories,
    sort_entry,
    validate_schema,
)

MASK_SUFFIX = "_mask"
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")  # lossless: see the module docstring
DEFAULT_TEST_FRACTION = 0.2
# What a category entry of a JSON/YAML folder list may hold: the arguments of `load_image_folder`.
CONFIG_KEYS = ("normal_dir", "abnormal_dir", "mask_dir", "normal_test_dir", "test_fraction", "seed")
PATH_KEYS = ("normal_dir", "abnormal_dir", "mask_dir", "normal_test_dir")
_SKIPPED_FOLDERS = ("__MACOSX",)  # macOS zip litter: ._x.png resource forks, not images


# ----------------------------------------------------------------------------- finding files
def walk_images(folder: Path) -> tuple[list[Path], list[Path]]:
    """(image files, dangling symbolic links named like images) in `folder` and all its subfolders,
    both sorted by their path inside `folder`.

    Hidden folders (.git, .ipynb_checkpoints) and __MACOSX are skipped. Linked folders are followed
    (a folder of links is a common way to assemble a data set), each real folder once, so a link
    loop cannot recurse forever.
    """
    images, dangling, seen = [], [], set()
    for current, subfolders, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(current)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d not in _SKIPPED_FOLDERS]
        for name in files:  # a dangling link is listed with the files: os.walk cannot tell it is a folder
            sort_entry(Path(current) / name, images, dangling)
    key = lambda p: p.relative_to(folder).as_posix()  # noqa: E731
    return sorted(images, key=key), sorted(dangling, key=key)


def _existing_folder(path: str | os.PathLike, argument: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        what = "is a file" if folder.is_file() else "does not exist"
        raise FileNotFoundError(f"{argument} {folder} {what}; expected a folder of images")
    return folder


def _as_folder_list(value: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [value]
    return list(value)


def check_separate_folders(named: Sequence[tuple[str, Path]]) -> None:
    """No folder may hold another (or be given twice): a defect folder inside the good one would make its
    images good and defective at once, a mask folder inside an image folder would make masks images."""
    resolved = [(name, path, path.resolve()) for name, path in named]
    for i, (name_a, path_a, real_a) in enumerate(resolved):
        for name_b, path_b, real_b in resolved[i + 1 :]:
            if real_a == real_b:
                raise AnomalyDatasetError(f"{name_a} {path_a} and {name_b} {path_b} are the same folder; "
                                          "expected separate folders")
            if real_a in real_b.parents or real_b in real_a.parents:
                outer, inner = ((name_a, path_a), (name_b, path_b)) if real_a in real_b.parents else \
                    ((name_b, path_b), (name_a, path_a))
                raise AnomalyDatasetError(
                    f"{inner[0]} {inner[1]} is inside {outer[0]} {outer[1]}: its files would be read as both "
                    "(subfolders are read too); expected separate folders, side by side")


# ----------------------------------------------------------------------------- masks
def mask_key(relative: Path) -> str:
    """A mask's key: its path inside mask_dir, without the extension and a trailing `_mask`."""
    stem = relative.stem[: -len(MASK_SUFFIX)] if relative.stem.endswith(MASK_SUFFIX) else relative.stem
    return (relative.parent / stem).as_posix() if relative.parent != Path(".") else stem


def image_keys(defect_type: str, relative: Path) -> list[str]:
    """The keys a defect image looks its mask up by, most specific first (see the module docstring)."""
    parts = [defect_type, *relative.parent.parts, relative.stem]
    return ["/".join(parts[i:]) for i in range(len(parts))]


def index_masks(mask_dir: Path, bad: BadFiles) -> dict[str, Path | None]:
    """{key: mask file} of every mask under `mask_dir`.

    Bad masks are reported and map to None: a lossy file, a dangling link, two masks with one key (e.g.
    001.png and 001_mask.png). Their image is then left out rather than kept as an image without a mask,
    which would quietly change what the pixel metrics measure.
    """
    images, dangling = walk_images(mask_dir)
    report_dangling_links(dangling, bad)
    masks: dict[str, Path | None] = {}
    for path in sorted(images + dangling, key=lambda p: p.relative_to(mask_dir).as_posix()):
        key = mask_key(path.relative_to(mask_dir))
        value: Path | None = path
        if path in dangling:
            value = None
        elif path.suffix.lower() not in MASK_EXTENSIONS:
            bad.report(f"mask {path} is a {path.suffix} file; expected a lossless mask ({', '.join(MASK_EXTENSIONS)}): "
                       "compression noise turns black pixels into small non-zero values, which count as defect")
            value = None
        if key in masks:
            first = masks[key]
            bad.report(f"two masks for one image: {first if first is not None else 'a bad mask'} and {path} (both "
                       f"match images named {key!r}); expected one mask per image")
            value = None
        masks[key] = value
    return masks


def _match_masks(defects: list[tuple[Path, str, Path]], masks: dict[str, Path | None],
                 bad: BadFiles) -> tuple[dict[Path, Path | None], set[Path]]:
    """Pair each defect image (path, defect_type, path inside its abnormal_dir) with its mask or None.

    Returns ({image: mask or None}, images to leave out: those whose mask is bad, reported already). A mask
    two images would share is reported naming both; the images are left out (in skip mode) rather than
    given a mask that may be another's.
    """
    claims: dict[Path, list[Path]] = {}
    chosen: dict[Path, Path | None] = {}
    dropped: set[Path] = set()
    for image, defect_type, relative in defects:
        key = next((k for k in image_keys(defect_type, relative) if k in masks), None)
        mask = None if key is None else masks[key]
        chosen[image] = mask
        if key is not None and mask is None:
            dropped.add(image)
        elif mask is not None:
            claims.setdefault(mask, []).append(image)
    for mask, images in claims.items():
        if len(images) > 1:
            bad.report(f"mask {mask} matches {len(images)} defect images ({', '.join(map(str, images))}); expected "
                       "one image per mask: put each defect folder's masks in mask_dir/<defect_type>/")
            dropped.update(images)
    for key, mask in sorted(masks.items()):
        if mask is not None and mask not in claims:
            bad.report(f"mask without its image: {mask} (no defect image matches its key {key!r}; expected an image "
                       f"named {Path(key).name}.<png|jpg|...> in an abnormal_dir: see the mask rule of "
                       "cnc_hf.data.folder)")
    return chosen, dropped


# ----------------------------------------------------------------------------- good images
def split_rank(relative: Path, seed: int) -> int:
    """A seeded, order-free rank of an image: the test split is the lowest-ranked `test_fraction`.

    Hashing the path inside normal_dir (rather than shuffling the list) keeps each image's place when
    images are added or the folder moves, so a model evaluated again on a grown folder meets at most a
    few images it trained on.
    """
    return int.from_bytes(hashlib.sha256(f"{seed}:{relative.as_posix()}".encode()).digest()[:8], "big")


def split_normal(records: list[Record], root: Path, test_fraction: float, seed: int) -> tuple[list, list]:
    """(train, test): `round(test_fraction * n)` good images to test (at least one when the fraction is
    above 0 and there are two or more images; never all of them)."""
    n = len(records)
    n_test = 0 if test_fraction == 0 or n < 2 else min(n - 1, max(1, round(test_fraction * n)))
    ranked = sorted(records, key=lambda r: split_rank(Path(r.image).relative_to(root), seed))
    test = {r.image for r in ranked[:n_test]}
    return [r for r in records if r.image not in test], [r for r in records if r.image in test]


def default_category(normal_dir: Path) -> str:
    """The name of normal_dir's parent folder (`my_part/good` -> "my_part"), links not resolved."""
    name = Path(os.path.abspath(normal_dir)).parent.name
    if not name:
        raise AnomalyDatasetError(f"normal_dir {normal_dir}: its parent has no name to use as the category; "
                                  "pass category=")
    return name


def _good_records(folder: Path, category: str, bad: BadFiles, check_files: str, argument: str) -> list[Record]:
    images, dangling = walk_images(folder)
    report_dangling_links(dangling, bad)
    checked = (checked_record(Record(str(p), None, 0, category, "good"), check_files, bad) for p in images)
    records = [r for r in checked if r is not None]
    if not records:
        found = f"{len(images)} unusable image(s)" if images else "no image files"
        raise AnomalyDatasetError(f"{argument} {folder}: {found}; expected good images "
                                  f"(.png, .jpg, ...) in it or its subfolders")
    return records


# ----------------------------------------------------------------------------- the loader
def load_image_folder(
    normal_dir: str | os.PathLike,
    abnormal_dir: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    mask_dir: str | os.PathLike | None = None,
    normal_test_dir: str | os.PathLike | None = None,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    category: str | None = None,
    seed: int = 0,
    *,
    on_bad_file: str = "error",
    check_files: str = "header",
) -> DatasetDict:
    """Index plain image folders (one category) into a DatasetDict with train/test; see the module docstring.

    Args:
        normal_dir: good images (subfolders included). They train, except a seeded `test_fraction` of
            them that goes to test, unless `normal_test_dir` is given.
        abnormal_dir: a folder or a list of folders of defective images (subfolders included), all in
            test with label 1; each folder's name is their `defect_type`. None: a test split of good
            images only (enough to train; image metrics need defects).
        mask_dir: optional masks, matched to defect images by the rule in the module docstring; a defect
            image without one has mask None (image-level label only).
        normal_test_dir: good test images; then all of `normal_dir` trains and `test_fraction` is unused.
        test_fraction: in [0, 1); which images is decided by a hash of each image's path inside
            `normal_dir` and `seed` (stable when images are added), not by file order. Use the same
            value and seed when training and evaluating, so the test images are the same.
        category: the category name; default the name of `normal_dir`'s parent folder.
        on_bad_file, check_files: as in `load_mvtec_ad`. Bad files: unreadable or truncated images,
            dangling links, masks (see the module docstring). An empty `normal_dir`, a missing folder or
            folders inside one another are errors in either mode.

    Nothing is decoded up front: rows store file paths, images decode when a row is read.
    """
    check_option("check_files", check_files, CHECK_FILES)
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction: got {test_fraction}; expected a fraction in [0, 1)")
    normal, defect_dirs, masks_root, normal_test = _checked_folders(normal_dir, abnormal_dir, mask_dir, normal_test_dir)
    if category is None:
        category = default_category(normal)
    elif not isinstance(category, str) or not category.strip():
        raise ValueError(f"category: got {category!r}; expected a non-empty name")
    if masks_root is not None and not defect_dirs:
        raise ValueError(f"mask_dir {masks_root} without abnormal_dir: masks belong to defect images")

    bad = BadFiles(on_bad_file, normal)
    train = _good_records(normal, category, bad, check_files, "normal_dir")
    if normal_test is not None:
        test = _good_records(normal_test, category, bad, check_files, "normal_test_dir")
    else:
        train, test = split_normal(train, normal, test_fraction, seed)
    test += _defect_records(defect_dirs, masks_root, category, bad, check_files)
    if not test:
        raise AnomalyDatasetError(f"no test images for category {category!r}: {normal} has too few images for "
                                  f"test_fraction={test_fraction}; give abnormal_dir, normal_test_dir or a larger "
                                  "test_fraction")
    bad.warn_if_any()
    return build_dataset_dict({"train": train, "test": test}, normal)


def _checked_folders(
    normal_dir: str | os.PathLike,
    abnormal_dir: str | os.PathLike | Sequence[str | os.PathLike] | None,
    mask_dir: str | os.PathLike | None,
    normal_test_dir: str | os.PathLike | None,
) -> tuple[Path, list[Path], Path | None, Path | None]:
    """(normal, defect folders, mask folder, normal test folder): each exists, none inside another, and
    no defect folder is named 'good'."""
    normal = _existing_folder(normal_dir, "normal_dir")
    defect_dirs = [_existing_folder(d, "abnormal_dir") for d in _as_folder_list(abnormal_dir)]
    masks_root = None if mask_dir is None else _existing_folder(mask_dir, "mask_dir")
    normal_test = None if normal_test_dir is None else _existing_folder(normal_test_dir, "normal_test_dir")
    named = [("normal_dir", normal)] + [("abnormal_dir", d) for d in defect_dirs]
    named += [("normal_test_dir", normal_test)] if normal_test is not None else []
    named += [("mask_dir", masks_root)] if masks_root is not None else []
    check_separate_folders(named)
    for folder in defect_dirs:
        if folder.name == "good":
            raise AnomalyDatasetError(f"abnormal_dir {folder} is named 'good', the defect_type of normal images; "
                                      "rename the folder after its defect")
    return normal, defect_dirs, masks_root, normal_test


def _defect_records(defect_dirs: list[Path], masks_root: Path | None, category: str, bad: BadFiles,
                    check_files: str) -> list[Record]:
    defects: list[tuple[Path, str, Path]] = []
    for folder in defect_dirs:
        images, dangling = walk_images(folder)
        report_dangling_links(dangling, bad)
        if not images and not dangling:
            bad.report(f"abnormal_dir {folder}: no image files in it or its subfolders; expected defective images")
        defects += [(p, folder.name, p.relative_to(folder)) for p in images]
    chosen, dropped = _match_masks(defects, index_masks(masks_root, bad), bad) if masks_root else ({}, set())
    records = []
    for image, defect_type, _ in defects:
        if image in dropped:
            continue
        mask = chosen.get(image)
        record = checked_record(Record(str(image), None if mask is None else str(mask), 1, category, defect_type),
                                check_files, bad)
        if record is not None:
            records.append(record)
    return records


# ----------------------------------------------------------------------------- several categories
def concatenate_anomaly_datasets(parts: Sequence[DatasetDict]) -> DatasetDict:
    """One multi-class DatasetDict from per-category ones (e.g. `load_image_folder` per category).

    A category found in two parts is an error: two folders that both default to the same parent name
    would silently become one category.
    """
    if not parts:
        raise ValueError("concatenate_anomaly_datasets: got no datasets; expected at least one")
    owners: dict[str, int] = {}
    for index, part in enumerate(parts):
        validate_schema(part, f"dataset {index}")
        for name in categories_of(part):
            if name in owners:
                raise AnomalyDatasetError(f"category {name!r} is in dataset {owners[name]} and dataset {index}; "
                                          "expected each category once (pass category= to name them apart)")
            owners[name] = index
    if len(parts) == 1:
        return parts[0]
    return DatasetDict({split: concatenate_datasets([p[split] for p in parts]) for split in ("train", "test")})


def read_folder_list(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """{category: load_image_folder arguments} from a JSON or YAML file, paths made relative to the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"folder list {path} {what}; expected a JSON or YAML file listing, per category, "
                                "normal_dir, abnormal_dir and optionally mask_dir / normal_test_dir")
    import yaml  # a dependency of datasets and huggingface_hub

    try:
        text = path.read_text(encoding="utf-8")
        content = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise AnomalyDatasetError(f"{path}: not readable as {'JSON' if path.suffix.lower() == '.json' else 'YAML'} "
                                  f"({err})") from err
    if not isinstance(content, Mapping) or not content:
        raise AnomalyDatasetError(f"{path}: expected a mapping of category name -> folders, got {type(content).__name__}")
    entries = {}
    for category, entry in content.items():
        where = f"{path} [{category!r}]"
        if not isinstance(entry, Mapping):
            raise AnomalyDatasetError(f"{where}: expected a mapping with normal_dir, abnormal_dir, ...; got {entry!r}")
        unknown = sorted(set(entry) - set(CONFIG_KEYS))
        if unknown:
            raise AnomalyDatasetError(f"{where}: unknown key(s) {unknown}; expected some of {list(CONFIG_KEYS)}")
        if not entry.get("normal_dir"):
            raise AnomalyDatasetError(f"{where}: no normal_dir; expected the folder of good images")
        resolved = dict(entry)
        for key in PATH_KEYS:
            if resolved.get(key) is not None:
                values = [path.parent / Path(v).expanduser() for v in _as_folder_list(resolved[key])]
                resolved[key] = values if isinstance(entry[key], list) else values[0]
        entries[str(category)] = resolved
    return entries


def load_image_folders(
    folder_list: str | os.PathLike,
    categories: str | Sequence[str] | None = None,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = 0,
    *,
    on_bad_file: str = "error",
    check_files: str = "header",
) -> DatasetDict:
    """Several categories of plain folders, listed in a JSON or YAML file (see the module docstring).

    An entry's own test_fraction / seed override the arguments; `categories` keeps only those entries.
    """
    entries = read_folder_list(folder_list)
    keep = resolve_categories(categories, list(entries), folder_list)
    parts = [load_image_folder(**{"test_fraction": test_fraction, "seed": seed, **entries[name]}, category=name,
                               on_bad_file=on_bad_file, check_files=check_files) for name in keep]
    return concatenate_anomaly_datasets(parts)


# ----------------------------------------------------------------------------- command-line flags
FOLDER_FLAGS = ("normal_dir", "abnormal_dir", "mask_dir", "normal_test_dir", "category", "test_fraction",
                "split_seed")


def add_folder_arguments(parser) -> None:
    """The `--dataset folder` flags, the same for training, `cnc-hf evaluate` and `cnc-hf convert`."""
    parser.add_argument("--normal_dir", default=None,
                        help="--dataset folder: folder of good images (subfolders too); they train, except "
                             "--test_fraction of them (unless --normal_test_dir)")
    parser.add_argument("--abnormal_dir", nargs="+", default=None, metavar="DIR",
                        help="--dataset folder: one or more folders of defective images; each folder's name is "
                             "their defect type")
    parser.add_argument("--mask_dir", default=None,
                        help="--dataset folder: optional masks, <stem>.png or <stem>_mask.png (in <defect>/ "
                             "subfolders when stems repeat); defect images without one get image metrics only")
    parser.add_argument("--normal_test_dir", default=None,
                        help="--dataset folder: good test images (then all of --normal_dir trains)")
    parser.add_argument("--category", default=None,
                        help="--dataset folder: the category name (default: the name of --normal_dir's parent)")
    parser.add_argument("--test_fraction", type=float, default=None,
                        help=f"--dataset folder: fraction of --normal_dir held out as good test images "
                             f"(default {DEFAULT_TEST_FRACTION}); use the same value to train and to evaluate")
    parser.add_argument("--split_seed", type=int, default=None,
                        help="--dataset folder: seed of that hold-out (default 0); the same value to train and to "
                             "evaluate gives the same test images")


def folder_arguments(args, data_dir: str | None = None) -> dict[str, Any]:
    """`load_anomaly_dataset("folder", ...)` keyword arguments from the flags of `add_folder_arguments`
    ({} for another dataset). Raises ValueError naming the flag for a flag that does not fit."""
    given = [name for name in FOLDER_FLAGS if getattr(args, name, None) is not None]
    if str(args.dataset).lower() != "folder":
        if given:
            raise ValueError(f"--{given[0]} applies to --dataset folder only (got --dataset {args.dataset})")
        return {}
    if data_dir is not None:
        per_category = [name for name in given if name not in ("test_fraction", "split_seed")]
        if per_category:
            raise ValueError(f"--dataset folder: --{per_category[0]} and a folder list file {data_dir} both name "
                             "folders; use one of them")
    elif args.normal_dir is None:
        raise ValueError("--dataset folder needs --normal_dir (good images) and usually --abnormal_dir, or a "
                         "JSON/YAML folder list as --data_dir")
    kwargs: dict[str, Any] = {
        "test_fraction": DEFAULT_TEST_FRACTION if args.test_fraction is None else args.test_fraction,
        "seed": 0 if args.split_seed is None else args.split_seed,
    }
    if data_dir is None:
        kwargs.update(normal_dir=args.normal_dir, abnormal_dir=args.abnormal_dir, mask_dir=args.mask_dir,
                      normal_test_dir=args.normal_test_dir, category=args.category)
    return kwargs
