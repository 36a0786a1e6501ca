"""Sources: bundled digits, parquet and folders; bad input names the file and the row."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cca_ray.config import load_config
from cca_ray.data.schema import DataError
from cca_ray.data.sources import digit_prompt, iter_rows, make_source, split_of


def png(value: int, size=(10, 10), mode="L") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, value).save(buf, format="PNG")
    return buf.getvalue()


def data_cfg(**over):
    return load_config("smoke", overrides={f"data.{k}": v for k, v in over.items()}).data


def test_digit_prompts_one_template_per_class():
    assert digit_prompt(7) == "a handwritten digit seven"
    assert len({digit_prompt(i) for i in range(10)}) == 10


def test_sklearn_digits_rows():
    rows = list(iter_rows(make_source(data_cfg(max_images=None))))
    assert len(rows) == 1797
    r = rows[0]
    assert r.image.shape == (8, 8, 1) and r.image.dtype == np.uint8
    assert r.prompt == digit_prompt(r.label) and r.source_id.startswith("sklearn-digits:")
    assert max(int(x.image.max()) for x in rows) == 255  # 0..16 scaled to 0..255
    assert len({x.source_id for x in rows}) == 1797


def test_mnist_max_images_is_class_balanced_and_resized():
    rows = list(iter_rows(make_source(data_cfg(source="mnist", max_images=200, image_size=16, channels=3))))
    assert len(rows) == 200
    assert rows[0].image.shape == (16, 16, 3)
    counts = np.bincount([r.label for r in rows], minlength=10)
    assert counts.min() >= 8  # a seeded permutation, not the first 200 (all zeros) of the file
    again = [r.source_id for r in iter_rows(make_source(data_cfg(source="mnist", max_images=200)))]
    assert again == [r.source_id for r in rows]


def test_split_is_deterministic_and_near_the_fraction():
    ids = [f"s:{i}" for i in range(4000)]
    splits = [split_of(i, 0, 0.2) for i in ids]
    assert splits == [split_of(i, 0, 0.2) for i in ids]
    assert abs(splits.count("holdout") / 4000 - 0.2) < 0.03
    assert splits != [split_of(i, 1, 0.2) for i in ids]
    assert set(split_of(i, 0, 0.0) for i in ids) == {"train"}


def _write_parquet(path, images, captions=None, labels=None, row_group_size=None):
    cols = {"image": pa.array(images, pa.binary())}
    if captions is not None:
        cols["caption"] = pa.array(captions, pa.string())
    if labels is not None:
        cols["label"] = pa.array(labels, pa.int64())
    pq.write_table(pa.table(cols), path, row_group_size=row_group_size)
    return path


def test_parquet_source_reads_captions_and_labels(tmp_path):
    f = _write_parquet(tmp_path / "a.parquet", [png(v) for v in (0, 100, 200)], ["a cat", "a dog", "a fox"], [0, 1, 2],
                       row_group_size=2)
    rows = list(iter_rows(make_source(data_cfg(source="parquet", path=str(tmp_path)))))
    assert [r.prompt for r in rows] == ["a cat", "a dog", "a fox"] and [r.label for r in rows] == [0, 1, 2]
    assert rows[1].image.shape == (8, 8, 1) and int(rows[1].image.mean()) == 100
    assert rows[2].source_id == f"{f}#2"
    capped = list(iter_rows(make_source(data_cfg(source="parquet", path=str(f), max_images=1))))
    assert len(capped) == 1


def test_parquet_hf_image_struct_and_caption_only(tmp_path):
    img = pa.array([{"bytes": png(50), "path": "x.png"}], pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": img, "caption": ["a boat"]}), tmp_path / "hf.parquet")
    rows = list(iter_rows(make_source(data_cfg(source="parquet", path=str(tmp_path), label_column=None))))
    assert rows[0].prompt == "a boat" and rows[0].label is None


def test_parquet_corrupt_image_bytes_names_file_and_row(tmp_path):
    f = _write_parquet(tmp_path / "c.parquet", [png(1), b"\x89PNG not really", png(3)], ["a", "b", "c"], [0, 1, 2])
    rows = list(iter_rows(make_source(data_cfg(source="parquet", path=str(f)))))
    assert rows[0].error is None and rows[2].error is None
    assert rows[1].image is None
    assert str(f) in rows[1].error and "row 1" in rows[1].error and "corrupt image bytes" in rows[1].error


def test_parquet_empty_prompt_names_file_and_row(tmp_path):
    f = _write_parquet(tmp_path / "e.parquet", [png(1), png(2), png(3)], ["a cat", "   ", None], [0, 1, 2])
    rows = list(iter_rows(make_source(data_cfg(source="parquet", path=str(f)))))
    assert rows[0].error is None
    for i in (1, 2):
        assert f"{f}: row {i}: empty prompt" in rows[i].error


def test_parquet_missing_column_names_file_and_column(tmp_path):
    f = _write_parquet(tmp_path / "m.parquet", [png(1)], ["a cat"])  # no label column
    with pytest.raises(DataError, match=r"m\.parquet: missing column\(s\) label") as e:
        make_source(data_cfg(source="parquet", path=str(f))).units()
    assert "data.label_column=null" in str(e.value)


def test_parquet_truncated_file_names_file(tmp_path):
    f = _write_parquet(tmp_path / "t.parquet", [png(v) for v in range(20)], ["x"] * 20, list(range(20)))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"t\.parquet: cannot read parquet footer, the file is truncated"):
        make_source(data_cfg(source="parquet", path=str(f))).units()
    # skip: the other files are read, the unreadable one is recorded once (its rows cannot be counted)
    good = _write_parquet(tmp_path / "u.parquet", [png(1)], ["x"], [0])
    rows = list(iter_rows(make_source(data_cfg(source="parquet", path=str(tmp_path), on_bad_row="skip"))))
    assert [r.source_id for r in rows] == [str(f), f"{good}#0"]
    assert "whole file skipped" in rows[0].error and rows[1].error is None


def test_folder_captions_jsonl(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.png").write_bytes(png(i * 50, (12, 12)))
    (tmp_path / "img" / "bad.png").write_bytes(b"garbage")
    lines = [{"file": f"img/{i}.png", "caption": f"picture {i}", "label": i} for i in range(3)]
    lines += [{"file": "img/bad.png", "caption": "broken", "label": 0}, {"file": "img/0.png", "caption": "", "label": 0}]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    rows = list(iter_rows(make_source(data_cfg(source="folder", path=str(tmp_path)))))
    assert [r.prompt for r in rows[:3]] == ["picture 0", "picture 1", "picture 2"]
    assert rows[2].image.shape == (8, 8, 1)
    assert "bad.png" in rows[3].error and "line 4" in rows[3].error and "corrupt image bytes" in rows[3].error
    assert "captions.jsonl: line 5: empty prompt" in rows[4].error
    assert len({r.source_id for r in rows}) == 5  # 0.png listed twice: still two distinct rows


def test_folder_class_subfolders(tmp_path):
    for cls in ("red_fox", "cat"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            (tmp_path / cls / f"{i}.png").write_bytes(png(10 * i))
    rows = list(iter_rows(make_source(data_cfg(source="folder", path=str(tmp_path), channels=3))))
    assert [(r.label, r.prompt) for r in rows] == [(0, "cat"), (0, "cat"), (1, "red fox"), (1, "red fox")]
    assert rows[0].image.shape == (8, 8, 3)


def test_path_required_for_file_sources():
    with pytest.raises(DataError, match="needs data.path"):
        make_source(data_cfg(source="parquet"))
