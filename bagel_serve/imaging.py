"""Image reading and preprocessing (pixels in, normalised tensors out), matching the reference BAGEL path.

Reproducing reference outputs depends on details that look incidental: the resize rule uses Python's
banker's rounding and may violate its own minimum edge, resizing is PIL bicubic (what torchvision
does for PIL input) and transparency is composited onto white. How the tensors become tokens (patch and
latent orderings, position ids) is `model/layout.py`'s.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Mapping

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 14 * 14 * 9 * 1024


@dataclass(frozen=True)
class ImageTransformConfig:
    """Parameters of the reference `ImageTransform` resize rule."""

    max_image_size: int
    min_image_size: int
    image_stride: int
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{f.name} must be a positive integer, got {value!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImageTransformConfig:
        """Build from a checkpoint's `vae_image_transform` / `vit_image_transform`; unknown keys are
        ignored, `max_pixels` defaults to the reference value."""
        missing = [k for k in ("max_image_size", "min_image_size", "image_stride") if k not in d]
        if missing:
            raise ValueError(f"image transform config lacks {', '.join(missing)}")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


VAE_TRANSFORM_DEFAULT = ImageTransformConfig(1024, 512, 16)
VIT_TRANSFORM_DEFAULT = ImageTransformConfig(980, 224, 14)


def _make_divisible(value: float, stride: int) -> int:
    # Python's round() is banker's rounding; the reference relies on it (e.g. 8.5 -> 8).
    return max(stride, int(round(value / stride) * stride))


def _apply_scale(width: int, height: int, scale: float, stride: int) -> tuple[int, int]:
    return _make_divisible(round(width * scale), stride), _make_divisible(round(height * scale), stride)


def resize_size(width: int, height: int, cfg: ImageTransformConfig) -> tuple[int, int]:
    """Output (W, H) of the reference `MaxLongEdgeMinShortEdgeResize` for one image.

    Kept bug-compatible: the pixel-budget rescale is not square-rooted, and the minimum short edge is
    not guaranteed for extreme aspect ratios (the max-edge cap wins).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    stride = cfg.image_stride
    scale = min(cfg.max_image_size / max(width, height), 1.0)
    scale = max(scale, cfg.min_image_size / min(width, height))
    new_w, new_h = _apply_scale(width, height, scale, stride)
    if new_w * new_h > cfg.max_pixels:
        scale = cfg.max_pixels / (new_w * new_h)
        new_w, new_h = _apply_scale(new_w, new_h, scale, stride)
    if max(new_w, new_h) > cfg.max_image_size:
        scale = cfg.max_image_size / max(new_w, new_h)
        new_w, new_h = _apply_scale(new_w, new_h, scale, stride)
    return new_w, new_h


def resize(img: Image.Image, cfg: ImageTransformConfig) -> Image.Image:
    """Resize like the reference transform (PIL bicubic, which is torchvision's PIL path)."""
    size = resize_size(img.width, img.height, cfg)
    return img.resize(size, Image.Resampling.BICUBIC)


class ImageInputError(ValueError):
    """An input image could not be read or decoded; the message names the image."""


def _to_8bit(img: Image.Image, what: str) -> Image.Image:
    """Greyscale images of more than 8 bits, scaled to 8 bits ("L"), so that `convert("RGB")` (which clips
    them: a 16-bit PNG turns white, a float TIFF black) sees the right values. Other modes pass through.

    * 16-bit ("I;16", "I;16L", "I;16B", "I;16N"): value / 257, rounded (65535 -> 255).
    * 32-bit integer ("I", how 16-bit PNGs open in some Pillow versions): read as 16-bit, so its values
      must lie in [0, 65535]; anything else has no known scale and is refused.
    * 32-bit float ("F"): values in [0, 1] are scaled by 255, rounded; anything else (negative, above 1,
      NaN) has no known scale and is refused.
    """
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img).astype(np.int64)
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise ImageInputError(f"{what}: a 32-bit integer image with values in [{lo}, {hi}] has no known scale "
                                  f"(16-bit values in [0, 65535] are read); convert it to 8 or 16 bits")
        out = Image.fromarray(((a + 128) // 257).astype(np.uint8), mode="L")
        t = img.info.get("transparency")
        if isinstance(t, int):
            out.info["transparency"] = (t + 128) // 257
        return out
    if mode == "F":
        a = np.asarray(img, dtype=np.float32)
        if a.size and not (np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0):
            lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
            raise ImageInputError(f"{what}: a floating-point image with values in [{lo:g}, {hi:g}] has no known scale "
                                  f"(values in [0, 1] are read, scaled by 255); convert it to 8 bits")
        return Image.fromarray(np.rint(a * 255.0).astype(np.uint8), mode="L")
    return img


def _pil_img2rgb(img: Image.Image) -> Image.Image:
    # Same rule as the reference: only RGBA or images carrying a `transparency` entry are
    # composited onto white; other modes with alpha (LA, PA, RGBa) go through convert("RGB"),
    # which drops the alpha channel instead of compositing. An RGB image is returned as it is.
    if img.mode == "RGBA" or img.info.get("transparency", None) is not None:
        rgba = img.convert("RGBA")
        white = Image.new(mode="RGB", size=rgba.size, color=(255, 255, 255))
        white.paste(rgba, mask=rgba.split()[3])
        return white
    if img.mode == "RGB":
        return img
    return img.convert("RGB")


def _rgb(img: Image.Image, what: str) -> Image.Image:
    img = _to_8bit(img, what)
    try:
        return _pil_img2rgb(img)
    except ValueError as e:  # a mode Pillow cannot convert (e.g. LAB)
        raise ImageInputError(f"{what}: cannot convert an image of mode {img.mode!r} to RGB: {e}") from None


def load_image(image: str | os.PathLike | Image.Image, *, what: str = "image") -> Image.Image:
    """Open (if given a path), fully decode, and convert an input image to 8-bit RGB as the reference does
    (16-bit and float greyscale scaled to 8 bits first, see `_to_8bit`).

    Decoding is forced here so that corrupt or truncated files fail now, with a message naming the
    file, rather than later inside preprocessing. Decode once and pass the returned image on (it is
    returned unchanged when it already is RGB), rather than the path, to avoid a second decode.
    """
    if isinstance(image, Image.Image):
        try:
            image.load()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise ImageInputError(f"{what}: cannot decode image: {e}") from e
        return _rgb(image, what)

    if not isinstance(image, (str, os.PathLike)):
        raise ImageInputError(f"{what}: expected a file path or PIL image, got {type(image).__name__}")
    path = os.fspath(image)
    if not os.path.exists(path):
        raise ImageInputError(f"{what}: file not found: {path}")
    if os.path.isdir(path):
        raise ImageInputError(f"{what}: is a directory, not an image file: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            decoded = img  # the pixels stay loaded once the file is closed
    except UnidentifiedImageError as e:
        raise ImageInputError(f"{what}: not a recognized image file: {path}") from e
    except Image.DecompressionBombError as e:
        raise ImageInputError(f"{what}: image too large: {path}: {e}") from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageInputError(f"{what}: corrupt or truncated image file: {path}: {e}") from e
    return _rgb(decoded, f"{what}: {path}")


def to_tensor(img: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1]: torchvision ToTensor then Normalize(0.5, 0.5), bit-identical."""
    if img.mode != "RGB":
        raise ValueError(f"to_tensor expects an RGB image, got mode {img.mode!r} (use load_image first)")
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    x = x.to(torch.float32).div(255)
    return (x - 0.5) / 0.5
