"""Image tokenizers: images uint8 [N, H, W, C] <-> code grids int32 [N, gh, gw].

    tok = build_tokenizer(cfg.tokenizer, image_size=cfg.data.image_size, channels=cfg.data.channels)
    tok.fit(train_images)            # k-means only (tok.needs_fit)
    tok.save(dir); tok = load_tokenizer(dir)
    codes = tok.encode(images); images = tok.decode(codes)
    tok.codebook_size, tok.grid, tok.identity()

TOKENIZERS maps tokenizer.kind to its class (the config's choices).
"""

from __future__ import annotations

from pathlib import Path

from cca_ray.tokenizers.base import META_FILE, ImageTokenizer, read_meta
from cca_ray.tokenizers.emu3_vqvae import Emu3VQVAETokenizer
from cca_ray.tokenizers.kmeans import KMeansPatchTokenizer

TOKENIZERS: dict[str, type[ImageTokenizer]] = {
    "kmeans": KMeansPatchTokenizer,
    "emu3-vqvae": Emu3VQVAETokenizer,
}


def build_tokenizer(tok_cfg, image_size: int, channels: int, device: str | None = None) -> ImageTokenizer:
    """A new tokenizer from a TokenizerConfig (k-means still needs fit())."""
    return TOKENIZERS[tok_cfg.kind].from_config(tok_cfg, image_size, channels, device=device)


def load_tokenizer(path: str | Path, device: str | None = None) -> ImageTokenizer:
    """A tokenizer saved by `tok.save(path)` (e.g. <data_dir>/tokenizer)."""
    path = Path(path)
    meta = read_meta(path)
    if meta.get("kind") not in TOKENIZERS:
        raise ValueError(f"{path / META_FILE}: unknown tokenizer kind {meta.get('kind')!r}; known: {', '.join(TOKENIZERS)}")
    return TOKENIZERS[meta["kind"]].load(path, meta, device=device)


__all__ = ["TOKENIZERS", "ImageTokenizer", "KMeansPatchTokenizer", "Emu3VQVAETokenizer", "build_tokenizer", "load_tokenizer"]
