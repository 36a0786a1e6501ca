"""The prepare stage end to end on a real local Ray cluster (smoke sizes)."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cca_ray.config import load_config
from cca_ray.data import read_dataset, read_manifest
from cca_ray.train.reference import verify_reference
from cca_ray.data.schema import DataError
from cca_ray.data.sources import digit_prompt

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def smoke(ray_local, tmp_path_factory):
    """One smoke prepare through the CLI entry point, shared by the tests below."""
    from cca_ray.data import prepare

    work = tmp_path_factory.mktemp("prep")
    prepare.main(["--preset", "smoke", "--workdir", str(work)])
    return load_config("smoke", workdir=work)


def test_prepare_writes_complete_datasets(smoke, capsys):
    d = smoke.data_dir
    tm, hm, pm = (read_manifest(d / n) for n in ("train", "holdout", "pairs"))
    assert tm["counts"]["rows"] + hm["counts"]["rows"] == 512  # data.max_images, nothing skipped
    assert 0.1 < hm["counts"]["rows"] / 512 < 0.3  # holdout_fraction 0.2
    assert tm["tokenizer"] == hm["tokenizer"] == pm["tokenizer"]
    assert tm["tokenizer"]["version"] == "kmeans-patch-vq/2" and tm["grid"] == [4, 4]
    train = read_dataset(d / "train")
    assert train.schema.field("codes").type == pa.list_(pa.int32())
    assert set(train["prompt"].to_pylist()) == {digit_prompt(i) for i in range(10)}
    holdout_ids = set(read_dataset(d / "holdout")["source_id"].to_pylist())
    assert not holdout_ids & set(train["source_id"].to_pylist())
    pairs = read_dataset(d / "pairs")
    assert pairs.num_rows == train.num_rows
    assert all(a != b for a, b in zip(pairs["neg_prompt"].to_pylist(), pairs["prompt"].to_pylist()))
    assert 0.03 < pm["pairing"]["null_ratio"]["pos"] < 0.2
    assert not list(d.glob(".*"))  # no temp dirs left behind


def test_prepare_is_skipped_when_done_and_tokenizer_is_loadable(smoke):
    from cca_ray.data import load_data_tokenizer
    from cca_ray.data.prepare import is_prepared, prepare

    assert is_prepared(smoke)
    before = read_manifest(smoke.data_dir / "train")["created"]
    prepare(smoke)
    assert read_manifest(smoke.data_dir / "train")["created"] == before
    changed = load_config("smoke", workdir=smoke.root, overrides={"data.null_prob": 0.2})
    assert not is_prepared(changed)
    tok = load_data_tokenizer(smoke.data_dir, "holdout")
    assert tok.identity() == read_manifest(smoke.data_dir / "train")["tokenizer"]


def test_pairs_do_not_depend_on_ray_block_size(smoke, tmp_path):
    """Re-running the pairs step over the same train rows cut into 7 blocks / batches of 5
    gives every source_id the same negative and null flags."""
    import shutil

    from cca_ray.data.pipeline import write_pairs

    shutil.copytree(smoke.data_dir / "train", tmp_path / "train")
    ds = read_dataset(tmp_path / "train", as_ray=True).repartition(7).map_batches(lambda t: t, batch_size=5,
                                                                                  batch_format="pyarrow")
    write_pairs(tmp_path, smoke.data.seed, smoke.data.null_prob, shard_rows=50, train_ds=ds, row_group_rows=16)
    cols = ["source_id", "neg_label", "neg_prompt", "pos_null", "neg_null"]
    a = read_dataset(smoke.data_dir / "pairs", columns=cols).sort_by("source_id")
    b = read_dataset(tmp_path / "pairs", columns=cols).sort_by("source_id")
    assert a.equals(b)
    # shards of exactly shard_rows rows but the last, in row groups of row_group_rows (what streaming reads)
    files = [pq.ParquetFile(tmp_path / "pairs" / f).metadata for f in read_manifest(tmp_path / "pairs")["files"]]
    assert len(files) > 1 and {m.num_rows for m in files[:-1]} == {50} and 0 < files[-1].num_rows <= 50
    assert all(m.row_group(i).num_rows <= 16 for m in files for i in range(m.num_row_groups))
    assert files[0].num_row_groups == 4


def _png(v):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8), int(v)).save(buf, format="PNG")
    return buf.getvalue()


def _bad_parquet(path):
    images = [_png(v) for v in range(0, 240, 8)]  # 30 rows
    images[7] = b"not an image"
    captions = [f"a gray square number {i % 5}" for i in range(30)]
    captions[12] = ""
    pq.write_table(pa.table({"image": images, "caption": captions}), path)
    return path


def test_bad_rows_error_names_file_and_row(ray_local, tmp_path):
    from cca_ray.data.prepare import prepare

    f = _bad_parquet(tmp_path / "bad.parquet")
    cfg = load_config("smoke", workdir=tmp_path / "w", overrides={
        "data.source": "parquet", "data.path": str(f), "data.label_column": None, "tokenizer.codebook_size": 8})
    with pytest.raises(DataError, match=r"bad\.parquet: row (7: corrupt image bytes|12: empty prompt)"):
        prepare(cfg)
    assert not (cfg.data_dir / "train").exists()  # nothing half-written


def test_on_bad_row_skip_records_rows(ray_local, tmp_path, capsys):
    from cca_ray.data import prepare

    f = _bad_parquet(tmp_path / "bad.parquet")
    work = tmp_path / "w"
    prepare.main(["--preset", "smoke", "--workdir", str(work), "--on-bad-row", "skip", "data.source=parquet",
                  f"data.path={f}", "data.label_column=null", "tokenizer.codebook_size=8", "data.holdout_fraction=0"])
    m = read_manifest(work / "data" / "train")
    assert m["counts"]["rows"] == 28 and m["skipped"]["count"] == 2
    errors = {r["source_id"]: r["error"] for r in m["skipped"]["rows"]}
    assert errors[f"{f}#12"].startswith(f"{f}: row 12: empty prompt")
    assert errors[f"{f}#7"].startswith(f"{f}: row 7: corrupt image bytes")
    assert "2 skipped" in capsys.readouterr().out


def test_cli_reports_bad_input_and_exit_code(ray_local, tmp_path, capsys):
    from cca_ray.data import prepare

    with pytest.raises(SystemExit) as e:
        prepare.main(["--preset", "smoke", "--workdir", str(tmp_path), "data.source=parquet",
                      f"data.path={tmp_path / 'none'}"])
    assert e.value.code == 1
    assert "no parquet files found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        prepare.main(["--preset", "smoke", "--workdir", str(tmp_path), "tokenizer.patch_size=3"])
    assert e.value.code == 2 and "tokenizer.patch_size" in capsys.readouterr().err


def test_reference_pass_and_verification(smoke, tmp_path):
    import torch

    from cca_ray.train.reference import REFERENCE_VERSION, ReferenceMismatchError, reference_pass
    from cca_ray.models import build_tiny_model, load_model

    prompts = [digit_prompt(i) for i in range(10)]
    base = build_tiny_model(tmp_path / "base", smoke.model, codebook_size=32, prompts=prompts)
    # smoke trains cca, which never reads ref_logp_null: not scored (one forward less per pair)
    m = reference_pass(smoke, base)
    assert m["reference"]["null_scored"] is False
    ref = read_dataset(smoke.data_dir / "pairs_ref")
    assert ref["ref_logp_null"].null_count == len(ref) and ref["ref_logp_pos"].null_count == 0
    with pytest.raises(ReferenceMismatchError, match="ref_logp_null was not scored"):
        verify_reference(smoke.data_dir / "pairs_ref", base, smoke.data_dir / "pairs", need_null=True)
    m = reference_pass(smoke, base, score_null=True)  # what cca_cfg asks for: re-scored with the null column
    assert m["reference"]["null_scored"] is True
    assert m["reference"]["checkpoint_id"].startswith("sha256:")
    assert m["reference"]["version"] == REFERENCE_VERSION
    ref = read_dataset(smoke.data_dir / "pairs_ref")
    for name in ("ref_logp_pos", "ref_logp_neg", "ref_logp_null"):
        assert ref.schema.field(name).type == pa.float32()
        lp = ref[name].to_numpy()
        assert np.isfinite(lp).all() and (lp < 0).all(), name
    # spot-check against the model API directly: real prompts whatever the null flags, and the "" prompt
    model = load_model(base)
    flagged = [i for i, (a, b) in enumerate(zip(ref["pos_null"].to_pylist(), ref["neg_null"].to_pylist())) if a or b]
    rows = ref.take(flagged[:4] + list(range(12))).to_pylist()
    codes = torch.tensor([r["codes"] for r in rows]).view(-1, 4, 4)
    with torch.no_grad():
        for name, prompts in (("ref_logp_pos", [r["prompt"] for r in rows]),
                              ("ref_logp_neg", [r["neg_prompt"] for r in rows]), ("ref_logp_null", [""] * len(rows))):
            want = model.sequence_logprob(model.encode_conditions(prompts, (4, 4)), codes).numpy()
            np.testing.assert_allclose([r[name] for r in rows], want, rtol=1e-4, atol=1e-3, err_msg=name)

    assert verify_reference(smoke.data_dir / "pairs_ref", base, smoke.data_dir / "pairs")["reference"]["path"]
    assert reference_pass(smoke, base)["created"] == m["created"]  # up to date (and has null): not recomputed
    # a pairs_ref from the version-1 pass (flags applied, no ref_logp_null) is stale: recomputed
    mf = smoke.data_dir / "pairs_ref" / "manifest.json"
    old = json.loads(mf.read_text())
    old["reference"].pop("version")
    mf.write_text(json.dumps(old))
    with pytest.raises(ReferenceMismatchError, match="reference pass version 1"):
        verify_reference(smoke.data_dir / "pairs_ref", base, smoke.data_dir / "pairs")
    assert reference_pass(smoke, base)["reference"]["version"] == REFERENCE_VERSION
    assert verify_reference(smoke.data_dir / "pairs_ref", base, smoke.data_dir / "pairs")
    other = build_tiny_model(tmp_path / "other", smoke.model.model_copy(update={"seed": 1}), codebook_size=32,
                             prompts=prompts)
    with pytest.raises(ReferenceMismatchError, match="were computed with reference checkpoint sha256:"):
        verify_reference(smoke.data_dir / "pairs_ref", other)


def test_ordered_datasets_is_scoped_to_the_datasets_built_inside(ray_local):
    """preserve_order rides on the datasets made inside the block (and what derives from them), not on the
    process's DataContext that Ray Train / Tune datasets read."""
    import ray.data

    from cca_ray.data.pipeline import ordered_datasets

    before = ray.data.DataContext.get_current().execution_options.preserve_order
    with ordered_datasets():
        ds = ray.data.from_items([{"i": i} for i in range(8)], override_num_blocks=4)
    assert ray.data.DataContext.get_current().execution_options.preserve_order == before
    derived = ds.map_batches(lambda b: b, batch_format="pyarrow").materialize()
    assert ds.context.execution_options.preserve_order and derived.context.execution_options.preserve_order
    assert [r["i"] for r in derived.take_all()] == list(range(8))
    assert ray.data.from_items([{"i": 0}]).context.execution_options.preserve_order == before  # made outside


def test_prepare_with_emu3_vqvae_tokenizer(ray_local, tmp_path):
    """The Emu3 VQ-VAE runs in the same actor pool; its manifest names the VQ checkpoint."""
    import torch
    from transformers import Emu3VQVAE, Emu3VQVAEConfig

    from cca_ray.data import checkpoint_id
    from cca_ray.data.prepare import prepare

    torch.manual_seed(0)
    vq = tmp_path / "vq"
    Emu3VQVAE(Emu3VQVAEConfig(codebook_size=64, embed_dim=4, latent_channels=4, base_channels=32,
                              channel_multiplier=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[],
                              hidden_size=32)).save_pretrained(vq)
    cfg = load_config("smoke", workdir=tmp_path / "w", overrides={
        "tokenizer.kind": "emu3-vqvae", "tokenizer.path": str(vq), "tokenizer.codebook_size": 64,
        "tokenizer.patch_size": 8, "data.image_size": 16, "data.max_images": 48, "data.tokenizer_workers": 2,
        "data.tokenizer_batch_size": 8})
    manifests = prepare(cfg)
    tok = manifests["train"]["tokenizer"]
    assert tok["family"] == "emu3-vqvae" and tok["grid"] == [2, 2] and tok["fingerprint"] == checkpoint_id(vq)
    train = read_dataset(cfg.data_dir / "train")
    assert train.num_rows + manifests["holdout"]["counts"]["rows"] == 48
    codes = np.array(train["codes"].to_pylist())
    assert codes.shape[1] == 4 and codes.min() >= 0 and codes.max() < 64
