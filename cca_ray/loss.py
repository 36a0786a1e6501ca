"""Training objectives: CCA, CCA+CFG, the paper's baselines (DPO, Unlearning, SFT), and GFT.

Pure tensors in, tensors out. Every ``*_logp_*`` input is a ``Tensor[K]`` holding
log p(x|c) in nats, summed over the image tokens of one sequence (what
``ARVisualModel.sequence_logprob`` returns); row k of the ``_pos`` and ``_neg``
tensors shares the image x_k, paired with its own condition c_k and with a
mismatched condition c_k^neg. Δ = policy − reference ("relative likelihood").

Metrics come as *sums plus counts* (:func:`preference_metric_sums`) so that the
trainer can add them over micro-batches and ``all_reduce(SUM)`` them over workers
before dividing once with :func:`finalize_metrics`; :func:`preference_metrics`
is the one-batch shortcut.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

OBJECTIVES = ("sft", "cca", "cca_cfg", "dpo", "unlearning", "gft")

# mean name -> count key that divides its "<name>_sum"; the whole metric contract.
METRIC_COUNTS = {
    "loss": "count_rows",
    "rel_logp_pos": "count_rows",
    "rel_logp_neg": "count_neg",
    "pair_accuracy": "count_neg",
    "margin": "count_neg",
}


def _check_logps(**logps: Tensor | None) -> int:
    """Check that the given log-likelihoods are 1-D float tensors of one length K; return K."""
    k = None
    for name, t in logps.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape [K], got {type(t).__name__}")
        if t.ndim != 1 or t.numel() == 0:
            raise ValueError(f"{name} must have shape [K] with K >= 1, got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
        if k is None:
            k = t.shape[0]
        elif t.shape[0] != k:
            shapes = {n: tuple(v.shape) for n, v in logps.items() if v is not None}
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({k},) like the others: {shapes}")
    return k


def _check_null_mask(neg_is_null: Tensor | None, k: int) -> None:
    if neg_is_null is None:
        return
    if not isinstance(neg_is_null, Tensor) or neg_is_null.dtype != torch.bool:
        got = getattr(neg_is_null, "dtype", type(neg_is_null).__name__)
        raise ValueError(f"neg_is_null must be a bool Tensor[K], got {got}")
    if tuple(neg_is_null.shape) != (k,):
        raise ValueError(f"neg_is_null has shape {tuple(neg_is_null.shape)}, expected ({k},)")


def _check_scalar(name: str, value: float, *, positive: bool) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (value > 0 if positive else value >= 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")


def _check_lam(lam: float | Tensor, k: int) -> None:
    """λ is one number >= 0, or one per row (λ-conditioned CCA): a float Tensor[K] of finite values >= 0."""
    if not isinstance(lam, Tensor):
        _check_scalar("lam", lam, positive=False)
        return
    if tuple(lam.shape) != (k,) or not lam.is_floating_point():
        raise ValueError(f"lam as a tensor must be float of shape ({k},) (one λ per row), got {lam.dtype} {tuple(lam.shape)}")
    if not bool(torch.isfinite(lam).all()) or bool((lam < 0).any()):
        raise ValueError("lam must hold finite values >= 0")


def _delta(policy: Tensor, ref: Tensor) -> Tensor:
    # Sums over ~1k tokens are O(1e3) nats: bf16 would leave Δ with a resolution of
    # several nats, so the subtraction is done in at least float32. The reference
    # is frozen, hence detached: no gradient may reach it even if it carries a graph.
    dtype = torch.promote_types(policy.dtype, torch.float32)
    return policy.to(dtype) - ref.detach().to(dtype)


def cca_loss_terms(policy_logp_pos: Tensor, ref_logp_pos: Tensor, policy_logp_neg: Tensor,
                   ref_logp_neg: Tensor, *, beta: float, lam: float | Tensor,
                   neg_is_null: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-row CCA terms ``(pos_loss[K], neg_loss[K])``; :func:`cca_loss` is ``(pos + neg).mean()``.

    pos_loss_k = −log σ(β·Δpos_k);  neg_loss_k = −w_k·log σ(s_k·β·Δneg_k), with
    (w_k, s_k) = (λ_k, −1) for a real mismatched negative and (1, +1) where
    ``neg_is_null[k]`` (CCA+CFG: a null-conditioned row is a positive). ``lam`` is one λ or
    a Tensor[K] of per-row λ_k (λ-conditioned CCA). Exposed so that exact-expectation checks
    can weight the two terms separately.
    """
    k = _check_logps(policy_logp_pos=policy_logp_pos, ref_logp_pos=ref_logp_pos,
                     policy_logp_neg=policy_logp_neg, ref_logp_neg=ref_logp_neg)
    _check_scalar("beta", beta, positive=True)
    _check_lam(lam, k)
    _check_null_mask(neg_is_null, k)
    d_pos = _delta(policy_logp_pos, ref_logp_pos)
    d_neg = _delta(policy_logp_neg, ref_logp_neg)
    if isinstance(lam, Tensor):
        lam = lam.detach().to(device=d_neg.device, dtype=d_neg.dtype)
    pos_loss = -F.logsigmoid(beta * d_pos)  # logsigmoid, not log(sigmoid): finite at |βΔ| ~ 1e4
    if neg_is_null is None:
        neg_loss = -lam * F.logsigmoid(-beta * d_neg)
    else:
        null = neg_is_null.to(d_neg.device)
        sign = torch.where(null, 1.0, -1.0).to(d_neg.dtype)
        weight = torch.where(null, torch.ones_like(d_neg), lam if isinstance(lam, Tensor) else float(lam)).to(d_neg.dtype)
        neg_loss = -weight * F.logsigmoid(sign * beta * d_neg)
    return pos_loss, neg_loss


def cca_loss(policy_logp_pos: Tensor, ref_logp_pos: Tensor, policy_logp_neg: Tensor,
             ref_logp_neg: Tensor, *, beta: float, lam: float | Tensor,
             neg_is_null: Tensor | None = None) -> Tensor:
    """Condition Contrastive Alignment loss (a scalar, nats per row).

    L = mean_k[ −log σ(β·Δpos_k) − w_k·log σ(s_k·β·Δneg_k) ],  Δ = policy − ref (Tensor[K] each).
    Real negatives: w = λ (or λ_k, a Tensor[K]), s = −1. Rows with ``neg_is_null[k]`` (bool Tensor[K], CCA+CFG)
    count as positives: w = 1, s = +1. At the optimum β·Δ(x, c) = log p(x|c)/p(x) − log λ.
    Raises ValueError naming the argument for beta <= 0, lam < 0 or mismatched shapes.
    """
    pos_loss, neg_loss = cca_loss_terms(policy_logp_pos, ref_logp_pos, policy_logp_neg, ref_logp_neg,
                                        beta=beta, lam=lam, neg_is_null=neg_is_null)
    return (pos_loss + neg_loss).mean()


def dpo_loss(policy_logp_pos: Tensor, ref_logp_pos: Tensor, policy_logp_neg: Tensor,
             ref_logp_neg: Tensor, *, beta: float) -> Tensor:
    """DPO baseline (paper Table 3): mean_k −log σ(β·(Δpos_k − Δneg_k)); scalar, nats per pair."""
    _check_logps(policy_logp_pos=policy_logp_pos, ref_logp_pos=ref_logp_pos,
                 policy_logp_neg=policy_logp_neg, ref_logp_neg=ref_logp_neg)
    _check_scalar("beta", beta, positive=True)
    margin = _delta(policy_logp_pos, ref_logp_pos) - _delta(policy_logp_neg, ref_logp_neg)
    return -F.logsigmoid(beta * margin).mean()


def sft_loss(policy_logp: Tensor, num_tokens: int | float) -> Tensor:
    """Mean negative log-likelihood per image token (nats/token): mean_k(−policy_logp_k) / num_tokens.

    ``num_tokens`` is the number of image tokens each sequence's logp was summed over (grid h·w).
    """
    _check_logps(policy_logp=policy_logp)
    _check_scalar("num_tokens", num_tokens, positive=True)
    return -policy_logp.to(torch.promote_types(policy_logp.dtype, torch.float32)).mean() / num_tokens


def unlearning_loss(policy_logp_pos: Tensor, policy_logp_neg: Tensor, *, lam_u: float,
                    num_tokens: int | float) -> Tensor:
    """Unlearning baseline (paper Table 3), per image token:

    L = mean_k[ −log pθ(x_k|c_k) + λ_u·log pθ(x_k|c_k^neg) ] / num_tokens   (nats/token).

    Dividing by ``num_tokens`` (image tokens per sequence) makes λ_u and the learning
    rate independent of the grid size. No reference model is used. The negative
    term is unbounded below (it pushes log pθ(x|c_neg) → −∞), which is why the
    paper keeps λ_u small and training short.
    """
    _check_logps(policy_logp_pos=policy_logp_pos, policy_logp_neg=policy_logp_neg)
    _check_scalar("lam_u", lam_u, positive=False)
    _check_scalar("num_tokens", num_tokens, positive=True)
    dtype = torch.promote_types(policy_logp_pos.dtype, torch.float32)
    per_row = -policy_logp_pos.to(dtype) + lam_u * policy_logp_neg.to(dtype)
    return per_row.mean() / num_tokens


def gft_loss(cond_logits: Tensor, uncond_logits: Tensor, targets: Tensor, beta: Tensor) -> Tensor:
    """Guidance-Free Training (Chen et al., ICML 2025; thu-ml/GFT's GFT_c2i.py), nats per image token.

    cond_logits: [K, N, V] logits l_θ(x|c_k, β_k) at every image token (with gradient);
    uncond_logits: [K, N, V] l_θ(x|∅, β=1) of the same model (stop-gradient: detached here);
    targets: LongTensor[K, N] codes; beta: Tensor[K] in [0, 1] (1 where the label was dropped).

        L = mean_{k,n} CE( softmax(β_k·l_c[k,n] + (1 − β_k)·sg(l_u[k,n])), x_{k,n} )

    The mixture is the implicit conditional model; at the optimum l_c = l_u + (l_true_c − l_u)/β, the
    CFG-guided model of scale 1/β, which is then sampled alone (one forward per token) at a chosen β.
    """
    if not (isinstance(cond_logits, Tensor) and isinstance(uncond_logits, Tensor)):
        raise TypeError("cond_logits and uncond_logits must be tensors [K, N, V]")
    if cond_logits.ndim != 3 or cond_logits.shape != uncond_logits.shape:
        raise ValueError(f"cond_logits {tuple(cond_logits.shape)} and uncond_logits {tuple(uncond_logits.shape)} "
                         "must both be [K, N, V]")
    k, n, _ = cond_logits.shape
    if tuple(targets.shape) != (k, n) or targets.is_floating_point():
        raise ValueError(f"targets must be a LongTensor of shape ({k}, {n}), got {targets.dtype} {tuple(targets.shape)}")
    if tuple(beta.shape) != (k,) or not beta.is_floating_point():
        raise ValueError(f"beta must be a float Tensor of shape ({k},), got {tuple(beta.shape)}")
    if bool((beta < 0).any()) or bool((beta > 1).any()):
        raise ValueError("beta must lie in [0, 1]")
    b = beta.detach().to(cond_logits.device, torch.float32)[:, None, None]
    mix = b * cond_logits.float() + (1.0 - b) * uncond_logits.detach().float()
    return F.cross_entropy(mix.flatten(0, 1), targets.to(mix.device).flatten().long())


def preference_metric_sums(policy_logp_pos: Tensor, ref_logp_pos: Tensor, policy_logp_neg: Tensor,
                           ref_logp_neg: Tensor, neg_is_null: Tensor | None = None) -> dict[str, Tensor]:
    """Detached float32 scalar sums and counts for the paper's training curves.

    Keys: ``rel_logp_pos_sum`` (Σ_k Δpos_k, all rows), ``count_rows`` (K);
    over real (non-null) negatives only: ``rel_logp_neg_sum`` (ΣΔneg),
    ``pair_accuracy_sum`` (#[Δpos > Δneg]), ``margin_sum`` (Σ(Δpos − Δneg)), ``count_neg``.
    Add these over micro-batches / all-reduce them, then call :func:`finalize_metrics`.
    """
    k = _check_logps(policy_logp_pos=policy_logp_pos, ref_logp_pos=ref_logp_pos,
                     policy_logp_neg=policy_logp_neg, ref_logp_neg=ref_logp_neg)
    _check_null_mask(neg_is_null, k)
    with torch.no_grad():
        d_pos = _delta(policy_logp_pos.detach(), ref_logp_pos).float()
        d_neg = _delta(policy_logp_neg.detach(), ref_logp_neg).float()
        real = torch.ones_like(d_neg, dtype=torch.bool) if neg_is_null is None else ~neg_is_null.to(d_neg.device)
        real_f = real.float()
        return {
            "rel_logp_pos_sum": d_pos.sum(),
            "count_rows": torch.tensor(float(k), device=d_pos.device),
            "rel_logp_neg_sum": (d_neg * real_f).sum(),
            "pair_accuracy_sum": ((d_pos > d_neg) & real).float().sum(),
            "margin_sum": ((d_pos - d_neg) * real_f).sum(),
            "count_neg": real_f.sum(),
        }


def finalize_metrics(sums: Mapping[str, Tensor | float]) -> dict[str, Tensor]:
    """Turn (possibly summed across micro-batches and workers) ``<name>_sum``/``count_*`` into means.

    Returns one float tensor per name in :data:`METRIC_COUNTS` whose sum is present,
    plus any other ``<name>_sum`` divided by ``count_rows``. A mean over zero rows
    (e.g. a batch whose negatives were all null) is NaN rather than a fake 0.
    """
    out = {}
    for key, total in sums.items():
        if not key.endswith("_sum"):
            continue
        name = key[: -len("_sum")]
        total = torch.as_tensor(total, dtype=torch.float32)
        count = torch.as_tensor(sums[METRIC_COUNTS.get(name, "count_rows")], dtype=torch.float32).to(total.device)
        out[name] = torch.where(count > 0, total / count.clamp_min(1.0), torch.full_like(total, float("nan")))
    return out


def preference_metrics(policy_logp_pos: Tensor, ref_logp_pos: Tensor, policy_logp_neg: Tensor,
                       ref_logp_neg: Tensor, neg_is_null: Tensor | None = None) -> dict[str, Tensor]:
    """One-batch means: ``rel_logp_pos`` (mean Δpos over K), ``rel_logp_neg``, ``pair_accuracy``
    P(Δpos > Δneg) and ``margin`` mean(Δpos − Δneg), the last three over real negatives only."""
    return finalize_metrics(preference_metric_sums(policy_logp_pos, ref_logp_pos, policy_logp_neg,
                                                   ref_logp_neg, neg_is_null))


def objective_loss(objective: str, batch_logps: Mapping[str, Tensor], *, beta: float, lam: float | Tensor,
                   lam_unlearning: float, num_tokens: int | float) -> tuple[Tensor, dict[str, Tensor]]:
    """Dispatch for the trainer: ``(loss scalar, metric sums)`` for ``objective`` in :data:`OBJECTIVES`.

    ``batch_logps`` keys: policy_logp_pos, ref_logp_pos, policy_logp_neg, ref_logp_neg
    (Tensor[K]) and neg_is_null (bool Tensor[K]); sft needs only policy_logp_pos,
    unlearning only the two policy ones. ``neg_is_null`` is used by "cca_cfg" only.
    gft reads cond_logits, uncond_logits ([K, N, V]), targets ([K, N]) and gft_beta ([K]) instead
    (:func:`gft_loss`). ``lam``: one λ or per-row λ_k (λ-conditioned CCA).
    Metric sums always hold ``loss_sum``/``count_rows`` and, when all four logps are
    given, the :func:`preference_metric_sums`; reduce with :func:`finalize_metrics`.
    """
    needs = {
        "sft": ("policy_logp_pos",),
        "unlearning": ("policy_logp_pos", "policy_logp_neg"),
        "dpo": ("policy_logp_pos", "ref_logp_pos", "policy_logp_neg", "ref_logp_neg"),
        "cca": ("policy_logp_pos", "ref_logp_pos", "policy_logp_neg", "ref_logp_neg"),
        "cca_cfg": ("policy_logp_pos", "ref_logp_pos", "policy_logp_neg", "ref_logp_neg", "neg_is_null"),
        "gft": ("cond_logits", "uncond_logits", "targets", "gft_beta"),
    }
    if objective not in needs:
        raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
    missing = [key for key in needs[objective] if batch_logps.get(key) is None]
    if missing:
        raise ValueError(f"objective {objective!r} needs batch_logps keys {missing}")
    b = batch_logps
    if objective == "sft":
        loss = sft_loss(b["policy_logp_pos"], num_tokens)
    elif objective == "gft":
        loss = gft_loss(b["cond_logits"], b["uncond_logits"], b["targets"], b["gft_beta"])
    elif objective == "unlearning":
        loss = unlearning_loss(b["policy_logp_pos"], b["policy_logp_neg"], lam_u=lam_unlearning,
                               num_tokens=num_tokens)
    elif objective == "dpo":
        loss = dpo_loss(b["policy_logp_pos"], b["ref_logp_pos"], b["policy_logp_neg"], b["ref_logp_neg"],
                        beta=beta)
    else:
        loss = cca_loss(b["policy_logp_pos"], b["ref_logp_pos"], b["policy_logp_neg"], b["ref_logp_neg"],
                        beta=beta, lam=lam, neg_is_null=b["neg_is_null"] if objective == "cca_cfg" else None)

    k = (b["targets"] if objective == "gft" else b["policy_logp_pos"]).shape[0]
    metrics = {"loss_sum": loss.detach().float() * k,
               "count_rows": torch.tensor(float(k), device=loss.device)}
    prefs = ("policy_logp_pos", "ref_logp_pos", "policy_logp_neg", "ref_logp_neg")
    if all(b.get(key) is not None for key in prefs):
        null = b.get("neg_is_null") if objective == "cca_cfg" else None
        metrics.update(preference_metric_sums(*(b[key] for key in prefs), neg_is_null=null))
    return loss, metrics
