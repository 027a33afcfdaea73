"""The `cnc-hf` command line: usage, every subcommand's --help, and the demo end to end (small)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cnc_hf import cli


def test_usage_lists_every_command(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert f"  {name}" in out


def test_unknown_command_is_refused(capsys):
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize("command", [c for c in cli.COMMANDS if c not in ("train", "app")])
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_train_forwards_to_the_training_script():
    result = subprocess.run([sys.executable, "-m", "cnc_hf.cli", "train", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--cache_features" in result.stdout


def test_demo_end_to_end_small(tmp_path):
    """The main job, shrunk: data, random CLIP, training, evaluation, saved model, pipeline gallery."""
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "cnc_hf.cli", "demo", "--output_dir", str(out), "--epochs", "1", "--image_size", "64",
         "--gallery_images", "4", "--train_images", "8"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "RANDOMLY INITIALISED" in result.stdout
    model_dir = out / "model"
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "modeling_cnc.py", "pipeline_cnc.py",
                 "README.md", "metrics.json"):
        assert (model_dir / name).is_file(), name
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert set(metrics["per_category"]) == {"brick", "grass", "gravel"}
    assert 0.0 <= metrics["mean"]["image_auroc"] <= 1.0
    config = json.loads((model_dir / "config.json").read_text())
    assert isinstance(config["threshold"], float)
    records = json.loads((out / "predictions.json").read_text())
    assert len(records) == 4 and {r["label"] for r in records} == {0, 1}
    per_category = config["category_thresholds"]  # calibrated per category; the gallery decides with them
    assert set(per_category) == {"brick", "grass", "gravel"}
    # The gallery does not name the category: the model recognises it (tinted brick, green grass, grey gravel) and
    # decides at that category's threshold.
    assert all(r["category"] == r["true_category"] and r["category_source"] == "recognised" for r in records)
    assert all(r["threshold"] == per_category[r["category"]] for r in records)
    assert all(r["is_anomaly"] == (r["score"] >= per_category[r["category"]]) for r in records)
    assert config["categories"] == ["brick", "grass", "gravel"]
    table = (out / "metrics.md").read_text()
    assert table.startswith("| Category") and "category recognised from the image" in table
    assert "balanced accuracy" in table and "(target >= 75%)" in table
    assert set(metrics["decisions"]["per_category"]) == {"brick", "grass", "gravel"}
    assert metrics["decisions_recognised"]["recognition"]["accuracy"] == 1.0
    # The labelled grid: image | heat map | ground truth, 160 px tiles (one block for 4 images).
    from PIL import Image

    from cnc_hf.figures import _PAD

    assert Image.open(out / "gallery.png").width == 3 * 160 + 2 * _PAD


def test_predict_writes_heat_maps_and_scores_like_the_pipeline(tmp_path, capsys):
    import numpy as np
    import torch
    from PIL import Image

    from cnc_hf.pipeline import AnomalyMapPipeline, save_model_dir
    from cnc_hf.modeling import CNCModel
    from cnc_hf.modeling.image_processing_cnc import CNCImageProcessor

    from tiny_models import tiny_cnc_config

    torch.manual_seed(0)
    model = CNCModel(tiny_cnc_config(threshold=0.5)).eval()
    processor = CNCImageProcessor(size=32)
    save_model_dir(model, processor, tmp_path / "model")
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(40, 30), (64, 64)]):
        paths.append(tmp_path / f"part{i}.png")
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(paths[-1])
    out = tmp_path / "pred"
    assert cli.main(["predict", *map(str, paths), "--model", str(tmp_path / "model"), "--output_dir", str(out)]) == 0
    records = json.loads((out / "predictions.json").read_text())
    expected = AnomalyMapPipeline(model=model, image_processor=processor)([str(p) for p in paths])
    for record, exp, path in zip(records, expected, paths):
        assert abs(record["score"] - exp["score"]) < 1e-5
        assert record["is_anomaly"] == (exp["score"] >= 0.5)
        saved_map = np.load(out / f"{path.stem}_map.npy")
        assert saved_map.shape == Image.open(path).size[::-1]
        assert (out / f"{path.stem}_heatmap.png").is_file()
    with pytest.raises(SystemExit, match="no such image"):
        cli.main(["predict", str(tmp_path / "missing.png"), "--model", str(tmp_path / "model")])


def test_predict_never_overwrites_images_that_share_a_name(tmp_path):
    """MVTec layout: every defect folder has a 000.png. Each gets its own outputs, mirrored below the common
    folder, and each record points at the heat map of its own image (by score)."""
    import csv

    import numpy as np
    import torch
    from PIL import Image

    from cnc_hf.modeling import CNCModel
    from cnc_hf.modeling.image_processing_cnc import CNCImageProcessor
    from cnc_hf.pipeline import AnomalyMapPipeline, save_model_dir
    from tiny_models import tiny_cnc_config

    torch.manual_seed(0)
    model = CNCModel(tiny_cnc_config(threshold=0.5)).eval()
    processor = CNCImageProcessor(size=32)
    save_model_dir(model, processor, tmp_path / "model")
    rng = np.random.default_rng(1)
    data = tmp_path / "data"
    images = [data / "bottle" / "test" / kind / "000.png" for kind in ("good", "broken", "contamination")]
    for index, path in enumerate(images):
        path.parent.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (24 + 8 * index, 32, 3), dtype=np.uint8)).save(path)
    out = tmp_path / "pred"
    pattern = str(data / "*" / "test" / "*" / "000.png")  # a quoted glob, expanded by predict itself
    assert cli.main(["predict", pattern, "--model", str(tmp_path / "model"), "--output_dir", str(out),
                     "--batch_size", "2", "--no_progress"]) == 0
    records = json.loads((out / "predictions.json").read_text())
    assert len({r["heatmap"] for r in records}) == 3 and len({r["map"] for r in records}) == 3
    expected = {str(p): r["score"] for p, r in zip(images, AnomalyMapPipeline(model=model, image_processor=processor)(
        [str(p) for p in images]))}
    for record in records:
        assert abs(record["score"] - expected[record["image"]]) < 1e-5
        kind = Path(record["image"]).parent.name
        assert record["heatmap"] == str(out / kind / "000_heatmap.png")
        height = Image.open(record["image"]).size[1]
        assert np.load(record["map"]).shape[0] == height  # the map of this image, not another's
        assert record["threshold"] == 0.5
    with open(out / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["image"] for r in rows] == [r["image"] for r in records]
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3
    # A folder, searched recursively, gives the same three images, each once even when named twice.
    out2 = tmp_path / "pred2"
    assert cli.main(["predict", str(data / "bottle"), str(images[0]), "--model", str(tmp_path / "model"),
                     "--output_dir", str(out2), "--no_progress"]) == 0
    assert sorted(r["image"] for r in json.loads((out2 / "predictions.json").read_text())) == sorted(map(str, images))
    assert (out2 / "broken" / "000_heatmap.png").is_file()
    with pytest.raises(SystemExit, match="nothing.png"):
        cli.main(["predict", str(tmp_path / "nothing.png"), "--model", str(tmp_path / "model")])


def test_predict_keeps_images_that_differ_only_in_extension_apart_and_skips_non_images(tmp_path):
    from cnc_hf.predict import collect_images, output_stems

    folder = tmp_path / "pin"
    folder.mkdir()
    from PIL import Image

    for name in ("x.png", "x.jpg", "y.png"):
        Image.new("RGB", (8, 8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    found = collect_images([str(folder / "*")])
    assert sorted(p.name for p in found) == ["x.jpg", "x.png", "y.png"]  # the glob's notes.txt is left out
    stems = output_stems(found, tmp_path / "out")
    assert len(set(stems)) == 3
    assert sorted(s.name for s in stems) == ["x.jpg", "x.png", "y"]
