"""Emu3 adapter: transformers' Emu3ForConditionalGeneration behind the ARVisualModel protocol.

Token layout of one text-to-image sequence (Emu3-Gen):

    BOS  prompt  <|image start|>  "h*w"  <|image token|>
    v v v ... v EOL   (h rows of w visual tokens, each row ended by EOL = <|extra_200|>)
    EOF <|image end|> EOS

Visual code k is token ``visual_offset + k``. log p(image | prompt) is the sum over the h*w
visual positions only, of log-softmax over the *visual slice* of the LM head: the EOL/EOF
tokens are forced by the layout and carry no information, and the sampler draws from the
same slice, so policy, reference and sampler share one convention. Full-vocabulary logits
are never formed over the image (for Emu3-Gen the visual slice is 32,768 of 184,622 ids).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cca_ray.models import knob as knobs
from cca_ray.models.base import Cond
from cca_ray.models.emu3.decode import KVBackend
from cca_ray.sample import SampleOutput, decode

BOS, EOS, EOL, EOF = "<|extra_203|>", "<|extra_204|>", "<|extra_200|>", "<|extra_201|>"
IMG_START, IMG_END, IMG_TOKEN, IMAGE = "<|image start|>", "<|image end|>", "<|image token|>", "<image>"
PAD = "<|endoftext|>"
SPECIALS = [PAD, EOL, EOF, BOS, EOS, IMG_START, IMG_END, IMG_TOKEN, IMAGE]
SIDECAR = "cca_ray.json"  # our facts about a checkpoint: family, codebook size, prompt limit
# Parameters the trainer never updates: the VQ-VAE inside the checkpoint (images are tokenized already).
FROZEN_PREFIXES = ("hf.model.vqmodel.",)


def visual_token(k: int) -> str:
    return f"<|visual token {k:06d}|>"


def _gathered(param: nn.Parameter):
    """The whole of `param` inside the block: a ZeRO-3 partition is gathered on every rank (collective)."""
    if not hasattr(param, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([param])


class Emu3Scorer(nn.Module):
    """log p(codes | prompt) for a teacher-forced batch: the module DeepSpeed wraps.

    Visual-only head (what the trainer uses, :meth:`split_visual_head`): the K visual rows of
    ``lm_head.weight`` become their own trainable parameter ``visual_head`` [K, H] and lm_head is
    frozen. Every log-prob here is a log-softmax over the visual slice only, so the other rows
    (151,854 of Emu3-Gen's 184,622) never enter training: no gradient, no Adam state, no ZeRO-3
    gather of the 756M-parameter head per forward. The numbers are unchanged bit for bit (same
    rows, same product). Loading a state dict that holds ``visual_head`` into an unsplit module
    writes those rows back into lm_head (the export). Without the split, the trainer registers
    ``hf.lm_head.weight`` as a ZeRO-3 external parameter, since the product reads it directly.
    """

    def __init__(self, hf: nn.Module, visual_offset: int, codebook_size: int):
        super().__init__()
        self.hf = hf
        self.visual_offset = visual_offset
        self.codebook_size = codebook_size
        self.visual_head: nn.Parameter | None = None

    def _visual_rows(self) -> slice:
        return slice(self.visual_offset, self.visual_offset + self.codebook_size)

    def visual_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> logits over the visual slice [..., K]."""
        w = self.visual_head if self.visual_head is not None else self.hf.lm_head.weight[self._visual_rows()]
        return F.linear(hidden, w)

    def split_visual_head(self) -> bool:
        """Make the visual rows the only trainable part of the head; False (nothing done) when lm_head
        is tied to the input embeddings, whose every row is trained."""
        head = self.hf.lm_head.weight
        if self.visual_head is not None:
            return True
        if head is self.hf.get_input_embeddings().weight:
            return False
        with _gathered(head):  # a ZeRO-3 partition (partitioned loading): every rank gathers the rows
            self.visual_head = nn.Parameter(head.detach()[self._visual_rows()].clone(), requires_grad=head.requires_grad)
        head.requires_grad_(False)
        return True

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        state = dict(state_dict)
        if self.visual_head is None and "visual_head" in state:  # a visual-only-head run into the full layout
            vh = state.pop("visual_head")
            head = state.get("hf.lm_head.weight", self.hf.lm_head.weight).detach().clone()
            head[self._visual_rows()] = vh.to(head.dtype)
            state["hf.lm_head.weight"] = head
        return super().load_state_dict(state, strict=strict, assign=assign)

    def text_inputs(self, input_ids, attention_mask, prefix_len: int, knob=None) -> dict:
        """The text model's token inputs: input_ids, or (a knob model) inputs_embeds whose first
        prefix_len positions, the condition's prefix, carry the knob embedding (pad positions excepted)."""
        offset = knobs.embedding(self, knob, input_ids.shape[0])
        if offset is None:
            return {"input_ids": input_ids}
        x = self.hf.model.text_model.embed_tokens(input_ids)
        where = torch.zeros_like(attention_mask, dtype=x.dtype)
        where[:, :prefix_len] = attention_mask[:, :prefix_len].to(x.dtype)
        return {"inputs_embeds": x + where.unsqueeze(-1) * offset.to(x.dtype).unsqueeze(1)}

    def forward(self, input_ids, attention_mask, position_ids, target_pos, targets, knob=None,
                return_logits: bool = False) -> torch.Tensor:
        """input_ids/attention_mask/position_ids [B, T]; target_pos [N] (shared by all rows, the
        positions whose *next* token is visual; the first is the prefix's last); targets [B, N] codes;
        knob [B] (knob models). Returns Tensor[B] float32, or the logits [B, N, K] with return_logits."""
        prefix_len = int(target_pos[0]) + 1 if knobs.spec_of(self) is not None else 0  # no device sync otherwise
        h = self.hf.model.text_model(
            **self.text_inputs(input_ids, attention_mask, prefix_len, knob),
            attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        logits = self.visual_logits(h[:, target_pos]).float()  # [B, N, K]
        if return_logits:
            return logits
        logp = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return logp.sum(-1)


class Emu3Adapter:
    """ARVisualModel over a local Emu3ForConditionalGeneration checkpoint."""

    family = "emu3"
    condition_kind = "prompt"
    frozen_prefixes = FROZEN_PREFIXES

    def __init__(self, hf: nn.Module, tokenizer, *, max_prompt_tokens: int = 256):
        self.hf = hf
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
        self.pad_id = ids[PAD] if ids[PAD] is not None else 0
        self.bos_id, self.eol_id, self.eof_id = ids[BOS], ids[EOL], ids[EOF]
        self.img_start_id, self.img_token_id = ids[IMG_START], ids[IMG_TOKEN]
        vocab = hf.config.vocabulary_map or tokenizer.get_vocab()
        visual = sorted(v for k, v in vocab.items() if k.startswith("<|visual token"))
        self.codebook_size = len(visual)
        self.visual_offset = visual[0]
        if visual != list(range(self.visual_offset, self.visual_offset + self.codebook_size)):
            raise ValueError("Emu3 checkpoint: visual token ids are not contiguous; the visual-slice head needs them to be")
        self.module = Emu3Scorer(hf, self.visual_offset, self.codebook_size)
        self.condition_dim = int(hf.model.text_model.embed_tokens.embedding_dim)

    # -- conditions ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    def _prefix(self, prompt_ids: list[int], grid: tuple[int, int]) -> list[int]:
        size = self.tokenizer.encode(f"{grid[0]}*{grid[1]}", add_special_tokens=False)
        return [self.bos_id, *prompt_ids, self.img_start_id, *size, self.img_token_id]

    def encode_conditions(self, raw: Sequence[str | None], grid: tuple[int, int] | None = None) -> Cond:
        """Prompts -> left-padded prefixes. None or "" is the null condition (CFG / CCA+CFG)."""
        if grid is None:
            raise ValueError("Emu3 conditions name the image grid in their prefix: pass grid=(h, w)")
        rows = []
        for i, prompt in enumerate(raw):
            prompt = "" if prompt is None else prompt
            if not isinstance(prompt, str):
                raise ValueError(f"prompt {i}: expected a string, got {type(prompt).__name__}")
            ids = self.tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
            if len(ids) > self.max_prompt_tokens:
                raise ValueError(
                    f"prompt {i} is {len(ids)} tokens long; this model accepts at most {self.max_prompt_tokens}"
                )
            rows.append(self._prefix(ids, grid))
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
        return Cond(input_ids, mask, tuple(grid)).to(self.device)

    def null_condition(self, n: int, grid: tuple[int, int] | None = None) -> Cond:
        return self.encode_conditions([None] * n, grid)

    def condition_length(self, raw: str | None) -> int:
        return len(self.tokenizer.encode(raw, add_special_tokens=False)) if raw else 0

    # -- what the trainer needs to know ---------------------------------------------------
    def external_parameters(self) -> list[nn.Parameter]:
        # the visual-slice head reads lm_head.weight without calling lm_head's forward (split: it owns its rows)
        return [] if self.module.visual_head is not None else [self.hf.lm_head.weight]

    def train_visual_head_only(self) -> bool:
        """The trainer's hook: only the visual rows of the head are trained (Emu3Scorer.split_visual_head)."""
        return self.module.split_visual_head()

    def enable_gradient_checkpointing(self) -> None:
        self.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # -- scoring ------------------------------------------------------------------------
    def scoring_inputs(self, cond: Cond, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        """Teacher-forced inputs for Emu3Scorer.forward. codes: LongTensor[B, h, w]."""
        b, h, w = codes.shape
        if (h, w) != tuple(cond.grid):
            raise ValueError(f"codes grid {(h, w)} does not match the condition grid {tuple(cond.grid)}")
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise ValueError(f"codes must lie in [0, {self.codebook_size}); got [{int(codes.min())}, {int(codes.max())}]")
        dev = cond.input_ids.device
        codes = codes.to(dev).long()
        body = torch.cat([codes + self.visual_offset, torch.full((b, h, 1), self.eol_id, device=dev)], -1)
        body = body.reshape(b, h * (w + 1))[:, :-1]  # the last EOL predicts nothing visual
        input_ids = torch.cat([cond.input_ids, body], 1)
        mask = torch.cat([cond.attention_mask, torch.ones_like(body)], 1)
        j = torch.arange(h * (w + 1) - 1, device=dev)
        j = j[(j % (w + 1)) != w]  # body indices of visual tokens
        return dict(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp_(min=0),
            target_pos=cond.input_ids.shape[1] - 1 + j,
            targets=codes.reshape(b, h * w),
            **({"knob": cond.knob} if cond.knob is not None else {}),
        )

    def sequence_logprob(self, cond: Cond, codes: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
        return (module or self.module)(**self.scoring_inputs(cond, codes))

    def token_logits(self, cond: Cond, codes: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
        return (module or self.module)(**self.scoring_inputs(cond, codes), return_logits=True)

    # -- sampling -----------------------------------------------------------------------
    def schedule(self, grid: tuple[int, int]) -> list[int]:
        h, w = grid
        return ([-1] * w + [self.eol_id]) * h  # the trailing EOL is never fed: decode stops at the last code

    @torch.no_grad()
    def sample(
        self,
        cond: Cond,
        *,
        guidance: float = 0.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | Sequence[int] | None = None,
        return_dists: bool = False,
        cca_lambda: float | None = None,
        guidance_beta: float | None = None,
    ) -> SampleOutput:
        h, w = cond.grid
        sched = self.schedule(cond.grid)[:-1]
        unc = self.null_condition(len(cond), cond.grid) if guidance != 0.0 else None
        knob = knobs.decode_values(self.module, len(cond), unc is not None, cca_lambda=cca_lambda,
                                   guidance_beta=guidance_beta, device=self.device)
        out = decode(
            KVBackend(self.module, max_new_tokens=len(sched), knob=knob),
            cond.input_ids,
            cond.attention_mask,
            sched,
            self.visual_offset,
            uncond_ids=unc.input_ids if unc is not None else None,
            uncond_mask=unc.attention_mask if unc is not None else None,
            guidance_scale=guidance,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            return_dists=return_dists,
        )
        out.codes = out.codes.view(len(cond), h, w)
        return out

    def generate(self, cond: Cond, **kw) -> torch.Tensor:
        was_training = self.hf.training
        self.hf.eval()
        try:
            return self.sample(cond, **kw).codes
        finally:
            self.hf.train(was_training)

    @torch.no_grad()
    def decode_images(self, codes: torch.Tensor) -> torch.Tensor:
        """Code grids [B, h, w] -> images through the checkpoint's own VQ-VAE (float, [-1, 1])."""
        return self.hf.model.vqmodel.decode(codes.to(self.device))

    # -- persistence --------------------------------------------------------------------
    def save(self, path) -> None:
        path = Path(path)
        self.hf.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        knobs.save(self.module, path)
        (path / SIDECAR).write_text(
            json.dumps({"family": self.family, "codebook_size": self.codebook_size, "max_prompt_tokens": self.max_prompt_tokens})
        )


def disable_dropout(model: nn.Module) -> None:
    """CCA needs Δ = 0 exactly at step 0: no dropout anywhere (attention dropout is a float attr)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if hasattr(m, "attention_dropout") and isinstance(m.attention_dropout, float):
            m.attention_dropout = 0.0
    cfg = getattr(model.config, "text_config", None)
    if cfg is not None:
        cfg.attention_dropout = 0.0


def load_emu3(path, *, device="cpu", dtype=torch.float32, max_prompt_tokens: int | None = None,
              weights: bool = True) -> Emu3Adapter:
    """A local from_pretrained directory (Emu3-Gen-hf's layout, or one we saved). weights=False builds the
    same model from its config.json alone, reading no weights file: under deepspeed.zero.Init each rank then
    holds only its partition, and rank 0 fills it (cca_ray.train.gathered.load_partitioned)."""
    from transformers import AutoConfig, AutoTokenizer, Emu3ForConditionalGeneration

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no Emu3 checkpoint at {path} (config.json missing); give a local from_pretrained directory")
    side = json.loads((path / SIDECAR).read_text()) if (path / SIDECAR).exists() else {}
    if weights:
        hf = Emu3ForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device)
    else:  # no initialisation either: the values are overwritten, and under zero.Init a rank holds none of them
        from transformers.initialization import no_init_weights

        with no_init_weights():
            hf = Emu3ForConditionalGeneration._from_config(AutoConfig.from_pretrained(path), dtype=dtype,
                                                           attn_implementation="sdpa")
    disable_dropout(hf)
    tok = AutoTokenizer.from_pretrained(path)
    limit = max_prompt_tokens or side.get("max_prompt_tokens", 256)
    return Emu3Adapter(hf, tok, max_prompt_tokens=limit)


