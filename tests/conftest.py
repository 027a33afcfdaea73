"""Shared fixtures: tiny random CLIP checkpoints written with save_pretrained, and the real
CLIP BPE vocabulary (shipped inside the open-clip-torch wheel) for tokenizer checks."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch

from tiny_models import tiny_clip_config, write_clip_tokenizer_files


@pytest.fixture(scope="session")
def clip_bpe_dir(tmp_path_factory) -> Path:
    """vocab.json + merges.txt of the real CLIP tokenizer, built from open_clip's BPE file.

    The file comes from the installed open-clip-torch distribution (`make install-test` installs it with
    --no-deps); it is read as data, without importing open_clip, and nothing is downloaded here."""
    from importlib import metadata

    try:
        bpe_file = Path(metadata.distribution("open_clip_torch").locate_file("open_clip/bpe_simple_vocab_16e6.txt.gz"))
    except metadata.PackageNotFoundError:
        bpe_file = None
    if bpe_file is None or not bpe_file.is_file():
        pytest.fail("the real CLIP BPE vocabulary comes from the open-clip-torch wheel: "
                    "`make install-test` installs it (pip install --no-deps open-clip-torch)", pytrace=False)
    out = tmp_path_factory.mktemp("clip_bpe")
    write_clip_tokenizer_files(gzip.decompress(bpe_file.read_bytes()).decode("utf-8"), out)
    return out


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A random tiny CLIP checkpoint (config + safetensors, no tokenizer), as save_pretrained writes it."""
    from transformers import CLIPModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(tiny_clip_config()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_clip_dir_with_tokenizer(tmp_path_factory, tiny_clip_dir, clip_bpe_dir) -> Path:
    """The tiny CLIP checkpoint plus a real CLIPTokenizer, like a Hub CLIP repo."""
    import shutil

    from transformers import CLIPTokenizer

    path = tmp_path_factory.mktemp("tiny_clip_tok")
    for f in tiny_clip_dir.iterdir():
        shutil.copy(f, path / f.name)
    CLIPTokenizer(str(clip_bpe_dir / "vocab.json"), str(clip_bpe_dir / "merges.txt")).save_pretrained(path)
    return path
