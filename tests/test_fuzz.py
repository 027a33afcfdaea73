"""Fuzzing the inputs of the pipeline and the image processor (hypothesis).

The contract under test, for any input: either a correct result (a finite score, an anomaly map of the
image's own size, a heat map) or a ValueError whose message names the input, never an error from deep
inside PIL or torch. Inputs: random bytes (some behind real format magic numbers), PNG/JPEG/... files cut
at random lengths, every PIL mode with random pixels, numpy arrays and torch tensors of many dtypes and
layouts (NaN/inf included), 1x1 and extreme aspect ratios, and one 10000 x 10000 image whose memory is
measured. The model is tiny (tests/conftest.py) so that each example costs milliseconds.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tiny_models import tiny_cnc_config
from cnc_hf.modeling import CNCModel
from cnc_hf.modeling.image_processing_cnc import CNCImageProcessor
from cnc_hf.modeling.pipeline_cnc import HEATMAP_MAX_SIDE, AnomalyMapPipeline, _describe, _fit_within

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SIZE = 32  # the tiny model's input side
MODES = ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
         "I", "I;16", "I;16L", "I;16B", "I;16N", "F"]
FORMATS = {"PNG": {}, "JPEG": {"quality": 90}, "GIF": {}, "BMP": {}, "TIFF": {}, "WEBP": {"quality": 80}}
MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"RIFF",
         b"P5\n", b"P6\n60000 60000\n255\n", b"P4\n30000 30000\n", b"\x00\x00\x01\x00", b"8BPS", b"\x0a\x05\x01"]


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    model = CNCModel(tiny_cnc_config(threshold=1.0)).eval()
    return AnomalyMapPipeline(model=model, image_processor=CNCImageProcessor(size=SIZE))


@pytest.fixture(scope="module")
def processor():
    return CNCImageProcessor(size=SIZE)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_correct(result, height: int, width: int) -> None:
    """What a correct pipeline result is, for an image of height x width."""
    assert isinstance(result["score"], float) and math.isfinite(result["score"])
    assert result["is_anomaly"] is (result["score"] >= 1.0)
    anomaly_map = result["anomaly_map"]
    assert anomaly_map.shape == (height, width) and anomaly_map.dtype == np.float32
    assert np.isfinite(anomaly_map).all()
    assert result["heatmap"].mode == "RGB" and result["heatmap"].size == _fit_within(width, height, HEATMAP_MAX_SIDE)


def pipeline_outcome(pipe, item, size: tuple[int, int] | None = None):
    """Run the pipeline: return the result (checked when the image size is known), or the ValueError, which
    must name the input (for a 4-D batch: the image of the batch). Any other exception fails the test."""
    try:
        result = pipe(item)
    except ValueError as err:
        batch = isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim == 4
        named = [_describe(image) for image in item] if batch else [_describe(item)]
        assert any(str(err).startswith(name) for name in named), str(err)
        return err
    if size is not None:
        assert_correct(result, *size)
    return result


def processor_outcome(processor, item):
    """Run the processor: finite pixel values of the model's size, or a ValueError naming `images`."""
    try:
        pixels = processor(item)["pixel_values"]
    except ValueError as err:
        assert str(err).startswith("images"), str(err)
        return err
    assert pixels.shape == (1, 3, SIZE, SIZE) and pixels.dtype == torch.float32 and torch.isfinite(pixels).all()
    return pixels


def encode(image: PIL.Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **FORMATS[image_format])
    return buffer.getvalue()


@st.composite
def rgb_images(draw, max_side: int = 40) -> PIL.Image.Image:
    height, width = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    data = draw(st.binary(min_size=height * width * 3, max_size=height * width * 3))
    return PIL.Image.frombytes("RGB", (width, height), data)


# ----------------------------------------------------------------------------- bytes and files
@FUZZ
@given(magic=st.sampled_from(MAGIC), tail=st.binary(max_size=300))
def test_random_bytes_give_a_result_or_a_value_error_naming_them(pipe, processor, tmp_path_factory, magic, tail):
    data = magic + tail
    outcome = pipeline_outcome(pipe, data)
    if not isinstance(outcome, ValueError):  # random bytes that happen to decode: a correct result
        with PIL.Image.open(io.BytesIO(data)) as decoded:
            assert_correct(outcome, decoded.height, decoded.width)
    path = tmp_path_factory.mktemp("bytes") / "fuzz.png"
    path.write_bytes(data)
    outcome = pipeline_outcome(pipe, str(path))
    if isinstance(outcome, ValueError):
        assert str(path) in str(outcome)
    processor_outcome(processor, str(path))


@FUZZ
@given(image=rgb_images(), image_format=st.sampled_from(sorted(FORMATS)), keep=st.floats(0.0, 1.0))
def test_truncated_files_give_a_result_or_a_value_error_naming_them(pipe, processor, image, image_format, keep):
    data = encode(image, image_format)
    cut = data[: int(len(data) * keep)]
    outcome = pipeline_outcome(pipe, cut, (image.height, image.width))  # a result only if the pixels were all there
    if len(cut) == len(data):
        assert not isinstance(outcome, ValueError), outcome  # the whole file always works
    processor_outcome(processor, PIL.Image.open(io.BytesIO(data)))


# ----------------------------------------------------------------------------- PIL modes
@FUZZ
@given(mode=st.sampled_from(MODES), height=st.integers(1, 24), width=st.integers(1, 24), data=st.data())
def test_every_pil_mode_with_random_pixels(pipe, processor, mode, height, width, data):
    nbytes = len(PIL.Image.new(mode, (width, height)).tobytes())
    image = PIL.Image.frombytes(mode, (width, height), data.draw(st.binary(min_size=nbytes, max_size=nbytes)))
    if mode == "P":
        image.putpalette(data.draw(st.binary(min_size=768, max_size=768)))
    outcome = pipeline_outcome(pipe, image, (height, width))
    processor_outcome(processor, image)
    if isinstance(outcome, ValueError):
        # Only 32-bit integer and float images can hold values that are no pixel values (see the processor docs).
        assert mode in ("I", "F"), outcome
        assert "expected" in str(outcome)


@pytest.mark.parametrize("mode", MODES)
def test_every_pil_mode_blank_and_one_pixel(pipe, mode):
    for size in ((1, 1), (7, 3)):
        assert_correct(pipe(PIL.Image.new(mode, size)), size[1], size[0])


# ----------------------------------------------------------------------------- arrays and tensors
DTYPES = ["uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float16", "float32", "float64",
          "bool", "complex64", "datetime64[s]", "U2", "object"]
SHAPES = st.one_of(
    st.tuples(st.integers(1, 12), st.integers(1, 12)),
    st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(1, 5)),
    st.tuples(st.integers(1, 5), st.integers(1, 12), st.integers(1, 12)),
    st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3), st.integers(0, 4)),  # batches, empty ones too
)


def array_elements(dtype: np.dtype):
    if dtype.kind == "f":  # NaN and inf included
        return st.floats(width=dtype.itemsize * 8, allow_nan=True, allow_infinity=True)
    if dtype.kind == "O":
        return st.one_of(st.integers(0, 255), st.text(max_size=2), st.none())
    return None  # hypothesis's defaults for the dtype


@FUZZ
@given(dtype=st.sampled_from(DTYPES), shape=SHAPES, data=st.data())
def test_numpy_arrays_give_a_result_or_a_value_error_naming_them(pipe, processor, dtype, shape, data):
    dtype = np.dtype(dtype)
    array = data.draw(hnp.arrays(dtype, shape, elements=array_elements(dtype)))
    outcome = pipeline_outcome(pipe, array)
    if isinstance(outcome, ValueError):
        if dtype.kind == "f" and array.ndim < 4 and array.size and not np.isfinite(array).all():
            assert "NaN or infinite" in str(outcome)  # checked before the shape
    elif array.size:  # (an empty batch gives an empty list)
        assert dtype.kind not in "cMUO"  # complex, datetime, str, object: never an image
        assert dtype.kind != "f" or np.isfinite(array).all()  # NaN/inf: never a result
        if array.ndim == 4:  # a batch: one result per image
            assert len(outcome) == array.shape[0]
        else:
            assert outcome["anomaly_map"].ndim == 2 and np.isfinite(outcome["anomaly_map"]).all()
    if array.ndim < 4:
        processor_outcome(processor, array)


TORCH_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.float16,
                torch.bfloat16, torch.float32, torch.float64, torch.bool, torch.complex64]


@FUZZ
@given(dtype=st.sampled_from(TORCH_DTYPES), shape=SHAPES.filter(lambda s: len(s) < 4), special=st.sampled_from(
    [None, float("nan"), float("inf"), -float("inf")]), seed=st.integers(0, 2**16))
def test_torch_tensors_give_a_result_or_a_value_error_naming_them(pipe, processor, dtype, shape, special, seed):
    generator = torch.Generator().manual_seed(seed)
    tensor = torch.randint(0, 256, shape, generator=generator).to(dtype)
    if dtype.is_floating_point:
        tensor = tensor / 255.0
        if special is not None:
            tensor.view(-1)[0] = special
    outcome = pipeline_outcome(pipe, tensor)
    if dtype.is_floating_point and special is not None:
        assert isinstance(outcome, ValueError) and "NaN or infinite" in str(outcome)
    processor_outcome(processor, tensor)


def test_tensors_without_pixels_are_value_errors(pipe, processor):
    for tensor in (torch.zeros(3, 4, 4, device="meta"), torch.zeros(3, 4, 4).to_sparse()):
        with pytest.raises(ValueError, match="holds no readable pixels"):
            pipe(tensor)
        with pytest.raises(ValueError, match=r"images\[0\]: .*holds no readable pixels"):
            processor(tensor)


# ----------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("height, width", [(1, 1), (1, 3000), (3000, 1), (2, 5000)])
def test_one_pixel_and_extreme_aspect_ratios(pipe, height, width):
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    assert_correct(pipe(image), height, width)


def test_a_10000_by_10000_image_stays_within_its_memory_bound(pipe):
    """Bound: the pipeline's peak memory growth stays under 1.6 x one float32 map of the image's size
    (610 MiB here): the returned anomaly map (381 MiB) is the only full-size float array; PIL's RGB copy of the
    input (381 MiB, freed before the map is made) and heat-map-sized work arrays come on top."""
    from cnc_hf_train.benchmark import PeakMemory

    side = 10000
    image = np.zeros((side, side, 3), np.uint8)
    image[::7] = 200  # some structure, cheaply
    memory = PeakMemory(torch.device("cpu"))
    with memory.measure():
        result = pipe(image)
    assert_correct(result, side, side)
    bound = 1.6 * side * side * 4 / 2**20
    assert memory.peak_mb < bound, f"peak growth {memory.peak_mb:.0f} MiB > bound {bound:.0f} MiB"


def test_files_beyond_pils_pixel_limit_are_refused_naming_them(pipe, processor, tmp_path, monkeypatch):
    """PIL's decompression-bomb limit is kept: files above 2 x PIL.Image.MAX_IMAGE_PIXELS (179 MP by default)
    are refused with a ValueError naming the file; between 1x and 2x PIL only warns and the image is used."""
    path = tmp_path / "big.png"
    PIL.Image.new("RGB", (50, 40)).save(path)  # 2000 pixels
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 999)
    for item, named in ((str(path), "big.png"), (path.read_bytes(), "bytes input")):
        with pytest.raises(ValueError, match=f"{named}.*exceeds limit.*MAX_IMAGE_PIXELS"):
            pipe(item)
    with pytest.raises(ValueError, match=r"images\[0\]: refused image file .*big.png.*MAX_IMAGE_PIXELS"):
        processor(str(path))
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1500)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
        assert_correct(pipe(str(path)), 40, 50)
