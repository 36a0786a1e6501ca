"""Emu3 (text-to-image, transformers' Emu3ForConditionalGeneration).

    adapter.py  the token layout, the visual-slice scorer DeepSpeed wraps, sampling, loading
    decode.py   the decode backend: a preallocated KV cache over transformers' weights
    build.py    a tiny random-init Emu3 in the real layout (tests and the demo)
    vqvae.py    Emu3's VQ-VAE as an image tokenizer (kind emu3-vqvae), from a local checkpoint
"""

from cca_ray.models.emu3.adapter import SIDECAR, Emu3Adapter, load_emu3
from cca_ray.models.emu3.build import build_tiny_emu3, build_tiny_from_config

__all__ = ["SIDECAR", "Emu3Adapter", "build_tiny_emu3", "build_tiny_from_config", "load_emu3"]
