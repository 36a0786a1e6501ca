"""LlamaGen family: loading the released file layouts, the GPT's layout and math, sampling
conventions, and the VQ-16 tokenizer, on tiny random-init models (no official code needed).

The port was also checked against the official code on random weights (bit-identical log p and
greedy tokens); that check lives outside the repo because it imports LlamaGen's sources.
"""

import argparse
import math

import numpy as np
import pytest
import torch

from cca_ray.models import load_model
from cca_ray.models.llamagen import (
    GPT_MODELS,
    LlamaGenGPT,
    LlamaGenVQTokenizer,
    build_tiny_vq,
    expected_shapes,
    gpt_config,
    redraw_weights,
)
from cca_ray.models.llamagen.gpt import apply_rope, rope_2d
from cca_ray.tokenizers import load_tokenizer, tokenizer_class

K, CLASSES, IMAGE = 64, 10, 64  # tiny: 64 codes, 10 classes, 64 px -> a 4x4 grid
OPTS = dict(family="llamagen", gpt_model="GPT-tiny", image_size=IMAGE, num_classes=CLASSES, codebook_size=K)


def tiny_gpt(seed=0, null_row=True) -> LlamaGenGPT:
    gpt = LlamaGenGPT(gpt_config("GPT-tiny", image_size=IMAGE, num_classes=CLASSES, codebook_size=K,
                                 null_class_row=null_row))
    redraw_weights(gpt, torch.Generator().manual_seed(seed))
    return gpt.eval()


@pytest.fixture(scope="module")
def state():
    return tiny_gpt().state_dict()


@pytest.fixture(scope="module")
def model(tmp_path_factory, state):
    path = tmp_path_factory.mktemp("c2i") / "c2i_tiny_64.pt"
    torch.save({"model": state}, path)
    return load_model(path, **OPTS)


def codes_for(n, seed=0):
    return torch.randint(0, K, (n, 4, 4), generator=torch.Generator().manual_seed(seed))


# -- the GPT's layout, every size -------------------------------------------------------
FFN_HIDDEN = {"GPT-tiny": 256, "GPT-B": 2048, "GPT-L": 2816, "GPT-XL": 3584, "GPT-XXL": 4096, "GPT-XXXL": 6912,
              "GPT-1B": 5632, "GPT-3B": 8704, "GPT-7B": 11008}
STATED_PARAMS = {"GPT-B": 111e6, "GPT-L": 343e6, "GPT-XL": 775e6, "GPT-XXL": 1.4e9, "GPT-XXXL": 3.9e9,
                 "GPT-1B": 1.2e9, "GPT-3B": 3.1e9, "GPT-7B": 6.6e9}  # LlamaGen's README / gpt.py comments


@pytest.mark.parametrize("name", list(GPT_MODELS))
def test_every_size_has_llamagen_keys_and_shapes(name):
    size, ffn = GPT_MODELS[name], FFN_HIDDEN[name]
    shapes = expected_shapes(gpt_config(name, image_size=256))  # meta device: nothing allocated
    d = size.dim
    want = {"cls_embedding.embedding_table.weight": (1001, d), "tok_embeddings.weight": (16384, d),
            "norm.weight": (d,), "output.weight": (16384, d)}
    for i in range(size.n_layer):
        want |= {f"layers.{i}.attention.wqkv.weight": (3 * d, d), f"layers.{i}.attention.wo.weight": (d, d),
                 f"layers.{i}.feed_forward.w1.weight": (ffn, d), f"layers.{i}.feed_forward.w3.weight": (ffn, d),
                 f"layers.{i}.feed_forward.w2.weight": (d, ffn), f"layers.{i}.attention_norm.weight": (d,),
                 f"layers.{i}.ffn_norm.weight": (d,)}
    assert {k: tuple(v) for k, v in shapes.items()} == want
    if name in STATED_PARAMS:
        assert abs(sum(math.prod(s) for s in shapes.values()) / STATED_PARAMS[name] - 1) < 0.01


def test_no_null_row_without_label_dropout():
    shapes = expected_shapes(gpt_config("GPT-B", image_size=384, null_class_row=False))
    assert tuple(shapes["cls_embedding.embedding_table.weight"]) == (1000, 768)


def test_class_position_rope_rows_are_zero_and_grid_rows_are_2d():
    g, d = 4, 16
    table = rope_2d(g, d)
    assert table.shape == (1 + g * g, d // 2, 2) and table.dtype == torch.float32
    assert torch.count_nonzero(table[0]) == 0
    f = 10000.0 ** (-torch.arange(d // 4) * 4.0 / d)  # per-pair frequencies, LlamaGen's 2-D split
    for i in range(g):
        for j in range(g):
            ang = torch.cat([i * f, j * f])  # first d/4 pairs: row; last d/4: column
            assert torch.allclose(table[1 + i * g + j], torch.stack([ang.cos(), ang.sin()], -1), atol=1e-6)


def test_rope_rotates_adjacent_pairs_and_zeroes_the_class_token():
    d, table = 8, rope_2d(2, 8)
    x = torch.zeros(1, 5, 1, d)
    x[..., 2] = 1.0  # pair 1 = channels (2, 3)
    out = apply_rope(x, table)
    assert torch.count_nonzero(out[0, 0]) == 0  # class position: query/key become zero vectors
    cos, sin = table[:, 1, 0], table[:, 1, 1]
    assert torch.allclose(out[0, :, 0, 2], cos) and torch.allclose(out[0, :, 0, 3], sin)
    assert torch.count_nonzero(out[..., [0, 1, 4, 5, 6, 7]]) == 0


def test_rope_stays_fp32_under_bf16():
    gpt = tiny_gpt().to(torch.bfloat16)
    assert gpt.rope("cpu").dtype == torch.float32 and "freqs_cis" not in gpt.state_dict()


# -- loading the released file layouts --------------------------------------------------
class NotAWeight:
    pass


def layouts(state):
    freqs = rope_2d(4, 32)
    kv = {"layers.0.attention.kv_cache.k_cache": torch.zeros(2, 2, 24, 32),
          "layers.0.attention.kv_cache.v_cache": torch.zeros(2, 2, 24, 32)}
    return {
        "model (B/L/XL)": {"model": state},
        "bare (XXL/3B)": dict(state),
        "bare with freqs_cis": {**state, "freqs_cis": freqs},
        "model with argparse args": {"model": state, "optimizer": {"state": {}}, "steps": 7,
                                     "args": argparse.Namespace(gpt_model="GPT-tiny", image_size=IMAGE)},
        "deepspeed module": {"module": state},
        "after setup_caches": {"model": {**state, **kv}},
    }


@pytest.mark.parametrize("layout", list(layouts({})))
def test_loads_each_released_layout(tmp_path, state, layout):
    path = tmp_path / "c2i.pt"
    torch.save(layouts(state)[layout], path)
    m = load_model(path, **OPTS)
    got = m.module.state_dict()
    assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)
    assert m.grid == (4, 4) and m.codebook_size == K and not m.module.training


def test_argparse_fallback_is_only_for_argparse(tmp_path, state):
    path = tmp_path / "c2i.pt"
    torch.save({"model": state, "extra": NotAWeight()}, path)
    with pytest.raises(ValueError, match="c2i.pt: not a plain PyTorch checkpoint"):
        load_model(path, **OPTS)


def test_wrong_size_names_the_file_and_the_likely_size(tmp_path, state):
    path = tmp_path / "c2i_B_256.pt"
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match=r"c2i_B_256.pt: does not match GPT-B.*looks like GPT-tiny"):
        load_model(path, **{**OPTS, "gpt_model": "GPT-B"})
    with pytest.raises(ValueError, match="gpt_model"):
        load_model(path, family="llamagen", image_size=IMAGE)


def test_stale_freqs_cis_catches_a_wrong_image_size(tmp_path, state):
    path = tmp_path / "c2i.pt"
    torch.save({**state, "freqs_cis": rope_2d(6, 32)}, path)  # trained for a 6x6 grid
    with pytest.raises(ValueError, match="check image_size"):
        load_model(path, **OPTS)


def test_file_without_null_row_loads_but_refuses_null(tmp_path):
    path = tmp_path / "c2i.pt"
    torch.save({"model": tiny_gpt(null_row=False).state_dict()}, path)
    m = load_model(path, **OPTS)
    assert m.module.config.null_class is None
    m.encode_conditions([3])
    with pytest.raises(ValueError, match="null-class row"):
        m.null_condition(1)


# -- conditions and scoring -------------------------------------------------------------
def test_conditions_are_class_ids_and_none_is_the_null_class(model):
    cond = model.encode_conditions([3, None, np.int64(9), torch.tensor(0)])
    assert cond.input_ids.tolist() == [[3], [CLASSES], [9], [0]] and cond.attention_mask.all()
    for bad in ("3", 2.0, CLASSES, -1, True):
        with pytest.raises(ValueError, match="condition 1"):
            model.encode_conditions([0, bad])
    with pytest.raises(ValueError, match="grid"):
        model.encode_conditions([0], grid=(5, 5))
    assert model.condition_length(7) == 1 and model.null_condition(2).input_ids.tolist() == [[CLASSES]] * 2


def test_logprob_is_teacher_forced_log_softmax_sum(model):
    cond, codes = model.encode_conditions([1, None]), codes_for(2)
    logits = model.module.logits(cond.input_ids[:, 0], codes.flatten(1)[:, :-1])  # [B, N, K]
    expect = torch.stack([logits[b].log_softmax(-1)[torch.arange(16), codes[b].flatten()].sum() for b in range(2)])
    got = model.sequence_logprob(cond, codes)
    assert got.dtype == torch.float32 and torch.allclose(got, expect, atol=1e-4)
    assert not torch.allclose(got[0], got[1])  # the class matters


def test_train_mode_scores_like_eval_mode(model):
    """No dropout and no label dropout: Δ = 0 at step 0 needs train-mode scores to be exact."""
    cond, codes = model.encode_conditions([1, 2, 3, None] * 4), codes_for(16)
    model.module.eval()
    ev = model.sequence_logprob(cond, codes)
    model.module.train()
    try:
        assert torch.equal(model.sequence_logprob(cond, codes), ev)
    finally:
        model.module.eval()


def test_gradient_checkpointing_gives_the_same_grads(tmp_path, state):
    grads = []
    for ckpt in (False, True):
        m = load_model(_saved(tmp_path / str(ckpt), state), **OPTS)
        if ckpt:
            m.enable_gradient_checkpointing()
        m.module.train()
        m.sequence_logprob(m.encode_conditions([1, 2]), codes_for(2)).sum().backward()
        grads.append({k: p.grad.clone() for k, p in m.module.named_parameters()})
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-5) for k in grads[0])
    assert m.external_parameters() == []


def _saved(path, state):
    path.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state}, path / "c2i.pt")
    return path / "c2i.pt"


# -- sampling ---------------------------------------------------------------------------
def test_logprob_equals_sum_of_sampler_steps(model):
    cond = model.encode_conditions([0, 5, None])
    out = model.sample(cond, seed=[11, 12, 13])
    assert out.codes.shape == (3, 4, 4) and 0 <= out.codes.min() and out.codes.max() < K
    assert torch.allclose(model.sequence_logprob(cond, out.codes), out.step_logprobs.sum(-1), atol=1e-4)


@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_greedy_codes_are_the_argmax_of_a_teacher_forced_pass(model, guidance):
    """top_k=1 through the KV cache == argmax of one full forward on its own output (with CFG:
    of LlamaGen's z_u + cfg_scale (z_c - z_u) at cfg_scale = guidance + 1)."""
    cond = model.encode_conditions([2, 7])
    codes = model.generate(cond, guidance=guidance, top_k=1, seed=0).flatten(1)
    z_c = model.module.logits(cond.input_ids[:, 0], codes[:, :-1])
    z_u = model.module.logits(torch.full((2,), CLASSES), codes[:, :-1])
    z = z_u + (guidance + 1.0) * (z_c - z_u) if guidance else z_c
    assert torch.equal(z.argmax(-1), codes)


@pytest.mark.parametrize("guidance,temperature", [(2.0, 1.0), (0.5, 0.7)])
def test_cfg_convention_matches_llamagen_cfg_scale(model, guidance, temperature):
    """Our l_c + g (l_c - l_u) on log-probs == LlamaGen's softmax((z_u + s (z_c - z_u)) / T), s = g + 1."""
    cond = model.encode_conditions([4, 1])
    out = model.sample(cond, guidance=guidance, temperature=temperature, seed=[1, 2], return_dists=True)
    codes = out.codes.flatten(1)
    z_c = model.module.logits(cond.input_ids[:, 0], codes[:, :-1])
    z_u = model.module.logits(torch.full((2,), CLASSES), codes[:, :-1])
    cfg_scale = guidance + 1.0
    llamagen = ((z_u + cfg_scale * (z_c - z_u)) / temperature).softmax(-1)
    assert torch.allclose(out.step_dists.exp(), llamagen, atol=1e-5)


@pytest.mark.parametrize("guidance", [0.0, 1.5])
def test_guidance_zero_runs_no_unconditional_rows(model, guidance):
    rows, classes = [], []
    hooks = [model.module.norm.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0])),
             model.module.cls_embedding.register_forward_pre_hook(lambda m, a: classes.append(a[0].tolist()))]
    try:
        model.generate(model.encode_conditions([1, 2, 3]), guidance=guidance, seed=0)
    finally:
        for h in hooks:
            h.remove()
    assert len(rows) == 16  # one forward per code: prefill + 15 steps
    if guidance == 0.0:
        assert set(rows) == {3} and classes == [[1, 2, 3]]
    else:
        assert set(rows) == {6} and classes == [[1, 2, 3, CLASSES, CLASSES, CLASSES]]


def test_per_row_seeds_do_not_depend_on_the_batch(model):
    both = model.generate(model.encode_conditions([3, 8]), seed=[5, 6], guidance=1.0)
    alone = model.generate(model.encode_conditions([8]), seed=[6], guidance=1.0)
    assert torch.equal(both[1], alone[0])


# -- persistence ------------------------------------------------------------------------
def test_save_load_round_trip_keeps_the_official_file_format(tmp_path, model):
    model.save(tmp_path / "out")
    back = load_model(tmp_path / "out")  # family from the sidecar
    cond, codes = model.encode_conditions([1, None]), codes_for(2, seed=3)
    assert back.family == "llamagen" and back.gpt_model == "GPT-tiny"
    assert torch.equal(back.sequence_logprob(cond, codes), model.sequence_logprob(cond, codes))
    raw = torch.load(tmp_path / "out" / "gpt.pt", weights_only=True)
    assert set(raw) == {"model"} and set(raw["model"]) == set(model.module.state_dict())
    as_released = load_model(tmp_path / "out" / "gpt.pt", **OPTS)  # LlamaGen's own layout, read back as such
    assert torch.equal(as_released.sequence_logprob(cond, codes), model.sequence_logprob(cond, codes))
    # saving over the directory a model was loaded from leaves the live weights intact (no mmap aliasing)
    back.module.load_state_dict({k: torch.zeros_like(v) for k, v in back.module.state_dict().items()})
    back.save(tmp_path / "out")
    assert torch.equal(as_released.sequence_logprob(cond, codes), model.sequence_logprob(cond, codes))


def test_export_path_bf16(tmp_path, model):
    """The trainer's export: load_state_dict(strict=False) into a fresh load, cast, save, reload."""
    fresh = load_model(_saved(tmp_path, model.module.state_dict()), **OPTS)
    fresh.module.load_state_dict({k: v + 1 for k, v in model.module.state_dict().items()}, strict=False)
    fresh.module.to(torch.bfloat16)
    fresh.save(tmp_path / "export")
    back = load_model(tmp_path / "export", dtype=torch.bfloat16)
    w = back.module.state_dict()["output.weight"]
    assert w.dtype == torch.bfloat16 and torch.equal(w, (model.module.output.weight + 1).to(torch.bfloat16))
    lp = back.sequence_logprob(back.encode_conditions([1]), codes_for(1))
    assert lp.dtype == torch.float32 and torch.isfinite(lp).all()


def test_build_tiny_entry_writes_a_loadable_model(tmp_path):
    from cca_ray.config import ModelConfig
    from cca_ray.models import build_tiny_model

    path = build_tiny_model(tmp_path / "tiny", ModelConfig(family="llamagen", hidden_size=32, num_layers=1, num_heads=2),
                            codebook_size=32, num_classes=5, grid=(2, 2))
    m = load_model(path)
    assert (m.codebook_size, m.num_classes, m.grid) == (32, 5, (2, 2))
    logits = m.module.logits(torch.tensor([0]), torch.tensor([[1, 2, 3]]))
    assert logits.std() > 0.1  # unit-ish init, not LlamaGen's zeroed head


# -- the VQ-16 tokenizer ----------------------------------------------------------------
@pytest.fixture(scope="module")
def vq_file(tmp_path_factory):
    return build_tiny_vq(tmp_path_factory.mktemp("vq") / "vq_tiny.pt", codebook_size=K, seed=1)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return np.repeat(np.repeat(rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8), 8, 1), 8, 2)


def test_vq_file_has_llamagen_keys(vq_file):
    sd = torch.load(vq_file, weights_only=True)["model"]
    for key in ("quantize.embedding.weight", "quantize.codebook_used", "quant_conv.weight", "post_quant_conv.weight",
                "encoder.conv_blocks.0.res.0.conv1.weight", "encoder.conv_blocks.3.downsample.conv.weight",
                "encoder.conv_blocks.4.attn.0.proj_out.weight", "encoder.mid.1.q.weight",
                "decoder.conv_blocks.0.res.1.norm2.weight", "decoder.conv_blocks.3.upsample.conv.weight",
                "decoder.norm_out.weight", "decoder.conv_out.bias"):
        assert key in sd, key
    assert tuple(sd["quantize.embedding.weight"].shape) == (K, 8)


def test_vq_codes_are_nearest_unit_codebook_rows(vq_file, images):
    tok = LlamaGenVQTokenizer(vq_file, image_size=IMAGE, channels=3, device="cpu")
    codes = tok.encode(images)
    assert codes.dtype == np.int32 and codes.shape == (3, 4, 4) and tok.grid == (4, 4)
    m = tok.model
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        z = torch.nn.functional.normalize(m.quant_conv(m.encoder(x)), dim=1)  # [B, 8, h, w]
        e = torch.nn.functional.normalize(m.quantize.embedding.weight, dim=1)
        expect = torch.einsum("bchw,kc->bhwk", z, e).argmax(-1)  # unit vectors: nearest == most similar
    assert np.array_equal(codes, expect.numpy())
    assert len(np.unique(codes)) > 3


def test_vq_decode_and_save_load_round_trip(tmp_path, vq_file, images):
    tok = tokenizer_class("llamagen-vq")(vq_file, image_size=IMAGE, channels=3, codebook_size=K, patch_size=16, device="cpu")
    codes = tok.encode(images)
    out = tok.decode(codes)
    assert out.dtype == np.uint8 and out.shape == images.shape
    with torch.no_grad():
        e = torch.nn.functional.normalize(tok.model.quantize.embedding.weight, dim=1)
        dec = tok.model.decoder(tok.model.post_quant_conv(e[torch.from_numpy(codes).long()].permute(0, 3, 1, 2)))
    assert torch.allclose(tok.model.decode_codes(torch.from_numpy(codes).long()), dec, atol=1e-5)
    expect = torch.clamp(127.5 * dec + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(out.astype(int) - expect).max() <= 1  # truncation may flip on float noise
    tok.save(tmp_path / "tok")
    back = load_tokenizer(tmp_path / "tok", device="cpu")
    assert back.identity() == tok.identity() and back.identity()["family"] == "llamagen-vq"
    assert np.array_equal(back.encode(images), codes) and np.array_equal(back.decode(codes), out)


def test_vq_refuses_mismatched_config_and_changed_weights(tmp_path, vq_file, images):
    with pytest.raises(ValueError, match="codebook_size=16384"):
        LlamaGenVQTokenizer(vq_file, image_size=IMAGE, channels=3, codebook_size=16384, device="cpu")
    with pytest.raises(ValueError, match="downsamples by 16"):
        LlamaGenVQTokenizer(vq_file, image_size=IMAGE, channels=3, patch_size=8, device="cpu")
    gray = LlamaGenVQTokenizer(vq_file, image_size=IMAGE, channels=1, device="cpu")
    assert gray.decode(gray.encode(images[..., :1])).shape == (3, IMAGE, IMAGE, 1)
    moved = build_tiny_vq(tmp_path / "vq.pt", codebook_size=K, seed=1)
    tok = LlamaGenVQTokenizer(moved, image_size=IMAGE, channels=3, device="cpu")
    tok.save(tmp_path / "tok")
    build_tiny_vq(moved, codebook_size=K, seed=2)  # the weights file changes under the saved tokenizer
    with pytest.raises(ValueError, match="re-run prepare"):
        load_tokenizer(tmp_path / "tok", device="cpu")
    torch.save({"model": {"encoder.conv_in.weight": torch.zeros(1)}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt: not a LlamaGen VQ checkpoint"):
        LlamaGenVQTokenizer(tmp_path / "bad.pt", image_size=IMAGE, channels=3, device="cpu")
