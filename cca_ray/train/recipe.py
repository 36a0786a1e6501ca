"""One rank of training: a DeepSpeed engine over the policy's scorer module (no Ray in here).

Per optimizer step a rank runs `grad_accum` micro-steps over its own rows (train_data.BatchPlan):
positives and their paired negatives share one forward ([pos; neg] conditions, the image codes
twice); the frozen reference (a second, optimizer-less DeepSpeed engine) scores the same batch
under no_grad, or its log-probs come precomputed from `pairs_ref`. The loss is
`cca_ray.loss.objective_loss`; DeepSpeed averages gradients across ranks, clips and steps.
Metric sums are kept per window and all-reduced over ranks when reported.

`cca_ray.train` runs a Trainer in every Ray Train worker; tests and benchmarks run one in a
one-rank process group (`local_process_group`).
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from cca_ray.train import checkpoint as ckpt
from cca_ray.train import gathered
from cca_ray import tracking
from cca_ray.models import knob as knobs
from cca_ray.config import Config
from cca_ray.loss import finalize_metrics, objective_loss
from cca_ray.telemetry import TrainMetrics
from cca_ray.train.engine import (  # noqa: F401 (re-exported: tests and benchmarks import them from here)
    deepspeed_config,
    effective_bf16,
    knob_spec,
    local_process_group,
    lr_factor,
    quiet_deepspeed,
    reference_config,
)
from cca_ray.train.batches import (
    REFERENCE_OBJECTIVES,
    BatchPlan,
    TrainRows,
    check_reference_columns,
    draw_knob,
    make_micro_batch,
    total_steps,
)
from cca_ray.train.stream import StreamedRows, open_feed

log = logging.getLogger("cca_ray.train")
METRICS = ("loss", "rel_logp_pos", "rel_logp_neg", "pair_accuracy", "margin", "grad_norm", "lr", "tokens_per_s",
           "samples_per_s")


# -- the recipe: setup / train / save_checkpoint ------------------------------------------
@dataclass
class _Window:
    """Metric sums since the last report (this rank only)."""

    sums: dict[str, float] = field(default_factory=dict)
    grad_norm: float = 0.0
    steps: int = 0
    tokens: int = 0
    samples: int = 0
    start: float = field(default_factory=time.perf_counter)


class Trainer:
    """One rank's training: `setup()`, `train()`; `step_once()` runs one optimizer step (benchmarks call it).

    `report(metrics, checkpoint_dir | None)` hands results out (Ray: ray.train.report); `mlflow`
    is (tracking_uri, run_id) for rank 0, which also sets the Prometheus gauges of cca_ray.telemetry
    (tags: run=`run_name`, default the run dir's name; objective); `extra_report_fn(trainer) -> dict`
    runs on every rank every `extra_report_every` steps (Tune's FID proxy), its metrics join that step's report;
    under ZeRO-3 it must be collective (cca_ray.train.gathered.export_weights), never sample on one rank.
    `export_at_end`: at the last step the ranks write `<run_dir>/export` themselves (cca_ray.train.gathered),
    which the driver reuses instead of consolidating the checkpoint.
    Metrics: tokens_per_s counts the image tokens the policy scored (2 h*w per pair for paired
    objectives, h*w per image for sft), samples_per_s the images (pairs) per second, all ranks together.
    """

    def __init__(self, cfg: Config, section: str, *, model_dir: str | Path, data: TrainRows | StreamedRows,
                 rank: int = 0, world_size: int = 1, run_dir: str | Path | None = None,
                 mlflow: tuple[str, str] | None = None,
                 report: Callable[[dict, str | None], None] | None = None,
                 extra_report_fn: Callable[[Trainer], dict] | None = None, extra_report_every: int | None = None,
                 run_name: str | None = None, export_at_end: bool = False):
        self.cfg, self.section, self.tc = cfg, section, getattr(cfg, section)
        self.model_dir, self.data = Path(model_dir), data
        self.rank, self.world_size = rank, world_size
        self.run_dir = Path(run_dir) if run_dir else None
        self.run_name = run_name or (self.run_dir.name if self.run_dir else section)
        # rank 0 exports the all-reduced curves (one series per run, not one per rank); a no-op outside Ray
        self.telemetry = TrainMetrics() if rank == 0 else None
        self.mlflow, self.report_fn = mlflow, report
        self.extra_report_fn, self.extra_report_every = extra_report_fn, extra_report_every
        self.export_at_end = export_at_end and self.run_dir is not None
        self.plan = BatchPlan(len(data), world_size, self.tc.micro_batch_size, self.tc.grad_accum, self.tc.seed)
        self.plan.check(data.source)
        self.total_steps = total_steps(self.plan, self.tc.epochs, self.tc.max_steps)
        self.feed = open_feed(data, self.plan, rank, self.total_steps)  # this rank's rows, step by step
        self.online_reference = self.tc.objective in REFERENCE_OBJECTIVES and self.tc.reference == "online"
        if not self.online_reference:
            check_reference_columns(data, self.tc.objective)
        self.step = 0  # optimizer steps done == the data position
        self.fingerprint = 0
        self.resumed_from = 0
        self.ref_engine = None
        self.load_mode = ""  # how the starting weights reached the ranks (set in setup())
        self.precision = ""  # the line saying bf16 or fp32 and why (engine.effective_bf16), set in setup()
        self.knob = None  # the policy's KnobSpec (λ-conditioned CCA, GFT), set in setup()
        self._grad_norm = float("nan")
        self._perm: tuple[int, Any] = (-1, None)
        # rank 0's metrics wait here until the checkpoint covering their step is committed (see _flush_mlflow)
        self.pending_mlflow: list[tuple[int, dict[str, float]]] = []
        self.mlflow_logged_upto = -1

    # -- setup ---------------------------------------------------------------------------
    def _load(self, ds_config: dict):
        """The starting weights. ZeRO-3 with several ranks (families that build from their config): loaded
        partitioned, rank 0 alone reading the weights (cca_ray.train.gathered.load_partitioned). Otherwise
        whole on CPU on each rank; deepspeed.initialize moves them to the device (and partitions them).
        bf16 runs load bf16 weights: DeepSpeed casts the module to bf16 before it builds its fp32 master
        copy anyway, and it halves the host memory while loading."""
        from cca_ray.models import builds_without_weights, load_model, loader_options

        options = loader_options(self.cfg.model, self.model_dir)
        dtype = torch.bfloat16 if self.tc.bf16 else torch.float32
        if self.tc.zero_stage == 3 and self.world_size > 1 and builds_without_weights(self.model_dir,
                                                                                      options.get("family")):
            self.load_mode = "weights loaded partitioned (ZeRO-3: rank 0 read them, each rank holds its slice)"
            return gathered.load_partitioned(self.model_dir, options, dtype=dtype, ds_config=ds_config, rank=self.rank)
        self.load_mode = "weights loaded whole on each rank"
        return load_model(self.model_dir, **options, device="cpu", dtype=dtype)

    def setup(self, resume_dir: str | Path | None = None) -> Trainer:
        import deepspeed

        use_gpu = self.tc.use_gpu and torch.cuda.is_available()
        bf16, self.precision = effective_bf16(self.tc, use_gpu)
        self.tc = tc = self.tc.model_copy(update={"bf16": bf16})  # the CPU fallback: see effective_bf16
        if self.rank == 0 and self.mlflow is not None:
            tracking.set_tags(*self.mlflow, {"precision": self.precision})
        quiet_deepspeed(use_gpu)
        torch.manual_seed(tc.seed)
        ds_config = deepspeed_config(tc, self.world_size)
        self.adapter = self._load(ds_config)
        if self.rank == 0 and self.mlflow is not None:
            tracking.set_tags(*self.mlflow, {"weights_loading": self.load_mode})
        module = self.adapter.module
        # Emu3: only the visual rows of lm_head are trained (log-probs read no other row); before the engine exists
        if hasattr(self.adapter, "train_visual_head_only"):
            self.adapter.train_visual_head_only()
        spec = knob_spec(tc)
        if spec is not None and knobs.spec_of(module) is None:
            # zero-initialised output: at step 0 the policy is exactly the base model
            knobs.attach(module, self.adapter.condition_dim, spec)
        self.knob = knobs.spec_of(module) if spec is not None else None
        if self.cfg.model.gradient_checkpointing:
            self.adapter.enable_gradient_checkpointing()
        ckpt.freeze_untrained(module, self.adapter.frozen_prefixes)
        if tc.zero_stage == 3:  # e.g. Emu3's visual-slice head reads lm_head.weight without calling lm_head
            for p in self.adapter.external_parameters():
                deepspeed.zero.register_external_parameter(module, p)
        params = [p for p in module.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.adam_betas), weight_decay=tc.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, partial(lr_factor, warmup=tc.warmup_steps, total=self.total_steps, schedule=tc.schedule))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=opt, lr_scheduler=sched, config=ds_config)
        self.engine.train()
        if self.online_reference:
            ref = self._load(reference_config(tc, self.world_size))
            ref.module.requires_grad_(False)
            if tc.zero_stage == 3:
                for p in ref.external_parameters():
                    deepspeed.zero.register_external_parameter(ref.module, p)
            self.ref_engine = deepspeed.initialize(model=ref.module, config=reference_config(tc, self.world_size))[0]
            self.ref_engine.eval()
        if resume_dir is not None:
            state = ckpt.load_engine(self.engine, resume_dir)
            self.step, self.fingerprint = int(state["step"]), int(state["data_fingerprint"])
            self.resumed_from = self.step
            # what the checkpoint covers but a kill may have kept from MLflow
            self.pending_mlflow = [(int(s), m) for s, m in state.get("pending_mlflow", [])]
        if self.rank == 0 and self.mlflow is not None:
            self.mlflow_logged_upto = tracking.last_logged_step(*self.mlflow)
            self._flush_mlflow()
        return self

    # -- one optimizer step ----------------------------------------------------------------
    def micro_batch_loss(self, mb, seed: tuple[int, ...] = (0,)) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        """Forward one micro-batch: (loss, metric sums, image tokens scored by the policy).
        `seed` draws the per-row knob values (λ-conditioned CCA, GFT): (train.seed, step, rank, micro)."""
        tc = self.tc
        if tc.objective == "gft":
            return self._gft_loss(mb, seed)
        paired = mb.neg_conds is not None
        cond = self.adapter.encode_conditions(mb.pos_conds + (mb.neg_conds or []), self.data.grid)
        codes = torch.cat([mb.codes, mb.codes]) if paired else mb.codes
        # drop-path (VAR) from per-row seeds when a reference is compared: the same draws as the reference's
        seeds = mb.row_seeds if paired and getattr(self.adapter, "takes_drop_seeds", False) else None
        drop = {} if seeds is None else {"drop_seeds": torch.cat([seeds, seeds])}
        m = mb.num_images
        lam, policy_cond = tc.lam, cond  # the reference (the base model) never sees λ
        if tc.lam_sampling == "loguniform":  # one λ per pair: the row's positive and its negative share it
            lam = draw_knob("lam", m, seed, tc.lam_range)
            policy_cond = cond.with_knob(torch.cat([lam, lam]) if paired else lam)
        logp = self.adapter.sequence_logprob(policy_cond, codes, module=self.engine, **drop)
        logps = {"policy_logp_pos": logp[:m], "policy_logp_neg": logp[m:] if paired else None,
                 "neg_is_null": mb.neg_is_null}
        if self.ref_engine is not None:
            with torch.no_grad():
                ref = self.adapter.sequence_logprob(cond, codes, module=self.ref_engine, **drop)
            logps.update(ref_logp_pos=ref[:m], ref_logp_neg=ref[m:])
        elif mb.ref_logp_pos is not None:
            logps.update(ref_logp_pos=mb.ref_logp_pos.to(logp.device), ref_logp_neg=mb.ref_logp_neg.to(logp.device))
        loss, metrics = objective_loss(tc.objective, logps, beta=tc.beta, lam=lam,
                                       lam_unlearning=tc.lam_unlearning, num_tokens=self.data.num_codes)
        return loss, metrics, codes.shape[0] * self.data.num_codes

    def _gft_loss(self, mb, seed: tuple[int, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        """GFT (cca_ray.loss.gft_loss): β ~ U(0, 1) per row, β = 1 where the label was dropped; the
        conditional logits l(x|c, β) with gradient, the unconditional l(x|∅, β=1) of the same policy without."""
        m, grid = mb.num_images, self.data.grid
        dropped = torch.tensor([c is None for c in mb.pos_conds])
        beta = torch.where(dropped, 1.0, draw_knob("beta", m, seed))
        cond = self.adapter.encode_conditions(mb.pos_conds, grid).with_knob(beta)
        cond_logits = self.adapter.token_logits(cond, mb.codes, module=self.engine)
        with torch.no_grad():
            null = self.adapter.null_condition(m, grid).with_knob(torch.ones(m))
            uncond_logits = self.adapter.token_logits(null, mb.codes, module=self.engine)
        targets = mb.codes.flatten(1).to(cond_logits.device)
        loss, metrics = objective_loss("gft", {"cond_logits": cond_logits, "uncond_logits": uncond_logits,
                                              "targets": targets, "gft_beta": beta}, beta=self.tc.beta,
                                       lam=self.tc.lam, lam_unlearning=self.tc.lam_unlearning,
                                       num_tokens=self.data.num_codes)
        return loss, metrics, 2 * m * self.data.num_codes

    def step_once(self, window: _Window | None = None) -> None:
        """Optimizer step `self.step` (0-based): grad_accum micro-steps over this rank's rows."""
        tc, plan = self.tc, self.plan
        epoch = plan.epoch_of(self.step)
        if self._perm[0] != epoch:
            self._perm = (epoch, plan.permutation(epoch))
        self.lr = float(self.engine.get_lr()[0])  # the lr this step uses (the scheduler steps inside engine.step)
        step_rows, micro_rows = self.feed.step_rows(self.step)
        for micro in range(tc.grad_accum):
            mb = make_micro_batch(step_rows, micro_rows[micro], tc.objective, cond_dropout=tc.cond_dropout,
                                  dropout_seed=(tc.seed, self.step, self.rank, micro))
            loss, metrics, tokens = self.micro_batch_loss(mb, seed=(tc.seed, self.step, self.rank, micro))
            self.engine.backward(loss)
            if micro == tc.grad_accum - 1 and tc.zero_stage == 0 and not tc.bf16:
                # DeepSpeed's fp32 stage-0 path clips without keeping the norm; grads are all-reduced by now
                self._grad_norm = float(torch.nn.utils.get_total_norm(
                    [p.grad for p in self.engine.module.parameters() if p.grad is not None]))
            self.engine.step()
            if window is not None:
                for k, v in metrics.items():
                    window.sums[k] = window.sums.get(k, 0.0) + float(v)
                window.tokens += tokens
                window.samples += mb.num_images
        self.fingerprint = (self.fingerprint + plan.step_fingerprint(self.step, self._perm[1])) % (2**31 - 1)
        self.step += 1
        if window is not None:
            gn = self.engine.get_global_grad_norm()
            window.grad_norm += float(gn) if gn is not None else self._grad_norm
            window.steps += 1

    # -- the loop ----------------------------------------------------------------------------
    def _maybe_inject_failure(self) -> None:
        k = self.tc.inject_failure_at_step
        if k is None or self.step + 1 != k or self.rank != self.world_size - 1 or self.run_dir is None:
            return
        marker = self.run_dir / f".injected_failure_step_{k}"
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"rank {self.rank} failed on purpose at step {k}\n")
            raise RuntimeError(f"injected failure at step {k} on rank {self.rank} (train.inject_failure_at_step)")

    def reduce_window(self, window: _Window) -> dict[str, float]:
        """All-reduce a window's sums over ranks and turn them into the reported metrics."""
        import torch.distributed as dist

        keys = sorted(window.sums)
        vec = torch.tensor([window.sums[k] for k in keys] + [window.tokens, window.samples], dtype=torch.float64)
        elapsed = torch.tensor([time.perf_counter() - window.start], dtype=torch.float64)
        if dist.is_initialized() and self.world_size > 1:
            dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            vec, elapsed = vec.to(dev), elapsed.to(dev)  # NCCL reduces CUDA tensors only
            dist.all_reduce(vec)  # ranks' sums add up
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            vec, elapsed = vec.cpu(), elapsed.cpu()
        sums = dict(zip(keys, vec[: len(keys)].tolist()))
        out = {k: float(v) for k, v in finalize_metrics(sums).items()}
        secs = max(float(elapsed), 1e-9)
        out.update(grad_norm=window.grad_norm / max(1, window.steps), lr=self.lr,
                   tokens_per_s=float(vec[-2]) / secs, samples_per_s=float(vec[-1]) / secs)
        out.update(step=self.step, epoch=self.step / self.plan.steps_per_epoch,
                   data_fingerprint=self.fingerprint, resumed_from_step=self.resumed_from)
        return out

    def train(self) -> dict[str, float]:
        """Run to total_steps, reporting and checkpointing on schedule; returns the last metrics."""
        tc, last = self.tc, {}
        window = _Window()
        while self.step < self.total_steps:
            self._maybe_inject_failure()
            self.step_once(window)
            done = self.step == self.total_steps
            want_ckpt = done or self.step % tc.checkpoint_every == 0
            want_extra = self.extra_report_fn is not None and self.extra_report_every and (
                done or self.step % self.extra_report_every == 0)
            if not (want_ckpt or want_extra or self.step % tc.log_every == 0):
                continue
            last = self.reduce_window(window)
            if want_extra:
                last.update(self.extra_report_fn(self) or {})
            if self.rank == 0:
                self._log(last)
            if done and self.export_at_end and gathered.holds_full_precision(self):
                gathered.export_weights(self, self.run_dir / gathered.FINAL_EXPORT)
            if want_ckpt:
                self.save_checkpoint(last)
            elif self.report_fn is not None:
                self.report_fn(last, None)
            window = _Window()
        return last

    def _log(self, metrics: dict[str, float]) -> None:
        shown = " ".join(f"{k}={metrics[k]:.4g}" for k in METRICS if k in metrics and math.isfinite(metrics[k]))
        # logging, not print: Ray Train tees a worker's print to stdout and to its log, so it showed twice
        log.info("[%s] step %d/%d %s", self.section, self.step, self.total_steps, shown)
        if self.mlflow is not None:
            self.pending_mlflow.append((self.step, {k: v for k, v in metrics.items() if k != "step"}))
        if self.telemetry is not None:
            self.telemetry.record(metrics, {"run": self.run_name, "objective": self.tc.objective})

    def _flush_mlflow(self) -> None:
        """Write the buffered metrics to MLflow, skipping steps it already holds.

        MLflow only ever gets steps a committed checkpoint covers: after a worker dies, the group
        restarts from the last committed checkpoint and redoes the steps past it, which would
        otherwise be logged twice. The buffer travels in the checkpoint (a kill between commit and
        flush loses nothing) and `mlflow_logged_upto` (read back from MLflow on setup) drops what a
        flush before the kill already wrote. Each step is in the history exactly once."""
        if self.mlflow is None:
            self.pending_mlflow = []
            return
        for step, metrics in self.pending_mlflow:
            if step > self.mlflow_logged_upto:
                tracking.log_metrics(*self.mlflow, {**metrics, tracking.STEP_KEY: step}, step=step)
                self.mlflow_logged_upto = step
        self.pending_mlflow = []

    def save_checkpoint(self, metrics: dict[str, float]) -> None:
        """Each rank writes its shard into its own temp dir and reports it; Ray merges the uploads.
        Ray's report returns once the checkpoint is persisted: then rank 0 flushes the metrics it covers."""
        state = {"step": self.step, "total_steps": self.total_steps, "epoch": self.plan.epoch_of(max(0, self.step - 1)),
                 "data_fingerprint": self.fingerprint, "section": self.section, "objective": self.tc.objective,
                 "pending_mlflow": self.pending_mlflow if self.rank == 0 else [],
                 "knob": knobs.spec_to_dict(self.knob), "condition_dim": self.adapter.condition_dim}
        with tempfile.TemporaryDirectory(prefix=f"cca_ckpt_r{self.rank}_") as tmp:
            ckpt.save_engine(self.engine, tmp, state, self.rank)
            if self.report_fn is not None:
                self.report_fn(metrics, tmp)
        if self.rank == 0:
            self._flush_mlflow()

    def gathered_weights(self):
        """Context in which `self.adapter` holds the full current weights. Collective under ZeRO-3 (every
        rank must enter it); a no-op otherwise, where each rank's module already holds them."""
        import contextlib

        if self.tc.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()))

    def cleanup(self) -> None:
        self.feed.close()
        self.engine = self.ref_engine = None
