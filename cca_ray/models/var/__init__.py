"""VAR (next-scale prediction, arXiv 2404.02905) from its released checkpoints, behind the model protocol.

    from cca_ray.models import load_model
    m = load_model("var_d16.pth", family="var", depth=16, vae_path="vae_ch160v4096z32.pth")
    cond = m.encode_conditions([207, 360, None])          # class ids; None = the null class
    codes = m.generate(cond, guidance=0.0, seed=0)        # LongTensor[3, 680]: ten scales, flat
    logp = m.sequence_logprob(cond, codes)                # [3] fp32, one teacher-forced pass

Files: layout (the scales and the block-causal mask), transformer (the VAR module in the
released layout), quantizer and vqvae (the multi-scale VQVAE), adapter (protocol + next-scale
sampler backend), checkpoint (load / save / tiny random models), tokenizer (``var-vqvae``).
"""

from cca_ray.models.var.adapter import VARAdapter, guidance_per_scale
from cca_ray.models.var.checkpoint import (
    SIDECAR,
    build_tiny_from_config,
    build_tiny_var,
    load_var,
    load_var_module,
    var_config_from_state_dict,
)
from cca_ray.models.var.layout import PATCH_NUMS, ScaleLayout
from cca_ray.models.var.transformer import (
    RELEASED_DEPTHS,
    VAR,
    VARConfig,
    build_var,
    var_config,
)
from cca_ray.models.var.vqvae import (
    VQVAE,
    VQVAEConfig,
    build_tiny_vqvae,
    load_quantizer,
    load_vqvae,
)

__all__ = [
    "PATCH_NUMS", "RELEASED_DEPTHS", "SIDECAR", "ScaleLayout", "VAR", "VARAdapter", "VARConfig", "VQVAE", "VQVAEConfig",
    "build_tiny_from_config", "build_tiny_var", "build_tiny_vqvae", "build_var", "guidance_per_scale", "load_quantizer", "load_var",
    "load_var_module", "load_vqvae", "var_config", "var_config_from_state_dict",
]
