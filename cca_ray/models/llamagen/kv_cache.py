"""Static KV-cache decode backend for cca_ray.sample.decode over a LlamaGenGPT.

Every row of a class-conditional batch has the same layout (one class token, then codes), so
there is no padding and no mask: step t writes its key/value into slot t of buffers sized for
the whole sequence (1 + N - 1 slots) when prefill runs, and attends over slots [0, t]. Nothing
is concatenated or copied per step, and the buffers live in this object, never in the model's
state dict (LlamaGen's own `setup_caches` registers them as module buffers).
"""

from __future__ import annotations

import torch

from cca_ray.models.llamagen.gpt import LlamaGenGPT


class StaticKVBackend:
    """prefill(class ids [R, 1]) then step(codes [R]); both return logits [R, vocab] fp32 (or None)."""

    def __init__(self, gpt: LlamaGenGPT, max_new_tokens: int, knob: torch.Tensor | None = None):
        self.gpt, self.knob = gpt, knob  # knob [R]: a knob model's per-row λ or β
        self.slots = 1 + max_new_tokens  # the class token, then every fed-back code
        if self.slots > gpt.config.cls_token_num + gpt.config.block_size:
            raise ValueError(f"{max_new_tokens} steps exceed the model's {gpt.config.block_size} image positions")

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, need_logits: bool):
        if input_ids.shape[1] != 1 or not bool(attention_mask.all()):
            raise ValueError(f"LlamaGen prefixes are one class id per row with no padding, got {list(input_ids.shape)}")
        gpt, rows = self.gpt, input_ids.shape[0]
        cfg, p = gpt.config, next(gpt.parameters())
        shape = (rows, cfg.kv_heads, self.slots, cfg.head_dim)
        self.keys = [torch.empty(shape, dtype=p.dtype, device=p.device) for _ in gpt.layers]
        self.values = [torch.empty(shape, dtype=p.dtype, device=p.device) for _ in gpt.layers]
        self.rope = gpt.rope(p.device)
        self.t = 0
        return self._forward(gpt.class_token(input_ids[:, 0], self.knob), need_logits)

    def step(self, token_ids: torch.Tensor, need_logits: bool):
        if self.t >= self.slots:
            raise RuntimeError(f"decode ran past the {self.slots - 1} steps the KV cache was sized for")
        return self._forward(self.gpt.tok_embeddings(token_ids).unsqueeze(1), need_logits)

    def _forward(self, x: torch.Tensor, need_logits: bool):
        """x [R, 1, dim] at position self.t -> logits of the next code [R, vocab] fp32."""
        t, rope = self.t, self.rope[self.t : self.t + 1]
        for i, layer in enumerate(self.gpt.layers):
            attn = layer.attention
            q, k, v = attn.project(layer.attention_norm(x), rope)
            self.keys[i][:, :, t : t + 1] = k
            self.values[i][:, :, t : t + 1] = v
            # one query over every cached position: nothing to mask
            x = x + attn.attend(q, self.keys[i][:, :, : t + 1], self.values[i][:, :, : t + 1], causal=False)
            x = x + layer.feed_forward(layer.ffn_norm(x))
        self.t = t + 1
        return self.gpt.output(self.gpt.norm(x[:, -1])).float() if need_logits else None
