"""λ-conditioned CCA and GFT through the real trainer (a DeepSpeed engine in a one-rank gloo group):
per-row knob draws in the loss, a zero-initialised embedder that trains, a checkpoint and export that
record it, and samples that follow the knob chosen at sampling time."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cca_ray.config import load_config
from cca_ray.loss import gft_loss
from cca_ray.models import knob, load_model
from cca_ray.train import checkpoint as ckpt
from cca_ray.train.batches import TrainRows, draw_knob, make_micro_batch
from cca_ray.train.recipe import Trainer

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PROMPTS = [f"a handwritten digit {w}" for w in WORDS]
CODEBOOK, GRID = 32, (4, 4)


def rows(n: int = 32, seed: int = 0) -> TrainRows:
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, 10, n)
    neg = (lab + rng.integers(1, 10, n)) % 10
    return TrainRows(codes=rng.integers(0, CODEBOOK, (n, *GRID)).astype(np.int32), cond=[PROMPTS[i] for i in lab],
                     neg_cond=[PROMPTS[i] for i in neg], pos_null=np.zeros(n, bool), neg_null=np.zeros(n, bool),
                     source="synthetic")


def cfg(*overrides: str):
    return load_config("smoke", overrides=["train.micro_batch_size=4", "train.grad_accum=1", "train.lr=0.02",
                                           "train.zero_stage=0", *overrides])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from cca_ray.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("knob") / "base", cfg().model, codebook_size=CODEBOOK,
                            prompts=PROMPTS)


def _knob_params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters() if n.startswith(knob.PREFIX)}


def test_draws_are_a_function_of_the_step_seed():
    a, b = draw_knob("lam", 64, (0, 3, 1, 0), (1.0, math.exp(9))), draw_knob("lam", 64, (0, 3, 1, 0), (1.0, math.exp(9)))
    assert torch.equal(a, b) and not torch.equal(a, draw_knob("lam", 64, (0, 4, 1, 0), (1.0, math.exp(9))))
    assert float(a.min()) >= 1.0 and float(a.max()) <= math.exp(9)
    logs = draw_knob("lam", 4000, (1,), (1.0, math.exp(9))).log()
    assert abs(float(logs.mean()) - 4.5) < 0.2  # log-uniform: log λ uniform on [0, 9]
    beta = draw_knob("beta", 4000, (1,))
    assert 0.0 <= float(beta.min()) and float(beta.max()) < 1.0 and abs(float(beta.mean()) - 0.5) < 0.03


@pytest.mark.parametrize("zero", [0, 3])
def test_lambda_conditioned_cca_trains_the_embedder_and_exports_a_lambda_model(process_group, base, tmp_path, zero):
    c = cfg("train.lam_sampling=loguniform", "train.lam_range=[1.0, 100.0]", "train.max_steps=3",
            f"train.zero_stage={zero}")
    data = rows()
    tr = Trainer(c, "train", model_dir=base, data=data).setup()
    assert knob.spec_of(tr.engine.module) == knob.lam_spec(1.0, 100.0, c.train.lam)
    # step 0: the zero-initialised knob leaves Δ = 0, so each row's CCA term is (1 + λ_k) log 2 with its own λ_k,
    # divided by its own max(λ_k, 1) as objective_loss scales CCA
    mb = make_micro_batch(data, tr.plan.rows(0, 0, 0), "cca")
    seed = (c.train.seed, 0, 0, 0)
    loss, _, _ = tr.micro_batch_loss(mb, seed=seed)
    lam = draw_knob("lam", 4, seed, (1.0, 100.0))
    assert loss.item() == pytest.approx(float(((1 + lam) * math.log(2) / lam.clamp_min(1.0)).mean()), rel=1e-5)
    with tr.gathered_weights():  # ZeRO-3 partitions the embedder like every other weight
        before = _knob_params(tr.engine.module)
    assert before and all(float(v.abs().sum()) == 0 for n, v in before.items() if n.startswith(knob.PREFIX + "mlp.2"))
    for _ in range(3):
        tr.step_once()
    with tr.gathered_weights():
        after = _knob_params(tr.engine.module)
    assert all(not torch.equal(before[n], after[n]) for n in before), "the λ embedder did not train"
    # the checkpoint records the knob; the export is a λ model whose samples follow λ at a fixed seed
    tr.save_checkpoint({})  # no report_fn: writes nothing outside its temp dir
    ckpt.save_engine(tr.engine, tmp_path / "ck", {"step": 3, "knob": knob.spec_to_dict(tr.knob),
                                                  "condition_dim": tr.adapter.condition_dim}, rank=0)
    out = ckpt.export_model(tmp_path / "ck", base, tmp_path / "export", zero_stage=zero)
    m = load_model(out)
    m.module.eval()
    assert knob.spec_of(m.module).name == "cca_lambda" and (knob.spec_of(m.module).low, knob.spec_of(m.module).high) == (1.0, 100.0)
    cond = m.encode_conditions(PROMPTS * 2, GRID)
    a, b = m.generate(cond, seed=5, cca_lambda=1.0), m.generate(cond, seed=5, cca_lambda=100.0)
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match=r"outside the range this model was trained on, \[1, 100\]"):
        m.generate(cond, cca_lambda=1000.0)
    # the base model still loads without any knob
    assert knob.spec_of(load_model(base).module) is None


def test_gft_step_zero_loss_and_training(process_group, base, tmp_path):
    c = cfg("train.objective=gft", "train.cond_dropout=0.5", "train.max_steps=3")
    data = rows()
    tr = Trainer(c, "train", model_dir=base, data=data).setup()
    assert tr.ref_engine is None and knob.spec_of(tr.engine.module).name == "guidance_beta"
    mb = make_micro_batch(data, np.arange(8), "gft", cond_dropout=0.5, dropout_seed=(0, 1))
    dropped = torch.tensor([p is None for p in mb.pos_conds])
    assert dropped.any() and not dropped.all()
    seed = (9, 9)
    loss, metrics, _ = tr.micro_batch_loss(mb, seed=seed)
    # at step 0 the policy is the base model: the GFT loss of the base model's own logits
    plain = load_model(base)
    beta = torch.where(dropped, 1.0, draw_knob("beta", 8, seed))
    lc = plain.token_logits(plain.encode_conditions(mb.pos_conds, GRID), mb.codes)
    lu = plain.token_logits(plain.null_condition(8, GRID), mb.codes)
    assert loss.item() == pytest.approx(gft_loss(lc, lu, mb.codes.flatten(1), beta).item(), rel=1e-5)
    assert float(metrics["count_rows"]) == 8
    before = _knob_params(tr.engine.module)
    for _ in range(3):
        tr.step_once()
    after = _knob_params(tr.engine.module)
    assert all(not torch.equal(before[n], after[n]) for n in before), "the β embedder did not train"
    ckpt.save_engine(tr.engine, tmp_path / "ck", {"step": 3, "knob": knob.spec_to_dict(tr.knob),
                                                  "condition_dim": tr.adapter.condition_dim}, rank=0)
    m = load_model(ckpt.export_model(tmp_path / "ck", base, tmp_path / "export", zero_stage=0))
    m.module.eval()
    cond = m.encode_conditions(PROMPTS * 2, GRID)
    assert not torch.equal(m.generate(cond, seed=5, guidance_beta=1.0), m.generate(cond, seed=5, guidance_beta=0.1))
    with pytest.raises(ValueError, match="cca_lambda: this model is not λ-conditioned"):
        m.generate(cond, cca_lambda=3.0)


def test_lam_sampling_needs_cca():
    from cca_ray.config import ConfigError

    with pytest.raises(ConfigError, match="lam_sampling=loguniform is lambda-conditioned CCA"):
        cfg("train.lam_sampling=loguniform", "train.objective=dpo")
