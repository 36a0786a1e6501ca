"""Trainer pieces, and the DeepSpeed engine in one process (a one-rank gloo group, as Ray Train sets up).

The multi-worker Ray Train runs (failure + resume, MLflow) are in test_train_ray.py.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from cca_ray.train import checkpoint as ckpt
from cca_ray.config import load_config
from cca_ray.train.recipe import Trainer, deepspeed_config, lr_factor, reference_config
from cca_ray.train.batches import (BatchPlan, TrainDataError, TrainRows, check_reference_columns, make_micro_batch,
                                 total_steps)

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PROMPTS = [f"a handwritten digit {w}" for w in WORDS]
CODEBOOK, GRID = 32, (4, 4)


def synthetic_rows(n: int = 48, seed: int = 0) -> TrainRows:
    """Pairs like the data stage writes them: a negative prompt that differs from the row's own."""
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, 10, n)
    neg = (lab + rng.integers(1, 10, n)) % 10
    return TrainRows(codes=rng.integers(0, CODEBOOK, (n, *GRID)).astype(np.int32),
                     cond=[PROMPTS[i] for i in lab], neg_cond=[PROMPTS[i] for i in neg],
                     pos_null=rng.random(n) < 0.25, neg_null=rng.random(n) < 0.25, source="synthetic")


def smoke_cfg(*overrides: str):
    return load_config("smoke", overrides=["train.micro_batch_size=4", "train.grad_accum=2", *overrides])


# -- pure pieces --------------------------------------------------------------------------
def test_lr_factor_warmup_then_cosine():
    f = lambda s, sched="cosine": lr_factor(s, warmup=4, total=14, schedule=sched)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(9) == pytest.approx(0.5) and f(14) == pytest.approx(0.0)
    assert f(13, "constant") == 1.0


def test_deepspeed_configs_follow_the_train_config():
    tc = smoke_cfg("train.zero_stage=3", "train.bf16=true", "train.grad_clip=0.5").train
    ds = deepspeed_config(tc, world_size=2)
    assert ds["train_batch_size"] == 4 * 2 * 2 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] and ds["gradient_clipping"] == 0.5
    assert reference_config(tc, 2)["zero_optimization"]["stage"] == 3  # reference partitioned like the policy
    assert reference_config(smoke_cfg().train, 2)["zero_optimization"]["stage"] == 0


def test_batch_plan_is_deterministic_disjoint_and_covers_each_epoch():
    plan = BatchPlan(num_rows=50, world_size=2, micro_batch_size=3, grad_accum=2, seed=7)
    assert plan.global_batch == 12 and plan.steps_per_epoch == 4 and total_steps(plan, 2, None) == 8
    assert total_steps(plan, 2, 5) == 5
    for epoch in range(2):
        seen = np.concatenate([plan.rows(epoch * 4 + s, r, m) for s in range(4) for m in range(2) for r in range(2)])
        assert len(set(seen.tolist())) == 48  # no row twice within an epoch; 2 leftover rows dropped
    np.testing.assert_array_equal(plan.rows(5, 1, 1), BatchPlan(50, 2, 3, 2, 7).rows(5, 1, 1))
    assert not np.array_equal(plan.rows(0, 0, 0), plan.rows(4, 0, 0))  # a new order every epoch
    with pytest.raises(TrainDataError, match="fewer than one global batch"):
        BatchPlan(10, 2, 3, 2).check("d")


def test_micro_batch_negatives_come_from_the_pairing_and_nulls_from_the_data():
    data = synthetic_rows()
    rows = np.array([3, 1, 4, 15, 9, 26])
    mb = make_micro_batch(data, rows, "cca")
    assert mb.neg_conds == [data.neg_cond[i] for i in rows]  # the data's pair, whatever the batch holds
    assert mb.neg_is_null is None
    cfg_mb = make_micro_batch(data, rows, "cca_cfg")
    for j, i in enumerate(rows):
        assert cfg_mb.pos_conds[j] == (None if data.pos_null[i] else data.cond[i])
        assert cfg_mb.neg_conds[j] == (None if data.neg_null[i] else data.neg_cond[i])
    assert cfg_mb.neg_is_null.tolist() == data.neg_null[rows].tolist()
    sft = [make_micro_batch(data, np.arange(40), "sft", cond_dropout=0.5, dropout_seed=(0, 3, 1, 0)) for _ in range(2)]
    assert sft[0].neg_conds is None and sft[0].pos_conds == sft[1].pos_conds  # a repeated step draws the same
    assert 5 < sum(p is None for p in sft[0].pos_conds) < 35


def test_micro_batch_reference_columns_follow_the_objective():
    """cca/dpo read ref_logp_pos/neg as scored (real prompts); cca_cfg takes ref_logp_null where a flag is set."""
    data = synthetic_rows()
    n = len(data)
    data.ref_logp_pos = np.arange(n, dtype=np.float32)
    data.ref_logp_neg = np.arange(n, dtype=np.float32) + 100
    data.ref_logp_null = np.arange(n, dtype=np.float32) + 1000
    rows = np.arange(n)
    assert data.pos_null.any() and data.neg_null.any() and not (data.pos_null & data.neg_null).all()
    for objective in ("cca", "dpo"):
        mb = make_micro_batch(data, rows, objective)
        assert mb.ref_logp_pos.tolist() == data.ref_logp_pos.tolist()
        assert mb.ref_logp_neg.tolist() == data.ref_logp_neg.tolist()
    mb = make_micro_batch(data, rows, "cca_cfg")
    assert mb.ref_logp_pos.tolist() == np.where(data.pos_null, data.ref_logp_null, data.ref_logp_pos).tolist()
    assert mb.ref_logp_neg.tolist() == np.where(data.neg_null, data.ref_logp_null, data.ref_logp_neg).tolist()
    # without ref_logp_null, cca_cfg cannot score a flagged row; cca and dpo do not need it
    data.ref_logp_null = None
    check_reference_columns(data, "cca"), check_reference_columns(data, "dpo")
    with pytest.raises(TrainDataError, match="needs the ref_logp_null column"):
        check_reference_columns(data, "cca_cfg")
    with pytest.raises(TrainDataError, match="ref_logp_null"):
        make_micro_batch(data, rows, "cca_cfg")


def test_read_rows_reads_pairs_ref_through_the_data_package(tmp_path):
    """read_rows uses cca_ray.data's reader: its file/row errors, plus the trainer's own row checks."""
    from cca_ray.data.schema import PAIRS_REF_SCHEMA, DataError
    from cca_ray.data.shards import make_manifest, write_manifest, write_table_shards
    from cca_ray.train.batches import read_rows

    data = synthetic_rows(n=10)
    cols = {"codes": [c.ravel().tolist() for c in data.codes], "grid_h": [4] * 10, "grid_w": [4] * 10,
            "label": [None] * 10, "prompt": data.cond, "source_id": [f"f.parquet#{i}" for i in range(10)],
            "neg_label": [None] * 10, "neg_prompt": data.neg_cond, "pos_null": data.pos_null,
            "neg_null": data.neg_null, "ref_logp_pos": np.full(10, -50.0), "ref_logp_neg": np.full(10, -51.0),
            "ref_logp_null": np.full(10, -52.0)}

    def write(name: str, table: pa.Table):
        d = tmp_path / name
        d.mkdir()
        files = write_table_shards(table, d, shard_rows=4)
        tok = {"family": "kmeans", "grid": list(GRID), "codebook_size": CODEBOOK}
        write_manifest(d, make_manifest("pairs_ref", tok, len(table), files))
        return d

    rows = read_rows(write("ok", pa.table(cols, schema=PAIRS_REF_SCHEMA)), pairs=True, reference=True)
    assert rows.grid == GRID and np.array_equal(rows.codes, data.codes) and rows.ref_logp_null.tolist() == [-52.0] * 10
    bad = dict(cols, codes=[c.ravel().tolist() for c in data.codes[:6]] + [[CODEBOOK] * 16] + cols["codes"][7:])
    with pytest.raises(DataError, match=r"part-00001\.parquet: row 2: code 32 is outside the codebook"):
        read_rows(write("bad_code", pa.table(bad, schema=PAIRS_REF_SCHEMA)), pairs=True, reference=True)
    nan = dict(cols, ref_logp_null=np.where(np.arange(10) == 3, np.nan, -52.0))
    with pytest.raises(TrainDataError, match=r"row 3 \(f\.parquet#3\) has a non-finite ref_logp_null"):
        read_rows(write("nan", pa.table(nan, schema=PAIRS_REF_SCHEMA)), pairs=True, reference=True)
    old = pa.table({k: v for k, v in cols.items() if k != "ref_logp_null"},
                   schema=pa.schema([f for f in PAIRS_REF_SCHEMA if f.name != "ref_logp_null"]))
    with pytest.raises(DataError, match="missing column.*ref_logp_null"):  # a version-1 pairs_ref
        read_rows(write("old", old), pairs=True, reference=True)


# -- DeepSpeed in one process --------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from cca_ray.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "base", smoke_cfg().model, codebook_size=CODEBOOK,
                            prompts=PROMPTS)


def _params(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_few_steps_change_every_trainable_parameter_and_no_reference_parameter(process_group, tiny_model):
    cfg = smoke_cfg("train.lr=0.01", "train.max_steps=3")
    tr = Trainer(cfg, "train", model_dir=tiny_model, data=synthetic_rows()).setup()
    policy0, ref0 = _params(tr.engine.module), _params(tr.ref_engine.module)
    metrics = tr.train()
    assert tr.step == 3 and metrics["step"] == 3
    for key in ("loss", "rel_logp_pos", "rel_logp_neg", "pair_accuracy", "grad_norm", "lr", "tokens_per_s"):
        assert np.isfinite(metrics[key]), key
    trainable = {n for n, p in tr.engine.module.named_parameters() if p.requires_grad}
    assert trainable and all(not n.startswith(tr.adapter.frozen_prefixes) for n in trainable)
    after = _params(tr.engine.module)
    unchanged = [n for n in trainable if torch.equal(policy0[n], after[n])]
    assert not unchanged, f"trainable parameters that did not move: {unchanged}"
    frozen_moved = [n for n in policy0 if n not in trainable and not torch.equal(policy0[n], after[n])]
    assert not frozen_moved, f"frozen (VQ-VAE) parameters that moved: {frozen_moved}"
    ref_moved = [n for n, p in tr.ref_engine.module.named_parameters() if not torch.equal(ref0[n], p)]
    assert not ref_moved, f"reference parameters that moved: {ref_moved}"
    assert all(not p.requires_grad for p in tr.ref_engine.module.parameters())


def test_precomputed_reference_gives_the_online_loss(process_group, tiny_model):
    """ref_logp_* made by the data stage's own ReferenceScorer == the trainer's online reference engine,
    for cca and dpo (real prompts, flags ignored) and cca_cfg (ref_logp_null where a flag is set)."""
    from cca_ray.train.reference import ReferenceScorer

    data = synthetic_rows(n=16, seed=1)
    table = pa.table({"codes": pa.array([c.ravel().tolist() for c in data.codes], pa.list_(pa.int32())),
                      "prompt": data.cond, "neg_prompt": data.neg_cond, "pos_null": data.pos_null,
                      "neg_null": data.neg_null, "source_id": [f"s{i}" for i in range(16)]})
    scored = ReferenceScorer(str(tiny_model), {}, "float32", CODEBOOK, GRID)(table)
    cols = {k: scored.column(k).to_numpy() for k in ("ref_logp_pos", "ref_logp_neg", "ref_logp_null")}
    ref_data = TrainRows(**{**data.__dict__, **cols})
    online = Trainer(smoke_cfg("train.objective=cca_cfg", "train.lr=0.01"), "train", model_dir=tiny_model,
                     data=data).setup()
    pre = Trainer(smoke_cfg("train.objective=cca_cfg", "train.lr=0.01", "train.reference=precomputed"), "train",
                  model_dir=tiny_model, data=ref_data).setup()
    assert pre.ref_engine is None and online.ref_engine is not None  # precomputed: no reference model at all
    rows = np.arange(4, 12)  # rows 5 (pos_null) and 8 (neg_null): the batch exercises both null flags
    assert data.pos_null[rows].any() and data.neg_null[rows].any()
    for objective in ("cca", "cca_cfg", "dpo"):
        online.tc.objective = pre.tc.objective = objective
        l_on, m_on, _ = online.micro_batch_loss(make_micro_batch(data, rows, objective))
        l_pre, m_pre, _ = pre.micro_batch_loss(make_micro_batch(ref_data, rows, objective))
        assert l_pre.item() == pytest.approx(l_on.item(), abs=1e-5), objective
        for key in ("rel_logp_pos_sum", "rel_logp_neg_sum"):
            assert float(m_pre[key]) == pytest.approx(float(m_on[key]), abs=1e-3), (objective, key)
    # after a step the policy has moved away from the reference: still the same loss both ways
    for objective in ("cca", "cca_cfg", "dpo"):
        online.tc.objective = pre.tc.objective = objective
        online.step_once(), pre.step_once()
        l_on, m_on, _ = online.micro_batch_loss(make_micro_batch(data, rows, objective))
        l_pre, m_pre, _ = pre.micro_batch_loss(make_micro_batch(ref_data, rows, objective))
        assert abs(float(m_on["rel_logp_pos_sum"])) > 1e-2, objective
        assert l_pre.item() == pytest.approx(l_on.item(), abs=1e-4), objective
        for key in ("rel_logp_pos_sum", "rel_logp_neg_sum"):
            assert float(m_pre[key]) == pytest.approx(float(m_on[key]), abs=1e-3), (objective, key)


def test_checkpoint_resume_continues_exactly_and_exports(process_group, tiny_model, tmp_path):
    """Steps 1-2, checkpoint, steps 3-4 == resume from the checkpoint, steps 3-4 (weights, Adam state, lr
    schedule, data position and condition dropout all restored); the export loads with load_model."""
    from cca_ray.models import load_model

    cfg = smoke_cfg("train.objective=sft", "train.lr=0.01", "train.max_steps=4", "train.warmup_steps=3",
                    "train.schedule=cosine", "train.cond_dropout=0.3")
    data = synthetic_rows()
    a = Trainer(cfg, "train", model_dir=tiny_model, data=data).setup()
    a.step_once(), a.step_once()
    ckpt.save_engine(a.engine, tmp_path / "ck", {"step": a.step, "data_fingerprint": a.fingerprint}, rank=0)
    at_2 = _params(a.engine.module)
    a.step_once(), a.step_once()
    b = Trainer(cfg, "train", model_dir=tiny_model, data=data).setup(resume_dir=tmp_path / "ck")
    assert b.step == 2 and b.resumed_from == 2 and b.fingerprint != 0
    b.step_once(), b.step_once()
    assert b.fingerprint == a.fingerprint and b.lr == a.lr
    pa_, pb = _params(a.engine.module), _params(b.engine.module)
    assert all(torch.equal(pa_[n], pb[n]) for n in pa_), "resumed run diverged from the uninterrupted one"
    out = ckpt.export_model(tmp_path / "ck", tiny_model, tmp_path / "export", zero_stage=2)
    exported = _params(load_model(out).module)
    assert all(torch.equal(exported[n], at_2[n]) for n in at_2)


def test_a_trial_stopped_after_its_last_step_is_exported_from_its_checkpoint(process_group, tiny_model, tmp_path):
    """ASHA can stop a trial at its final report, before the driver exports it: the main job then exports
    the final checkpoint itself, but never one from a trial stopped part-way."""
    from cca_ray.models import load_model
    from cca_ray.tune.sweep import finished_export

    cfg = smoke_cfg("train.objective=sft", "train.max_steps=2")
    t = Trainer(cfg, "train", model_dir=tiny_model, data=synthetic_rows()).setup()
    t.step_once()
    trial = tmp_path / "trial-x"
    ckpt.save_engine(t.engine, trial / "checkpoint_000001", {"step": 1, "total_steps": 2}, rank=0)
    assert finished_export(trial, tiny_model, zero_stage=2, dtype="float32") is None  # stopped part-way
    t.step_once()
    ckpt.save_engine(t.engine, trial / "checkpoint_000002", {"step": 2, "total_steps": 2}, rank=0)
    out = finished_export(trial, tiny_model, zero_stage=2, dtype="float32")
    assert out == trial / "export"
    exported = _params(load_model(out).module)
    trained = _params(t.engine.module)
    assert all(torch.equal(exported[n], trained[n]) for n in trained)
    assert finished_export(trial, tiny_model, zero_stage=2, dtype="float32") == out  # already there: kept


def test_mlflow_holds_each_step_once_across_restarts(process_group, tiny_model, tmp_path):
    """Metrics reach MLflow only once a checkpoint covering them is committed, and never twice: a restart
    from an earlier checkpoint redoes steps MLflow already holds (skipped), and a death right after a
    commit (before the flush) loses nothing (the buffer travels in the checkpoint)."""
    import shutil

    from cca_ray import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = smoke_cfg("train.objective=sft", "train.max_steps=4", "train.log_every=1", "train.checkpoint_every=2")

    def keep(dst, die_at=None):
        def report(metrics, ckpt_dir):
            if ckpt_dir is not None:
                shutil.copytree(ckpt_dir, dst / f"ck{int(metrics['step'])}")
                if metrics["step"] == die_at:
                    raise KeyboardInterrupt("dies after the commit, before the flush")
        return report

    def steps_of(run_id):
        return [s for s, _ in tracking.metric_history(uri, run_id, "loss")]

    run = tracking.start_run(uri, "t", "a")
    Trainer(cfg, "train", model_dir=tiny_model, data=synthetic_rows(), mlflow=(uri, run),
            report=keep(tmp_path / "a")).setup().train()
    assert steps_of(run) == [1, 2, 3, 4]
    # restarted from step 2 (e.g. its last commit was not registered): steps 3, 4 are redone, not re-logged
    Trainer(cfg, "train", model_dir=tiny_model, data=synthetic_rows(), mlflow=(uri, run),
            report=keep(tmp_path / "a2")).setup(resume_dir=tmp_path / "a" / "ck2").train()
    assert steps_of(run) == [1, 2, 3, 4] and tracking.last_logged_step(uri, run) == 4

    run = tracking.start_run(uri, "t", "b")
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, "train", model_dir=tiny_model, data=synthetic_rows(), mlflow=(uri, run),
                report=keep(tmp_path / "b", die_at=2)).setup().train()
    assert steps_of(run) == []
    Trainer(cfg, "train", model_dir=tiny_model, data=synthetic_rows(), mlflow=(uri, run),
            report=keep(tmp_path / "b2")).setup(resume_dir=tmp_path / "b" / "ck2").train()
    assert steps_of(run) == [1, 2, 3, 4]
