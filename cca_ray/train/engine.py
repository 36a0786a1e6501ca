"""The DeepSpeed side of one rank: engine configs, the lr schedule, the knob a run trains, process groups.

Pure pieces the recipe (`cca_ray.train.recipe`) reads; kept apart so the recipe reads top to bottom.
"""

from __future__ import annotations

import logging
import math
import os

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


def local_process_group(port: int | None = None, backend: str = "gloo") -> None:
    """A one-process group (tests, benchmarks): what Ray Train sets up for each worker."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group(backend, rank=0, world_size=1)
