"""Per-GPU memory of a training config: parameters, gradients, optimizer state, activations.

    python benchmarks/memory_plan.py --preset emu3-gen-a100 --nodes 4      # the README table
    python benchmarks/memory_plan.py --preset emu3-gen-a100 --nodes 2 --gpus-per-node 8 --gpu-gib 80

The architecture comes from `model.path/config.json` when that checkpoint is readable here, else
from Emu3-Gen's published shape (for presets whose model.path is Emu3-Gen), else from the preset's
tiny `model.*` sizes. Bytes per trainable parameter, as DeepSpeed lays them out with a client AdamW:

    weights   2 (bf16) or 4 (fp32)         / world under ZeRO-3
    gradients 2 (bf16) or 4 (fp32)         / world under ZeRO-2 and 3
    optimizer 4 (fp32 master, bf16 only) + 8 (Adam m, v)   / world under ZeRO-1, 2, 3

Activations: the trainer feeds one forward of 2 * micro_batch_size sequences (positives and their
negatives). With gradient checkpointing each layer keeps its bf16 input, and one layer at a time is
recomputed in backward; the visual-slice head forms [rows, image tokens, codebook] logits in bf16,
casts them to fp32 and keeps the fp32 log-softmax for backward. Only the codebook's rows of lm_head
train (the visual-only head, cca_ray.models.emu3.adapter.Emu3Scorer); its text rows are frozen
weights without gradients or Adam state. ZeRO-3 also holds gathered parameters: the embedding, the
visual head and the current plus prefetched layer. Estimates, not measurements: keep
~10-15% headroom for allocator fragmentation.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

GiB = 2**30

# Emu3-Gen-hf text model (BAAI/Emu3-Gen, Llama-style) and its VQ-VAE
EMU3_GEN = {"hidden": 4096, "layers": 32, "heads": 32, "kv_heads": 8, "intermediate": 14336, "vocab": 184622, "frozen": 0.27e9}


@dataclass
class Arch:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    frozen: float  # parameters never trained (the VQ-VAE)

    @property
    def layer_params(self) -> int:
        kv = self.hidden * self.hidden * self.kv_heads // self.heads
        return 2 * self.hidden * self.hidden + 2 * kv + 3 * self.hidden * self.intermediate + 2 * self.hidden

    def trainable(self, codebook: int) -> int:
        """Trained parameters: layers, embedding, the visual-only head (codebook rows of lm_head), final norm."""
        return self.layers * self.layer_params + (self.vocab + codebook) * self.hidden + self.hidden

    def frozen_head(self, codebook: int) -> int:
        return (self.vocab - codebook) * self.hidden


def arch_of(cfg) -> tuple[Arch, str]:
    m = cfg.model
    if m.path and (Path(m.path) / "config.json").exists():
        c = json.loads((Path(m.path) / "config.json").read_text())
        t = c.get("text_config", c)
        return Arch(t["hidden_size"], t["num_hidden_layers"], t["num_attention_heads"],
                    t.get("num_key_value_heads", t["num_attention_heads"]), t["intermediate_size"], t["vocab_size"],
                    EMU3_GEN["frozen"]), f"{m.path}/config.json"
    if m.path and "emu3" in m.path.lower():
        return Arch(**EMU3_GEN), "Emu3-Gen published shape (model.path not readable here)"
    vocab = 400 + 16 + cfg.tokenizer.codebook_size
    return Arch(m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads or m.num_heads,
                m.intermediate_size or 4 * m.hidden_size, vocab, 0.0), "preset model.* (tiny random-init)"


def plan(arch: Arch, tc, model_cfg, *, world: int, image_tokens: tuple[int, int], prompt_tokens: int,
         codebook: int, overhead_gib: float = 2.5) -> dict[str, float]:
    """Bytes per GPU by component. image_tokens = grid (h, w); sequence = prompt + prefix + h*(w+1)."""
    p, z = arch.trainable(codebook), tc.zero_stage
    w_bytes = 2 if tc.bf16 else 4
    out = {}
    out["weights (trainable)"] = p * w_bytes / (world if z == 3 else 1)
    out["weights (frozen VQ-VAE, lm_head text rows)"] = ((arch.frozen + arch.frozen_head(codebook)) * w_bytes
                                                         / (world if z == 3 else 1))
    out["gradients"] = p * w_bytes / (world if z >= 2 else 1)
    out["optimizer (master + Adam m, v)"] = p * ((4 if tc.bf16 else 0) + 8) / (world if z >= 1 else 1)
    ref = tc.reference == "online" and tc.objective in ("cca", "cca_cfg", "dpo")
    whole = p + arch.frozen + arch.frozen_head(codebook)
    out["reference model"] = whole * w_bytes / (world if z == 3 else 1) if ref else 0.0
    if z == 3:  # gathered at once: embedding, visual head, current + prefetched layer
        out["ZeRO-3 gathered params"] = ((arch.vocab + codebook) * arch.hidden + 2 * arch.layer_params) * w_bytes
    h, w = image_tokens
    rows = 2 * tc.micro_batch_size if tc.objective != "sft" else tc.micro_batch_size
    seq = prompt_tokens + 8 + h * (w + 1)
    a = 2 if tc.bf16 else 4
    hidden_bytes = rows * seq * arch.hidden * a
    # one layer's working set: norms, q/k/v/o, attention out (SDPA: no T^2), MLP gate/up/act/down
    layer_ws = rows * seq * (10 * arch.hidden + 4 * arch.intermediate) * a
    if model_cfg.gradient_checkpointing:
        out["activations (checkpointed layer inputs)"] = arch.layers * hidden_bytes
        out["activations (one layer recomputed)"] = layer_ws
    else:
        out["activations (all layers)"] = arch.layers * layer_ws
    logits = rows * h * w * codebook
    out["visual-slice logits (bf16 + fp32 + log-softmax, + grads)"] = logits * (a + 4 + 4 + 4)
    out["CUDA context, NCCL, workspace"] = overhead_gib * GiB
    return out


def main() -> None:
    from cca_ray.config import load_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="emu3-gen-a100")
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--gpu-gib", type=float, default=80.0)
    ap.add_argument("--global-batch", type=int, default=256, help="pairs per optimizer step to keep")
    ap.add_argument("--llamagen-table", action="store_true", help="every llamagen-*-a100 preset in one table")
    ap.add_argument("--var-table", action="store_true", help="every var-*-a100 preset in one table")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. train.zero_stage=2")
    args = ap.parse_args()
    if args.llamagen_table:
        import memory_plan_llamagen as lg
        from cca_ray.config import available_presets

        names = [p for p in available_presets() if p.startswith("llamagen-") and p.endswith("-a100")]
        return lg.table(names, nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_gib=args.gpu_gib)
    if args.var_table:
        import memory_plan_var as mv
        from cca_ray.config import available_presets

        names = [p for p in available_presets() if p.startswith("var-") and p.endswith("-a100")]
        return mv.table(names, nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_gib=args.gpu_gib)
    cfg = load_config(args.preset, overrides=args.overrides)
    if cfg.model.family == "var":  # VAR's shapes: benchmarks/memory_plan_var.py
        import memory_plan_llamagen as lg
        import memory_plan_var as mv

        return lg.report(cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_gib=args.gpu_gib,
                         arch_fn=mv.arch_of_var)
    if cfg.model.family == "llamagen":  # LlamaGen's shapes: benchmarks/memory_plan_llamagen.py
        import memory_plan_llamagen as lg

        return lg.report(cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_gib=args.gpu_gib)
    tc, arch_src = cfg.train, None
    arch, arch_src = arch_of(cfg)
    world = args.nodes * args.gpus_per_node
    grid = (cfg.data.image_size // cfg.tokenizer.patch_size,) * 2
    accum = max(1, args.global_batch // (world * tc.micro_batch_size))
    kw = {"world": world, "image_tokens": grid, "prompt_tokens": cfg.model.max_prompt_tokens,
              "codebook": cfg.tokenizer.codebook_size}

    cb = cfg.tokenizer.codebook_size
    print(f"preset {args.preset}: {arch.trainable(cb) / 1e9:.2f}B trainable + "
          f"{(arch.frozen + arch.frozen_head(cb)) / 1e9:.2f}B frozen parameters (VQ-VAE, lm_head text rows) ({arch_src})")
    print(f"{args.nodes} node(s) x {args.gpus_per_node} GPUs = {world} ranks, ZeRO-{tc.zero_stage}, "
          f"{'bf16' if tc.bf16 else 'fp32'}, gradient checkpointing {cfg.model.gradient_checkpointing}, "
          f"reference {tc.reference}; {grid[0]}x{grid[1]} image tokens + <= {cfg.model.max_prompt_tokens} prompt tokens")
    print(f"micro-batch {tc.micro_batch_size} pair(s) = {2 * tc.micro_batch_size} sequences per forward; "
          f"grad_accum {accum} -> global batch {world * tc.micro_batch_size * accum} pairs\n")
    rows = plan(arch, tc, cfg.model, **kw)
    total = sum(rows.values())
    print(f"| {'per GPU':58s} | {'GiB':>7s} |")
    print(f"|{'-' * 60}|{'-' * 9}|")
    for k, v in rows.items():
        print(f"| {k:58s} | {v / GiB:7.2f} |")
    print(f"| {'**total**':58s} | {total / GiB:7.2f} |")
    print(f"| {'headroom on a ' + str(int(args.gpu_gib)) + ' GiB GPU':58s} | {args.gpu_gib - total / GiB:7.2f} |")

    print("\ntotal GiB per GPU by node count (same global batch):")
    print(f"| {'nodes':>5s} | {'ZeRO-2':>7s} | {'ZeRO-3':>7s} | {'ZeRO-3, online ref':>18s} | {'ZeRO-3, no grad ckpt':>20s} |")
    print(f"|{'-' * 7}|{'-' * 9}|{'-' * 9}|{'-' * 20}|{'-' * 22}|")
    for nodes in (1, 2, 4, 8):
        kw["world"] = nodes * args.gpus_per_node
        cols = []
        for stage, ref, ckpt in ((2, tc.reference, True), (3, tc.reference, True), (3, "online", True),
                                 (3, tc.reference, False)):
            t = tc.model_copy(update={"zero_stage": stage, "reference": ref})
            m = cfg.model.model_copy(update={"gradient_checkpointing": ckpt})
            cols.append(sum(plan(arch, t, m, **kw).values()) / GiB)
        print(f"| {nodes:5d} | {cols[0]:7.1f} | {cols[1]:7.1f} | {cols[2]:18.1f} | {cols[3]:20.1f} |")


if __name__ == "__main__":
    main()
