"""Typed, validated run configuration: the one home of every field.

A run's config is built in layers, each validated as a whole at the end:

    section defaults  <-  preset YAML (``cca_ray/presets/<name>.yaml``)
                      <-  ``--config FILE.yaml``  <-  dotted ``key=value`` overrides

Presets and tune spaces name fields by their dotted path (``train.lam``); a test
loads every preset and every tune space so a renamed field breaks loudly. Loading (presets,
files, overrides, absolute paths) is cca_ray/config_loading.py; its names import from here too.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    # extra="forbid": a typo in a key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Where images and conditions come from and how shards are written (stage `prepare`)."""

    source: Literal["sklearn-digits", "mnist", "parquet", "folder"] = "sklearn-digits"
    path: str | None = Field(None, description="parquet file/dir or image folder, for source=parquet|folder")
    image_column: str = "image"
    caption_column: str | None = "caption"
    label_column: str | None = "label"
    image_size: int = Field(8, gt=0, description="images become image_size x image_size squares (data.preprocess)")
    channels: Literal[1, 3] = 1
    # cca_ray/data/preprocess.py: how an image becomes the square, and which views of it become rows
    preprocess: Literal["resize", "center-crop", "var"] = Field(
        "resize", description="resize: squash to the square; center-crop: LlamaGen's (ADM's) centre crop; "
        "var: VAR's shorter side to 1.125 x image_size (Lanczos) and centre crop")
    augment: Literal["none", "flip", "ten-crop"] = Field(
        "none", description="train images also as views (rows of their own): flip = + the mirror (LlamaGen's "
        "code extraction), ten-crop = LlamaGen's --ten-crop (10 crops of a 1.1x centre crop)")
    holdout_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    max_images: int | None = Field(None, gt=0, description="cap on images read (None: all)")
    shard_rows: int = Field(2048, gt=0)
    row_group_rows: int = Field(64, gt=0, description="rows per parquet row group: a streamed trainer rank "
                                "(train.data_loading=stream) reads whole row groups, about this many rows for each "
                                "row it trains on")
    null_prob: float = Field(0.1, ge=0.0, le=1.0, description="CCA+CFG null-condition probability")
    on_bad_row: Literal["error", "skip"] = "error"
    tokenizer_workers: int = Field(1, gt=0, description="actors in the Ray Data tokenizer pool")
    tokenizer_batch_size: int = Field(64, gt=0, description="images per tokenizer map_batches call")
    tokenizer_num_gpus: float = Field(0.0, ge=0.0, description="GPUs per tokenizer actor (0 = CPU)")
    reference_workers: int = Field(1, gt=0, description="actors in the reference-pass pool")
    reference_batch_size: int = Field(32, gt=0, description="pairs per reference-pass batch")
    reference_num_gpus: float = Field(0.0, ge=0.0, description="GPUs per reference-pass actor (0 = CPU)")
    seed: int = 0


class TokenizerConfig(_Section):
    """Image <-> code grid."""

    kind: Literal["kmeans", "emu3-vqvae", "llamagen-vq", "var-vqvae"] = "kmeans"
    codebook_size: int = Field(64, gt=1)
    patch_size: int = Field(2, gt=0)
    path: str | None = Field(None, description="local path of a pretrained tokenizer (emu3-vqvae)")
    kmeans_iters: int = Field(25, gt=0)
    kmeans_max_patches: int = Field(50_000, gt=0, description="k-means fits on at most this many train patches")
    seed: int = 0


# -- LlamaGen (model.family llamagen) -------------------------------------------------------
# LlamaGen's --gpt-model names, the choices of model.llamagen.gpt_model; tests/test_llamagen_stages.py
# holds them equal to cca_ray.models.llamagen.GPT_MODELS (not imported here: it would pull in torch).
LLAMAGEN_GPT_MODELS = ("GPT-tiny", "GPT-B", "GPT-L", "GPT-XL", "GPT-XXL", "GPT-XXXL", "GPT-1B", "GPT-3B", "GPT-7B")


class LlamaGenOptions(_Section):
    """LlamaGen's own CLI options (--gpt-model, --image-size, ...) for a released c2i .pt at model.path.
    Field names are load_llamagen's keyword arguments; unset = LlamaGen's default. A directory we saved
    records its own options, so these are read only for released files (cca_ray.models.loader_options)."""

    gpt_model: Literal[LLAMAGEN_GPT_MODELS] | None = Field(None, description="--gpt-model (required for a .pt file)")
    image_size: int | None = Field(None, gt=0, description="--image-size the file was trained at: 256 or 384 "
                                   "(required for a .pt file)")
    downsample_size: Literal[8, 16] | None = Field(None, description="--downsample-size of its VQ (default 16)")
    num_classes: int | None = Field(None, gt=0, description="--num-classes (default 1000)")
    cls_token_num: int | None = Field(None, gt=0, description="--cls-token-num (default 1)")
    codebook_size: int | None = Field(None, gt=1, description="--vocab-size: codes of its VQ (default 16384)")
    class_dropout_prob: float | None = Field(None, ge=0.0, le=1.0, description="--class-dropout-prob it was trained "
                                             "with: 0 = no null-class row; unset = read it from the file")


def _check_llamagen_options(m: "ModelConfig") -> None:
    given = m.llamagen.model_dump(exclude_none=True)
    released = m.family == "llamagen" and m.path and Path(m.path).suffix in (".pt", ".pth")
    missing = [k for k in ("gpt_model", "image_size") if k not in given]
    if released and missing:
        raise ValueError(f"model.path {m.path} is a released LlamaGen file: set "
                         + " and ".join(f"model.llamagen.{k}" for k in missing) + " (its --gpt-model / --image-size)")


# -- VAR (model.family var) ------------------------------------------------------------------
class VAROptions(_Section):
    """VAR's own options (its train.py / build_vae_var names) for a released ``var_d*.pth`` at model.path.
    Field names are load_var's keyword arguments; unset = VAR's default. A directory we saved records
    its own options, so these are read only for released files (cca_ray.models.loader_options)."""

    depth: Literal[16, 20, 24, 30] | None = Field(None, description="--depth of the release (required for a .pth file)")
    vae_path: str | None = Field(None, description="its VQVAE, vae_ch160v4096z32.pth (required for a .pth file)")
    patch_nums: list[int] | None = Field(None, description="--patch_nums the file was trained at (default "
                                         "1,2,3,4,5,6,8,10,13,16: 680 tokens)")
    drop_path_rate: float | None = Field(None, ge=0.0, lt=1.0, description="stochastic depth in training (default "
                                         "VAR's 0.1 * depth / 24, as CCA's dpr_ratio 1); scoring never drops")
    quant_resi: float | None = Field(None, ge=0.0, le=1.0, description="phi's residual ratio of its VQVAE "
                                     "(default 0.5)")


def _check_family_options(m: "ModelConfig") -> None:
    for fam, block in (("llamagen", m.llamagen), ("var", m.var)):
        given = block.model_dump(exclude_none=True)
        if given and m.family != fam:
            raise ValueError(f"model.{fam}.{next(iter(given))} is set but model.family is {m.family}")
    if m.family == "llamagen":
        _check_llamagen_options(m)
    released = m.family == "var" and m.path and Path(m.path).suffix in (".pt", ".pth")
    missing = [k for k in ("depth", "vae_path") if getattr(m.var, k) is None]
    if released and missing:
        raise ValueError(f"model.path {m.path} is a released VAR file: set "
                         + " and ".join(f"model.var.{k}" for k in missing) + " (its --depth and VQVAE file)")


# ---------------------------------------------------------------------------------------------
class ModelConfig(_Section):
    """The AR visual model. path=None builds a tiny random-init model under the workdir."""

    family: Literal["emu3", "llamagen", "var"] = "emu3"
    path: str | None = None
    hidden_size: int = Field(64, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int | None = Field(None, gt=0)
    intermediate_size: int | None = Field(None, gt=0)
    max_prompt_tokens: int = Field(32, gt=0, description="longest prompt accepted, in BPE tokens")
    dtype: Literal["float32", "bfloat16"] = "float32"
    gradient_checkpointing: bool = False
    seed: int = 0
    llamagen: LlamaGenOptions = LlamaGenOptions()
    var: VAROptions = VAROptions()

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads ({self.num_heads})")
        _check_family_options(self)
        return self


class TrainConfig(_Section):
    """One trainer for every objective; `pretrain` and `train` are two instances of this."""

    objective: Literal["sft", "cca", "cca_cfg", "dpo", "unlearning", "gft"] = Field(
        "cca", description="gft: Guidance-Free Training (beta-conditioned; guidance_beta chosen at sampling)")
    beta: float = Field(0.1, gt=0.0, description="CCA/DPO temperature on log p_theta/p_phi")
    lam: float = Field(1.0, ge=0.0, description="CCA weight of the negative (mismatched) term")
    lam_sampling: Literal["fixed", "loguniform"] = Field(
        "fixed", description="loguniform: lambda-conditioned CCA, a lambda per row drawn from lam_range, "
        "cca_lambda chosen at sampling time")
    lam_range: tuple[float, float] = Field((1.0, math.exp(9.0)), description="lambda-conditioned CCA: the "
                                           "log-uniform range of lambda (paper Table 5: [1, e^9])")
    lam_unlearning: float = Field(0.05, ge=0.0, description="unlearning: weight of the negative log-likelihood")
    cond_dropout: float = Field(0.1, ge=0.0, le=1.0, description="sft: probability a condition is replaced by null")
    reference: Literal["online", "precomputed"] = "online"
    lr: float = Field(3e-5, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    adam_betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps")
    micro_batch_size: int = Field(16, gt=0, description="pairs per worker per micro-step")
    grad_accum: int = Field(1, gt=0)
    grad_clip: float = Field(1.0, gt=0.0)
    zero_stage: Literal[0, 1, 2, 3] = 2
    bf16: bool = False
    num_workers: int = Field(2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    log_every: int = Field(10, gt=0)
    checkpoint_every: int = Field(50, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    max_failures: int = Field(2, ge=-1, description="worker-group restarts from the last checkpoint (-1: no limit)")
    start_timeout_s: float = Field(60.0, gt=0.0, description="how long one try to start the worker group waits "
                                   "for its resources")
    start_retries: int = Field(2, ge=0, description="tries to start the worker group after the first; then the "
                               "run fails naming the resources it asked for and what the cluster has")
    inject_failure_at_step: int | None = Field(
        None, gt=0, description="testing hook: the last rank raises once when it reaches this optimizer step "
        "(a marker file in the run dir makes it once), to exercise resume")
    seed: int = Field(0, description="data order (per-epoch permutation) and condition-dropout draws")
    data_loading: Literal["stream", "memory"] = Field(
        "stream", description="stream: each rank reads from the shards only the rows of its next two steps "
        "(cca_ray/train/stream.py); memory: each rank loads the whole dataset. Same batches either way")

    @model_validator(mode="after")
    def _lam_sampling(self) -> "TrainConfig":
        return _check_lam_sampling(self)


def _check_lam_sampling(tc: "TrainConfig") -> "TrainConfig":
    low, high = tc.lam_range
    if not 0 < low < high or not math.isfinite(high):
        raise ValueError(f"lam_range must be [low, high] with 0 < low < high, got {list(tc.lam_range)}")
    if tc.lam_sampling == "loguniform" and tc.objective not in ("cca", "cca_cfg"):
        raise ValueError(f"lam_sampling=loguniform is lambda-conditioned CCA: objective must be cca or cca_cfg, "
                         f"got {tc.objective}")
    return tc


class SampleConfig(_Section):
    """Default decoding settings (sampler, evaluation, serving)."""

    guidance_scale: float = Field(0.0, ge=0.0, description="0 = guidance-free (one forward per token)")
    temperature: float = Field(1.0, gt=0.0)
    top_k: int | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    batch_size: int = Field(64, gt=0)
    cfg_schedule: Literal["linear", "constant"] = Field(
        "linear", description="VAR: guidance per scale; linear = VAR's ramp g * k / (K - 1) over its K scales "
        "(CFGv2, its sampler's default), constant = g at every scale. Raster families: always constant")
    cca_lambda: float | None = Field(None, gt=0.0, description="serve: lambda of a lambda-conditioned CCA model when a "
                                     "request gives none; None: the model's default")
    guidance_beta: float | None = Field(None, ge=0.0, le=1.0, description="serve: beta of a GFT model when a request "
                                        "gives none; None: the model's default")


class EvalConfig(_Section):
    num_samples: int = Field(1000, gt=0, description="images for the final evaluation")
    proxy_num_samples: int = Field(200, gt=0, description="images for the FID proxy used in sweeps")
    extractor: Literal["mnist-cnn", "inception-v3"] = "mnist-cnn"
    inception_weights: str | None = None
    # the standard ImageNet FID (LlamaGen, VAR): against precomputed statistics, on resized samples
    reference_stats: str | None = Field(None, description="npz with Inception mu/sigma (ADM's "
                                        "VIRTUAL_imagenet256_labeled.npz): FID against them (cca_ray/evaluate/reference_stats.py)")
    image_size: int | None = Field(None, gt=0, description="resize samples to this size (bicubic) before scoring; "
                                   "None: as decoded")
    classifier_epochs: int = Field(12, gt=0, description="mnist-cnn: epochs over the train split (trained once, cached)")
    cfg_scales: list[float] = [0.0, 0.5, 1.0, 2.0, 3.0]
    lam_values: list[float] = Field([1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0], description="a lambda-conditioned "
                                    "model is scored at each of these (inside its trained range)")
    beta_values: list[float] = Field([1.0, 0.7, 0.5, 0.35, 0.25], description="a GFT model is scored at each guidance_beta")
    kid_subset_size: int = Field(100, gt=1)
    prc_neighborhood: int = Field(3, gt=0)
    workers: int = Field(2, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs each evaluation sampling task holds (0: CPU "
                                   "tasks); the tasks load the model in model.dtype")
    seed: int = Field(1234, description="image i of the final evaluation uses seed + i")
    # ASHA selects on the proxy; the reported table must not reuse its samples: other seeds, other real images
    proxy_seed: int = Field(1_000_000, description="image i of the FID proxy uses proxy_seed + i "
                            "(must not overlap the final evaluation's seeds)")
    proxy_reference_size: int = Field(1000, gt=0, description="train-split images the FID proxy compares against "
                                      "(the final table compares against the holdout)")
    # where the FID proxy's images are drawn during training (cca_ray.tune.sweep.FidProxy)
    proxy_runner: Literal["auto", "in_process", "task"] = Field(
        "auto", description="in_process: training rank 0 samples its live weights (fast on CPU; refused under "
        "train.zero_stage 3, where rank 0 holds only a partition); task: the ranks gather the weights, rank 0 "
        "writes a 16-bit export to <run_dir>/proxy_export and Ray tasks (GPU tasks when train.use_gpu) sample "
        "it; auto: task under ZeRO-3 or on GPU, else in_process")

    @model_validator(mode="after")
    def _proxy_seeds_disjoint(self) -> EvalConfig:
        proxy = range(self.proxy_seed, self.proxy_seed + self.proxy_num_samples)
        final = range(self.seed, self.seed + self.num_samples)
        if proxy.start < final.stop and final.start < proxy.stop:
            raise ValueError(f"eval.proxy_seed: the proxy's seeds [{proxy.start}, {proxy.stop}) overlap the final "
                             f"evaluation's [{final.start}, {final.stop}); pick a proxy_seed outside that range")
        return self


class TuneConfig(_Section):
    space: str | None = Field(None, description="tune space YAML; None = the preset's own")
    num_trials: int = Field(8, gt=0)
    max_concurrent_trials: int = Field(1, gt=0)
    report_every: int = Field(50, gt=0, description="steps between FID-proxy reports")
    grace_period: int = Field(1, gt=0, description="ASHA: reports before a trial may be stopped")
    reduction_factor: float = Field(2.0, gt=1.0)
    baselines: list[Literal["dpo", "unlearning"]] = ["dpo", "unlearning"]
    extra_methods: list[Literal["lam_conditioned", "gft"]] = Field(
        [], description="also train a lambda-conditioned CCA model and/or a GFT model (same budget) and draw "
        "them over eval.lam_values / eval.beta_values on the trade-off plot")
    seed: int = 0


class ServeConfig(_Section):
    """The HTTP images API (stage `serve`). The API is unauthenticated: keep host on loopback
    unless the network in front of it does the authentication."""

    host: str = Field("127.0.0.1", description="bind address; anything but loopback exposes an unauthenticated API")
    port: int = Field(8000, gt=0, lt=65536)
    checkpoint: str | None = Field(
        None, description="local model dir or MLflow URI (models:/name/version, runs:/id/path); "
        "None: the newest export under checkpoint_dir, else base_model_dir")
    tokenizer_dir: str | None = Field(
        None, description="image tokenizer dir; None: next to the checkpoint, else data_dir/tokenizer")
    label_source: str | None = Field(
        None, description="class label -> prompt map: a JSON file or a dataset dir of parquet shards; "
        "None: data_dir/holdout, then data_dir/train")
    model_name: str | None = Field(None, description="the model id clients see; None: the checkpoint's name")
    replicas: int = Field(1, gt=0, description="replicas (the minimum when autoscaling)")
    autoscale_max_replicas: int | None = Field(None, gt=0, description="set to autoscale between replicas and this")
    autoscale_target_ongoing_requests: float = Field(8.0, gt=0.0, description="autoscaler's per-replica target")
    num_cpus: float = Field(1.0, gt=0.0, description="CPUs per replica (also its torch threads)")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per replica (>0 samples on CUDA)")
    max_n: int = Field(8, gt=0, description="most images one request may ask for")
    max_body_bytes: int = Field(1 << 20, gt=0, description="largest request body accepted; larger gets a 413")
    max_batch_size: int = Field(16, gt=0, description="most images in one batched decode")
    batch_wait_timeout_s: float = Field(0.05, ge=0.0, description="how long a batch waits to fill")
    request_timeout_s: float = Field(120.0, gt=0.0, description="a request waiting longer gets a 504")
    max_ongoing_requests: int = Field(32, gt=0, description="requests inside one replica (queued for a batch or decoding)")
    max_queued_requests: int = Field(64, gt=0, description="requests waiting for a replica; beyond it: backpressure_status")
    backpressure_status: Literal[429, 503] = Field(429, description="HTTP status when max_queued_requests is full")
    log_images_to_mlflow: bool = Field(False, description="log a grid of every batch into an MLflow evaluation run")

    @model_validator(mode="after")
    def _n_fits_a_batch(self) -> "ServeConfig":
        if self.max_n > self.max_batch_size:
            raise ValueError(f"serve.max_n ({self.max_n}) must be <= serve.max_batch_size ({self.max_batch_size}): "
                             "one request's images are decoded in one batch")
        if self.autoscale_max_replicas is not None and self.autoscale_max_replicas < self.replicas:
            raise ValueError(f"serve.autoscale_max_replicas ({self.autoscale_max_replicas}) must be >= serve.replicas "
                             f"({self.replicas})")
        return self


class Config(_Section):
    preset: str = "demo"
    workdir: str = "./cca_work"
    experiment: str = "cca-ray"
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: ModelConfig = ModelConfig()
    pretrain: TrainConfig = TrainConfig(objective="sft", lr=1e-3, epochs=5)
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    eval: EvalConfig = EvalConfig()
    tune: TuneConfig = TuneConfig()
    serve: ServeConfig = ServeConfig()

    @model_validator(mode="after")
    def _proxy_runner_fits_zero3(self) -> "Config":
        if self.eval.proxy_runner == "in_process" and self.train.zero_stage == 3:
            raise ValueError("eval.proxy_runner=in_process samples on training rank 0, which under train.zero_stage=3 "
                             "holds only its partition of the weights (the other ranks would hang in the next "
                             "collective); set eval.proxy_runner to auto or task")
        return self

    def proxy_runs_as_task(self) -> bool:
        """Whether the FID proxy samples an export in Ray tasks (eval.proxy_runner; auto: under ZeRO-3 or GPU)."""
        if self.eval.proxy_runner == "auto":
            return self.train.zero_stage == 3 or self.train.use_gpu
        return self.eval.proxy_runner == "task"

    # -- paths under the workdir: every stage agrees on them --------------------------
    @property
    def root(self) -> Path:
        return Path(self.workdir).expanduser().resolve()

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def base_model_dir(self) -> Path:
        """The consolidated base checkpoint (pretrain's export, or the random-init tiny model)."""
        return Path(self.model.path).expanduser().resolve() if self.model.path else self.root / "models" / "base"

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def mlflow_uri(self) -> str:
        import os

        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.root / 'mlflow.db'}"


# the loading half (presets, files, overrides, paths) lives in config_loading; importable from here too
from cca_ray.config_loading import (  # noqa: E402
    PATH_FIELDS,
    PRESET_DIR,
    ConfigError,
    absolute_path,
    available_presets,
    dump_config,
    flat_params,
    load_config,
    parse_override,
    with_overrides,
)

__all__ = ["Config", "ConfigError", "DataConfig", "EvalConfig", "LLAMAGEN_GPT_MODELS", "LlamaGenOptions",
           "ModelConfig", "PATH_FIELDS", "PRESET_DIR", "VAROptions",
           "SampleConfig", "ServeConfig", "TokenizerConfig", "TrainConfig", "TuneConfig", "absolute_path",
           "available_presets", "dump_config", "flat_params", "load_config", "parse_override", "with_overrides"]
