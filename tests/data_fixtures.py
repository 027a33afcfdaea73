"""Writers of tiny MVTec AD and raw VisA layouts for tests (the real sets cannot be downloaded here).

Both mirror the published layouts, including the awkward parts: a grayscale MVTec category, readme
and license files at the root, stray files in image folders, JPG VisA images and VisA masks whose
defect pixels are 1..3 rather than 255.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import PIL.Image

# category -> (PIL mode, (width, height), n_train, {test folder: count})
MVTEC_SPEC = {
    "bottle": ("RGB", (32, 24), 3, {"good": 2, "broken_large": 2, "contamination": 1}),
    "grid": ("L", (20, 20), 2, {"good": 1, "bent": 2}),  # grayscale, like MVTec's grid/screw/zipper
}


def image_array(mode: str, size: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def mask_array(size: tuple[int, int], index: int, value: int = 255) -> np.ndarray:
    """A rectangle whose place depends on `index`, so a mask swapped with another one shows."""
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[2 + index : 6 + index, 3 : 9 + index] = value
    return mask


def write_mvtec(root: Path, spec: dict = MVTEC_SPEC) -> dict:
    """Write an MVTec-layout tree under `root`; return {"train": n, "test": n, "masks": {image path: array}}."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "readme.txt").write_text("MVTec AD (tiny test copy)\n")
    (root / "license.txt").write_text("CC BY-NC-SA 4.0\n")
    expected = {"train": 0, "test": 0, "masks": {}}
    seed = 0
    for category, (mode, size, n_train, test) in spec.items():
        train_dir = root / category / "train" / "good"
        train_dir.mkdir(parents=True)
        (train_dir / ".DS_Store").write_bytes(b"\x00\x01junk")  # macOS litter: must be ignored
        for i in range(n_train):
            seed += 1
            PIL.Image.fromarray(image_array(mode, size, seed), mode).save(train_dir / f"{i:03d}.png")
        expected["train"] += n_train
        for defect, count in test.items():
            folder = root / category / "test" / defect
            folder.mkdir(parents=True)
            for i in range(count):
                seed += 1
                path = folder / f"{i:03d}.png"
                PIL.Image.fromarray(image_array(mode, size, seed), mode).save(path)
                if defect != "good":
                    truth = root / category / "ground_truth" / defect
                    truth.mkdir(parents=True, exist_ok=True)
                    mask = mask_array(size, i)
                    PIL.Image.fromarray(mask, "L").save(truth / f"{i:03d}_mask.png")
                    expected["masks"][str(path)] = mask
            expected["test"] += count
        (root / category / "test" / "notes.txt").write_text("stray file")
    return expected


def visa_mask_array(size: tuple[int, int], index: int) -> np.ndarray:
    """Like VisA: defect pixels carry small values (here cycling 1, 2, 3 along x), not 255."""
    mask = mask_array(size, index, value=1)
    return mask * (1 + np.arange(size[0]) % 3)[None, :].astype(np.uint8)


# object -> (n train normal, n test normal, n test anomaly, (width, height))
VISA_SPEC = {"candle": (3, 2, 2, (40, 30)), "pcb1": (2, 1, 3, (36, 36))}


def write_visa(root: Path, spec: dict = VISA_SPEC, descriptions: bool = True) -> dict:
    """Write a raw-VisA tree with split_csv/1cls.csv; masks hold values 1..3 (not 255).

    Returns {"train": n, "test": n, "masks": {image path: mask array}, "descriptions": {image path: text}}.
    """
    rows, expected = [], {"train": 0, "test": 0, "masks": {}, "descriptions": {}}
    seed = 100
    for obj, (n_train, n_test_normal, n_test_anomaly, size) in spec.items():
        images = root / obj / "Data" / "Images"
        (images / "Normal").mkdir(parents=True)
        (images / "Anomaly").mkdir(parents=True)
        (root / obj / "Data" / "Masks" / "Anomaly").mkdir(parents=True)
        annotations = []
        for split, label, count in (("train", "normal", n_train), ("test", "normal", n_test_normal),
                                    ("test", "anomaly", n_test_anomaly)):
            for _ in range(count):
                seed += 1
                folder = "Normal" if label == "normal" else "Anomaly"
                relative = f"{obj}/Data/Images/{folder}/{seed:04d}.JPG"
                PIL.Image.fromarray(image_array("RGB", size, seed)).save(root / relative, format="JPEG")
                mask_relative = ""
                if label == "anomaly":
                    mask_relative = f"{obj}/Data/Masks/Anomaly/{seed:04d}.png"
                    mask = visa_mask_array(size, seed % 3)
                    PIL.Image.fromarray(mask, "L").save(root / mask_relative)
                    expected["masks"][str(root / relative)] = mask
                    text = f"scratch on {obj}" if seed % 2 else "missing part,scratch"
                    annotations.append((relative, text, mask_relative))
                    expected["descriptions"][str(root / relative)] = text
                else:
                    annotations.append((relative, "normal", ""))
                rows.append((obj, split, label, relative, mask_relative))
                expected[split] += 1
        if descriptions:
            with open(root / obj / "image_anno.csv", "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["image", "label", "mask"])
                writer.writerows(annotations)
    (root / "split_csv").mkdir(parents=True)
    write_csv(root / "split_csv" / "1cls.csv", rows)
    (root / "LICENSE-DATASET").write_text("CC BY 4.0\n")
    return expected


def write_csv(path: Path, rows, header=("object", "split", "label", "image", "mask")) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def read_csv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle))[1:]


EXIF_ORIENTATION = 0x0112


def save_with_orientation(image: PIL.Image.Image, path: Path, orientation: int, **kwargs) -> None:
    """Save `image` as stored pixels plus an EXIF orientation tag, as cameras and phones do."""
    exif = PIL.Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    image.save(path, exif=exif, **kwargs)


def move_png_chunk_to_end(path: Path, kind: bytes) -> None:
    """Move a PNG chunk (e.g. b"eXIf") after the pixel data, just before IEND: the PNG spec allows it,
    and PIL then finds it only by decoding the image."""
    data = path.read_bytes()
    chunks, position = [], 8
    while position < len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        chunks.append(data[position : position + 12 + length])
        position += 12 + length
    moved = [c for c in chunks if c[4:8] == kind]
    assert moved, f"{path} has no {kind!r} chunk"
    rest = [c for c in chunks if c[4:8] != kind]
    path.write_bytes(data[:8] + b"".join(rest[:-1] + moved + rest[-1:]))


def write_rotated_defect(root: Path, mask_size: tuple[int, int], image_format: str = "JPEG") -> tuple[Path, Path]:
    """Replace bottle/test/broken_large/000.png of `write_mvtec`'s tree with an image stored 32x24 whose
    EXIF orientation 6 (rotate 90) displays it 24x32, and its mask with one of `mask_size` (width, height).

    Returns (image path, mask path); the mask marks the top-left 4x4 pixels as displayed.
    """
    folder = root / "bottle" / "test" / "broken_large"
    (folder / "000.png").unlink()
    suffix = ".jpg" if image_format == "JPEG" else ".png"
    image = folder / f"000{suffix}"
    save_with_orientation(PIL.Image.fromarray(image_array("RGB", (32, 24), 7)), image, 6, format=image_format)
    mask = root / "bottle" / "ground_truth" / "broken_large" / "000_mask.png"
    pixels = np.zeros((mask_size[1], mask_size[0]), np.uint8)
    pixels[:4, :4] = 255
    PIL.Image.fromarray(pixels, "L").save(mask)
    return image, mask


def write_folder_set(root: Path, n_good: int = 10, defects: dict | None = None, size: tuple[int, int] = (32, 24),
                     masks_for: tuple[str, ...] = (), mask_layout: str = "flat") -> dict:
    """Your own data as an inspection engineer has it: `root/good/*.png` (plus one in a subfolder) and one
    folder per defect (`root/<defect>/*`, one image in a nested subfolder), no masks unless `masks_for`
    names images ("scratch/001", ...): their masks go to `root/masks/`, flat as `<stem>_mask.png`
    (mask_layout "flat") or per defect folder as `<defect>/<stem>.png` ("per_defect").

    Returns {"good": [paths], "defects": {defect: [paths]}, "masks": {image path: mask array}}.
    """
    defects = {"scratch": 3, "dent": 2} if defects is None else defects
    expected = {"good": [], "defects": {}, "masks": {}}
    seed = 500
    for i in range(n_good):
        seed += 1
        path = root / "good" / ("nested" if i == n_good - 1 else "") / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(image_array("RGB", size, seed)).save(path)
        expected["good"].append(str(path))
    (root / "good" / "Thumbs.db").write_bytes(b"\x00junk")  # Windows litter: must be ignored
    for defect, count in defects.items():
        expected["defects"][defect] = []
        for i in range(count):
            seed += 1
            stem = f"{defect[0]}{i:02d}"
            path = root / defect / ("deeper" if i == count - 1 else "") / f"{stem}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            PIL.Image.fromarray(image_array("RGB", size, seed)).save(path)
            expected["defects"][defect].append(str(path))
            if f"{defect}/{stem}" in masks_for:
                mask = mask_array(size, i)
                target = (root / "masks" / f"{stem}_mask.png" if mask_layout == "flat"
                          else root / "masks" / defect / f"{stem}.png")
                target.parent.mkdir(parents=True, exist_ok=True)
                PIL.Image.fromarray(mask, "L").save(target)
                expected["masks"][str(path)] = mask
    return expected
