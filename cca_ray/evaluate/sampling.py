"""Drawing evaluation images: class-balanced condition lists, fixed seeds, locally or over Ray.

Kept apart from metric computation (fidelity.py): sampling writes images, metrics read them.
Seeds are per image (``seed + i`` for the i-th condition of the list), so a set of samples is
the same whether it was drawn by one worker or eight, in batches of 16 or of 100. Conditions are
raw (cca_ray.models.base): the class's prompt for text families, the class id for class families.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm


def balanced_conditions(label_to_prompt: dict[int, str], n: int, condition_kind: str = "prompt",
                        first: int = 0) -> tuple[list, np.ndarray]:
    """n conditions cycling through the classes in label order, starting at image `first`:
    (raw conditions: the class prompts, or the class ids for condition_kind "label"; labels int64[n])."""
    if not label_to_prompt:
        raise ValueError("balanced_conditions: no classes (the dataset has no labels)")
    labels = sorted(label_to_prompt)
    lab = np.array([labels[(first + i) % len(labels)] for i in range(n)], dtype=np.int64)
    conds = [label_to_prompt[int(c)] for c in lab] if condition_kind == "prompt" else [int(c) for c in lab]
    return conds, lab


@torch.no_grad()
def sample_local(
    model,
    tokenizer,
    conds: Sequence,
    *,
    guidance: float = 0.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    batch_size: int = 64,
    first_index: int = 0,
    progress: bool = False,
    cca_lambda: float | None = None,
    guidance_beta: float | None = None,
    cfg_schedule: str | None = None,
) -> np.ndarray:
    """Sample one image per raw condition with an in-process model: uint8 [N, H, W, C].

    Image i uses seed ``seed + first_index + i``. cca_lambda / guidance_beta: the knob of a
    λ-conditioned CCA / GFT model (cca_ray.models.knob); None: its default. cfg_schedule
    (sample.cfg_schedule) reaches the families whose sampler has one (VAR's guidance per scale).
    """
    extra = {"cfg_schedule": cfg_schedule} if cfg_schedule and getattr(model, "has_cfg_schedule", False) else {}
    grid = tuple(tokenizer.grid)
    out = []
    steps = range(0, len(conds), batch_size)
    for s in tqdm(steps, desc=f"sampling (guidance {guidance:g})", disable=None if progress else True, leave=False):
        chunk = list(conds[s : s + batch_size])
        cond = model.encode_conditions(chunk, grid)
        seeds = [seed + first_index + s + i for i in range(len(chunk))]
        knobs = {k: v for k, v in (("cca_lambda", cca_lambda), ("guidance_beta", guidance_beta)) if v is not None}
        codes = model.generate(cond, guidance=guidance, temperature=temperature, top_k=top_k, top_p=top_p, seed=seeds,
                               **knobs, **extra)
        out.append(tokenizer.decode(codes.cpu().numpy().astype(np.int32)))
    return np.concatenate(out) if out else np.zeros((0, tokenizer.image_size, tokenizer.image_size, tokenizer.channels), np.uint8)


def _sample_chunk(model_path: str, tokenizer_dir: str, conds: list, first_index: int, kw: dict,
                  load_options: dict | None = None, device: str = "cpu", dtype: str = "float32") -> np.ndarray:
    from cca_ray.models import load_model
    from cca_ray.tokenizers import load_tokenizer

    model = load_model(model_path, **(load_options or {}), device=device, dtype=dtype)
    model.module.eval()
    return sample_local(model, load_tokenizer(tokenizer_dir), conds, first_index=first_index, **kw)


def sample_parallel(
    model_path: str | Path,
    tokenizer_dir: str | Path,
    conds: Sequence,
    *,
    workers: int = 2,
    cpus_per_worker: float = 1.0,
    load_options: dict | None = None,
    task_gpus: float | None = None,
    dtype: str = "float32",
    **kw,
) -> np.ndarray:
    """Split the condition list over `workers` Ray tasks; same images as sample_local for the same seed.
    load_options: load_model's options for model_path (cca_ray.models.loader_options; a released file needs them).
    task_gpus: None samples one chunk in this process; a number always uses Ray tasks, each holding that many
    GPUs (0: CPU tasks), for a caller that must not load the model itself (a training rank: the FID proxy).
    dtype: what the model is loaded in ("bfloat16" halves a real-scale model's memory and runs GPU matmuls in bf16)."""
    import ray

    if task_gpus is None and (workers <= 1 or len(conds) < 2):
        return _sample_chunk(str(model_path), str(tokenizer_dir), list(conds), 0, kw, load_options, dtype=dtype)
    device = "cuda" if task_gpus else "cpu"
    workers = max(1, min(workers, len(conds)))
    # "DEFAULT": never inside the caller's placement group; from a Train worker (the FID proxy) that group's
    # bundles hold exactly the workers' own CPUs, so a task there could never be scheduled
    task = ray.remote(num_cpus=cpus_per_worker, num_gpus=task_gpus or 0, scheduling_strategy="DEFAULT")(_sample_chunk)
    bounds = np.linspace(0, len(conds), workers + 1).astype(int)
    refs = [
        task.remote(str(model_path), str(tokenizer_dir), list(conds[a:b]), int(a), kw, load_options, device, dtype)
        for a, b in zip(bounds[:-1], bounds[1:])
        if b > a
    ]
    parts = []
    with tqdm(total=len(refs), desc="sampling workers", leave=False, disable=None) as bar:  # None: off a terminal
        for r in refs:  # in order: the images line up with the conditions
            parts.append(ray.get(r))
            bar.update(1)
    return np.concatenate(parts)
