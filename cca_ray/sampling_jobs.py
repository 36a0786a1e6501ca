"""Drawing evaluation images: class-balanced prompt lists, fixed seeds, locally or over Ray.

Kept apart from metric computation (cca_ray/metrics): sampling writes images, metrics read them.
Seeds are per image (``seed + i`` for the i-th prompt of the list), so a set of samples is
the same whether it was drawn by one worker or eight, in batches of 16 or of 100.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm


def balanced_prompts(label_to_prompt: dict[int, str], n: int) -> tuple[list[str], np.ndarray]:
    """n prompts cycling through the classes in label order: ([prompt], labels int64[n])."""
    if not label_to_prompt:
        raise ValueError("balanced_prompts: no classes (the dataset has no labels)")
    labels = sorted(label_to_prompt)
    lab = np.array([labels[i % len(labels)] for i in range(n)], dtype=np.int64)
    return [label_to_prompt[int(c)] for c in lab], lab


@torch.no_grad()
def sample_local(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    guidance: float = 0.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    batch_size: int = 64,
    first_index: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """Sample one image per prompt with an in-process model: uint8 [N, H, W, C].

    Image i uses seed ``seed + first_index + i``.
    """
    grid = tuple(tokenizer.grid)
    out = []
    steps = range(0, len(prompts), batch_size)
    for s in tqdm(steps, desc=f"sampling (guidance {guidance:g})", disable=not progress, leave=False):
        chunk = list(prompts[s : s + batch_size])
        cond = model.encode_conditions(chunk, grid)
        seeds = [seed + first_index + s + i for i in range(len(chunk))]
        codes = model.generate(cond, guidance=guidance, temperature=temperature, top_k=top_k, top_p=top_p, seed=seeds)
        out.append(tokenizer.decode(codes.cpu().numpy().astype(np.int32)))
    return np.concatenate(out) if out else np.zeros((0, tokenizer.image_size, tokenizer.image_size, tokenizer.channels), np.uint8)


def _sample_chunk(model_path: str, tokenizer_dir: str, prompts: list[str], first_index: int, kw: dict) -> np.ndarray:
    from cca_ray.models import load_model
    from cca_ray.tokenizers import load_tokenizer

    model = load_model(model_path)
    model.hf.eval()
    return sample_local(model, load_tokenizer(tokenizer_dir), prompts, first_index=first_index, **kw)


def sample_parallel(
    model_path: str | Path,
    tokenizer_dir: str | Path,
    prompts: Sequence[str],
    *,
    workers: int = 2,
    cpus_per_worker: float = 1.0,
    **kw,
) -> np.ndarray:
    """Split the prompt list over `workers` Ray tasks; same images as sample_local for the same seed."""
    import ray

    if workers <= 1 or len(prompts) < 2:
        return _sample_chunk(str(model_path), str(tokenizer_dir), list(prompts), 0, kw)
    task = ray.remote(num_cpus=cpus_per_worker)(_sample_chunk)
    bounds = np.linspace(0, len(prompts), workers + 1).astype(int)
    refs = [
        task.remote(str(model_path), str(tokenizer_dir), list(prompts[a:b]), int(a), kw)
        for a, b in zip(bounds[:-1], bounds[1:])
        if b > a
    ]
    parts = []
    with tqdm(total=len(refs), desc="sampling workers", leave=False) as bar:
        for r in refs:  # in order: the images line up with the prompts
            parts.append(ray.get(r))
            bar.update(1)
    return np.concatenate(parts)


def image_grid(images: np.ndarray, ncol: int = 10) -> np.ndarray:
    """[N, H, W, C] uint8 -> one [rows*H, ncol*W, C] mosaic (for MLflow artifacts)."""
    n, h, w, c = images.shape
    rows = -(-n // ncol)
    grid = np.zeros((rows * h, ncol * w, c), np.uint8)
    for i, im in enumerate(images):
        r, k = divmod(i, ncol)
        grid[r * h : (r + 1) * h, k * w : (k + 1) * w] = im
    return grid
