"""The HTTP contract of `cca_ray.serve`: request parsing, validation and response bodies.

Pure functions (bytes and dicts in, dataclasses and dicts out; no Ray, no model), so every
rule here has a fast unit test. The wire format follows the OpenAI Images API:

    POST /v1/images/generations
    {"prompt": str, "n": int, "size": "WxH", "response_format": "b64_json", "model": str,
     # extensions
     "seed": int, "guidance_scale": float, "temperature": float, "top_k": int, "top_p": float,
     "label": int, "cca_lambda": float, "guidance_beta": float}
    -> {"created": unix_s, "data": [{"b64_json": PNG, "seed": int, "revised_prompt": str,
                                     "timing": {...}}], "model": str, "size": "WxH"}

Errors carry OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``, whose
``param`` and message name the offending field. ``cca_lambda`` (a λ-conditioned CCA model) and
``guidance_beta`` (a GFT model) are the model's sampling-time knob (cca_ray.models.knob): a value
outside the range the model was trained on, or a knob the model does not have, is a 400 that names
the field and the trained range.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cca_ray.models.knob import KNOBS, KnobSpec, check_value

MAX_SEED = 2**62  # make_seeds gives row i seed+i; keep every row's seed inside a torch Generator's range
MAX_PROMPT_CHARS = 20_000  # cheap bound before tokenizing; the token limit is the real one


class APIError(Exception):
    """A request the server refuses; `status` is the HTTP code, `param` the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ImageGenerationRequest(BaseModel):
    """The request body. Strict: "2" is not an int, unknown keys are errors (extra="forbid")."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    n: int = Field(1, ge=1)
    size: str | None = None
    response_format: str | None = None
    model: str | None = None
    user: str | None = None  # OpenAI's end-user id: accepted and ignored
    # extensions
    seed: int | None = Field(None, ge=0, lt=MAX_SEED)
    guidance_scale: float | None = Field(None, ge=0.0, le=100.0, allow_inf_nan=False)
    temperature: float | None = Field(None, gt=0.0, le=100.0, allow_inf_nan=False)
    top_k: int | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    label: int | None = None
    cca_lambda: float | None = Field(None, allow_inf_nan=False)
    guidance_beta: float | None = Field(None, allow_inf_nan=False)


class SamplingKey(NamedTuple):
    """Requests with equal keys can share one batched decode."""

    guidance_scale: float
    temperature: float
    top_k: int | None
    top_p: float | None
    grid: tuple[int, int]
    cca_lambda: float | None = None  # a knob model's knob (None: no knob, or its default)
    guidance_beta: float | None = None


@dataclass
class ServeLimits:
    """What the loaded model and config accept; built once per replica."""

    model_name: str
    image_size: tuple[int, int]  # (width, height) in pixels of the tokenizer's images
    grid: tuple[int, int]  # (grid_h, grid_w) code grid
    max_n: int
    max_prompt_tokens: int
    prompt_length: Callable[[str], int]  # BPE tokens of a prompt
    label_prompts: dict[int, str] = field(default_factory=dict)  # class -> the dataset's prompt
    condition_kind: str = "prompt"  # "label": a class-conditional model (LlamaGen, VAR) takes class ids
    guidance_scale: float = 0.0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    max_body_bytes: int = 1 << 20
    knob: KnobSpec | None = None  # the model's sampling-time knob, if it has one
    cca_lambda: float | None = None  # defaults (sample.cca_lambda / sample.guidance_beta) for a knob model
    guidance_beta: float | None = None

    @property
    def size(self) -> str:
        return f"{self.image_size[0]}x{self.image_size[1]}"


@dataclass
class GenerationSpec:
    """A validated request, ready for the sampler."""

    cond_prompt: str  # the condition as text (the response's revised_prompt; "" = the null condition)
    n: int
    seeds: list[int] | None  # None: the server draws fresh seeds
    key: SamplingKey
    cond: str | int | None = None  # the raw condition the model takes (a prompt, a class id; None = null)


def _pydantic_to_api_error(err: ValidationError) -> APIError:
    e = err.errors()[0]
    name = ".".join(str(p) for p in e["loc"]) or "body"
    if e["type"] == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {name}", param=name, code="unknown_parameter")
    got = e.get("input")
    kind = "type" if e["type"].endswith("_type") or e["type"] in ("int_from_float", "float_parsing") else "value"
    return APIError(400, f"Invalid {kind} for '{name}': {e['msg']} (got {got!r})", param=name, code=f"invalid_{kind}")


def body_too_large(max_body_bytes: int) -> APIError:
    return APIError(413, f"The request body is larger than this server's limit of {max_body_bytes} bytes "
                         "(serve.max_body_bytes)", param="body", code="request_too_large")


def parse_json_body(body: bytes) -> dict:
    """Raw body -> dict, or APIError(400) for malformed JSON, JSON nested too deep to parse, or a non-object."""
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"We could not parse the JSON body of your request: {e}", param="body",
                       code="invalid_json") from None
    except RecursionError:  # e.g. [[[[... 100,000 deep: the parser runs out of stack, not the server
        raise APIError(400, "We could not parse the JSON body of your request: it is nested too deeply",
                       param="body", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise APIError(400, f"The request body must be a JSON object, got {type(obj).__name__}", param="body",
                       code="invalid_json")
    return obj


def parse_size(size: str | None, limits: ServeLimits) -> tuple[int, int]:
    """"WxH" (or None/"auto") -> the code grid; only the tokenizer's own image size is served."""
    if size is None or size == "auto":
        return limits.grid
    m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", size)
    if not m:
        raise APIError(400, f"Invalid value for 'size': {size!r} is not of the form 'WxH'; supported: {limits.size}",
                       param="size", code="invalid_size")
    if (int(m.group(1)), int(m.group(2))) != tuple(limits.image_size):
        raise APIError(400, f"Invalid value for 'size': {size} is not supported by this model; "
                            f"supported: {limits.size}", param="size", code="invalid_size")
    return limits.grid


def resolve_condition(req: ImageGenerationRequest, limits: ServeLimits) -> str:
    """The prompt the model is conditioned on: the prompt itself, or a class's prompt template.

    A class comes either as `label` (int) or as a prompt that is exactly a class id ("7").
    """
    if req.label is not None:
        if not limits.label_prompts:
            raise APIError(400, "Invalid value for 'label': this model has no class labels "
                                "(no label->prompt map found)", param="label")
        if req.label not in limits.label_prompts:
            known = ", ".join(str(k) for k in sorted(limits.label_prompts))
            raise APIError(400, f"Invalid value for 'label': unknown class {req.label}; known: {known}", param="label")
        template = limits.label_prompts[req.label]
        if req.prompt not in (None, "", template):
            raise APIError(400, "Give the class through either 'prompt' or 'label', not both", param="label")
        return template
    if req.prompt is None:
        raise APIError(400, "Missing required parameter: 'prompt' (or give a class as 'label')", param="prompt",
                       code="missing_required_parameter")
    stripped = req.prompt.strip()
    if limits.label_prompts and re.fullmatch(r"-?\d+", stripped) and int(stripped) in limits.label_prompts:
        return limits.label_prompts[int(stripped)]
    return req.prompt


def raw_condition(cond_prompt: str, req: ImageGenerationRequest, limits: ServeLimits) -> str | int | None:
    """What the model is conditioned on: the prompt itself for text models; for class-conditional
    ones the class id named by `label`, by a prompt that is a class id, or by a class's prompt text."""
    if limits.condition_kind == "prompt":
        return cond_prompt
    if cond_prompt == "":
        return None  # the null class: unconditional samples
    by_text = {p: lab for lab, p in limits.label_prompts.items()}
    if req.label is not None:
        return req.label
    if cond_prompt in by_text:
        return by_text[cond_prompt]
    known = ", ".join(f"{k} ({v!r})" for k, v in sorted(limits.label_prompts.items())[:12])
    raise APIError(400, f"Invalid value for 'prompt': this model is class-conditional and takes a class, not free "
                        f"text; give 'label' (or a prompt that is a class id or a class's prompt). Classes: {known}",
                   param="prompt", code="invalid_value")


def knob_values(req: ImageGenerationRequest, limits: ServeLimits) -> dict[str, float | None]:
    """cca_lambda / guidance_beta for the sampler: the request's, checked against the model's trained
    range (APIError 400 naming the field), else the server's default for the knob the model has."""
    out = {}
    for name in KNOBS:
        value = getattr(req, name)
        if value is not None:
            try:
                out[name] = check_value(limits.knob, name, value)
            except ValueError as e:
                raise APIError(400, f"Invalid value for '{name}': {e}", param=name, code="invalid_value") from None
        elif limits.knob is not None and limits.knob.name == name:
            out[name] = getattr(limits, name)
        else:
            out[name] = None
    return out


def validate_request(body: bytes, limits: ServeLimits) -> GenerationSpec:
    """Raw request body -> GenerationSpec, or APIError naming the field (413 for a body over max_body_bytes)."""
    if len(body) > limits.max_body_bytes:
        raise body_too_large(limits.max_body_bytes)
    try:
        req = ImageGenerationRequest.model_validate(parse_json_body(body))
    except ValidationError as e:
        raise _pydantic_to_api_error(e) from None
    if req.n > limits.max_n:
        raise APIError(400, f"Invalid value for 'n': {req.n} is above this server's maximum of {limits.max_n} "
                            "(serve.max_n)", param="n", code="invalid_value")
    if req.response_format not in (None, "b64_json"):
        raise APIError(400, f"Invalid value for 'response_format': {req.response_format!r} is not supported; this "
                            "server returns images inline only ('b64_json')", param="response_format")
    if req.model not in (None, "", limits.model_name):
        raise APIError(404, f"The model '{req.model}' does not exist; this server serves '{limits.model_name}'",
                       param="model", code="model_not_found")
    grid = parse_size(req.size, limits)
    cond_prompt = resolve_condition(req, limits)
    n_tokens = limits.prompt_length(cond_prompt) if cond_prompt else 0
    if n_tokens > limits.max_prompt_tokens:
        raise APIError(400, f"Invalid value for 'prompt': it is {n_tokens} tokens long; this model accepts at most "
                            f"{limits.max_prompt_tokens}", param="prompt", code="prompt_too_long")
    key = SamplingKey(
        guidance_scale=float(req.guidance_scale if req.guidance_scale is not None else limits.guidance_scale),
        temperature=float(req.temperature if req.temperature is not None else limits.temperature),
        top_k=req.top_k if req.top_k is not None else limits.top_k,
        top_p=req.top_p if req.top_p is not None else limits.top_p,
        grid=grid,
        **knob_values(req, limits),
    )
    seeds = [req.seed + i for i in range(req.n)] if req.seed is not None else None
    return GenerationSpec(cond_prompt=cond_prompt, n=req.n, seeds=seeds, key=key,
                          cond=raw_condition(cond_prompt, req, limits))


# -- responses ------------------------------------------------------------------------------
def png_bytes(image: np.ndarray) -> bytes:
    """uint8 [H, W, C] (C = 1 or 3) -> PNG bytes."""
    from PIL import Image

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected a uint8 [H, W, 1|3|4] image, got {image.dtype} {tuple(image.shape)}")
    img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def png_b64(image: np.ndarray) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")


def generation_response(created: int, model_name: str, size: str, items: list[dict]) -> dict:
    """items: one dict per image with b64_json, seed, revised_prompt, timing."""
    return {"created": created, "data": items, "model": model_name, "size": size, "output_format": "png"}


def models_response(model_name: str, created: int, extra: dict | None = None) -> dict:
    return {"object": "list",
            "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "cca-ray", **(extra or {})}]}
