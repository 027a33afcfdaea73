"""The Hub form of an anomaly dataset: parquet shards plus a dataset card, and pushing it.

`convert_to_parquet(dataset, output_dir)` writes `data/{train,test}-NNNNN-of-MMMMM.parquet` and a
README.md (a huggingface_hub DatasetCard: `configs` naming the splits' files, `dataset_info`, the
source's license when known), so `datasets.load_dataset(output_dir)` (or the Hub
repo id after `push_folder_to_hub`) gives back the cnc-hf schema (`cnc_hf.data.common.FEATURES`).
Pushing uploads that same folder, so what is tested locally is what lands on the Hub. The command
line is `python -m cnc_hf.data.convert`.

What changes on the way: image files are embedded byte for byte (JPEGs are not re-encoded, their
EXIF orientation kept); masks are stored as 0/255 PNGs by the mask rule of `cnc_hf.data.common`
(VisA's 1..N masks and colour masks alike: non-zero in any channel = defect; a mask's own EXIF
orientation is applied, since the PNG written carries none), and `path` becomes the path relative to
the source root so no local folder names leak to the Hub.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import PIL.Image
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, Image

from .common import FEATURES, SPLITS, binary_mask_png, validate_schema

DEFAULT_MAX_SHARD_BYTES = 500 * 1024**2  # the Hub's usual parquet shard size


def _relative(path: str, root: Path | None) -> str:
    if root is None:
        return path
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path


def _binary_mask_png(mask_value: dict) -> bytes:
    """Read a stored mask ({"bytes", "path"}) and encode it as a 0/255 "L" PNG by the one mask rule
    (non-zero in any channel = defect; EXIF orientation applied, as decoding does: see `common`)."""
    source = io.BytesIO(mask_value["bytes"]) if mask_value["bytes"] is not None else mask_value["path"]
    with PIL.Image.open(source) as mask:
        return binary_mask_png(mask)


def _shard_ranges(dataset: Dataset, max_shard_bytes: int) -> list[tuple[int, int]]:
    """Cut rows into contiguous shards of at most ~max_shard_bytes of image files (at least one row each)."""
    sizes = []
    raw = dataset.select_columns(["image"]).cast_column("image", Image(decode=False)).with_format("arrow")
    for batch in raw.iter(batch_size=1000):  # arrow batches: no decoding, no Python copies of bytes
        column = batch["image"].combine_chunks()
        lengths = pc.binary_length(column.field("bytes")).to_pylist()
        paths = column.field("path").to_pylist()
        # Embedded rows count their bytes; path-only rows (local loaders) their file size.
        sizes += [n if n is not None else os.path.getsize(p) for n, p in zip(lengths, paths)]
    ranges, start, total = [], 0, 0
    for index, size in enumerate(sizes):
        if index > start and total + size > max_shard_bytes:
            ranges.append((start, index))
            start, total = index, 0
        total += size
    ranges.append((start, len(sizes)))
    return ranges


def _embedded_shard(dataset: Dataset, start: int, stop: int, root: Path | None) -> Dataset:
    """Rows [start, stop) with the image/mask bytes embedded, built without decoding any image."""
    raw = dataset.select(range(start, stop)).cast_column("image", Image(decode=False))
    raw = raw.cast_column("mask", Image(decode=False))
    columns = {name: [] for name in FEATURES}
    for row in raw:
        source = row["path"]
        relative = _relative(source, root)
        image = row["image"]
        image_bytes = image["bytes"] if image["bytes"] is not None else Path(image["path"]).read_bytes()
        columns["image"].append({"bytes": image_bytes, "path": relative})
        mask = row["mask"]
        if mask is None:
            columns["mask"].append(None)
        else:
            mask_path = _relative(mask["path"], root) if mask["path"] else None
            columns["mask"].append({"bytes": _binary_mask_png(mask), "path": mask_path})
        for name in ("label", "category", "defect_type"):
            columns[name].append(row[name])
        columns["path"].append(relative)
    return Dataset.from_dict(columns, features=FEATURES)


# The source data sets' own terms, by the names `cnc_hf.data.convert` gives them (Hub license ids).
# The demo textures are crops of scikit-image's CC0 photographs (see cnc_hf.data.demo).
SOURCE_LICENSES = {"MVTec AD": "cc-by-nc-sa-4.0", "VisA": "cc-by-4.0", "cnc-hf demo textures": "cc0-1.0"}


def _size_category(rows: int) -> str:
    """The Hub's size bucket for `rows` examples ("n<1K", "1K<n<10K", ...)."""
    for bound, name in ((10**3, "n<1K"), (10**4, "1K<n<10K"), (10**5, "10K<n<100K"), (10**6, "100K<n<1M")):
        if rows < bound:
            return name
    return "1M<n<10M"


def _dataset_card(source: str, dataset: DatasetDict, split_bytes: dict, download_size: int, license: str | None):
    """The README.md of a converted folder: a huggingface_hub `DatasetCard` whose metadata names the
    parquet files per split (`configs`), the schema and sizes (`dataset_info`, in the shape `datasets`
    writes when it pushes) and the source's license when it is known."""
    from datasets import DatasetInfo, SplitDict, SplitInfo
    from datasets.info import DatasetInfosDict
    from huggingface_hub import DatasetCard, DatasetCardData

    categories = sorted(set(dataset["train"].unique("category")) | set(dataset["test"].unique("category")))
    data = DatasetCardData(
        license=license, pretty_name=f"{source} (cnc-hf format)",
        task_categories=["image-classification", "image-segmentation"],  # a label per image, a mask per defect
        size_categories=[_size_category(sum(len(dataset[split]) for split in SPLITS))],
        tags=["anomaly-detection", "cnc-hf"],
        configs=[{"config_name": "default",
                  "data_files": [{"split": split, "path": f"data/{split}-*.parquet"} for split in SPLITS]}],
    )
    splits = SplitDict()
    for split in SPLITS:
        splits.add(SplitInfo(name=split, num_bytes=split_bytes[split], num_examples=len(dataset[split])))
    info = DatasetInfo(features=FEATURES, splits=splits, download_size=download_size,
                       dataset_size=sum(split_bytes.values()))
    DatasetInfosDict({"default": info}).to_dataset_card_data(data)
    counts = ", ".join(f"{split}: {len(dataset[split])}" for split in SPLITS)
    terms = (f"License: `{license}`, the source data set's own." if license
             else "The source images' own license applies; set `license:` above before publishing.")
    return DatasetCard(
        f"---\n{data.to_yaml()}\n---\n\n"
        f"# {source} (cnc-hf format)\n\n"
        f"Converted with `python -m cnc_hf.data.convert`. Rows {counts}; categories: {', '.join(categories)}.\n\n"
        "Columns: `image` (RGB), `mask` (0/255; None for good images, and for anomalous images labelled per image\n"
        "only, which have no pixel ground truth), `label` (good/anomaly), `category`,\n"
        "`defect_type`, `path` (relative to the source root). Load with `datasets.load_dataset(...)` or\n"
        f"`cnc_hf.data.load_anomaly_dataset(...)`. {terms}\n"
    )


def convert_to_parquet(
    dataset: DatasetDict,
    output_dir: str | os.PathLike,
    root: str | os.PathLike | None = None,
    source_name: str = "anomaly dataset",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    license: str | None = None,
) -> Path:
    """Write `dataset` (cnc-hf schema) as parquet shards + dataset card under `output_dir`.

    Files are read shard by shard, so memory stays bounded by the shard size. `root` makes `path`
    relative. Existing parquet shards in `output_dir/data` are an error (a mix would load both).
    `license`: a Hub license id for the card; default the source's own when `source_name` is a known
    one (`SOURCE_LICENSES`), else none (the card says to set it).
    """
    validate_schema(dataset, source_name)
    output_dir = Path(output_dir).expanduser()
    data_dir = output_dir / "data"
    if data_dir.is_dir() and any(data_dir.glob("*.parquet")):
        raise FileExistsError(f"{data_dir} already holds parquet shards; choose an empty --output_dir")
    data_dir.mkdir(parents=True, exist_ok=True)
    root_path = None if root is None else Path(root).expanduser()
    split_bytes, download_size = {}, 0  # for the card's dataset_info: arrow bytes per split, parquet bytes
    for split in SPLITS:
        ranges = _shard_ranges(dataset[split], max_shard_bytes)
        split_bytes[split] = 0
        for index, (start, stop) in enumerate(ranges):
            shard = _embedded_shard(dataset[split], start, stop, root_path)
            path = data_dir / f"{split}-{index:05d}-of-{len(ranges):05d}.parquet"
            shard.to_parquet(str(path))
            split_bytes[split] += shard.data.nbytes
            download_size += path.stat().st_size
    card = _dataset_card(source_name, dataset, split_bytes, download_size,
                         license if license is not None else SOURCE_LICENSES.get(source_name))
    card.save(output_dir / "README.md")
    return output_dir


def push_folder_to_hub(output_dir: str | os.PathLike, repo_id: str, private: bool = False, token: str | None = None):
    """Upload a converted folder to a Hub dataset repo (created if needed); returns the commit info."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    return api.upload_folder(
        folder_path=str(output_dir),
        repo_id=repo_id,
        repo_type="dataset",
        commit_message="Upload anomaly dataset converted with cnc_hf.data.convert",
    )
