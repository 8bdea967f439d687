"""The one preprocessing path shared by training, validation, evaluation and prediction.

decode -> convert colour mode -> resize the shorter side -> centre crop -> uint8 CHW tensor.
Training adds batch augmentation on those uint8 tensors; the float conversion and the
normalisation live inside the model (``Normalize``), so a checkpoint or an exported model
carries its own statistics and nothing downstream can forget them.
"""

from __future__ import annotations

import io
import re
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torch import nn

from classlab.config import HEIF_EXTENSIONS

IGNORED_FILES = frozenset({"thumbs.db", "desktop.ini"})
# What operating systems leave in folders: dotfiles (.DS_Store, macOS's ._photo.jpg twins), these files, and the
# __MACOSX folder a macOS zip unpacks to beside the data. Never data, never a problem.
SYSTEM_FOLDERS = frozenset({"__macosx"})


def is_system_file(name: str) -> bool:
    """A file or folder name the OS or a tool made (hidden, Thumbs.db, __MACOSX), passed over everywhere."""
    return name.startswith(".") or name.lower() in IGNORED_FILES or name.lower() in SYSTEM_FOLDERS


# Truncated files must fail loudly, not decode into grey half-images.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class BadImage(Exception):
    """An image file that cannot be decoded; the message says why in a few words."""


_PIL_LIMIT = threading.Lock()
_HEIF: list[bool] = []  # [registered?] once pillow-heif was looked for
_HEIF_LOOKUP = threading.Lock()


def heif_readable() -> bool:
    """Whether PIL reads HEIC/HEIF here: pillow-heif installed, its opener registered (once, on first use)."""
    with _HEIF_LOOKUP:
        if not _HEIF:
            try:
                import pillow_heif
            except ImportError:
                _HEIF.append(False)
            else:
                pillow_heif.register_heif_opener()
                _HEIF.append(True)
    return _HEIF[0]


NO_HEIF = "a HEIC/HEIF photo, which Pillow reads through pillow-heif: pip install pillow-heif, or convert it to JPEG"


def pixel_limit(max_pixels: int | None = None) -> int | None:
    """The largest image (width x height) classlab decodes: ``data.max_image_pixels``, else PIL's limit."""
    return max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS


def _open_limited(handle: str | Path | io.BytesIO, max_pixels: int | None) -> Image.Image:
    """Open (header only) and refuse an image that declares more pixels than the limit.

    A PNG of a few hundred kB can declare 400 megapixels; decoding it would take gigabytes. The
    header says the size before a byte of pixels is decoded, so the check costs nothing, and
    memory stays bounded by the limit. PIL's own guard raises only above twice its limit (and
    warns between); a limit above PIL's lifts PIL's guard for this one open.
    """
    limit = pixel_limit(max_pixels)
    try:
        if limit is None or Image.MAX_IMAGE_PIXELS is None or limit <= Image.MAX_IMAGE_PIXELS:
            img = Image.open(handle)
        else:
            with _PIL_LIMIT:
                saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, limit
                try:
                    img = Image.open(handle)
                finally:
                    Image.MAX_IMAGE_PIXELS = saved
    except Image.DecompressionBombError as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        declared = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise BadImage(_too_large(declared, limit)) from None
    width, height = img.size
    if limit is not None and width * height > limit:
        img.close()
        raise BadImage(_too_large(f"{width}x{height} = {width * height:,} pixels", limit))
    return img


def _too_large(declared: str, limit: int | None) -> str:
    return f"declares {declared}, more than data.max_image_pixels ({limit:,}); not decoded (decompression bomb guard)"


def open_image(source: str | Path | bytes, size: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """Decode fully (so truncation is caught here, not in the middle of an epoch), upright.

    ``size`` lets a large JPEG decode at a reduced scale that still covers ``size`` pixels on
    its shorter side: a 12-megapixel photo bound for 128 pixels decodes many times faster.
    Phone photos carry their orientation in EXIF; it is applied so images train upright.
    An image declaring more than ``max_pixels`` (default: PIL's limit) is a BadImage, undecoded.
    """
    if not heif_readable() and not isinstance(source, bytes) and Path(source).suffix.lower() in HEIF_EXTENSIONS:
        raise BadImage(NO_HEIF)
    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else source
        with _open_limited(handle, max_pixels) as img:
            if size and img.format == "JPEG":
                img.draft(img.mode, (size, size))
            img.load()
            img = ImageOps.exif_transpose(img) if img.getexif().get(0x0112, 1) != 1 else img.copy()
            return img if img.mode != "P" else img.convert("RGBA")
    except UnidentifiedImageError:
        empty = len(source) == 0 if isinstance(source, bytes) else _is_empty_file(source)
        raise BadImage("an empty file (0 bytes)" if empty else "not an image PIL can read") from None
    except (OSError, SyntaxError, ValueError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadImage(text[:120]) from None


def upright(img: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says (a phone's photo held sideways), as ``open_image`` turns
    every file; an image without the tag, or already turned (``ImageOps.exif_transpose`` drops it), as it is."""
    return ImageOps.exif_transpose(img) if img.getexif().get(0x0112, 1) != 1 else img


def _is_empty_file(path: str | Path) -> bool:
    """A zero-byte file: an interrupted copy or download, which 'not an image' would misname."""
    try:
        return Path(path).stat().st_size == 0
    except OSError:
        return False


HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer images (microscopy, medical, depth) and float images as 8-bit grayscale.

    Pillow's ``convert`` clips them to 0..255: a 16-bit photo turns white, a float one in [0, 1] black.
    Integers are scaled from the full 16-bit range (value / 256, as torchvision scales uint16), the
    same for every image, so relative brightness across a data set is kept; floats in [0, 1] are
    scaled by 255, others clipped to 0..255.
    """
    if img.mode in HIGH_DEPTH_MODES:
        values = np.asarray(img.convert("I") if img.mode != "I" else img, dtype=np.int64)
        return Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), "L")
    if img.mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and values.max() <= 1.0:
            values = values * 255.0
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    return img


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Grayscale, palette and alpha images become ``channels``-channel images; alpha is laid on white."""
    img = to_8bit(img)
    if channels == 1:
        return img.convert("L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def fit(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` and take the centre ``size`` x ``size`` square."""
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=None)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


def image_to_tensor(img: Image.Image, size: int, channels: int = 3) -> torch.Tensor:
    """A PIL image as the uint8 (C, size, size) tensor every path feeds the model."""
    arr = np.asarray(fit(to_mode(img, channels), size), dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def array_to_tensor(arr: np.ndarray | torch.Tensor, size: int, channels: int = 3) -> torch.Tensor:
    """An HWC / HW array or tensor (or CHW, torch's layout) through the same path as a decoded file."""
    arr = arr.cpu().numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)  # a CHW numpy array (a tensor's .numpy()) as a CHW tensor is read
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.uint8:
        # uint16 (or wider values) as a 16-bit file reads (to_8bit); other integers in 0..255 as they are
        wide = arr.dtype == np.uint16 or arr.max(initial=0) > 255
        arr = (np.clip(arr, 0, 65535).astype(np.int64) >> (8 if wide else 0)).astype(np.uint8)
    elif arr.dtype != np.uint8:
        scale = 255.0 if arr.max() <= 1.0 else 1.0
        arr = np.clip(arr * scale, 0, 255).round().astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return image_to_tensor(Image.fromarray(arr), size, channels)


class Normalize(nn.Module):
    """uint8-range or [0, 1] float input -> normalised float, with the training split's statistics.

    ``mean``/``std`` are (C,) for per-channel normalisation or (C, H, W) for He et al.'s per-pixel
    mean subtraction. They are buffers, so they travel inside every checkpoint and export.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        if mean.ndim == 1:
            mean = mean[:, None, None]
        if std.ndim == 1:
            std = std[:, None, None]
        self.register_buffer("mean", mean.float().clone())
        self.register_buffer("std", std.float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        out = (x - self.mean) / self.std
        # trainer.precision=bf16-true casts the buffers with the weights: the network takes their dtype, not float32
        return out if out.dtype == self.mean.dtype else out.to(self.mean.dtype)


def compute_stats(images: torch.Tensor, per_pixel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std in [0, 1] units of a uint8 (N, C, H, W) tensor, computed in chunks.

    ``per_pixel`` gives the mean image (C, H, W) and a unit std, as in the ResNet paper.
    """
    n, c = images.shape[:2]
    total = torch.zeros(images.shape[1:], dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for start in range(0, n, 4096):
        chunk = images[start : start + 4096].double().div_(255.0)
        total += chunk.sum(0)
        total_sq += chunk.pow(2).sum((0, 2, 3))
    pixels = n * images.shape[2] * images.shape[3]
    channel_mean = total.sum((1, 2)) / pixels
    std = (total_sq / pixels - channel_mean.pow(2)).clamp_min(1e-12).sqrt()
    if per_pixel:
        # He et al. (2016) subtract the per-pixel mean image and do not divide by a deviation.
        return (total / n).float(), torch.ones(c)
    return channel_mean.float(), std.float().clamp_min(1e-3)
