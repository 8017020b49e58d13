"""Image preprocessing, defined once: file bytes -> uint8 (C, H, W) pixels the model takes.

The normalize stage decodes a user's image folder with `decode_image`, and `imgclf predict` and
`imgclf serve` decode uploads with the same function and the `InputSpec` stored in the model's
metadata, so a model sees at serving time exactly what it saw in training.

Numpy and Pillow only (no torch): the inference path imports this module.
"""

import io
import os
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps

from imgclf.card import MODE_CHANNELS, InputSpec

# The default limit on an image's pixels, read from its header before anything is decoded: for
# `imgclf predict`, `imgclf serve --max-megapixels` and training (conf/data/imagefolder.yaml's
# max_image_pixels holds the same number). Phone photos pass: 48 MP (8000x6000), 108 MP
# (12032x9024). A decompression bomb, a small file whose header claims gigapixels, does not.
# Pillow itself refuses over 2 x Image.MAX_IMAGE_PIXELS (179 MP) at open, so no higher default
# could take effect. At the limit a JPEG decodes at reduced scale (below); other formats hold
# the whole image, 360 MB as RGB.
MAX_PIXELS = 120_000_000
# The formats Pillow may open: the common ones, decoded in-process. Others are refused, so an
# upload cannot reach rarer decoders (EPS, for one, runs Ghostscript). JPEG covers phones' MPO.
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
# Files taken as images when a folder is walked, by suffix (any case): those of FORMATS.
IMAGE_SUFFIXES = (
    ".jpg", ".jpeg", ".jfif", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm",
)  # fmt: skip
# One fixed filter: Pillow's BILINEAR widens its support when shrinking (it antialiases), and
# reducing_gap=None turns off the JPEG/box shortcuts whose use depends on the input size.
RESAMPLE = Image.Resampling.BILINEAR
# A JPEG much larger than the model's input is decoded by libjpeg at 1/2, 1/4 or 1/8 scale
# (Image.draft: each 8x8 block becomes 4x4, 2x2 or one pixel), then resized like any image: a
# 48-megapixel photo takes about 9 MB instead of 190 MB, and a third of the time or less. The
# reduced image keeps at least this many pixels per output pixel, so the final filter averages
# nearly what it would over the full image (tests/data/test_images.py measures both).
DRAFT_MARGIN = 4
# Where Image.getexif (Pillow 13) looks for an orientation, besides a TIFF's tags (tag_v2): an EXIF
# block (JPEG, WebP, PNG's eXIf chunk, read by load() when it follows the pixels), a PNG text
# chunk holding EXIF in hex, and XMP.
ORIENTATION_SOURCES = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")
TURNED = frozenset(range(2, 9))  # the orientations exif_transpose turns (1 and others: as is)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "LA", "La", "RGBa", "PA")
# What Pillow may raise on a corrupt or hostile file; anything else is a bug and propagates.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)
# Pillow warns above its own pixel limit at open; the explicit check against max_pixels decides
# instead. Set once for the process: warnings.catch_warnings around each open would swap the
# process-wide filter list, which is not thread-safe, and the server decodes in many threads.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class BadImage(ValueError):
    """A file that cannot become model input; the message is one line saying why."""


@dataclass(frozen=True)
class SourceInfo:
    """What the file was before preprocessing: Pillow mode and size as displayed (EXIF applied)."""

    mode: str
    width: int
    height: int


def decode_image(data: bytes | str | os.PathLike, spec: InputSpec, max_pixels: int) -> np.ndarray:
    """File bytes or a path -> uint8 (C, H, W) per `spec`; BadImage if it cannot be."""
    return decode_image_with_info(data, spec, max_pixels)[0]


def decode_image_with_info(
    data: bytes | str | os.PathLike, spec: InputSpec, max_pixels: int
) -> tuple[np.ndarray, SourceInfo]:
    """`decode_image`, plus what the source was (for the data report)."""
    with _open(data, max_pixels) as image:
        mode = image.mode
        try:
            factor = _draft(image, spec)
            image.load()  # Image.open read the header only: decode now, so truncation fails here
            upright = _upright(image)
            info = SourceInfo(mode, upright.width * factor, upright.height * factor)
            pixels = np.asarray(_resize(_to_mode(upright, spec.mode), spec), dtype=np.uint8)
        except DECODE_ERRORS as error:
            raise BadImage(f"corrupt or truncated {mode} image: {_one_line(error)}") from None
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(pixels), info


def image_size(data: bytes | str | os.PathLike, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the header alone; BadImage as `decode_image` would for the header."""
    with _open(data, max_pixels) as image:
        return image.size


def _open(data: bytes | str | os.PathLike, max_pixels: int) -> Image.Image:
    """Pillow's lazy open (header only), refusing sizes over `max_pixels` before any decoding."""
    if isinstance(data, bytes):
        size, source = len(data), io.BytesIO(data)
    else:
        # A path is opened by Pillow itself, so only the header is read before the pixel check.
        # A missing file raises FileNotFoundError here: the caller's mistake, not a bad image.
        size, source = os.stat(data).st_size, os.fspath(data)
    if size == 0:
        raise BadImage("empty file")
    try:
        image = Image.open(source, formats=FORMATS)
    except Image.DecompressionBombError as error:
        raise BadImage(f"too many pixels: {_one_line(error)}") from None
    except Image.UnidentifiedImageError:
        raise BadImage(f"not an image in a supported format ({', '.join(FORMATS)})") from None
    except DECODE_ERRORS as error:
        raise BadImage(f"unreadable image header: {_one_line(error)}") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise BadImage(
            f"too many pixels, a decompression bomb: {width}x{height} = {width * height} > {max_pixels}"
        )
    return image


def _draft(image: Image.Image, spec: InputSpec) -> int:
    """Have a JPEG decoded at 1/2, 1/4 or 1/8 scale when it is large enough; the factor (1: none).

    Only a factor that divides both sides, so that the reduced image covers exactly the source,
    whichever way EXIF turns it; the choice depends on the two sizes alone, so it is deterministic.
    """
    width, height = image.size
    # The shorter side against the longer target side: enough whichever way EXIF turns the image.
    room = min(width, height) / (max(spec.size) * DRAFT_MARGIN)
    factor = next((f for f in (8, 4, 2) if f <= room and width % f == 0 and height % f == 0), 1)
    if factor == 1 or image.draft(None, (width // factor, height // factor)) is None:
        return 1  # small enough, or not a JPEG: only libjpeg decodes at a reduced scale
    return factor


def _upright(image: Image.Image) -> Image.Image:
    """The loaded image as displayed: ImageOps.exif_transpose's pixels, without the copy it makes
    of an image that needs no turning (a whole photo's pixels; a fifth of an 8x8 PNG's decode)."""
    if not hasattr(image, "tag_v2") and not any(key in image.info for key in ORIENTATION_SOURCES):
        return image  # nowhere for Image.getexif to find an orientation: it would answer 1
    # getexif raises what exif_transpose would (it calls it first), and caches what it read.
    if image.getexif().get(ExifTags.Base.Orientation, 1) not in TURNED:
        return image
    return ImageOps.exif_transpose(image)


def _to_mode(image: Image.Image, mode: str) -> Image.Image:
    """Convert to "L" or "RGB": transparency composited onto white, 16-bit scaled to 8."""
    if image.mode in SIXTEEN_BIT_MODES:
        image = _to_eight_bit(image)
    elif image.mode in ALPHA_MODES or "transparency" in image.info:
        # A transparent background would otherwise become whatever colour the hidden pixels
        # happen to hold (often black); white is what a viewer shows and what users draw on.
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == mode:
        return image
    if image.mode not in MODE_CHANNELS:
        image = image.convert("RGB")  # palette, CMYK, YCbCr, 1-bit... Pillow knows each way to RGB
    return image.convert(mode)


def _to_eight_bit(image: Image.Image) -> Image.Image:
    """16-bit greyscale to "L" by scaling 0..65535 to 0..255 (Pillow's own conversion clips)."""
    # One int32 copy, worked on in place: 4 bytes a pixel, where whole-array int64 expressions
    # took about 20, and a small PNG may hold tens of megapixels. Mode "I" (32-bit) is read as
    # 16-bit too, as Pillow may open 16-bit greyscale that way.
    values = np.array(image, dtype=np.int32)
    np.clip(values, 0, 65535, out=values)
    values *= 255  # at most 16_711_425: no overflow in int32
    values += 32767  # rounds to nearest
    values //= 65535
    return Image.fromarray(values.astype(np.uint8))


def _resize(image: Image.Image, spec: InputSpec) -> Image.Image:
    height, width = spec.size
    if image.size == (width, height):
        return image
    box = None
    if spec.resize == "crop":
        # The centred region with the target's aspect ratio, resampled in one step.
        scale = min(image.width / width, image.height / height)
        crop_w, crop_h = width * scale, height * scale
        left, top = (image.width - crop_w) / 2, (image.height - crop_h) / 2
        box = (left, top, left + crop_w, top + crop_h)
    return image.resize((width, height), RESAMPLE, box=box, reducing_gap=None)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
