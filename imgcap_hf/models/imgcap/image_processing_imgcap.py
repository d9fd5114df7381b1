"""Image loading and preprocessing for ImgCap: any picture in, ImageNet-normalised `pixel_values` out.

Shipped to Hub users as remote code: imports only the standard library, numpy, Pillow, torch and transformers.

Three public pieces, meant to be shared by training, evaluation and serving so that all of them see the same pixels:

- `load_image(source)` opens a path, bytes or binary file safely and turns every failure into one `ValueError`.
- `to_rgb_image(image)` turns a PIL image, numpy array or torch tensor into an upright 8-bit RGB PIL image.
- `ImgCapImageProcessor` resizes, centre-crops and normalises like microsoft/resnet-50's evaluation transform.
"""

import io
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_base import BatchFeature
from transformers.image_transforms import get_resize_output_image_size, get_size_with_aspect_ratio
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ChannelDimension,
    PILImageResampling,
    SizeDict,
    get_image_size_for_max_height_width,
)
from transformers.processing_utils import ImagesKwargs

# Pixels one image may have once decoded: above any common camera (48-50 MP phones and DSLRs) and about 150 MB as
# RGB. Pillow's own decompression-bomb threshold (`Image.MAX_IMAGE_PIXELS`, about 89.5 MP) applies on top.
DEFAULT_MAX_PIXELS = 50_000_000

# Longest long-side-to-short-side ratio kept before the resize. A longer image is trimmed to its middle part first:
# resizing its short side to 256 would otherwise make a huge strip (a 1 x 20,000 PNG of a few hundred bytes would
# become 256 x 5,120,000 pixels, about 4 GB) of which the centre crop keeps only the middle square anyway.
MAX_ASPECT_RATIO = 4

# Channel counts an array may have: grey, RGB, RGB + alpha.
_CHANNEL_COUNTS = (1, 3, 4)

_IMAGE_TYPES = (Image.Image, np.ndarray, torch.Tensor)


# ---------------------------------------------------------------------------------------------------------------------
# Any image -> upright 8-bit RGB
# ---------------------------------------------------------------------------------------------------------------------


def to_rgb_image(image: "Image.Image | np.ndarray | torch.Tensor") -> Image.Image:
    """Return `image` as an upright, 8-bit RGB PIL image: always a new object (an animation is rewound to frame 0).

    Every input goes through the same rules, so training, evaluation and serving see identical pixels:

    - PIL images: the first frame of animations, the EXIF orientation applied (`ImageOps.exif_transpose`: phone photos
      are stored sideways with a rotation tag), then converted from any mode (`1`, `L`, `P`, `LA`, `RGBA`, `CMYK`,
      `I;16`, `I`, `F`, ...).
    - numpy arrays: `(H, W)`, `(H, W, C)` or, when unambiguous, `(C, H, W)`, with C = 1 (grey), 3 (RGB) or 4 (RGBA).
    - torch tensors: `(C, H, W)` (torch's layout), `(H, W)` or, when unambiguous, `(H, W, C)`.

    Transparency (an alpha band, or a palette/`tRNS` transparent colour) is composited onto white, which is how an
    image viewer shows it; dropping alpha instead would reveal whatever colour the transparent pixels happen to hold.

    Pixel values beyond 8 bits are scaled, never clipped (clipping turns a 16-bit mid-grey into white):
    `uint16` data and `I;16` images are divided by 257 (65535 -> 255); other integer and float data are read as
    floats in [0, 1] if they all lie there, else as 8-bit if they fit in [0, 255], else as 16-bit if they fit in
    [0, 65535], else they are stretched from their minimum to their maximum.

    Raises:
        TypeError: `image` is not a PIL image, numpy array or torch tensor.
        ValueError: the array has an unusable shape, non-finite values, or the image mode cannot be converted.
    """
    if isinstance(image, Image.Image):
        return _pil_to_rgb(_first_frame_upright(image))
    if isinstance(image, torch.Tensor):
        if image.is_floating_point():
            image = image.float()  # numpy has no bfloat16
        return _array_to_rgb(image.detach().cpu().numpy(), channels_first=True)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, channels_first=False)
    raise TypeError(f"Expected a PIL image, numpy array or torch tensor, got {type(image).__name__}.")


def _first_frame_upright(image: Image.Image) -> Image.Image:
    """A copy of the first frame with its EXIF orientation applied."""
    if getattr(image, "is_animated", False):
        image.seek(0)
    return ImageOps.exif_transpose(image)


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        # Pillow's own conversion clips these modes to 0..255 (a 16-bit mid-grey becomes white): scale them first.
        image = Image.fromarray(_scale_to_uint8(np.asarray(image)))
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise ValueError(f"Cannot convert an image of mode {image.mode!r} to RGB ({error}).") from error


def _array_to_rgb(pixels: np.ndarray, channels_first: bool) -> Image.Image:
    """Convert a grey/RGB/RGBA array (see `to_rgb_image` for the accepted layouts and value ranges)."""
    pixels = _scale_to_uint8(_to_channels_last(pixels, channels_first))
    if pixels.shape[-1] == 1:
        return Image.fromarray(pixels[..., 0]).convert("RGB")
    return _pil_to_rgb(Image.fromarray(pixels))  # RGBA arrays are composited onto white like RGBA images


def _to_channels_last(pixels: np.ndarray, channels_first: bool) -> np.ndarray:
    """`(H, W, C)` view of a 2-D or 3-D array; `channels_first` says which layout wins when both would fit."""
    if pixels.ndim == 2:
        return pixels[..., None]
    if pixels.ndim == 3 and min(pixels.shape) > 0:
        first_fits, last_fits = pixels.shape[0] in _CHANNEL_COUNTS, pixels.shape[-1] in _CHANNEL_COUNTS
        if last_fits and not (channels_first and first_fits):
            return pixels
        if first_fits:
            return np.moveaxis(pixels, 0, -1)
    raise ValueError(
        f"Expected an image array of shape (H, W), (H, W, C) or (C, H, W) with C in {_CHANNEL_COUNTS}, "
        f"got shape {tuple(pixels.shape)}."
    )


def _scale_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Map pixel values to 0..255 by the data's bit depth or range (rules in `to_rgb_image`'s docstring)."""
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype == np.bool_:
        return pixels.astype(np.uint8) * 255
    if pixels.dtype == np.uint16:
        return np.round(pixels / 257).astype(np.uint8)
    if not (np.issubdtype(pixels.dtype, np.integer) or np.issubdtype(pixels.dtype, np.floating)):
        raise ValueError(f"Image arrays must hold integers or real numbers, got dtype {pixels.dtype}.")
    values = pixels.astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError("The image array contains NaN or infinite values.")
    low, high = values.min(), values.max()
    if low >= 0 and high <= 1 and np.issubdtype(pixels.dtype, np.floating):
        values = values * 255
    elif low >= 0 and high <= 255:
        pass
    elif low >= 0 and high <= 65535:
        values = values / 257
    elif high > low:
        values = (values - low) * (255 / (high - low))
    else:
        values = np.zeros_like(values)  # constant and out of every range above: no contrast to keep
    return np.round(values).astype(np.uint8)


def _aspect_ratio_window(height: int, width: int, max_ratio: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the middle part of a `height` x `width` image whose long side is at most
    `max_ratio` times its short side."""
    keep = max_ratio * min(height, width)
    kept_height, kept_width = min(height, keep), min(width, keep)
    return (height - kept_height) // 2, (width - kept_width) // 2, kept_height, kept_width


def _trim_to_aspect_ratio(image: np.ndarray, max_ratio: int) -> np.ndarray:
    """The middle part of a `(C, H, W)` image whose long side is at most `max_ratio` times its short side (a view)."""
    top, left, height, width = _aspect_ratio_window(image.shape[1], image.shape[2], max_ratio)
    return image[:, top : top + height, left : left + width]


# ---------------------------------------------------------------------------------------------------------------------
# Safe loading from files and bytes
# ---------------------------------------------------------------------------------------------------------------------


def load_image(
    source: "str | os.PathLike | bytes | BinaryIO",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int | None = None,
) -> Image.Image:
    """Open an image file (path, bytes or binary file object) as an upright RGB PIL image, fully decoded.

    Every problem becomes a `ValueError` whose message is one sentence naming the file (its name only, never its
    directory) and what is wrong: missing, empty, not an image (random bytes, SVG or other text), truncated or corrupt
    (the whole image is decoded here so that a cut-off JPEG fails now and not later in a data loader), or too large.
    Animated images give their first frame. The conversion is `to_rgb_image`'s.

    Args:
        source: a file path, the file's bytes, or a file object opened in binary mode (read to the end).
        max_pixels: refuse images that would decode to more pixels than this, a guard against decompression bombs
            (a few hundred bytes of PNG can declare gigapixels). An image whose header declares more than Pillow's
            `Image.MAX_IMAGE_PIXELS` (where Pillow warns with `DecompressionBombWarning`) is refused too, whatever
            `max_pixels` says, so raising `max_pixels` above that has no effect. The check is done here, on the
            header's size and before any pixel is decoded, without touching the process-wide warning filters, so
            `load_image` is safe to call from many threads at once (Pillow still emits its warning, once per process
            under Python's default filters).
        min_side: when set, JPEGs are decoded at the smallest reduced scale (1/2, 1/4 or 1/8, done by the JPEG
            decoder itself, so memory and time shrink too) that keeps both sides at least `min_side` pixels. Pass
            the processor's resize edge (e.g. 256) when only a model input is needed; leave `None` to keep full size.
            The reduced decode is slightly different from a full decode plus resize, so use the same setting for
            training and serving.

    Raises:
        TypeError: `source` is not a path, bytes or a binary file object.
        ValueError: the file is missing, empty, not an image, corrupt or too large.
    """
    label, openable = _openable(source)
    bomb_message = (
        f"Cannot read image {label}: it declares more than Pillow's limit of {Image.MAX_IMAGE_PIXELS:,} pixels "
        "(possible decompression bomb)."
    )
    try:
        # No `warnings.catch_warnings()` here: it swaps process-wide state and is not thread-safe (the app loads
        # images from several worker threads). Pillow's warning limit is checked below instead.
        image = Image.open(openable)
    except UnidentifiedImageError as error:
        raise ValueError(
            f"Cannot read image {label}: it is not in an image format Pillow can decode (JPEG, PNG, GIF, WebP, ...)."
        ) from error
    # DecompressionBombWarning arrives as an exception only where the caller's filters say "error".
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ValueError(bomb_message) from error
    except OSError as error:
        # An errno means the file system refused (permissions, ...); none means Pillow could not parse the header.
        reason = error.strerror if error.errno is not None else f"it is truncated or corrupt ({error})"
        raise ValueError(f"Cannot read image {label}: {reason}.") from error

    with image:
        width, height = image.size
        if Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS:
            raise ValueError(bomb_message)  # where Pillow only warns: refused like its error
        if min_side is not None and image.format in ("JPEG", "MPO"):  # MPO: the JPEG variant many cameras write
            image.draft(None, (min_side, min_side))
        width, height = image.size
        if width * height > max_pixels:
            raise ValueError(
                f"Cannot read image {label}: {width}x{height} pixels is more than the {max_pixels:,} allowed."
            )
        try:
            image.load()
        except (OSError, SyntaxError, EOFError, ValueError) as error:
            raise ValueError(f"Cannot read image {label}: it is truncated or corrupt ({error}).") from error
        try:
            return to_rgb_image(image)
        except ValueError as error:
            raise ValueError(f"Cannot read image {label}: {error}") from error


def _openable(source: "str | os.PathLike | bytes | BinaryIO") -> tuple[str, "Path | io.BytesIO"]:
    """A description of `source` for error messages and something `Image.open` reads; checks paths and emptiness."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = repr(path.name)
        if not path.exists():
            raise ValueError(f"Cannot read image {label}: the file does not exist.")
        if not path.is_file():
            raise ValueError(f"Cannot read image {label}: it is a directory or special file, not a regular file.")
        if path.stat().st_size == 0:
            raise ValueError(f"Cannot read image {label}: the file is empty (0 bytes).")
        return label, path
    if isinstance(source, (bytes, bytearray, memoryview)):
        label, data = "from bytes", bytes(source)
    elif hasattr(source, "read"):
        name = getattr(source, "name", None)
        label = repr(Path(name).name) if isinstance(name, str) else "from file object"
        data = source.read()
        if not isinstance(data, bytes):
            raise TypeError(f"The file object for image {label} must be opened in binary mode ('rb').")
    else:
        raise TypeError(f"load_image expects a path, bytes or a binary file object, got {type(source).__name__}.")
    if not data:
        raise ValueError(f"Cannot read image {label}: the data is empty (0 bytes).")
    return label, io.BytesIO(data)


# ---------------------------------------------------------------------------------------------------------------------
# Image processor
# ---------------------------------------------------------------------------------------------------------------------


def _trims_to_aspect_ratio(do_resize: bool, resize_size: SizeDict | None) -> bool:
    """Whether preprocessing trims images to `MAX_ASPECT_RATIO`: only a shortest-edge resize enlarges a thin strip."""
    return bool(do_resize and resize_size is not None and resize_size.shortest_edge)


def _size_dict(size: "dict | SizeDict | None") -> SizeDict | None:
    """A size as a `SizeDict`: a processor built in this process holds one, a saved config gives a plain dict."""
    return size if size is None or isinstance(size, SizeDict) else SizeDict(**size)


def _seen_span(offset: int, kept: int, resized: int, crop: int | None, total: int) -> tuple[float, float]:
    """The fractions (start, end) of an image side of `total` pixels that one axis of preprocessing keeps: the trim
    keeps `kept` pixels from `offset`, the resize makes them `resized`, and the centre crop (`None`: no crop) keeps
    `crop` of those, starting where `center_crop` starts it. A crop longer than the side pads it, so the whole side
    is seen."""
    start, end = 0, resized
    if crop is not None:
        start = max(0, (resized - crop) // 2)
        end = min(resized, (resized - crop) // 2 + crop)
    scale = kept / resized  # original pixels per resized pixel
    return (offset + start * scale) / total, (offset + end * scale) / total


class ImgCapImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    crop_pct (`float`, *optional*, defaults to `self.crop_pct`):
        Fraction of the resized image kept by the centre crop: unless `size` is given, the shortest edge is resized to
        `int(max(crop_size) / crop_pct)` before cropping to `crop_size`.
    """

    crop_pct: float


class ImgCapImageProcessor(PilBackend):
    r"""
    ImageNet evaluation preprocessing, as microsoft/resnet-50 was evaluated: resize the shortest edge to
    `crop_size / crop_pct` (224 / 0.875 = 256) with bicubic resampling, centre-crop to `crop_size`, rescale to [0, 1]
    and normalise with the ImageNet mean and standard deviation. An image more than `MAX_ASPECT_RATIO` (4) times
    longer than wide, or the reverse, is first trimmed to its middle part of that ratio, so that a 1 x 20,000 strip
    cannot be resized into gigabytes; the centre crop never reaches the trimmed parts.

    Every input first goes through `to_rgb_image` (EXIF orientation, first frame, any mode or bit depth to RGB, alpha
    composited onto white), so inputs that other image processors mangle (RGBA, palette, CMYK, 16-bit) work here.
    It runs on PIL and numpy only (no torchvision needed). `crop_box(width, height)` says which part of a picture
    the output shows, for drawing attention maps on it.

    Args:
        crop_size (`dict[str, int]` or `int`, *optional*, defaults to `{"height": 224, "width": 224}`):
            Size of the model input; an int means a square.
        crop_pct (`float`, *optional*, defaults to 0.875):
            Fraction of the resized image kept by the centre crop (in (0, 1]); sets the resize edge when `size` is
            `None`.
        size (`dict[str, int]`, *optional*, defaults to `None`):
            Explicit resize target (e.g. `{"shortest_edge": 256}`), overriding the one derived from `crop_pct`.
        resample (`PILImageResampling`, *optional*, defaults to `PILImageResampling.BICUBIC`):
            Resampling filter for the resize.
        do_resize, do_center_crop, do_rescale, do_normalize (`bool`, *optional*, default to `True`):
            Whether to apply each step.
        rescale_factor (`float`, *optional*, defaults to 1/255):
            Factor applied by the rescale step.
        image_mean, image_std (`list[float]`, *optional*, default to the ImageNet statistics):
            Per-channel normalisation.

    Example:

    ```python
    >>> from PIL import Image
    >>> from imgcap_hf import ImgCapImageProcessor
    >>> processor = ImgCapImageProcessor()
    >>> processor(Image.new("RGBA", (640, 480)), return_tensors="pt")["pixel_values"].shape
    torch.Size([1, 3, 224, 224])

    ```
    """

    valid_kwargs = ImgCapImageProcessorKwargs
    model_input_names = ["pixel_values"]

    crop_size = {"height": 224, "width": 224}
    crop_pct = 0.875
    resample = PILImageResampling.BICUBIC
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    default_to_square = False  # an int `size` means the shortest edge
    do_resize = True
    do_center_crop = True
    do_rescale = True
    do_normalize = True

    def _prepare_images_structure(self, images, expected_ndims: int = 3) -> list:
        """A flat list of images from one image, a sequence of images (a list, a tuple, a `datasets` column...), or a
        4-D batch array/tensor."""
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
            return list(images)
        if isinstance(images, _IMAGE_TYPES):
            return [images]  # `to_rgb_image` checks its shape
        if not isinstance(images, (str, bytes, dict)) and hasattr(images, "__iter__"):
            images = list(images)
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("Got an empty list of images.")
            for position, image in enumerate(images):
                if not isinstance(image, _IMAGE_TYPES):
                    raise TypeError(
                        f"Image {position} of the batch is a {type(image).__name__}; expected a PIL image, numpy "
                        "array or torch tensor (use `load_image` for paths and bytes)."
                    )
            return list(images)
        raise TypeError(
            f"Expected a PIL image, numpy array, torch tensor or a list of them, got {type(images).__name__} "
            "(use `load_image` for paths and bytes)."
        )

    def process_image(self, image, **kwargs) -> np.ndarray:
        """The (3, H, W) uint8 RGB array the PIL backend works on, via `to_rgb_image`."""
        return np.asarray(to_rgb_image(image)).transpose(2, 0, 1)

    def _validate_preprocess_kwargs(
        self, size: SizeDict | None, crop_size: SizeDict | None, crop_pct: float | None, **kwargs
    ) -> None:
        if crop_pct is None or not 0 < crop_pct <= 1:
            raise ValueError(f"`crop_pct` must be in (0, 1], got {crop_pct}.")
        super()._validate_preprocess_kwargs(
            size=self._resize_size(size, crop_size, crop_pct), crop_size=crop_size, **kwargs
        )

    def _preprocess(
        self, images: list[np.ndarray], size: SizeDict | None, crop_size: SizeDict, crop_pct: float, **kwargs
    ) -> BatchFeature:
        resize_size = self._resize_size(size, crop_size, crop_pct)
        if _trims_to_aspect_ratio(kwargs.get("do_resize"), resize_size):
            images = [_trim_to_aspect_ratio(image, MAX_ASPECT_RATIO) for image in images]
        return super()._preprocess(images, size=resize_size, crop_size=crop_size, **kwargs)

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The part of an upright `width` x `height` image that this processor's `pixel_values` show, as
        (left, top, right, bottom) fractions of its width and height: where an attention map over the encoder's
        regions lies on the picture.

        It follows the preprocessing steps with the saved settings: the trim to `MAX_ASPECT_RATIO`, the resize (by
        the backend's size rules, `_resized_shape`) and the centre crop.
        """
        resize_size = self._saved_resize_size()
        do_resize = self.do_resize and resize_size is not None
        if _trims_to_aspect_ratio(do_resize, resize_size):
            top, left, kept_height, kept_width = _aspect_ratio_window(height, width, MAX_ASPECT_RATIO)
        else:
            top, left, kept_height, kept_width = 0, 0, height, width
        if do_resize:
            resized_height, resized_width = self._resized_shape(kept_height, kept_width, resize_size)
        else:
            resized_height, resized_width = kept_height, kept_width
        crop = _size_dict(self.crop_size) if self.do_center_crop else SizeDict()
        box_left, box_right = _seen_span(left, kept_width, resized_width, crop.width, width)
        box_top, box_bottom = _seen_span(top, kept_height, resized_height, crop.height, height)
        return box_left, box_top, box_right, box_bottom

    @staticmethod
    def _resized_shape(height: int, width: int, size: SizeDict) -> tuple[int, int]:
        """The (height, width) that the PIL backend's `resize` gives a `height` x `width` image for `size`: the same
        rules, in the same order, through the same transformers functions."""
        if size.shortest_edge and size.longest_edge:
            return get_size_with_aspect_ratio((height, width), size.shortest_edge, size.longest_edge)
        if size.shortest_edge:
            shape_only = np.broadcast_to(np.uint8(0), (1, height, width))  # the rule reads only the image's shape
            return get_resize_output_image_size(
                shape_only, size=size.shortest_edge, default_to_square=False, input_data_format=ChannelDimension.FIRST
            )
        if size.max_height and size.max_width:
            return get_image_size_for_max_height_width((height, width), size.max_height, size.max_width)
        return size.height, size.width

    @property
    def load_min_side(self) -> int | None:
        """The `min_side` to give `load_image` for this processor: the shortest side its resize produces (256 with the
        defaults), or `None` when it does not resize to a fixed shortest side.

        Training (`ImageCaptionCollator`), the CLI and the pipeline all load files with
        `load_image(source, min_side=image_processor.load_min_side)`, so that a large JPEG is decoded at a reduced
        scale (less memory and time) in the same way everywhere, and every entry point sees the same pixels.
        """
        if not self.do_resize:
            return None
        resize = self._saved_resize_size()
        if resize is None:
            return None
        if resize.shortest_edge:
            return int(resize.shortest_edge)
        if resize.height and resize.width:
            return int(min(resize.height, resize.width))
        return None

    def _saved_resize_size(self) -> SizeDict | None:
        """The resize target of this processor's own settings (as opposed to a call's overrides)."""
        return self._resize_size(_size_dict(self.size), _size_dict(self.crop_size), self.crop_pct)

    @staticmethod
    def _resize_size(size: SizeDict | None, crop_size: SizeDict | None, crop_pct: float) -> SizeDict | None:
        """`size` if given, else the shortest edge that makes the centre crop keep `crop_pct` of the image."""
        if size is not None or crop_size is None:
            return size
        return SizeDict(shortest_edge=int(max(crop_size.height, crop_size.width) / crop_pct))


__all__ = ["DEFAULT_MAX_PIXELS", "MAX_ASPECT_RATIO", "ImgCapImageProcessor", "load_image", "to_rgb_image"]
