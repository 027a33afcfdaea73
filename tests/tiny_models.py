"""Plain helpers the tests import (`from tiny_models import tiny_cnc_config`): tiny random CLIP / CNC
configs, the repository root, the prelude that blocks cnc-hf in a subprocess, and the CLIP tokenizer
files. Fixtures live in conftest.py, which pytest loads itself and tests never import."""

from __future__ import annotations

import json
from pathlib import Path

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


# Colour "products" for category recognition: a flat colour with mild noise, one category per colour.
COLOURS = {"blue": (40, 60, 200), "green": (50, 180, 60), "red": (200, 50, 40)}


def coloured(name: str, seed: int):
    """A 32x32 image of the colour category `name` (PIL RGB)."""
    import numpy as np
    import PIL.Image

    pixels = np.asarray(COLOURS[name], np.float32) + np.random.default_rng(seed).normal(0, 12, (32, 32, 3))
    return PIL.Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def colour_split(seeds=range(6)):
    """A datasets.Dataset of normal images (image, category, label, path): every colour at every seed."""
    import datasets

    rows = [{"image": coloured(name, seed), "category": name, "label": 0, "path": f"{name}/{seed}.png"}
            for name in COLOURS for seed in seeds]
    return datasets.Dataset.from_list(rows, features=datasets.Features({
        "image": datasets.Image(), "category": datasets.Value("string"), "label": datasets.Value("int64"),
        "path": datasets.Value("string")}))
