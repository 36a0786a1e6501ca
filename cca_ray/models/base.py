"""The one protocol everything above the models speaks. Only adapters know a family's token layout.

Conditions at the protocol's edge are *raw*: a prompt string for text families
(``condition_kind == "prompt"``: Emu3), a class id for class-conditional ones
(``condition_kind == "label"``: LlamaGen, VAR). ``None`` is the null condition in both
(Emu3 also takes ""), so a CCA+CFG micro-batch can mix real and null rows in one call.

Codes: a family's codes for one image have the shape ``code_shape`` of its image tokenizer:
``(h, w)`` for raster families (Emu3, LlamaGen), ``(680,)`` for VAR's ten scales stored flat.
The trainer, the sampler jobs and the shard schema pass them on as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, Sequence, Union, runtime_checkable

import torch
from torch import nn

RawCondition = Union[str, int, None]


@dataclass
class Cond:
    """A batch of encoded conditions for one image grid.

    input_ids, attention_mask: LongTensor[B, L], left padded, so that every row's
    prefix ends at the same column and image tokens line up across the batch.
    Text families hold prompt token ids; class families hold class ids [B, 1]
    (the null class where the condition is None) with an all-ones mask.
    knob: float Tensor[B], each row's sampling-time knob (λ or β, cca_ray.models.knob) for a
    knob-conditioned model; None: the model's default (or no knob at all).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    grid: tuple[int, int] | None = None
    knob: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> "Cond":
        knob = self.knob.to(device) if self.knob is not None else None
        return Cond(self.input_ids.to(device), self.attention_mask.to(device), self.grid, knob)

    def with_knob(self, knob: torch.Tensor | None) -> "Cond":
        """The same conditions with per-row knob values [B] (None: none)."""
        if knob is not None and tuple(knob.shape) != (len(self),):
            raise ValueError(f"knob values have shape {tuple(knob.shape)}, expected ({len(self)},)")
        return Cond(self.input_ids, self.attention_mask, self.grid,
                    knob.to(self.input_ids.device).float() if knob is not None else None)


@runtime_checkable
class ARVisualModel(Protocol):
    family: str
    condition_kind: Literal["prompt", "label"]
    codebook_size: int
    max_prompt_tokens: int  # longest prompt accepted (class families: 1)
    module: nn.Module  # scores sequences; this is what DeepSpeed wraps
    # module parameter-name prefixes the trainer never updates (e.g. Emu3's VQ-VAE inside the checkpoint)
    frozen_prefixes: tuple[str, ...]
    # width of the condition embedding a knob embedder (cca_ray.models.knob) adds to
    condition_dim: int

    def encode_conditions(self, raw: Sequence[RawCondition], grid: tuple[int, int] | None = None) -> Cond: ...

    def null_condition(self, n: int, grid: tuple[int, int] | None = None) -> Cond: ...

    def condition_length(self, raw: RawCondition) -> int:
        """Prefix tokens a raw condition takes (prompt families: BPE tokens; class families: 1)."""
        ...

    def sequence_logprob(self, cond: Cond, codes: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
        """log p(codes | cond), summed over image tokens in fp32: Tensor[B] (nats). codes: [B, *code_shape].
        `module` is what runs the forward (a DeepSpeed engine wrapping self.module); default self.module."""
        ...

    def generate(
        self,
        cond: Cond,
        *,
        guidance: float = 0.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | Sequence[int] | None = None,
        cca_lambda: float | None = None,
        guidance_beta: float | None = None,
    ) -> torch.Tensor:
        """Sample codes LongTensor[B, *code_shape]; guidance=0 runs one forward per step, no unconditional rows.
        cca_lambda / guidance_beta: the knob of a λ-conditioned / GFT model (cca_ray.models.knob), checked
        against its trained range (ValueError outside it, or for a model without that knob)."""
        ...

    def token_logits(self, cond: Cond, codes: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
        """Teacher-forced visual-slice logits fp32 [B, N, K] at every image token, aligned with
        codes.flatten(1) (what GFT's loss mixes); one pass through `module` like sequence_logprob."""
        ...

    def external_parameters(self) -> list[nn.Parameter]:
        """Parameters self.module reads outside their own submodule's forward (ZeRO-3 must gather them)."""
        ...

    def enable_gradient_checkpointing(self) -> None: ...

    def save(self, path) -> None:
        """A directory `cca_ray.models.load_model(path)` loads back (with a cca_ray.json sidecar naming the family)."""
        ...
