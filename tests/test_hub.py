"""Hub publishing, offline: model cards (templates, round trip through ModelCard.load), push with the
client patched at its boundary, refusal of unsafe/incomplete dirs, and loading by Hub id from the cache."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from huggingface_hub import HfApi, ModelCard

import cnc_hf.hub as hub
import cnc_hf.hub_cli as hub_cli
from cnc_hf.pipeline import save_model_dir
from cnc_hf.modeling import CNCModel
from cnc_hf.modeling.image_processing_cnc import CNCImageProcessor

from tiny_models import BLOCK_CNC_PACKAGES, REPO_ROOT, tiny_cnc_config

CODE_FILES = ["anomaly_map.py", "category.py", "configuration_cnc.py", "decision.py", "decoder.py", "fusion.py", "heatmap.py", "image_processing_cnc.py",
              "joint_space.py", "losses.py", "modeling_cnc.py", "moe.py", "normality.py", "pipeline_cnc.py", "prompts.py"]
MODEL_FILES = ["model.safetensors", "config.json", "preprocessor_config.json", *CODE_FILES]
CATEGORY_VALUES = {"image_auroc": 0.912, "image_ap": 0.834, "image_f1_max": 0.771, "pixel_auroc": 0.9456,
                   "pixel_ap": 0.3121, "pixel_f1_max": 0.3555, "aupro": 0.8633}


def fake_metrics() -> dict:
    """The cnc_hf.metrics layout (fractions) plus what training adds (threshold details, run summary)."""
    bottle = dict(CATEGORY_VALUES)
    cable = {k: v - 0.1 for k, v in CATEGORY_VALUES.items()}
    mean = {k: (bottle[k] + cable[k]) / 2 for k in CATEGORY_VALUES}
    return {**{k: v - 0.01 for k, v in mean.items()}, "per_category": {"bottle": bottle, "cable": cable}, "mean": mean,
            "threshold": {"value": 1.25, "method": "0.99 quantile of 4 held-out normal training images"},
            "training": {"dataset": "mvtec", "world_size": 1, "mean_epoch_seconds": 2.5}}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: everything here must stay offline."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = CNCModel(tiny_cnc_config(threshold=1.25)).eval()
    return save_model_dir(model, CNCImageProcessor(size=32), tmp_path_factory.mktemp("saved") / "model")


@pytest.fixture
def model_dir(saved_model, tmp_path) -> Path:
    """A fresh copy of a finished training output dir, with the leftovers training leaves around."""
    path = tmp_path / "cnc-run"
    shutil.copytree(saved_model, path)
    (path / "metrics.json").write_text(json.dumps(fake_metrics()))
    (path / "metrics.md").write_text("| table |")
    (path / "train_log.jsonl").write_text("{}\n")
    (path / "notes.py").write_text("print('my scratch script')\n")
    for folder, name in (("checkpoints/checkpoint_0", "optimizer.bin"), ("runs/tb", "events.out"),
                         ("heatmaps/bottle", "000.png")):
        (path / folder).mkdir(parents=True)
        (path / folder / name).write_bytes(b"x")
    PIL.Image.new("RGB", (12, 4), (200, 0, 0)).save(path / "heatmaps" / "bottle" / "000.png")
    return path


class RecordingHub:
    """Stands in for the Hub at HfApi's boundary: records create_repo / create_commit calls."""

    def __init__(self, monkeypatch):
        self.repos, self.commits = [], []
        recorder = self

        def create_repo(api, repo_id, **kwargs):
            recorder.repos.append({"repo_id": repo_id, **kwargs})
            return f"https://huggingface.co/{repo_id}"

        def create_commit(api, repo_id, operations, **kwargs):
            recorder.commits.append({"repo_id": repo_id, "operations": list(operations), **kwargs})
            return "fake-commit-info"

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)


# --------------------------------------------------------------------------- templates
def test_templates_are_chosen_by_dataset_and_found_in_the_repo():
    assert hub.templates_dir() == REPO_ROOT / "model_cards"
    cases = {"mvtec": "mvtec", "/data/mvtec_anomaly_detection": "mvtec", "org/MVTec-AD": "mvtec", "visa": "visa",
             "/data/VisA_20220922": "visa", "demo": "generic", None: "generic", "advisable": "generic"}
    for dataset, name in cases.items():
        assert hub.template_name_for(dataset) == name, dataset
    assert hub.template_path(dataset="visa").name == "cnc-visa.md"
    assert hub.template_path("generic", dataset="mvtec").name == "generic.md"  # explicit template wins
    with pytest.raises(ValueError, match="template"):
        hub.template_path("no-such-template")


# --------------------------------------------------------------------------- model cards
def test_card_round_trip_through_modelcard_load(model_dir):
    training_args = {"dataset": "mvtec", "clip_model": "openai/clip-vit-large-patch14-336", "epochs": 250,
                     "batch_size": 8, "lr": 0.001, "output_dir": "/home/me/secret-run", "data_dir": "/data/mvtec",
                     "seed": 0}
    path = hub.write_model_card(model_dir, training_args=training_args, repo_id="org/cnc-mvtec")
    assert path == model_dir / "README.md"
    card = ModelCard.load(path)
    data = card.data
    # "other": the Hub's tag for a task outside its list (no widget assumes another output format).
    assert data.library_name == "transformers" and data.pipeline_tag == "other"
    assert data.license == "cc-by-nc-sa-4.0" and "image-anomaly-detection" in data.tags
    assert data.base_model == "openai/clip-vit-large-patch14-336"
    assert data.datasets is None  # MVTec AD from a local folder has no Hub id; the text names it
    index = data.to_dict()["model-index"]
    assert index[0]["name"] == "cnc-mvtec"
    results = {(r.dataset_config, r.metric_name): r for r in data.eval_results}
    assert len(results) == 3 * 7  # mean + 2 categories, 7 metrics each
    assert results[("bottle", "I-AUROC")].metric_value == 91.2
    assert results[("bottle", "P-AP")].metric_value == 31.21
    assert results[("bottle", "AUPRO")].metric_type == "aupro"
    assert results[(None, "P-AUROC")].metric_value == pytest.approx(round(100 * (0.9456 + 0.8456) / 2, 2))
    assert results[("cable", "I-F1max")].metric_value == pytest.approx(67.1)
    assert all(r.dataset_type == "mvtec_ad" and r.dataset_split == "test" for r in data.eval_results)
    # The paper's numbers are in the text, labelled, and never in the model's metadata.
    assert "the paper's numbers (not this model's)" in card.text
    assert "| **Mean** | 98.6 | 98.0 | 93.0 | 99.3 | 56.4 |" in card.text
    assert 98.6 not in {r.metric_value for r in data.eval_results}
    # Measured table, threshold, hyperparameters, usage with the repo id, heat map, citation.
    assert "| bottle | 91.2 | 94.6 | 86.3 | 83.4 | 31.2 |" in card.text
    assert "0.99 quantile of 4 held-out normal training images" in card.text and "`1.25`" in card.text
    assert "| epochs | 250 |" in card.text and "| tapped layers | [1, 2, 3] |" in card.text
    assert 'model="org/cnc-mvtec", trust_remote_code=True' in card.text
    assert "![Input and anomaly heat map](heatmap_example.png)" in card.text
    assert (model_dir / "heatmap_example.png").is_file()  # taken from heatmaps/ written by training
    assert "Cross-modal Normality Constraint for Unsupervised Multi-class Anomaly Detection" in card.text
    assert "# cnc-mvtec: CNC anomaly detector for MVTec AD" in card.text
    # Machine-specific arguments are not published.
    saved_args = json.loads((model_dir / "training_args.json").read_text())
    assert "output_dir" not in saved_args and "data_dir" not in saved_args and saved_args["epochs"] == 250
    assert "secret-run" not in path.read_text()


def test_card_rerenders_from_saved_files_and_other_templates(model_dir):
    hub.write_model_card(model_dir, training_args={"dataset": "visa", "epochs": 3})
    card = ModelCard.load(model_dir / "README.md")  # metrics.json and training_args.json read back
    assert card.data.license == "cc-by-4.0" and "Table 3 of the CNC paper" in card.text
    assert {r.dataset_type for r in card.data.eval_results} == {"visa"}
    hub.write_model_card(model_dir, dataset="my_textures", metrics={}, template=None)
    generic = ModelCard.load(model_dir / "README.md")
    assert generic.data.license == "apache-2.0" and "**my_textures**" in generic.text
    assert generic.data.eval_results is None and "Not evaluated" in generic.text
    assert "model-index" not in generic.data.to_dict()
    assert "93.2 / 98.5 / 91.4 / 92.6 / 37.8" in generic.text  # the paper's, labelled as such
    custom = model_dir / "custom.md"
    custom.write_text("---\n{{ card_data }}\n---\n# {{ model_name }} by me\n")
    hub.write_model_card(model_dir, template=custom, repo_id="me/x")
    assert ModelCard.load(model_dir / "README.md").text.strip() == "# x by me"


def test_card_metadata_names_hub_datasets_and_base_models_and_says_what_demo_and_folder_data_are(model_dir):
    """`datasets:` holds Hub dataset ids only (the Hub links them); `base_model:` the CLIP checkpoint when
    it is a Hub id; the demo and folder cases say in the text what the data were."""
    hub.write_model_card(model_dir, metrics={}, training_args={"dataset": "org/mvtec-ad-parquet",
                                                                "clip_model": "openai/clip-vit-base-patch16"})
    card = ModelCard.load(model_dir / "README.md")
    assert card.data.datasets == ["org/mvtec-ad-parquet"] and card.data.base_model == "openai/clip-vit-base-patch16"
    assert "CNC anomaly detector for MVTec AD" in card.text  # the template still follows the data set's name
    hub.write_model_card(model_dir, dataset="mvtec", dataset_id="me/my-mvtec-copy")
    assert ModelCard.load(model_dir / "README.md").data.datasets == ["me/my-mvtec-copy"]

    local_clip = model_dir.parent / "random_clip"
    local_clip.mkdir()
    hub.write_model_card(model_dir, metrics={}, training_args={"dataset": "demo", "clip_model": str(local_clip)})
    demo = ModelCard.load(model_dir / "README.md")
    assert demo.data.datasets is None and demo.data.base_model is None  # a local CLIP: its origin is unknown
    assert "| CLIP backbone | random_clip |" in demo.text and "/" + local_clip.parent.name not in demo.text
    assert "**cnc-hf demo textures**" in demo.text and "scikit-image" in demo.text
    hub.write_model_card(model_dir, metrics={}, training_args={"dataset": "folder"})
    folder = ModelCard.load(model_dir / "README.md")
    assert "**private image folders**" in folder.text and "not published with the model" in folder.text
    assert folder.data.pipeline_tag == "other" and folder.data.license == "apache-2.0"


def test_card_without_threshold_says_so(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    config["threshold"] = None
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "metrics.json").unlink()
    text = hub.write_model_card(model_dir, dataset="mvtec").read_text()
    assert "not calibrated: `is_anomaly` is None unless you pass `threshold=`" in text
    assert "Not evaluated" in text


def test_card_renders_an_example_heat_map_from_an_image(model_dir):
    shutil.rmtree(model_dir / "heatmaps")
    hub.write_model_card(model_dir, dataset="mvtec")
    assert "No example image was rendered" in (model_dir / "README.md").read_text()
    image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    hub.write_model_card(model_dir, dataset="mvtec", example_image=image)
    from cnc_hf.figures import _PAD

    panel = PIL.Image.open(model_dir / "heatmap_example.png")
    assert panel.width == 2 * 288 + 2 * _PAD and panel.height > 288  # the labelled row: input | heat map, caption
    # The input tile (under the column headers) is the image itself, resized: the same picture, not another one.
    tile = np.asarray(panel)[16 + 2 * _PAD:16 + 2 * _PAD + 288, _PAD:_PAD + 288].astype(float)
    expected = np.asarray(PIL.Image.fromarray(image).resize((288, 288), PIL.Image.Resampling.BILINEAR)).astype(float)
    assert np.abs(tile - expected).mean() < 2
    assert "![Input and anomaly heat map](heatmap_example.png)" in (model_dir / "README.md").read_text()


def test_metrics_in_percent_are_refused(model_dir):
    metrics = fake_metrics()
    metrics["per_category"]["bottle"]["image_auroc"] = 91.2
    with pytest.raises(ValueError, match=r"\['per_category'\]\['bottle'\]\['image_auroc'\].*fraction"):
        hub.write_model_card(model_dir, metrics=metrics)


# --------------------------------------------------------------------------- push
def test_push_uploads_exactly_the_files_that_belong(model_dir, monkeypatch):
    recorder = RecordingHub(monkeypatch)
    hub.write_model_card(model_dir, training_args={"dataset": "mvtec", "epochs": 2})
    result = hub.upload_model_dir(model_dir, "org/cnc-mvtec", private=True, token="hf_dummy", create_pr=True)
    assert result == "fake-commit-info"
    assert recorder.repos == [{"repo_id": "org/cnc-mvtec", "repo_type": "model", "private": True, "exist_ok": True}]
    (commit,) = recorder.commits
    uploaded = sorted(op.path_in_repo for op in commit["operations"])
    expected = sorted(MODEL_FILES + ["README.md", "metrics.json", "training_args.json", "heatmap_example.png"])
    assert uploaded == expected
    assert commit["create_pr"] is True and commit["repo_type"] == "model"
    for op in commit["operations"]:  # each operation points at the file in the model dir
        assert Path(op.path_or_fileobj) == model_dir / op.path_in_repo
    # The card was refreshed for the repo id before the upload.
    assert 'model="org/cnc-mvtec"' in (model_dir / "README.md").read_text()


def test_push_without_optional_files_and_dry_run(saved_model, tmp_path, monkeypatch):
    recorder = RecordingHub(monkeypatch)
    bare = tmp_path / "bare"
    shutil.copytree(saved_model, bare)
    files = hub.upload_model_dir(bare, "cnc-mini", dry_run=True)
    assert sorted(files) == sorted(MODEL_FILES + ["README.md"])  # the card it would write, listed
    assert recorder.repos == [] and recorder.commits == []
    assert not (bare / "README.md").exists()  # a dry run writes nothing
    assert "Not evaluated" in hub.build_model_card(bare, repo_id="cnc-mini").text  # generic card, no metrics


def _snapshot(folder: Path) -> dict:
    """Every file and folder under `folder`: name -> (mtime_ns, bytes), folders with None for bytes."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("with_card", [False, True])
def test_dry_run_changes_nothing_on_disk(model_dir, monkeypatch, capsys, with_card):
    """`--dry_run` renders the card in memory and lists what a real push would send (the card it would
    write and the heat-map panel it would copy included), and leaves the folder byte for byte as it was."""
    recorder = RecordingHub(monkeypatch)
    if with_card:
        hub.write_model_card(model_dir, training_args={"dataset": "mvtec", "epochs": 2}, repo_id="old/name")
    before = _snapshot(model_dir)
    files = hub.upload_model_dir(model_dir, "org/cnc-mvtec", dry_run=True)
    assert hub_cli.main(["push", str(model_dir), "org/cnc-mvtec", "--dry_run", "--space", "org/cnc-demo"]) == 0
    assert _snapshot(model_dir) == before
    assert recorder.repos == [] and recorder.commits == []
    assert {"README.md", "heatmap_example.png", "metrics.json"} <= set(files)
    assert f"would upload {len(files)} files" in capsys.readouterr().out
    # A real push then sends exactly the files the dry run listed.
    hub.upload_model_dir(model_dir, "org/cnc-mvtec")
    (commit,) = recorder.commits
    assert [op.path_in_repo for op in commit["operations"]] == files


def test_push_to_hub_is_a_deprecated_name_for_upload_model_dir(saved_model, tmp_path, monkeypatch):
    RecordingHub(monkeypatch)
    bare = tmp_path / "bare"
    shutil.copytree(saved_model, bare)
    with pytest.warns(FutureWarning, match="upload_model_dir"):
        files = hub.push_to_hub(bare, "cnc-mini", dry_run=True)
    assert files == hub.upload_model_dir(bare, "cnc-mini", dry_run=True)
    with pytest.warns(FutureWarning, match="hub_cli.main"):
        assert hub.main is hub_cli.main


@pytest.mark.parametrize("name", ["pytorch_model.bin", "extra.pt", "state.pkl", "weights.pth"])
def test_push_refuses_pickle_files(model_dir, monkeypatch, name):
    recorder = RecordingHub(monkeypatch)
    (model_dir / name).write_bytes(b"\x80\x04pickle")
    with pytest.raises(hub.ModelDirError, match=f"pickle-format files \\['{name}'\\]"):
        hub.upload_model_dir(model_dir, "org/cnc-mvtec")
    assert recorder.repos == [] and recorder.commits == []
    assert not (model_dir / "README.md").exists()  # refused before anything was written


@pytest.mark.parametrize("breakage, message", [
    (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
    (lambda d: (d / "moe.py").unlink(), "code file moe.py is missing"),
    (lambda d: (d / "pipeline_cnc.py").unlink(), "code file pipeline_cnc.py is missing"),
    (lambda d: (d / "preprocessor_config.json").unlink(), "no preprocessor_config.json"),
    (lambda d: _edit_config(d, custom_pipelines=None), "no custom_pipelines entry"),
    (lambda d: _edit_config(d, model_type="clip"), "expected 'cnc'"),
    (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
])
def test_push_refuses_incomplete_dirs(model_dir, monkeypatch, breakage, message):
    recorder = RecordingHub(monkeypatch)
    breakage(model_dir)
    with pytest.raises(hub.ModelDirError, match=message):
        hub.upload_model_dir(model_dir, "org/cnc-mvtec")
    assert recorder.repos == []


def _edit_config(model_dir: Path, **changes) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config.update(changes)
    (model_dir / "config.json").write_text(json.dumps(config))


def test_push_checks_the_repo_id(model_dir):
    for bad in ("", "a/b/c", "has space/x"):
        with pytest.raises(ValueError, match="repo_id"):
            hub.upload_model_dir(model_dir, bad, dry_run=True)


def test_push_command(model_dir, monkeypatch, capsys):
    from cnc_hf import cli

    recorder = RecordingHub(monkeypatch)
    assert hub_cli.main(["push", str(model_dir), "org/cnc-mvtec", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "would upload 21 files" in out and "model.safetensors" in out and "checkpoints" not in out
    assert cli.main(["push", str(model_dir), "org/cnc-mvtec", "--private", "--token", "hf_x"]) == 0
    assert recorder.repos[0]["private"] is True and len(recorder.commits) == 1
    assert "fake-commit-info" in capsys.readouterr().out
    # --space: the Space files too, listed on a dry run, nothing sent
    commits = len(recorder.commits)
    assert hub_cli.main(["push", str(model_dir), "org/cnc-mvtec", "--dry_run", "--space", "org/cnc-demo"]) == 0
    out = capsys.readouterr().out
    assert "Space org/cnc-demo" in out and "app.py" in out and "requirements.txt" in out
    assert len(recorder.commits) == commits
    (model_dir / "pytorch_model.bin").write_bytes(b"x")
    assert hub_cli.main(["push", str(model_dir), "org/cnc-mvtec"]) == 1
    assert "pickle-format" in capsys.readouterr().err
    assert hub_cli.main(["card", str(model_dir)]) == 0 and (model_dir / "README.md").is_file()
    assert cli.main(["card", str(model_dir), "--dataset", "visa"]) == 0
    assert "CNC anomaly detector for VisA" in (model_dir / "README.md").read_text()


# --------------------------------------------------------------------------- loading by Hub id
def test_uncached_id_gives_a_clear_error(tmp_path):
    with pytest.raises(hub.ModelNotAvailableError, match=r"'org/nothing-here' is not a local directory and is not "
                                                          r"in the Hugging Face cache .*offline"):
        hub.load_model("org/nothing-here", cache_dir=str(tmp_path), local_files_only=True)
    with pytest.raises(OSError):  # a missing local dir keeps transformers' own error
        hub.load_model(tmp_path / "no-such-dir")


def test_hub_ids_load_from_the_cache_offline(saved_model, tmp_path):
    """`org/cnc-mvtec` from a Hub cache (the layout huggingface_hub writes), HF_HUB_OFFLINE=1: remote-code
    pipeline in a process without cnc-hf, then CNCModel / load_model with it; an uncached id fails clearly."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--org--cnc-mvtec"
    shutil.copytree(saved_model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    image = np.random.default_rng(0).integers(0, 256, (30, 44, 3), dtype=np.uint8)
    PIL.Image.fromarray(image).save(tmp_path / "part.png")
    script = BLOCK_CNC_PACKAGES + textwrap.dedent(
        f"""
        from transformers import pipeline
        pipe = pipeline("image-anomaly-detection", model="org/cnc-mvtec", trust_remote_code=True)
        assert type(pipe).__module__.startswith("transformers_modules"), type(pipe).__module__
        remote = pipe({str(tmp_path / "part.png")!r})
        print("REMOTE", remote["score"], remote["anomaly_map"].shape)
        sys.meta_path.remove(blocker)

        import torch
        from cnc_hf.hub import ModelNotAvailableError, load_model, load_pipeline
        from cnc_hf.modeling import CNCModel
        model = CNCModel.from_pretrained("org/cnc-mvtec").eval()
        assert type(load_model("org/cnc-mvtec")) is CNCModel
        from cnc_hf.modeling.image_processing_cnc import CNCImageProcessor
        from PIL import Image
        processor = CNCImageProcessor.from_pretrained("org/cnc-mvtec")
        with torch.no_grad():
            score = float(model(**processor(Image.open({str(tmp_path / "part.png")!r}))).image_score[0])
        print("LOCAL", score)
        local_pipe = load_pipeline("org/cnc-mvtec")
        print("LOCALPIPE", type(local_pipe).__module__, local_pipe({str(tmp_path / "part.png")!r})["score"])
        for load in (load_model, lambda i: load_pipeline(i, trust_remote_code=True)):
            try:
                load("org/not-cached")
            except ModelNotAvailableError as err:
                print("ERROR", err)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache"),
           "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("HF_HOME", None)
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=180)
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in run.stdout.splitlines() if " " in line}
    assert "LOCALPIPE" in lines, run.stderr[-3000:]
    remote_score = float(lines["REMOTE"].split()[0])
    assert lines["REMOTE"].endswith("(30, 44)")
    assert remote_score == pytest.approx(float(lines["LOCAL"]), abs=1e-5)
    module, local_pipe_score = lines["LOCALPIPE"].split()
    assert module == "cnc_hf.modeling.pipeline_cnc" and float(local_pipe_score) == pytest.approx(remote_score, abs=1e-5)
    errors = [line for line in run.stdout.splitlines() if line.startswith("ERROR ")]
    assert len(errors) == 2, run.stdout + run.stderr[-2000:]
    for error in errors:
        assert "'org/not-cached' is not a local directory and is not in the Hugging Face cache" in error
        assert "offline" in error and "hf download org/not-cached" in error


# --------------------------------------------------------------------------- errors that say what happened
def test_push_with_the_hub_unreachable_is_one_clear_error(model_dir, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # a closed loopback port: refused at once
    assert hub_cli.main(["push", str(model_dir), "org/cnc-mvtec", "--token", "hf_dummy"]) == 2
    err = capsys.readouterr().err
    assert "could not reach the Hugging Face Hub (http://127.0.0.1:9)" in err and "--dry_run" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_a_mistyped_local_model_folder_fails_at_once_without_the_network(model_dir, tmp_path, monkeypatch, capsys):
    import time

    from PIL import Image

    from cnc_hf import cli

    (tmp_path / "demo_output" / "model").mkdir(parents=True)
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    assert cli.main(["predict", str(image), "--model", "demo_output/modle"]) == 2
    assert cli.main(["evaluate", "--model", "./nowhere", "--dataset", "mvtec", "--data_dir", "x"]) == 2
    assert time.monotonic() - start < 10  # no Hub retries
    err = capsys.readouterr().err
    assert "--model demo_output/modle: no such folder; folders in demo_output: model" in err
    assert "--model ./nowhere: no such folder" in err
    for hub_id in ("org/name", "name"):  # Hub ids are left to the Hub
        hub.check_local_model_argument(hub_id)


def test_a_cached_hub_id_is_used_even_beside_a_local_folder_of_its_org(tmp_path, monkeypatch):
    (tmp_path / "openai").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(hub.ModelNotAvailableError, match="to use the Hub repo of that name"):
        hub.check_local_model_argument("openai/clip-vit-base-patch32")
    monkeypatch.setattr(hub, "_in_hub_cache", lambda repo_id: True)
    hub.check_local_model_argument("openai/clip-vit-base-patch32")  # cached: the Hub repo is meant


# --------------------------------------------------------------------------- module structure
def _imports(path: Path, package: str) -> set[str]:
    """The cnc_hf modules `path` imports, at module level or inside functions. Imports under
    `if __name__ == "__main__"` and in a module `__getattr__` (deprecated names) are left out: they run
    only once the module is fully imported, so they cannot close a circle."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {id(n) for node in ast.walk(tree)
               if (isinstance(node, ast.If) and "__main__" in ast.unparse(node.test))
               or (isinstance(node, ast.FunctionDef) and node.name == "__getattr__")
               for n in ast.walk(node)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return names


def test_the_package_has_no_import_circle():
    """app -> hub -> space -> app was a circle; the command line now lives in hub_cli, the only module
    that needs the upload, the card and the Space together."""
    root = REPO_ROOT / "cnc_hf"
    modules = {}
    for path in root.rglob("*.py"):
        name = ".".join(("cnc_hf",) + path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = {m for m in _imports(path, package) if m in modules and m != name}

    def circle_from(start, seen=()):
        for nxt in sorted(graph[start]):
            if nxt in seen:
                return [*seen[seen.index(nxt):], nxt]
            found = circle_from(nxt, (*seen, nxt))
            if found:
                return found
        return None

    for name in sorted(graph):
        circle = circle_from(name, (name,))
        assert circle is None, " -> ".join(circle)
    assert "cnc_hf.space" not in graph["cnc_hf.hub"] and "cnc_hf.hub" not in graph["cnc_hf.model_card"]


# --------------------------------------------------------------------------- the dataset card
def test_converted_dataset_card_is_a_datasetcard_with_license_configs_and_dataset_info(tmp_path):
    """The parquet folder's README.md: huggingface_hub's DatasetCard, with the source's license, the
    parquet files per split and `dataset_info` in the shape `datasets` writes; and it still loads."""
    from datasets import load_dataset
    from huggingface_hub import DatasetCard

    from cnc_hf.data import convert_to_parquet, make_demo_dataset
    from cnc_hf.data.common import FEATURES
    from cnc_hf.data.mvtec import load_mvtec_ad

    root = make_demo_dataset(tmp_path / "demo", seed=0, n_train=2, n_test_good=1, n_test_defect=1)
    dataset = load_mvtec_ad(root, ["brick"])
    out = convert_to_parquet(dataset, tmp_path / "parquet", root=root, source_name="cnc-hf demo textures")
    card = DatasetCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "cc0-1.0" and data["pretty_name"] == "cnc-hf demo textures (cnc-hf format)"
    assert data["configs"] == [{"config_name": "default", "data_files": [
        {"split": "train", "path": "data/train-*.parquet"}, {"split": "test", "path": "data/test-*.parquet"}]}]
    info = data["dataset_info"]
    assert [f["name"] for f in info["features"]] == list(FEATURES)
    assert {s["name"]: s["num_examples"] for s in info["splits"]} == {"train": 2, "test": len(dataset["test"])}
    assert info["download_size"] == sum(p.stat().st_size for p in (out / "data").glob("*.parquet"))
    assert "License: `cc0-1.0`" in card.text
    loaded = load_dataset(str(out), cache_dir=str(tmp_path / "cache"))
    assert loaded["test"].features == FEATURES and len(loaded["train"]) == 2
    for source, license in (("MVTec AD", "cc-by-nc-sa-4.0"), ("VisA", "cc-by-4.0"), ("image folders (x)", None)):
        again = convert_to_parquet(dataset, tmp_path / source, root=root, source_name=source)
        assert DatasetCard.load(again / "README.md").data.to_dict().get("license") == license
