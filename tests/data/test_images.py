"""The one preprocessing function, on images generated with Pillow in every awkward form."""

import io
import struct
import subprocess
import sys
import tracemalloc
import zlib

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw, ImageOps

from imgclf.card import InputSpec
from imgclf.images import (
    FORMATS,
    IMAGE_SUFFIXES,
    MAX_PIXELS,
    BadImage,
    decode_image,
    decode_image_with_info,
    image_size,
)
from tests.conftest import REPO, tool_env

RGB_4x4 = InputSpec("RGB", (4, 4), "stretch")
GREY_4x4 = InputSpec("L", (4, 4), "stretch")
MAX = 10**6


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a size in its header and holds (almost) no data: a bomb's calling card."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def test_rgb_png_from_bytes_and_from_a_path_agree(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    data = encode(Image.fromarray(pixels), "PNG")
    (tmp_path / "a.png").write_bytes(data)
    from_bytes = decode_image(data, RGB_4x4, MAX)
    assert from_bytes.dtype == np.uint8 and from_bytes.shape == (3, 4, 4)
    assert np.array_equal(from_bytes, pixels.transpose(2, 0, 1))  # same size: pixels untouched
    assert np.array_equal(decode_image(tmp_path / "a.png", RGB_4x4, MAX), from_bytes)


def test_alpha_is_composited_onto_white():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)  # fully transparent black
    rgba[0, :] = (0, 0, 255, 255)  # opaque blue row
    rgba[1, :] = (255, 0, 0, 128)  # half-transparent red row
    pixels, info = decode_image_with_info(encode(Image.fromarray(rgba), "PNG"), RGB_4x4, MAX)
    assert info.mode == "RGBA"
    assert pixels[:, 0, 0].tolist() == [0, 0, 255]
    assert pixels[:, 1, 0].tolist() == pytest.approx([255, 127, 127], abs=1)
    assert pixels[:, 3, 3].tolist() == [255, 255, 255]  # transparent black reads as white


def test_grey_with_alpha_to_grey():
    la = Image.new("LA", (4, 4), (0, 0))  # transparent black
    la.putpixel((0, 0), (40, 255))
    pixels = decode_image(encode(la, "PNG"), GREY_4x4, MAX)
    assert pixels.shape == (1, 4, 4)
    assert pixels[0, 0, 0] == 40 and pixels[0, 3, 3] == 255


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    values = np.array([[0, 257, 32896, 65535]] * 4, dtype=np.uint16)
    pixels, info = decode_image_with_info(encode(Image.fromarray(values), "PNG"), GREY_4x4, MAX)
    assert info.mode.startswith("I")
    assert pixels[0, 0].tolist() == [0, 1, 128, 255]  # Pillow's own convert("L") gives 0, 255, 255, 255
    rgb = decode_image(encode(Image.fromarray(values), "PNG"), RGB_4x4, MAX)
    assert rgb.shape == (3, 4, 4) and rgb[:, 0, 3].tolist() == [255, 255, 255]


def test_sixteen_bit_conversion_takes_few_bytes_a_pixel():
    # A 16-bit PNG of one value compresses to a few kB, so the decoded size, not the upload's,
    # bounds the memory. Whole-array int64 arithmetic took 17 bytes a pixel of numpy memory;
    # 40 megapixels, most of a gigabyte.
    side = 1000
    data = encode(Image.fromarray(np.full((side, side), 40000, dtype=np.uint16)), "PNG")
    assert len(data) < 10_000
    tracemalloc.start()
    try:
        pixels = decode_image(data, GREY_4x4, side * side)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert pixels[0].tolist() == [[156] * 4] * 4  # round(40000 * 255 / 65535) = round(155.6)
    assert peak < 8 * side * side


def test_palette_png_with_and_without_transparency():
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putpixel((0, 0), 1)
    pixels, info = decode_image_with_info(encode(palette, "PNG"), RGB_4x4, MAX)
    assert info.mode == "P"
    assert pixels[:, 0, 0].tolist() == [200, 100, 50] and pixels[:, 1, 1].tolist() == [10, 20, 30]
    transparent = decode_image(encode(palette, "PNG", transparency=0), RGB_4x4, MAX)
    assert transparent[:, 0, 0].tolist() == [200, 100, 50]
    assert transparent[:, 1, 1].tolist() == [255, 255, 255]  # index 0 is transparent -> white


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (16, 16), (0, 0, 0, 0))  # no ink: white
    cmyk.paste((0, 255, 255, 0), (0, 0, 16, 8))  # magenta + yellow: red
    pixels, info = decode_image_with_info(
        encode(cmyk, "JPEG", quality=95), InputSpec("RGB", (16, 16), "crop"), MAX
    )
    assert info.mode == "CMYK"
    assert pixels[:, 2, 8].tolist() == pytest.approx([255, 0, 0], abs=8)
    assert pixels[:, 13, 8].tolist() == pytest.approx([255, 255, 255], abs=8)


def test_greyscale_jpeg_in_either_mode():
    grey = Image.new("L", (16, 16), 200)
    data = encode(grey, "JPEG", quality=95)
    as_grey = decode_image(data, InputSpec("L", (16, 16), "crop"), MAX)
    as_rgb = decode_image(data, InputSpec("RGB", (16, 16), "crop"), MAX)
    assert as_grey.shape == (1, 16, 16) and as_rgb.shape == (3, 16, 16)
    assert abs(int(as_grey[0, 8, 8]) - 200) <= 2
    assert np.array_equal(as_rgb[0], as_rgb[2]) and np.array_equal(as_rgb[0], as_grey[0])


def test_exif_orientation_is_applied():
    # Stored 40 wide, 20 high, black left half; orientation 6 means "rotate 90° clockwise to view",
    # so the viewer sees 20 wide, 40 high, with the black half on top.
    stored = Image.new("L", (40, 20), 255)
    stored.paste(0, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    pixels, info = decode_image_with_info(data, InputSpec("L", (40, 20), "stretch"), MAX)
    assert (info.width, info.height) == (20, 40)
    assert pixels.shape == (1, 40, 20)
    assert pixels[0, :18].mean() < 10 and pixels[0, 22:].mean() > 245


def test_crop_keeps_the_centre_and_stretch_keeps_everything():
    wide = np.zeros((20, 40, 3), dtype=np.uint8)  # a red stripe | green | a blue stripe
    wide[:, :5] = (255, 0, 0)
    wide[:, 5:35] = (0, 255, 0)
    wide[:, 35:] = (0, 0, 255)
    data = encode(Image.fromarray(wide), "PNG")
    cropped = decode_image(data, InputSpec("RGB", (10, 10), "crop"), MAX)
    stretched = decode_image(data, InputSpec("RGB", (10, 10), "stretch"), MAX)
    # crop: the centre 20x20 of the 40x20 image, all green (the filter reaches 2 pixels past it)
    assert (cropped[1] == 255).all() and (cropped[0] == 0).all() and (cropped[2] == 0).all()
    # stretch: the whole width, squeezed: red on the left edge, blue on the right
    assert stretched[0, :, 0].min() > 150 and stretched[2, :, 9].min() > 150
    assert (stretched[1, :, 3:7] == 255).all()
    # The same input gives the same bytes every time: the filter is fixed.
    again = decode_image(data, InputSpec("RGB", (7, 13), "crop"), MAX)
    assert np.array_equal(again, decode_image(data, InputSpec("RGB", (7, 13), "crop"), MAX))


def test_truncated_jpeg_is_a_bad_image():
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")
    with pytest.raises(BadImage, match="truncated"):
        decode_image(data[: len(data) // 2], RGB_4x4, MAX)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"just some text, named .png", "not an image"),
        (b"", "empty file"),
        (png_header_only(5000, 4000), r"too many pixels.*5000x4000 = 20000000 > 1000000"),
    ],
    ids=["text", "empty", "header-claims-20-megapixels"],
)
def test_not_images_are_bad_images_with_a_reason(tmp_path, data, reason):
    path = tmp_path / "file.png"
    path.write_bytes(data)
    for source in (data, path):
        with pytest.raises(BadImage, match=reason) as error:
            decode_image(source, RGB_4x4, MAX)
        assert "\n" not in str(error.value)


WARNINGS_PROBE = """
import sys, warnings
from pathlib import Path
from imgclf.card import InputSpec
from imgclf.images import BadImage, decode_image

def swap_the_filters(*args, **kwargs):
    raise AssertionError("warnings.catch_warnings per decode: threads decoding at once race on it")

warnings.catch_warnings = swap_the_filters
try:
    decode_image(Path(sys.argv[1]).read_bytes(), InputSpec("L", (4, 4), "crop"), 10**6)
except BadImage as error:
    print(error)
"""


def test_pillows_bomb_warning_is_off_without_touching_warnings_per_decode(tmp_path):
    """100 megapixels: over Pillow's warning threshold, under its error; the explicit check answers.

    In a subprocess under `-W error`: pytest resets warning filters around each test, which would
    hide both a missing filter and one set per call."""
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(10_000, 10_000))
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", WARNINGS_PROBE, str(path)],
        env=tool_env(REPO),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("too many pixels, a decompression bomb: 10000x10000")


def test_formats_outside_the_common_ones_are_refused():
    pcx = encode(Image.new("RGB", (4, 4)), "PCX")  # Pillow reads it, but it is not on the list
    with pytest.raises(BadImage, match=r"not an image in a supported format \(JPEG, PNG"):
        decode_image(pcx, RGB_4x4, MAX)
    colour = Image.new("RGB", (4, 4), (9, 99, 199))
    for fmt, options in [("GIF", {}), ("BMP", {}), ("TIFF", {}), ("WEBP", {"lossless": True}), ("PPM", {})]:
        pixels = decode_image(encode(colour, fmt, **options), RGB_4x4, MAX)
        assert pixels[:, 2, 2].tolist() == [9, 99, 199], fmt
    # A phone's MPO (a JPEG with more pictures appended) opens through the JPEG decoder.
    mpo = encode(colour, "MPO", save_all=True, append_images=[Image.new("RGB", (4, 4))])
    assert decode_image(mpo, RGB_4x4, MAX)[:, 2, 2].tolist() == pytest.approx([9, 99, 199], abs=4)


def test_image_suffixes_are_those_of_the_accepted_formats():
    by_suffix = Image.registered_extensions()
    assert {by_suffix[suffix] for suffix in IMAGE_SUFFIXES} == set(FORMATS)
    assert {".jfif", ".pbm", ".pnm"} <= set(IMAGE_SUFFIXES)  # the rarer names of JPEG and PPM


def test_pixel_cap_is_checked_before_decoding():
    data = encode(Image.new("RGB", (100, 60)), "PNG")
    assert decode_image(data, RGB_4x4, max_pixels=6000).shape == (3, 4, 4)
    assert image_size(data, max_pixels=6000) == (100, 60)  # the header alone, as a server sums it
    with pytest.raises(BadImage, match="100x60 = 6000 > 5999"):
        decode_image(data, RGB_4x4, max_pixels=5999)
    with pytest.raises(BadImage, match="100x60 = 6000 > 5999"):
        image_size(data, max_pixels=5999)
    # Over twice Pillow's own limit, Pillow refuses at open; that is a bad image too, not a crash.
    with pytest.raises(BadImage, match="decompression bomb"):
        decode_image(png_header_only(30_000, 30_000), RGB_4x4, max_pixels=10**12)


def test_one_default_pixel_limit_takes_phone_photos_in_training_and_serving():
    imagefolder = yaml.safe_load((REPO / "conf" / "data" / "imagefolder.yaml").read_text(encoding="utf-8"))
    assert imagefolder["max_image_pixels"] == MAX_PIXELS
    assert MAX_PIXELS >= 12032 * 9024  # a 108-megapixel phone photo
    assert MAX_PIXELS < 2 * Image.MAX_IMAGE_PIXELS  # above that, Pillow refuses at open, whatever the limit


def photo(width: int, height: int) -> Image.Image:
    """A photo-like RGB scene: gradients, a checkerboard, a dark disc and thin bright lines."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    channels = [x * 0.7 + y * 0.3, 255 - x * 0.5 - y * 0.2, (x // 37 + y // 53) % 2 * 200]
    image = Image.merge("RGB", [Image.fromarray(c.astype(np.uint8)) for c in channels])
    draw = ImageDraw.Draw(image)
    draw.ellipse((width * 0.3, height * 0.3, width * 0.6, height * 0.7), fill=(10, 20, 30))
    for left in range(0, width, width // 40):
        draw.line((left, 0, left + width // 5, height), fill=(250, 250, 0), width=width // 400)
    return image


@pytest.fixture(scope="module")
def turned_photo() -> tuple[bytes, bytes]:
    """A 4000x3000 JPEG stored sideways (EXIF orientation 6), and its full decode, upright, as PPM:
    the same pixels in a format that is always decoded whole."""
    exif = Image.Exif()
    exif[0x0112] = 6
    jpeg = encode(photo(4000, 3000), "JPEG", quality=90, exif=exif.tobytes())
    with Image.open(io.BytesIO(jpeg)) as full:
        return jpeg, encode(ImageOps.exif_transpose(full), "PPM")


@pytest.mark.parametrize(
    "spec",
    [  # decoded at 1/8, 1/8, 1/4 and 1/2 scale
        InputSpec("RGB", (64, 64), "crop"),
        InputSpec("L", (8, 8), "stretch"),
        InputSpec("L", (96, 128), "stretch"),
        InputSpec("RGB", (224, 160), "crop"),
    ],
    ids=str,
)
def test_a_big_jpeg_decoded_at_reduced_scale_matches_the_full_decode(turned_photo, spec):
    jpeg, full = turned_photo
    pixels, info = decode_image_with_info(jpeg, spec, MAX_PIXELS)
    reference = decode_image(full, spec, MAX_PIXELS)
    assert (info.width, info.height) == (3000, 4000)  # the source's own size, upright
    difference = np.abs(pixels.astype(int) - reference)
    assert difference.max() <= 8 and difference.mean() < 1


DECODE_PROBE = """
import io, sys, time
from PIL import Image
from imgclf.card import InputSpec
from imgclf.images import MAX_PIXELS, decode_image

def peak_kib():  # this process's own peak resident size (ru_maxrss would count the parent's)
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0])

data = open(sys.argv[1], "rb").read()
before = peak_kib()
seconds = []
for _ in range(3):
    started = time.perf_counter()
    if sys.argv[2] == "decode_image":
        decode_image(data, InputSpec("RGB", (64, 64), "crop"), MAX_PIXELS)
    else:
        Image.open(io.BytesIO(data)).load()
    seconds.append(time.perf_counter() - started)
print((peak_kib() - before) * 1024, min(seconds))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="reads the peak memory from /proc")
def test_a_48_megapixel_jpeg_decodes_in_little_memory_and_time(tmp_path):
    """decode_image against Pillow's bare full decode of the same file, each in a fresh process:
    tracemalloc cannot see Pillow's pixel buffers (malloc'd in C), the process's peak size can."""
    x = np.linspace(0, 255, 8000, dtype=np.float32)[None]
    y = np.linspace(0, 255, 6000, dtype=np.float32)[:, None]
    grey = Image.fromarray((x * 0.6 + y * 0.4).astype(np.uint8))
    path = tmp_path / "phone.jpg"
    Image.merge("RGB", [grey, grey.transpose(Image.Transpose.FLIP_TOP_BOTTOM), grey]).save(path, quality=90)
    measured = {}
    for way in ("decode_image", "full"):
        done = subprocess.run(
            [sys.executable, "-c", DECODE_PROBE, str(path), way],
            env=tool_env(REPO),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        peak_bytes, seconds = done.stdout.split()
        measured[way] = int(peak_bytes), float(seconds)
    (peak, seconds), (full_peak, full_seconds) = measured["decode_image"], measured["full"]
    assert full_peak >= 8000 * 6000 * 3  # the full decode holds every RGB pixel: 144 MB
    assert peak < 20 * 2**20, measured  # at 1/8 scale: 1000x750 pixels, 2.25 MB
    assert seconds < full_seconds / 2, measured


def reference_decode(data, spec: InputSpec, max_pixels: int = MAX):
    """decode_image_with_info as it was before it skipped exif_transpose where nothing can turn
    the image: ImageOps.exif_transpose (and its copy) on every image. The rest is the module's own."""
    from imgclf import images

    with images._open(data, max_pixels) as image:
        mode = image.mode
        try:
            factor = images._draft(image, spec)
            image.load()
            upright = ImageOps.exif_transpose(image)
            info = images.SourceInfo(mode, upright.width * factor, upright.height * factor)
            pixels = np.asarray(images._resize(images._to_mode(upright, spec.mode), spec), dtype=np.uint8)
        except images.DECODE_ERRORS as error:
            raise BadImage(f"corrupt or truncated {mode} image: {images._one_line(error)}") from None
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(pixels), info


def outcome(decode, source, spec: InputSpec):
    try:
        pixels, info = decode(source, spec, MAX)
    except BadImage as error:
        return "BadImage", str(error)
    assert pixels.dtype == np.uint8 and pixels.flags.c_contiguous
    return pixels.shape, pixels.tobytes(), info


def with_orientation(orientation: int | None) -> dict:
    if orientation is None:
        return {}
    exif = Image.Exif()
    exif[0x0112] = orientation
    return {"exif": exif.tobytes()}


def png_chunks(data: bytes) -> list[bytes]:
    chunks, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        chunks.append(data[at : at + 12 + length])
        at += 12 + length
    return chunks


def exif_after_the_pixels(png: bytes) -> bytes:
    """The PNG with its eXIf chunk moved after IDAT, where Pillow reads it only at load()."""
    chunks = png_chunks(png)
    exif = [c for c in chunks if c[4:8] == b"eXIf"]
    rest = [c for c in chunks if c[4:8] != b"eXIf"]
    assert len(exif) == 1
    return png[:8] + b"".join(rest[:-1] + exif + rest[-1:])


def png_text(orientation: int, key: str) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    text = PngInfo()
    if key == "xmp":
        text.add_itxt("XML:com.adobe.xmp", f'<x:xmpmeta><rdf:Description tiff:Orientation="{orientation}"/>')
    else:  # EXIF in hex, as ImageMagick writes it
        exif = Image.Exif()
        exif[0x0112] = orientation
        raw = b"Exif\x00\x00" + exif.tobytes()
        text.add_text("Raw profile type exif", f"\nexif\n{len(raw):8}\n{raw.hex()}\n")
    return encode(scene("RGB", 12, 8), "PNG", pnginfo=text)


def scene(mode: str, width: int, height: int) -> Image.Image:
    """An asymmetric picture, so that every turn and flip changes the pixels."""
    rng = np.random.default_rng(width * 1000 + height)
    rgba = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    rgba[: height // 3, : width // 2] = (255, 0, 0, 128)
    image = Image.fromarray(rgba, "RGBA")
    if mode == "P":
        return image.convert("RGB").quantize(16)
    return image.convert(mode)


def sixteen_bit_png() -> bytes:
    values = np.arange(12 * 8, dtype=np.uint16).reshape(8, 12) * 681
    return encode(Image.fromarray(values), "PNG")


def tiff_turned(orientation: int) -> bytes:
    return encode(scene("RGB", 12, 8), "TIFF", tiffinfo={0x0112: orientation})


def garbage_exif_jpeg() -> bytes:
    """A JPEG whose APP1 says Exif and holds junk after the TIFF header."""
    junk = b"Exif\x00\x00" + b"II*\x00\x08\x00\x00\x00" + b"\xff" * 40
    return encode(scene("RGB", 12, 8), "JPEG", exif=junk)


def gif_with_transparency() -> bytes:
    return encode(scene("P", 12, 8), "GIF", transparency=3)


SOURCES = {
    **{
        f"png-{mode}": (lambda mode=mode: encode(scene(mode, 12, 8), "PNG"))
        for mode in ("L", "LA", "RGB", "RGBA", "P", "1")
    },
    "png-P-transparent": lambda: encode(scene("P", 12, 8), "PNG", transparency=2),
    "png-RGB-transparent": lambda: encode(scene("RGB", 12, 8), "PNG", transparency=(255, 0, 0)),
    "png-16-bit": sixteen_bit_png,
    "png-exif-6": lambda: encode(scene("RGB", 12, 8), "PNG", **with_orientation(6)),
    "png-exif-3-after-the-pixels": lambda: exif_after_the_pixels(
        encode(scene("L", 12, 8), "PNG", **with_orientation(3))
    ),
    "png-xmp-8": lambda: png_text(8, "xmp"),
    "png-raw-profile-5": lambda: png_text(5, "raw"),
    **{
        f"jpeg-{mode}-exif-{orientation}": (
            lambda mode=mode, orientation=orientation: encode(
                scene(mode, 12, 8), "JPEG", quality=90, **with_orientation(orientation)
            )
        )
        for mode in ("RGB", "L")
        for orientation in (None, 1, 2, 3, 4, 5, 6, 7, 8, 9)
    },
    "jpeg-exif-without-orientation": lambda: encode(scene("RGB", 12, 8), "JPEG", exif=Image.Exif().tobytes()),
    "jpeg-xmp-6": lambda: encode(scene("RGB", 12, 8), "JPEG", xmp=b'<x tiff:Orientation="6"/>'),
    "jpeg-garbage-exif": garbage_exif_jpeg,
    "jpeg-drafted-exif-6": lambda: encode(scene("RGB", 256, 128), "JPEG", **with_orientation(6)),
    "jpeg-drafted": lambda: encode(scene("RGB", 256, 128), "JPEG"),
    "gif": gif_with_transparency,
    "bmp": lambda: encode(scene("RGB", 12, 8), "BMP"),
    "tiff": lambda: encode(scene("RGB", 12, 8), "TIFF"),
    "tiff-orientation-6": lambda: tiff_turned(6),
    "webp-exif-7": lambda: encode(scene("RGB", 12, 8), "WEBP", lossless=True, **with_orientation(7)),
    "ppm": lambda: encode(scene("RGB", 12, 8), "PPM"),
    "truncated-png": lambda: (lambda png: png[: len(png) // 2])(encode(scene("RGB", 64, 64), "PNG")),
    "png-header-cut": lambda: encode(scene("RGB", 64, 64), "PNG")[:20],
    "truncated-jpeg": lambda: (lambda jpeg: jpeg[: len(jpeg) // 2])(encode(scene("RGB", 64, 64), "JPEG")),
    "png-corrupt-pixels": lambda: (lambda png: png[:5000] + bytes(30) + png[5030:])(
        encode(scene("RGB", 64, 64), "PNG")
    ),
    "text": lambda: b"just some text, named .png",
    "empty": lambda: b"",
    "header-claims-20-megapixels": lambda: png_header_only(5000, 4000),
}
SPECS = [
    InputSpec("L", (8, 8), "stretch"),
    InputSpec("RGB", (8, 12), "stretch"),
    InputSpec("RGB", (5, 7), "crop"),
    InputSpec("L", (12, 8), "crop"),
]


@pytest.mark.parametrize("name", SOURCES)
def test_the_decode_matches_exif_transpose_on_every_image_bit_for_bit(tmp_path, name):
    """Skipping exif_transpose where no orientation can be read changes no pixel, size or error."""
    data = SOURCES[name]()
    path = tmp_path / "image"
    path.write_bytes(data)
    for spec in SPECS:
        for source in (data, path):
            assert outcome(decode_image_with_info, source, spec) == outcome(reference_decode, source, spec), (
                spec,
                type(source),
            )


def size(info) -> tuple[int, int]:
    return info.width, info.height


def test_the_reference_cases_turn_fail_and_draft_as_named():
    """The cases above cover what they say: turned images come out turned, bad ones are refused."""
    spec = InputSpec("RGB", (8, 12), "stretch")
    for name in (
        "png-exif-6",
        "png-xmp-8",
        "png-raw-profile-5",
        "jpeg-xmp-6",
        "tiff-orientation-6",
        "webp-exif-7",
    ):
        assert size(decode_image_with_info(SOURCES[name](), spec, MAX)[1]) == (8, 12), name  # stood up
    assert size(decode_image_with_info(SOURCES["png-exif-3-after-the-pixels"](), spec, MAX)[1]) == (12, 8)
    upright = decode_image(encode(scene("L", 12, 8), "PNG"), InputSpec("L", (8, 12), "stretch"), MAX)
    turned = decode_image(SOURCES["png-exif-3-after-the-pixels"](), InputSpec("L", (8, 12), "stretch"), MAX)
    assert np.array_equal(turned[0], upright[0, ::-1, ::-1])  # 3: turned half a circle
    drafted = decode_image_with_info(SOURCES["jpeg-drafted-exif-6"](), InputSpec("L", (8, 8), "stretch"), MAX)
    assert size(drafted[1]) == (128, 256)
    for name, reason in [
        ("truncated-png", "corrupt or truncated RGB image"),
        ("truncated-jpeg", "corrupt or truncated RGB image"),
        ("png-header-cut", "unreadable image header"),
        ("png-corrupt-pixels", "corrupt or truncated RGB image"),
        ("text", "not an image"),
        ("empty", "empty file"),
        ("header-claims-20-megapixels", "too many pixels"),
    ]:
        with pytest.raises(BadImage, match=reason):
            decode_image(SOURCES[name](), spec, MAX)
