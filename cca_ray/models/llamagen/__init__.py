"""LlamaGen (class-conditional, arXiv 2406.06525) from its released .pt files: the GPT, its
static-KV-cache sampler backend and the VQ-16 image tokenizer.

    adapter = load_model("c2i_L_384.pt", family="llamagen", gpt_model="GPT-L", image_size=384)
    tok = LlamaGenVQTokenizer("vq_ds16_c2i.pt", image_size=384, channels=3)

GPT_MODELS holds LlamaGen's --gpt-model names (the CLI choices).
"""

from cca_ray.models.llamagen.adapter import (
    SIDECAR,
    LlamaGenAdapter,
    build_tiny_from_config,
    build_tiny_llamagen,
    expected_shapes,
    gpt_config,
    load_llamagen,
    redraw_weights,
)
from cca_ray.models.llamagen.gpt import GPT_MODELS, GPTConfig, LlamaGenGPT
from cca_ray.models.llamagen.vq_tokenizer import (
    LlamaGenVQTokenizer,
    build_tiny_vq,
    load_vq,
)

__all__ = [
    "GPT_MODELS",
    "SIDECAR",
    "GPTConfig",
    "LlamaGenAdapter",
    "LlamaGenGPT",
    "LlamaGenVQTokenizer",
    "build_tiny_from_config",
    "build_tiny_llamagen",
    "build_tiny_vq",
    "expected_shapes",
    "gpt_config",
    "load_llamagen",
    "load_vq",
    "redraw_weights",
]
