"""Tests for cca_ray.loss. Expected numbers are derived by hand in each docstring.

Useful identities: σ(0) = 1/2, σ(log 3) = 3/4, σ(−log 3) = 1/4, so
−log σ(0) = log 2, −log σ(log 3) = log(4/3), −log σ(−log 3) = log 4.
"""

import math
import typing

import pytest
import torch

from cca_ray.loss import (
    OBJECTIVES,
    cca_loss,
    cca_loss_terms,
    dpo_loss,
    finalize_metrics,
    objective_loss,
    preference_metric_sums,
    preference_metrics,
    sft_loss,
    unlearning_loss,
)

LOG2, LOG3 = math.log(2.0), math.log(3.0)


def _logps(d_pos, d_neg, ref_pos=None, ref_neg=None, requires_grad=False):
    """Policy/ref logps with the given Δs; refs are large negative sums like real sequences."""
    d_pos, d_neg = torch.tensor(d_pos, dtype=torch.float64), torch.tensor(d_neg, dtype=torch.float64)
    ref_pos = torch.full_like(d_pos, -700.0) if ref_pos is None else torch.tensor(ref_pos, dtype=torch.float64)
    ref_neg = torch.full_like(d_neg, -900.0) if ref_neg is None else torch.tensor(ref_neg, dtype=torch.float64)
    pol_pos = (ref_pos + d_pos).requires_grad_(requires_grad)
    pol_neg = (ref_neg + d_neg).requires_grad_(requires_grad)
    return pol_pos, ref_pos.requires_grad_(requires_grad), pol_neg, ref_neg.requires_grad_(requires_grad)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 4.0, 300.0])
def test_cca_at_zero_delta_is_one_plus_lam_log2(lam):
    """Δ = 0: each row is −log σ(0) − λ log σ(0) = (1 + λ)·log 2, and so is the mean."""
    loss = cca_loss(*_logps([0.0, 0.0, 0.0], [0.0, 0.0, 0.0]), beta=0.02, lam=lam)
    assert loss.item() == pytest.approx((1 + lam) * LOG2, rel=1e-12)


def test_cca_cfg_all_null_at_zero_delta_is_two_log2():
    """All negatives null: both terms are positives with weight 1, so λ drops out: 2·log 2."""
    null = torch.tensor([True, True])
    loss = cca_loss(*_logps([0.0, 0.0], [0.0, 0.0]), beta=1.0, lam=50.0, neg_is_null=null)
    assert loss.item() == pytest.approx(2 * LOG2, rel=1e-12)


def test_cca_mixed_batch_hand_value():
    """β = 1/2, λ = 2, K = 2.
    row 0: βΔpos = log 3 -> log(4/3); real negative βΔneg = log 3 -> λ·(−log σ(−log 3)) = 2·log 4.
    row 1: βΔpos = 0 -> log 2; null negative βΔneg = −log 3 -> +1·(−log σ(−log 3)) = log 4.
    L = ½[log(4/3) + 2 log 4 + log 2 + log 4] = ½·log(4/3 · 16 · 2 · 4) = ½·log(512/3).
    Without the null mask row 1's negative would be 2·(−log σ(log 3)) = 2·log(4/3) instead.
    """
    args = _logps([2 * LOG3, 0.0], [2 * LOG3, -2 * LOG3], ref_pos=[-10.0, -20.0], ref_neg=[-30.0, -15.0])
    null = torch.tensor([False, True])
    loss = cca_loss(*args, beta=0.5, lam=2.0, neg_is_null=null)
    assert loss.item() == pytest.approx(0.5 * math.log(512 / 3), rel=1e-12)
    plain = cca_loss(*args, beta=0.5, lam=2.0)
    assert plain.item() == pytest.approx(0.5 * (math.log(4 / 3) + 2 * math.log(4) + LOG2 + 2 * math.log(4 / 3)))
    pos, neg = cca_loss_terms(*args, beta=0.5, lam=2.0, neg_is_null=null)
    assert torch.allclose((pos + neg).mean(), loss)


def test_cca_gradient_signs_and_values_and_no_ref_gradient():
    """At Δ = 0, L = mean_k[...] over K = 3, β = 0.1, λ = 5:
    ∂L/∂policy_pos_k = −β σ(0)/K = −β/(2K)            (< 0: raise positives)
    ∂L/∂policy_neg_k = +λβ σ(0)/K = +λβ/(2K) real        (> 0: lower mismatched)
                     = −β/(2K) for a null row           (< 0: a null row is a positive)
    The reference is frozen: no gradient reaches it.
    """
    beta, lam, k = 0.1, 5.0, 3
    pol_pos, ref_pos, pol_neg, ref_neg = _logps([0.0] * k, [0.0] * k, requires_grad=True)
    null = torch.tensor([False, True, False])
    cca_loss(pol_pos, ref_pos, pol_neg, ref_neg, beta=beta, lam=lam, neg_is_null=null).backward()
    assert torch.allclose(pol_pos.grad, torch.full((k,), -beta / (2 * k), dtype=torch.float64))
    expected_neg = torch.tensor([lam * beta, -beta, lam * beta], dtype=torch.float64) / (2 * k)
    assert torch.allclose(pol_neg.grad, expected_neg)
    assert ref_pos.grad is None and ref_neg.grad is None

    # Signs hold away from Δ = 0 too.
    pol_pos, ref_pos, pol_neg, ref_neg = _logps([3.0, -2.0, 0.5], [-1.0, 4.0, 2.0], requires_grad=True)
    cca_loss(pol_pos, ref_pos, pol_neg, ref_neg, beta=beta, lam=lam, neg_is_null=null).backward()
    assert (pol_pos.grad < 0).all()
    assert (pol_neg.grad[~null] > 0).all() and (pol_neg.grad[null] < 0).all()


def test_cca_stable_at_huge_delta():
    """|βΔ| = 1e4: naive log(sigmoid) gives log(0) = −inf; logsigmoid gives −log σ(−1e4) = 1e4.
    Row 0 (Δpos = −1e4, Δneg = +1e4, real): 1e4 + λ·1e4; row 1 (the opposite): ~0. Mean = (1 + λ)·1e4/2.
    """
    for dtype in (torch.float32, torch.float64):
        pol_pos = torch.tensor([-1e4, 1e4], dtype=dtype, requires_grad=True)
        pol_neg = torch.tensor([1e4, -1e4], dtype=dtype, requires_grad=True)
        zeros = torch.zeros(2, dtype=dtype)
        loss = cca_loss(pol_pos, zeros, pol_neg, zeros, beta=1.0, lam=2.0)
        loss.backward()
        assert torch.isfinite(loss) and loss.item() == pytest.approx(1.5e4, rel=1e-6)
        assert torch.isfinite(pol_pos.grad).all() and torch.isfinite(pol_neg.grad).all()
        all_null = torch.tensor([True, True])
        null_loss = cca_loss(pol_pos, zeros, pol_neg, zeros, beta=1.0, lam=2.0, neg_is_null=all_null)
        assert torch.isfinite(null_loss)


def test_cca_bf16_inputs_subtract_in_float32():
    """Sums near −700 in bf16 have a step of 4 nats; Δ must still be exact for bf16-representable
    inputs. policy = −696, ref = −700 (both exact in bf16) -> Δ = 4, β = 1/4 -> βΔ = 1, so with
    λ = 0 the loss is −log σ(1), returned in float32."""
    pol = torch.tensor([-696.0], dtype=torch.bfloat16)
    ref = torch.tensor([-700.0], dtype=torch.bfloat16)
    loss = cca_loss(pol, ref, pol, ref, beta=0.25, lam=0.0)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))), rel=1e-6)


def test_dpo_hand_values():
    """Equal Δpos and Δneg -> −log σ(0) = log 2 whatever β. β(Δpos − Δneg) = log 3 -> log(4/3)."""
    assert dpo_loss(*_logps([1.0, -3.0], [1.0, -3.0]), beta=0.7).item() == pytest.approx(LOG2, rel=1e-12)
    assert dpo_loss(*_logps([LOG3], [-LOG3]), beta=0.5).item() == pytest.approx(math.log(4 / 3), rel=1e-12)


def test_unlearning_and_sft_hand_values():
    """num_tokens = 10, λ_u = 0.5, logp_pos = [−20, −40], logp_neg = [−30, −50]:
    rows (20 − 15)/10 = 0.5 and (40 − 25)/10 = 1.5 -> mean 1.0.  SFT on logp_pos: (20 + 40)/2/10 = 3.0.
    Gradients: ∂/∂logp_pos = −1/(K·T) = −0.05, ∂/∂logp_neg = +λ_u/(K·T) = +0.025."""
    pos = torch.tensor([-20.0, -40.0], requires_grad=True)
    neg = torch.tensor([-30.0, -50.0], requires_grad=True)
    loss = unlearning_loss(pos, neg, lam_u=0.5, num_tokens=10)
    loss.backward()
    assert loss.item() == pytest.approx(1.0)
    assert torch.allclose(pos.grad, torch.tensor([-0.05, -0.05]))
    assert torch.allclose(neg.grad, torch.tensor([0.025, 0.025]))
    assert sft_loss(pos.detach(), 10).item() == pytest.approx(3.0)


@pytest.mark.parametrize("lam", [0.5, 1.0, 4.0])
def test_cca_optimum_is_log_ratio_minus_log_lam(lam):
    """Theory check (paper Thm. 1): minimising over a free table r(x, c) the exact expectation
        E_{p(x,c)}[−log σ(r)] + λ·E_{p(x)p(c)}[−log σ(−r)]
    gives, per entry, −p(x,c)σ(−r) + λ p(x)p(c)σ(r) = 0, i.e. e^r = p(x,c)/(λ p(x)p(c)):
        r* = log p(x|c)/p(x) − log λ.
    The expectation weights p(x,c) and p(x)p(c) differ between the two terms, so cca_loss's
    uniform row mean cannot express them; we route through cca_loss_terms (the per-row terms
    cca_loss averages) with r = βΔ (β = 1, ref = 0) and weight the terms ourselves.
    """
    gen = torch.Generator().manual_seed(0)
    joint = torch.rand(5, 3, generator=gen, dtype=torch.float64) + 0.05
    joint /= joint.sum()
    marg = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)  # p(x) p(c)
    r_star = torch.log(joint / marg) - math.log(lam)

    r = torch.zeros(5, 3, dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(15, dtype=torch.float64)
    # The problem is convex and separable: LBFGS reaches ~1e-6 in ~20 evaluations.
    opt = torch.optim.LBFGS([r], lr=1.0, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        pos, neg = cca_loss_terms(r.flatten(), zero, r.flatten(), zero, beta=1.0, lam=lam)
        loss = (joint.flatten() * pos).sum() + (marg.flatten() * neg).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert torch.allclose(r.detach(), r_star, atol=1e-3), (r.detach() - r_star).abs().max()


def test_preference_metrics_hand_example():
    """K = 3, Δpos = [1, 2, 3], Δneg = [0, 2.5, −1], row 2's negative is null (excluded from neg metrics).
    rel_logp_pos = 6/3 = 2; rel_logp_neg = (0 + 2.5)/2 = 1.25;
    pair_accuracy: 1 > 0 yes, 2 > 2.5 no -> 1/2; margin = ((1 − 0) + (2 − 2.5))/2 = 0.25."""
    pol_pos, ref_pos, pol_neg, ref_neg = _logps([1.0, 2.0, 3.0], [0.0, 2.5, -1.0], requires_grad=True)
    null = torch.tensor([False, False, True])
    m = preference_metrics(pol_pos, ref_pos, pol_neg, ref_neg, neg_is_null=null)
    assert m.keys() == {"rel_logp_pos", "rel_logp_neg", "pair_accuracy", "margin"}
    assert [m[k].item() for k in ("rel_logp_pos", "rel_logp_neg", "pair_accuracy", "margin")] == pytest.approx(
        [2.0, 1.25, 0.5, 0.25])
    assert not any(v.requires_grad for v in m.values())
    # Without the mask row 2 counts: rel_logp_neg = 1.5/3 = 0.5, accuracy = 2/3 (3 > −1).
    m_all = preference_metrics(pol_pos, ref_pos, pol_neg, ref_neg)
    assert m_all["rel_logp_neg"].item() == pytest.approx(0.5)
    assert m_all["pair_accuracy"].item() == pytest.approx(2 / 3)


def test_metric_sums_reduce_like_one_big_batch():
    """Summing the sums of two unequal 'workers' then finalising equals the metrics of the joined batch
    (a mean of per-worker means would not: worker 2 has one real negative, worker 1 has two)."""
    args = _logps([1.0, 2.0, 3.0, -1.0], [0.0, 2.5, -1.0, 0.5])
    null = torch.tensor([False, False, True, False])
    whole = preference_metrics(*args, neg_is_null=null)
    parts = [preference_metric_sums(*(a[s] for a in args), neg_is_null=null[s]) for s in (slice(0, 2), slice(2, 4))]
    reduced = finalize_metrics({k: parts[0][k] + parts[1][k] for k in parts[0]})
    for k, v in whole.items():
        assert reduced[k].item() == pytest.approx(v.item())
    # All negatives null: the neg metrics have no rows and are NaN, not 0.
    only_null = preference_metrics(*(a[2:3] for a in args), neg_is_null=null[2:3])
    assert math.isnan(only_null["pair_accuracy"].item()) and only_null["rel_logp_pos"].item() == pytest.approx(3.0)


def test_objective_loss_dispatch():
    """Each objective equals its function; "cca" ignores neg_is_null, "cca_cfg" uses it."""
    pol_pos, ref_pos, pol_neg, ref_neg = _logps([2 * LOG3, 0.0], [2 * LOG3, -2 * LOG3])
    null = torch.tensor([False, True])
    batch = dict(policy_logp_pos=pol_pos, ref_logp_pos=ref_pos, policy_logp_neg=pol_neg, ref_logp_neg=ref_neg,
                 neg_is_null=null)
    kw = dict(beta=0.5, lam=2.0, lam_unlearning=0.1, num_tokens=16)
    expected = {
        "sft": sft_loss(pol_pos, 16),
        "unlearning": unlearning_loss(pol_pos, pol_neg, lam_u=0.1, num_tokens=16),
        "dpo": dpo_loss(pol_pos, ref_pos, pol_neg, ref_neg, beta=0.5),
        "cca": cca_loss(pol_pos, ref_pos, pol_neg, ref_neg, beta=0.5, lam=2.0),
        "cca_cfg": cca_loss(pol_pos, ref_pos, pol_neg, ref_neg, beta=0.5, lam=2.0, neg_is_null=null),
    }
    assert set(expected) | {"gft"} == set(OBJECTIVES)  # gft reads logits, not logps: its own test below
    assert expected["cca"].item() != pytest.approx(expected["cca_cfg"].item())
    for objective, want in expected.items():
        loss, metrics = objective_loss(objective, batch, **kw)
        assert loss.item() == pytest.approx(want.item(), rel=1e-12), objective
        assert finalize_metrics(metrics)["loss"].item() == pytest.approx(want.item(), rel=1e-6)
    # cca_cfg's metrics drop the null row from the negative counts; cca's keep it.
    assert objective_loss("cca_cfg", batch, **kw)[1]["count_neg"].item() == 1.0
    assert objective_loss("cca", batch, **kw)[1]["count_neg"].item() == 2.0
    # sft needs only the positive policy logps.
    loss, metrics = objective_loss("sft", {"policy_logp_pos": pol_pos}, **kw)
    assert set(finalize_metrics(metrics)) == {"loss"}


def test_objectives_match_config_choices():
    """The trainer's config Literal and the loss dispatch list the same objectives."""
    from cca_ray.config import TrainConfig

    assert set(typing.get_args(TrainConfig.model_fields["objective"].annotation)) == set(OBJECTIVES)


def test_bad_arguments_raise_naming_the_argument():
    args = _logps([0.0, 0.0], [0.0, 0.0])
    with pytest.raises(ValueError, match="beta"):
        cca_loss(*args, beta=0.0, lam=1.0)
    with pytest.raises(ValueError, match="lam"):
        cca_loss(*args, beta=1.0, lam=-1.0)
    with pytest.raises(ValueError, match="ref_logp_neg"):
        cca_loss(args[0], args[1], args[2], torch.zeros(3, dtype=torch.float64), beta=1.0, lam=1.0)
    with pytest.raises(ValueError, match="policy_logp_pos"):
        cca_loss(torch.zeros(2, 1), *args[1:], beta=1.0, lam=1.0)
    with pytest.raises(ValueError, match="neg_is_null"):
        cca_loss(*args, beta=1.0, lam=1.0, neg_is_null=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="neg_is_null"):
        preference_metrics(*args, neg_is_null=torch.tensor([True]))
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*args, beta=-0.1)
    with pytest.raises(ValueError, match="lam_u"):
        unlearning_loss(args[0], args[2], lam_u=-1.0, num_tokens=4)
    with pytest.raises(ValueError, match="num_tokens"):
        sft_loss(args[0], 0)
    with pytest.raises(ValueError, match=r"\['sft', 'cca', 'cca_cfg', 'dpo', 'unlearning', 'gft'\]"):
        objective_loss("ppo", {}, beta=1.0, lam=1.0, lam_unlearning=0.0, num_tokens=4)
    with pytest.raises(ValueError, match="neg_is_null"):
        objective_loss("cca_cfg", dict(zip(("policy_logp_pos", "ref_logp_pos", "policy_logp_neg", "ref_logp_neg"),
                                           args)), beta=1.0, lam=1.0, lam_unlearning=0.0, num_tokens=4)


# -- λ-conditioned CCA and GFT -------------------------------------------------------------
def test_cca_with_a_lambda_per_row_weights_each_negative_by_its_own_lambda():
    """Δpos = 0, Δneg = −log 3 / β on both rows; λ = (1, 8):
    row terms log 2 + λ_k·log(4/3), so L = log 2 + (1 + 8)/2 · log(4/3) (one row with λ=8 and CCA+CFG's null
    flag counts as a positive instead: weight 1, −log σ(−log 3) = log 4)."""
    beta = 0.5
    pp, rp, pn, rn = _logps([0.0, 0.0], [-LOG3 / beta, -LOG3 / beta])
    lam = torch.tensor([1.0, 8.0], dtype=torch.float64)
    assert cca_loss(pp, rp, pn, rn, beta=beta, lam=lam).item() == pytest.approx(LOG2 + 4.5 * math.log(4 / 3))
    null = torch.tensor([False, True])
    got = cca_loss(pp, rp, pn, rn, beta=beta, lam=lam, neg_is_null=null).item()
    assert got == pytest.approx(LOG2 + (math.log(4 / 3) + math.log(4)) / 2)
    with pytest.raises(ValueError, match=r"one λ per row"):
        cca_loss(pp, rp, pn, rn, beta=beta, lam=torch.ones(3))
    with pytest.raises(ValueError, match="lam must hold finite values >= 0"):
        cca_loss(pp, rp, pn, rn, beta=beta, lam=torch.tensor([1.0, -1.0]))


def test_gft_loss_at_a_hand_derived_point():
    """Two rows, one token each, V = 2 codes.

    Row 0: l_c = (2, 0), l_u = (0, 0), β = 1/2 -> mixture (1, 0); target 0:
           CE = −log(e/(e + 1)) = log(1 + e^−1).
    Row 1 (label dropped, β = 1): l_c = (0, log 3), l_u = (5, 5) -> mixture = l_c; target 1:
           CE = −log(3/4) = log(4/3).
    L = (log(1 + e^−1) + log(4/3)) / 2.
    Gradient: ∂L/∂l_c[0] = β·(softmax(1, 0) − (1, 0)) / 2 = ½·(σ(1) − 1, 1 − σ(1)) / 2; ∂L/∂l_c[1] =
    (1/4 − 0, 3/4 − 1) / 2; the unconditional logits get none (stop-gradient)."""
    from cca_ray.loss import gft_loss

    lc = torch.tensor([[[2.0, 0.0]], [[0.0, LOG3]]], dtype=torch.float64, requires_grad=True)
    lu = torch.tensor([[[0.0, 0.0]], [[5.0, 5.0]]], dtype=torch.float64, requires_grad=True)
    x = torch.tensor([[0], [1]])
    beta = torch.tensor([0.5, 1.0])
    loss = gft_loss(lc, lu, x, beta)
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-1)) + math.log(4 / 3)) / 2, rel=1e-6)
    loss.backward()
    s1 = 1 / (1 + math.exp(-1))
    want = torch.tensor([[[0.5 * (s1 - 1) / 2, 0.5 * (1 - s1) / 2]], [[0.25 / 2, -0.25 / 2]]], dtype=torch.float64)
    assert torch.allclose(lc.grad, want, atol=1e-6)
    assert lu.grad is None
    # through the trainer's dispatch, with the metric sums every objective reports
    lc2 = lc.detach().requires_grad_()
    total, metrics = objective_loss("gft", {"cond_logits": lc2, "uncond_logits": lu.detach(), "targets": x,
                                            "gft_beta": beta}, beta=0.1, lam=1.0, lam_unlearning=0.0, num_tokens=1)
    assert total.item() == pytest.approx(loss.item()) and float(metrics["count_rows"]) == 2
    with pytest.raises(ValueError, match=r"beta must lie in \[0, 1\]"):
        gft_loss(lc, lu, x, torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="objective 'gft' needs batch_logps keys"):
        objective_loss("gft", {"cond_logits": lc}, beta=0.1, lam=1.0, lam_unlearning=0.0, num_tokens=1)
