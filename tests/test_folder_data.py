"""Your own data in plain folders (cnc_hf.data.folder): good + defect folders, masks optional, bad input."""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageFile
import pytest
import torch
from datasets import load_dataset

from cnc_hf.data import (
    FEATURES,
    AnomalyDatasetError,
    categories_of,
    concatenate_anomaly_datasets,
    load_anomaly_dataset,
    load_image_folder,
    load_image_folders,
    make_collate_fn,
)
from cnc_hf.data import convert as convert_module
from cnc_hf.data.folder import image_keys, mask_key
from cnc_hf.modeling.image_processing_cnc import CNCImageProcessor
from data_fixtures import image_array, mask_array, write_folder_set


def counts(split, *keys):
    return collections.Counter(zip(*(split[k] for k in keys)))


@pytest.fixture
def part(tmp_path):
    """tmp/part/{good, scratch, dent}: no masks (the commonest real case)."""
    root = tmp_path / "part"
    return root, write_folder_set(root)


def folders(root: Path) -> dict:
    return {"normal_dir": root / "good", "abnormal_dir": [root / "scratch", root / "dent"]}


# ----------------------------------------------------------------------------- the common case
def test_good_and_two_defect_folders_without_masks(part):
    root, expected = part
    ds = load_image_folder(**folders(root))
    assert ds["train"].features == FEATURES and ds["test"].features == FEATURES
    assert categories_of(ds) == ["part"]  # the parent folder's name
    # 10 good images (one in a subfolder): 20% = 2 go to test; every defect image (nested ones too) to test.
    assert len(ds["train"]) == 8 and counts(ds["train"], "label", "defect_type") == {(0, "good"): 8}
    assert counts(ds["test"], "label", "defect_type") == {(0, "good"): 2, (1, "scratch"): 3, (1, "dent"): 2}
    assert set(ds["train"]["path"]) | set(ds["test"]["path"]) >= set(expected["good"])
    assert not set(ds["train"]["path"]) & set(ds["test"]["path"])
    assert sorted(p for p in ds["test"]["path"] if "/good/" not in p) == sorted(
        expected["defects"]["scratch"] + expected["defects"]["dent"])
    assert str(root / "good" / "nested" / "009.png") in list(ds["train"]["path"]) + list(ds["test"]["path"])
    assert all(row["mask"] is None for row in ds["test"])  # no masks: None, never an all-zero mask
    row = ds["test"][0]
    np.testing.assert_array_equal(np.asarray(row["image"]), np.asarray(PIL.Image.open(row["path"]).convert("RGB")))


def test_test_split_is_seeded_and_stable_when_images_are_added(part):
    root, _ = part
    test_of = lambda **kw: {p for p in load_image_folder(root / "good", **kw)["test"]["path"]}  # noqa: E731
    first = test_of()
    assert first == test_of() and len(first) == 2
    assert test_of(seed=1) != first  # another seed, another hold-out
    assert len(test_of(test_fraction=0.5)) == 5 and first <= test_of(test_fraction=0.5)
    for i in range(3):  # a grown folder: the images held out before stay held out (each ranked by its own hash)
        PIL.Image.fromarray(image_array("RGB", (32, 24), 900 + i)).save(root / "good" / f"new{i}.png")
    assert first <= test_of(test_fraction=0.3)
    with pytest.raises(ValueError, match="test_fraction: got 1"):
        load_image_folder(root / "good", test_fraction=1)


def test_normal_test_dir_and_an_explicit_category(part, tmp_path):
    root, _ = part
    (tmp_path / "good_test").mkdir()
    for i in range(3):
        PIL.Image.fromarray(image_array("RGB", (32, 24), 700 + i)).save(tmp_path / "good_test" / f"{i}.png")
    ds = load_image_folder(**folders(root), normal_test_dir=tmp_path / "good_test", category="bracket")
    assert categories_of(ds) == ["bracket"]
    assert len(ds["train"]) == 10  # all of normal_dir trains
    assert counts(ds["test"], "label") == {(0,): 3, (1,): 5}


def test_without_abnormal_dir_the_test_split_holds_good_images(part):
    root, _ = part
    ds = load_image_folder(root / "good", test_fraction=0.3)
    assert len(ds["train"]) == 7 and counts(ds["test"], "label") == {(0,): 3}
    with pytest.raises(AnomalyDatasetError, match="no test images for category 'part'.*abnormal_dir"):
        load_image_folder(root / "good", test_fraction=0)


def test_indexing_decodes_nothing(part, monkeypatch):
    root, _ = part
    decoded = []
    original = PIL.ImageFile.ImageFile.load
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", lambda self: decoded.append(self.filename) or original(self))
    ds = load_image_folder(**folders(root))
    assert decoded == []
    row = ds["test"][4]  # decoding happens when a row is read: that row's image only
    assert row["image"].size == (32, 24) and set(decoded) == {row["path"]}


# ----------------------------------------------------------------------------- masks
def test_a_mask_folder_for_some_images(tmp_path):
    root = tmp_path / "part"
    expected = write_folder_set(root, masks_for=("scratch/s00", "dent/d01"))  # flat: s00_mask.png, d01_mask.png
    ds = load_image_folder(**folders(root), mask_dir=root / "masks")
    with_mask = {row["path"]: np.asarray(row["mask"]) for row in ds["test"] if row["mask"] is not None}
    assert set(with_mask) == set(expected["masks"])  # d01 sits in dent/deeper/: found by its stem
    for path, mask in with_mask.items():
        np.testing.assert_array_equal(mask, expected["masks"][path])
    assert sum(row["mask"] is None for row in ds["test"] if row["label"] == 1) == 3


def test_mask_rule_keys():
    assert mask_key(Path("scratch/001_mask.png")) == mask_key(Path("scratch/001.png")) == "scratch/001"
    assert mask_key(Path("001_mask.tif")) == "001"
    assert image_keys("scratch", Path("sub/001.jpg")) == ["scratch/sub/001", "sub/001", "001"]


def test_repeated_stems_need_per_defect_mask_folders(tmp_path):
    root = tmp_path / "part"
    write_folder_set(root, defects={"scratch": 2, "dent": 2})
    (root / "dent" / "deeper" / "d01.png").rename(root / "dent" / "s00.png")  # the same stem in both folders
    masks = root / "masks"
    (masks / "scratch").mkdir(parents=True)
    PIL.Image.fromarray(mask_array((32, 24), 0), "L").save(masks / "scratch" / "s00.png")
    ds = load_image_folder(**folders(root), mask_dir=masks)
    assert {row["path"] for row in ds["test"] if row["mask"] is not None} == {str(root / "scratch" / "s00.png")}

    (masks / "scratch" / "s00.png").rename(masks / "s00_mask.png")  # flat: one mask, two images named s00
    with pytest.raises(AnomalyDatasetError, match=re.escape(f"mask {masks / 's00_mask.png'} matches 2 defect images")
                       + r".*mask_dir/<defect_type>/"):
        load_image_folder(**folders(root), mask_dir=masks)
    with pytest.warns(UserWarning, match="skipped 1 bad file"):
        ds = load_image_folder(**folders(root), mask_dir=masks, on_bad_file="skip")
    assert len(ds["test"]) == 2 + 4 - 2  # both images that claim the mask are left out


def test_a_mask_without_an_image_names_it(tmp_path):
    root = tmp_path / "part"
    write_folder_set(root, masks_for=("scratch/s00",))
    orphan = root / "masks" / "x99_mask.png"
    PIL.Image.fromarray(mask_array((32, 24), 0), "L").save(orphan)
    with pytest.raises(AnomalyDatasetError, match=re.escape(f"mask without its image: {orphan}") + ".*'x99'"):
        load_image_folder(**folders(root), mask_dir=root / "masks")
    with pytest.warns(UserWarning, match="skipped 1 bad file"):
        assert len(load_image_folder(**folders(root), mask_dir=root / "masks", on_bad_file="skip")["test"]) == 7


def test_a_mask_of_another_size_names_both_files(tmp_path):
    root = tmp_path / "part"
    write_folder_set(root, masks_for=("scratch/s01",))
    mask = root / "masks" / "s01_mask.png"
    PIL.Image.new("L", (10, 10)).save(mask)
    image = root / "scratch" / "s01.png"
    with pytest.raises(AnomalyDatasetError, match=re.escape(f"mask {mask} is 10x10 but its image {image} is 32x24")):
        load_image_folder(**folders(root), mask_dir=root / "masks")


def test_bad_masks_leave_their_image_out(tmp_path):
    root = tmp_path / "part"
    write_folder_set(root, masks_for=("scratch/s00",))
    PIL.Image.fromarray(mask_array((32, 24), 0), "L").save(root / "masks" / "s00.png")  # a second mask for s00
    with pytest.raises(AnomalyDatasetError, match="two masks for one image: .*s00.png and .*s00_mask.png"):
        load_image_folder(**folders(root), mask_dir=root / "masks")
    (root / "masks" / "s00.png").unlink()
    (root / "masks" / "s00_mask.png").unlink()
    PIL.Image.fromarray(mask_array((32, 24), 0), "L").save(root / "masks" / "s00.jpg", format="JPEG")
    with pytest.raises(AnomalyDatasetError, match=r"mask .*s00.jpg is a .jpg file; expected a lossless mask"):
        load_image_folder(**folders(root), mask_dir=root / "masks")
    with pytest.warns(UserWarning, match="skipped 1 bad file"):
        ds = load_image_folder(**folders(root), mask_dir=root / "masks", on_bad_file="skip")
    assert str(root / "scratch" / "s00.png") not in ds["test"]["path"]  # not kept as an image without a mask


# ----------------------------------------------------------------------------- bad folders
def test_empty_or_missing_normal_dir_is_an_error_naming_it(tmp_path):
    (tmp_path / "part" / "good").mkdir(parents=True)
    (tmp_path / "part" / "good" / "notes.txt").write_text("not an image")
    with pytest.raises(AnomalyDatasetError, match=re.escape(f"normal_dir {tmp_path / 'part' / 'good'}: no image files")):
        load_image_folder(tmp_path / "part" / "good", on_bad_file="skip")
    with pytest.raises(FileNotFoundError, match=re.escape(f"abnormal_dir {tmp_path / 'nowhere'} does not exist")):
        load_image_folder(tmp_path / "part" / "good", tmp_path / "nowhere")


def test_folders_inside_one_another_are_refused(part):
    root, _ = part
    with pytest.raises(AnomalyDatasetError, match=f"abnormal_dir {root / 'scratch'} is inside normal_dir {root}"):
        load_image_folder(root, root / "scratch")
    with pytest.raises(AnomalyDatasetError, match="are the same folder"):
        load_image_folder(root / "good", [root / "scratch", root / "scratch"])
    (root / "good" / "masks").mkdir()
    with pytest.raises(AnomalyDatasetError, match="mask_dir .* is inside normal_dir"):
        load_image_folder(**folders(root), mask_dir=root / "good" / "masks")


def test_bad_and_dangling_files_are_bad_entries(part, tmp_path):
    root, _ = part
    broken = root / "scratch" / "s01.png"
    broken.write_bytes(broken.read_bytes()[:-40])
    link = root / "good" / "nested" / "gone.png"
    link.symlink_to(tmp_path / "moved.png")
    with pytest.raises(AnomalyDatasetError, match=re.escape(f"dangling symbolic link: {link}")):
        load_image_folder(**folders(root))
    with pytest.warns(UserWarning, match=r"skipped 2 bad file\(s\)"):
        ds = load_image_folder(**folders(root), on_bad_file="skip")
    assert str(broken) not in ds["test"]["path"] and len(ds["test"]) == 2 + 4


# ----------------------------------------------------------------------------- several categories
def test_categories_concatenated_and_from_a_folder_list(tmp_path):
    write_folder_set(tmp_path / "bracket")
    write_folder_set(tmp_path / "nut", defects={"crack": 2}, masks_for=("crack/c00",), mask_layout="per_defect")
    bracket = load_image_folder(**folders(tmp_path / "bracket"))
    nut = load_image_folder(tmp_path / "nut" / "good", tmp_path / "nut" / "crack", mask_dir=tmp_path / "nut" / "masks")
    both = concatenate_anomaly_datasets([bracket, nut])
    assert categories_of(both) == ["bracket", "nut"] and len(both["test"]) == 7 + 4
    with pytest.raises(AnomalyDatasetError, match="category 'nut' is in dataset 0 and dataset 1"):
        concatenate_anomaly_datasets([nut, nut])

    listing = {"bracket": {"normal_dir": "bracket/good", "abnormal_dir": ["bracket/scratch", "bracket/dent"]},
               "nut": {"normal_dir": "nut/good", "abnormal_dir": "nut/crack", "mask_dir": "nut/masks",
                       "test_fraction": 0.5}}
    (tmp_path / "folders.json").write_text(json.dumps(listing))
    (tmp_path / "folders.yaml").write_text(
        "bracket:\n  normal_dir: bracket/good\n  abnormal_dir: [bracket/scratch, bracket/dent]\n"
        "nut:\n  normal_dir: nut/good\n  abnormal_dir: nut/crack\n  mask_dir: nut/masks\n  test_fraction: 0.5\n")
    for name in ("folders.json", "folders.yaml"):
        listed = load_image_folders(tmp_path / name)  # paths relative to the file
        assert categories_of(listed) == ["bracket", "nut"]
        assert counts(listed["test"], "category", "label") == {("bracket", 0): 2, ("bracket", 1): 5,
                                                                ("nut", 0): 5, ("nut", 1): 2}
        assert sum(m is not None for m in listed["test"]["mask"]) == 1
    assert categories_of(load_anomaly_dataset("folder", tmp_path / "folders.yaml", categories="nut")) == ["nut"]
    (tmp_path / "bad.yaml").write_text("nut:\n  normal: nut/good\n")
    with pytest.raises(AnomalyDatasetError, match=r"bad.yaml \['nut'\]: unknown key\(s\) \['normal'\]"):
        load_image_folders(tmp_path / "bad.yaml")


def test_load_anomaly_dataset_folder(part):
    root, _ = part
    ds = load_anomaly_dataset("folder", normal_dir=root / "good", abnormal_dir=root / "scratch", category="p")
    assert categories_of(ds) == ["p"] and counts(ds["test"], "label") == {(0,): 2, (1,): 3}
    with pytest.raises(ValueError, match="normal_dir is required"):
        load_anomaly_dataset("folder")


def test_collate_says_which_rows_have_a_mask(tmp_path):
    root = tmp_path / "part"
    write_folder_set(root, masks_for=("scratch/s00",))
    test = load_image_folder(**folders(root), mask_dir=root / "masks")["test"]
    batch = make_collate_fn(CNCImageProcessor(size=16))([test[i] for i in range(len(test))])
    has_mask = [m is not None for m in test["mask"]]
    assert batch["has_mask"].dtype == torch.bool and batch["has_mask"].tolist() == has_mask
    assert all(batch["masks"][i].sum() == 0 for i, known in enumerate(has_mask) if not known)  # placeholders


# ----------------------------------------------------------------------------- to the Hub form
def test_convert_format_folder_round_trip_and_push(tmp_path, monkeypatch):
    root = tmp_path / "part"
    write_folder_set(root, masks_for=("dent/d00",))
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs["repo_id"]))

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    out = tmp_path / "pq"
    assert convert_module.main(["--format", "folder", "--normal_dir", str(root / "good"), "--abnormal_dir",
                                str(root / "scratch"), str(root / "dent"), "--mask_dir", str(root / "masks"),
                                "--output_dir", str(out), "--push_to_hub", "me/part"]) == 0
    assert calls == [("create_repo", "me/part"), ("upload_folder", "me/part")]
    original = load_image_folder(**folders(root), mask_dir=root / "masks")
    loaded = load_dataset(str(out), cache_dir=str(tmp_path / "cache"))
    for split in ("train", "test"):
        assert len(loaded[split]) == len(original[split])
        for a, b in zip(original[split], loaded[split]):
            assert (a["label"], a["category"], a["defect_type"]) == (b["label"], b["category"], b["defect_type"])
            assert b["path"] == str(Path(a["path"]).relative_to(root))  # no local folder names on the Hub
            assert (a["mask"] is None) == (b["mask"] is None)
    assert "image folders (part)" in (out / "README.md").read_text()


def test_convert_format_folder_errors(part, tmp_path, capsys):
    root, _ = part
    with pytest.raises(SystemExit) as info:
        convert_module.main(["--format", "folder", "--output_dir", str(tmp_path / "o")])
    assert info.value.code == 2 and "needs --normal_dir" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        convert_module.main(["--format", "mvtec", "--root", str(root), "--normal_dir", str(root / "good"),
                             "--output_dir", str(tmp_path / "o")])
    assert "--normal_dir applies to --dataset folder only" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        convert_module.main(["--format", "folder", "--normal_dir", str(tmp_path / "none"), "--output_dir",
                             str(tmp_path / "o")])
    assert info.value.code == 2 and f"normal_dir {tmp_path / 'none'} does not exist" in capsys.readouterr().err
