"""The Hugging Face Hub and a CNC model: upload a finished folder, load by Hub id, say what went wrong.

    upload_model_dir(model_dir, "org/cnc-mvtec")   # validate, refresh the card, one commit
    load_model("org/cnc-mvtec")                    # Hub id or dir; a clear error offline
    load_pipeline("org/cnc-mvtec")                 # the same for the anomaly-map pipeline
    cnc-hf push MODEL_DIR REPO_ID [--private] [--token T] [--dry_run]   (cnc_hf.hub_cli)

The neighbours each do one job: `cnc_hf.model_dir` says which files of a folder belong to the model
(and refuses pickles), `cnc_hf.model_card` renders README.md, `cnc_hf.hub_ids` knows what a Hub
id looks like, `cnc_hf.hub_cli` is the command line. Their public names are importable from here too,
as they were when this module held them all.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Mapping

from cnc_hf.hub_ids import check_repo_id, is_hub_id, looks_like_hub_id
from cnc_hf.model_card import (  # noqa: F401  (re-exported: the names this module used to define)
    CITATION,
    DATASETS,
    LIBRARY_NAME,
    METRIC_KEYS,
    METRICS,
    PIPELINE_TAG,
    TAGS,
    TASK_NAME,
    TEMPLATES,
    build_model_card,
    eval_results_from_metrics,
    heatmap_example_source,
    metrics_table,
    public_training_args,
    render_heatmap_example,
    template_name_for,
    template_path,
    templates_dir,
    write_model_card,
)
from cnc_hf.model_dir import (  # noqa: F401  (re-exported, as above)
    HEATMAP_EXAMPLE,
    OPTIONAL_FILES,
    PICKLE_SUFFIXES,
    WEIGHT_INDEX,
    ModelDirError,
    validate_model_dir,
)

DEFAULT_COMMIT_MESSAGE = "Upload CNC anomaly detector (weights, code, model card)"


class ModelNotAvailableError(OSError):
    """A Hub id that is neither a local directory nor cached, when the Hub cannot be reached; or an argument
    that names a local folder which does not exist (no Hub request is made for it)."""


class HubUnreachableError(OSError):
    """The Hugging Face Hub did not answer (network, DNS, offline mode) or refused the login."""


# --------------------------------------------------------------------------- upload
def upload_model_dir(
    model_dir: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    create_pr: bool = False,
    card_template: str | os.PathLike | None = None,
    dry_run: bool = False,
    *,
    dataset_id: str | None = None,
):
    """Validate `model_dir`, refresh its model card for `repo_id`, and upload it in one commit.

    Returns the list of paths to upload with `dry_run=True`: the card is rendered in memory (so a card
    that cannot be rendered fails here too) and nothing is written or sent. Otherwise README.md (and
    heatmap_example.png, from heatmaps/) are written into the folder, and the `CommitInfo` of the commit
    is returned. The repo is created if needed (`private` applies to a new repo only). Files are
    uploaded as one explicit list (create_commit), so nothing outside `validate_model_dir`'s list can
    slip in; files already in the repo are left as they are.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    model_dir = Path(model_dir)
    check_repo_id(repo_id, "repo_id", bare=True)
    validate_model_dir(model_dir)  # before touching the card: refuse bad folders untouched
    if dry_run:
        build_model_card(model_dir, template=card_template, repo_id=repo_id, dataset_id=dataset_id)
        card_files = ["README.md"] + ([HEATMAP_EXAMPLE] if heatmap_example_source(model_dir) is not None else [])
        return validate_model_dir(model_dir, will_write=card_files)
    write_model_card(model_dir, template=card_template, repo_id=repo_id, dataset_id=dataset_id)
    files = validate_model_dir(model_dir)
    api = HfApi(token=token)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(model_dir / name)) for name in files]
    try:
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        return api.create_commit(repo_id=repo_id, repo_type="model", operations=operations,
                                 commit_message=commit_message, create_pr=create_pr)
    except Exception as err:
        raise hub_error(err, f"push {model_dir} to {repo_id}") from err


def push_to_hub(model_dir: str | os.PathLike, repo_id: str, *args, **kwargs):
    """Deprecated name of `upload_model_dir` (it read like transformers' `model.push_to_hub(repo_id)`,
    which uploads a model object; this uploads a finished folder). Removed in a future release."""
    warnings.warn("cnc_hf.hub.push_to_hub(model_dir, repo_id) is deprecated and will be removed; use "
                  "cnc_hf.hub.upload_model_dir (same arguments)", FutureWarning, stacklevel=2)
    return upload_model_dir(model_dir, repo_id, *args, **kwargs)


# --------------------------------------------------------------------------- errors that say what to do
def hub_error(err: Exception, doing: str) -> Exception:
    """A HubUnreachableError saying what to do for a network, offline or login failure; `err` otherwise."""
    from huggingface_hub import constants

    name = type(err).__name__
    network = isinstance(err, (ConnectionError, TimeoutError)) or any(
        cls.__name__ in ("TransportError", "RequestException", "OfflineModeIsEnabled") for cls in type(err).__mro__)
    status = getattr(getattr(err, "response", None), "status_code", None)
    first = str(err).splitlines()[0] if str(err) else name
    if network:
        return HubUnreachableError(
            f"could not reach the Hugging Face Hub ({constants.ENDPOINT}) to {doing}: {name}: {first}. Check the "
            "network (HF_HUB_OFFLINE=1 makes every Hub call fail at once), or run with --dry_run to check the folder "
            "and the card without uploading."
        )
    if status in (401, 403):
        return HubUnreachableError(
            f"the Hugging Face Hub refused the login to {doing} (HTTP {status}): log in with `hf auth login`, "
            "set HF_TOKEN, or pass --token with write access to that repo."
        )
    return err


def check_local_model_argument(value: Any, flag: str = "--model") -> None:
    """Refuse at once an argument that names a local folder which does not exist, instead of letting
    transformers treat it as a Hub id and retry the network: one that starts with /, ./, ../ or ~, ends
    with /, has more than one /, or whose first part is an existing local folder (`demo_output/modle`)."""
    if not isinstance(value, (str, os.PathLike)):
        return
    text = os.fspath(value)
    path = Path(text).expanduser()
    if path.exists():
        return
    parts = Path(text).parts
    looks_local = (text.startswith(("/", "./", "../", "~", "\\")) or text.endswith(("/", os.sep)) or text.count("/") > 1
                   or (len(parts) > 1 and Path(parts[0]).is_dir()))
    if looks_local and looks_like_hub_id(text) and _in_hub_cache(text):
        return  # "openai/clip-..." run from a folder that has its own openai/: the cached Hub repo is meant
    if looks_local:
        parent = next((p for p in path.parents if p.is_dir()), None)
        near = sorted(c.name for c in parent.iterdir() if c.is_dir())[:8] if parent is not None else []
        hint = f"; folders in {parent}: {', '.join(near)}" if near else ""
        hub = (" (to use the Hub repo of that name, run from a folder without a local "
               f"{Path(text).parts[0]}/ or download it first)") if looks_like_hub_id(text) else ""
        raise ModelNotAvailableError(f"{flag} {text}: no such folder{hint}{hub}")


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an id the cache cannot even look up is not in it
        return False


# --------------------------------------------------------------------------- loading by Hub id
def _not_available(id_or_dir: Any, kwargs: Mapping[str, Any], err: Exception) -> Exception:
    """A clear error for an id that could not be loaded, or `err` itself when it is not about availability."""
    from huggingface_hub import constants, is_offline_mode, try_to_load_from_cache

    name = os.fspath(id_or_dir) if isinstance(id_or_dir, (str, os.PathLike)) else None
    if name is None or Path(name).exists() or not looks_like_hub_id(name):
        return err
    cache_dir = kwargs.get("cache_dir") or constants.HF_HUB_CACHE
    cached = try_to_load_from_cache(name, "config.json", cache_dir=cache_dir, revision=kwargs.get("revision"))
    if isinstance(cached, str):
        return err  # the repo is cached: the failure is about its content, keep transformers' message
    offline = is_offline_mode() or kwargs.get("local_files_only")
    reason = ("this machine is offline (HF_HUB_OFFLINE=1 or local_files_only=True)" if offline
              else "the Hub could not be reached or the repo does not exist / is private")
    return ModelNotAvailableError(
        f"{name!r} is not a local directory and is not in the Hugging Face cache ({cache_dir}), and {reason}. "
        f"Download it where the Hub is reachable (`hf download {name}`) and copy the cache (or set HF_HUB_CACHE), "
        f"or pass a local model directory. ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    )


def load_model(id_or_dir: str | os.PathLike, **kwargs):
    """`CNCModel.from_pretrained` with a clear error when a Hub id is neither cached nor reachable."""
    from cnc_hf.modeling import CNCModel

    check_local_model_argument(id_or_dir)
    try:
        return CNCModel.from_pretrained(id_or_dir, **kwargs)
    except OSError as err:
        raise _not_available(id_or_dir, kwargs, err) from err


def load_pipeline(id_or_dir: str | os.PathLike, **kwargs):
    """`pipeline("image-anomaly-detection", model=id_or_dir, **kwargs)` with the same clear error."""
    from transformers import pipeline  # the task is registered: importing cnc_hf ran cnc_hf.registration

    check_local_model_argument(id_or_dir)
    try:
        return pipeline("image-anomaly-detection", model=os.fspath(id_or_dir), **kwargs)
    except OSError as err:
        raise _not_available(id_or_dir, kwargs.get("model_kwargs") or {}, err) from err



def __getattr__(name: str):
    # `hub.main` was this module's command line; it moved to cnc_hf.hub_cli (imported here only when
    # asked for, so that hub_cli -> hub stays the one direction between them).
    if name == "main":
        warnings.warn("cnc_hf.hub.main is deprecated and will be removed; use cnc_hf.hub_cli.main",
                      FutureWarning, stacklevel=2)
        from cnc_hf.hub_cli import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["HubUnreachableError", "ModelDirError", "ModelNotAvailableError", "build_model_card",
           "check_local_model_argument", "hub_error", "is_hub_id", "load_model", "load_pipeline", "push_to_hub",
           "upload_model_dir", "validate_model_dir", "write_model_card"]


if __name__ == "__main__":  # pragma: no cover  (`python -m cnc_hf.hub push ...`, as documented before)
    import sys

    from cnc_hf.hub_cli import main as _main

    sys.exit(_main())
