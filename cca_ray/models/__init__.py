"""Model families behind one protocol (base.py). One folder per family holds everything it needs.

MODEL_FAMILIES maps `model.family` to its condition kind ("prompt" or "label") and to where the
family's two entry points live (imported on first use, so loading one family never imports
another's dependencies):

    load(path, *, device, dtype, **options) -> ARVisualModel       a released checkpoint or our save()
    build_tiny(out_dir, model_cfg, *, codebook_size, prompts, num_classes, grid, tokenizer_dir) -> Path
                                                                    a random-init model in the real layout

A stage loads a configured model with `load_model(path, **loader_options(cfg.model, path))`: a family's
options for released files live in the config block model.<family> (model.llamagen), named as its
loader's keyword arguments.

A new family: a folder models/<family>/ with an adapter implementing base.ARVisualModel, an
entry here, its image tokenizer in cca_ray.tokenizers.TOKENIZERS, and a `<family>-smoke` preset.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Sequence

import torch

from cca_ray.models.base import ARVisualModel, Cond, RawCondition

SIDECAR = "cca_ray.json"  # written beside every checkpoint we save: the family and what rebuilds it

MODEL_FAMILIES: dict[str, dict[str, str]] = {
    "emu3": {"load": "cca_ray.models.emu3:load_emu3", "build_tiny": "cca_ray.models.emu3:build_tiny_from_config",
             "condition_kind": "prompt", "builds_without_weights": "yes"},
    "llamagen": {"load": "cca_ray.models.llamagen:load_llamagen",
                 "build_tiny": "cca_ray.models.llamagen:build_tiny_from_config", "condition_kind": "label"},
    "var": {"load": "cca_ray.models.var:load_var", "build_tiny": "cca_ray.models.var:build_tiny_from_config",
            "condition_kind": "label"},
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _entry(family: str, name: str):
    if family not in MODEL_FAMILIES:
        raise ValueError(f"unknown model family '{family}'; known: {', '.join(MODEL_FAMILIES)}")
    module, attr = MODEL_FAMILIES[family][name].split(":")
    return getattr(importlib.import_module(module), attr)


def condition_kind(family: str) -> str:
    """"prompt" (text families: conditions are prompt strings) or "label" (class ids)."""
    if family not in MODEL_FAMILIES:
        raise ValueError(f"unknown model family '{family}'; known: {', '.join(MODEL_FAMILIES)}")
    return MODEL_FAMILIES[family]["condition_kind"]


def is_checkpoint(path) -> bool:
    """A loadable model: a directory we saved (sidecar) or a from_pretrained one (config.json), or a
    family's released weights file (LlamaGen's .pt, VAR's .pth)."""
    p = Path(path)
    return (p / SIDECAR).is_file() or (p / "config.json").is_file() or (p.is_file() and p.suffix in (".pt", ".pth"))


def checkpoint_family(path) -> str | None:
    """The family named in a saved checkpoint's sidecar, or None."""
    side = Path(path) / SIDECAR
    return json.loads(side.read_text()).get("family") if side.is_file() else None


def builds_without_weights(path, family: str | None = None) -> bool:
    """Whether load_model(path, weights=False) can build the model from its config alone (ZeRO-3
    partitioned loading, cca_ray.train.gathered.load_partitioned); the other families load whole on each rank."""
    family = family or checkpoint_family(path) or "emu3"
    return bool(MODEL_FAMILIES.get(family, {}).get("builds_without_weights"))


def load_model(path, *, family: str | None = None, device="cpu", dtype=torch.float32, weights: bool = True,
               **options) -> ARVisualModel:
    """Load a local checkpoint (a directory we saved, or a family's released file/directory).

    The family comes from the checkpoint's sidecar when not given; family-specific options
    (LlamaGen's gpt_model, VAR's depth, ...) are passed through to the family's loader. A knob
    embedder saved beside the weights (cca_ray.models.knob: knob.pt, knob.json) is attached.
    weights=False (families where builds_without_weights): the same modules, built from the config
    without reading the weights (their values are whatever initialisation left)."""
    family = family or checkpoint_family(path) or "emu3"
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    if not weights:
        if not builds_without_weights(path, family):
            raise ValueError(f"model family '{family}' cannot be built without its weights")
        options = {**options, "weights": False}
    adapter = _entry(family, "load")(path, device=device, dtype=dtype, **options)
    if Path(path).is_dir():  # a knob-conditioned model (λ-conditioned CCA, GFT) keeps its embedder beside
        from cca_ray.models import knob

        knob.load(adapter.module, path)
    return adapter


def loader_options(model_cfg, path) -> dict:
    """load_model's keyword options for `path` from a ModelConfig, the one place a stage turns config into
    them: none for a directory we saved (its sidecar names the family and the architecture); otherwise
    model.family plus that family's option block, model.<family> (LlamaGen: model.llamagen.gpt_model,
    image_size, ...), whose field names are the family loader's keyword arguments.

        load_model(path, **loader_options(cfg.model, path), device=..., dtype=...)
    """
    if (Path(path) / SIDECAR).is_file():
        return {}
    block = getattr(model_cfg, model_cfg.family, None)
    options = block.model_dump(exclude_none=True) if block is not None else {}
    return {"family": model_cfg.family, **options}


def build_tiny_model(out_dir, model_cfg, *, codebook_size: int, prompts: Sequence[str] = (),
                     num_classes: int | None = None, grid: tuple[int, int] | None = None,
                     tokenizer_dir=None) -> Path:
    """Random-init model of `model_cfg`'s family and size, saved under out_dir (used when model.path is None).
    prompts: the dataset's prompts (text families build their BPE on them); num_classes: class families;
    tokenizer_dir: the data's saved tokenizer (VAR pairs the model with its VQVAE and scales)."""
    return _entry(model_cfg.family, "build_tiny")(out_dir, model_cfg, codebook_size=codebook_size, prompts=prompts,
                                                  num_classes=num_classes, grid=grid, tokenizer_dir=tokenizer_dir)


__all__ = ["ARVisualModel", "Cond", "DTYPES", "MODEL_FAMILIES", "RawCondition", "SIDECAR", "build_tiny_model",
           "checkpoint_family", "condition_kind", "is_checkpoint", "load_model", "loader_options"]
