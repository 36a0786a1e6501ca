"""Emu3's decode backend for cca_ray.sample.decode: a lean decode step over transformers' weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class KVBackend:
    """Decode backend for cca_ray.sample.decode: prefill through the transformers text model,
    then one token per step through a lean loop over the same weights with a preallocated
    KV cache.

    Why not the transformers forward for the steps: at decode time a step is a handful of
    [rows, hidden] matmuls, and the per-call overhead (mask construction, DynamicCache
    concatenation that copies the whole cache every step, kwargs plumbing) costs as much as
    the matmuls on CPU and does not grow with the rows, which hides most of what dropping
    the unconditional branch saves. Here each step writes its K/V into a buffer sized for
    the whole sequence and attends over a view of it. The numbers are the transformers
    forward's (tests compare both), as long as the model is a plain Emu3/Llama decoder.
    """

    def __init__(self, scorer, max_new_tokens: int, knob=None):
        from transformers.models.emu3.modeling_emu3 import apply_rotary_pos_emb

        self.rope = apply_rotary_pos_emb  # the transformers forward's own RoPE
        self.scorer = scorer
        self.text_model = scorer.hf.model.text_model
        self.max_new = max_new_tokens
        self.knob = knob  # [rows] knob values of a knob model (the prefix carries its embedding)

    def prefill(self, input_ids, attention_mask, need_logits):
        out = self.text_model(
            **self.scorer.text_inputs(input_ids, attention_mask, input_ids.shape[1], self.knob),
            attention_mask=attention_mask,
            position_ids=(attention_mask.cumsum(-1) - 1).clamp_(min=0),
            use_cache=True,
        )
        rows, length = input_ids.shape
        total = length + self.max_new
        self.keys, self.values = [], []
        # the output's cache is `cache` in transformers 5.24+ (reading `past_key_values` warns there), before that
        # `past_key_values`; either is a Cache with per-layer `.layers` (4.56+)
        cache = out["cache"] if "cache" in out else out.past_key_values
        for layer in cache.layers:
            for src, dst in ((layer.keys, self.keys), (layer.values, self.values)):
                buf = src.new_empty(rows, src.shape[1], total, src.shape[3])
                buf[:, :, :length] = src
                dst.append(buf)
        self.allow = torch.ones(rows, 1, 1, total, dtype=torch.bool, device=input_ids.device)
        self.allow[:, 0, 0, :length] = attention_mask.bool()  # left padding stays masked
        self.pos = attention_mask.sum(-1) - 1  # position id of each row's last token
        self.t = length  # next free slot in the buffers
        h = out.last_hidden_state[:, -1]
        return self.scorer.visual_logits(h) if need_logits else None

    def step(self, token_ids, need_logits):
        tm, t = self.text_model, self.t
        if t >= self.allow.shape[-1]:
            raise RuntimeError(f"decode ran past the {self.max_new} steps the KV cache was sized for")
        self.pos = self.pos + 1
        x = tm.embed_tokens(token_ids.unsqueeze(-1))  # [R, 1, H]
        rows = x.shape[0]
        cos, sin = tm.rotary_emb(x, self.pos.unsqueeze(-1))  # [R, 1, d]
        allow = self.allow[..., : t + 1]
        for i, layer in enumerate(tm.layers):
            attn = layer.self_attn
            d = attn.head_dim
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(rows, 1, -1, d).transpose(1, 2)
            k = attn.k_proj(h).view(rows, 1, -1, d).transpose(1, 2)
            q, k = self.rope(q, k, cos, sin)
            self.keys[i][:, :, t : t + 1] = k
            self.values[i][:, :, t : t + 1] = attn.v_proj(h).view(rows, 1, -1, d).transpose(1, 2)
            o = F.scaled_dot_product_attention(
                q, self.keys[i][:, :, : t + 1], self.values[i][:, :, : t + 1], attn_mask=allow,
                scale=attn.scaling, enable_gqa=attn.num_key_value_groups > 1,
            )
            x = x + attn.o_proj(o.transpose(1, 2).reshape(rows, 1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        self.t = t + 1
        return self.scorer.visual_logits(tm.norm(x[:, -1])) if need_logits else None


