"""Per-GPU memory of a VAR preset (imported by benchmarks/memory_plan.py for model.family var).

    python benchmarks/memory_plan.py --preset var-d30-a100 --nodes 1        # one preset, by component
    python benchmarks/memory_plan.py --var-table --nodes 1                  # every var-*-a100 preset, one row each

Exact parameter counts come from the VAR built on the meta device at model.var.depth (VAR's builder: width
64 * depth, 4x MLP, 1000 classes + null, 4096 codes, 680 tokens over ten scales). A VAR block is a LayerNorm,
attention and a GELU MLP under AdaLN, so activations take memory_plan_llamagen's per-layer formula with
ffn = 4 * dim and T = 680 teacher-forced positions (its fp32 term over-counts VAR's, which has no fp32 RMSNorm
or RoPE: a margin); the head is the whole 4096-code codebook. The quantiser that builds the teacher-forced
input is a 4096 x 32 codebook and four 3x3 convolutions: negligible. Estimates, not measurements.
"""

from __future__ import annotations

from memory_plan_llamagen import table as llamagen_table


def var_params(depth: int, num_classes: int = 1000, codebook_size: int = 4096) -> dict:
    """The arch dict memory_plan_llamagen's plan reads, for a VAR-d{depth}, counted on the meta device."""
    from cca_ray.models.var import build_var, var_config

    cfg = var_config(depth, num_classes=num_classes, vocab_size=codebook_size)
    model = build_var(cfg, "meta")
    total = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.blocks[0].parameters())
    return {"total": total, "layer": layer, "embed_head": total - depth * layer, "dim": cfg.embed_dim,
            "ffn": round(cfg.embed_dim * cfg.mlp_ratio), "n_layer": depth, "tokens": cfg.layout.num_tokens,
            "vocab": codebook_size}


def arch_of_var(cfg) -> tuple[dict, str]:
    if cfg.model.var.depth is None:
        raise SystemExit(f"preset {cfg.preset}: set model.var.depth")
    return var_params(cfg.model.var.depth), f"VAR-d{cfg.model.var.depth}, counted on the meta device"


def table(presets: list[str], *, nodes: int, gpus_per_node: int, gpu_gib: float) -> None:
    """Every VAR preset in one table (the README's): memory_plan_llamagen's table over VAR's arch."""
    llamagen_table(presets, nodes=nodes, gpus_per_node=gpus_per_node, gpu_gib=gpu_gib, arch_of=arch_of_var)


__all__ = ["arch_of_var", "table", "var_params"]
