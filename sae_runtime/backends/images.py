"""Image bytes in and out: PNG/JPEG decoding with clear errors, PNG encoding, heatmaps.

Every decoding failure is a typed error naming the request field: malformed or unsupported bytes
are InvalidArgument, bytes or pixel counts over the configured limits are TooLarge. The pixel
limit is checked from the header, before any pixel is decoded (no decompression bombs).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from sae_runtime.errors import InvalidArgument, TooLarge

ACCEPTED_FORMATS = ("PNG", "JPEG")


def decode_image(data: bytes, *, field: str = "image", max_bytes: int = 8 * 1024 * 1024, max_side: int = 1024) -> Image.Image:
    """Decode PNG or JPEG ``data`` into an RGB PIL image.

    Raises InvalidArgument (empty, malformed, truncated or not PNG/JPEG) or TooLarge (more than
    ``max_bytes`` bytes, or a side longer than ``max_side`` pixels), naming ``field``.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidArgument(f"expected image bytes, got {type(data).__name__}", field=field)
    data = bytes(data)
    if not data:
        raise InvalidArgument("image bytes are empty", field=field)
    if len(data) > max_bytes:
        raise TooLarge(f"image is {len(data)} bytes, over the limit of {max_bytes}", field=field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=list(ACCEPTED_FORMATS))
            w, h = img.size
            if max(w, h) > max_side:
                raise TooLarge(f"image is {w}x{h} pixels, over the limit of {max_side} per side", field=field)
            img.load()
    except TooLarge:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise TooLarge(f"image has too many pixels: {err}", field=field) from None
    except UnidentifiedImageError:
        raise InvalidArgument("not a PNG or JPEG image (could not identify the bytes)", field=field) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise InvalidArgument(f"malformed image: {err}", field=field) from None
    if w == 0 or h == 0:
        raise InvalidArgument("image has a zero-sized side", field=field)
    return img.convert("RGB")


def encode_png(image: Image.Image | np.ndarray) -> bytes:
    """PNG bytes of a PIL image or a uint8 array (H, W, 3) / (H, W)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def png_to_array(data: bytes) -> np.ndarray:
    """uint8 array (H, W, C) of PNG/JPEG bytes (a test and client convenience; no limits)."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _colormap(t: np.ndarray) -> np.ndarray:
    """A black-red-yellow-white ramp for t in [0, 1] -> uint8 (..., 3)."""
    r = np.clip(3.0 * t, 0, 1)
    g = np.clip(3.0 * t - 1.0, 0, 1)
    b = np.clip(3.0 * t - 2.0, 0, 1)
    return (np.stack([r, g, b], axis=-1) * 255.0).round().astype(np.uint8)


def render_heatmap(values: np.ndarray | Tensor, base: Image.Image | None = None, *, alpha: float = 0.6, vmax: float | None = None) -> bytes:
    """PNG of a (h, w) activation map, upsampled to ``base``'s size and blended over it.

    Values are scaled to [0, 1] by ``vmax`` (default: the map's maximum; negative values count as
    0). Without ``base`` the heatmap alone is rendered at the map's resolution.
    """
    v = values.detach().cpu().float().numpy() if isinstance(values, Tensor) else np.asarray(values, dtype=np.float32)
    if v.ndim != 2:
        raise ValueError(f"heatmap values must be 2-D, got shape {v.shape}")
    v = np.clip(v, 0.0, None)
    top = float(v.max()) if vmax is None else float(vmax)
    t = v / top if top > 0 else np.zeros_like(v)
    heat = Image.fromarray(_colormap(np.clip(t, 0.0, 1.0)))
    if base is None:
        return encode_png(heat)
    heat = heat.resize(base.size, resample=Image.Resampling.BILINEAR)
    return encode_png(Image.blend(base.convert("RGB"), heat, alpha))
