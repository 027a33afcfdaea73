"""CNCImageProcessor: every input kind, exact pixel values, masks, save/load and remote-code loading."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch

from cnc_hf.modeling.image_processing_cnc import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, CNCImageProcessor, to_rgb_pil

MEAN = np.asarray(OPENAI_CLIP_MEAN, dtype=np.float32)
STD = np.asarray(OPENAI_CLIP_STD, dtype=np.float32)


def expected_pixels(rgb, size=224):
    """pixel_values of a uniform image of colour `rgb` (uniform stays uniform under any resize)."""
    value = (np.asarray(rgb, dtype=np.float32) / 255.0 - MEAN) / STD
    return np.broadcast_to(value[:, None, None], (3, size, size))


def rgb_of(processor_output, index=0):
    """Invert normalisation and read back the 8-bit colour of a uniform processed image."""
    pixels = processor_output["pixel_values"][index].numpy()
    rgb = (pixels * STD[:, None, None] + MEAN[:, None, None]) * 255.0
    assert np.ptp(rgb, axis=(1, 2)).max() < 1e-3, "image should be uniform"
    return tuple(int(round(v)) for v in rgb[:, 0, 0])


@pytest.fixture(scope="module")
def processor():
    return CNCImageProcessor(size=16)


def test_defaults_are_the_papers():
    processor = CNCImageProcessor()
    assert processor.size == 224
    assert processor.image_mean == OPENAI_CLIP_MEAN and processor.image_std == OPENAI_CLIP_STD
    assert processor.resample == PIL.Image.Resampling.BICUBIC
    out = processor(PIL.Image.new("RGB", (50, 30), (10, 200, 30)))
    assert out["pixel_values"].shape == (1, 3, 224, 224) and out["pixel_values"].dtype == torch.float32
    np.testing.assert_allclose(out["pixel_values"][0].numpy(), expected_pixels((10, 200, 30)), atol=1e-5)
    assert "masks" not in out


def uniform(mode, value, size=(6, 5)):
    return PIL.Image.new(mode, size, value)


def palette_image(transparent):
    image = PIL.Image.new("P", (6, 5), 1)
    image.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    if transparent:
        image.info["transparency"] = 1
    return image


# mode -> (image, expected 8-bit RGB after conversion)
PIL_CASES = {
    "1": (uniform("1", 1), (255, 255, 255)),
    "L": (uniform("L", 100), (100, 100, 100)),
    "LA opaque": (uniform("LA", (100, 255)), (100, 100, 100)),
    "LA transparent": (uniform("LA", (100, 0)), (0, 0, 0)),
    "La": (uniform("La", (100, 255)), (100, 100, 100)),
    "P": (palette_image(False), (200, 100, 50)),
    "P transparent": (palette_image(True), (0, 0, 0)),
    "PA": (uniform("PA", (0, 255)), (0, 0, 0)),
    "RGB": (uniform("RGB", (1, 2, 3)), (1, 2, 3)),
    "RGBA opaque": (uniform("RGBA", (10, 20, 30, 255)), (10, 20, 30)),
    "RGBA half": (uniform("RGBA", (200, 100, 50, 128)), (100, 50, 25)),
    "RGBA transparent": (uniform("RGBA", (200, 100, 50, 0)), (0, 0, 0)),
    "RGBa": (uniform("RGBa", (10, 20, 30, 255)), (10, 20, 30)),
    "RGBX": (uniform("RGBX", (10, 20, 30, 0)), (10, 20, 30)),
    "CMYK white": (uniform("CMYK", (0, 0, 0, 0)), (255, 255, 255)),
    "CMYK cyan": (uniform("CMYK", (255, 0, 0, 0)), (0, 255, 255)),
    "YCbCr": (uniform("YCbCr", (128, 128, 128)), (128, 128, 128)),
    "HSV": (uniform("HSV", (0, 0, 90)), (90, 90, 90)),
    "I;16 max": (uniform("I;16", 65535), (255, 255, 255)),
    "I;16 mid": (uniform("I;16", 257 * 100), (100, 100, 100)),
    "I;16B": (uniform("I;16B", 257 * 7), (7, 7, 7)),
    "I 8-bit range": (uniform("I", 200), (200, 200, 200)),
    "I 16-bit range": (uniform("I", 257 * 40), (40, 40, 40)),
    "F unit range": (uniform("F", 0.5), (128, 128, 128)),
    "F 255 range": (uniform("F", 200.0), (200, 200, 200)),
}


@pytest.mark.parametrize("case", sorted(PIL_CASES))
def test_every_pil_mode(processor, case):
    image, rgb = PIL_CASES[case]
    converted = to_rgb_pil(image)
    assert converted.mode == "RGB" and converted.size == image.size
    assert converted.getpixel((0, 0)) == pytest.approx(rgb, abs=1)
    assert rgb_of(processor(image)) == pytest.approx(rgb, abs=1)


NUMPY_CASES = {
    "HxW uint8": (np.full((5, 7), 100, np.uint8), (100, 100, 100)),
    "HxWx1 uint8": (np.full((5, 7, 1), 100, np.uint8), (100, 100, 100)),
    "HxWx3 uint8": (np.broadcast_to(np.uint8([1, 2, 3]), (5, 7, 3)).copy(), (1, 2, 3)),
    "HxWx4 uint8": (np.broadcast_to(np.uint8([200, 100, 50, 0]), (5, 7, 4)).copy(), (0, 0, 0)),
    "HxWx2 uint8": (np.broadcast_to(np.uint8([90, 255]), (5, 7, 2)).copy(), (90, 90, 90)),
    "3xHxW uint8": (np.broadcast_to(np.uint8([1, 2, 3])[:, None, None], (3, 5, 7)).copy(), (1, 2, 3)),
    "uint16": (np.full((5, 7), 65535, np.uint16), (255, 255, 255)),
    "bool": (np.ones((5, 7), bool), (255, 255, 255)),
    "float32 unit": (np.full((5, 7, 3), 0.2, np.float32), (51, 51, 51)),
    "float64 unit": (np.full((5, 7), 1.0), (255, 255, 255)),
    "float 255": (np.full((5, 7), 17.0, np.float32), (17, 17, 17)),
    "int64 8-bit": (np.full((5, 7), 9, np.int64), (9, 9, 9)),
}


@pytest.mark.parametrize("case", sorted(NUMPY_CASES))
def test_numpy_inputs(processor, case):
    array, rgb = NUMPY_CASES[case]
    assert to_rgb_pil(array).size == (7, 5)  # PIL size is (width, height)
    assert rgb_of(processor(array)) == pytest.approx(rgb, abs=1)


def test_pil_numpy_and_torch_give_identical_pixels(processor):
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, size=(23, 31, 3), dtype=np.uint8)
    from_pil = processor(PIL.Image.fromarray(hwc))["pixel_values"]
    from_numpy = processor(hwc)["pixel_values"]
    from_torch_chw = processor(torch.from_numpy(hwc).permute(2, 0, 1))["pixel_values"]
    from_torch_hwc = processor(torch.from_numpy(hwc))["pixel_values"]  # last axis is the only channel axis
    from_float = processor(torch.from_numpy(hwc).permute(2, 0, 1).float() / 255)["pixel_values"]
    for other in (from_numpy, from_torch_chw, from_torch_hwc, from_float):
        torch.testing.assert_close(other, from_pil, rtol=0, atol=0)


def test_batches_lists_and_4d(processor):
    batch = torch.zeros(3, 3, 9, 9)
    assert processor(batch)["pixel_values"].shape == (3, 3, 16, 16)
    assert processor(np.zeros((2, 9, 9, 3), np.uint8))["pixel_values"].shape == (2, 3, 16, 16)
    mixed = [PIL.Image.new("L", (4, 4)), np.zeros((8, 3), np.uint8), torch.zeros(1, 5, 5)]
    assert processor(mixed)["pixel_values"].shape == (3, 3, 16, 16)
    assert isinstance(processor(mixed, return_tensors="np")["pixel_values"], np.ndarray)


def test_file_path_input_matches_decoded_image(processor, tmp_path):
    rng = np.random.default_rng(1)
    image = PIL.Image.fromarray(rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8))
    image.save(tmp_path / "x.png")
    torch.testing.assert_close(processor(str(tmp_path / "x.png"))["pixel_values"], processor(image)["pixel_values"])


def test_exif_orientation_is_applied_like_datasets(tmp_path):
    image = PIL.Image.new("RGB", (4, 2))
    exif = image.getexif()
    exif[PIL.Image.ExifTags.Base.Orientation] = 6  # rotate 90: stored 4x2, shown 2x4
    image.save(tmp_path / "rot.jpg", exif=exif)
    assert to_rgb_pil(str(tmp_path / "rot.jpg")).size == (2, 4)
    assert to_rgb_pil(PIL.Image.open(tmp_path / "rot.jpg")).size == (2, 4)


def test_mask_exif_orientation_is_applied_like_the_image(tmp_path):
    """Image and mask files stored 4x2 with EXIF orientation 6 are both shown 2x4: the mask is turned like
    its image (and like datasets.Image decodes it), instead of being refused as (2, 4) against (4, 2)."""
    processor = CNCImageProcessor(size=4)
    stored_mask = np.zeros((2, 4), np.uint8)
    stored_mask[0, 0] = 255  # the stored top-left pixel: top-right once rotated by 90 degrees
    for name, image in (("image.png", PIL.Image.new("RGB", (4, 2), (10, 20, 30))),
                        ("mask.png", PIL.Image.fromarray(stored_mask, "L"))):
        exif = image.getexif()
        exif[PIL.Image.ExifTags.Base.Orientation] = 6
        image.save(tmp_path / name, exif=exif)
    out = processor(str(tmp_path / "image.png"), segmentation_maps=str(tmp_path / "mask.png"))
    shown = np.zeros((4, 2), np.float32)
    shown[0, 1] = 1.0
    expected = np.asarray(PIL.Image.fromarray(shown).resize((4, 4), PIL.Image.Resampling.NEAREST))
    np.testing.assert_array_equal(out["masks"][0].numpy(), expected)
    opened = processor(PIL.Image.open(tmp_path / "image.png"), segmentation_maps=PIL.Image.open(tmp_path / "mask.png"))
    torch.testing.assert_close(opened["masks"], out["masks"])


def test_exotic_mode_masks_count_any_colour_channel():
    """CMYK/YCbCr/... masks count through their RGB colours, like colour masks: a dark red is a defect
    (it used to go through gray, where a dark enough colour rounds to 0)."""
    processor = CNCImageProcessor(size=2)
    mask = PIL.Image.new("RGB", (2, 2))
    mask.putpixel((0, 0), (2, 0, 0))
    ycbcr = mask.convert("YCbCr")
    assert np.asarray(ycbcr.convert("L"))[0, 0] == 0  # gray loses it
    out = processor(np.zeros((2, 2, 3), np.uint8), segmentation_maps=ycbcr)["masks"][0]
    assert out[0, 0] == 1.0


def test_large_image_is_resized_before_float(processor):
    # 6000x4000 RGB: a float copy would be ~290 MB; the processor resizes the 8-bit image first.
    big = PIL.Image.new("RGB", (6000, 4000), (30, 60, 90))
    assert rgb_of(processor(big)) == (30, 60, 90)


BAD_INPUTS = {
    "nan": (np.full((4, 4), np.nan, np.float32), "NaN"),
    "inf": (np.full((4, 4, 3), np.inf), "NaN or infinite"),
    "zero-size array": (np.zeros((0, 5), np.uint8), "empty image"),
    "zero-size pil": (PIL.Image.new("RGB", (0, 3)), "empty image"),
    "1-D": (np.zeros(5, np.uint8), "1-D"),
    "5-D": (np.zeros((1, 1, 2, 2, 3), np.uint8), "5-D"),
    "5 channels": (np.zeros((6, 6, 5), np.uint8), "no channel axis"),
    "complex": (np.zeros((4, 4), np.complex64), "unsupported dtype complex64"),
    "object": (np.zeros((4, 4), object), "unsupported dtype object"),
    "normalised": (np.full((4, 4, 3), -1.5, np.float32), "expected [0, 1]"),
    "int too big": (np.full((4, 4), 70000, np.int32), "expected 8-bit"),
    "negative int": (np.full((4, 4), -1, np.int16), "expected 8-bit"),
    "wrong type": (42, "unsupported input type int"),
    "missing file": ("/no/such/image.png", "/no/such/image.png"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_names_index_and_expectation(processor, case):
    bad, message = BAD_INPUTS[case]
    error = FileNotFoundError if case == "missing file" else ValueError
    with pytest.raises(error, match="images\\[1\\]") as info:
        processor([np.zeros((4, 4), np.uint8), bad])
    assert message in str(info.value)


def test_unreadable_file_is_a_value_error_naming_it(processor, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    with pytest.raises(ValueError, match="broken.png"):
        processor(str(tmp_path / "broken.png"))


def test_empty_batch_and_unknown_argument(processor):
    with pytest.raises(ValueError, match="empty list"):
        processor([])
    with pytest.raises(ValueError, match="do_resize"):
        processor(np.zeros((4, 4), np.uint8), do_resize=False)


def test_masks_nearest_and_binarised():
    processor = CNCImageProcessor(size=8)
    mask = np.zeros((4, 4), np.uint8)
    mask[:, :2] = [[1], [2], [3], [1]]  # VisA style: any non-zero value is a defect
    images = [np.zeros((4, 4, 3), np.uint8)] * 4
    masks = [
        mask,
        PIL.Image.fromarray(mask * 85),  # L
        PIL.Image.fromarray(np.stack([mask * 0, mask * 0, mask], -1)),  # colour mask: blue marks defect
        None,
    ]
    out = processor(images, segmentation_maps=masks)
    expected = np.zeros((8, 8), np.float32)
    expected[:, :4] = 1.0  # nearest neighbour: exactly the left half, values only 0/1
    assert out["masks"].shape == (4, 8, 8) and out["masks"].dtype == torch.float32
    for index in range(3):
        np.testing.assert_array_equal(out["masks"][index].numpy(), expected)
    assert out["masks"][3].sum() == 0


def test_mask_modes_and_torch_masks():
    processor = CNCImageProcessor(size=4)
    image = np.zeros((4, 4), np.uint8)
    p_mask = PIL.Image.new("P", (4, 4), 0)
    p_mask.putpixel((1, 1), 2)
    one_bit = PIL.Image.new("1", (4, 4), 0)
    one_bit.putpixel((1, 1), 1)
    i16 = PIL.Image.new("I;16", (4, 4), 0)
    i16.putpixel((1, 1), 3)
    t = torch.zeros(1, 4, 4)
    t[0, 1, 1] = 0.5
    out = processor([image] * 4, segmentation_maps=[p_mask, one_bit, i16, t])
    for index in range(4):
        assert out["masks"][index].nonzero().tolist() == [[1, 1]]


def test_mask_errors(processor):
    image = np.zeros((4, 6), np.uint8)
    with pytest.raises(ValueError, match=r"segmentation_maps\[0\].*same size"):
        processor(image, segmentation_maps=np.zeros((6, 4), np.uint8))
    with pytest.raises(ValueError, match="2 masks for 1 images"):
        processor(image, segmentation_maps=[None, None])
    with pytest.raises(ValueError, match=r"segmentation_maps\[0\].*NaN"):
        processor(image, segmentation_maps=np.full((4, 6), np.nan))


def test_constructor_validation():
    with pytest.raises(ValueError, match="size"):
        CNCImageProcessor(size=0)
    with pytest.raises(ValueError, match="square"):
        CNCImageProcessor(size={"height": 224, "width": 200})
    assert CNCImageProcessor(size={"height": 336, "width": 336}).size == 336
    with pytest.raises(ValueError, match="resample"):
        CNCImageProcessor(resample="cubic-ish")
    assert CNCImageProcessor(resample="bilinear").resample == 2
    with pytest.raises(ValueError, match="image_mean"):
        CNCImageProcessor(image_mean=[0.5, 0.5])


def test_post_process_anomaly_map(processor):
    anomaly_map = torch.zeros(16, 16)
    anomaly_map[:, 8:] = 1.0
    out = processor.post_process_anomaly_map(anomaly_map, (30, 40))
    assert out.shape == (30, 40) and out.dtype == np.float32
    assert out[:, :15].max() == 0.0 and out[:, 25:].min() == pytest.approx(1.0)  # bilinear: a ramp only near the edge
    np.testing.assert_allclose(processor.post_process_anomaly_map(np.full((1, 4, 4), 0.25), (7, 3)), 0.25)
    with pytest.raises(ValueError, match="expected \\(H, W\\)"):
        processor.post_process_anomaly_map(np.zeros((2, 4, 4)), (7, 3))


def test_deprecated_names_warn_and_give_the_same_result(processor):
    image = np.zeros((4, 6, 3), np.uint8)
    mask = np.zeros((4, 6), np.uint8)
    mask[1, 2] = 255
    with pytest.warns(FutureWarning, match="segmentation_maps"):
        old = processor(image, masks=mask)["masks"]
    torch.testing.assert_close(old, processor(image, segmentation_maps=mask)["masks"])
    with pytest.raises(ValueError, match="not both"), pytest.warns(FutureWarning):
        processor(image, segmentation_maps=mask, masks=mask)
    with pytest.warns(FutureWarning, match="post_process_anomaly_map"):
        old = processor.postprocess_anomaly_map(np.full((4, 4), 0.5), (7, 3))
    np.testing.assert_array_equal(old, processor.post_process_anomaly_map(np.full((4, 4), 0.5), (7, 3)))


def test_save_and_load_round_trip(tmp_path):
    processor = CNCImageProcessor(size=32, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.2, 0.2], resample=2)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["size"] == 32 and saved["resample"] == 2 and saved["image_std"] == [0.2, 0.2, 0.2]
    assert saved["auto_map"] == {"AutoImageProcessor": "image_processing_cnc.CNCImageProcessor"}
    assert (tmp_path / "image_processing_cnc.py").exists()  # the remote code travels with the config

    loaded = CNCImageProcessor.from_pretrained(tmp_path)
    settings = ("size", "image_mean", "image_std", "resample")
    assert {k: getattr(loaded, k) for k in settings} == {k: getattr(processor, k) for k in settings}
    image = np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    torch.testing.assert_close(loaded(image)["pixel_values"], processor(image)["pixel_values"], rtol=0, atol=0)
    assert CNCImageProcessor.from_pretrained(tmp_path, size=64).size == 64


def test_auto_image_processor_loads_remote_code_from_the_saved_dir_only(tmp_path):
    save_dir = tmp_path / "saved"
    CNCImageProcessor(size=48).save_pretrained(save_dir)
    # The subprocess cannot import cnc_hf (nor a stray modeling): the saved folder is the only source of the class.
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["modeling"] = None
        sys.modules["cnc_hf"] = None
        import numpy as np
        from transformers import AutoImageProcessor
        processor = AutoImageProcessor.from_pretrained({str(save_dir)!r}, trust_remote_code=True)
        assert type(processor).__name__ == "CNCImageProcessor", type(processor)
        assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
        out = processor(np.zeros((5, 5, 3), np.uint8), segmentation_maps=[None])
        print(processor.size, tuple(out["pixel_values"].shape), tuple(out["masks"].shape))
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "48 (1, 3, 48, 48) (1, 48, 48)"
