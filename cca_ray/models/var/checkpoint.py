"""VAR checkpoints: the released bare state dicts, and the directories cca-ray writes.

    load_var("var_d16.pth", depth=16, vae_path="vae_ch160v4096z32.pth")   # a release
    adapter.save(d); load_var(d)                                           # our directory

A directory holds the weights in the released format (``var_d{depth}.pth``, a bare state dict
that VAR's own code loads), the VQVAE file it was trained with (hard-linked where possible), and
``cca_ray.json`` naming the family, both files and the options a state dict does not hold.
The model's configuration is read off the state dict's shapes; ``depth`` only checks it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from cca_ray.models.var.adapter import VARAdapter
from cca_ray.models.var.layout import PATCH_NUMS, ScaleLayout
from cca_ray.models.var.transformer import (
    VAR,
    VARConfig,
    build_var,
    init_unit_scale,
    var_config,
)
from cca_ray.models.var.vqvae import (
    build_tiny_vqvae,
    load_quantizer,
    load_strict,
    read_state_dict,
)

SIDECAR = "cca_ray.json"


def var_config_from_state_dict(sd: dict, *, patch_nums=None, drop_path_rate: float | None = None) -> VARConfig:
    """The VARConfig whose module has exactly `sd`'s shapes (released d16..d30 or a tiny one)."""
    try:
        n_cls, c = sd["class_emb.weight"].shape
        vocab = sd["head.weight"].shape[0]
        cvae = sd["word_embed.weight"].shape[1]
        tokens = sd["pos_1LC"].shape[1]
        hidden = sd["blocks.0.ffn.fc1.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not a VAR state dict (no {e.args[0]})") from None
    depth = len({m.group(1) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    l2 = "blocks.0.attn.scale_mul_1H11" in sd
    layout = ScaleLayout(tuple(patch_nums) if patch_nums is not None else PATCH_NUMS)
    if tokens != layout.num_tokens:
        raise ValueError(f"its position embedding has {tokens} tokens; the scales {layout.patch_nums} have "
                         f"{layout.num_tokens} (pass the patch_nums it was trained with)")
    over = dict(embed_dim=c, num_classes=n_cls - 1, vocab_size=vocab, vae_channels=cvae, patch_nums=layout.patch_nums,
                mlp_ratio=hidden / c, shared_aln="shared_ada_lin.1.weight" in sd, attn_l2_norm=l2,
                # heads: the learnt per-head scale has one entry per head; without it, VAR's 64 channels a head
                num_heads=sd["blocks.0.attn.scale_mul_1H11"].shape[1] if l2 else c // 64)
    if drop_path_rate is not None:
        over["drop_path_rate"] = drop_path_rate
    return var_config(depth, **over)


def load_var_module(source, *, depth: int | None = None, patch_nums=None, drop_path_rate: float | None = None,
                    device="cpu", dtype=torch.float32) -> VAR:
    """A VAR from a bare state dict (file or dict), loaded strictly, in eval mode. Built on the meta device and
    given the loaded tensors (assign), so no weight is allocated twice and none is initialised:
    a meta state dict gives a meta model (layout checks of the 2B-parameter d30 cost nothing)."""
    where = str(source) if not isinstance(source, dict) else "state dict"
    sd = source if isinstance(source, dict) else read_state_dict(source)
    try:
        cfg = var_config_from_state_dict(sd, patch_nums=patch_nums, drop_path_rate=drop_path_rate)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if depth is not None and cfg.depth != depth:
        raise ValueError(f"{where}: holds a VAR-d{cfg.depth}, but depth={depth} was asked for")
    model = build_var(cfg, "meta")
    load_strict(model, sd, where)
    if not model.lvl_1L.is_meta and not torch.equal(model.lvl_1L[0].cpu(), cfg.layout.level_ids()):
        raise ValueError(f"{where}: its level ids do not match the scales {cfg.patch_nums}")
    return model.to(device=device, dtype=dtype).eval()  # as from_pretrained: the trainer calls train()


def load_var(path, *, depth: int | None = None, vae_path=None, device="cpu", dtype=torch.float32,
             patch_nums=None, drop_path_rate: float | None = None, quant_resi: float | None = None) -> VARAdapter:
    """A released ``var_d*.pth`` (with ``vae_path``) or a directory written by ``VARAdapter.save``."""
    path = Path(path)
    side = {}
    if path.is_dir():
        if not (path / SIDECAR).exists():
            raise FileNotFoundError(f"{path}: no {SIDECAR}; give a var_d*.pth file (and vae_path) or a saved directory")
        side = json.loads((path / SIDECAR).read_text())
        weights = path / side["weights"]
        vae_path = vae_path or path / side["vae"]
    else:
        weights = path
        if vae_path is None:
            raise ValueError(f"{path}: a bare VAR state dict needs vae_path= (its VQVAE, e.g. vae_ch160v4096z32.pth)")
    patch_nums = patch_nums or side.get("patch_nums")
    drop_path_rate = drop_path_rate if drop_path_rate is not None else side.get("drop_path_rate")
    quant_resi = quant_resi if quant_resi is not None else side.get("quant_resi")
    var = load_var_module(weights, depth=depth, patch_nums=patch_nums, drop_path_rate=drop_path_rate,
                          device=device, dtype=dtype)
    quant = load_quantizer(vae_path, patch_nums=var.cfg.patch_nums, quant_resi=quant_resi, device=device)
    return VARAdapter(var, quant, vae_file=Path(vae_path).resolve())


def save_var(adapter: VARAdapter, path) -> None:
    if adapter.vae_file is None:
        raise ValueError("this VAR adapter was built without a VQVAE file; save needs one to copy beside the weights")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = adapter.cfg
    weights = f"var_d{cfg.depth}.pth"
    from cca_ray.models import knob as knobs

    state = {k: t.detach().cpu().contiguous() for k, t in knobs.strip(adapter.module.state_dict()).items()}
    tmp = path / f".{weights}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path / weights)
    vae = Path(adapter.vae_file)
    dst = path / vae.name
    if not (dst.exists() and os.path.samefile(vae, dst)):
        dst.unlink(missing_ok=True)
        try:
            os.link(vae, dst)  # the VQVAE never changes: share its bytes with the base checkpoint
        except OSError:
            shutil.copy2(vae, dst)
    from cca_ray.tokenizers.base import write_json_atomic

    write_json_atomic(path / SIDECAR, {
        "family": "var", "weights": weights, "vae": vae.name, "depth": cfg.depth, "patch_nums": list(cfg.patch_nums),
        "drop_path_rate": cfg.drop_path_rate, "quant_resi": adapter.quant.quant_resi.qresi_ls[0].resi_ratio,
        "codebook_size": cfg.vocab_size, "num_classes": cfg.num_classes, "code_shape": list(adapter.code_shape),
    })
    knobs.save(adapter.module, path)


def build_tiny_var(
    out_dir,
    *,
    codebook_size: int = 64,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    num_classes: int = 10,
    intermediate_size: int | None = None,
    num_kv_heads: int | None = None,
    vae_path=None,
    vae_channels: int = 8,
    patch_nums=PATCH_NUMS,
    drop_path_rate: float = 0.0,
    seed: int = 0,
    max_prompt_tokens: int | None = None,  # prompt families only; a class id is one token
    prompts=(),  # prompt families only
) -> Path:
    """Build and save (as ``VARAdapter.save``) a random-init VAR at unit scale; returns out_dir.
    Without `vae_path` a random tiny VQVAE is made beside it (``vae_tiny.pth``). drop_path_rate
    defaults to 0 here, so train- and eval-mode scores agree (CCA's Δ is exactly 0 at step 0);
    released checkpoints load with VAR's 0.1 * depth / 24 unless told otherwise."""
    if num_kv_heads not in (None, num_heads):
        raise ValueError("VAR has no grouped-query attention: num_kv_heads must equal num_heads")
    out_dir = Path(out_dir)
    if vae_path is None:
        vae_path = build_tiny_vqvae(out_dir / "vae_tiny.pth", vocab_size=codebook_size, z_channels=vae_channels,
                                    patch_nums=patch_nums, seed=seed)
    quant = load_quantizer(vae_path, patch_nums=patch_nums)
    if quant.vocab_size != codebook_size:
        raise ValueError(f"{vae_path}: codebook of {quant.vocab_size} codes, codebook_size={codebook_size} asked for")
    cfg = var_config(num_layers, embed_dim=hidden_size, num_heads=num_heads, num_classes=num_classes,
                     vocab_size=codebook_size, vae_channels=quant.Cvae, patch_nums=tuple(patch_nums),
                     mlp_ratio=(intermediate_size or 4 * hidden_size) / hidden_size, drop_path_rate=drop_path_rate)
    with torch.random.fork_rng(devices=[]):  # torch's own init draws from the global generator
        var = init_unit_scale(VAR(cfg), seed)
    VARAdapter(var, quant, vae_file=Path(vae_path).resolve()).save(out_dir)
    return out_dir


def build_tiny_from_config(out_dir, model_cfg, *, codebook_size: int, num_classes: int | None = None,
                           tokenizer_dir=None, **_) -> Path:
    """The registry's build_tiny: a VAR of model_cfg's size (num_layers = depth) over the data's classes,
    paired with the VQVAE and scales of the data's var-vqvae tokenizer (tokenizer_dir), so its codes
    are the shards' codes. drop_path_rate: model.var.drop_path_rate, else 0 (see build_tiny_var)."""
    if not num_classes:
        raise ValueError("VAR is class-conditional: the training data has no labels")
    if tokenizer_dir is None:
        raise ValueError("a tiny VAR needs the data's var-vqvae tokenizer (its VQVAE and scales)")
    from cca_ray.tokenizers import load_tokenizer

    tok = load_tokenizer(tokenizer_dir, device="cpu")
    if tok.kind != "var-vqvae":
        raise ValueError(f"model.family=var needs tokenizer.kind=var-vqvae (multi-scale codes); the data at "
                         f"{tokenizer_dir} was tokenized with {tok.kind}")
    dpr = model_cfg.var.drop_path_rate
    return build_tiny_var(out_dir, codebook_size=codebook_size, hidden_size=model_cfg.hidden_size,
                          num_layers=model_cfg.num_layers, num_heads=model_cfg.num_heads,
                          intermediate_size=model_cfg.intermediate_size, num_kv_heads=model_cfg.num_kv_heads,
                          num_classes=num_classes, vae_path=tok.path, patch_nums=tok.scales,
                          drop_path_rate=dpr or 0.0, seed=model_cfg.seed)
