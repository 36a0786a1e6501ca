"""Reference-pass pieces that need no Ray: condition selection, the scorer's columns, checkpoint verification."""

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from cca_ray.config import load_config
from cca_ray.train.reference import REFERENCE_VERSION, ReferenceMismatchError, _conditions, verify_reference
from cca_ray.data.schema import PAIRS_REF_SCHEMA, DataError

PROMPTS = [f"a handwritten digit {w}" for w in ("zero", "one", "two", "three")]
CODEBOOK, GRID = 32, (4, 4)


def test_conditions_are_the_real_prompts_and_a_missing_one_names_the_row():
    assert _conditions(["a cat", "a dog"], ["s0", "s1"], "prompt") == ["a cat", "a dog"]
    with pytest.raises(DataError, match=r"^f\.parquet#4: empty neg_prompt"):
        _conditions(["a cat", "  "], ["f.parquet#3", "f.parquet#4"], "neg_prompt")
    with pytest.raises(DataError, match=r"^f\.parquet#3: empty prompt"):
        _conditions([None], ["f.parquet#3"], "prompt")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from cca_ray.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("ref") / "base", load_config("smoke").model, codebook_size=CODEBOOK, prompts=PROMPTS)


def test_scorer_scores_real_prompts_whatever_the_null_flags_and_adds_ref_logp_null(tiny_model):
    """ref_logp_pos/neg = log p(x | the row's prompts) on flagged rows too; ref_logp_null = log p(x | "")."""
    from cca_ray.train.reference import ReferenceScorer
    from cca_ray.models import load_model

    rng = np.random.default_rng(0)
    n = 6
    codes = rng.integers(0, CODEBOOK, (n, *GRID))
    pos = [PROMPTS[i % 4] for i in range(n)]
    neg = [PROMPTS[(i + 1) % 4] for i in range(n)]
    table = pa.table({"codes": pa.array([c.ravel().tolist() for c in codes], pa.list_(pa.int32())),
                      "prompt": pos, "neg_prompt": neg, "source_id": [f"s{i}" for i in range(n)],
                      "pos_null": [True, False, True, False, False, True],
                      "neg_null": [False, True, True, False, True, False]})
    scored = ReferenceScorer(str(tiny_model), {}, "float32", CODEBOOK, GRID)(table)
    for name in ("ref_logp_pos", "ref_logp_neg", "ref_logp_null"):
        assert scored.schema.field(name).type == PAIRS_REF_SCHEMA.field(name).type == pa.float32()

    model = load_model(tiny_model)
    x = torch.from_numpy(codes).long()
    with torch.no_grad():
        want = {"ref_logp_pos": model.sequence_logprob(model.encode_conditions(pos, GRID), x),
                "ref_logp_neg": model.sequence_logprob(model.encode_conditions(neg, GRID), x),
                "ref_logp_null": model.sequence_logprob(model.encode_conditions([""] * n, GRID), x)}
    for name, w in want.items():
        np.testing.assert_allclose(scored[name].to_numpy(), w.numpy(), rtol=1e-5, atol=1e-4, err_msg=name)
    # on flagged rows the null score differs from the real prompts' by far more than the tolerance, so a
    # scorer that still applied the flags (version 1) would fail the comparison above
    null, flagged = want["ref_logp_null"].numpy(), np.array(table["pos_null"]) | np.array(table["neg_null"])
    assert flagged.any()
    for name in ("ref_logp_pos", "ref_logp_neg"):
        assert np.abs(null - want[name].numpy())[flagged].min() > 1e-3, name


def test_scorer_leaves_ref_logp_null_all_null_when_no_objective_reads_it(tiny_model):
    """score_null=False: the column is there (the schema's) and all null; read_rows gives None, and
    cca_cfg with flagged rows then refuses the data, while cca reads it."""
    from cca_ray.train.reference import ReferenceScorer

    n = 4
    codes = np.random.default_rng(1).integers(0, CODEBOOK, (n, *GRID))
    table = pa.table({"codes": pa.array([c.ravel().tolist() for c in codes], pa.list_(pa.int32())),
                      "prompt": PROMPTS[:n], "neg_prompt": PROMPTS[1:n] + PROMPTS[:1],
                      "source_id": [f"s{i}" for i in range(n)], "pos_null": [False] * n, "neg_null": [False] * n})
    with_null = ReferenceScorer(str(tiny_model), {}, "float32", CODEBOOK, GRID)(table)
    without = ReferenceScorer(str(tiny_model), {}, "float32", CODEBOOK, GRID, score_null=False)(table)
    assert without["ref_logp_null"].null_count == n and without.schema.field("ref_logp_null").type == pa.float32()
    for name in ("ref_logp_pos", "ref_logp_neg"):
        assert without[name].to_pylist() == with_null[name].to_pylist()


def test_verify_reference_refuses_a_pairs_ref_without_null_scores_for_cca_cfg(tmp_path):
    d = _pairs_ref(tmp_path, {"checkpoint_id": "sha256:aaaa", "null_scored": False})
    assert verify_reference(d, "sha256:aaaa")  # cca / dpo
    with pytest.raises(ReferenceMismatchError, match="ref_logp_null was not scored"):
        verify_reference(d, "sha256:aaaa", need_null=True)
    assert verify_reference(_pairs_ref(tmp_path / "y", {"checkpoint_id": "sha256:aaaa", "null_scored": True}),
                            "sha256:aaaa", need_null=True)


def _pairs_ref(tmp_path, reference, pairing=None):
    d = tmp_path / "pairs_ref"
    d.mkdir(parents=True, exist_ok=True)
    m = {"schema_version": 1, "dataset": "pairs_ref", "pairing": pairing or {"seed": 0}}
    if reference is not None:
        m["reference"] = {"version": REFERENCE_VERSION, **reference}
    (d / "manifest.json").write_text(json.dumps(m))
    return d


def test_verify_reference_accepts_id_and_refuses_others(tmp_path):
    d = _pairs_ref(tmp_path, {"checkpoint_id": "sha256:aaaa", "path": "/ck/a"})
    assert verify_reference(d, "sha256:aaaa")["reference"]["path"] == "/ck/a"
    with pytest.raises(ReferenceMismatchError, match="computed with reference checkpoint sha256:aaaa"):
        verify_reference(d, "sha256:bbbb")
    with pytest.raises(ReferenceMismatchError, match="records no reference checkpoint id"):
        verify_reference(_pairs_ref(tmp_path / "x", None), "sha256:aaaa")


def test_verify_reference_refuses_a_pairs_ref_from_an_older_reference_pass(tmp_path):
    """Version 1 (no 'version' recorded) scored flagged rows with "" and had no ref_logp_null: stale."""
    old = _pairs_ref(tmp_path, {"checkpoint_id": "sha256:aaaa"})
    m = json.loads((old / "manifest.json").read_text())
    del m["reference"]["version"]
    (old / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ReferenceMismatchError, match=f"reference pass version 1, this code reads version "
                                                     f"{REFERENCE_VERSION}"):
        verify_reference(old, "sha256:aaaa")


def test_verify_reference_refuses_a_stale_pairing(tmp_path):
    d = _pairs_ref(tmp_path, {"checkpoint_id": "sha256:aaaa"}, pairing={"seed": 0, "fingerprint": "1"})
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    (pairs / "manifest.json").write_text(json.dumps({"schema_version": 1, "pairing": {"seed": 0, "fingerprint": "2"}}))
    with pytest.raises(ReferenceMismatchError, match="now holds pairing"):
        verify_reference(d, "sha256:aaaa", pairs)
