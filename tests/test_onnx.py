"""ONNX export and the torch-free ONNX Runtime path: equal to the torch pipeline, at several batch sizes
and image sizes, in a process where torch is not installed, with clear errors for bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from tiny_models import REPO_ROOT, tiny_cnc_config
from cnc_hf import cli
from cnc_hf.modeling import CNCModel
from cnc_hf.modeling.image_processing_cnc import CNCImageProcessor
from cnc_hf.onnx_export import export_onnx
from cnc_hf.onnx_runtime import OnnxAnomalyDetector
from cnc_hf.pipeline import AnomalyMapPipeline, save_model_dir

@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CNCModel(tiny_cnc_config(threshold=0.5)).eval()


@pytest.fixture(scope="module")
def onnx_file(model, tmp_path_factory):
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "cnc.onnx")


def images(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (24 + 9 * i, 40 - 3 * i, 3), dtype=np.uint8) for i in range(count)]


@pytest.mark.parametrize("batch", [1, 3])  # the graph was traced at batch 2
def test_onnx_runtime_equals_the_torch_pipeline(model, onnx_file, batch):
    inputs = images(batch, seed=batch)
    expected = AnomalyMapPipeline(model=model, image_processor=CNCImageProcessor(size=32))(inputs)
    got = OnnxAnomalyDetector(onnx_file)(inputs, batch_size=batch)
    for want, have, image in zip(expected, got, inputs):
        assert abs(want["score"] - have["score"]) < 1e-4
        assert have["anomaly_map"].shape == image.shape[:2] and have["anomaly_map"].dtype == np.float32
        assert np.abs(want["anomaly_map"] - have["anomaly_map"]).max() < 1e-4
        assert want["is_anomaly"] == have["is_anomaly"] and have["is_anomaly"] == (have["score"] >= 0.5)
        assert have["heatmap"].size == want["heatmap"].size


def test_export_folds_the_text_features_and_stores_what_a_runtime_needs(model, onnx_file):
    import onnx

    graph = onnx.load(str(onnx_file))
    assert [i.name for i in graph.graph.input] == ["pixel_values"]
    assert [o.name for o in graph.graph.output] == ["anomaly_map", "image_score"]
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    metadata = json.loads({p.key: p.value for p in graph.metadata_props}["cnc_hf"])
    assert metadata["threshold"] == 0.5 and metadata["image_size"] == 32
    assert metadata["processor"]["size"] == 32
    # No text tower in the graph: its token embedding (49408 x width) would be the largest initializer.
    assert max(int(np.prod(t.dims)) for t in graph.graph.initializer) < 49408 * 32
    assert not hasattr(model.__dict__, "text_features")  # the model is left as it was
    with torch.no_grad():
        assert model.text_features().shape[0] == len(model.config.feature_layers)


def test_an_image_size_other_than_the_models_exports_and_runs(model, tmp_path):
    path = export_onnx(model, tmp_path / "cnc48.onnx", image_size=48)
    detector = OnnxAnomalyDetector(path)
    processor = CNCImageProcessor(size=48)
    inputs = images(2, seed=7)
    pixel_values = processor(inputs, return_tensors="np")["pixel_values"]
    maps, scores = detector.run(pixel_values)
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(pixel_values))
    assert maps.shape == (2, 48, 48)
    assert np.abs(maps - out.anomaly_map.numpy()).max() < 1e-4 and np.abs(scores - out.image_score.numpy()).max() < 1e-4


def test_bad_inputs_are_value_errors_naming_them(onnx_file, tmp_path):
    detector = OnnxAnomalyDetector(onnx_file)
    with pytest.raises(ValueError, match=r"pixel_values: shape \(1, 3, 48, 48\); expected \(B, 3, 32, 32\)"):
        detector.run(np.zeros((1, 3, 48, 48), np.float32))
    with pytest.raises(ValueError, match=r"pixel_values: shape \(1, 4, 32, 32\)"):
        detector.run(np.zeros((1, 4, 32, 32), np.float32))
    with pytest.raises(ValueError, match=r"numpy array of shape \(8, 8, 5\)"):
        detector(np.zeros((8, 8, 5), np.uint8))
    with pytest.raises(ValueError, match="missing.png'?: no such file"):
        detector(str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match="batch_size: got 0; expected an int >= 1"):  # was [] or an IndexError
        detector(np.zeros((8, 8, 3), np.uint8), batch_size=0)
    with pytest.raises(ValueError, match="no such file"):
        OnnxAnomalyDetector(tmp_path / "nothing.onnx")


def _torch_free_site(root: Path) -> Path:
    """This environment's site-packages without torch, and cnc-hf laid out under its installed names."""
    site = root / "site"
    site.mkdir()
    packages = Path(sysconfig.get_paths()["purelib"])
    for entry in packages.iterdir():
        name = entry.name.lower()
        if name.startswith(("torch", "functorch", "__editable__", "_cnc", "cnc_hf", "open_clip")) or name.endswith(".pth"):
            continue
        (site / entry.name).symlink_to(entry)
    (site / "cnc_hf").mkdir()
    for entry in (REPO_ROOT / "cnc_hf").iterdir():
        (site / "cnc_hf" / entry.name).symlink_to(entry)
    (site / "cnc_hf" / "modeling").symlink_to(REPO_ROOT / "modeling")
    return site


def test_predict_onnx_runs_where_torch_is_not_installed(model, onnx_file, tmp_path):
    """`cnc-hf predict --onnx` in a Python whose site-packages has no torch (-S: no site dirs but ours)."""
    inputs = images(2, seed=11)
    paths = []
    for index, image in enumerate(inputs):
        paths.append(tmp_path / f"part{index}.png")
        PIL.Image.fromarray(image).save(paths[-1])
    expected = AnomalyMapPipeline(model=model, image_processor=CNCImageProcessor(size=32))([str(p) for p in paths])
    site = _torch_free_site(tmp_path)
    out = tmp_path / "pred"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(site)!r})
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("torch is importable here")
        from cnc_hf import cli
        code = cli.main(["predict", *{[str(p) for p in paths]!r}, "--onnx", {str(onnx_file)!r}, "--output_dir",
                         {str(out)!r}, "--no_progress"])
        assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
        raise SystemExit(code)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    done = subprocess.run([sys.executable, "-S", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    records = json.loads((out / "predictions.json").read_text())
    for record, want in zip(records, expected):
        assert abs(record["score"] - want["score"]) < 1e-4
        assert np.abs(np.load(record["map"]) - want["anomaly_map"]).max() < 1e-4
        assert record["is_anomaly"] == want["is_anomaly"]


def test_cnc_hf_export_command(model, tmp_path, capsys):
    save_model_dir(model, CNCImageProcessor(size=32), tmp_path / "model")
    assert cli.main(["export", "--model", str(tmp_path / "model"), "--output", str(tmp_path / "m.onnx")]) == 0
    assert "predict IMAGES --onnx" in capsys.readouterr().out
    detector = OnnxAnomalyDetector(tmp_path / "m.onnx")
    assert detector.threshold == 0.5 and detector.image_size == 32
    with pytest.raises(ValueError, match=r"\.onnx"):
        export_onnx(model, tmp_path / "m.bin")
