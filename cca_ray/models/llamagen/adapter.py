"""LlamaGen adapter: the c2i GPT behind the ARVisualModel protocol.

Conditions are class ids (``condition_kind = "label"``); None is the null class, row
``num_classes`` of the class embedding (1000 for ImageNet). Codes are LongTensor[B, h, w]
in raster order, h = w = image_size // downsample_size.

Guidance convention: our g acts on log-probs, l = l_c + g (l_c - l_u); LlamaGen's sampler acts
on logits, z_u + cfg_scale (z_c - z_u). Both give the same distribution when cfg_scale = g + 1
(log-softmax only shifts each row by a constant, which the final softmax removes).

On disk, `save(dir)` writes ``dir/gpt.pt`` in the released layout ({"model": state_dict}, loadable
by LlamaGen's own sampler) and ``dir/cca_ray.json`` with the options that rebuild the model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from cca_ray.models import knob as knobs
from cca_ray.models.base import Cond, RawCondition
from cca_ray.models.llamagen.checkpoint import (
    check_state_dict,
    describe,
    guess_size,
    materialise,
    read_state_dict,
)
from cca_ray.models.llamagen.gpt import GPT_MODELS, GPTConfig, LlamaGenGPT
from cca_ray.models.llamagen.kv_cache import StaticKVBackend
from cca_ray.sample import SampleOutput, decode

SIDECAR = "cca_ray.json"
WEIGHTS_FILE = "gpt.pt"


def gpt_config(gpt_model: str, *, image_size: int, downsample_size: int = 16, num_classes: int = 1000,
               cls_token_num: int = 1, codebook_size: int = 16384, null_class_row: bool = True) -> GPTConfig:
    """GPTConfig from LlamaGen's CLI options (--gpt-model, --image-size, --downsample-size, ...)."""
    if gpt_model not in GPT_MODELS:
        raise ValueError(f"unknown gpt_model {gpt_model!r}; choices: {', '.join(GPT_MODELS)}")
    if image_size % downsample_size:
        raise ValueError(f"image_size {image_size} is not a multiple of downsample_size {downsample_size}")
    s = GPT_MODELS[gpt_model]
    return GPTConfig(dim=s.dim, n_layer=s.n_layer, n_head=s.n_head, vocab_size=codebook_size, num_classes=num_classes,
                     null_class_row=null_class_row, cls_token_num=cls_token_num,
                     block_size=(image_size // downsample_size) ** 2)


def expected_shapes(cfg: GPTConfig) -> dict[str, torch.Size]:
    """Key -> shape of a LlamaGenGPT's state dict, built on the meta device (no memory, any size)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in LlamaGenGPT(cfg).state_dict().items()}


class LlamaGenAdapter:
    """ARVisualModel over a LlamaGenGPT. `module` is the GPT itself, so its state dict is the
    released file's, key for key."""

    family = "llamagen"
    condition_kind = "label"
    max_prompt_tokens = 1
    frozen_prefixes: tuple[str, ...] = ()  # the VQ tokenizer lives outside the GPT

    def __init__(self, gpt: LlamaGenGPT, *, gpt_model: str, image_size: int, downsample_size: int = 16):
        self.module = gpt
        self.config = gpt.config
        self.gpt_model, self.image_size, self.downsample_size = gpt_model, image_size, downsample_size
        g = gpt.config.grid_size
        if g * downsample_size != image_size:
            raise ValueError(f"the GPT has a {g}x{g} grid; image_size {image_size} / downsample {downsample_size} disagrees")
        self.grid = self.code_shape = (g, g)
        self.codebook_size = gpt.config.vocab_size
        self.num_classes = gpt.config.num_classes
        self.condition_dim = gpt.config.dim

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    # -- conditions ---------------------------------------------------------------------
    def _check_grid(self, grid) -> None:
        if grid is not None and tuple(grid) != self.grid:
            raise ValueError(f"grid {tuple(grid)}: this LlamaGen model generates {self.grid} codes "
                             f"(image_size {self.image_size}); its RoPE table fixes the grid")

    def encode_conditions(self, raw: Sequence[RawCondition], grid: tuple[int, int] | None = None) -> Cond:
        """Class ids (None = null class) -> Cond with input_ids LongTensor[B, 1] and an all-ones mask."""
        self._check_grid(grid)
        ids = []
        for i, c in enumerate(raw):
            if c is None:
                ids.append(self._null_id())
                continue
            # ints from Python, numpy or torch (shards hold numpy ints); never bools, floats or strings
            if isinstance(c, (bool, float, str)) or not hasattr(c, "__index__") or not 0 <= int(c) < self.num_classes:
                raise ValueError(f"condition {i}: expected a class id in [0, {self.num_classes}) or None, got {c!r}")
            ids.append(int(c))
        input_ids = torch.tensor(ids, dtype=torch.long).view(-1, 1)
        return Cond(input_ids, torch.ones_like(input_ids), self.grid).to(self.device)

    def _null_id(self) -> int:
        if self.config.null_class is None:
            raise ValueError("this LlamaGen checkpoint has no null-class row (trained with class_dropout_prob=0): "
                             "CFG and null conditions are unavailable")
        return self.config.null_class

    def null_condition(self, n: int, grid: tuple[int, int] | None = None) -> Cond:
        return self.encode_conditions([None] * n, grid)

    def condition_length(self, raw: RawCondition) -> int:
        return 1

    # -- scoring ------------------------------------------------------------------------
    def scoring_inputs(self, cond: Cond, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inputs for LlamaGenGPT.forward: class_ids [B], codes [B, N]. codes: LongTensor[B, h, w]."""
        if tuple(codes.shape[1:]) != self.grid:
            raise ValueError(f"codes of shape {list(codes.shape)}: expected [B, {self.grid[0]}, {self.grid[1]}]")
        if codes.shape[0] != len(cond):
            raise ValueError(f"{codes.shape[0]} code grids for {len(cond)} conditions")
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise ValueError(f"codes must lie in [0, {self.codebook_size}); got [{int(codes.min())}, {int(codes.max())}]")
        dev = cond.input_ids.device
        knob = {"knob": cond.knob} if cond.knob is not None else {}
        return dict(class_ids=cond.input_ids[:, 0], codes=codes.to(dev).long().flatten(1), **knob)

    def sequence_logprob(self, cond: Cond, codes: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
        """log p(codes | class) Tensor[B] fp32, one teacher-forced pass through `module` (a DeepSpeed
        engine wrapping self.module, or self.module)."""
        return (module or self.module)(**self.scoring_inputs(cond, codes))

    def token_logits(self, cond: Cond, codes: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
        """Logits fp32 [B, N, vocab] at every code (raster order), one teacher-forced pass."""
        return (module or self.module)(**self.scoring_inputs(cond, codes), return_logits=True)

    # -- sampling -----------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, cond: Cond, *, guidance: float = 0.0, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | Sequence[int] | None = None,
               return_dists: bool = False, cca_lambda: float | None = None,
               guidance_beta: float | None = None) -> SampleOutput:
        """Codes [B, h, w] plus per-step log-probs. guidance g == LlamaGen's cfg_scale g + 1; at g = 0
        only the B conditional rows run, with g > 0 the null-class rows join them in one 2B batch."""
        self._check_grid(cond.grid)
        n = self.grid[0] * self.grid[1]
        unc = self.null_condition(len(cond)) if guidance != 0.0 else None
        knob = knobs.decode_values(self.module, len(cond), unc is not None, cca_lambda=cca_lambda,
                                   guidance_beta=guidance_beta, device=self.device)
        out = decode(
            StaticKVBackend(self.module, max_new_tokens=n - 1, knob=knob),
            cond.input_ids, cond.attention_mask, [-1] * n, 0,  # code k is fed back as token k
            uncond_ids=unc.input_ids if unc is not None else None,
            uncond_mask=unc.attention_mask if unc is not None else None,
            guidance_scale=guidance, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
            return_dists=return_dists,
        )
        out.codes = out.codes.view(len(cond), *self.grid)
        return out

    def generate(self, cond: Cond, **kw) -> torch.Tensor:
        """LongTensor[B, h, w]; see sample() for the options."""
        was_training = self.module.training
        self.module.eval()
        try:
            return self.sample(cond, **kw).codes
        finally:
            self.module.train(was_training)

    # -- training hooks -----------------------------------------------------------------
    def external_parameters(self) -> list[nn.Parameter]:
        return []  # every weight is read through its own submodule's forward

    def enable_gradient_checkpointing(self) -> None:
        self.module.gradient_checkpointing = True

    # -- persistence --------------------------------------------------------------------
    def options(self) -> dict:
        return {"family": self.family, "gpt_model": self.gpt_model, "image_size": self.image_size,
                "downsample_size": self.downsample_size, "codebook_size": self.codebook_size,
                "weights": WEIGHTS_FILE, "gpt_config": self.config.to_dict()}

    def save(self, path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        torch.save({"model": knobs.strip(self.module.state_dict())}, path / WEIGHTS_FILE)  # the released layout
        (path / SIDECAR).write_text(json.dumps(self.options(), indent=2))
        knobs.save(self.module, path)


def _build_loaded(cfg: GPTConfig, state: dict, device, dtype) -> LlamaGenGPT:
    # build on meta and adopt one private copy of the file's tensors: the weights exist once in
    # memory (a random init of a 3B model would double the peak), the file only as page cache
    with torch.device("meta"):
        gpt = LlamaGenGPT(cfg)
    gpt.load_state_dict(materialise(state, device, dtype), strict=True, assign=True)
    return gpt.eval()


def load_llamagen(path, *, device="cpu", dtype=torch.float32, gpt_model: str | None = None,
                  image_size: int | None = None, downsample_size: int = 16, num_classes: int = 1000,
                  cls_token_num: int = 1, codebook_size: int = 16384,
                  class_dropout_prob: float | None = None) -> LlamaGenAdapter:
    """A released c2i .pt file (gpt_model and image_size required, as for LlamaGen's sampler), or a
    directory written by LlamaGenAdapter.save(). class_dropout_prob: None reads whether the file has
    the null-class row; 0 asserts it has none, > 0 that it has one."""
    path = Path(path)
    if path.is_dir():
        side = path / SIDECAR
        if not side.exists():
            raise FileNotFoundError(f"{path}: no {SIDECAR}; pass the .pt file itself for a released LlamaGen checkpoint")
        opts = json.loads(side.read_text())
        for name, given in (("gpt_model", gpt_model), ("image_size", image_size)):
            if given is not None and given != opts[name]:
                raise ValueError(f"{path}: saved as {name}={opts[name]!r}, asked for {given!r}")
        cfg = GPTConfig(**opts["gpt_config"])
        weights = path / opts.get("weights", WEIGHTS_FILE)
        state, _ = read_state_dict(weights)
        check_state_dict(state, expected_shapes(cfg), weights, f"the architecture in {side}")
        return LlamaGenAdapter(_build_loaded(cfg, state, device, dtype), gpt_model=opts["gpt_model"],
                               image_size=opts["image_size"], downsample_size=opts["downsample_size"])

    if gpt_model is None or image_size is None:
        raise ValueError(f"{path}: a released LlamaGen file needs gpt_model (one of {', '.join(GPT_MODELS)}) and "
                         "image_size (256 or 384 for the c2i files), as LlamaGen's sampler does")
    state, freqs = read_state_dict(path)
    table = state.get("cls_embedding.embedding_table.weight")
    if class_dropout_prob is None:
        null_row = table is not None and table.shape[0] == num_classes + 1
    else:
        null_row = class_dropout_prob > 0
    cfg = gpt_config(gpt_model, image_size=image_size, downsample_size=downsample_size, num_classes=num_classes,
                     cls_token_num=cls_token_num, codebook_size=codebook_size, null_class_row=null_row)
    guess = guess_size(state, {k: v for k, v in GPT_MODELS.items() if k != gpt_model})
    hint = f" (the file has {describe(state)}" + (f": looks like {guess})" if guess else ")")
    check_state_dict(state, expected_shapes(cfg), path, f"{gpt_model} with {num_classes} classes and "
                     f"{codebook_size} codes", hint)
    want = (cfg.cls_token_num + cfg.block_size, cfg.head_dim // 2, 2)
    if freqs is not None and tuple(freqs.shape) != want:
        # the stale table records the grid the file was trained for: a cheap check of image_size
        raise ValueError(f"{path}: its freqs_cis table has {freqs.shape[0] - cfg.cls_token_num} image positions, "
                         f"image_size {image_size} gives {cfg.block_size}; check image_size")
    return LlamaGenAdapter(_build_loaded(cfg, state, device, dtype), gpt_model=gpt_model, image_size=image_size,
                           downsample_size=downsample_size)


def build_tiny_llamagen(out_dir, *, codebook_size: int, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 2,
                        num_kv_heads: int | None = None, intermediate_size: int | None = None,
                        max_prompt_tokens: int = 1, prompts: Sequence[str] = (), seed: int = 0,
                        num_classes: int = 10, image_size: int = 64, downsample_size: int = 16) -> Path:
    """Random-init GPT in LlamaGen's layout, saved as save() does. Weights are drawn at unit-ish
    scale (LlamaGen's own init zeroes the head, which makes every logit equal). `prompts` and
    `max_prompt_tokens` belong to text families and are ignored."""
    if intermediate_size is not None:
        raise ValueError("LlamaGen derives its SwiGLU width from the hidden size; leave intermediate_size unset")
    cfg = GPTConfig(dim=hidden_size, n_layer=num_layers, n_head=num_heads, n_kv_head=num_kv_heads,
                    vocab_size=codebook_size, num_classes=num_classes, block_size=(image_size // downsample_size) ** 2)
    gpt = LlamaGenGPT(cfg)
    redraw_weights(gpt, torch.Generator().manual_seed(seed))  # overwrites every parameter of the default init
    name = next((k for k, s in GPT_MODELS.items() if (s.dim, s.n_layer, s.n_head) == (hidden_size, num_layers, num_heads)),
                "custom")
    adapter = LlamaGenAdapter(gpt, gpt_model=name, image_size=image_size, downsample_size=downsample_size)
    adapter.save(out_dir)
    return Path(out_dir)


@torch.no_grad()
def redraw_weights(gpt: nn.Module, generator: torch.Generator | None = None) -> None:
    """Every matrix ~ N(0, 1/fan_in) (embeddings N(0, 1)), norm gains 1: logits of order one."""
    for name, p in gpt.named_parameters():
        if p.ndim == 1:
            p.fill_(1.0)
        elif "embedding" in name:
            p.normal_(0.0, 1.0, generator=generator)
        else:
            p.normal_(0.0, p.shape[1] ** -0.5, generator=generator)


def build_tiny_from_config(out_dir, model_cfg, *, codebook_size: int, num_classes: int | None = None,
                           grid: tuple[int, int] | None = None, **_) -> Path:
    """The registry's build_tiny: a GPT of model_cfg's size over the data's code grid and classes.
    LlamaGen's grid is square (its 2-D RoPE tables assume it); the image size it records is grid x 16."""
    if grid is None or grid[0] != grid[1]:
        raise ValueError(f"LlamaGen needs a square code grid, got {grid}")
    if not num_classes:
        raise ValueError("LlamaGen is class-conditional: the training data has no labels")
    return build_tiny_llamagen(out_dir, codebook_size=codebook_size, hidden_size=model_cfg.hidden_size,
                               num_layers=model_cfg.num_layers, num_heads=model_cfg.num_heads,
                               num_kv_heads=model_cfg.num_kv_heads, num_classes=num_classes,
                               image_size=grid[0] * 16, downsample_size=16, seed=model_cfg.seed)
