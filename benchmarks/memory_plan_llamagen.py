"""Per-GPU memory of a LlamaGen preset (imported by benchmarks/memory_plan.py for model.family llamagen).

    python benchmarks/memory_plan.py --preset llamagen-l-a100 --nodes 1       # one preset, by component
    python benchmarks/memory_plan.py --llamagen-table --nodes 1               # every LlamaGen preset, one row each

Exact parameter counts come from the GPT built on the meta device (cca_ray.models.llamagen.expected_shapes)
for model.llamagen.gpt_model at model.llamagen.image_size. Bytes per trainable parameter follow DeepSpeed's
layout with a client AdamW, as in memory_plan.py's `plan`. Activations, per forward of R sequences of
T = N positions (the class token + N - 1 codes; N = (image_size / 16)^2, 576 at 384 px), R = 2 x
micro_batch_size pairs (a positive and its negative per pair):

    per layer kept for backward  R*T*((10*dim + 4*ffn) * a + 8*dim * 4)   a = 2 (bf16) or 4 (fp32);
                                 the second term: RMSNorm and RoPE run in fp32 (LlamaGen's math)
    with gradient checkpointing  every layer keeps its input R*T*dim*a, one layer is recomputed at a time
    the head                     logits [R, T, 16384] in a, their fp32 cast and fp32 log-softmax (kept),
                                 plus the fp32/a gradients: R*T*V*(a + 4 + 4 + 4)

The head is the whole codebook (no slice to take). An online reference is a frozen copy of the weights
(partitioned under ZeRO-3) that keeps no activations. Estimates, not measurements: keep ~10-15% headroom.
"""

from __future__ import annotations

import math

GiB = 2**30


def llamagen_params(gpt_model: str, image_size: int, num_classes: int = 1000, codebook_size: int = 16384) -> dict:
    """{"total", "layer", "embed_head", "dim", "ffn", "n_layer", "tokens"} of a LlamaGen GPT, counted on meta."""
    from cca_ray.models.llamagen import expected_shapes, gpt_config

    cfg = gpt_config(gpt_model, image_size=image_size, num_classes=num_classes, codebook_size=codebook_size)
    shapes = expected_shapes(cfg)
    numel = {k: math.prod(s) for k, s in shapes.items()}
    layer = sum(v for k, v in numel.items() if k.startswith("layers.0."))
    return {"total": sum(numel.values()), "layer": layer, "embed_head": sum(numel.values()) - cfg.n_layer * layer,
            "dim": cfg.dim, "ffn": cfg.ffn_hidden, "n_layer": cfg.n_layer, "tokens": cfg.block_size,
            "vocab": cfg.vocab_size}


def llamagen_plan(arch: dict, tc, model_cfg, *, world: int, overhead_gib: float = 2.5) -> dict[str, float]:
    """Bytes per GPU by component for a LlamaGen GPT (arch from llamagen_params) under TrainConfig tc."""
    p, z, w_bytes = arch["total"], tc.zero_stage, 2 if tc.bf16 else 4
    out = {
        "weights (trainable)": p * w_bytes / (world if z == 3 else 1),
        "gradients": p * w_bytes / (world if z >= 2 else 1),
        "optimizer (master + Adam m, v)": p * ((4 if tc.bf16 else 0) + 8) / (world if z >= 1 else 1),
    }
    online = tc.reference == "online" and tc.objective in ("cca", "cca_cfg", "dpo")
    out["reference model"] = p * w_bytes / (world if z == 3 else 1) if online else 0.0
    if z == 3:  # gathered at once: embeddings and head, the current and the prefetched layer
        out["ZeRO-3 gathered params"] = (arch["embed_head"] + 2 * arch["layer"]) * w_bytes
    rows = 2 * tc.micro_batch_size if tc.objective != "sft" else tc.micro_batch_size
    t, dim, a = arch["tokens"], arch["dim"], w_bytes
    layer_ws = rows * t * ((10 * dim + 4 * arch["ffn"]) * a + 8 * dim * 4)
    if model_cfg.gradient_checkpointing:
        out["activations (checkpointed layer inputs)"] = arch["n_layer"] * rows * t * dim * a
        out["activations (one layer recomputed)"] = layer_ws
    else:
        out["activations (all layers)"] = arch["n_layer"] * layer_ws
    out["logits (a + fp32 + log-softmax, + grads)"] = rows * t * arch["vocab"] * (a + 4 + 4 + 4)
    out["CUDA context, NCCL, workspace"] = overhead_gib * GiB
    return out


def arch_of_llamagen(cfg) -> tuple[dict, str]:
    o = cfg.model.llamagen
    if o.gpt_model is None or o.image_size is None:
        raise SystemExit(f"preset {cfg.preset}: set model.llamagen.gpt_model and model.llamagen.image_size")
    arch = llamagen_params(o.gpt_model, o.image_size, o.num_classes or 1000, o.codebook_size or 16384)
    return arch, f"{o.gpt_model} at {o.image_size} px, counted on the meta device"


def report(cfg, *, nodes: int, gpus_per_node: int, gpu_gib: float, arch_fn=None) -> None:
    """One preset: the component table, then totals by node count (same global batch).
    arch_fn(cfg) -> (arch, source): another family of the same block shape (memory_plan_var.py)."""
    tc = cfg.train
    arch, src = (arch_fn or arch_of_llamagen)(cfg)
    world = nodes * gpus_per_node
    print(f"preset {cfg.preset}: {arch['total'] / 1e6:.0f}M trainable parameters ({src}); "
          f"{arch['tokens']} image tokens")
    print(f"{world} ranks, ZeRO-{tc.zero_stage}, {'bf16' if tc.bf16 else 'fp32'}, gradient checkpointing "
          f"{cfg.model.gradient_checkpointing}, reference {tc.reference}; micro-batch {tc.micro_batch_size} pairs x "
          f"grad_accum {tc.grad_accum} x {world} = {tc.micro_batch_size * tc.grad_accum * world} pairs per step\n")
    rows = llamagen_plan(arch, tc, cfg.model, world=world)
    total = sum(rows.values())
    print(f"| {'per GPU':48s} | {'GiB':>7s} |\n|{'-' * 50}|{'-' * 9}|")
    for k, v in rows.items():
        print(f"| {k:48s} | {v / GiB:7.2f} |")
    print(f"| {'**total**':48s} | {total / GiB:7.2f} |")
    print(f"| {'headroom on a ' + str(int(gpu_gib)) + ' GiB GPU':48s} | {gpu_gib - total / GiB:7.2f} |")


def table(presets: list[str], *, nodes: int, gpus_per_node: int, gpu_gib: float, arch_of=None) -> None:
    """Every preset in one table (the README's), smallest model first: the preset's own plan, and two
    alternatives. arch_of(cfg) -> (arch, ...): arch_of_llamagen by default; VAR passes arch_of_var."""
    from cca_ray.config import load_config

    world = nodes * gpus_per_node
    print(f"per-GPU GiB on {nodes} node(s) x {gpus_per_node} GPUs ({int(gpu_gib)} GiB each)\n")
    print("| preset | params | ZeRO | micro-batch x accum | weights+grads+optim | reference | activations | logits "
          "| **total** | same at ZeRO-3 | same, gradient checkpointing flipped |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    arch_of = arch_of or arch_of_llamagen
    cfgs = sorted((load_config(name) for name in presets), key=lambda c: (arch_of(c)[0]["total"], c.preset))
    for cfg in cfgs:
        name, tc, arch = cfg.preset, cfg.train, arch_of(cfg)[0]
        rows = llamagen_plan(arch, tc, cfg.model, world=world)
        state = sum(v for k, v in rows.items() if k.split(" (")[0] in ("weights", "gradients", "optimizer"))
        state += rows.get("ZeRO-3 gathered params", 0.0)
        act = sum(v for k, v in rows.items() if k.startswith("activations"))
        z3 = sum(llamagen_plan(arch, tc.model_copy(update={"zero_stage": 3}), cfg.model, world=world).values())
        flip = cfg.model.model_copy(update={"gradient_checkpointing": not cfg.model.gradient_checkpointing})
        other = sum(llamagen_plan(arch, tc, flip, world=world).values())
        total = sum(rows.values())
        print(f"| {name} | {arch['total'] / 1e6:.0f}M | {tc.zero_stage} | {tc.micro_batch_size} x {tc.grad_accum} "
              f"| {state / GiB:.1f} | {rows['reference model'] / GiB:.1f} | {act / GiB:.1f} "
              f"| {rows['logits (a + fp32 + log-softmax, + grads)'] / GiB:.1f} | **{total / GiB:.1f}** "
              f"| {z3 / GiB:.1f} | {other / GiB:.1f} ({'on' if flip.gradient_checkpointing else 'off'}) |")
