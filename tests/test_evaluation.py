"""cnc_hf.evaluation: the loop equals the metrics of a plain loop, threshold calibration, the command."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny_models import REPO_ROOT
from train_fixtures import write_folder_layout, write_mvtec_layout


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls on a shared 2-core box: threads only spin
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from cnc_hf.data import load_anomaly_dataset

    root = tmp_path_factory.mktemp("eval_data")
    write_mvtec_layout(root, categories=("waves",), n_train=3, n_test_good=3, n_test_bad=2, seed=4)
    write_mvtec_layout(root, categories=("rings",), n_train=3, n_test_good=2, n_test_bad=2, seed=5)
    return root, load_anomaly_dataset("mvtec", root)


@pytest.fixture(scope="module")
def model_and_processor(tiny_clip_dir):
    from cnc_hf.modeling import CNCModel
    from cnc_hf.modeling.image_processing_cnc import CNCImageProcessor

    torch.manual_seed(0)
    return CNCModel.from_clip_pretrained(tiny_clip_dir, image_size=32).eval(), CNCImageProcessor(size=32)


def plain_loop(model, processor, split):
    """One image at a time, no DataLoader: the reference for the batched/sharded loop."""
    scores, maps, masks = [], [], []
    for row in split:
        inputs = processor(row["image"], segmentation_maps=[row["mask"]])
        with torch.no_grad():
            out = model(pixel_values=inputs["pixel_values"])
        scores.append(float(out.image_score[0]))
        maps.append(out.anomaly_map[0].numpy())
        masks.append(inputs["masks"][0].numpy() > 0)
    return np.array(scores), np.stack(maps), np.stack(masks)


def test_evaluate_model_equals_the_metrics_of_a_plain_loop(model_and_processor, dataset):
    from cnc_hf.evaluation import evaluate_model
    from cnc_hf.metrics import compute_anomaly_metrics

    model, processor = model_and_processor
    test = dataset[1]["test"]
    results = evaluate_model(model, processor, test, batch_size=4, progress=False)
    scores, maps, masks = plain_loop(model, processor, test)
    expected = compute_anomaly_metrics(scores, np.array(test["label"]), maps, masks, categories=test["category"])
    assert results["num_images"] == len(test) == 9 and results["world_size"] == 1
    assert set(results["per_category"]) == {"rings", "waves"}
    for key in ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro"):
        assert results["mean"][key] == pytest.approx(expected["mean"][key], abs=1e-4)  # batch-size rounding
        for category in ("rings", "waves"):
            assert results["per_category"][category][key] == pytest.approx(expected["per_category"][category][key],
                                                                            abs=1e-4)
    assert "threshold" not in results  # no threshold configured
    assert model.training is False


def test_calibrate_threshold_is_a_quantile_of_normal_scores(model_and_processor, dataset):
    from cnc_hf.evaluation import calibrate_threshold

    model, processor = model_and_processor
    normal = dataset[1]["train"]
    scores, _, _ = plain_loop(model, processor, normal)
    threshold, details = calibrate_threshold(model, processor, normal, batch_size=4, progress=False,
                                             return_details=True)
    assert threshold == pytest.approx(np.quantile(scores, 0.99), rel=1e-5)
    assert details["num_calibration_images"] == len(normal) and details["quantile"] == 0.99
    assert set(details["per_category"]) == {"rings", "waves"}
    assert calibrate_threshold(model, processor, normal, quantile=1.0, progress=False) == pytest.approx(scores.max(),
                                                                                                       rel=1e-5)
    with pytest.raises(ValueError, match="normal images only"):
        calibrate_threshold(model, processor, dataset[1]["test"], progress=False)
    with pytest.raises(ValueError, match="quantile"):
        calibrate_threshold(model, processor, normal, quantile=0.0)


def test_threshold_decisions():
    from cnc_hf.evaluation import threshold_decisions

    result = threshold_decisions(np.array([0.1, 0.5, 0.9, 0.4]), np.array([0, 0, 1, 1]), 0.5)
    # >= threshold is an anomaly (the pipeline's rule): predictions 0, 1, 1, 0
    assert result["precision"] == 0.5 and result["recall"] == 0.5 and result["accuracy"] == 0.5
    assert result["false_positive_rate"] == 0.5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model_and_processor):
    from cnc_hf.pipeline import save_model_dir

    model, processor = model_and_processor
    model.config.threshold = 2.0
    out = tmp_path_factory.mktemp("model")
    save_model_dir(model, processor, out)
    model.config.threshold = None
    return out


def test_command_writes_the_table_json_and_heatmaps(model_dir, dataset, tmp_path, capsys):
    from accelerate.state import AcceleratorState, GradientState

    from cnc_hf import evaluation

    out = tmp_path / "eval"
    try:
        code = evaluation.main(["--model", str(model_dir), "--dataset", "mvtec", "--data_dir", str(dataset[0]),
                                "--output_dir", str(out), "--heatmaps", "3", "--batch_size", "4", "--cpu",
                                "--no_progress"])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 9 and metrics["evaluation"]["dataset"] == "mvtec"
    assert metrics["threshold"]["value"] == 2.0 and 0 <= metrics["threshold"]["recall"] <= 1
    table = (out / "metrics.md").read_text()
    assert table.splitlines()[0].startswith("| Category | I-AUROC | P-AUROC | AUPRO | I-AP | P-AP | mTotal")
    assert "| **Mean** |" in table and "| rings |" in table
    heatmaps = sorted((out / "heatmaps").glob("*.png"))
    assert len(heatmaps) == 3
    import PIL.Image

    from cnc_hf.figures import _PAD

    # One labelled row: image | heat map | ground truth tiles (at least 160 px) above a caption and a colour bar.
    panel = PIL.Image.open(heatmaps[0])
    assert panel.width == 3 * 160 + 2 * _PAD and panel.height > 160 + 3 * 16
    assert "I-AUROC" in capsys.readouterr().out


def test_mixed_masks_pixel_metrics_use_only_images_with_pixel_ground_truth(model_and_processor, tmp_path):
    """Own folders, masks for 1 of 3 images per defect folder: pixel metrics equal those of the images with
    pixel ground truth alone (good images + anomalous images with a mask), image metrics use every image."""
    from cnc_hf.data import load_image_folder
    from cnc_hf.evaluation import evaluate_model
    from cnc_hf.metrics import compute_anomaly_metrics

    model, processor = model_and_processor
    root = write_folder_layout(tmp_path / "waves", n_good=10, n_bad=3, masks_for=1, seed=6)
    test = load_image_folder(root / "good", [root / "noise", root / "blobs"], mask_dir=root / "masks")["test"]
    results = evaluate_model(model, processor, test, batch_size=4, progress=False)
    scores, maps, masks = plain_loop(model, processor, test)
    labels = np.array(test["label"])
    keep = np.array([m is not None for m in test["mask"]]) | (labels == 0)
    assert keep.sum() == 2 + 2 and len(test) == 8
    truth_only = compute_anomaly_metrics(scores[keep], labels[keep], maps[keep], masks[keep])
    everything = compute_anomaly_metrics(scores, labels)
    for key in ("pixel_auroc", "pixel_ap", "aupro"):
        assert results[key] == pytest.approx(truth_only[key], abs=1e-4)
    assert results["image_auroc"] == pytest.approx(everything["image_auroc"], abs=1e-4)
    assert (results["num_images"], results["num_images_pixel"], results["num_anomalous_with_mask"]) == (8, 4, 2)


def test_command_on_image_folders_writes_null_pixel_metrics_and_unknown_truth_panels(model_dir, tmp_path):
    from accelerate.state import AcceleratorState, GradientState

    from cnc_hf import evaluation

    root = write_folder_layout(tmp_path / "waves", n_good=5, n_bad=2, seed=7)
    out = tmp_path / "eval"
    try:
        code = evaluation.main(["--model", str(model_dir), "--dataset", "folder", "--normal_dir", str(root / "good"),
                                "--abnormal_dir", str(root / "noise"), str(root / "blobs"), "--test_fraction", "0.4",
                                "--output_dir", str(out), "--heatmaps", "8", "--cpu", "--no_progress"])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 2 + 4 and metrics["evaluation"]["test_fraction"] == 0.4
    assert metrics["pixel_auroc"] is None and metrics["per_category"]["waves"]["aupro"] is None
    assert metrics["image_auroc"] is not None
    assert "| waves |" in (out / "metrics.md").read_text()
    import PIL.Image

    panels = {p.name: np.asarray(PIL.Image.open(p)) for p in (out / "heatmaps").glob("*.png")}
    assert len(panels) == 6
    from cnc_hf.figures import _LINE, _PAD

    top, left, tile = _LINE + 2 * _PAD, _PAD + 2 * 160, 160  # the ground-truth tile, under its header

    def truth(panel):
        return panel[top:top + tile, left:left + tile]

    noise = truth(panels["waves_noise_000.png"])
    # A defect without a mask: a gray "no mask" tile (its label aside), not a black "no defect".
    assert (noise == 128).mean() > 0.9 and (noise == 0).mean() < 0.05
    good = [panel for name, panel in panels.items() if name.startswith("waves_good_")]
    assert len(good) == 2 and all((truth(panel) == 0).all() for panel in good)  # good: all normal, black


def test_command_refuses_a_dir_that_is_not_a_model(tmp_path):
    from cnc_hf import evaluation

    with pytest.raises(SystemExit, match="no config.json"):
        evaluation.main(["--model", str(tmp_path), "--dataset", "mvtec", "--data_dir", str(tmp_path)])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_gather_exactly_the_test_set(model_dir, dataset, tmp_path):
    """9 test images, 2 processes, batch 2: the last batch is padded; gather_for_metrics drops the
    duplicates, so the metrics equal the single-process ones."""
    out = tmp_path / "eval2"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), "-m", "cnc_hf.evaluation", "--model", str(model_dir),
               "--dataset", "mvtec", "--data_dir", str(dataset[0]), "--output_dir", str(out), "--batch_size", "2",
               "--cpu", "--no_progress"]
    result = subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    two = json.loads((out / "metrics.json").read_text())
    assert two["world_size"] == 2 and two["num_images"] == 9

    from cnc_hf.modeling import CNCModel
    from cnc_hf.modeling.image_processing_cnc import CNCImageProcessor
    from cnc_hf.evaluation import evaluate_model

    one = evaluate_model(CNCModel.from_pretrained(model_dir, dtype=torch.float32),
                         CNCImageProcessor.from_pretrained(model_dir), dataset[1]["test"], batch_size=2, progress=False)
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_ap", "pixel_ap"):
        assert two["mean"][key] == pytest.approx(one["mean"][key], abs=1e-4)
