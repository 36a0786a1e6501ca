"""Dataset dirs: atomic writes, manifests, and read-side checks that name the file and row."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cca_ray.data import checkpoint_id, read_dataset, read_manifest
from cca_ray.data.schema import BASE_SCHEMA, DataError
from cca_ray.fs import atomic_dir
from cca_ray.data.shards import make_manifest, write_manifest, write_table_shards

TOKENIZER = {"family": "kmeans", "version": "kmeans-patch-vq/2", "codebook_size": 16, "grid": [2, 2]}


def table(n=10, codes=None, grid=(2, 2)):
    codes = codes if codes is not None else [[i % 16, 1, 2, 3] for i in range(n)]
    return pa.table({
        "codes": pa.array(codes, pa.list_(pa.int32())),
        "grid_h": pa.array([grid[0]] * n, pa.int32()), "grid_w": pa.array([grid[1]] * n, pa.int32()),
        "label": pa.array([i % 3 for i in range(n)], pa.int64()),
        "prompt": pa.array([f"p{i % 3}" for i in range(n)], pa.string()),
        "source_id": pa.array([f"s:{i}" for i in range(n)], pa.string()),
    }, schema=BASE_SCHEMA)


def make_dataset(path, t, shard_rows=4, dataset="train"):
    with atomic_dir(path) as tmp:
        files = write_table_shards(t, tmp, shard_rows)
        write_manifest(tmp, make_manifest(dataset, TOKENIZER, len(t), files))
    return path


def test_round_trip_and_manifest(tmp_path):
    d = make_dataset(tmp_path / "train", table(10))
    m = read_manifest(d)
    assert m["schema_version"] == 1 and m["counts"] == {"rows": 10, "files": 3, "skipped": 0}
    assert m["tokenizer"] == TOKENIZER and m["grid"] == [2, 2]
    t = read_dataset(d)
    assert t.equals(table(10))
    assert read_dataset(d, columns=["prompt"]).column_names == ["prompt"]


def test_incomplete_dir_is_refused(tmp_path):
    (tmp_path / "train").mkdir()
    pq.write_table(table(3), tmp_path / "train" / "part-00000.parquet")  # shards, but no manifest yet
    with pytest.raises(DataError, match="has no manifest.json"):
        read_dataset(tmp_path / "train")
    with pytest.raises(DataError, match="does not exist"):
        read_manifest(tmp_path / "nothing")


def test_atomic_dir_keeps_old_dataset_when_interrupted(tmp_path):
    d = make_dataset(tmp_path / "train", table(5))
    with pytest.raises(RuntimeError):
        with atomic_dir(d) as tmp:
            write_table_shards(table(9), tmp, 4)
            raise RuntimeError("killed half way")
    assert read_dataset(d).num_rows == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]  # temp dir cleaned up
    make_dataset(d, table(9))  # a finished rewrite replaces it
    assert read_dataset(d).num_rows == 9


def test_code_outside_codebook_names_file_and_row(tmp_path):
    codes = [[0, 1, 2, 3]] * 6
    codes[4] = [0, 1, 16, 3]
    d = make_dataset(tmp_path / "train", table(6, codes=codes), shard_rows=4)
    with pytest.raises(DataError, match=r"part-00001\.parquet: row 0: code 16 is outside the codebook \[0, 16\)"):
        read_dataset(d)


def test_wrong_grid_names_file_and_row(tmp_path):
    t = table(3)
    gh = t.column("grid_h").to_pylist()
    gh[2] = 1
    t = t.set_column(1, "grid_h", pa.array(gh, pa.int32()))
    d = make_dataset(tmp_path / "train", t)
    with pytest.raises(DataError, match=r"part-00000\.parquet: row 2: grid 1x2 does not match the tokenizer grid 2x2"):
        read_dataset(d)
    d2 = make_dataset(tmp_path / "t2", table(3, codes=[[1, 2, 3, 4], [1, 2, 3], [1, 2, 3, 4]]))
    with pytest.raises(DataError, match=r"part-00000\.parquet: row 1: has 3 codes, expected 2x2=4"):
        read_dataset(d2)


def test_missing_columns_name_file_and_column(tmp_path):
    d = make_dataset(tmp_path / "train", table(4).drop_columns(["prompt"]))
    with pytest.raises(DataError, match=r"part-00000\.parquet: missing column\(s\) prompt"):
        read_dataset(d)
    p = make_dataset(tmp_path / "pairs", table(4), dataset="pairs")  # pairs without the pairing columns
    with pytest.raises(DataError, match=r"missing column\(s\) neg_label, neg_prompt, pos_null, neg_null"):
        read_dataset(p)


def test_truncated_shard_names_file(tmp_path):
    d = make_dataset(tmp_path / "train", table(10))
    f = d / "part-00001.parquet"
    f.write_bytes(f.read_bytes()[:-40])
    with pytest.raises(DataError, match=r"part-00001\.parquet: cannot read parquet, the file is truncated"):
        read_dataset(d)


def test_missing_shard_and_count_mismatch(tmp_path):
    d = make_dataset(tmp_path / "train", table(10))
    m = json.loads((d / "manifest.json").read_text())
    m["counts"]["rows"] = 11
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="manifest.json says 11 rows, the shards hold 10"):
        read_dataset(d)
    (d / "part-00002.parquet").unlink()
    with pytest.raises(DataError, match=r"missing: .*part-00002\.parquet"):
        read_dataset(d)


def test_skipped_rows_are_recorded(tmp_path):
    skipped = [{"source_id": f"f.parquet#{i}", "error": f"f.parquet: row {i}: corrupt image bytes"} for i in range(3)]
    with atomic_dir(tmp_path / "train") as tmp:
        files = write_table_shards(table(2), tmp, 4)
        m = make_manifest("train", TOKENIZER, 2, files, skipped)
        m["_all_skipped"] = skipped
        write_manifest(tmp, m)
    m = read_manifest(tmp_path / "train")
    assert m["skipped"]["count"] == 3 and m["counts"]["skipped"] == 3
    assert m["skipped"]["rows"][1]["error"].startswith("f.parquet: row 1")
    assert len((tmp_path / "train" / "skipped.jsonl").read_text().splitlines()) == 3
    assert "_all_skipped" not in m


def test_checkpoint_id_changes_with_weights_not_with_logs(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text('{"a": 1}')
    np.save(ck / "w.npy", np.zeros(4))
    a = checkpoint_id(ck)
    (ck / "README.md").write_text("notes")
    assert checkpoint_id(ck) == a and a.startswith("sha256:")
    np.save(ck / "w.npy", np.ones(4))
    assert checkpoint_id(ck) != a


def test_checkpoint_id_sees_one_changed_byte_anywhere_in_a_big_file(tmp_path, monkeypatch):
    """A fine-tune that changes a few rows of one tensor (a visual-only head) must not pass as the
    reference: every byte is hashed, also past the first read block, and the per-process memo of
    big files does not hide a rewrite (size, mtime and inode key it)."""
    from cca_ray.data import fingerprint

    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text("{}")
    w = np.random.default_rng(0).integers(0, 255, 9 * 2**20 + 17, dtype=np.uint8)  # > one 8 MiB block
    (ck / "model.safetensors").write_bytes(w.tobytes())
    a = checkpoint_id(ck)
    for offset in (0, 5 * 2**20 + 3, len(w) - 1):
        changed = w.copy()
        changed[offset] ^= 1
        (ck / "model.safetensors").write_bytes(changed.tobytes())
        assert checkpoint_id(ck) != a, offset
    (ck / "model.safetensors").write_bytes(w.tobytes())
    assert checkpoint_id(ck) == a
    monkeypatch.setattr(fingerprint, "_MEMO_MIN_BYTES", 0)
    monkeypatch.setattr(fingerprint, "_SETTLED_S", -1.0)  # memoise at once
    assert checkpoint_id(ck) == a and fingerprint._memo
    (ck / "model.safetensors").unlink()  # a new file (new inode) at the same path and size
    (ck / "model.safetensors").write_bytes(changed.tobytes())
    assert checkpoint_id(ck) != a


def test_load_data_tokenizer_refuses_a_foreign_tokenizer(tmp_path):
    from cca_ray.data import load_data_tokenizer
    from cca_ray.tokenizers.kmeans import KMeansPatchTokenizer

    images = np.random.default_rng(0).integers(0, 256, size=(20, 4, 4, 1), dtype=np.uint8)
    tok = KMeansPatchTokenizer(16, 2, 4, 1, iters=3).fit(images)
    tok.save(tmp_path / "tokenizer")
    make_dataset(tmp_path / "train", table(4))  # manifest names another tokenizer (TOKENIZER)
    with pytest.raises(DataError, match="is not the one that made"):
        load_data_tokenizer(tmp_path)
    with atomic_dir(tmp_path / "train") as tmp:
        write_manifest(tmp, make_manifest("train", tok.identity(), 0, []))
    assert load_data_tokenizer(tmp_path).identity() == tok.identity()
