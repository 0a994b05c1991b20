"""Image files as the annotations saw them: EXIF orientation applied, oversized files refused by name.

Images are read upright (`PIL.ImageOps.exif_transpose`, as transformers' `load_image` and OpenCV's
`imread` do): a phone photo stored sideways with an EXIF orientation of 5-8 is `height x width` the
other way round on disk, and its annotations (LISA's ReasonSeg masks, for one) are drawn on the upright
picture. Sizes come from the header (no decoding).

PIL refuses to open an image of more than twice `PIL.Image.MAX_IMAGE_PIXELS` (a decompression bomb:
e.g. a 14,000 x 14,000 PNG of a few KB decodes to 588 MB); that refusal becomes an `ImageFileError`
naming the file, which the readers count as a skipped record and the collator as a skipped sample.
"""

import os

import numpy as np

# EXIF orientations that turn the picture by 90 degrees (width and height swap).
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION_TAG = 0x0112


class ImageFileError(ValueError):
    """An image file cannot be read (missing, corrupt, not an image, or over PIL's pixel limit)."""


def _open(path):
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except Image.DecompressionBombError as error:
        raise ImageFileError(f"{os.fspath(path)!r} is too large to decode safely ({error}); resize the image, or raise "
                             f"PIL.Image.MAX_IMAGE_PIXELS if it is genuine.") from error
    except FileNotFoundError as error:
        raise ImageFileError(f"{os.fspath(path)!r} does not exist; check the dataset's image folder.") from error
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ImageFileError(f"{os.fspath(path)!r} cannot be read as an image ({error}).") from error


def image_size(path) -> tuple[int, int]:
    """(height, width) of the upright image (EXIF orientation applied), from the file's header."""
    with _open(path) as image:
        width, height = image.size
        try:
            orientation = image.getexif().get(_EXIF_ORIENTATION_TAG)
        except (OSError, ValueError, SyntaxError):  # a broken EXIF block: PIL's exif_transpose ignores it too
            orientation = None
    return (width, height) if orientation in _TRANSPOSING_ORIENTATIONS else (height, width)


def read_image_rgb(path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of the upright image (EXIF orientation applied)."""
    from PIL import ImageOps

    with _open(path) as image:
        try:
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
        except (OSError, ValueError, SyntaxError) as error:  # truncated or corrupt pixel data
            raise ImageFileError(f"{os.fspath(path)!r} cannot be decoded ({error}); re-download or drop it.") from error
