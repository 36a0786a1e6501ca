"""Host memory each ZeRO-3 rank needs to load the starting model: loaded whole on each rank vs partitioned.

    python benchmarks/partitioned_load.py                         # a ~200M-parameter Emu3, 2 ranks, bf16 run
    python benchmarks/partitioned_load.py --hidden 2048 --layers 8 --ranks 4

Builds one random-init Emu3 in the real layout (save_pretrained, once with float32 and once with bfloat16
weights), then for each file and mode, in fresh processes (a gloo group of --ranks, as Ray Train sets up),
loads it for a bf16 ZeRO-3 run: `whole` is load_model on every rank and then the ZeRO-3 partitioning
deepspeed.initialize does (zero.Init(module=...)); `partitioned` is cca_ray.train.gathered.load_partitioned
(every rank builds the model under deepspeed.zero.Init, rank 0 alone reads the weights and fills each slice).
Both end with each rank holding its slice. Printed: each rank's peak private (anonymous) host memory while
loading, sampled every 2 ms, and the ratio of the two modes. The file's page cache is shared by the ranks
and not counted: from_pretrained maps a safetensors file, so a file already in the load dtype costs a rank
little either way, while a cast (a float32 file into a bf16 run) materialises the whole model in every rank.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _mem_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class _PeakAnon:
    """The peak of this process's RssAnon (private memory, not file-backed) while the block runs."""

    def __enter__(self):
        import threading

        self.peak, self._stop = _mem_kb("RssAnon"), threading.Event()
        self.base = self.peak

        def poll():
            while not self._stop.wait(0.002):
                self.peak = max(self.peak, _mem_kb("RssAnon"))

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _mem_kb("RssAnon"))
        self.mb = (self.peak - self.base) / 1024


def _rank(rank: int, world: int, port: int, model_dir: str, mode: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    from cca_ray.train.engine import local_process_group

    local_process_group(port, rank=rank, world_size=world)
    import deepspeed  # noqa: F401  (imports first: the baseline holds every library, not the model)
    import transformers  # noqa: F401

    from cca_ray.models import load_model
    from cca_ray.train import gathered
    from cca_ray.train.engine import quiet_deepspeed

    quiet_deepspeed(False)
    with torch.device("meta"):
        load_model(model_dir, dtype=torch.bfloat16, weights=False)  # lazy imports, no memory
    cfg = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": world, "zero_optimization": {"stage": 3},
           "bf16": {"enabled": True}}
    dist.barrier()
    with _PeakAnon() as mem:
        if mode == "whole":
            adapter = load_model(model_dir, dtype=torch.bfloat16)
            deepspeed.zero.Init(module=adapter.module, config_dict_or_path=cfg)  # what deepspeed.initialize does
        else:
            adapter = gathered.load_partitioned(model_dir, {}, dtype=torch.bfloat16, ds_config=cfg, rank=rank)
    held = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in adapter.module.parameters()) / 2**20
    Path(out, f"{mode}-{rank}.json").write_text(json.dumps({"peak_mb": mem.mb, "slice_mb": held}))
    del adapter
    dist.barrier()
    dist.destroy_process_group()


def _run(world: int, model_dir: str, mode: str, out: str) -> list[dict]:
    import torch.multiprocessing as mp

    from cca_ray.train.engine import free_port

    mp.spawn(_rank, args=(world, free_port(), model_dir, mode, out), nprocs=world, join=True)
    return [json.loads(Path(out, f"{mode}-{r}.json").read_text()) for r in range(world)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--codebook", type=int, default=32768)
    ap.add_argument("--ranks", type=int, default=2)
    args = ap.parse_args()

    import torch

    from cca_ray.models import load_model
    from cca_ray.models.emu3 import build_tiny_emu3

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_emu3(Path(tmp) / "model", codebook_size=args.codebook, hidden_size=args.hidden,
                                    num_layers=args.layers, num_heads=args.heads, prompts=["a photo of a cat"])
        n = sum(p.numel() for p in load_model(model_dir).module.parameters())
        size_mb = n * 2 / 2**20
        print(f"Emu3 of {n / 1e6:.0f}M parameters ({size_mb:.0f} MB in bf16), {args.ranks} ranks, a bf16 ZeRO-3 run; "
              "peak private host memory while loading, per rank (each ends holding its slice):")
        print("| weights file | rank | whole (MB) | partitioned (MB) | partitioned / whole | its slice (MB) |")
        print("|---|---|---|---|---|---|")
        for file_dtype in (torch.float32, torch.bfloat16):
            if file_dtype is torch.bfloat16:
                adapter = load_model(model_dir, dtype=torch.bfloat16)
                adapter.hf.save_pretrained(model_dir)  # as Emu3-Gen's released bf16 weights
                del adapter
            whole = _run(args.ranks, str(model_dir), "whole", tmp)
            part = _run(args.ranks, str(model_dir), "partitioned", tmp)
            name = str(file_dtype).removeprefix("torch.")
            for r in range(args.ranks):
                w, p = whole[r]["peak_mb"], part[r]["peak_mb"]
                print(f"| {name} | {r} | {w:.0f} | {p:.0f} | {p / max(w, 1e-9):.2f}x | {part[r]['slice_mb']:.0f} |")
            w, p = sum(x["peak_mb"] for x in whole), sum(x["peak_mb"] for x in part)
            print(f"| {name} | all | {w:.0f} | {p:.0f} | {p / max(w, 1e-9):.2f}x | {size_mb:.0f} |")


if __name__ == "__main__":
    main()
