"""Emu3 adapter and sampler on a tiny random-init model built and saved in the test."""

import pytest
import torch

from cca_ray.config import ModelConfig
from cca_ray.models import build_tiny_model, load_model
from cca_ray.models.emu3.adapter import BOS, EOL, IMG_START, IMG_TOKEN

PROMPTS = ["a handwritten digit seven", "a handwritten digit one", "a handwritten digit zero"]
GRID = (3, 4)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = build_tiny_model(
        tmp_path_factory.mktemp("tiny"), ModelConfig(hidden_size=32, num_layers=2, num_heads=2, max_prompt_tokens=12),
        codebook_size=24, prompts=PROMPTS,
    )
    m = load_model(path)
    m.hf.eval()
    return m


def test_layout_of_prompt_and_image(model):
    cond = model.encode_conditions([PROMPTS[0]], GRID)
    ids = cond.input_ids[0].tolist()
    tok = model.tokenizer
    assert ids[0] == tok.convert_tokens_to_ids(BOS)
    assert ids[-1] == tok.convert_tokens_to_ids(IMG_TOKEN)
    start = ids.index(tok.convert_tokens_to_ids(IMG_START))
    assert tok.decode(ids[start + 1 : -1]) == "3*4"
    assert tok.decode(ids[1:start]) == PROMPTS[0]
    codes = torch.arange(12).view(1, 3, 4)
    inp = model.scoring_inputs(cond, codes)
    body = inp["input_ids"][0, len(ids):].tolist()
    eol = tok.convert_tokens_to_ids(EOL)
    off = model.visual_offset
    # rows of w visual tokens each followed by EOL; the last row's EOL is never an input
    assert body == [off + 0, off + 1, off + 2, off + 3, eol, off + 4, off + 5, off + 6, off + 7, eol,
                    off + 8, off + 9, off + 10, off + 11]
    # every target position is followed by the visual token it predicts
    full = inp["input_ids"][0]
    assert (full[inp["target_pos"] + 1] - off).tolist() == list(range(12))


def test_left_padding_does_not_change_logprob(model):
    """A row scored alone and inside a left-padded batch gets the same log p(x|c)."""
    codes = torch.randint(0, 24, (3, *GRID), generator=torch.Generator().manual_seed(0))
    batch = model.sequence_logprob(model.encode_conditions(["", PROMPTS[0], "a"], GRID), codes)
    for i, p in enumerate(["", PROMPTS[0], "a"]):
        alone = model.sequence_logprob(model.encode_conditions([p], GRID), codes[i : i + 1])
        assert torch.allclose(batch[i], alone[0], atol=1e-4)


def test_logprob_equals_full_vocab_reference(model):
    """Visual-slice log-softmax == full-vocabulary logits restricted to the visual ids, renormalised."""
    cond = model.encode_conditions(PROMPTS[:2], GRID)
    codes = torch.randint(0, 24, (2, *GRID), generator=torch.Generator().manual_seed(1))
    inp = model.scoring_inputs(cond, codes)
    with torch.no_grad():
        logits = model.hf(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"],
                          position_ids=inp["position_ids"]).logits
        vis = logits[:, inp["target_pos"], model.visual_offset : model.visual_offset + 24].log_softmax(-1)
        expect = vis.gather(-1, inp["targets"].unsqueeze(-1)).squeeze(-1).sum(-1)
        got = model.sequence_logprob(cond, codes)
    assert torch.allclose(got, expect, atol=1e-4)


def test_visual_only_head_scores_and_samples_exactly_as_the_full_head(tmp_path):
    """split_visual_head: the K visual rows become the only trainable head parameter; log-probs, their
    gradients w.r.t. the visual rows and greedy samples are bit-identical to the full head's; a state
    dict holding visual_head loads into an unsplit model by writing those rows into lm_head."""
    path = build_tiny_model(tmp_path / "m", ModelConfig(hidden_size=32, num_layers=2, num_heads=2,
                                                        max_prompt_tokens=12), codebook_size=24, prompts=PROMPTS)
    full, split = load_model(path), load_model(path)
    assert split.train_visual_head_only() and split.external_parameters() == []
    assert full.external_parameters() == [full.hf.lm_head.weight]
    trainable = {n for n, p in split.module.named_parameters() if p.requires_grad}
    assert "visual_head" in trainable and "hf.lm_head.weight" not in trainable
    rows = slice(split.visual_offset, split.visual_offset + 24)
    cond = full.encode_conditions(PROMPTS[:2], GRID)
    codes = torch.randint(0, 24, (2, *GRID), generator=torch.Generator().manual_seed(3))
    lp_full, lp_split = full.sequence_logprob(cond, codes), split.sequence_logprob(cond, codes)
    assert torch.equal(lp_full, lp_split)
    lp_full.sum().backward(), lp_split.sum().backward()
    assert torch.equal(full.hf.lm_head.weight.grad[rows], split.module.visual_head.grad)
    assert torch.equal(full.generate(cond, temperature=1e-4, seed=0), split.generate(cond, temperature=1e-4, seed=0))
    with torch.no_grad():
        split.module.visual_head.add_(0.5)
    state = split.module.state_dict()
    fresh = load_model(path)
    fresh.module.load_state_dict(state)
    assert torch.equal(fresh.hf.lm_head.weight[rows], split.module.visual_head.detach())
    text = torch.ones(fresh.hf.lm_head.weight.shape[0], dtype=torch.bool)
    text[rows] = False
    assert torch.equal(fresh.hf.lm_head.weight[text], full.hf.lm_head.weight[text])
    assert torch.equal(fresh.sequence_logprob(cond, codes), split.sequence_logprob(cond, codes))


def test_logprob_equals_sum_of_sampler_steps(model):
    cond = model.encode_conditions(PROMPTS, GRID)
    out = model.sample(cond, seed=[3, 4, 5])
    with torch.no_grad():
        lp = model.sequence_logprob(cond, out.codes)
    assert torch.allclose(lp, out.step_logprobs.sum(-1), atol=1e-4)
    assert out.codes.shape == (3, *GRID) and 0 <= out.codes.min() and out.codes.max() < 24


def test_cfg_at_scale_zero_matches_guidance_free(model):
    cond = model.encode_conditions(PROMPTS, GRID)
    free = model.sample(cond, top_k=1, seed=0, return_dists=True)
    # guidance 1e-30 takes the batched 2B-row CFG path but changes nothing numerically
    cfg = model.sample(cond, guidance=1e-30, top_k=1, seed=0, return_dists=True)
    assert torch.equal(free.codes, cfg.codes)
    finite = torch.isfinite(free.step_dists)
    assert torch.equal(finite, torch.isfinite(cfg.step_dists))
    assert torch.allclose(free.step_dists[finite], cfg.step_dists[finite], atol=1e-5)


def test_unpadded_decode_steps_attend_without_a_mask_and_match_the_masked_steps(model, monkeypatch):
    """Equal-length prompts leave no row padded: every decode step calls SDPA with attn_mask=None (the
    flash-eligible call), and its distributions equal the masked path's; padded batches keep the mask."""
    from cca_ray.models.emu3 import decode as dec

    masks = []
    sdpa = dec.F.scaled_dot_product_attention

    def spy(*a, **kw):  # torch's own function, so the prefill's (multi-token) calls come here too
        if a[0].shape[2] == 1:  # a decode step's one-token query
            masks.append(kw.get("attn_mask"))
        return sdpa(*a, **kw)

    monkeypatch.setattr(dec.F, "scaled_dot_product_attention", spy)
    same = model.encode_conditions([PROMPTS[0]] * 2, GRID)
    assert bool(same.attention_mask.all())
    free = model.sample(same, seed=0, return_dists=True)
    assert masks and all(m is None for m in masks)
    masks.clear()
    monkeypatch.setattr(dec.KVBackend, "always_mask", True)
    masked = model.sample(same, seed=0, return_dists=True)
    assert masks and all(m is not None for m in masks)
    assert torch.equal(free.codes, masked.codes)
    finite = torch.isfinite(free.step_dists)
    assert torch.allclose(free.step_dists[finite], masked.step_dists[finite], atol=1e-5)
    monkeypatch.setattr(dec.KVBackend, "always_mask", False)
    masks.clear()
    padded = model.encode_conditions([PROMPTS[0], ""], GRID)
    assert not bool(padded.attention_mask.all())
    model.sample(padded, seed=0)
    assert masks and all(m is not None for m in masks)


def test_guidance_changes_distribution(model):
    cond = model.encode_conditions(PROMPTS, GRID)
    a = model.sample(cond, seed=0, return_dists=True).step_dists
    b = model.sample(cond, guidance=3.0, seed=0, return_dists=True).step_dists
    assert not torch.allclose(a, b, atol=1e-3)


def test_one_forward_per_token_without_guidance(model):
    """guidance=0 never builds unconditional rows: every forward (prefill and each decode step
    embeds its tokens once) sees exactly B rows."""
    calls = []
    hook = model.hf.model.text_model.embed_tokens.register_forward_hook(
        lambda mod, args, out: calls.append(args[0].shape))
    try:
        cond = model.encode_conditions(PROMPTS, GRID)
        model.sample(cond, seed=0)
        n_free = len(calls)
        assert all(s[0] == 3 for s in calls)
        calls.clear()
        model.sample(cond, guidance=2.0, seed=0)
        assert all(s[0] == 6 for s in calls)  # CFG: one batched forward of 2B rows
        assert len(calls) == n_free
    finally:
        hook.remove()
    h, w = GRID
    assert n_free == h * (w + 1) - 1  # prefill + one step per fed token (codes and EOLs)


def test_decode_steps_match_the_transformers_forward(tmp_path):
    """The sampler's lean decode loop (static KV cache) gives the same per-step distributions as a
    full transformers forward over the same tokens, with grouped-query attention and left padding."""
    path = build_tiny_model(
        tmp_path, ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_prompt_tokens=12),
        codebook_size=24, prompts=PROMPTS,
    )
    m = load_model(path)
    m.hf.eval()
    assert m.hf.model.text_model.layers[0].self_attn.num_key_value_groups == 2
    cond = m.encode_conditions(["", PROMPTS[0], "a"], GRID)  # three prompt lengths: left padding
    assert (cond.attention_mask == 0).any()
    out = m.sample(cond, seed=[1, 2, 3], return_dists=True)
    inp = m.scoring_inputs(cond, out.codes)
    with torch.no_grad():
        logits = m.hf(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"],
                      position_ids=inp["position_ids"]).logits
    expect = logits[:, inp["target_pos"], m.visual_offset : m.visual_offset + 24].log_softmax(-1)
    assert torch.allclose(out.step_dists, expect, atol=1e-4)


def test_seeds_are_per_row(model):
    cond = model.encode_conditions(PROMPTS, GRID)
    a = model.generate(cond, seed=[10, 11, 12])
    b = model.generate(model.encode_conditions(PROMPTS[1:2], GRID), seed=[11])
    assert torch.equal(a[1], b[0])  # same seed, same image, whatever the batch mates
    c = model.generate(cond, seed=[10, 99, 12])
    assert not torch.equal(a[1], c[1])


def test_top_k_and_top_p_restrict_support(model):
    cond = model.encode_conditions(PROMPTS, GRID)
    d = model.sample(cond, top_k=3, seed=0, return_dists=True).step_dists
    assert (torch.isfinite(d).sum(-1) == 3).all()
    d = model.sample(cond, top_p=0.2, seed=0, return_dists=True).step_dists
    kept = torch.isfinite(d).sum(-1)
    assert (kept >= 1).all() and (kept < 24).all()
    d = model.sample(cond, temperature=0.5, seed=0, return_dists=True).step_dists
    assert torch.isfinite(d).all()


def test_generated_grids_decode_to_images(model):
    codes = model.generate(model.encode_conditions(PROMPTS[:2], (4, 4)), seed=0)
    img = model.decode_images(codes)
    assert img.shape[0] == 2 and img.shape[-2:] == (32, 32) and torch.isfinite(img).all()


def test_bad_inputs_name_the_problem(model):
    with pytest.raises(ValueError, match=r"prompt 1 is \d+ tokens long; this model accepts at most 12"):
        model.encode_conditions(["ok", "a very long prompt " * 10], GRID)
    cond = model.encode_conditions(PROMPTS[:1], GRID)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 24\)"):
        model.sequence_logprob(cond, torch.full((1, *GRID), 24))
    with pytest.raises(ValueError, match="grid"):
        model.sequence_logprob(cond, torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        model.generate(cond, temperature=-1.0)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model("/nonexistent/ckpt")


def test_save_and_reload_roundtrip(model, tmp_path):
    model.save(tmp_path / "m")
    again = load_model(tmp_path / "m")
    cond = model.encode_conditions(PROMPTS, GRID)
    codes = torch.randint(0, 24, (3, *GRID), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(model.sequence_logprob(cond, codes), again.sequence_logprob(cond, codes), atol=1e-5)
    assert again.max_prompt_tokens == 12


def test_inverse_cdf_draws_what_one_float64_cumsum_over_the_codebook_draws():
    """The two-level search (block sums, then inside one block) picks the index a plain float64 CDF picks,
    for codebooks that are and are not a multiple of the block, blocks of draws (VAR) and masked tokens,
    and never a masked token, even at u = 1."""
    import torch.nn.functional as F

    from cca_ray.sample import inverse_cdf

    def plain(logp, u):
        cdf = logp.double().exp().cumsum(-1)
        return torch.searchsorted(cdf, (u * cdf[..., -1]).unsqueeze(-1)).squeeze(-1).clamp_(max=logp.shape[-1] - 1)

    g = torch.Generator().manual_seed(0)
    for shape, k in (((16,), 4096), ((3, 5), 100), ((7,), 10), ((4,), 32768)):
        logits = 3 * torch.randn(*shape, k, generator=g)
        logits[..., ::3] = float("-inf")  # top-k style masking
        logp = F.log_softmax(logits, -1)
        for u in [1 - torch.rand(shape, generator=g, dtype=torch.float64) for _ in range(20)] + [
                torch.ones(shape, dtype=torch.float64)]:
            got = inverse_cdf(logp, u)
            assert torch.equal(got, plain(logp, u))
            assert torch.isfinite(logp.gather(-1, got.unsqueeze(-1))).all()
