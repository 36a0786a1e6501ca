"""Sampling speed, side by side in one process on one model.

Default (`--batches 16 64 256`): per batch B, guidance-free vs CFG images/s next to the
in-process ceiling, the time of the same decode loop (prefill + every step through the
decode backend, no sampling) at 2B rows over B rows: CFG runs 2B rows, so no sampler can
beat that ratio, and a sampler that adds no overhead of its own reaches it. Also guidance-free
at 2B images vs CFG at B images: the same KV-cache rows (CFG halves the batch that fits).

With `--vs-generate`, at one batch and per image grid:

  1. cca-ray guidance-free      (B rows, one forward per token)
  2. cca-ray CFG                (2B rows in one batched forward per token)
  3. transformers generate()+CFG (Emu3's documented way: UnbatchedClassifierFreeGuidanceLogitsProcessor
                                  via negative_prompt_ids, and a prefix_allowed_tokens_fn for the layout)

Prints images/s of each and the ratios, per image grid. Random-init weights: speed does not
depend on them.

It also prints a ceiling: the same process times every Linear of the decoder at B and at 2B
rows. Where a decode step is dominated by streaming the weights (small batch, short sequence:
the 8x8 grid at batch 16 on CPU), doubling the rows costs much less than twice as much, so no
sampler can gain the full 2x there; the gain grows with the sequence (KV reads scale with the
rows) and with the batch.

    python benchmarks/sampling.py                       # ~50M-parameter Emu3 (8 layers, hidden 512), batch 16, grids 8 and 16
    python benchmarks/sampling.py --grids 16 --skip-hf  # one grid, our two paths only
    python benchmarks/sampling.py --preset demo         # the demo's tiny model size and grid
    python benchmarks/sampling.py --family llamagen --official-llamagen PATH   # LlamaGen: benchmarks/sampling_llamagen.py
    python benchmarks/sampling.py --family var --official-var PATH             # VAR: benchmarks/sampling_var.py
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, kernels)
    _sync()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync()
    return (time.perf_counter() - t) / repeats


def linear_ceiling(model, rows: int, repeats: int = 3) -> float:
    """Time of one pass over every decoder Linear at 2*rows / at rows (weights streamed as in a step)."""
    lins = [m for m in model.hf.model.text_model.layers.modules() if isinstance(m, torch.nn.Linear)]
    times = []
    with torch.no_grad():
        for r in (rows, 2 * rows):
            xs = {n: torch.randn(r, n) for n in {m.in_features for m in lins}}
            times.append(timed(lambda: [m(xs[m.in_features]) for m in lins], repeats * 10))
    return times[1] / times[0]


def decode_loop_time(model, cond, steps: int, repeats: int) -> float:
    """Seconds of the decoder forwards a sampling run does (prefill + `steps` decode steps), no sampling."""
    from cca_ray.models.emu3.decode import KVBackend

    token = torch.full((len(cond),), model.visual_offset, dtype=torch.long, device=cond.input_ids.device)

    def run():
        backend = KVBackend(model.module, max_new_tokens=steps)
        backend.prefill(cond.input_ids, cond.attention_mask, True)
        for _ in range(steps):
            backend.step(token, True)

    with torch.no_grad():
        return timed(run, repeats)


def batch_table(model, prompts_all, side: int, batches, guidance: float, repeats: int) -> list[tuple]:
    """Rows (B, free img/s, CFG img/s, CFG/free time ratio, ceiling, free@2B img/s)."""
    grid = (side, side)
    steps = side * (side + 1) - 1
    out = []
    for b in batches:
        prompts = (prompts_all * (2 * b // len(prompts_all) + 1))
        cond = model.encode_conditions(prompts[:b], grid)
        both = model.encode_conditions(prompts[:b] + [None] * b, grid)  # CFG's 2B rows, padded as it pads them
        cond2 = model.encode_conditions(prompts[: 2 * b], grid)
        t_free = timed(lambda: model.generate(cond, seed=0), repeats)
        t_cfg = timed(lambda: model.generate(cond, guidance=guidance, seed=0), repeats)
        t_free2 = timed(lambda: model.generate(cond2, seed=0), repeats)
        ceiling = decode_loop_time(model, both, steps, repeats) / decode_loop_time(model, cond, steps, repeats)
        out.append((b, b / t_free, b / t_cfg, t_cfg / t_free, ceiling, 2 * b / t_free2))
        print(f"  batch {b}: guidance-free {b / t_free:.2f} img/s, CFG {b / t_cfg:.2f} img/s", flush=True)
    return out


def hf_generate_cfg(model, prompts, grid, guidance, seed):
    """Emu3's documented CFG generation through transformers' generate()."""
    hf = model.hf
    h, w = grid
    cond = model.encode_conditions(prompts, grid)
    neg = model.null_condition(len(prompts), grid)
    visual = list(range(model.visual_offset, model.visual_offset + model.codebook_size))
    wrapper = model.img_token_id

    def allowed(batch_id, input_ids):
        pos = (input_ids == wrapper).nonzero()[0, 0]
        offset = input_ids.shape[0] - pos
        return [model.eol_id] if offset % (w + 1) == 0 else visual

    torch.manual_seed(seed)
    return hf.generate(
        input_ids=cond.input_ids,
        attention_mask=cond.attention_mask,
        max_new_tokens=h * (w + 1) - 1,
        do_sample=True,
        top_k=0,
        guidance_scale=guidance,
        negative_prompt_ids=neg.input_ids,
        negative_prompt_attention_mask=neg.attention_mask,
        prefix_allowed_tokens_fn=allowed,
        pad_token_id=model.pad_id,
        eos_token_id=None,
    )


def _family(argv):
    """--family emu3 (this module), llamagen or var (benchmarks/sampling_{llamagen,var}.py); the rest of argv."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--family", choices=["emu3", "llamagen", "var"], default="emu3")
    known, rest = pre.parse_known_args(argv)
    return known.family, rest


def main(argv=None) -> None:
    family, rest = _family(argv)
    if family == "var":  # our next-scale sampler vs VAR's autoregressive_infer_cfg on the same weights
        import sampling_var

        raise SystemExit(sampling_var.main(rest))
    if family == "llamagen":  # its own module: our sampler vs LlamaGen's generate() on the same weights
        import sampling_llamagen

        raise SystemExit(sampling_llamagen.main(rest))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help="take model size, codebook and grid from this preset (default: the ~50M model)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--codebook", type=int, default=16384, help="visual codebook size (16384: ~50M LM parameters)")
    p.add_argument("--grids", type=int, nargs="+", default=[8, 16], help="image grid sides (tokens) to time")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-hf", action="store_true", help="skip transformers generate() (slow)")
    p.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256],
                   help="batch sizes of the guidance-free vs CFG table (on --grids' first side)")
    p.add_argument("--vs-generate", action="store_true",
                   help="instead: our paths vs transformers generate() at --batch, per grid (the older table)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   default="bfloat16" if torch.cuda.is_available() else "float32")
    args = p.parse_args(rest)
    if args.threads:
        torch.set_num_threads(args.threads)

    from cca_ray.config import ModelConfig, load_config
    from cca_ray.models import build_tiny_model, load_model

    if args.preset:
        cfg = load_config(args.preset)
        mcfg, codebook = cfg.model, cfg.tokenizer.codebook_size
        grids = [cfg.data.image_size // cfg.tokenizer.patch_size]
    else:
        mcfg = ModelConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads)
        codebook, grids = args.codebook, args.grids
    prompts = [f"a handwritten digit {w}" for w in "zero one two three four five six seven eight nine".split()]
    prompts = (prompts * (args.batch // len(prompts) + 1))[: args.batch]

    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(build_tiny_model(tmp, mcfg, codebook_size=codebook, prompts=prompts),
                           device=args.device if not args.vs_generate else "cpu",
                           dtype=getattr(torch, args.dtype) if not args.vs_generate else torch.float32)
    model.hf.eval()
    n_params = sum(p.numel() for p in model.hf.model.text_model.parameters()) + model.hf.lm_head.weight.numel()
    print(f"model: Emu3 {mcfg.num_layers} layers, hidden {mcfg.hidden_size}, {n_params / 1e6:.1f}M LM params; "
          f"codebook {codebook}; {model.device} {next(model.hf.parameters()).dtype}; threads {torch.get_num_threads()}")
    if not args.vs_generate:
        side = grids[0]
        print(f"grid {side}x{side} ({side * (side + 1)} tokens per image), guidance {args.guidance}, "
              f"{args.repeats} repeats after a warm-up")
        rows = batch_table(model, prompts, side, args.batches, args.guidance, args.repeats)
        print(f"\n{'batch':>5s} {'free img/s':>10s} {'CFG img/s':>9s} {'free/CFG':>8s} {'ceiling':>7s} "
              f"{'of ceiling':>10s} {'free@2B/CFG@B':>13s}")
        for b, free, cfg_, ratio, ceil, free2 in rows:
            print(f"{b:5d} {free:10.2f} {cfg_:9.2f} {ratio:7.2f}x {ceil:6.2f}x {ratio / ceil:9.1%} {free2 / cfg_:12.2f}x")
        print("ceiling: decoder forwards at 2B rows / at B rows; free@2B/CFG@B: images/s at equal KV-cache rows")
        return
    print(f"batch {args.batch}")
    ceiling = linear_ceiling(model, args.batch)
    print(f"ceiling: the decoder's Linears take {ceiling:.2f}x as long at {2 * args.batch} rows as at {args.batch}")

    summary = []
    for side in grids:
        grid = (side, side)
        cond = model.encode_conditions(prompts, grid)
        rows = {}
        rows["cca-ray guidance-free"] = timed(lambda: model.generate(cond, seed=0), args.repeats)
        rows["cca-ray CFG"] = timed(lambda: model.generate(cond, guidance=args.guidance, seed=0), args.repeats)
        if not args.skip_hf:
            rows["transformers generate() CFG"] = timed(
                lambda: hf_generate_cfg(model, prompts, grid, args.guidance, 0), max(1, args.repeats - 1))
        print(f"\ngrid {side}x{side} ({side * (side + 1)} tokens per image)")
        print(f"{'path':32s} {'s/batch':>9s} {'images/s':>9s}")
        for name, sec in rows.items():
            print(f"{name:32s} {sec:9.3f} {args.batch / sec:9.2f}")
        free, cfg_ = rows["cca-ray guidance-free"], rows["cca-ray CFG"]
        hf = rows.get("transformers generate() CFG")
        summary.append((side, cfg_ / free, hf / cfg_ if hf else None))

    print(f"\n{'grid':>6s} {'guidance-free / CFG':>20s} {'cca-ray CFG / generate() CFG':>29s}   (images/s ratios)")
    for side, r1, r2 in summary:
        print(f"{side:>4d}^2 {r1:19.2f}x {(f'{r2:.2f}x' if r2 else '-'):>29s}")


if __name__ == "__main__":
    main()
