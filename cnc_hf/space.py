"""A Hugging Face Space that tries a CNC model in the browser: the files, and their upload.

    write_space_files("org/cnc-mvtec", "space/")          # app.py, cnc_app.py, requirements.txt, README.md, examples/
    push_space("org/cnc-mvtec", "org/cnc-mvtec-demo")     # the same, uploaded to a Space repo

cnc-hf is not on PyPI, so the Space does not install it. The Space gets:
- `cnc_app.py`: a verbatim copy of `cnc_hf/app.py`, which imports only gradio, numpy, PIL and
  transformers at module level;
- `app.py`: a 3-line launcher that builds that app with `trust_remote_code=True`, so the
  model's own code (`pipeline_cnc.py`, `modeling_cnc.py`, ... saved in the model repo by
  `cnc_hf.pipeline.save_model_dir`) does the work: one code path, the one the model card shows;
- `requirements.txt`: torch, transformers and the rest of what that code imports (gradio itself
  comes from the README's `sdk_version`, as Spaces install it);
- `README.md`: the Space front matter (sdk: gradio, app_file, models: [the model id], ...);
- `examples/`: a few demo-dataset test images (or your own), shown as clickable examples.

The model is referenced by its Hub id. A local model dir is refused unless `bundle_model=True`,
which copies the model's files into `model/` inside the Space: fine for a small model (and for
testing the Space offline), a poor idea for a 1.7 GB ViT-L one (push the model, use its id).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from cnc_hf.hub_ids import check_repo_id, is_hub_id

# The Gradio version this app was tested with; used when gradio is not installed here.
TESTED_GRADIO_VERSION = "6.31.0"
SPACE_APP = "app.py"
VENDORED_APP = "cnc_app.py"
VENDORED_FIGURES = "cnc_figures.py"  # cnc_hf/figures.py
VENDORED_HEATMAP = "cnc_heatmap.py"  # cnc_hf/modeling/heatmap.py
BUNDLED_MODEL_DIR = "model"
EXAMPLES_DIR = "examples"
REQUIREMENTS = [
    # What the model's remote code and cnc_app.py import (gradio is the Space SDK's own).
    "torch>=2.4",
    "transformers>=5.15,<6",  # as cnc-hf's own floor (pyproject.toml)
    "safetensors>=0.4",
    "numpy",
    "pillow",
]


def _gradio_version() -> str:
    try:
        from importlib.metadata import version

        return version("gradio")
    except Exception:  # noqa: BLE001  not installed: say the version we tested with
        return TESTED_GRADIO_VERSION


def _launcher(model_ref: str, title: str, with_examples: bool) -> str:
    examples = repr(EXAMPLES_DIR) if with_examples else "None"
    return (
        "# Hugging Face Space for a CNC anomaly detector. cnc_app.py is cnc_hf/app.py; the model's own code runs.\n"
        "from cnc_app import build_app\n"
        f"build_app({model_ref!r}, examples={examples}, trust_remote_code=True, title={title!r}).launch()\n"
    )


def _readme(model_id: str | None, title: str, sdk_version: str, short_description: str) -> str:
    from huggingface_hub import SpaceCardData

    data = SpaceCardData(
        title=title, emoji="🔍", colorFrom="blue", colorTo="red", sdk="gradio", sdk_version=sdk_version,
        app_file=SPACE_APP, pinned=False, license="apache-2.0", short_description=short_description,
        models=[model_id] if model_id else None,
        tags=["anomaly-detection", "image-anomaly-detection", "industrial-inspection", "cnc"],
    )
    model_line = (f"the model [`{model_id}`](https://huggingface.co/{model_id})" if model_id
                  else f"the model bundled in `{BUNDLED_MODEL_DIR}/`")
    return (
        f"---\n{data.to_yaml()}\n---\n\n"
        f"# {title}\n\n"
        f"Try {model_line}, a CNC detector (Cross-modal Normality Constraint, AAAI 2025), in the browser: "
        "upload one or several images to get each image's anomaly score, the decision at the model's calibrated "
        "threshold (a slider changes it), the heat-map overlay and the raw anomaly map.\n\n"
        "The Space runs the model's own code (`trust_remote_code=True`), the same code as\n\n"
        "```python\nfrom transformers import pipeline\n"
        f"detector = pipeline(\"image-anomaly-detection\", model=\"{model_id or BUNDLED_MODEL_DIR}\", "
        "trust_remote_code=True)\n```\n\n"
        f"`{VENDORED_APP}` is `cnc_hf/app.py` from cnc-hf; locally: `pip install -e \".[app]\"` in a cnc-hf "
        f"checkout, then `cnc-hf app --model {model_id or 'MODEL_DIR'}`.\n"
    )


def write_space_files(
    model_id_or_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    title: str = "CNC anomaly detection",
    examples: Any = None,
    bundle_model: bool = False,
    short_description: str = "Find and localize defects in images (CNC, AAAI 2025)",
) -> list[Path]:
    """Write the files of a Gradio Space for a CNC model into `out_dir`; return their paths.

    `model_id_or_dir`: a Hub model id (`org/name`), or a local model dir with `bundle_model=True`.
    `examples`: a folder or list of images to copy into `examples/`; None: 6 demo-dataset test
    images (`cnc_hf.app.demo_examples`); False or []: no examples.
    Existing files of the same names are overwritten; nothing else in `out_dir` is touched.
    """
    out = Path(out_dir)
    if out.is_file():
        raise ValueError(f"out_dir: {out} is a file; expected a directory")
    model_id, model_ref, written = _model_reference(os.fspath(model_id_or_dir), out, bundle_model)
    if len(short_description) > 60:  # the Hub rejects longer ones
        raise ValueError(f"short_description: {len(short_description)} characters; the Hub allows 60")

    out.mkdir(parents=True, exist_ok=True)
    example_files = _copy_examples(examples, out)
    written += example_files + _copy_vendored_code(out)
    contents = {
        SPACE_APP: _launcher(model_ref, title, bool(example_files)),
        "requirements.txt": "\n".join(REQUIREMENTS) + "\n",
        "README.md": _readme(model_id, title, _gradio_version(), short_description),
    }
    for file, text in contents.items():
        (out / file).write_text(text, encoding="utf-8")
        written.append(out / file)
    return written


def _model_reference(name: str, out: Path, bundle_model: bool) -> tuple[str | None, str, list[Path]]:
    """(Hub model id or None, what the launcher loads, files written): a Hub id as is, or a local model dir
    copied into `out/model/` (only with `bundle_model`)."""
    local = Path(name).expanduser()
    if not local.is_dir():  # a Hub id, unless a folder of that name is here
        if is_hub_id(name):
            return name, name, []
        raise ValueError(f"model_id_or_dir: {name!r} is neither a Hub id (org/name) nor an existing directory")
    if not bundle_model:
        raise ValueError(
            f"{name} is a local directory; a Space loads its model from the Hub. Push it first "
            "(cnc-hf push DIR ORG/NAME) and pass the repo id, or pass bundle_model=True to copy the model "
            "into the Space (small models only)"
        )
    from cnc_hf.model_dir import validate_model_dir

    files = [f for f in validate_model_dir(local) if f != "README.md"]
    (out / BUNDLED_MODEL_DIR).mkdir(parents=True, exist_ok=True)
    written = [Path(shutil.copyfile(local / file, out / BUNDLED_MODEL_DIR / file)) for file in files]
    return None, BUNDLED_MODEL_DIR, written


def _copy_examples(examples: Any, out: Path) -> list[Path]:
    """Copy the example images into `out/examples/` (see `write_space_files`); return the copies."""
    from cnc_hf.app import demo_examples, find_examples

    if examples is False:
        return []
    paths = find_examples(demo_examples() if examples is None else examples)
    if paths:
        (out / EXAMPLES_DIR).mkdir(exist_ok=True)
    return [Path(shutil.copyfile(path, out / EXAMPLES_DIR / Path(path).name)) for path in paths]


def _copy_vendored_code(out: Path) -> list[Path]:
    """cnc_hf/app.py as cnc_app.py, and what it draws with: cnc_hf.figures (the one renderer) and the
    heat-map colours it needs."""
    from cnc_hf import figures
    from cnc_hf.modeling import heatmap

    sources = ((Path(__file__).with_name("app.py"), VENDORED_APP), (figures.__file__, VENDORED_FIGURES),
               (heatmap.__file__, VENDORED_HEATMAP))
    return [Path(shutil.copyfile(source, out / name)) for source, name in sources]


def push_space(
    model_id_or_dir: str | os.PathLike,
    space_id: str,
    token: str | None = None,
    private: bool = False,
    work_dir: str | os.PathLike | None = None,
    dry_run: bool = False,
    **space_kwargs: Any,
):
    """Write the Space files (`write_space_files`) and upload them to the Space repo `space_id`.

    The Space repo is created if needed (sdk gradio; `private` applies to a new repo only).
    Returns the list of files with `dry_run=True` (nothing is sent), else the `CommitInfo`.
    `work_dir` keeps the written folder (default: a temporary one, removed afterwards).
    """
    import tempfile

    from huggingface_hub import HfApi

    check_repo_id(space_id, "space_id")
    with tempfile.TemporaryDirectory(prefix="cnc_space_") as tmp:
        folder = Path(work_dir) if work_dir is not None else Path(tmp)
        files = write_space_files(model_id_or_dir, folder, **space_kwargs)
        relative = sorted(str(f.relative_to(folder)) for f in files)
        if dry_run:
            return relative
        api = HfApi(token=token)
        api.create_repo(repo_id=space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
        return api.upload_folder(repo_id=space_id, repo_type="space", folder_path=str(folder),
                                 allow_patterns=relative, commit_message="Gradio app for a CNC anomaly detector")


__all__ = ["push_space", "write_space_files", "REQUIREMENTS", "TESTED_GRADIO_VERSION"]
