"""Reference-pass pieces that need no Ray: condition selection and checkpoint verification."""

import json

import numpy as np
import pytest

from cca_ray.data.reference import ReferenceMismatchError, _conditions, verify_reference
from cca_ray.data.schema import DataError


def test_null_flags_select_the_empty_prompt():
    got = _conditions(["a cat", "a dog", None], np.array([False, True, True]), ["s0", "s1", "s2"], "prompt")
    assert got == ["a cat", "", ""]  # a null row needs no prompt at all


def test_empty_prompt_where_needed_names_the_row():
    with pytest.raises(DataError, match=r"^f\.parquet#4: empty neg_prompt"):
        _conditions(["a cat", "  "], np.array([False, False]), ["f.parquet#3", "f.parquet#4"], "neg_prompt")
    with pytest.raises(DataError, match=r"^f\.parquet#3: empty prompt"):
        _conditions([None], np.array([False]), ["f.parquet#3"], "prompt")


def _pairs_ref(tmp_path, reference, pairing=None):
    d = tmp_path / "pairs_ref"
    d.mkdir(parents=True, exist_ok=True)
    m = {"schema_version": 1, "dataset": "pairs_ref", "pairing": pairing or {"seed": 0}}
    if reference is not None:
        m["reference"] = reference
    (d / "manifest.json").write_text(json.dumps(m))
    return d


def test_verify_reference_accepts_id_and_refuses_others(tmp_path):
    d = _pairs_ref(tmp_path, {"checkpoint_id": "sha256:aaaa", "path": "/ck/a"})
    assert verify_reference(d, "sha256:aaaa")["reference"]["path"] == "/ck/a"
    with pytest.raises(ReferenceMismatchError, match="computed with reference checkpoint sha256:aaaa"):
        verify_reference(d, "sha256:bbbb")
    with pytest.raises(ReferenceMismatchError, match="records no reference checkpoint id"):
        verify_reference(_pairs_ref(tmp_path / "x", None), "sha256:aaaa")


def test_verify_reference_refuses_a_stale_pairing(tmp_path):
    d = _pairs_ref(tmp_path, {"checkpoint_id": "sha256:aaaa"}, pairing={"seed": 0, "fingerprint": "1"})
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    (pairs / "manifest.json").write_text(json.dumps({"schema_version": 1, "pairing": {"seed": 0, "fingerprint": "2"}}))
    with pytest.raises(ReferenceMismatchError, match="now holds pairing"):
        verify_reference(d, "sha256:aaaa", pairs)
