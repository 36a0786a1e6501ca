"""Sampling-time knobs: a scalar the model is conditioned on, one embedder shared by every family.

Two knobs exist, each trained by its own objective and chosen again at sampling time:

* ``cca_lambda``: λ-conditioned CCA (paper Table 5). Training draws λ log-uniformly per row
  from ``train.lam_range`` and uses it in that row's CCA loss; sampling picks one λ.
* ``guidance_beta``: Guidance-Free Training (GFT, Chen et al. 2025). Training draws β ~ U(0, 1)
  per row (β = 1 where the label was dropped); β = 1 is the plain conditional model, smaller β
  acts like stronger guidance (the model learns l_u + (l_c - l_u) / β).

The embedder is DiT's timestep embedder over the knob's position in its trained range,

    u = (f(v) - f(low)) / (f(high) - f(low))       f = log for λ, the identity for β
    e = Linear2(SiLU(Linear1(sinusoidal(1000 u))))  Linear2 zero-initialised

and ``e`` is *added to the condition embedding* (LlamaGen's class token, VAR's class vector,
Emu3's prompt-prefix embeddings). A freshly attached knob therefore changes nothing: the model
is exactly the base model until it trains. It lives on the scoring module as ``cond_knob``, so
DeepSpeed trains and checkpoints it; on disk a model dir holds ``knob.pt`` + ``knob.json``
beside the family's own files, whose released layouts stay untouched (a model without them
loads as before).
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

ATTR = "cond_knob"  # the submodule name on a family's scoring module
PREFIX = ATTR + "."
WEIGHTS, SPEC_FILE = "knob.pt", "knob.json"
KNOBS = ("cca_lambda", "guidance_beta")
_WHAT = {"cca_lambda": "λ-conditioned (train.lam_sampling=loguniform)",
         "guidance_beta": "trained with GFT (train.objective=gft)"}


@dataclass(frozen=True)
class KnobSpec:
    """What a knob-conditioned model was trained on. ``null_value``: the knob of the unconditional
    rows when CFG is added on top (GFT: 1, as in training); None: the conditional row's value."""

    name: str
    low: float
    high: float
    default: float
    null_value: float | None = None
    freq_dim: int = 64

    def __post_init__(self):
        if self.name not in KNOBS:
            raise ValueError(f"unknown knob {self.name!r}; known: {', '.join(KNOBS)}")
        if not (self.low < self.high) or (self.log and self.low <= 0):
            raise ValueError(f"{self.name}: trained range [{self.low}, {self.high}] must have 0 < low < high"
                             if self.log else f"{self.name}: trained range needs low < high")

    @property
    def log(self) -> bool:
        return self.name == "cca_lambda"

    def unit(self, value: torch.Tensor) -> torch.Tensor:
        """The knob's position in its trained range, in [0, 1] (float32)."""
        v = value.float()
        if self.log:
            lo, hi = math.log(self.low), math.log(self.high)
            return (v.clamp_min(1e-30).log() - lo) / (hi - lo)
        return (v - self.low) / (self.high - self.low)

    def check(self, value) -> float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        if not ok:
            raise ValueError(f"{self.name} must be a finite number, got {value!r}")
        if not self.low <= value <= self.high:
            raise ValueError(f"{self.name}={value:g} is outside the range this model was trained on, "
                             f"[{self.low:g}, {self.high:g}]")
        return float(value)


def lam_spec(low: float, high: float, lam: float) -> KnobSpec:
    """The λ knob: default λ is train.lam when it lies in the range, else the range's geometric middle."""
    default = lam if low <= lam <= high else math.sqrt(low * high)
    return KnobSpec("cca_lambda", float(low), float(high), float(default))


def beta_spec(default: float = 0.5) -> KnobSpec:
    return KnobSpec("guidance_beta", 0.0, 1.0, float(default), null_value=1.0)


def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """DiT/GLIDE timestep features: t [B] float -> [B, dim] (cos | sin)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], -1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], -1) if dim % 2 else emb


class KnobEmbedder(nn.Module):
    """knob values [B] -> condition-embedding offsets [B, dim]; zero at initialisation."""

    def __init__(self, dim: int, spec: KnobSpec):
        super().__init__()
        self.spec = spec
        self.mlp = nn.Sequential(nn.Linear(spec.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        feats = sinusoidal(1000.0 * self.spec.unit(value), self.spec.freq_dim)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


# -- on a module ----------------------------------------------------------------------------
def spec_of(module: nn.Module) -> KnobSpec | None:
    emb = getattr(module, ATTR, None)
    return emb.spec if emb is not None else None


def attach(module: nn.Module, dim: int, spec: KnobSpec) -> KnobEmbedder:
    """Give a scoring module a fresh (zero-output) knob embedder of width `dim`, on its device and dtype."""
    if spec_of(module) is not None:
        raise ValueError(f"the model already has a {spec_of(module).name} knob")
    p = next(module.parameters())
    emb = KnobEmbedder(dim, spec).to(device=p.device, dtype=p.dtype)
    setattr(module, ATTR, emb)
    return emb


def embedding(module: nn.Module, knob: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """The offset [rows, dim] to add to the condition embedding, or None for a model without a knob.
    A knob model scored without values uses its default; values for a model without a knob are an error."""
    emb = getattr(module, ATTR, None)
    if emb is None:
        if knob is not None:
            raise ValueError("knob values were given to a model that has no knob embedder")
        return None
    dev = emb.mlp[0].weight.device
    if knob is None:
        knob = torch.full((rows,), emb.spec.default, device=dev)
    if tuple(knob.shape) != (rows,):
        raise ValueError(f"knob values have shape {tuple(knob.shape)}, expected ({rows},)")
    return emb(knob.to(dev))


def check_value(spec: KnobSpec | None, name: str, value) -> float | None:
    """A requested knob value, checked against what the model was trained on; None passes through.
    ValueError (naming the knob and the trained range) for a value outside it or a model without it."""
    if value is None:
        return None
    if name not in KNOBS:
        raise ValueError(f"unknown knob {name!r}; known: {', '.join(KNOBS)}")
    if spec is None or spec.name != name:
        has = f"it takes {spec.name} in [{spec.low:g}, {spec.high:g}]" if spec else "it has no sampling-time knob"
        raise ValueError(f"{name}: this model is not {_WHAT[name]}; {has}")
    return spec.check(value)


def sampling_values(module: nn.Module, rows: int, *, cca_lambda=None, guidance_beta=None,
                    device=None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-row knob values for a decode: (conditional rows [rows], unconditional rows [rows]); (None, None)
    for a model without a knob. Raises ValueError for a value the model was not trained on."""
    spec = spec_of(module)
    lam = check_value(spec, "cca_lambda", cca_lambda)
    beta = check_value(spec, "guidance_beta", guidance_beta)
    if spec is None:
        return None, None
    value = lam if spec.name == "cca_lambda" else beta
    value = spec.default if value is None else value
    null = value if spec.null_value is None else spec.null_value
    return torch.full((rows,), value, device=device), torch.full((rows,), null, device=device)


def decode_values(module: nn.Module, rows: int, cfg_on: bool, **knobs) -> torch.Tensor | None:
    """The knob of every row a decode backend runs: [rows] guidance-free, [2 rows] (cond; uncond) with CFG."""
    cond, uncond = sampling_values(module, rows, **knobs)
    if cond is None:
        return None
    return torch.cat([cond, uncond]) if cfg_on else cond


# -- on disk --------------------------------------------------------------------------------
def strip(state: dict) -> dict:
    """A state dict without the knob's keys (the family's released layout)."""
    return {k: v for k, v in state.items() if not k.startswith(PREFIX)}


def save(module: nn.Module, path) -> None:
    """Write knob.pt + knob.json beside a saved model (nothing for a model without a knob)."""
    emb = getattr(module, ATTR, None)
    if emb is None:
        return
    path = Path(path)
    torch.save({k: v.detach().cpu() for k, v in emb.state_dict().items()}, path / WEIGHTS)
    (path / SPEC_FILE).write_text(json.dumps({**asdict(emb.spec), "dim": emb.mlp[2].out_features}, indent=1))


def saved_spec(path) -> tuple[KnobSpec, int] | None:
    f = Path(path) / SPEC_FILE
    if not f.is_file():
        return None
    d = json.loads(f.read_text())
    dim = d.pop("dim")
    return KnobSpec(**d), int(dim)


def load(module: nn.Module, path) -> KnobSpec | None:
    """Attach the knob saved beside a model dir, if there is one; returns its spec."""
    found = saved_spec(path)
    if found is None:
        return None
    spec, dim = found
    emb = attach(module, dim, spec)
    state = torch.load(Path(path) / WEIGHTS, map_location="cpu", weights_only=True)
    emb.load_state_dict({k: v.to(emb.mlp[0].weight.dtype) for k, v in state.items()})
    return spec


def spec_to_dict(spec: KnobSpec | None) -> dict | None:
    return asdict(spec) if spec is not None else None


def spec_from_dict(d: dict | None) -> KnobSpec | None:
    return KnobSpec(**d) if d else None
