"""Image preprocessing before tokenization: how a source image becomes the square the tokenizer reads.

data.preprocess (one image -> one square of data.image_size S):
    resize       squash to S x S, bicubic (the bundled digits and other square sets)
    center-crop  LlamaGen's (ADM's center_crop_arr): halve with a box filter while the shorter side is >= 2S,
                 resize the shorter side to S (bicubic), take the centre S x S
    var          VAR's: shorter side to round(1.125 S) (Lanczos), centre S x S crop (its eval transform; its
                 training transform crops at random from the same resize)

data.augment (one square -> the views that become rows; LlamaGen's code extraction, extract_codes_c2i.py):
    none         the image itself
    flip         the image and its horizontal mirror (LlamaGen's default: two codes per image)
    ten-crop     --ten-crop: the centre crop at int(1.1 S) by data.preprocess, then torchvision's TenCrop(S):
                 four corners and the centre, then the same five of the mirrored image

A view is a row of its own, with source_id "<image's source_id>#<view>" (#flip, #crop0..#crop9); every view of
an image lands in the image's split, and only train images are augmented (the holdout keeps one view each:
the image, or for ten-crop its centre crop).
"""

from __future__ import annotations

import numpy as np

PREPROCESS = ("resize", "center-crop", "var")
AUGMENT = ("none", "flip", "ten-crop")
TEN_CROP_RANGE = 1.1  # LlamaGen's --crop-range
VAR_MID_RESO = 1.125  # VAR's mid_reso


def read_size(image_size: int, augment: str) -> int:
    """The square a source produces before augment_views: int(1.1 S) for ten-crop, else S."""
    return int(image_size * TEN_CROP_RANGE) if augment == "ten-crop" else image_size


def to_square(img, size: int, preprocess: str = "resize"):
    """A PIL image -> a PIL image of size x size by `preprocess` (module docstring)."""
    from PIL import Image

    if preprocess == "resize":
        return img if img.size == (size, size) else img.resize((size, size), Image.Resampling.BICUBIC)
    if preprocess == "center-crop":
        while min(img.size) >= 2 * size:
            img = img.resize(tuple(x // 2 for x in img.size), resample=Image.Resampling.BOX)
        scale = size / min(img.size)
        img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.Resampling.BICUBIC)
        return _centre(img, size)
    if preprocess == "var":
        mid = round(VAR_MID_RESO * size)
        w, h = img.size
        # torchvision's Resize(int): the shorter side to mid, the longer scaled alike (truncated)
        new = (mid, int(mid * h / w)) if w <= h else (int(mid * w / h), mid)
        return _centre(img.resize(new, resample=Image.Resampling.LANCZOS), size)
    raise ValueError(f"data.preprocess must be one of {', '.join(PREPROCESS)}, got {preprocess!r}")


def _centre(img, size: int):
    """The centre size x size crop: ADM's floor offsets (torchvision's CenterCrop rounds; they agree on even gaps)."""
    arr = np.asarray(img)
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    from PIL import Image

    return Image.fromarray(arr[y : y + size, x : x + size])


def augment_views(image: np.ndarray, image_size: int, augment: str) -> list[tuple[str, np.ndarray]]:
    """uint8 [R, R, C] (R = read_size) -> [(view suffix, uint8 [S, S, C])]; suffix "" is the image itself."""
    if augment == "none":
        return [("", image)]
    if augment == "flip":
        return [("", image), ("#flip", np.ascontiguousarray(image[:, ::-1]))]
    if augment == "ten-crop":
        return [(f"#crop{k}", v) for k, v in enumerate(ten_crop(image, image_size))]
    raise ValueError(f"data.augment must be one of {', '.join(AUGMENT)}, got {augment!r}")


def ten_crop(image: np.ndarray, size: int) -> list[np.ndarray]:
    """torchvision's TenCrop(size) on an array [H, W, C]: top-left, top-right, bottom-left, bottom-right, centre
    (centre offsets rounded as torchvision's CenterCrop), then the same five of the mirrored image."""
    h, w = image.shape[:2]
    if size > min(h, w):
        raise ValueError(f"ten-crop of {size} from a {h}x{w} image")
    cy, cx = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    five = lambda a: [a[:size, :size], a[:size, w - size:], a[h - size:, :size], a[h - size:, w - size:],  # noqa: E731
                      a[cy : cy + size, cx : cx + size]]
    return [np.ascontiguousarray(v) for v in five(image) + five(image[:, ::-1])]


def holdout_view(views: list[tuple[str, np.ndarray]], augment: str) -> list[tuple[str, np.ndarray]]:
    """The one view a holdout image keeps: the image itself, or ten-crop's centre crop."""
    return [views[4]] if augment == "ten-crop" else [views[0]]
