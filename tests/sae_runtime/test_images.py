"""Image decoding errors, PNG round trips, heatmaps and mask resampling."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from sae_runtime.backends.images import decode_image, encode_png, png_to_array, render_heatmap
from sae_runtime.errors import InvalidArgument, TooLarge


def image_bytes(fmt: str, size=(20, 12), mode="RGB") -> bytes:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def test_png_and_jpeg_decode_to_rgb():
    png = image_bytes("PNG")
    img = decode_image(png)
    assert img.mode == "RGB" and img.size == (20, 12)
    assert np.array_equal(np.asarray(img), png_to_array(png))
    assert decode_image(image_bytes("JPEG")).size == (20, 12)
    assert decode_image(image_bytes("PNG", mode="L")).mode == "RGB"


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", image_bytes("PNG")[:60], image_bytes("GIF")],
    ids=["empty", "garbage", "truncated", "gif"],
)
def test_malformed_bytes_are_invalid_argument_naming_the_field(data):
    with pytest.raises(InvalidArgument) as e:
        decode_image(data, field="messages[0].image")
    assert e.value.field == "messages[0].image"
    assert e.value.status == "INVALID_ARGUMENT"


def test_oversized_images_are_too_large():
    png = image_bytes("PNG", size=(40, 10))
    with pytest.raises(TooLarge) as e:
        decode_image(png, max_bytes=len(png) - 1)
    assert e.value.field == "image"
    with pytest.raises(TooLarge) as e:
        decode_image(png, max_side=39)
    assert "40x10" in e.value.message
    assert decode_image(png, max_side=40).size == (40, 10)


def test_encode_png_round_trip():
    arr = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    data = encode_png(arr)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(png_to_array(data), arr)


def test_heatmap_is_blended_over_the_base_image():
    base = Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8))
    values = np.zeros((4, 4), dtype=np.float32)
    values[0, 0] = 2.0
    out = png_to_array(render_heatmap(values, base, alpha=1.0))
    assert out.shape == (32, 32, 3)
    assert out[0, 0].sum() > 600 and out[31, 31].sum() == 0  # hot corner white, cold corner black
    alone = png_to_array(render_heatmap(torch.tensor(values)))
    assert alone.shape == (4, 4, 3) and tuple(alone[0, 0]) == (255, 255, 255)
