"""Image processing shared by CNC training, evaluation and the anomaly-map pipeline.

`CNCImageProcessor` turns images (and, for training/evaluation, ground-truth masks) into the tensors
the model reads: images are squashed to `size` x `size` (the paper runs CLIP at 224x224; the whole
image is kept, no centre crop, so a pixel of the anomaly map always maps back to a pixel of the
input) and normalised with CLIP's mean/std; masks are resized with nearest neighbour and binarised.

It is saved with the model (`preprocessor_config.json`) and copied next to it as remote code, so a
loaded model preprocesses exactly as in training. That is also why this file imports only numpy,
PIL, transformers and (optionally) torch.

Input conventions (one rule set for PIL, numpy and torch inputs):
- Every input first becomes an 8-bit RGB PIL image of its own size (`to_rgb_pil`); resizing then
  happens on that 8-bit image, before any float conversion, so a huge image never becomes a huge
  float array. PIL's `reducing_gap` shrinks very large images by cheap box reduction first.
  JPEG `Image.draft` (decoding at 1/2..1/8 scale) is deliberately NOT used: it gives other pixels
  than a full decode, and a file must preprocess exactly like its decoded dataset row.
- Alpha is composited onto BLACK (RGBA, LA, PA, P/L/RGB with a transparency key; premultiplied
  RGBa/La already are). Transparent pixels carry arbitrary colour; black makes them deterministic.
- 16-bit images (PIL I;16*, numpy/torch uint16) are scaled by 255/65535, never clipped.
  PIL "I" / signed integer arrays: values in [0, 255] are read as 8-bit, values in [0, 65535] as
  16-bit; anything else is an error. Float images (PIL "F", float arrays/tensors): values in [0, 1]
  are scaled by 255, values in [0, 255] are taken as they are, anything else (e.g. an already
  normalised tensor) is an error. Bool images map to 0/255.
- numpy arrays are HxW, HxWxC (channels last; CxHxW is accepted when the last axis cannot be a
  channel axis); torch tensors are CxHxW (HxWxC accepted when the first axis cannot be a channel
  axis). C is 1 (gray), 2 (gray+alpha), 3 (RGB) or 4 (RGBA). A 4-D array/tensor is a batch.
- A `str`/`os.PathLike` is a file path: it is opened with PIL and its EXIF orientation applied, as
  `datasets.Image` does when decoding, so a file gives the same pixels as its dataset row.
- Masks: one rule (`mask_defect_pixels`), which the `mask` column of cnc_hf's datasets uses too: a pixel is a defect when
  any of its channels is non-zero. That is the gray value ("1", "L", "I", "I;16", "F"; MVTec masks
  are 0/255, raw VisA masks use 1..N), the palette index ("P"), any of R, G, B (alpha is ignored);
  other modes (CMYK, YCbCr, ...) count through their RGB colours. A `None` mask is all zeros (a good
  image). A mask's EXIF orientation is applied like an image's (a mask PNG rarely has one), so a
  mask is always compared with its image as both are displayed.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Any, Sequence

import numpy as np
import PIL.Image
import PIL.ImageOps
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from .heatmap import resize_bilinear, squeeze_map

try:  # optional: the torch-free ONNX Runtime path (cnc_hf.onnx_runtime) preprocesses with this file too
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = F = None


OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Box-reduce a big image before the bicubic pass once it is >= 3x the target (PIL's own advice:
# 3.0 is indistinguishable from a full resample and bounds time and memory).
_REDUCING_GAP = 3.0
_HIGH_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA")
_PREMULTIPLIED_MODES = ("RGBa", "La")  # colour already multiplied by alpha = composited on black
_RESAMPLE_NAMES = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def _where(index: int | None, name: str = "images") -> str:
    return name if index is None else f"{name}[{index}]"


def _array_to_uint8(array: np.ndarray, where: str) -> np.ndarray:
    """Scale an image array of any supported dtype to uint8 (see the module docstring for the rules)."""
    if array.size == 0:
        raise ValueError(f"{where}: empty image (shape {tuple(array.shape)}); expected at least 1x1 pixels")
    kind = array.dtype.kind
    if kind == "b":
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint8:
        return array
    if kind == "u" and array.dtype.itemsize == 2:
        return np.round(array.astype(np.float32) * (255.0 / 65535.0)).astype(np.uint8)
    if kind in "iu":
        low, high = int(array.min()), int(array.max())
        if low >= 0 and high <= 255:
            return array.astype(np.uint8)
        if low >= 0 and high <= 65535:
            return np.round(array.astype(np.float32) * (255.0 / 65535.0)).astype(np.uint8)
        raise ValueError(
            f"{where}: integer image with values in [{low}, {high}]; expected 8-bit [0, 255] or 16-bit [0, 65535]"
        )
    if kind == "f":
        array = array.astype(np.float32, copy=False)
        if not np.isfinite(array).all():
            raise ValueError(f"{where}: image contains NaN or infinite values; expected finite pixel values")
        low, high = float(array.min()), float(array.max())
        if low >= 0.0 and high <= 1.0:
            return np.round(array * 255.0).astype(np.uint8)
        if low >= 0.0 and high <= 255.0:
            return np.round(array).astype(np.uint8)
        raise ValueError(
            f"{where}: float image with values in [{low:.4g}, {high:.4g}]; expected [0, 1] (or [0, 255]). "
            "Pass raw images, not normalised tensors: the processor normalises itself."
        )
    raise ValueError(
        f"{where}: unsupported dtype {array.dtype}; expected uint8, uint16, bool, a non-negative integer or float type"
    )


def _channels_last(array: np.ndarray, where: str, prefer_channels_first: bool) -> np.ndarray:
    """Return an HxW or HxWxC array (C in 1..4) from HxW, HxWxC or CxHxW input."""
    if array.ndim == 2:
        return array
    if array.ndim != 3:
        raise ValueError(
            f"{where}: array of shape {tuple(array.shape)} ({array.ndim}-D); expected HxW, HxWxC or CxHxW "
            "with C in 1..4 (or a 4-D batch)"
        )
    first_is_channel, last_is_channel = array.shape[0] in (1, 2, 3, 4), array.shape[-1] in (1, 2, 3, 4)
    if first_is_channel and (prefer_channels_first or not last_is_channel):
        array = np.moveaxis(array, 0, -1)
    elif not last_is_channel:
        raise ValueError(
            f"{where}: array of shape {tuple(array.shape)} has no channel axis of size 1..4; expected HxWxC or CxHxW"
        )
    return array


def _composite_on_black(rgba: PIL.Image.Image) -> PIL.Image.Image:
    black = PIL.Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return PIL.Image.alpha_composite(black, rgba).convert("RGB")


def _uint8_to_rgb_pil(array: np.ndarray, where: str) -> PIL.Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        return PIL.Image.fromarray(np.ascontiguousarray(array), "L").convert("RGB")
    channels = array.shape[-1]
    if channels == 3:
        return PIL.Image.fromarray(np.ascontiguousarray(array), "RGB")
    if channels == 4:
        return _composite_on_black(PIL.Image.fromarray(np.ascontiguousarray(array), "RGBA"))
    if channels == 2:
        return _composite_on_black(PIL.Image.fromarray(np.ascontiguousarray(array), "LA").convert("RGBA"))
    raise ValueError(f"{where}: {channels} channels; expected 1, 2, 3 or 4")  # unreachable after _channels_last


def _is_tensor(value: Any) -> bool:
    return torch is not None and isinstance(value, torch.Tensor)


def _tensor_to_numpy(tensor, where: str) -> np.ndarray:
    # A meta or sparse tensor has no pixels to read: say so here rather than fail deep inside torch.
    if tensor.device.type == "meta" or tensor.layout != torch.strided:
        raise ValueError(f"{where}: a {tensor.device.type} tensor with layout {tensor.layout} holds no readable "
                         "pixels; expected a dense tensor")
    tensor = tensor.detach().cpu()
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.float()
    return tensor.numpy()


def _open_path(path: str | os.PathLike, where: str) -> PIL.Image.Image:
    try:
        image = PIL.Image.open(path)
        image.load()
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: image file not found: {os.fspath(path)}") from None
    except PIL.Image.DecompressionBombError as err:  # not an OSError: more pixels than PIL.Image.MAX_IMAGE_PIXELS allows
        raise ValueError(f"{where}: refused image file {os.fspath(path)}: {err} (raise PIL.Image.MAX_IMAGE_PIXELS "
                         "if you trust this file)") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{where}: cannot read image file {os.fspath(path)}: {err}") from err
    return image


def to_rgb_pil(image: Any, index: int | None = None) -> PIL.Image.Image:
    """Convert one image (PIL of any mode, numpy array, torch tensor or file path) to an 8-bit RGB PIL image.

    The size is unchanged (EXIF orientation of file paths and PIL images is applied). See the module
    docstring for how alpha, 16-bit, integer and float inputs are mapped. `index` only names the input
    in error messages.
    """
    where = _where(index)
    if isinstance(image, (str, os.PathLike)):
        image = _open_path(image, where)
    if isinstance(image, PIL.Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"{where}: empty image (size {image.size}); expected at least 1x1 pixels")
        if image.getexif().get(PIL.Image.ExifTags.Base.Orientation) is not None:
            image = PIL.ImageOps.exif_transpose(image)
        mode = image.mode
        if mode == "RGB" and "transparency" not in image.info:
            return image
        if mode in _PREMULTIPLIED_MODES:
            return _uint8_to_rgb_pil(np.asarray(image)[..., :-1], where)
        if mode in _ALPHA_MODES or "transparency" in image.info:
            return _composite_on_black(image.convert("RGBA"))
        if mode in _HIGH_BIT_MODES:
            return _uint8_to_rgb_pil(_array_to_uint8(np.asarray(image), where), where)
        try:
            return image.convert("RGB")
        except ValueError as err:
            raise ValueError(f"{where}: PIL mode {mode!r} cannot be converted to RGB: {err}") from err
    array = _array_channels_last(image, where, "input", "a PIL image")
    return _uint8_to_rgb_pil(_array_to_uint8(array, where), where)


def _array_channels_last(value: Any, where: str, what: str, expected: str) -> np.ndarray:
    """A numpy array (channels last) from a torch tensor (read CxHxW) or numpy array (read HxWxC);
    any other type is a ValueError naming `where`."""
    if _is_tensor(value):
        return _channels_last(_tensor_to_numpy(value, where), where, prefer_channels_first=True)
    if isinstance(value, np.ndarray):
        return _channels_last(value, where, prefer_channels_first=False)
    raise ValueError(
        f"{where}: unsupported {what} type {type(value).__name__}; expected {expected}, numpy array, "
        "torch tensor or file path"
    )


def mask_defect_pixels(mask: PIL.Image.Image) -> np.ndarray:
    """HxW bool, True where a mask marks a defect: any non-zero channel (the gray value, the palette
    index, any of R, G, B; alpha ignored; other modes through RGB). The one mask rule of cnc-hf: the
    datasets (cnc_hf.data) use this function too."""
    if mask.mode in ("LA", "PA", "La"):
        return np.asarray(mask)[..., 0] > 0
    if mask.mode in ("RGB", "RGBA", "RGBa", "RGBX"):
        return (np.asarray(mask)[..., :3] > 0).any(axis=-1)
    if mask.mode in ("1", "L", "P") + _HIGH_BIT_MODES:
        return np.asarray(mask) > 0
    return (np.asarray(mask.convert("RGB")) > 0).any(axis=-1)  # CMYK, YCbCr, LAB, HSV: their colours


def _mask_to_bool(mask: Any, index: int) -> np.ndarray:
    """Return an HxW bool array: True where the mask marks a defect (any non-zero value)."""
    where = _where(index, "segmentation_maps")
    if isinstance(mask, (str, os.PathLike)):
        mask = _open_path(mask, where)
    if isinstance(mask, PIL.Image.Image):
        if mask.width == 0 or mask.height == 0:
            raise ValueError(f"{where}: empty mask (size {mask.size}); expected at least 1x1 pixels")
        if mask.getexif().get(PIL.Image.ExifTags.Base.Orientation) is not None:
            mask = PIL.ImageOps.exif_transpose(mask)  # as for images (and as datasets.Image decodes masks)
        return mask_defect_pixels(mask)
    array = _array_channels_last(mask, where, "mask", "None, a PIL image")
    if array.size == 0:
        raise ValueError(f"{where}: empty mask (shape {tuple(array.shape)}); expected at least 1x1 pixels")
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{where}: unsupported dtype {array.dtype}; expected a bool, integer or float mask")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ValueError(f"{where}: mask contains NaN or infinite values")
    if array.ndim == 3:
        # Gray(+alpha) masks: the gray channel; colour(+alpha) masks: any colour channel.
        array = array[..., :1] if array.shape[-1] in (1, 2) else array[..., :3]
        return (array > 0).any(axis=-1)
    return array > 0


def _as_list(inputs: Any, name: str, allow_none: bool = False) -> list:
    """One input or a batch -> a list. A 4-D array/tensor is a batch; lists/tuples are batches."""
    if isinstance(inputs, (list, tuple)):
        return list(inputs)
    if (isinstance(inputs, np.ndarray) or _is_tensor(inputs)) and inputs.ndim == 4:
        return list(inputs)
    if inputs is None and not allow_none:
        raise ValueError(f"{name}: got None; expected an image or a list of images")
    return [inputs]


class CNCImageProcessor(BaseImageProcessor):
    r"""Resize to a square `size`, rescale to [0, 1] and normalise with CLIP's mean/std; masks to {0, 1}.

    Args:
        size (`int`, defaults to 224): side of the square model input (the paper: 224).
        image_mean (`list[float]`, defaults to OpenAI CLIP's mean).
        image_std (`list[float]`, defaults to OpenAI CLIP's std).
        resample (`int`, defaults to `PIL.Image.BICUBIC` = 3): PIL filter for images. Masks always
            use nearest neighbour so that they stay binary and do not grow or shrink.

    Call: `processor(images, segmentation_maps=None, return_tensors="pt")` -> `BatchFeature` with
    `pixel_values` float32 (B, 3, S, S) and, when defect masks are given as `segmentation_maps` (the name
    transformers' segmentation processors use; `masks=` is its deprecated alias), `masks` float32 (B, S, S) in
    {0, 1}. See the module docstring for accepted inputs.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        size: int = 224,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        resample: int | str = PIL.Image.Resampling.BICUBIC,
        **kwargs,
    ):
        # Keys that transformers writes into preprocessor_config.json but that are not settings.
        for key in ("image_processor_type", "auto_map", "processor_class"):
            kwargs.pop(key, None)
        super().__init__(**kwargs)
        self.size = self._check_size(size)
        self.image_mean = [float(v) for v in (OPENAI_CLIP_MEAN if image_mean is None else image_mean)]
        self.image_std = [float(v) for v in (OPENAI_CLIP_STD if image_std is None else image_std)]
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError(
                f"image_mean/image_std: got {self.image_mean} / {self.image_std}; expected 3 values each, std > 0"
            )
        self.resample = self._check_resample(resample)

    @staticmethod
    def _check_size(size: Any) -> int:
        if isinstance(size, dict):  # transformers-style {"height": S, "width": S} or {"shortest_edge": S}
            values = {size[k] for k in ("height", "width", "shortest_edge") if k in size}
            if len(values) != 1:
                raise ValueError(f"size: got {size}; expected a square size (an int, or height == width)")
            size = values.pop()
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"size: got {size!r}; expected a positive int (side of the square input)")
        return int(size)

    @staticmethod
    def _check_resample(resample: Any) -> int:
        if isinstance(resample, str):
            if resample.lower() not in _RESAMPLE_NAMES:
                raise ValueError(f"resample: got {resample!r}; expected one of {sorted(_RESAMPLE_NAMES)}")
            return _RESAMPLE_NAMES[resample.lower()]
        if int(resample) not in _RESAMPLE_NAMES.values():
            raise ValueError(f"resample: got {resample!r}; expected a PIL resampling filter (0..5)")
        return int(resample)

    def __call__(self, images: Any, segmentation_maps: Any = None, return_tensors: str | None = "pt",
                 **kwargs) -> BatchFeature:
        return self.preprocess(images, segmentation_maps=segmentation_maps, return_tensors=return_tensors, **kwargs)

    def preprocess(
        self,
        images: Any,
        segmentation_maps: Any = None,
        return_tensors: str | None = "pt",
        size: int | None = None,
        resample: int | str | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Preprocess one image or a batch (and optionally the matching defect masks); see the class docstring."""
        if "masks" in kwargs:  # the name before transformers' `segmentation_maps`
            warnings.warn("CNCImageProcessor(masks=...) is deprecated; pass segmentation_maps=...", FutureWarning,
                          stacklevel=3)
            if segmentation_maps is not None:
                raise ValueError("pass the defect masks once: segmentation_maps= (or the deprecated masks=), not both")
            segmentation_maps = kwargs.pop("masks")
        if kwargs:
            raise ValueError(f"unexpected arguments {sorted(kwargs)}; expected segmentation_maps, return_tensors, size, "
                             "resample")
        size = self.size if size is None else self._check_size(size)
        resample = self.resample if resample is None else self._check_resample(resample)
        images = _as_list(images, "images")
        if not images:
            raise ValueError("images: got an empty list; expected at least one image")
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)

        pixel_values, image_sizes = [], []
        for index, image in enumerate(images):
            rgb = to_rgb_pil(image, index)
            image_sizes.append((rgb.height, rgb.width))
            # Resize the 8-bit image first, convert to float after: memory stays O(S^2).
            rgb = rgb.resize((size, size), resample=resample, reducing_gap=_REDUCING_GAP)
            array = (np.asarray(rgb, dtype=np.float32) / 255.0 - mean) / std
            pixel_values.append(array.transpose(2, 0, 1))
        data = {"pixel_values": np.stack(pixel_values).astype(np.float32)}

        if segmentation_maps is not None:
            masks = _as_list(segmentation_maps, "segmentation_maps", allow_none=True)
            if len(masks) != len(images):
                raise ValueError(f"segmentation_maps: got {len(masks)} masks for {len(images)} images; expected one "
                                 "per image")
            out = np.zeros((len(images), size, size), dtype=np.float32)
            for index, (mask, (height, width)) in enumerate(zip(masks, image_sizes)):
                if mask is None:
                    continue  # a good image: all zeros
                binary = _mask_to_bool(mask, index)
                if binary.shape != (height, width):
                    raise ValueError(
                        f"segmentation_maps[{index}]: size (h, w) = {binary.shape} but images[{index}] is "
                        f"{(height, width)}; "
                        "expected a mask of the same size as its image"
                    )
                small = PIL.Image.fromarray(binary.astype(np.uint8) * 255, "L").resize(
                    (size, size), resample=PIL.Image.Resampling.NEAREST
                )
                out[index] = np.asarray(small) > 0
            data["masks"] = out
        return BatchFeature(data=data, tensor_type=return_tensors)

    def post_process_anomaly_map(self, anomaly_map: Any, original_size: tuple[int, int]) -> np.ndarray:
        """Resize an (H, W) anomaly map back to the image's `original_size` = (height, width), bilinearly.

        Leading singleton axes ((1, H, W), (1, 1, H, W)) are accepted. Returns float32 (height, width).
        Note: PIL's `image.size` is (width, height); pass `(image.height, image.width)`.
        """
        if torch is None:  # the torch-free path: the same bilinear sampling in numpy (two output-size arrays)
            values = np.asarray(anomaly_map, dtype=np.float32)
        else:
            values = torch.as_tensor(np.asarray(anomaly_map) if not _is_tensor(anomaly_map) else anomaly_map)
        values = squeeze_map(values)
        height, width = (int(v) for v in original_size)
        if height < 1 or width < 1:
            raise ValueError(f"original_size: got {tuple(original_size)}; expected positive (height, width)")
        if torch is None:
            return resize_bilinear(values, height, width)
        values = values.detach().to("cpu", torch.float32)[None, None]
        resized = F.interpolate(values, size=(height, width), mode="bilinear", align_corners=False)
        return resized[0, 0].numpy().astype(np.float32, copy=False)

    def postprocess_anomaly_map(self, anomaly_map: Any, original_size: tuple[int, int]) -> np.ndarray:
        """Deprecated name of `post_process_anomaly_map` (transformers names these `post_process_*`)."""
        warnings.warn("CNCImageProcessor.postprocess_anomaly_map is deprecated; use post_process_anomaly_map",
                      FutureWarning, stacklevel=2)
        return self.post_process_anomaly_map(anomaly_map, original_size)


# --------------------------------------------------------------------------- pipeline inputs
# Any input of the pipeline (and of the torch-free ONNX Runtime path) -> an RGB PIL image, or a
# ValueError that names the input.
def _describe(item: Any) -> str:
    """A short name for an input, for error messages."""
    if isinstance(item, (str, os.PathLike)):
        return f"image {os.fspath(item)!r}"
    if isinstance(item, (bytes, bytearray, memoryview)):
        return f"bytes input ({len(item)} bytes)"
    if isinstance(item, np.ndarray) or _is_tensor(item):
        kind = "numpy array" if isinstance(item, np.ndarray) else "torch tensor"
        return f"{kind} of shape {tuple(item.shape)} and dtype {item.dtype}"
    if isinstance(item, PIL.Image.Image):
        return f"PIL image (mode {item.mode}, size {item.size})"
    return f"input of type {type(item).__name__}"


def _download(url: str) -> PIL.Image.Image:
    """An http(s) image through transformers' loader; any network failure becomes a ValueError."""
    from transformers.image_utils import load_image

    try:
        return load_image(url)
    except (ValueError, OSError, PIL.UnidentifiedImageError):
        raise
    except Exception as err:  # httpx errors are not OSErrors
        raise ValueError(f"cannot download ({type(err).__name__}: {err})") from err


def load_rgb(item: Any) -> PIL.Image.Image:
    """Any supported input -> 8-bit RGB PIL image at its own size; ValueError naming the input otherwise."""
    where = _describe(item)
    try:
        if isinstance(item, str) and item.startswith(("http://", "https://")):
            item = _download(item)
        elif isinstance(item, (bytes, bytearray, memoryview)):
            if len(item) == 0:
                raise ValueError("empty bytes")
            item = PIL.Image.open(io.BytesIO(bytes(item)))
            item.load()
        elif _is_tensor(item) and item.is_floating_point() and item.layout == torch.strided \
                and item.device.type != "meta":  # meta/sparse tensors: to_rgb_pil says why they cannot be read
            if not bool(torch.isfinite(item).all()):
                raise ValueError("the tensor contains NaN or infinite values")
        elif isinstance(item, np.ndarray) and item.dtype.kind == "f":
            if not bool(np.isfinite(item).all()):
                raise ValueError("the array contains NaN or infinite values")
        return to_rgb_pil(item)
    except FileNotFoundError:
        raise ValueError(f"{where}: no such file") from None
    except PIL.Image.DecompressionBombError as err:
        raise ValueError(f"{where}: {err} (raise PIL.Image.MAX_IMAGE_PIXELS if you trust this file)") from err
    except (PIL.UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"{where}: not a readable image ({err})") from err
    except (ValueError, TypeError) as err:
        message = str(err).removeprefix("images: ")  # to_rgb_pil's own prefix; `where` says more
        raise ValueError(f"{where}: {message}") from err


# save_pretrained copies this file next to the config and writes `auto_map`, so that
# AutoImageProcessor.from_pretrained(dir, trust_remote_code=True) finds the class without cnc_hf.
CNCImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["CNCImageProcessor", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "load_rgb", "to_rgb_pil"]
