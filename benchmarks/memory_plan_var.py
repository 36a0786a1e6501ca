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

from memory_plan_llamagen import GiB, llamagen_plan


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
    """Every VAR preset in one table (the README's)."""
    from cca_ray.config import load_config

    world = nodes * gpus_per_node
    print(f"per-GPU GiB on {nodes} node(s) x {gpus_per_node} GPUs ({int(gpu_gib)} GiB each)\n")
    print("| preset | params | ZeRO | micro-batch x accum | weights+grads+optim | reference | activations | logits "
          "| **total** | same at ZeRO-3 | same, gradient checkpointing flipped |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for cfg in sorted((load_config(n) for n in presets), key=lambda c: c.model.var.depth or 0):
        tc, arch = cfg.train, arch_of_var(cfg)[0]
        rows = llamagen_plan(arch, tc, cfg.model, world=world)
        state = sum(v for k, v in rows.items() if k.split(" (")[0] in ("weights", "gradients", "optimizer"))
        state += rows.get("ZeRO-3 gathered params", 0.0)
        act = sum(v for k, v in rows.items() if k.startswith("activations"))
        z3 = sum(llamagen_plan(arch, tc.model_copy(update={"zero_stage": 3}), cfg.model, world=world).values())
        flip = cfg.model.model_copy(update={"gradient_checkpointing": not cfg.model.gradient_checkpointing})
        other = sum(llamagen_plan(arch, tc, flip, world=world).values())
        total = sum(rows.values())
        print(f"| {cfg.preset} | {arch['total'] / 1e6:.0f}M | {tc.zero_stage} | {tc.micro_batch_size} x {tc.grad_accum} "
              f"| {state / GiB:.1f} | {rows['reference model'] / GiB:.1f} | {act / GiB:.1f} "
              f"| {rows['logits (a + fp32 + log-softmax, + grads)'] / GiB:.1f} | **{total / GiB:.1f}** "
              f"| {z3 / GiB:.1f} | {other / GiB:.1f} ({'on' if flip.gradient_checkpointing else 'off'}) |")


__all__ = ["arch_of_var", "table", "var_params"]
