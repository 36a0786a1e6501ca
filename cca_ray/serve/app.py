"""Stage `serve`: a Ray Serve deployment that samples images over an OpenAI-compatible HTTP API.

    python -m cca_ray.serve --checkpoint PATH            # a local model dir
    python -m cca_ray.serve --checkpoint models:/cca/3   # an MLflow model (or runs:/<id>/<path>)
    python -m cca_ray.serve --preset smoke               # the newest export that preset produced

Listens on http://127.0.0.1:8000 by default (serve.host / serve.port). The API is
**unauthenticated**: binding to anything but loopback (serve.host=0.0.0.0) exposes it to
everyone who can reach the port, so only do that behind something that authenticates.

Routes: POST /v1/images/generations (see cca_ray.serve.api for the contract),
GET /v1/models, GET /healthz. Concurrent requests with equal sampling settings share one
batched KV-cache decode (@serve.batch); guidance-free requests (guidance_scale=0, the
point of CCA) run one forward per token, CFG requests two rows per image.
"""

# No `from __future__ import annotations`: FastAPI, behind serve.ingress, must see the real
# `Request` annotation to inject the request.
import asyncio
import ipaddress
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from cca_ray.config import Config
from cca_ray.serve.api import (
    APIError,
    SamplingKey,
    ServeLimits,
    body_too_large,
    generation_response,
    models_response,
    png_b64,
    validate_request,
)
from cca_ray.serve.assets import (
    MLFLOW_SCHEMES,
    MlflowImageLog,
    default_checkpoint,
    find_tokenizer_dir,
    load_label_prompts,
    resolve_checkpoint,
)

log = logging.getLogger("cca_ray.serve")

APP_NAME = "cca-ray"


async def read_body(request: Request, max_body_bytes: int) -> bytes:
    """The request body, read no further than max_body_bytes (413 past it, whatever Content-Length says)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
        raise body_too_large(max_body_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body_bytes:
            raise body_too_large(max_body_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


# -- the deployment -------------------------------------------------------------------------------
@dataclass
class _Job:
    cond_prompt: str  # the condition as text (the response's revised_prompt)
    cond: str | int | None  # the raw condition the model takes
    seeds: list[int]
    key: SamplingKey
    enqueued: float = field(default_factory=time.perf_counter)
    started: bool = False  # taken into a batch

    @property
    def n(self) -> int:
        return len(self.seeds)


def served_knob(model, cfg: Config) -> dict:
    """ServeLimits' knob fields: the model's sampling-time knob (λ-conditioned CCA, GFT) and the server's
    default for it, sample.cca_lambda / sample.guidance_beta (checked against the trained range), else
    the model's own default."""
    from cca_ray.models import knob

    spec = knob.spec_of(model.module)
    out = {"knob": spec, "cca_lambda": None, "guidance_beta": None}
    if spec is not None:
        given = getattr(cfg.sample, spec.name)
        out[spec.name] = knob.check_value(spec, spec.name, given) if given is not None else spec.default
    return out


def _batch_images(jobs: list[_Job]) -> int:
    return sum(j.n for j in jobs)


api = FastAPI(title="cca-ray images API", description="OpenAI-compatible images API (unauthenticated)")


@serve.deployment(name="ImageGenerator")
@serve.ingress(api)
class ImageGenerator:
    """One model + image tokenizer per replica; HTTP in, batched decode, PNGs out."""

    def __init__(self, cfg_tree: dict, checkpoint: str):
        import torch

        from cca_ray.models import load_model, loader_options
        from cca_ray.sample import make_seeds
        from cca_ray.telemetry import ServeMetrics
        from cca_ray.tokenizers import load_tokenizer

        self.cfg = cfg = Config.model_validate(cfg_tree)
        s = cfg.serve
        torch.set_num_threads(max(1, int(s.num_cpus)))
        self.make_seeds = make_seeds
        model_dir = resolve_checkpoint(checkpoint, cfg.mlflow_uri)
        device = "cuda" if s.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.model = load_model(model_dir, **loader_options(cfg.model, model_dir), device=device, dtype=cfg.model.dtype)
        self.tok = load_tokenizer(find_tokenizer_dir(cfg, model_dir), device=device)
        if int(self.tok.codebook_size) != int(self.model.codebook_size):
            raise ValueError(f"image tokenizer codebook ({self.tok.codebook_size}) != model codebook "
                             f"({self.model.codebook_size}): serve.tokenizer_dir points at the wrong tokenizer")
        grid = tuple(int(g) for g in self.tok.grid)
        if isinstance(getattr(self.tok, "image_size", None), int):  # square images of the tokenizer
            hw = (self.tok.image_size, self.tok.image_size)
        else:  # the served image size is whatever one decode gives
            hw = np.asarray(self.tok.decode(np.zeros((1, *grid), dtype=np.int32))).shape[1:3]
        self.name = s.model_name or (checkpoint if checkpoint.startswith(MLFLOW_SCHEMES) else model_dir.name)
        self.limits = ServeLimits(
            model_name=self.name, image_size=(int(hw[1]), int(hw[0])), grid=grid, max_n=s.max_n,
            max_prompt_tokens=int(self.model.max_prompt_tokens), prompt_length=self.model.condition_length,
            label_prompts=load_label_prompts(cfg), condition_kind=self.model.condition_kind, guidance_scale=cfg.sample.guidance_scale,
            temperature=cfg.sample.temperature, top_k=cfg.sample.top_k, top_p=cfg.sample.top_p,
            max_body_bytes=s.max_body_bytes, **served_knob(self.model, cfg))
        self.created = int(time.time())
        self.metrics = ServeMetrics("ImageGenerator")
        self.mlflow = MlflowImageLog(cfg, self.name, checkpoint) if s.log_images_to_mlflow else None
        self.waiting = 0
        self.generate_batch.set_max_batch_size(s.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(s.batch_wait_timeout_s)
        log.info("serving %s (%s, image %s, grid %s) on %s", self.name, model_dir, self.limits.size, grid, device)

    # -- routes -------------------------------------------------------------------------------
    @api.get("/healthz")
    def healthz(self) -> dict:
        k = self.limits.knob
        knob = {"name": k.name, "trained_range": [k.low, k.high], "default": getattr(self.limits, k.name)} if k else None
        return {"status": "ok", "model": self.name, "size": self.limits.size, "max_n": self.limits.max_n,
                "labels": {str(k): v for k, v in sorted(self.limits.label_prompts.items())}, "knob": knob}

    @api.get("/v1/models")
    def list_models(self) -> dict:
        return models_response(self.name, self.created, {"sizes": [self.limits.size]})

    @api.get("/v1/models/{model_id:path}")
    def retrieve_model(self, model_id: str) -> JSONResponse:
        if model_id != self.name:
            err = APIError(404, f"The model '{model_id}' does not exist; this server serves '{self.name}'",
                           param="model", code="model_not_found")
            return JSONResponse(err.body(), status_code=404)
        return JSONResponse(models_response(self.name, self.created)["data"][0])

    @api.post("/v1/images/generations")
    async def generations(self, request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        try:
            spec = validate_request(await read_body(request, self.limits.max_body_bytes), self.limits)
            job = _Job(spec.cond_prompt, spec.cond, spec.seeds or self.make_seeds(None, spec.n), spec.key)
            self._queued(+1)
            try:
                items = await asyncio.wait_for(self.generate_batch(job), timeout=self.cfg.serve.request_timeout_s)
            except asyncio.TimeoutError:
                raise APIError(504, f"request timed out after {self.cfg.serve.request_timeout_s:g} s "
                                    "(serve.request_timeout_s)", code="timeout", type="server_error") from None
            finally:
                if not job.started:  # timed out or failed while still queued
                    self._queued(-1)
            total = time.perf_counter() - t0
            for it in items:
                it["timing"]["total_s"] = round(total, 6)
            body = generation_response(int(time.time()), self.name, self.limits.size, items)
            status, response = 200, JSONResponse(body)
        except APIError as e:
            status, response = e.status, JSONResponse(e.body(), status_code=e.status)
            self.metrics.record_error(e.status, e.code or e.param or "invalid_request")
        except Exception as e:  # a bug or a broken model: say so, keep serving
            log.exception("generation failed")
            err = APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error", code="internal_error")
            status, response = 500, JSONResponse(err.body(), status_code=500)
            self.metrics.record_error(500, "internal_error")
        self.metrics.observe_request(time.perf_counter() - t0, status)
        return response

    def _queued(self, delta: int) -> None:
        self.waiting = max(0, self.waiting + delta)
        self.metrics.set_queue_length(self.waiting)

    # -- batching -----------------------------------------------------------------------------
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05, batch_size_fn=_batch_images)
    async def generate_batch(self, jobs: list[_Job]) -> list[list[dict]]:
        """Group a batch by sampling settings; each group is one KV-cache decode (off the event loop)."""
        self.metrics.observe_batch(len(jobs))
        for j in jobs:
            j.started = True
        self._queued(-len(jobs))
        groups: dict[SamplingKey, list[int]] = {}
        for i, j in enumerate(jobs):
            groups.setdefault(j.key, []).append(i)
        out: list[list[dict]] = [[] for _ in jobs]
        for key, idx in groups.items():
            results = await asyncio.to_thread(self._decode_group, key, [jobs[i] for i in idx])
            for i, r in zip(idx, results):
                out[i] = r
        return out

    def _decode_group(self, key: SamplingKey, jobs: list[_Job]) -> list[list[dict]]:
        """One batched decode of every image of `jobs` (all share `key`) -> per-job response items."""
        t_start = time.perf_counter()
        prompts = [j.cond_prompt for j in jobs for _ in range(j.n)]
        conds = [j.cond for j in jobs for _ in range(j.n)]
        seeds = [s for j in jobs for s in j.seeds]
        cond = self.model.encode_conditions(conds, grid=key.grid)
        codes = self.model.generate(cond, guidance=key.guidance_scale, temperature=key.temperature,
                                    top_k=key.top_k, top_p=key.top_p, seed=seeds, cca_lambda=key.cca_lambda,
                                    guidance_beta=key.guidance_beta)
        t_sampled = time.perf_counter()
        images = np.asarray(self.tok.decode(codes.cpu().numpy().astype(np.int32)))
        pngs = [png_b64(im) for im in images]
        t_done = time.perf_counter()
        self.metrics.add_images(len(pngs))
        if self.mlflow is not None:
            self.mlflow.log_batch(images, prompts, seeds, key)
        out, r = [], 0
        for j in jobs:
            timing = {"queue_s": round(t_start - j.enqueued, 6), "sample_s": round(t_sampled - t_start, 6),
                      "decode_s": round(t_done - t_sampled, 6), "batch_images": len(pngs)}
            out.append([{"b64_json": pngs[r + i], "seed": j.seeds[i], "revised_prompt": j.cond_prompt,
                         "timing": dict(timing)} for i in range(j.n)])
            r += j.n
        return out

    def __del__(self):
        if getattr(self, "mlflow", None) is not None:
            self.mlflow.close()


# -- building and running the app -----------------------------------------------------------------
def build_app(cfg: Config, checkpoint: str | Path):
    """The Serve application for `checkpoint` (a local dir or an MLflow URI) under `cfg.serve`."""
    s = cfg.serve
    opts: dict = dict(
        ray_actor_options={"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
        max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
        backpressure_config={"status_code": s.backpressure_status, "retry_after_s": 1.0},
    )
    # Replicas may run in another working directory (or on another node): hand them absolute paths.
    tree = cfg.model_dump(mode="json")
    tree["workdir"] = str(cfg.root)
    for key in ("tokenizer_dir", "label_source"):
        if tree["serve"][key]:
            tree["serve"][key] = str(Path(tree["serve"][key]).expanduser().resolve())
    spec = str(checkpoint)
    if not spec.startswith(MLFLOW_SCHEMES):
        spec = str(Path(spec).expanduser().resolve())
    tracking = os.environ.get("MLFLOW_TRACKING_URI")
    if tracking:  # cfg.mlflow_uri honours it; make sure replicas see it too
        opts["ray_actor_options"]["runtime_env"] = {"env_vars": {"MLFLOW_TRACKING_URI": tracking}}
    if s.autoscale_max_replicas is not None:
        opts["autoscaling_config"] = {"min_replicas": s.replicas, "max_replicas": s.autoscale_max_replicas,
                                      "target_ongoing_requests": s.autoscale_target_ongoing_requests}
    else:
        opts["num_replicas"] = s.replicas
    return ImageGenerator.options(**opts).bind(tree, spec)


def run_app(cfg: Config, checkpoint: str | Path) -> str:
    """Start Serve's HTTP proxy on serve.host:serve.port and deploy; returns the base URL (…/v1)."""
    s = cfg.serve
    # The proxy's own timeout is a backstop; the deployment answers 504 first, with an OpenAI error body.
    serve.start(http_options={"host": s.host, "port": s.port, "request_timeout_s": s.request_timeout_s + 30})
    serve.run(build_app(cfg, checkpoint), name=APP_NAME, route_prefix="/")
    return f"http://{s.host}:{s.port}/v1"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _add_args(p) -> None:
    p.add_argument("--checkpoint", help="local model dir or MLflow URI (models:/name/version, runs:/...); "
                                        "default: the newest export of the preset's workdir")
    p.add_argument("--tokenizer", help="image tokenizer dir (serve.tokenizer_dir)")
    p.add_argument("--host", help="bind address (serve.host; default 127.0.0.1). The API is unauthenticated.")
    p.add_argument("--port", type=int, help="port (serve.port; default 8000)")


def main(argv=None) -> None:
    from cca_ray.cli import parse_stage_args

    cfg, args = parse_stage_args("serve", "Serve a model over an OpenAI-compatible images API (Ray Serve).", argv,
                                 _add_args)
    try:
        for flag, name in (("checkpoint", "checkpoint"), ("tokenizer", "tokenizer_dir"), ("host", "host"),
                           ("port", "port")):
            if getattr(args, flag) is not None:
                setattr(cfg.serve, name, getattr(args, flag))
        checkpoint = cfg.serve.checkpoint or str(default_checkpoint(cfg))
        if not checkpoint.startswith(MLFLOW_SCHEMES):  # fail here, not inside a replica that Serve retries
            model_dir = resolve_checkpoint(checkpoint, cfg.mlflow_uri)
            find_tokenizer_dir(cfg, model_dir)
            load_label_prompts(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"cca_ray.serve: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if not is_loopback(cfg.serve.host):
        print(f"cca_ray.serve: WARNING: binding to {cfg.serve.host}: this API has no authentication; anyone who "
              "can reach the port can use it", file=sys.stderr)

    import ray

    from cca_ray.raycluster import ensure_ray

    def _stop(*_):  # `kill PID` shuts down as cleanly as Ctrl-C
        raise KeyboardInterrupt

    ensure_ray()
    signal.signal(signal.SIGTERM, _stop)
    try:
        url = run_app(cfg, checkpoint)
        print(f"cca_ray.serve: serving {checkpoint} at {url} (POST /v1/images/generations); Ctrl-C to stop",
              flush=True)
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("cca_ray.serve: shutting down", file=sys.stderr)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
