"""Rendered images of frames (PS3.18 8.3.5.1, 9.4.2 "rendered" and "thumbnail" resources).

The frame is decoded, the Modality LUT (rescale) applied, then the VOI window: the one the
request gives (``window=center,width,function``), else the instance's first WindowCenter/Width,
else the frame's own range.  MONOCHROME1 is inverted so bright is always dense.  Colour images
are converted to RGB.  The result is scaled to fit the requested viewport, keeping the aspect
ratio, and encoded as JPEG or PNG with Pillow.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from pydicom.multival import MultiValue
from pydicom.pixels.utils import pixel_array

from server.dicom.pixels import Frames, PixelError

RENDERED_TYPES = ("image/jpeg", "image/png", "image/gif")
THUMBNAIL_SIZE = 128


@dataclass(frozen=True)
class RenderOptions:
    window: tuple[float, float, str] | None = None  # center, width, function (PS3.18 8.3.5.1.4)
    viewport: tuple[int, int] | None = None  # columns, rows
    quality: int = 90
    media_type: str = "image/jpeg"


def parse_window(text: str | None) -> tuple[float, float, str] | None:
    if not text:
        return None
    parts = text.split(",")
    if len(parts) not in (2, 3):
        raise PixelError("window must be center,width[,function]", 400)
    try:
        center, width = float(parts[0]), float(parts[1])
    except ValueError:
        raise PixelError("window center and width must be numbers", 400) from None
    function = parts[2].strip().lower() if len(parts) == 3 else "linear"
    if function not in ("linear", "linear_exact", "sigmoid"):
        raise PixelError("window function must be linear, linear-exact or sigmoid", 400)
    if width <= 0:
        raise PixelError("window width must be positive", 400)
    return center, width, function


def parse_viewport(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    parts = text.split(",")
    try:
        columns, rows = int(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        raise PixelError("viewport must be columns,rows", 400) from None
    if not (0 < columns <= 4096 and 0 < rows <= 4096):
        raise PixelError("viewport sizes must be between 1 and 4096", 400)
    return columns, rows


def _first(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, MultiValue | list | tuple):
        return float(value[0]) if len(value) else None
    return float(value)


def _window(pixels: np.ndarray[Any, Any], center: float, width: float, fn: str) -> Any:
    if fn == "sigmoid":
        return 255.0 / (1.0 + np.exp(-4.0 * (pixels - center) / width))
    if fn == "linear_exact":
        return np.clip((pixels - (center - width / 2)) / width, 0.0, 1.0) * 255.0
    # PS3.3 C.11.2.1.2.1 linear
    low = center - 0.5 - (width - 1) / 2
    return np.clip((pixels - low) / max(width - 1, 1e-6), 0.0, 1.0) * 255.0


def render(frames: Frames, number: int, options: RenderOptions) -> bytes:
    if not 1 <= number <= frames.count:
        raise PixelError(f"frame {number} does not exist (the instance has {frames.count})")
    try:
        array = pixel_array(str(frames.path), index=number - 1)
    except Exception as exc:
        raise PixelError(f"cannot decode the pixel data: {exc}", 406) from exc
    h = frames.header
    photometric = str(h.get("PhotometricInterpretation", "MONOCHROME2"))
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        image = Image.fromarray(np.clip(array[..., :3], 0, 255).astype(np.uint8), "RGB")
    else:
        pixels = array.astype(np.float64)
        slope = _first(h.get("RescaleSlope")) or 1.0
        intercept = _first(h.get("RescaleIntercept")) or 0.0
        pixels = pixels * slope + intercept
        if options.window is not None:
            center, width, fn = options.window
        else:
            center_v, width_v = _first(h.get("WindowCenter")), _first(h.get("WindowWidth"))
            fn = str(h.get("VOILUTFunction", "LINEAR")).lower().replace("-", "_")
            if center_v is not None and width_v and width_v > 0:
                center, width = center_v, width_v
            else:
                low, high = float(pixels.min()), float(pixels.max())
                center, width = (low + high) / 2, max(high - low, 1.0)
        out = _window(pixels, center, width, fn if fn in ("sigmoid", "linear_exact") else "linear")
        if photometric == "MONOCHROME1":
            out = 255.0 - out
        image = Image.fromarray(np.round(out).astype(np.uint8), "L")
    if options.viewport is not None:
        columns, rows = options.viewport
        scale = min(columns / image.width, rows / image.height)
        size = (max(1, math.floor(image.width * scale)), max(1, math.floor(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if options.media_type == "image/png":
        image.save(buf, "PNG")
    elif options.media_type == "image/gif":
        image.save(buf, "GIF")
    else:
        image.save(buf, "JPEG", quality=options.quality)
    return buf.getvalue()
