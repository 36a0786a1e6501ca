"""Sampling speed, side by side in one process on one model and batch:

  1. cca-ray guidance-free      (B rows, one forward per token)
  2. cca-ray CFG                (2B rows in one batched forward per token)
  3. transformers generate()+CFG (Emu3's documented way: UnbatchedClassifierFreeGuidanceLogitsProcessor
                                  via negative_prompt_ids, and a prefix_allowed_tokens_fn for the layout)

Prints images/s of each and the ratios. Random-init weights: speed does not depend on them.

    python benchmarks/sampling.py                       # ~50M-parameter Emu3 (8 layers, hidden 512), batch 16
    python benchmarks/sampling.py --preset demo         # the demo's tiny model size and grid
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


def hf_generate_cfg(model, prompts, grid, guidance, seed):
    """Emu3's documented CFG generation through transformers' generate()."""
    tok, hf = model.tokenizer, model.hf
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help="take model size, codebook and grid from this preset (default: the ~50M model)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--codebook", type=int, default=4096)
    p.add_argument("--grid", type=int, default=8, help="image grid side (tokens)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-hf", action="store_true", help="skip transformers generate() (slow)")
    args = p.parse_args(argv)

    from cca_ray.config import ModelConfig, load_config
    from cca_ray.models import build_tiny_model, load_model

    if args.preset:
        cfg = load_config(args.preset)
        mcfg, codebook = cfg.model, cfg.tokenizer.codebook_size
        side = cfg.data.image_size // cfg.tokenizer.patch_size
    else:
        mcfg = ModelConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads)
        codebook, side = args.codebook, args.grid
    grid = (side, side)
    torch.set_num_threads(torch.get_num_threads())
    prompts = [f"a handwritten digit {w}" for w in "zero one two three four five six seven eight nine".split()]
    prompts = (prompts * (args.batch // len(prompts) + 1))[: args.batch]

    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(build_tiny_model(tmp, mcfg, codebook, prompts))
    model.hf.eval()
    n_params = sum(p.numel() for p in model.hf.model.text_model.parameters()) + model.hf.lm_head.weight.numel()
    cond = model.encode_conditions(prompts, grid)
    print(f"model: Emu3 {mcfg.num_layers} layers, hidden {mcfg.hidden_size}, {n_params / 1e6:.1f}M LM params; "
          f"codebook {codebook}; grid {grid[0]}x{grid[1]}; batch {args.batch}; threads {torch.get_num_threads()}")

    rows = {}
    rows["cca-ray guidance-free"] = timed(lambda: model.generate(cond, seed=0), args.repeats)
    rows["cca-ray CFG"] = timed(lambda: model.generate(cond, guidance=args.guidance, seed=0), args.repeats)
    if not args.skip_hf:
        rows["transformers generate() CFG"] = timed(
            lambda: hf_generate_cfg(model, prompts, grid, args.guidance, 0), max(1, args.repeats - 1))

    print(f"\n{'path':32s} {'s/batch':>9s} {'images/s':>9s}")
    for name, sec in rows.items():
        print(f"{name:32s} {sec:9.3f} {args.batch / sec:9.2f}")
    free, cfg_ = rows["cca-ray guidance-free"], rows["cca-ray CFG"]
    print(f"\nguidance-free / CFG images/s:               {cfg_ / free:.2f}x")
    if "transformers generate() CFG" in rows:
        print(f"cca-ray CFG / transformers generate() CFG:   {rows['transformers generate() CFG'] / cfg_:.2f}x")


if __name__ == "__main__":
    main()
