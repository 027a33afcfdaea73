"""Datasets: MVTec AD and raw VisA layouts, parquet round trip, the demo set, collation, bad input."""

import collections
import re
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageFile
import pytest
import torch
from datasets import ClassLabel, Image, load_dataset
from torch.utils.data import DataLoader

from cnc_hf.data import (
    FEATURES,
    AnomalyDatasetError,
    categories_of,
    convert_to_parquet,
    load_anomaly_dataset,
    load_mvtec_ad,
    load_visa,
    make_collate_fn,
    make_demo_dataset,
)
from cnc_hf.data import convert as convert_module
from cnc_hf.data.common import mask_defect_pixels
from cnc_hf.data.demo import DEFECT_KINDS, DEMO_CATEGORIES, _texture, apply_defect
from cnc_hf.modeling.image_processing_cnc import CNCImageProcessor, _mask_to_bool
from data_fixtures import (
    MVTEC_SPEC,
    VISA_SPEC,
    mask_array,
    move_png_chunk_to_end,
    read_csv_rows,
    save_with_orientation,
    write_csv,
    write_mvtec,
    write_rotated_defect,
    write_visa,
)


@pytest.fixture
def mvtec(tmp_path):
    root = tmp_path / "mvtec_ad"
    return root, write_mvtec(root)


@pytest.fixture
def visa(tmp_path):
    root = tmp_path / "visa"
    return root, write_visa(root)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "demo", seed=0, image_size=32, n_train=3,
                             n_test_good=2, n_test_defect=2)


def counts(dataset, *keys):
    return collections.Counter(zip(*(dataset[k] for k in keys)))


# ----------------------------------------------------------------------------- MVTec AD


def test_mvtec_counts_labels_categories(mvtec):
    root, expected = mvtec
    ds = load_mvtec_ad(root)
    assert set(ds) == {"train", "test"}
    assert ds["train"].features == FEATURES and ds["test"].features == FEATURES
    assert len(ds["train"]) == expected["train"] == 5 and len(ds["test"]) == expected["test"] == 8
    assert counts(ds["train"], "category", "label") == {("bottle", 0): 3, ("grid", 0): 2}
    assert counts(ds["test"], "category", "defect_type", "label") == {
        ("bottle", "good", 0): 2, ("bottle", "broken_large", 1): 2, ("bottle", "contamination", 1): 1,
        ("grid", "good", 0): 1, ("grid", "bent", 1): 2,
    }
    assert ds["test"].features["label"].names == ["good", "anomaly"]
    assert categories_of(ds) == ["bottle", "grid"]


def test_mvtec_images_masks_and_paths(mvtec):
    root, expected = mvtec
    ds = load_mvtec_ad(root)
    for row in ds["test"]:
        assert row["image"].mode == "RGB"  # grid is stored grayscale; decoded as RGB
        width, height = MVTEC_SPEC[row["category"]][1]
        assert row["image"].size == (width, height)
        assert Path(row["path"]).is_file() and Path(row["path"]).is_relative_to(root)
        if row["label"] == 0:
            assert row["mask"] is None
        else:
            assert row["mask"].mode == "L" and row["mask"].size == row["image"].size
            np.testing.assert_array_equal(np.asarray(row["mask"]), expected["masks"][row["path"]])
    grid = next(r for r in ds["train"] if r["category"] == "grid")
    gray = np.asarray(PIL.Image.open(grid["path"]))
    np.testing.assert_array_equal(np.asarray(grid["image"]), np.repeat(gray[..., None], 3, axis=-1))


def test_mvtec_category_selection(mvtec):
    root, _ = mvtec
    assert categories_of(load_mvtec_ad(root, "grid")) == ["grid"]
    assert len(load_mvtec_ad(root, ["grid", "bottle"])["test"]) == 8
    with pytest.raises(AnomalyDatasetError, match=r"unknown category \['carpet'\].*available: \['bottle', 'grid'\]"):
        load_mvtec_ad(root, ["carpet"])


def test_mvtec_indexing_decodes_nothing(mvtec, monkeypatch):
    root, _ = mvtec
    decoded = []
    original = PIL.ImageFile.ImageFile.load
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", lambda self: decoded.append(self.filename) or original(self))
    ds = load_mvtec_ad(root)  # header checks only
    assert decoded == []
    row = ds["test"][2]  # decoding happens when a row is read: that row's image and mask only
    assert set(decoded) == {row["path"], row["path"].replace("/test/", "/ground_truth/")[:-4] + "_mask.png"}


def test_mvtec_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_mvtec_ad(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(AnomalyDatasetError, match="no MVTec AD categories in .*empty"):
        load_mvtec_ad(tmp_path / "empty")


def test_mvtec_image_without_mask(mvtec):
    root, expected = mvtec
    mask = root / "bottle" / "ground_truth" / "broken_large" / "001_mask.png"
    mask.unlink()
    image = root / "bottle" / "test" / "broken_large" / "001.png"
    with pytest.raises(AnomalyDatasetError, match=f"defect image without its mask: {image}"):
        load_mvtec_ad(root)
    with pytest.warns(UserWarning, match="skipped 1 bad file"):
        ds = load_mvtec_ad(root, on_bad_file="skip")
    assert len(ds["test"]) == expected["test"] - 1 and str(image) not in ds["test"]["path"]


def test_mvtec_mask_without_image(mvtec):
    root, _ = mvtec
    (root / "grid" / "test" / "bent" / "000.png").unlink()
    orphan = root / "grid" / "ground_truth" / "bent" / "000_mask.png"
    with pytest.raises(AnomalyDatasetError, match=f"mask without its image: {orphan}"):
        load_mvtec_ad(root)
    # Masks of a defect folder that has no test images at all.
    shutil.copytree(root / "grid" / "ground_truth" / "bent", root / "grid" / "ground_truth" / "glue")
    with pytest.warns(UserWarning, match="skipped 3 bad file"):
        load_mvtec_ad(root, "grid", on_bad_file="skip")


@pytest.mark.parametrize("kind", ["truncated png", "truncated jpg", "not an image", "empty file"])
def test_mvtec_unreadable_image(mvtec, kind):
    root, _ = mvtec
    path = root / "bottle" / "train" / "good" / "001.png"
    if kind == "truncated png":
        path.write_bytes(path.read_bytes()[:-40])  # a copy cut short: header intact, end missing
    elif kind == "truncated jpg":
        path.unlink()
        path = path.with_suffix(".jpg")
        buffer = path.open("wb")
        PIL.Image.new("RGB", (32, 24), (1, 2, 3)).save(buffer, format="JPEG")
        buffer.close()
        path.write_bytes(path.read_bytes()[:-30])
    elif kind == "not an image":
        path.write_text("this is a readme that someone named .png")
    else:
        path.write_bytes(b"")
    with pytest.raises(AnomalyDatasetError, match=f"unreadable or truncated image: {path}"):
        load_mvtec_ad(root)
    with pytest.warns(UserWarning, match="skipped 1 bad file"):
        assert len(load_mvtec_ad(root, on_bad_file="skip")["train"]) == 4


def test_mvtec_mask_of_wrong_size(mvtec):
    root, _ = mvtec
    mask = root / "bottle" / "ground_truth" / "contamination" / "000_mask.png"
    PIL.Image.new("L", (10, 10)).save(mask)
    with pytest.raises(AnomalyDatasetError, match=f"mask {mask} is 10x10 but its image .* is 32x24"):
        load_mvtec_ad(root)


def test_mvtec_empty_split_and_missing_folder(mvtec):
    root, _ = mvtec
    for image in (root / "grid" / "train" / "good").glob("*.png"):
        image.unlink()
    with pytest.raises(AnomalyDatasetError, match="empty 'train' split"):
        load_mvtec_ad(root, "grid")
    shutil.rmtree(root / "grid" / "train")
    with pytest.raises(AnomalyDatasetError, match="missing folder .*grid/train/good"):
        load_mvtec_ad(root, "grid")


def test_bad_options(mvtec):
    root, _ = mvtec
    with pytest.raises(ValueError, match="on_bad_file"):
        load_mvtec_ad(root, on_bad_file="ignore")
    with pytest.raises(ValueError, match="check_files"):
        load_mvtec_ad(root, check_files="some")


def test_check_files_full_and_none(mvtec):
    root, _ = mvtec
    bad = root / "bottle" / "test" / "good" / "000.png"
    data = bytearray(bad.read_bytes())
    data[60:200] = bytes(140)  # corrupt the pixel data, keep header and end marker intact
    bad.write_bytes(bytes(data))
    assert len(load_mvtec_ad(root)["test"]) == 8  # cheap check cannot see inside the data
    assert len(load_mvtec_ad(root, check_files="none")["test"]) == 8
    with pytest.raises(AnomalyDatasetError, match=str(bad)):
        load_mvtec_ad(root, check_files="full")


def test_mvtec_stray_entries_are_ignored(mvtec):
    """A folder named like an image, litter in mask folders, a folder that is no category: not rows, no errors."""
    root, expected = mvtec
    (root / "bottle" / "train" / "good" / "999.png").mkdir()
    (root / "bottle" / "ground_truth" / "broken_large" / "Thumbs.db").write_bytes(b"\x00junk")
    (root / "bottle" / "ground_truth" / "broken_large" / "notes.png.txt").write_text("x")
    (root / "__MACOSX" / "bottle").mkdir(parents=True)
    ds = load_mvtec_ad(root)
    assert (len(ds["train"]), len(ds["test"])) == (expected["train"], expected["test"])
    assert categories_of(ds) == ["bottle", "grid"]


def test_mvtec_empty_category_is_reported_not_dropped(mvtec):
    root, expected = mvtec
    for folder in ("train/good", "test/good"):
        (root / "cable" / folder).mkdir(parents=True)
    with pytest.raises(AnomalyDatasetError, match="empty 'train' split for MVTec AD category 'cable': no usable images"):
        load_mvtec_ad(root)
    with pytest.warns(UserWarning, match="skipped 2 bad file"):  # its train and its test split
        ds = load_mvtec_ad(root, on_bad_file="skip")
    assert categories_of(ds) == ["bottle", "grid"] and len(ds["train"]) == expected["train"]


def test_mvtec_category_without_test_folder(mvtec):
    """A missing test/ folder is a bad entry: named in "error" mode, counted in "skip" mode, where the
    category's train images still load."""
    root, _ = mvtec
    shutil.rmtree(root / "grid" / "test")
    with pytest.raises(AnomalyDatasetError, match=re.escape(f"missing folder {root / 'grid' / 'test'}")):
        load_mvtec_ad(root)
    with pytest.warns(UserWarning, match=re.escape(f"skipped 1 bad file(s):\n  MVTec AD category 'grid': missing "
                                                   f"folder {root / 'grid' / 'test'}")):
        ds = load_mvtec_ad(root, on_bad_file="skip")
    assert counts(ds["train"], "category") == {("bottle",): 3, ("grid",): 2}
    assert categories_of(ds["test"]) == ["bottle"]


def test_mvtec_dangling_symlinks_are_bad_files(mvtec, tmp_path):
    root, expected = mvtec
    link = root / "bottle" / "train" / "good" / "009.png"
    link.symlink_to(tmp_path / "moved" / "009.png")  # a copy made of links whose source moved
    named = re.escape(f"dangling symbolic link: {link} -> {tmp_path / 'moved' / '009.png'}, which does not exist")
    with pytest.raises(AnomalyDatasetError, match=named):
        load_mvtec_ad(root)
    with pytest.warns(UserWarning, match=r"skipped 1 bad file\(s\):\n  " + named):
        assert len(load_mvtec_ad(root, on_bad_file="skip")["train"]) == expected["train"]

    # A mask that is a dangling link: one bad entry (not a second one for its image), the image left out.
    link.unlink()
    mask = root / "bottle" / "ground_truth" / "broken_large" / "001_mask.png"
    mask.unlink()
    mask.symlink_to(tmp_path / "moved" / "001_mask.png")
    with pytest.raises(AnomalyDatasetError, match=re.escape(f"dangling symbolic link: {mask} -> ")):
        load_mvtec_ad(root)
    with pytest.warns(UserWarning, match=r"skipped 1 bad file\(s\):\n  dangling symbolic link") as caught:
        ds = load_mvtec_ad(root, on_bad_file="skip")
    assert len(caught) == 1 and len(ds["test"]) == expected["test"] - 1
    assert str(root / "bottle" / "test" / "broken_large" / "001.png") not in ds["test"]["path"]


# ----------------------------------------------------------------------------- EXIF orientation


def test_mvtec_exif_rotated_image_with_mask_drawn_as_displayed_loads_and_evaluates(mvtec):
    """Image stored 32x24 with EXIF orientation 6 (shown 24x32), mask drawn on the shown image: indexing
    accepts it, decoding gives image and mask of one size, and the processor (evaluation) takes them."""
    root, expected = mvtec
    image, mask = write_rotated_defect(root, mask_size=(24, 32))
    ds = load_mvtec_ad(root)
    assert len(ds["test"]) == expected["test"]
    index = ds["test"]["path"].index(str(image))
    row = ds["test"][index]
    assert row["image"].size == row["mask"].size == (24, 32)
    np.testing.assert_array_equal(np.asarray(row["mask"]), np.asarray(PIL.Image.open(mask)))
    batch = make_collate_fn(CNCImageProcessor(size=16))([ds["test"][i] for i in range(len(ds["test"]))])
    assert batch["masks"][index].sum() > 0 and batch["labels"][index] == 1
    from_files = CNCImageProcessor(size=16)(str(image), segmentation_maps=str(mask))  # a file preprocesses like its row
    torch.testing.assert_close(from_files["masks"][0], batch["masks"][index])
    torch.testing.assert_close(from_files["pixel_values"][0], batch["pixel_values"][index])


def test_mvtec_mask_of_the_stored_size_of_an_exif_rotated_image_is_refused(mvtec):
    """A mask that fits only the stored (unrotated) image used to index, train, then crash evaluation
    naming no file; now indexing refuses it, naming both files and both sizes."""
    root, expected = mvtec
    image, mask = write_rotated_defect(root, mask_size=(32, 24))
    message = re.escape(f"mask {mask} is 32x24 but its image {image} is 24x32 as displayed "
                        "(EXIF orientation 6 turns the stored 32x24)")
    with pytest.raises(ValueError, match=message):
        load_mvtec_ad(root)
    with pytest.warns(UserWarning, match="skipped 1 bad file"):
        ds = load_mvtec_ad(root, on_bad_file="skip")
    assert len(ds["test"]) == expected["test"] - 1 and str(image) not in ds["test"]["path"]


def test_png_exif_orientation_after_the_pixel_data_is_read_without_decoding(mvtec, monkeypatch):
    root, _ = mvtec
    image, _ = write_rotated_defect(root, mask_size=(24, 32), image_format="PNG")
    move_png_chunk_to_end(image, b"eXIf")
    assert "exif" not in PIL.Image.open(image).info  # PIL would have to decode the image to find it
    decoded = []
    original = PIL.ImageFile.ImageFile.load
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", lambda self: decoded.append(self.filename) or original(self))
    ds = load_mvtec_ad(root)
    assert decoded == []
    row = ds["test"][ds["test"]["path"].index(str(image))]
    assert row["image"].size == row["mask"].size == (24, 32)


# ----------------------------------------------------------------------------- the mask rule


def _defect_region(size):
    return mask_array(size, 0) > 0


MASK_RULE_CASES = {
    # case: (file suffix, PIL mode, a defect pixel, a background pixel); luminance turns the first four defects into 0
    "RGB (1, 0, 0)": ("png", "RGB", (1, 0, 0), (0, 0, 0)),
    "RGBA blue, fully transparent": ("png", "RGBA", (0, 0, 1, 0), (0, 0, 0, 255)),
    "P index 1 whose colour is black": ("png", "P", 1, 0),
    "F 0.25": ("tiff", "F", 0.25, 0.0),
    "I;16 value 1": ("png", "I;16", 1, 0),
    "LA value 1": ("png", "LA", (1, 0), (0, 255)),
}


@pytest.mark.parametrize("case", sorted(MASK_RULE_CASES))
def test_mask_rule_is_the_same_for_dataset_column_and_processor(mvtec, case):
    """Non-zero in any channel = defect, for the `mask` column as for CNCImageProcessor: a colour mask
    with only (1, 0, 0) pixels used to decode as an empty mask, so a defect image was scored against nothing."""
    root, _ = mvtec
    suffix, mode, defect, background = MASK_RULE_CASES[case]
    size = MVTEC_SPEC["bottle"][1]
    region = _defect_region(size)
    mask = PIL.Image.new(mode, size, background)
    if mode == "P":
        mask.putpalette([0, 0, 0] * 256)  # every index shows black: only the index tells the defect
    for y, x in zip(*np.nonzero(region)):
        mask.putpixel((int(x), int(y)), defect)
    old = root / "bottle" / "ground_truth" / "contamination" / "000_mask.png"
    old.unlink()
    path = old.with_suffix(f".{suffix}")
    mask.save(path)
    assert PIL.Image.open(path).mode == mode

    ds = load_mvtec_ad(root)
    index = ds["test"]["path"].index(str(root / "bottle" / "test" / "contamination" / "000.png"))
    row = ds["test"][index]
    assert row["mask"].mode == "L"
    np.testing.assert_array_equal(np.asarray(row["mask"]) > 0, region)
    processor = CNCImageProcessor(size=32)
    from_row = processor(row["image"], segmentation_maps=row["mask"])["masks"]
    from_file = processor(row["image"], segmentation_maps=str(path))["masks"]
    assert from_row.sum() > 0
    torch.testing.assert_close(from_row, from_file)
    # Stored: the 0/255 PNG made at index time, with the mask's own path kept; gray masks stay paths.
    stored = ds["test"].cast_column("mask", Image(decode=False))["mask"]
    exact = mode in ("LA", "I;16")  # modes whose luminance decoding is already exact
    assert (stored[index]["bytes"] is None) == exact and stored[index]["path"] == str(path)
    assert all(value is None or value["bytes"] is None for i, value in enumerate(stored) if i != index)


MASK_MODES = ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
              "I", "I;16", "I;16L", "I;16B", "I;16N", "F"]


@pytest.mark.parametrize("mode", MASK_MODES)
def test_mask_rule_copies_agree_for_every_pil_mode(mode):
    """cnc_hf.data.common and the processor (saved as remote code, so it keeps its own copy) decide alike."""
    rng = np.random.default_rng(len(mode))
    size = (9, 7)
    nbytes = len(PIL.Image.new(mode, size).tobytes())
    data = (rng.integers(0, 4, nbytes) * (rng.random(nbytes) < 0.3)).astype(np.uint8).tobytes()  # mostly 0
    mask = PIL.Image.frombytes(mode, size, data)
    if mode in ("P", "PA"):
        mask.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
    np.testing.assert_array_equal(mask_defect_pixels(mask), _mask_to_bool(mask, 0))


def test_parquet_keeps_colour_masks_by_the_same_rule(mvtec, tmp_path):
    root, _ = mvtec
    size = MVTEC_SPEC["grid"][1]
    region = _defect_region(size)
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[region] = (1, 0, 0)
    PIL.Image.fromarray(pixels, "RGB").save(root / "grid" / "ground_truth" / "bent" / "000_mask.png")
    out = convert_to_parquet(load_mvtec_ad(root, "grid"), tmp_path / "pq", root=root)
    loaded = load_dataset(str(out), cache_dir=str(tmp_path / "cache"))["test"]
    row = loaded[loaded["path"].index("grid/test/bent/000.png")]
    np.testing.assert_array_equal(np.asarray(row["mask"]), region * 255)


# ----------------------------------------------------------------------------- VisA


def test_visa_counts_labels_masks(visa):
    root, expected = visa
    ds = load_visa(root)
    assert ds["train"].features == FEATURES
    assert len(ds["train"]) == expected["train"] == 5 and len(ds["test"]) == expected["test"] == 8
    assert counts(ds["test"], "category", "label") == {
        ("candle", 0): 2, ("candle", 1): 2, ("pcb1", 0): 1, ("pcb1", 1): 3,
    }
    assert set(ds["train"]["label"]) == {0}
    for row in ds["test"]:
        width, height = VISA_SPEC[row["category"]][3]
        assert row["image"].mode == "RGB" and row["image"].size == (width, height)
        if row["label"] == 0:
            assert row["mask"] is None and row["defect_type"] == "good"
        else:
            mask = np.asarray(row["mask"])
            assert set(np.unique(mask)) == {0, 1, 2, 3}  # VisA values are kept; non-zero marks defects
            np.testing.assert_array_equal(mask, expected["masks"][row["path"]])
            assert row["defect_type"] == expected["descriptions"][row["path"]]


def test_visa_defect_type_without_annotations(tmp_path):
    write_visa(tmp_path, descriptions=False)
    ds = load_visa(tmp_path, categories="pcb1")
    assert set(ds["test"]["defect_type"]) == {"good", "anomaly"} and categories_of(ds) == ["pcb1"]


def test_visa_split_csv_argument(visa, tmp_path):
    root, _ = visa
    rows = [r for r in read_csv_rows(root / "split_csv" / "1cls.csv") if r[0] == "candle"]
    write_csv(root / "split_csv" / "candle_only.csv", rows)
    assert categories_of(load_visa(root, split_csv="split_csv/candle_only.csv")) == ["candle"]  # relative to root
    assert categories_of(load_visa(root, split_csv=root / "split_csv" / "candle_only.csv")) == ["candle"]
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_visa(root, split_csv="nope.csv")


def test_visa_missing_root_and_csv(tmp_path):
    with pytest.raises(FileNotFoundError, match="VisA root not found"):
        load_visa(tmp_path / "missing")
    (tmp_path / "v").mkdir()
    with pytest.raises(FileNotFoundError, match="1cls.csv"):
        load_visa(tmp_path / "v")


def edit_rows(root, edit):
    path = root / "split_csv" / "1cls.csv"
    write_csv(path, edit(read_csv_rows(path)))
    return path


def test_visa_bad_header(visa):
    root, _ = visa
    write_csv(root / "split_csv" / "1cls.csv", [], header=("object", "split", "image"))
    with pytest.raises(AnomalyDatasetError, match="lacks column.*'label', 'mask'.*expected object,split,label,image,mask"):
        load_visa(root)


def test_visa_bad_rows_name_the_line(visa):
    root, expected = visa

    def bad_label(rows):
        rows[0][2] = "defective"
        return rows

    csv_path = edit_rows(root, bad_label)
    with pytest.raises(AnomalyDatasetError, match=f"{csv_path}:2: label 'defective'"):
        load_visa(root)
    with pytest.warns(UserWarning, match="skipped 1 bad file"):
        assert len(load_visa(root, on_bad_file="skip")["train"]) == expected["train"] - 1


def test_visa_anomaly_without_mask_and_missing_files(visa):
    root, _ = visa
    rows = read_csv_rows(root / "split_csv" / "1cls.csv")
    anomaly = next(i for i, r in enumerate(rows) if r[2] == "anomaly")

    def drop_mask(rows):
        rows[anomaly][4] = ""
        return rows

    edit_rows(root, drop_mask)
    with pytest.raises(AnomalyDatasetError, match=f"anomalous image without its mask: {root / rows[anomaly][3]}"):
        load_visa(root)

    edit_rows(root, lambda _: rows)  # restore, then remove the mask file itself
    (root / rows[anomaly][4]).unlink()
    with pytest.raises(AnomalyDatasetError, match=f"mask not found: {root / rows[anomaly][4]}"):
        load_visa(root)
    (root / rows[0][3]).unlink()
    with pytest.raises(AnomalyDatasetError, match=f"image not found: {root / rows[0][3]}"):
        load_visa(root)


def test_visa_dangling_symlink_names_its_target(visa, tmp_path):
    root, _ = visa
    image = root / read_csv_rows(root / "split_csv" / "1cls.csv")[0][3]
    image.unlink()
    image.symlink_to(tmp_path / "elsewhere.JPG")
    with pytest.raises(AnomalyDatasetError, match=re.escape(
            f"image not found: {image} (a symbolic link to {tmp_path / 'elsewhere.JPG'}, which does not exist)")):
        load_visa(root)


def test_visa_exif_rotated_jpg_with_mask_drawn_as_displayed(visa):
    root, _ = visa
    row = next(r for r in read_csv_rows(root / "split_csv" / "1cls.csv") if r[2] == "anomaly")
    image, mask = root / row[3], root / row[4]
    width, height = PIL.Image.open(image).size
    save_with_orientation(PIL.Image.open(image).convert("RGB"), image, 8, format="JPEG")  # rotate 270
    with pytest.raises(AnomalyDatasetError, match=re.escape(f"mask {mask} is {width}x{height} but its image {image} "
                                                            f"is {height}x{width} as displayed")):
        load_visa(root)
    PIL.Image.open(mask).transpose(PIL.Image.Transpose.ROTATE_90).save(mask)  # drawn on the shown image
    ds = load_visa(root)
    loaded = ds["test"][ds["test"]["path"].index(str(image))]
    assert loaded["image"].size == loaded["mask"].size == (height, width)


def test_visa_truncated_jpg(visa):
    root, _ = visa
    path = root / read_csv_rows(root / "split_csv" / "1cls.csv")[0][3]
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(AnomalyDatasetError, match=f"unreadable or truncated image: {path}"):
        load_visa(root)


def test_visa_unknown_category_and_anomaly_in_train(visa):
    root, _ = visa
    with pytest.raises(AnomalyDatasetError, match=r"unknown category \['capsules'\]"):
        load_visa(root, categories=["capsules"])

    def anomaly_in_train(rows):
        row = next(r for r in rows if r[2] == "anomaly")
        row[1] = "train"
        return rows

    edit_rows(root, anomaly_in_train)
    with pytest.raises(AnomalyDatasetError, match="in the train split"):
        load_visa(root)


def test_visa_csv_that_is_not_text_names_the_file(visa):
    root, _ = visa
    path = root / "split_csv" / "1cls.csv"
    utf16 = "object,split,label,image,mask\n".encode("utf-16")  # a spreadsheet's "Unicode text" export
    for junk in (b"\x89PNG\r\n\x1a\n\xff\xfe binary", utf16):
        path.write_bytes(junk)
        with pytest.raises(AnomalyDatasetError, match=f"{path}: not a readable UTF-8 csv file"):
            load_visa(root)


def test_visa_columns_in_another_order_with_extra_ones_load(visa):
    root, expected = visa
    path = root / "split_csv" / "1cls.csv"
    rows = read_csv_rows(path)
    write_csv(path, [[r[3], "note", r[0], r[4], r[2], r[1]] for r in rows],
              header=("image", "comment", "object", "mask", "label", "split"))
    ds = load_visa(root)
    assert (len(ds["train"]), len(ds["test"])) == (expected["train"], expected["test"])


def test_visa_listed_path_that_is_a_folder(visa):
    root, expected = visa
    rows = read_csv_rows(root / "split_csv" / "1cls.csv")
    image = root / rows[0][3]
    image.unlink()
    image.mkdir()  # a folder named like the image
    with pytest.raises(AnomalyDatasetError, match=f"image not found: {image} \\(listed at .*1cls.csv:2\\)"):
        load_visa(root)
    with pytest.warns(UserWarning, match="skipped 1 bad file"):
        assert len(load_visa(root, on_bad_file="skip")["train"]) == expected["train"] - 1


# ----------------------------------------------------------------------------- parquet / Hub form


def assert_same_rows(original, loaded, mask_values=None):
    """Row by row: same pixels, same mask support, same labels and names; path made relative."""
    assert len(original) == len(loaded)
    for a, b in zip(original, loaded):
        assert (a["label"], a["category"], a["defect_type"]) == (b["label"], b["category"], b["defect_type"])
        assert a["path"].endswith(b["path"]) and not Path(b["path"]).is_absolute()
        np.testing.assert_array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
        if a["mask"] is None:
            assert b["mask"] is None
        else:
            np.testing.assert_array_equal(np.asarray(b["mask"]), (np.asarray(a["mask"]) > 0) * 255)


def test_parquet_round_trip_mvtec(mvtec, tmp_path):
    root, _ = mvtec
    original = load_mvtec_ad(root)
    out = convert_to_parquet(original, tmp_path / "pq", root=root, source_name="MVTec AD")
    assert sorted(p.name for p in (out / "data").iterdir()) == [
        "test-00000-of-00001.parquet", "train-00000-of-00001.parquet"]
    loaded = load_dataset(str(out), cache_dir=str(tmp_path / "cache"))
    assert loaded["train"].features == FEATURES
    for split in ("train", "test"):
        assert_same_rows(original[split], loaded[split])
    # The shards hold the bytes: the source folder is no longer needed.
    shutil.rmtree(root)
    assert loaded["test"][3]["image"].size == (32, 24)


def test_parquet_round_trip_visa_binarises_masks_and_shards(visa, tmp_path):
    root, _ = visa
    original = load_visa(root)
    out = convert_to_parquet(original, tmp_path / "pq", root=root, max_shard_bytes=2000)
    assert len(list((out / "data").glob("test-*.parquet"))) > 1
    loaded = load_anomaly_dataset(str(out), cache_dir=str(tmp_path / "cache"))
    for split in ("train", "test"):
        assert_same_rows(original[split], loaded[split])
    assert {255} == set(np.unique(np.asarray(next(r["mask"] for r in loaded["test"] if r["mask"])))) - {0}
    with pytest.raises(FileExistsError, match="already holds parquet"):
        convert_to_parquet(original, out, root=root)


def test_convert_cli_and_push(mvtec, tmp_path, monkeypatch):
    root, expected = mvtec
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs["repo_id"], kwargs))

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    out = tmp_path / "out"
    argv = ["--format", "mvtec", "--root", str(root), "--output_dir", str(out), "--categories", "grid",
            "--push_to_hub", "me/tiny-mvtec", "--private"]
    assert convert_module.main(argv) == 0
    assert calls[0] == ("create_repo", "me/tiny-mvtec", {"repo_type": "dataset", "private": True, "exist_ok": True})
    assert calls[1][1] == "me/tiny-mvtec" and calls[1][2]["folder_path"] == str(out)
    assert calls[1][2]["repo_type"] == "dataset"
    loaded = load_anomaly_dataset(str(out), cache_dir=str(tmp_path / "cache"))
    assert categories_of(loaded) == ["grid"] and len(loaded["test"]) == 3
    assert "configs:" in (out / "README.md").read_text()


def test_convert_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        convert_module.main(["--format", "mvtec", "--root", str(tmp_path / "none"), "--output_dir", str(tmp_path)])
    assert info.value.code == 2 and "none" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert_module.main(["--format", "coco", "--root", "x", "--output_dir", "y"])


def test_load_anomaly_dataset_dispatch_and_schema(mvtec, visa, tmp_path):
    mvtec_root, _ = mvtec
    visa_root, _ = visa
    assert len(load_anomaly_dataset("mvtec", data_dir=mvtec_root, categories="grid")["test"]) == 3
    assert len(load_anomaly_dataset("visa", data_dir=visa_root)["test"]) == 8
    with pytest.raises(ValueError, match="data_dir is required"):
        load_anomaly_dataset("mvtec")

    pq = convert_to_parquet(load_mvtec_ad(mvtec_root), tmp_path / "pq", root=mvtec_root)
    filtered = load_anomaly_dataset(str(pq), categories=["bottle"], cache_dir=str(tmp_path / "cache"))
    assert categories_of(filtered) == ["bottle"] and len(filtered["test"]) == 5

    # A parquet folder with another schema: the error names what is missing and what is expected.
    wrong = load_mvtec_ad(mvtec_root).remove_columns(["mask"])
    wrong = wrong.cast_column("label", ClassLabel(names=["ok", "ng"]))
    for split in ("train", "test"):
        wrong[split].to_parquet(str(tmp_path / "wrong" / "data" / f"{split}-00000-of-00001.parquet"))
    with pytest.raises(AnomalyDatasetError, match="missing column 'mask'.*expected ClassLabel"):
        load_anomaly_dataset(str(tmp_path / "wrong"), cache_dir=str(tmp_path / "cache"))


# ----------------------------------------------------------------------------- collation


def test_collate_for_dataloader(mvtec):
    root, expected = mvtec
    ds = load_mvtec_ad(root)
    loader = DataLoader(ds["test"], batch_size=4, collate_fn=make_collate_fn(CNCImageProcessor(size=24)))
    batches = list(loader)
    assert [len(b["labels"]) for b in batches] == [4, 4]
    batch = batches[0]
    assert batch["pixel_values"].shape == (4, 3, 24, 24) and batch["pixel_values"].dtype == torch.float32
    assert batch["masks"].shape == (4, 24, 24) and batch["labels"].dtype == torch.long
    assert batch["categories"] == ds["test"]["category"][:4] and batch["paths"] == ds["test"]["path"][:4]
    for labels, masks in ((b["labels"], b["masks"]) for b in batches):
        for label, mask in zip(labels, masks):
            assert set(mask.unique().tolist()) <= {0.0, 1.0}
            assert (mask.sum() > 0) == bool(label)  # good images: all-zero masks
    for b in batches:  # MVTec: every defect image has its mask, good images have none
        assert b["has_mask"].dtype == torch.bool and b["has_mask"].tolist() == b["labels"].bool().tolist()


def test_collate_fn_pickles_for_spawned_workers(mvtec):
    import pickle

    root, _ = mvtec
    ds = load_mvtec_ad(root)
    collate = pickle.loads(pickle.dumps(make_collate_fn(CNCImageProcessor(size=8))))
    assert collate([ds["test"][i] for i in range(3)])["pixel_values"].shape == (3, 3, 8, 8)


def test_sixteen_bit_images_warn_that_decoding_clips(mvtec):
    root, _ = mvtec
    path = root / "grid" / "train" / "good" / "000.png"
    PIL.Image.fromarray(np.full((20, 20), 40000, np.uint16)).save(path)
    assert PIL.Image.open(path).mode.startswith("I")
    with pytest.warns(UserWarning, match=f"1 image.*16-bit or float pixels .*{path}"):
        load_mvtec_ad(root, "grid")


# ----------------------------------------------------------------------------- demo


def test_demo_layout_and_counts(demo_dir):
    ds = load_mvtec_ad(demo_dir)
    assert (demo_dir / "readme.txt").read_text().startswith("cnc-hf demo dataset")
    assert categories_of(ds) == sorted(DEMO_CATEGORIES) == ["brick", "grass", "gravel"]
    assert collections.Counter(ds["train"]["category"]) == {c: 3 for c in DEMO_CATEGORIES}
    expected = {(c, d): 2 for c in DEMO_CATEGORIES for d in ("good",) + DEFECT_KINDS}
    assert counts(ds["test"], "category", "defect_type") == expected
    gravel = np.asarray(PIL.Image.open(demo_dir / "gravel" / "train" / "good" / "000.png"))
    assert gravel.ndim == 3 and (gravel == gravel[..., :1]).all()  # gray, stored as RGB
    # its stains are coloured (orange: red > blue) only where painted, so the demo's random encoder can see them
    stain = np.asarray(PIL.Image.open(demo_dir / "gravel" / "test" / "stain" / "000.png")).astype(int)
    painted = np.asarray(PIL.Image.open(demo_dir / "gravel" / "ground_truth" / "stain" / "000_mask.png")) > 0
    assert (stain[painted, 0] > stain[painted, 2]).mean() > 0.9 and (stain[~painted, 0] == stain[~painted, 2]).all()
    assert PIL.Image.open(demo_dir / "brick" / "train" / "good" / "000.png").mode == "RGB"
    for row in ds["test"]:
        assert row["image"].size == (32, 32)
        if row["label"] == 1:
            mask = np.asarray(row["mask"])
            assert set(np.unique(mask)) == {0, 255} and 0 < (mask > 0).mean() < 0.5


@pytest.mark.parametrize("kind", DEFECT_KINDS)
@pytest.mark.parametrize("color", [True, False])
def test_demo_masks_are_exactly_the_painted_pixels(kind, color):
    rng = np.random.default_rng(3)
    clean = np.asarray(PIL.Image.fromarray(_texture("grass")).resize((64, 64)))
    if color:
        clean = np.stack([clean, clean // 2, clean // 3], axis=-1)
    context = {"stain_texture": _texture("brick"), "stain_tint": (0.3, 0.4, 1.0) if color else None}
    for _ in range(5):
        defective, mask = apply_defect(rng, clean, kind, context)
        changed = (defective != clean).reshape(64, 64, -1).any(axis=-1)
        assert mask.any() and not changed[~mask].any()  # nothing outside the mask is touched
        assert changed[mask].mean() > 0.9  # and (nearly) every masked pixel really differs


def test_demo_is_deterministic_per_seed(demo_dir, tmp_path):
    def files(folder):
        return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    kwargs = dict(image_size=32, n_train=3, n_test_good=2, n_test_defect=2)
    again = files(make_demo_dataset(tmp_path / "again", seed=0, **kwargs))
    assert again == files(demo_dir)
    other = files(make_demo_dataset(tmp_path / "other", seed=1, **kwargs))
    assert other.keys() == again.keys()
    images = [k for k in again if k.suffix == ".png"]
    assert sum(other[k] != again[k] for k in images) > 0.9 * len(images)


def test_demo_reuse_and_refusal(demo_dir, tmp_path):
    kwargs = dict(image_size=32, n_train=3, n_test_good=2, n_test_defect=2)
    assert make_demo_dataset(demo_dir, seed=0, **kwargs) == demo_dir  # same parameters: reused
    with pytest.raises(FileExistsError, match="other parameters"):
        make_demo_dataset(demo_dir, seed=5, **kwargs)
    # a set made by version 1 (grayscale gravel, no version in its parameters) is not taken for this one
    old = tmp_path / "v1"
    old.mkdir()
    (old / "readme.txt").write_text("cnc-hf demo dataset\nparameters: seed=0 image_size=32 n_train=3 n_test_good=2 "
                                    "n_test_defect=2\n")
    with pytest.raises(FileExistsError, match="other parameters"):
        make_demo_dataset(old, seed=0, **kwargs)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        make_demo_dataset(tmp_path / "busy")
    with pytest.raises(ValueError, match="image_size"):
        make_demo_dataset(tmp_path / "x", image_size=4)


def test_demo_default_size_and_dispatch(tmp_path):
    ds = load_anomaly_dataset("demo", data_dir=tmp_path / "demo")  # made on first use
    assert len(ds["train"]) == 3 * 24 and len(ds["test"]) == 3 * (8 + 3 * 8)
    assert ds["train"][0]["image"].size == (128, 128)
    size = sum(p.stat().st_size for p in (tmp_path / "demo").rglob("*.png"))
    assert size < 10 * 1024**2
