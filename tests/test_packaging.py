"""The wheel is a good citizen: only this project's names in site-packages, everything a user needs inside
(templates, accelerate configs, the evaluate module), and it works from a folder that holds its own
`training/` and `modeling/` packages (common in ML repositories), which must shadow nothing of ours."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from tiny_models import REPO_ROOT

pytestmark = pytest.mark.slow  # builds and installs the wheel

# What pyproject.toml builds from; copied so that the build leaves nothing behind in the checkout.
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "cnc_hf", "modeling", "training", "model_cards")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip wheel .` builds, offline: the test environment's setuptools, no build isolation."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in SOURCES:
        if (REPO_ROOT / name).is_dir():
            shutil.copytree(REPO_ROOT / name, source / name, ignore=ignore)
        else:
            source.mkdir(exist_ok=True)
            shutil.copy(REPO_ROOT / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "--no-index", "-w", str(root / "dist"), str(source)], capture_output=True, text=True)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-3000:]
    (path,) = (root / "dist").glob("cnc_hf-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel installed (not editable) into a folder of its own, as PYTHONPATH will see it."""
    site = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                           str(site), str(wheel)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return site


def test_the_wheel_installs_only_this_projects_names(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    packages = {name for name in top_level if not name.endswith(".dist-info")}
    assert packages == {"cnc_hf", "cnc_hf_train"}, sorted(top_level)
    # The remote-code files, the templates, the configs of the README's multi-GPU command, the evaluate module.
    for expected in ("cnc_hf/modeling/modeling_cnc.py", "cnc_hf/modeling/pipeline_cnc.py",
                     "cnc_hf/model_cards/cnc-mvtec.md", "cnc_hf/model_cards/generic.md",
                     "cnc_hf/evaluate_metric/cnc_anomaly_metrics.py", "cnc_hf_train/train.py",
                     "cnc_hf_train/configs/multi_gpu.yaml", "cnc_hf_train/configs/ddp_cpu_2proc.yaml",
                     "cnc_hf_train/bench_gpu.sh"):
        assert expected in names, expected
    assert not [n for n in names if n.startswith("tests/") or "/tests/" in n]
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "License-Expression: Apache-2.0" in text
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "cnc-hf = cnc_hf.cli:main" in entry_points


def _user_project(root: Path) -> Path:
    """A user's folder with its own `training` and `modeling` packages, each saying whose it is."""
    for name in ("training", "modeling"):
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text(f"OWNER = 'user'\nCNCConfig = None\n")
        (root / name / "train.py").write_text("raise SystemExit('the user training/train.py ran')\n")
    return root


def test_installed_wheel_works_beside_a_users_training_and_modeling_packages(installed, tmp_path):
    project = _user_project(tmp_path / "project")
    env = {**os.environ, "PYTHONPATH": str(installed)}
    script = textwrap.dedent(
        """
        import cnc_hf, cnc_hf.hub, cnc_hf_train.train, training, modeling
        print(cnc_hf.__file__, cnc_hf.CNCConfig.__module__, cnc_hf_train.train.__file__)
        print(*(cnc_hf.hub.template_path(n) for n in cnc_hf.hub.TEMPLATES))
        print(cnc_hf_train.train.CONFIGS_DIR / "multi_gpu.yaml")
        print(training.OWNER, modeling.OWNER)
        """
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=project, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    (package, config_module, train_file), templates, (config_file,), owners = (
        line.split() for line in run.stdout.strip().splitlines())
    assert package.startswith(str(installed)) and train_file.startswith(str(installed))
    assert config_module == "cnc_hf.modeling.configuration_cnc"
    assert all(p.startswith(str(installed)) and Path(p).is_file() for p in templates), templates
    assert config_file.startswith(str(installed)) and Path(config_file).is_file()
    assert owners == ["user", "user"]  # ours shadows nothing of theirs either


@pytest.mark.parametrize("command", [["{script}", "train", "--help"], ["-m", "cnc_hf_train.train", "--help"]],
                         ids=["cnc-hf train", "python -m cnc_hf_train.train"])
def test_train_help_runs_from_a_folder_with_its_own_training_package(installed, tmp_path, command):
    project = _user_project(tmp_path / "project")
    script = installed / "bin" / "cnc-hf"
    assert script.is_file()  # the console script of [project.scripts]
    argv = [sys.executable] + [part.format(script=script) for part in command]
    run = subprocess.run(argv, cwd=project, env={**os.environ, "PYTHONPATH": str(installed)},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "--dataset" in run.stdout and "--output_dir" in run.stdout
    assert str(installed / "cnc_hf_train" / "configs") in run.stdout.replace("\n", "")
