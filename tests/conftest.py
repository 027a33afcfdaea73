"""Shared fixtures: tiny random CLIP checkpoints written with save_pretrained, and the real
CLIP BPE vocabulary (shipped inside the open-clip-torch wheel) for tokenizer checks."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# Prelude of subprocess scripts that must run as a process WITHOUT this package would: any import
# of cnc_hf / cnc_hf_train (or a stray modeling / training) fails, so only the code saved with a model can serve it.
BLOCK_CNC_PACKAGES = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("cnc_hf", "cnc_hf_train", "modeling", "training"):
            raise ImportError("blocked: " + name)
blocker = Block()
sys.meta_path.insert(0, blocker)
"""


def tiny_clip_config(vision_layers: int = 4, image_size: int = 32, patch_size: int = 8, width: int = 32):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=1),
        vision_config=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=vision_layers,
                           num_attention_heads=2, image_size=image_size, patch_size=patch_size),
        projection_dim=16,
    )


def tiny_cnc_config(**overrides):
    from cnc_hf.modeling import CNCConfig

    overrides.setdefault("image_size", 32)
    return CNCConfig(clip_config=tiny_clip_config(), **overrides)


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


def write_clip_tokenizer_files(bpe_text: str, out: Path) -> None:
    """The vocab/merges layout of openai/clip-vit-* from open_clip's BPE merges (same recipe as CLIP's own)."""
    byte_chars = _bytes_to_unicode()
    merges = [tuple(m.split()) for m in bpe_text.split("\n")[1:49152 - 256 - 2 + 1]]
    vocab = list(byte_chars.values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


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
