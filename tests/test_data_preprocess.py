"""ImageNet-style class folders and LlamaGen's / VAR's preprocessing: a tiny generated tree of JPEGs
(train/n0.../*.JPEG), sorted synset order = class index, the three ways an image becomes a square, and the
flip / ten-crop views that become rows of the image's split."""

import numpy as np
import pytest
from PIL import Image

from cca_ray.config import load_config
from cca_ray.data.pipeline import read_units
from cca_ray.data.preprocess import augment_views, read_size, ten_crop, to_square
from cca_ray.data.sources import iter_rows, make_source

SYNSETS = ["n01530575", "n01440764", "n01443537"]  # not in sorted order on purpose


def _framed(w, h, inner, border=(0, 0, 255), centre=(255, 0, 0)):
    """A w x h image: a centred inner x inner square of `centre` on `border`."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:] = border
    y, x = (h - inner) // 2, (w - inner) // 2
    arr[y : y + inner, x : x + inner] = centre
    return Image.fromarray(arr)


@pytest.fixture()
def imagenet_tree(tmp_path):
    root = tmp_path / "train"
    for k, syn in enumerate(SYNSETS):
        (root / syn).mkdir(parents=True)
        for i in range(3):
            # landscape and portrait JPEGs, larger than the square, the class's colour in the centre
            w, h = (120, 80) if i % 2 else (70, 110)
            _framed(w, h, 64, centre=(40 + 80 * k, 200, 30)).save(root / syn / f"{syn}_{i}.JPEG", quality=95)
    (root / SYNSETS[0] / "notes.txt").write_text("not an image")
    return root


def test_class_folders_in_synset_order_one_unit_per_folder_slice(imagenet_tree):
    cfg = load_config("smoke", overrides=[f"data.path={imagenet_tree}", "data.source=folder", "data.image_size=32",
                                          "data.channels=3", "data.preprocess=center-crop"])
    src = make_source(cfg.data)
    units = src.units()
    assert [u.group for u in units] == [0, 1, 2] and all(u.file.endswith(s) for u, s in zip(units, sorted(SYNSETS)))
    rows = list(iter_rows(src))
    assert len(rows) == 9 and all(r.error is None and r.image.shape == (32, 32, 3) for r in rows)
    assert [r.label for r in rows] == [0] * 3 + [1] * 3 + [2] * 3
    assert {r.prompt for r in rows if r.label == 0} == {"n01440764"}  # sorted: n01440764 is class 0
    for r in rows:  # LlamaGen's centre crop of a 70x110 or 120x80 image keeps the 64-px centre square only
        k = SYNSETS.index(sorted(SYNSETS)[r.label])  # the colour its folder was drawn with
        assert np.abs(r.image[4:-4, 4:-4].astype(int) - [40 + 80 * k, 200, 30]).max() < 40
    capped = make_source(cfg.data.model_copy(update={"max_images": 4}))
    assert sum(u.stop - u.start for u in capped.units()) == 4


def test_center_crop_is_adms_and_var_resizes_to_9_8_first():
    img = _framed(400, 300, 150)  # shorter side 300 >= 2 x 64: box-halved once to 200x150, then bicubic to 85x64
    out = np.asarray(to_square(img, 64, "center-crop"))
    assert out.shape == (64, 64, 3)
    red = np.abs(out.astype(int) - [255, 0, 0]).max(-1) < 60
    assert abs(red[32].sum() - 32) <= 2 and abs(red[:, 32].sum() - 32) <= 2  # 150 of 300 px -> 32 of 64, centred
    assert red[16:48, 16:48].mean() > 0.9 and not red[:12].any()
    # VAR: shorter side to round(1.125 * 64) = 72, centre 64: the 150/300 centre square becomes 36 of 64 px
    v = np.asarray(to_square(img, 64, "var"))
    red = np.abs(v.astype(int) - [255, 0, 0]).max(-1) < 60
    assert v.shape == (64, 64, 3) and abs(red[32].sum() - 36) <= 2 and not red[0].any()
    sq = np.asarray(to_square(img, 64, "resize"))  # squash: the whole frame, border included
    assert sq.shape == (64, 64, 3) and not (np.abs(sq[0].astype(int) - [255, 0, 0]).max(-1) < 60).any()
    with pytest.raises(ValueError, match="data.preprocess"):
        to_square(img, 64, "random")


def test_ten_crop_is_torchvisions_and_flip_mirrors():
    rng = np.random.default_rng(0)
    big = rng.integers(0, 255, (read_size(20, "ten-crop"), 22, 3), dtype=np.uint8)  # 22 = int(1.1 * 20)
    crops = ten_crop(big, 20)
    assert len(crops) == 10 and all(c.shape == (20, 20, 3) for c in crops)
    np.testing.assert_array_equal(crops[0], big[:20, :20])
    np.testing.assert_array_equal(crops[3], big[-20:, -20:])
    np.testing.assert_array_equal(crops[4], big[1:21, 1:21])
    # the second five are the crops of the mirrored image: its top-left is the mirror of the top-right
    np.testing.assert_array_equal(crops[5], crops[1][:, ::-1])
    np.testing.assert_array_equal(crops[9], crops[4][:, ::-1])
    views = augment_views(big[:20, :20], 20, "flip")
    assert [s for s, _ in views] == ["", "#flip"]
    np.testing.assert_array_equal(views[1][1], big[:20, :20][:, ::-1])


@pytest.mark.parametrize("augment, per_train", [("none", 1), ("flip", 2), ("ten-crop", 10)])
def test_views_are_rows_of_the_images_split(imagenet_tree, augment, per_train):
    cfg = load_config("smoke", overrides=[f"data.path={imagenet_tree}", "data.source=folder", "data.image_size=32",
                                          "data.channels=3", "data.preprocess=center-crop", f"data.augment={augment}",
                                          "data.holdout_fraction=0.4"])
    src = make_source(cfg.data)
    units = src.units()
    t = read_units({"unit": np.arange(len(units))}, src, units, "error", cfg.data.seed, 0.4, 32, augment)
    sids, splits = t.column("source_id").to_pylist(), t.column("split").to_pylist()
    base = [s.split("#")[0] for s in sids]
    assert all(len(b) == 32 * 32 * 3 for b in t.column("image").to_pylist())
    for b in set(base):
        mine = [sp for bb, sp in zip(base, splits) if bb == b]
        assert len(set(mine)) == 1  # every view in the image's split
        assert len(mine) == (per_train if mine[0] == "train" else 1)
    assert "train" in splits  # (the split hashes the file path: which images are held out depends on tmp_path)
