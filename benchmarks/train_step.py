"""Training-step cost of the trainer's objectives, side by side in one run on the same images:

  sft           B sequences: one forward + backward (the pretraining step)
  cca-precomp   2B sequences ([pos; neg] conditions, the images twice) in one forward + backward;
                ref_logp_pos/neg read from columns, no reference model loaded
  cca-online    the same, plus a no-grad forward of the 2B sequences through the frozen reference engine

Each variant is the real `cca_ray.train.Trainer.step_once` on a DeepSpeed engine (ZeRO-2, one-rank
process group). Step times are measured interleaved (sft, cca-precomp, cca-online, sft, ...) so that
load on the machine hits all three alike; the median is reported. Peak memory is measured per variant
in its own subprocess over its first 3 steps (so optimizer state is included): on CPU the peak resident
set (sampled every 2 ms) above the resident set of the loaded engines, and the total peak; on GPU the
same from torch.cuda.max_memory_allocated.

    python benchmarks/train_step.py                        # demo model (hidden 128, 4 layers), 7x7 grid, batch 32
    python benchmarks/train_step.py --hidden 512 --layers 8 --batch 16
    python benchmarks/train_step.py --set model.num_heads=16 data.image_size=256 ...   # any config field
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

VARIANTS = {"sft": ("sft", "online"), "cca-precomp": ("cca", "precomputed"), "cca-online": ("cca", "online")}
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def setup(args, model_dir: Path, variants):
    from cca_ray.config import load_config
    from cca_ray.models import build_tiny_model, load_model
    from cca_ray.train.batches import TrainRows
    from cca_ray.train.recipe import Trainer, local_process_group

    cfg = load_config(args.preset, overrides=[f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}",
                                              *args.set])
    grid = (cfg.data.image_size // cfg.tokenizer.patch_size,) * 2
    prompts = [f"a handwritten digit {w}" for w in WORDS]
    if not (model_dir / "config.json").exists():
        build_tiny_model(model_dir, cfg.model, codebook_size=cfg.tokenizer.codebook_size, prompts=prompts)
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 10, args.batch)
    neg = (lab + rng.integers(1, 10, args.batch)) % 10
    data = TrainRows(codes=rng.integers(0, cfg.tokenizer.codebook_size, (args.batch, *grid)).astype(np.int32),
                     cond=[prompts[i] for i in lab], neg_cond=[prompts[i] for i in neg],
                     pos_null=np.zeros(args.batch, bool), neg_null=np.zeros(args.batch, bool), source="synthetic")
    base = load_model(model_dir)  # the reference pass, as the data stage runs it
    with torch.no_grad():
        codes = torch.from_numpy(data.codes).long()
        data.ref_logp_pos = base.sequence_logprob(base.encode_conditions(data.cond, grid), codes).numpy()
        data.ref_logp_neg = base.sequence_logprob(base.encode_conditions(data.neg_cond, grid), codes).numpy()
    del base
    local_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    trainers = {}
    for name in variants:
        objective, reference = VARIANTS[name]
        c = cfg.model_copy(deep=True)
        c.train = c.train.model_copy(update={
            "objective": objective, "reference": reference, "micro_batch_size": args.batch, "grad_accum": 1, "lr": 1e-5,
            "schedule": "constant", "warmup_steps": 0, "zero_stage": args.zero_stage, "bf16": args.bf16, "max_steps": None})
        trainers[name] = Trainer(c, "train", model_dir=model_dir, data=data).setup()
    return trainers, grid


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_memory(args, model_dir: Path) -> dict:
    """One variant in this process: peak memory of its first `args.steps` steps (optimizer state included)
    above what the loaded engines hold."""
    trainers, _ = setup(args, model_dir, [args.only])
    tr = trainers[args.only]
    sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(args.steps):
            tr.step_once()
        sync()
        peak = torch.cuda.max_memory_allocated()
        return {"peak_bytes": peak, "step_bytes": peak - before, "kind": "cuda allocated"}
    before, peak, stop = rss(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    t = threading.Thread(target=sample)
    t.start()
    for _ in range(args.steps):
        tr.step_once()
    stop.set()
    t.join()
    return {"peak_bytes": peak[0], "step_bytes": peak[0] - before, "kind": "CPU resident set"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo", help="model/grid/codebook from this preset (default demo)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=32, help="images (pairs) per step")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3])
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (grid, heads, codebook)")
    p.add_argument("--only", choices=list(VARIANTS), help=argparse.SUPPRESS)  # memory subprocess
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    if args.only:
        print("RESULT " + json.dumps(measure_memory(args, Path(args.model_dir))), flush=True)
        return

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        trainers, grid = setup(args, model_dir, list(VARIANTS))
        n_params = sum(p.numel() for p in trainers["sft"].engine.module.parameters() if p.requires_grad)
        times = {k: [] for k in VARIANTS}
        for tr in trainers.values():  # warm-up: optimizer state, allocator
            tr.step_once()
        for _ in range(args.steps):
            for name, tr in trainers.items():
                sync()
                t = time.perf_counter()
                tr.step_once()
                sync()
                times[name].append(time.perf_counter() - t)
        del trainers
        memory = {}
        for name in VARIANTS:
            cmd = [sys.executable, __file__, "--only", name, "--model-dir", str(model_dir), "--steps", "3",
                   *[f"--{k}={v}" for k, v in (("preset", args.preset), ("hidden", args.hidden),
                                                ("layers", args.layers), ("batch", args.batch),
                                                ("zero-stage", args.zero_stage))]]
            cmd += ["--bf16"] if args.bf16 else []
            cmd += ["--set", *args.set] if args.set else []
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            memory[name] = json.loads(out.split("RESULT ", 1)[1])

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\ntrain step on {device}: {n_params / 1e6:.2f}M trainable parameters, {args.batch} images of "
          f"{grid[0]}x{grid[1]} codes, ZeRO-{args.zero_stage}, {'bf16' if args.bf16 else 'fp32'}, "
          f"median of {args.steps} interleaved steps")
    kind = next(iter(memory.values()))["kind"]
    print(f"{'variant':13s} {'ms/step':>9s} {'x sft':>7s} {'step peak MiB':>14s} {'x sft':>7s} {'total peak MiB':>15s}"
          f"   ({kind})")
    sft_t, sft_m = statistics.median(times["sft"]), memory["sft"]["step_bytes"]
    for name in VARIANTS:
        t, m = statistics.median(times[name]), memory[name]
        print(f"{name:13s} {t * 1e3:9.1f} {t / sft_t:7.2f} {m['step_bytes'] / 2**20:14.1f} "
              f"{m['step_bytes'] / max(sft_m, 1):7.2f} {m['peak_bytes'] / 2**20:15.1f}")
    ratio = statistics.median(times["cca-precomp"]) / sft_t
    print(f"\ntarget: cca-precomp <= 2.2x sft -> {ratio:.2f}x ({'met' if ratio <= 2.2 else 'NOT met'})")


if __name__ == "__main__":
    main()
