"""The DeepSpeed side of one rank: engine configs, the lr schedule, the knob a run trains, process groups.

Pure pieces the recipe (`cca_ray.train.recipe`) reads; kept apart so the recipe reads top to bottom.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from cca_ray.config import TrainConfig
from cca_ray.models import knob as knobs
from cca_ray.workarounds import skip_deepspeed_shm_build


def deepspeed_config(tc: TrainConfig, world_size: int) -> dict:
    """The policy engine's DeepSpeed config. The optimizer is a client torch AdamW (no CPU-Adam build)."""
    return {
        "train_micro_batch_size_per_gpu": tc.micro_batch_size,
        "gradient_accumulation_steps": tc.grad_accum,
        "train_batch_size": tc.micro_batch_size * tc.grad_accum * world_size,
        "gradient_clipping": tc.grad_clip,
        "zero_optimization": {"stage": tc.zero_stage},
        "bf16": {"enabled": tc.bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }


# /proc/cpuinfo flags of CPUs that run bf16 matmuls natively (x86: AVX512-BF16, AMX)
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_flags() -> list[str]:
    """The native-bf16 flags this CPU advertises (empty where it has none, or off Linux)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [f for f in BF16_CPU_FLAGS if f in flags]


def effective_bf16(tc: TrainConfig, use_gpu: bool) -> tuple[bool, str]:
    """Whether this rank trains in bf16, and the one line that says which precision and why.

    train.bf16 is kept on a GPU and on a CPU with native bf16; a CPU without it would emulate every
    bf16 matmul (many times slower than fp32, and DeepSpeed keeps fp32 master weights anyway), so
    there the run trains in fp32 instead of failing. model.dtype (sampling, reference pass, export)
    is not changed: torch runs bf16 inference on any CPU, only slower."""
    if not tc.bf16:
        return False, "precision: fp32 (train.bf16 false)"
    if use_gpu:
        return True, "precision: bf16 (GPU)"
    native = cpu_bf16_flags()
    if native:
        return True, f"precision: bf16 (CPU with native bf16: {', '.join(native)})"
    return False, (f"precision: fp32 fallback: train.bf16 is true but this CPU has no native bf16 "
                   f"({' / '.join(BF16_CPU_FLAGS)} not in /proc/cpuinfo)")


def reference_config(tc: TrainConfig, world_size: int) -> dict:
    """The frozen reference: no optimizer; partitioned like the policy under ZeRO-3, else replicated."""
    return {
        "train_micro_batch_size_per_gpu": tc.micro_batch_size,
        "train_batch_size": tc.micro_batch_size * world_size,
        "zero_optimization": {"stage": 3 if tc.zero_stage == 3 else 0},
        "bf16": {"enabled": tc.bf16},
        "steps_per_print": 2**31 - 1,
    }


def knob_spec(tc: TrainConfig) -> knobs.KnobSpec | None:
    """The knob a run trains the policy to take: β for GFT, λ for λ-conditioned CCA, else none."""
    if tc.objective == "gft":
        return knobs.beta_spec()
    if tc.lam_sampling == "loguniform":
        return knobs.lam_spec(*tc.lam_range, tc.lam)
    return None


def lr_factor(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak lr at 0-based optimizer step `step`: linear warmup, then constant or cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def quiet_deepspeed(use_gpu: bool) -> None:
    """Silence DeepSpeed's INFO chatter; on CPU skip its shared-memory op build (cca_ray.workarounds)."""
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    if not use_gpu:
        skip_deepspeed_shm_build()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now: the master port of a process group on this machine."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_process_group(port: int | None = None, backend: str = "gloo", rank: int = 0, world_size: int = 1) -> None:
    """A process group on this machine (tests, benchmarks): what Ray Train sets up for each worker. One
    process by default; with world_size > 1 each of the spawned processes calls it with its rank and the
    same port."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if port is None:
        if world_size > 1:
            raise ValueError("local_process_group: with world_size > 1 every rank needs the same port")
        port = free_port()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    dist.init_process_group(backend, rank=rank, world_size=world_size)
