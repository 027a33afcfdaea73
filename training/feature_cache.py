"""Cache of the frozen CLIP encoder features, computed once and reused every epoch (`--cache_features`).

CLIP is frozen and training uses no augmentation, so `model.encode_image(pixel_values)` of a
training image is the same tensor in every epoch: computing it once is exact, and an epoch then
costs only the trainable part (fusion, MoE, decoder and the text tower for the prompts).

Each process caches only its own shard of the training set (training/sharding.py gives every
process a fixed shard), so N processes hold 1/N of the cache each and multi-machine runs need no
shared file system. Size: images x layers x (1 + h*w) x C values, e.g. ViT-L/14 at 224 on MVTec AD
(3629 images) is 3629 x 3 x 257 x 1024 = 2.9e9 values: 5.7 GB in float16 (the default
`--cache_dtype`), 11.5 GB in float32. In memory by default; with `--cache_dir` it is a memory-mapped
file per process (`torch.from_file`), reused by later runs with the same model, data and shard
(a fingerprint of those names the file) and written under a temporary name first, so a crash never
leaves a half-written cache that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch

CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class FeatureCache:
    """`features[i]` = `encode_image` of the i-th image of this process's shard: (N, n, 1 + h*w, C)."""

    def __init__(self, features: torch.Tensor, path: Path | None = None, build_seconds: float = 0.0):
        self.features = features
        self.path = path
        self.build_seconds = build_seconds

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()

    def batch(self, positions: torch.Tensor | list[int], device: torch.device) -> torch.Tensor:
        """The cached features of `positions` on `device` (in the cache dtype; the model casts)."""
        index = torch.as_tensor(positions, dtype=torch.long)
        return self.features[index].to(device, non_blocking=True)

    @classmethod
    def build(cls, model, loader, num_images: int, dtype: torch.dtype = torch.float16, cache_dir=None,
              fingerprint: dict | None = None, device: torch.device | None = None, progress: bool = True) -> "FeatureCache":
        """Encode every batch of `loader` (in order, `num_images` images in all) and store the features.

        `cache_dir`: keep the cache in a file there (reused when `fingerprint` matches); None keeps it
        in memory. `model` is the unwrapped CNCModel.
        """
        from tqdm.auto import tqdm

        start = time.perf_counter()
        device = device or next(model.parameters()).device
        path = None
        if cache_dir is not None:
            key = hashlib.sha256(json.dumps(fingerprint or {}, sort_keys=True, default=str).encode()).hexdigest()[:16]
            path = Path(cache_dir) / f"features-{key}.bin"
            meta_path = path.with_suffix(".json")
            if path.is_file() and meta_path.is_file():
                meta = json.loads(meta_path.read_text())
                features = torch.from_file(str(path), shared=False, size=math.prod(meta["shape"]),
                                           dtype=CACHE_DTYPES[meta["dtype"]]).view(meta["shape"])
                return cls(features, path, time.perf_counter() - start)

        features = None
        position = 0
        tmp = None
        with torch.no_grad():
            for batch in tqdm(loader, desc="caching features", disable=not progress, leave=False):
                encoded = model.encode_image(batch["pixel_values"].to(device))
                if features is None:  # the shape is known after the first batch
                    shape = (num_images, *encoded.shape[1:])
                    if path is None:
                        features = torch.empty(shape, dtype=dtype)
                    else:
                        path.parent.mkdir(parents=True, exist_ok=True)
                        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                        tmp.unlink(missing_ok=True)
                        features = torch.from_file(str(tmp), shared=True, size=math.prod(shape), dtype=dtype).view(shape)
                features[position: position + encoded.shape[0]] = encoded.to("cpu", dtype)
                position += encoded.shape[0]
        if position != num_images:
            raise RuntimeError(f"feature cache: the loader gave {position} images, expected {num_images}")
        if path is not None:
            # Data first, then the name, then the metadata that marks it complete.
            del features
            os.replace(tmp, path)
            dtype_name = next(name for name, value in CACHE_DTYPES.items() if value == dtype)
            meta = {"shape": list(shape), "dtype": dtype_name, "fingerprint": fingerprint}
            meta_tmp = path.with_name(f".{path.stem}.{os.getpid()}.json.tmp")
            meta_tmp.write_text(json.dumps(meta, default=str))
            os.replace(meta_tmp, path.with_suffix(".json"))
            features = torch.from_file(str(path), shared=False, size=math.prod(shape), dtype=dtype).view(shape)
        return cls(features, path, time.perf_counter() - start)
