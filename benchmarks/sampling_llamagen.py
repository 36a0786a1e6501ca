"""LlamaGen sampling speed: cca-ray's sampler vs LlamaGen's own `generate()`, in one process, on the
same random weights (benchmarks/sampling.py --family llamagen dispatches here):

  1. cca-ray guidance-free   B rows, one forward per token, static KV cache sized [0, t] per step
  2. cca-ray CFG             2B rows in one batched forward per token (our guidance g = cfg_scale - 1)
  3. official, cfg_scale 1   LlamaGen's generate(): caches sized for the whole sequence, masked attention
  4. official, cfg_scale s   its batched CFG (the conditional and null-class rows concatenated)

The official model is built as LlamaGen's sample_c2i.py builds it (GPT_models[--gpt-model]) from a local
clone of FoundationVision/LlamaGen whose path you give; its weights are redrawn at unit scale (its init
zeroes the head), saved in the released {"model": state_dict} layout, and our adapter loads that file.
Before timing, greedy (top-k 1) codes of both are compared on two rows. Sampling settings are LlamaGen's
FID ones: temperature 1, no top-k / top-p. Paths run interleaved, `--repeats` times each; the median is
reported.

    python benchmarks/sampling.py --family llamagen --official-llamagen ~/src/LlamaGen
    python benchmarks/sampling.py --family llamagen --official-llamagen PATH --gpt-model GPT-L --image-size 384
    python benchmarks/sampling.py --family llamagen --official-llamagen PATH --threads 1 --repeats 2   # busy CPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _official(path: Path):
    """(GPT_models, generate) from a LlamaGen clone, or None with a message when it is absent."""
    if not (path / "autoregressive" / "models" / "generate.py").is_file():
        print(f"official LlamaGen code not found under {path} (expected autoregressive/models/generate.py): "
              "skipping the comparison. Clone github.com/FoundationVision/LlamaGen and pass --official-llamagen PATH.")
        return None
    sys.path.insert(0, str(path))
    from autoregressive.models.generate import generate
    from autoregressive.models.gpt import GPT_models

    return GPT_models, generate


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(paths: dict, repeats: int, device) -> dict[str, float]:
    """Median seconds per call of each path; the paths take turns, so a busy machine slows every path alike."""
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def print_vs_official(sec: dict[str, float], batch: int, repeats: int, title: str = "") -> None:
    """images/s of the four paths (ours guidance-free, ours CFG, official guidance-free, official CFG, in
    that order) and their ratios. Shared with benchmarks/sampling_var.py."""
    print(f"\n{title + chr(10) if title else ''}{'path':40s} {'s/batch':>9s} {'images/s':>9s}   (median of {repeats})")
    for name, s in sec.items():
        print(f"{name:40s} {s:9.3f} {batch / s:9.2f}")
    n = list(sec)
    print(f"  guidance-free / CFG (ours):         {sec[n[1]] / sec[n[0]]:.2f}x images/s")
    print(f"  ours / official, guidance-free:     {sec[n[2]] / sec[n[0]]:.2f}x images/s")
    print(f"  ours / official, CFG:               {sec[n[3]] / sec[n[1]]:.2f}x images/s")
    print(f"  ours guidance-free / official CFG:  {sec[n[3]] / sec[n[0]]:.2f}x images/s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official-llamagen", type=Path, help="local clone of FoundationVision/LlamaGen")
    p.add_argument("--gpt-model", default="GPT-B")
    p.add_argument("--image-size", type=int, default=256, help="256 (16x16 codes) or 384 (24x24)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cfg-scale", type=float, default=2.0, help="LlamaGen's cfg_scale (ours: guidance = cfg_scale - 1)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads (default torch's; on a busy shared CPU 1 is far "
                   "steadier: idle-spinning OpenMP threads measured 12x slower matmuls there)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.official_llamagen is None:
        print("no --official-llamagen PATH given: skipping the LlamaGen comparison")
        return 0
    official_code = _official(args.official_llamagen.expanduser().resolve())
    if official_code is None:
        return 0
    GPT_models, official_generate = official_code

    from cca_ray.models import load_model
    from cca_ray.models.llamagen import redraw_weights

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_grad_enabled(False)
    n = (args.image_size // 16) ** 2
    official = GPT_models[args.gpt_model](vocab_size=16384, block_size=n, num_classes=1000, cls_token_num=1,
                                          model_type="c2i").eval()
    redraw_weights(official, torch.Generator().manual_seed(args.seed))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"c2i_{args.gpt_model}_{args.image_size}.pt"
        torch.save({"model": official.state_dict()}, path)
        ours = load_model(path, family="llamagen", gpt_model=args.gpt_model, image_size=args.image_size, device=device)
    official.to(device)
    params = sum(t.numel() for t in ours.module.parameters())
    print(f"model: LlamaGen {args.gpt_model} ({params / 1e6:.0f}M), {args.image_size} px = {n} codes per image; "
          f"batch {args.batch}; cfg_scale {args.cfg_scale} (our guidance {args.cfg_scale - 1:g}); device {device}, "
          f"threads {torch.get_num_threads()}")

    labels = torch.randint(0, 1000, (args.batch,), generator=torch.Generator().manual_seed(args.seed + 1))
    cond = ours.encode_conditions(labels.tolist())
    g = args.cfg_scale - 1.0
    few = labels[:2].to(device)
    same = torch.equal(
        official_generate(official, few, n, cfg_scale=args.cfg_scale, temperature=1.0, top_k=1, top_p=1.0).long(),
        ours.generate(ours.encode_conditions(few.tolist()), guidance=g, top_k=1).flatten(1))
    print(f"greedy codes identical (2 rows, CFG): {same}")

    paths = {
        "cca-ray guidance-free": lambda: ours.generate(cond, seed=0),
        "cca-ray CFG": lambda: ours.generate(cond, guidance=g, seed=0),
        "official generate(), cfg_scale 1": lambda: official_generate(
            official, labels.to(device), n, cfg_scale=1.0, temperature=1.0, top_k=0, top_p=1.0),
        f"official generate(), cfg_scale {args.cfg_scale:g}": lambda: official_generate(
            official, labels.to(device), n, cfg_scale=args.cfg_scale, temperature=1.0, top_k=0, top_p=1.0),
    }
    sec = interleaved_medians(paths, args.repeats, device)
    print_vs_official(sec, args.batch, args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
