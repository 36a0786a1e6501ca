"""Sampling speed, side by side in one process on one model and batch:

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


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, kernels)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
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
    args = p.parse_args(rest)

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
        model = load_model(build_tiny_model(tmp, mcfg, codebook_size=codebook, prompts=prompts))
    model.hf.eval()
    n_params = sum(p.numel() for p in model.hf.model.text_model.parameters()) + model.hf.lm_head.weight.numel()
    print(f"model: Emu3 {mcfg.num_layers} layers, hidden {mcfg.hidden_size}, {n_params / 1e6:.1f}M LM params; "
          f"codebook {codebook}; batch {args.batch}; threads {torch.get_num_threads()}")
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
