"""Sampling-time knobs (λ-conditioned CCA, GFT's β) on every family: a zero-initialised embedder leaves
the model exactly the base model, a trained one changes samples, values outside the trained range are
refused with a message, and the embedder survives save/load (a model without one loads as before)."""

import math

import pytest
import torch

from cca_ray.config import ModelConfig
from cca_ray.models import build_tiny_model, knob, load_model

PROMPTS = ["a handwritten digit seven", "a handwritten digit one"]


def _emu3(tmp):
    path = build_tiny_model(tmp, ModelConfig(hidden_size=32, num_layers=2, num_heads=2, max_prompt_tokens=12),
                            codebook_size=16, prompts=PROMPTS)
    return path, PROMPTS, (2, 3)


def _llamagen(tmp):
    path = build_tiny_model(tmp, ModelConfig(family="llamagen", hidden_size=32, num_layers=1, num_heads=2),
                            codebook_size=16, num_classes=3, grid=(2, 2))
    return path, [0, 2], (2, 2)


def _var(tmp):
    from cca_ray.models.var.checkpoint import build_tiny_var

    path = build_tiny_var(tmp, codebook_size=16, num_classes=3, patch_nums=(1, 2), seed=0)
    return path, [1, 2], None


FAMILIES = {"emu3": _emu3, "llamagen": _llamagen, "var": _var}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny(request, tmp_path_factory):
    path, conds, grid = FAMILIES[request.param](tmp_path_factory.mktemp(request.param))
    model = load_model(path)
    model.module.eval()
    return request.param, path, model, conds, grid


def _codes(model, n, grid, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = getattr(model, "code_shape", None) or grid
    return torch.randint(0, model.codebook_size, (n, *shape), generator=g)


def _randomise(emb: knob.KnobEmbedder, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in emb.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 2.0)


def test_zero_init_knob_is_exactly_the_base_model(tiny):
    """DiT-style zero init: at step 0 a λ-conditioned model's log p is the base model's, bit for bit."""
    _, path, model, conds, grid = tiny
    cond = model.encode_conditions(conds, grid)
    codes = _codes(model, len(conds), grid)
    base_lp = model.sequence_logprob(cond, codes)
    base_codes = model.generate(cond, seed=7)
    knobbed = load_model(path)
    knobbed.module.eval()
    knob.attach(knobbed.module, knobbed.condition_dim, knob.lam_spec(1.0, math.exp(9), 3.0))
    for lam in (1.0, 50.0, math.exp(9)):
        lp = knobbed.sequence_logprob(cond.with_knob(torch.full((len(conds),), lam)), codes)
        assert torch.equal(lp, base_lp)
    assert torch.equal(knobbed.generate(cond, seed=7, cca_lambda=300.0), base_codes)
    logits = knobbed.token_logits(cond.with_knob(torch.full((len(conds),), 2.0)), codes)
    assert logits.shape == (len(conds), codes.flatten(1).shape[1], model.codebook_size)
    # the token logits are the ones sequence_logprob sums over
    picked = logits.log_softmax(-1).gather(-1, codes.flatten(1).unsqueeze(-1)).squeeze(-1).sum(-1)
    assert torch.allclose(picked, base_lp, atol=1e-4)


def test_lambda_changes_samples_and_scores_at_a_fixed_seed(tiny, tmp_path):
    family, path, model, conds, grid = tiny
    m = load_model(path)
    m.module.eval()
    _randomise(knob.attach(m.module, m.condition_dim, knob.lam_spec(1.0, 1000.0, 10.0)))
    cond = m.encode_conditions(conds * 4, grid)
    lo, hi = (m.generate(cond, seed=3, cca_lambda=v) for v in (1.0, 1000.0))
    assert not torch.equal(lo, hi)
    assert torch.equal(m.generate(cond, seed=3, cca_lambda=1.0), lo)  # deterministic at a fixed seed
    codes = _codes(m, len(conds), grid)
    c = m.encode_conditions(conds, grid)
    a, b = (m.sequence_logprob(c.with_knob(torch.full((len(conds),), v)), codes) for v in (1.0, 1000.0))
    assert not torch.allclose(a, b)
    # CFG on top of a knob model still runs (unconditional rows take the same λ)
    assert m.generate(cond, seed=3, cca_lambda=10.0, guidance=1.0).shape == lo.shape

    # saved and loaded back: the same embedder, the same samples; the released layout files stay clean
    m.save(tmp_path / "saved")
    back = load_model(tmp_path / "saved")
    back.module.eval()
    assert knob.spec_of(back.module) == knob.spec_of(m.module)
    assert torch.equal(back.generate(cond, seed=3, cca_lambda=1000.0), hi)
    if family == "llamagen":
        state = torch.load(tmp_path / "saved" / "gpt.pt", weights_only=False)["model"]
        assert not any(k.startswith(knob.PREFIX) for k in state)


def test_out_of_range_or_missing_knob_is_refused_with_a_message(tiny):
    _, path, model, conds, grid = tiny
    cond = model.encode_conditions(conds, grid)
    with pytest.raises(ValueError, match=r"cca_lambda: this model is not λ-conditioned"):
        model.generate(cond, cca_lambda=10.0)
    m = load_model(path)
    knob.attach(m.module, m.condition_dim, knob.lam_spec(1.0, 100.0, 10.0))
    with pytest.raises(ValueError, match=r"cca_lambda=1000 is outside the range this model was trained on, \[1, 100\]"):
        m.generate(cond, cca_lambda=1000.0)
    with pytest.raises(ValueError, match=r"cca_lambda=0.5 is outside"):
        m.generate(cond, cca_lambda=0.5)
    with pytest.raises(ValueError, match=r"guidance_beta: this model is not trained with GFT.*cca_lambda in \[1, 100\]"):
        m.generate(cond, guidance_beta=0.5)
    g = load_model(path)
    knob.attach(g.module, g.condition_dim, knob.beta_spec())
    with pytest.raises(ValueError, match=r"guidance_beta=1.5 is outside .* \[0, 1\]"):
        g.generate(cond, guidance_beta=1.5)
    assert g.generate(cond, guidance_beta=0.25, seed=0).shape[0] == len(conds)


def test_knob_features_follow_the_trained_range():
    lam = knob.lam_spec(1.0, math.exp(9), 5.0)
    assert torch.allclose(lam.unit(torch.tensor([1.0, math.exp(4.5), math.exp(9)])), torch.tensor([0.0, 0.5, 1.0]))
    assert lam.default == 5.0 and knob.lam_spec(10.0, 1000.0, 5.0).default == pytest.approx(100.0)
    beta = knob.beta_spec()
    assert beta.null_value == 1.0 and torch.equal(beta.unit(torch.tensor([0.25])), torch.tensor([0.25]))
    with pytest.raises(ValueError, match="0 < low < high"):
        knob.lam_spec(0.0, 10.0, 1.0)


def test_evaluate_scores_a_knob_model_at_the_values_inside_its_range(tmp_path):
    """knob_values: the eval grid kept to the trained range; explicit values are checked; no knob: refused."""
    from cca_ray.config import load_config
    from cca_ray.evaluate.job import knob_values

    path, _, _ = _llamagen(tmp_path / "base")
    cfg = load_config("smoke", overrides={"eval.lam_values": [0.1, 1.0, 30.0, 1000.0]})
    with pytest.raises(ValueError, match="not a λ-conditioned or GFT model"):
        knob_values(path, cfg)
    m = load_model(path)
    knob.attach(m.module, m.condition_dim, knob.lam_spec(1.0, 100.0, 10.0))
    m.save(tmp_path / "lam")
    assert knob_values(tmp_path / "lam", cfg) == ("cca_lambda", [1.0, 30.0])
    assert knob_values(tmp_path / "lam", cfg, [2, 50]) == ("cca_lambda", [2.0, 50.0])
    with pytest.raises(ValueError, match=r"cca_lambda=1000 is outside"):
        knob_values(tmp_path / "lam", cfg, [1000])
    g = load_model(path)
    knob.attach(g.module, g.condition_dim, knob.beta_spec())
    g.save(tmp_path / "gft")
    assert knob_values(tmp_path / "gft", cfg) == ("guidance_beta", cfg.eval.beta_values)
