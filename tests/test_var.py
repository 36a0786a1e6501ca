"""VAR family: scale layout, released checkpoint layouts, quantiser, scoring, next-scale sampler,
tokenizer, persistence. Tiny random-init models built in the test; the released layouts are
checked on the meta device (no weights allocated)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cca_ray.models import load_model
from cca_ray.models.var import (
    PATCH_NUMS,
    RELEASED_DEPTHS,
    VQVAE,
    ScaleLayout,
    VQVAEConfig,
    build_tiny_var,
    build_tiny_vqvae,
    guidance_per_scale,
    load_var_module,
    var_config,
)
from cca_ray.models.var.vqvae import config_from_state_dict
from cca_ray.sample import SampleBlock, decode
from cca_ray.tokenizers import load_tokenizer, tokenizer_class

_PATCHED_BY_VAR = (nn.Linear, nn.LayerNorm, nn.BatchNorm2d, nn.SyncBatchNorm, nn.Conv1d, nn.Conv2d,
                   nn.ConvTranspose1d, nn.ConvTranspose2d)
_RESET_AT_IMPORT = {c: c.reset_parameters for c in _PATCHED_BY_VAR}
NUM_CLASSES, V = 10, 64


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_var(tmp_path_factory.mktemp("var"), codebook_size=V, num_classes=NUM_CLASSES, seed=0)


@pytest.fixture(scope="module")
def model(tiny_dir):
    m = load_model(tiny_dir)
    m.module.eval()
    return m


def _codes(n, seed=0):
    return torch.randint(0, V, (n, 680), generator=torch.Generator().manual_seed(seed))


# -- layout -------------------------------------------------------------------------------
def test_scale_layout_counts_and_block_causal_mask():
    lay = ScaleLayout()
    assert lay.patch_nums == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16) and lay.num_scales == 10
    assert lay.lengths == (1, 4, 9, 16, 25, 36, 64, 100, 169, 256) and lay.num_tokens == 680
    assert lay.begin_ends[0] == (0, 1) and lay.begin_ends[-1] == (424, 680) and lay.grid == (16, 16)
    bias = lay.attn_bias()[0, 0]
    allowed = bias == 0
    assert torch.isinf(bias[~allowed]).all() and (bias[~allowed] < 0).all()
    for k, (b, e) in enumerate(lay.begin_ends):
        assert allowed[b:e, :e].all(), f"scale {k} must see itself and every coarser scale"
        assert not allowed[b:e, e:].any(), f"scale {k} must not see a finer scale"
    # tokens each query sees: everything up to the end of its own scale
    ends = torch.tensor([e for (_, e), n in zip(lay.begin_ends, lay.lengths) for _ in range(n)])
    assert torch.equal(allowed.sum(1), ends)
    codes = torch.arange(680).view(1, 680)
    parts = lay.split(codes)
    assert [p.shape[1] for p in parts] == list(lay.lengths) and torch.equal(lay.join(parts), codes)


def test_logits_of_a_scale_depend_only_on_coarser_codes(model):
    """Changing one code of scale k changes the teacher-forced logits of finer scales only."""
    lay = model.layout
    cond = model.encode_conditions([3])
    a = _codes(1, seed=1)
    for k in (0, 4, 8):
        b = a.clone()
        pos = lay.begin_ends[k][0]
        b[0, pos] = (b[0, pos] + 1) % V
        with torch.no_grad():
            la = model.module.teacher_forced_logits(**_tf(model, cond, a))
            lb = model.module.teacher_forced_logits(**_tf(model, cond, b))
        end = lay.begin_ends[k][1]
        assert torch.equal(la[:, :end], lb[:, :end]), f"scale <= {k} saw a code of scale {k}"
        assert not torch.allclose(la[:, end:], lb[:, end:]), f"scales > {k} ignore scale {k}"


def _tf(model, cond, codes):
    inp = model.scoring_inputs(cond, codes)
    return dict(labels=inp["labels"], x_BLCv_wo_first_l=inp["x_BLCv_wo_first_l"])


# -- released layouts (meta device) ------------------------------------------------------
# parameter counts of VAR's builder at these depths, counted with the official code
OFFICIAL_PARAMS = {16: 310_283_520, 20: 600_917_136, 24: 1_033_399_360, 30: 2_010_020_356}


def released_layout(depth: int) -> dict[str, tuple]:
    """Names and shapes of a released var_d{depth}.pth (VAR's builder: width 64*depth, depth heads)."""
    c, L = 64 * depth, 680
    spec = {"pos_start": (1, 1, c), "pos_1LC": (1, L, c), "lvl_1L": (1, L), "attn_bias_for_masking": (1, 1, L, L),
            "word_embed.weight": (c, 32), "word_embed.bias": (c,), "class_emb.weight": (1001, c),
            "lvl_embed.weight": (10, c)}
    for i in range(depth):
        b = f"blocks.{i}."
        spec |= {b + "attn.scale_mul_1H11": (1, depth, 1, 1), b + "attn.q_bias": (c,), b + "attn.v_bias": (c,),
                 b + "attn.zero_k_bias": (c,), b + "attn.mat_qkv.weight": (3 * c, c), b + "attn.proj.weight": (c, c),
                 b + "attn.proj.bias": (c,), b + "ffn.fc1.weight": (4 * c, c), b + "ffn.fc1.bias": (4 * c,),
                 b + "ffn.fc2.weight": (c, 4 * c), b + "ffn.fc2.bias": (c,), b + "ada_lin.1.weight": (6 * c, c),
                 b + "ada_lin.1.bias": (6 * c,)}
    return spec | {"head_nm.ada_lin.1.weight": (2 * c, c), "head_nm.ada_lin.1.bias": (2 * c,),
                   "head.weight": (4096, c), "head.bias": (4096,)}


@pytest.fixture(scope="module")
def released_vae_file(tmp_path_factory):
    """vae_ch160v4096z32.pth's layout as a file of meta tensors (shapes only, a few KB)."""
    with torch.device("meta"):
        vae = VQVAE(VQVAEConfig())
    path = tmp_path_factory.mktemp("vae") / "vae_ch160v4096z32.pth"
    torch.save(vae.state_dict(), path)
    return path


@pytest.mark.parametrize("depth", RELEASED_DEPTHS)
def test_released_layout_loads_strictly_on_meta(depth, released_vae_file, tmp_path):
    spec = released_layout(depth)
    sd = {k: torch.empty(s, device="meta", dtype=torch.long if k == "lvl_1L" else torch.float32) for k, s in spec.items()}
    torch.save(sd, tmp_path / f"var_d{depth}.pth")  # meta tensors: the file holds shapes, not 2B weights
    adapter = load_model(tmp_path / f"var_d{depth}.pth", family="var", depth=depth, vae_path=released_vae_file,
                         device="meta")
    m = adapter.module
    assert m.pos_start.is_meta and m.num_params == OFFICIAL_PARAMS[depth]
    assert {k: tuple(t.shape) for k, t in m.state_dict().items()} == spec
    assert (m.cfg.embed_dim, m.cfg.num_heads, m.cfg.num_classes, m.cfg.vocab_size) == (64 * depth, depth, 1000, 4096)
    assert m.cfg.drop_path_rate == pytest.approx(0.1 * depth / 24)
    assert m.cfg == var_config(depth)
    assert (adapter.codebook_size, adapter.num_classes, adapter.code_shape) == (4096, 1000, (680,))
    with pytest.raises(ValueError, match=f"holds a VAR-d{depth}, but depth=12"):
        load_var_module(sd, depth=12, device="meta")
    with pytest.raises(ValueError, match="1 missing"):
        load_var_module({k: t for k, t in sd.items() if k != "blocks.0.attn.zero_k_bias"}, device="meta")
    with pytest.raises(ValueError, match="1 unexpected"):
        load_var_module({**sd, "blocks.0.attn.extra": sd["head.bias"]}, device="meta")


def test_released_vqvae_layout_on_meta():
    with torch.device("meta"):
        vae = VQVAE(VQVAEConfig())
    sd = vae.state_dict()
    assert len(sd) == 324 and sum(p.numel() for p in vae.parameters()) == 108_948_355  # vae_ch160v4096z32.pth
    assert tuple(sd["quantize.embedding.weight"].shape) == (4096, 32)
    assert tuple(sd["quantize.ema_vocab_hit_SV"].shape) == (10, 4096)
    assert [k for k in sd if "qresi_ls" in k and k.endswith("weight")] == [
        f"quantize.quant_resi.qresi_ls.{i}.weight" for i in range(4)]
    assert config_from_state_dict(sd) == VQVAEConfig()  # the shapes alone give back the release config


# -- loading ------------------------------------------------------------------------------
def test_bare_released_format_files_load_with_depth_and_vae_path(model, tiny_dir):
    weights, vae = tiny_dir / "var_d2.pth", tiny_dir / "vae_tiny.pth"
    sd = torch.load(weights, weights_only=True)
    assert isinstance(sd, dict) and "attn_bias_for_masking" in sd and "blocks.1.ada_lin.1.weight" in sd
    bare = load_model(weights, family="var", depth=2, vae_path=vae)
    cond, codes = model.encode_conditions([1, None]), _codes(2)
    with torch.no_grad():
        assert torch.equal(bare.sequence_logprob(cond, codes), model.sequence_logprob(cond, codes))
    with pytest.raises(ValueError, match="needs vae_path"):
        load_model(weights, family="var", depth=2)
    with pytest.raises(ValueError, match="depth=16"):
        load_model(weights, family="var", depth=16, vae_path=vae)


def test_loading_leaves_torch_reset_parameters_alone(tiny_dir, tmp_path):
    """VAR's builder replaces reset_parameters of these classes globally; nothing of ours may."""
    load_model(tiny_dir)
    build_tiny_var(tmp_path / "m", codebook_size=V, num_classes=NUM_CLASSES)
    for cls in _PATCHED_BY_VAR:
        assert cls.reset_parameters is _RESET_AT_IMPORT[cls], cls
        assert cls.reset_parameters.__qualname__.endswith(".reset_parameters"), cls
    torch.manual_seed(0)
    w = nn.Linear(16, 16).weight
    assert w.abs().max() <= 1 / 4 and w.std() > 0.05  # kaiming-uniform bound 1/sqrt(fan_in): really initialised


# -- quantiser ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return tokenizer_class("var-vqvae")(tiny_dir / "vae_tiny.pth", 256, 3, device="cpu")


def _images(n, seed=0, c=3):
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.randn(n, c, 8, 8, generator=g), size=(256, 256), mode="bicubic")
    return ((x.clamp(-2, 2) / 4 + 0.5) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_quantiser_round_trip(tokenizer):
    vae, q = tokenizer.model, tokenizer.model.quantize
    img = torch.from_numpy(_images(2)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        f = vae.quant_conv(vae.encoder(img))
    codes, fhats = q.f_to_idx(f, return_fhat=True)
    assert [c.shape[1] for c in codes] == list(ScaleLayout().lengths)
    # the first scale is the nearest codebook entry to the mean feature
    brute = torch.cdist(f.mean((2, 3)), q.embedding.weight).argmin(1)
    assert torch.equal(codes[0][:, 0], brute)
    assert len(set(torch.cat(codes, 1).flatten().tolist())) > 8  # a real code distribution, not one code
    # codes alone rebuild the reconstruction the quantiser accumulated, scale by scale
    for a, b in zip(q.idx_to_fhat(codes), fhats):
        assert torch.allclose(a, b, atol=1e-5)
    # the tokenizer's flat codes are the same maps, and split back exactly
    flat = tokenizer.encode(_images(2))
    assert flat.dtype == np.int32 and flat.shape == (2, 680)
    assert all(torch.equal(a, b) for a, b in zip(ScaleLayout().split(torch.from_numpy(flat).long()), codes))


def test_teacher_forced_input_is_the_running_reconstruction(model):
    """Input of scale k+1 = f_hat after scales 0..k, area-downsampled to scale k+1's size."""
    q, lay = model.quant, model.layout
    codes = lay.split(_codes(2, seed=3))
    fhats = q.idx_to_fhat(codes)
    expect = torch.cat([F.interpolate(fhats[k], size=(p, p), mode="area").flatten(2).transpose(1, 2)
                        for k, p in zip(range(9), lay.patch_nums[1:])], 1)
    got = q.var_input(codes)
    assert got.shape == (2, 679, 8) and torch.allclose(got, expect, atol=1e-6)


# -- scoring and sampling -----------------------------------------------------------------
def test_logprob_matches_every_sampler_step(model):
    """The per-scale KV-cache sampler and the one teacher-forced pass give the same distribution
    at all 680 positions; log p is their sum of log-softmax at the drawn codes."""
    cond = model.encode_conditions([1, 5, None])
    out = model.sample(cond, seed=[3, 4, 5], return_dists=True)
    assert out.codes.shape == (3, 680) and out.step_dists.shape == (3, 680, V)
    with torch.no_grad():
        tf = model.module.teacher_forced_logits(**_tf(model, cond, out.codes)).log_softmax(-1)
        lp = model.sequence_logprob(cond, out.codes)
    assert torch.allclose(out.step_dists, tf, atol=1e-4)
    assert torch.allclose(lp, out.step_logprobs.sum(-1), rtol=1e-5)
    assert lp.dtype == torch.float32 and (lp < 0).all()


def test_cfg_ramps_linearly_over_scales(model):
    assert guidance_per_scale(3.0, 10) == pytest.approx([3.0 * k / 9 for k in range(10)])
    assert guidance_per_scale(3.0, 10, "constant") == [3.0] * 10
    cond = model.encode_conditions([2, 7])
    free = model.sample(cond, seed=0, return_dists=True)
    for schedule in ("linear", "constant"):
        out = model.sample(cond, guidance=3.0, cfg_schedule=schedule, seed=0, return_dists=True)
        with torch.no_grad():
            lc = model.module.teacher_forced_logits(**_tf(model, cond, out.codes))
            lu = model.module.teacher_forced_logits(**_tf(model, model.null_condition(2), out.codes))
        # VAR's sampler on logits: (1 + t) l_c - t l_u, t = cfg * k / 9 at scale k (or cfg throughout)
        t = torch.tensor([g for g, n in zip(guidance_per_scale(3.0, 10, schedule), ScaleLayout().lengths)
                          for _ in range(n)]).view(1, 680, 1)
        expect = ((1 + t) * lc - t * lu).log_softmax(-1)
        assert torch.allclose(out.step_dists, expect, atol=1e-4), schedule
        same_first = torch.allclose(out.step_dists[:, 0], free.step_dists[:, 0], atol=1e-6)
        assert same_first == (schedule == "linear"), "the ramp starts unguided; a constant scale does not"
    with pytest.raises(ValueError, match="cfg_schedule"):
        model.generate(cond, guidance=1.0, cfg_schedule="cosine")


def test_guidance_zero_builds_no_unconditional_rows(model):
    """Every forward of a block sees B rows at guidance 0 (one per scale) and 2B with CFG; the
    class embedding is looked up for the null class only with CFG."""
    rows, labels = [], []
    h1 = model.module.blocks[0].register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    h2 = model.module.class_emb.register_forward_hook(lambda m, a, o: labels.append(a[0].tolist()))
    try:
        cond = model.encode_conditions([1, 2, 3])
        model.generate(cond, seed=0)
        assert rows == [3] * 10 and labels == [[1, 2, 3]]
        rows.clear(), labels.clear()
        model.generate(cond, guidance=0.0, cfg_schedule="constant", seed=0)
        assert rows == [3] * 10
        rows.clear(), labels.clear()
        model.generate(cond, guidance=2.0, seed=0)
        assert rows == [6] * 10 and labels == [[1, 2, 3] + [NUM_CLASSES] * 3]
    finally:
        h1.remove(), h2.remove()


def test_greedy_with_guidance_differs_and_cfg_at_scale_zero_is_free(model):
    cond = model.encode_conditions([4, 8])
    free = model.generate(cond, top_k=1, seed=0)
    tiny = model.generate(cond, guidance=1e-30, cfg_schedule="constant", top_k=1, seed=0)  # 2B rows, same numbers
    strong = model.generate(cond, guidance=5.0, top_k=1, seed=0)
    assert torch.equal(free, tiny) and not torch.equal(free, strong)


def test_seeds_are_per_row(model):
    a = model.generate(model.encode_conditions([1, 2, 3]), seed=[10, 11, 12])
    b = model.generate(model.encode_conditions([2]), seed=[11])
    assert torch.equal(a[1], b[0])  # same seed, same class: same image whatever the batch mates
    c = model.generate(model.encode_conditions([1, 2, 3]), seed=[10, 99, 12])
    assert not torch.equal(a[1], c[1]) and torch.equal(a[0], c[0])


def test_top_k_top_p_and_temperature(model):
    cond = model.encode_conditions([1, 2])
    d = model.sample(cond, top_k=3, seed=0, return_dists=True).step_dists
    assert (torch.isfinite(d).sum(-1) == 3).all()
    d = model.sample(cond, top_p=0.2, seed=0, return_dists=True).step_dists
    kept = torch.isfinite(d).sum(-1)
    assert (kept >= 1).all() and (kept < V).all()
    hot = model.sample(cond, temperature=2.0, seed=0, return_dists=True).step_dists
    cold = model.sample(cond, temperature=0.5, seed=0, return_dists=True).step_dists
    def entropy(lp):
        return -(lp.exp() * lp).sum(-1).mean()

    assert entropy(hot) > entropy(cold)


def test_decode_validates_per_step_guidance():
    class Echo:
        def prefill(self, ids, mask, need_logits):
            return torch.zeros(ids.shape[0], 1, 4)

        def step(self, tok, need_logits):
            return torch.zeros(tok.shape[0], 2, 4)

    ids = torch.zeros(2, 1, dtype=torch.long)
    out = decode(Echo(), ids, torch.ones_like(ids), [SampleBlock(1), SampleBlock(2)], 0, seed=0)
    assert out.codes.shape == (2, 3)
    with pytest.raises(ValueError, match="got 1 scales for 2 sampling steps"):
        decode(Echo(), ids, torch.ones_like(ids), [SampleBlock(1), SampleBlock(2)], 0, guidance_scale=[1.0])
    with pytest.raises(ValueError, match=">= 0"):
        decode(Echo(), ids, torch.ones_like(ids), [SampleBlock(1), SampleBlock(2)], 0, guidance_scale=[0.0, -1.0],
               uncond_ids=ids, uncond_mask=torch.ones_like(ids))


# -- training hooks -----------------------------------------------------------------------
def test_train_mode_scores_without_label_dropout_and_checkpointing_keeps_grads(tiny_dir):
    """VAR's own forward drops labels at cond_drop_rate even in eval mode; ours never does, so with
    drop-path 0 train-mode scores equal eval-mode ones. Gradient checkpointing changes no gradient."""
    m = load_model(tiny_dir)
    cond, codes = m.encode_conditions([1, 2, 3, 4]), _codes(4, seed=5)
    m.module.eval()
    with torch.no_grad():
        ref = m.sequence_logprob(cond, codes)
    m.module.train()
    assert torch.equal(m.sequence_logprob(cond, codes).detach(), ref)
    m.sequence_logprob(cond, codes).sum().backward()
    plain = {n: p.grad.clone() for n, p in m.module.named_parameters()}
    m.module.zero_grad()
    m.enable_gradient_checkpointing()
    m.sequence_logprob(cond, codes).sum().backward()
    for n, p in m.module.named_parameters():
        assert torch.allclose(p.grad, plain[n], atol=1e-5), n
    assert m.external_parameters() == [] and m.frozen_prefixes == ()
    assert not any(p.requires_grad for p in m.quant.parameters())


def test_shared_adaln_names_its_external_parameters(model):
    """With shared AdaLN (the d36-s layout) the root reads each block's ada_gss: ZeRO-3 must gather them."""
    from cca_ray.models.var import VAR, VARAdapter

    cfg = var_config(2, embed_dim=32, num_heads=2, num_classes=NUM_CLASSES, vocab_size=V, vae_channels=8, shared_aln=True)
    m = VARAdapter(VAR(cfg), model.quant)
    assert m.external_parameters() == [blk.ada_gss for blk in m.module.blocks]
    assert "shared_ada_lin.1.weight" in m.module.state_dict()
    cond = m.encode_conditions([1])
    out = m.sample(cond, seed=0)
    with torch.no_grad():
        assert torch.allclose(m.sequence_logprob(cond, out.codes), out.step_logprobs.sum(-1), rtol=1e-5)


def test_bfloat16_scores_and_samples(tiny_dir, model):
    m = load_model(tiny_dir, dtype="bfloat16")
    assert m.module.head.weight.dtype == torch.bfloat16 and m.quant.embedding.weight.dtype == torch.float32
    cond, codes = m.encode_conditions([1, None]), _codes(2)
    with torch.no_grad():
        lp16, lp32 = m.sequence_logprob(cond, codes), model.sequence_logprob(cond, codes)
    assert lp16.dtype == torch.float32 and torch.allclose(lp16, lp32, rtol=2e-2)
    assert m.generate(cond, guidance=1.0, seed=0).shape == (2, 680)


def test_drop_path_only_in_train_mode(tmp_path):
    m = load_model(build_tiny_var(tmp_path, codebook_size=V, num_classes=NUM_CLASSES, drop_path_rate=0.5))
    cond, codes = m.encode_conditions([1, 2]), _codes(2)
    with torch.no_grad():
        m.module.eval()
        a, b = m.sequence_logprob(cond, codes), m.sequence_logprob(cond, codes)
        m.module.train()
        c = m.sequence_logprob(cond, codes)
    assert torch.equal(a, b) and not torch.allclose(a, c)


# -- persistence --------------------------------------------------------------------------
def test_save_load_roundtrip_and_export_path(model, tmp_path):
    """The trainer's export: load base, load_state_dict(consolidated params, strict=False), save."""
    cond, codes = model.encode_conditions([1, None, 9]), _codes(3, seed=7)
    model.save(tmp_path / "a")
    again = load_model(tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(again.sequence_logprob(cond, codes), model.sequence_logprob(cond, codes))
    assert (again.cfg, again.code_shape, again.codebook_size) == (model.cfg, (680,), V)
    trained = {n: p.detach() + 0.01 for n, p in model.module.named_parameters()}  # what zero_to_fp32 gives
    again.module.load_state_dict(trained, strict=False)
    again.module.to(torch.float32)
    again.save(tmp_path / "b")
    third = load_model(tmp_path / "b")
    assert torch.equal(third.module.head.weight, trained["head.weight"])
    with torch.no_grad():
        assert not torch.allclose(third.sequence_logprob(cond, codes), model.sequence_logprob(cond, codes))
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["cca_ray.json", "vae_tiny.pth", "var_d2.pth"]


def test_bad_inputs_name_the_problem(model):
    with pytest.raises(ValueError, match=r"condition 1: expected a class id in \[0, 10\)"):
        model.encode_conditions([1, 10])
    with pytest.raises(ValueError, match="condition 0"):
        model.encode_conditions(["a cat"])
    with pytest.raises(ValueError, match="16x16"):
        model.encode_conditions([1], grid=(8, 8))
    cond = model.encode_conditions([1])
    with pytest.raises(ValueError, match=r"codes must be \[B, 680\]"):
        model.sequence_logprob(cond, torch.zeros(1, 16, 16, dtype=torch.long))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 64\)"):
        model.sequence_logprob(cond, torch.full((1, 680), V))
    with pytest.raises(ValueError, match="temperature"):
        model.generate(cond, temperature=0.0)


# -- tokenizer ----------------------------------------------------------------------------
def test_tokenizer_identity_save_load_and_gray_images(tokenizer, tmp_path):
    ident = tokenizer.identity()
    assert ident["family"] == "var-vqvae" and ident["grid"] == [16, 16] and ident["code_shape"] == [680]
    assert ident["scales"] == list(PATCH_NUMS) and ident["codebook_size"] == V and ident["patch_size"] == 16
    tokenizer.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok", device="cpu")
    imgs = _images(1, seed=2)
    codes = tokenizer.encode(imgs)
    assert np.array_equal(again.encode(imgs), codes)
    out = again.decode(codes)
    assert out.dtype == np.uint8 and out.shape == (1, 256, 256, 3)
    gray = tokenizer_class("var-vqvae")(tokenizer.path, 256, 1, device="cpu")
    g = _images(1, seed=2, c=1)
    assert gray.encode(g).shape == (1, 680) and gray.decode(gray.encode(g)).shape == (1, 256, 256, 1)
    with pytest.raises(ValueError, match="image_size must be 256"):
        tokenizer_class("var-vqvae")(tokenizer.path, 64, 3, device="cpu")
    with pytest.raises(ValueError, match=r"codes must be \[N, 680\]"):
        tokenizer.decode(np.zeros((1, 16, 16), dtype=np.int32))


def test_tiny_vqvae_with_other_scales_and_levels(tmp_path):
    """A VQVAE file at other scales and fewer levels (a CPU smoke setup: 32x32 images, 4x down,
    scales up to 8) loads once told its scales; its levels are read off the state dict."""
    path = build_tiny_vqvae(tmp_path / "v.pth", ch_mult=(1, 2, 2), patch_nums=(1, 2, 4, 8))
    with pytest.raises(ValueError, match="image_size must be 64 .* needs its patch_nums"):
        tokenizer_class("var-vqvae")(path, 32, 1, device="cpu")  # told nothing: VAR's ten scales do not fit
    tok = tokenizer_class("var-vqvae")(path, 32, 1, device="cpu", patch_nums=(1, 2, 4, 8))
    assert tok.code_shape == (1 + 4 + 16 + 64,) and tok.identity()["scales"] == [1, 2, 4, 8]
    assert tok.model.cfg.ch_mult == (1, 2, 2) and tok.identity()["patch_size"] == 4
    assert math.isclose(tok.model.quantize.quant_resi.qresi_ls[0].resi_ratio, 0.5)
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (2, 32, 32, 1), generator=g, dtype=torch.uint8).numpy()
    codes = tok.encode(imgs)
    assert codes.shape == (2, 85) and tok.decode(codes).shape == (2, 32, 32, 1)
