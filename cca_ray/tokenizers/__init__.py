"""Image tokenizers: images uint8 [N, H, W, C] <-> codes int32 [N, *code_shape] ((gh, gw) for raster grids).

    tok = build_tokenizer(cfg.tokenizer, image_size=cfg.data.image_size, channels=cfg.data.channels)
    tok.fit(train_images)            # k-means only (tok.needs_fit)
    tok.save(dir); tok = load_tokenizer(dir)
    codes = tok.encode(images); images = tok.decode(codes)
    tok.codebook_size, tok.grid, tok.identity()

Family-free tokenizers live here (the demo's k-means patch VQ); a model family's own VQ model
lives in its folder under cca_ray/models/. TOKENIZERS maps tokenizer.kind to "module:Class",
imported on first use (so naming one kind never imports another family's code).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from cca_ray.tokenizers.base import META_FILE, ImageTokenizer, read_meta

TOKENIZERS: dict[str, str] = {
    "kmeans": "cca_ray.tokenizers.kmeans:KMeansPatchTokenizer",
    "emu3-vqvae": "cca_ray.models.emu3.vqvae:Emu3VQVAETokenizer",
    "llamagen-vq": "cca_ray.models.llamagen.vq_tokenizer:LlamaGenVQTokenizer",  # VQ-16: codes [N, h, w]
    "var-vqvae": "cca_ray.models.var.tokenizer:VARVQVAETokenizer",  # codes [N, 680]: VAR's ten scales, flat
}


def tokenizer_class(kind: str) -> type[ImageTokenizer]:
    if kind not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; known: {', '.join(TOKENIZERS)}")
    module, name = TOKENIZERS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def build_tokenizer(tok_cfg, image_size: int, channels: int, device: str | None = None) -> ImageTokenizer:
    """A new tokenizer from a TokenizerConfig (k-means still needs fit())."""
    return tokenizer_class(tok_cfg.kind).from_config(tok_cfg, image_size, channels, device=device)


def load_tokenizer(path: str | Path, device: str | None = None) -> ImageTokenizer:
    """A tokenizer saved by `tok.save(path)` (e.g. <data_dir>/tokenizer)."""
    path = Path(path)
    meta = read_meta(path)
    if meta.get("kind") not in TOKENIZERS:
        raise ValueError(f"{path / META_FILE}: unknown tokenizer kind {meta.get('kind')!r}; known: {', '.join(TOKENIZERS)}")
    return tokenizer_class(meta["kind"]).load(path, meta, device=device)


__all__ = ["TOKENIZERS", "ImageTokenizer", "build_tokenizer", "load_tokenizer", "tokenizer_class"]
