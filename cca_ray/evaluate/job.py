"""Stage `evaluate`: sample a model with fixed seeds, score with torch-fidelity, log to MLflow.

    python -m cca_ray.evaluate --preset demo                       # the base model, over eval.cfg_scales
    python -m cca_ray.evaluate --checkpoint DIR --guidance 0       # one model, guidance-free
    python -m cca_ray.evaluate --checkpoint DIR --cca-lambda 1 10 100 1000   # a λ-conditioned model at each λ
    python -m cca_ray.evaluate --checkpoint DIR --guidance-beta 1 0.5 0.25   # a GFT model at each β

Samples are class-balanced over the dataset's labels (image i asks for class i mod C, with seed
eval.seed + i); on caption data (no labels: JourneyDB) image i takes the i-th held-out caption
(cycled), and condition accuracy is left out (no classifier reads captions). They are drawn over
Ray workers and scored against the held-out *real* images with the extractor eval.extractor
(mnist-cnn: trained once on the real train split and cached). Real images are decoded lazily,
one split's rows only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cca_ray.config import Config
from cca_ray.evaluate.report import format_table
from cca_ray.models import condition_kind, is_checkpoint, loader_options

@dataclass
class EvalSetup:
    """Everything scoring needs, built once per run: extractor, cached reference, conditions (class prompts,
    or for caption data the held-out captions)."""

    cfg: Config
    extractor: object
    reference: object
    label_to_prompt: dict[int, str]
    tokenizer_dir: Path
    condition_kind: str = "prompt"  # what the model family is conditioned on: prompts or class ids
    captions: list[str] = field(default_factory=list)  # caption data: the holdout's prompts, in order


def real_split(cfg: Config, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The real images (uint8 [N,H,W,C]) and labels of a split (the first `limit` in source order),
    re-read from the source with the same deterministic split rule as `prepare` (shards hold codes,
    FID needs pixels). Lazily: the other split's rows are skipped before decoding, and reading stops at
    `limit`, so the proxy's train-split reference never touches the rest of the train split."""
    from cca_ray.data.sources import iter_rows, make_source, split_of

    def in_split(source_id: str) -> bool:
        return split_of(source_id, cfg.data.seed, cfg.data.holdout_fraction) == split

    imgs, labels = [], []
    for row in iter_rows(make_source(cfg.data), keep=in_split):
        if limit is not None and len(imgs) >= limit:
            break
        if row.error is None:
            imgs.append(row.image)
            labels.append(-1 if row.label is None else int(row.label))
    if not imgs:
        raise ValueError(f"data split '{split}' of source {cfg.data.source} is empty")
    return np.stack(imgs), np.asarray(labels, np.int64)


def holdout_conditions(cfg: Config) -> tuple[dict[int, str], list[str]]:
    """What evaluation samples are conditioned on, from the prepared holdout shards: (label -> prompt, [])
    when its rows carry labels (class-balanced sampling), else ({}, its captions in shard order)."""
    from cca_ray.data import read_dataset

    holdout = cfg.data_dir / "holdout"
    t = read_dataset(holdout, columns=["label", "prompt"], validate=False).to_pydict()
    by_label = {int(lab): p for lab, p in zip(t["label"], t["prompt"]) if lab is not None and p}
    if by_label:
        return dict(sorted(by_label.items())), []
    captions = [p for p in t["prompt"] if p]
    if not captions:
        raise ValueError(f"{holdout}: neither labelled rows nor captions; evaluation has no conditions to sample")
    return {}, captions


def eval_conditions(setup: EvalSetup, n: int) -> tuple[list, np.ndarray | None]:
    """n raw conditions and the labels they ask for: class-balanced when the data has labels, else the
    held-out captions in order, cycled, with labels None (no accuracy without a class to check)."""
    from cca_ray.evaluate.sampling import balanced_conditions

    if setup.label_to_prompt:
        return balanced_conditions(setup.label_to_prompt, n, setup.condition_kind)
    if setup.condition_kind == "label":
        raise ValueError(f"model.family={setup.cfg.model.family} is class-conditional but the holdout has no labels")
    return [setup.captions[i % len(setup.captions)] for i in range(n)], None


def eval_setup(cfg: Config, progress: bool = True) -> EvalSetup:
    from cca_ray.evaluate.extractors import extractor_from_config
    from cca_ray.evaluate.fidelity import prepare_reference
    from cca_ray.evaluate.reference_stats import resize_images, stats_reference

    # only mnist-cnn trains on the real train split (reading ImageNet's into memory would not fit)
    train_x, train_y = real_split(cfg, "train") if cfg.eval.extractor == "mnist-cnn" else (None, None)
    ext = extractor_from_config(cfg, train_x, train_y, progress=progress)

    def holdout():
        return resize_images(real_split(cfg, "holdout")[0], cfg.eval.image_size)

    if cfg.eval.reference_stats:  # FID against precomputed statistics (ADM's ImageNet batch)
        ref = stats_reference(cfg.eval.reference_stats, ext, fallback_images=holdout)
    else:
        ref = prepare_reference(holdout(), ext, dataset=f"{cfg.data.source}-holdout")
    by_label, captions = holdout_conditions(cfg)
    return EvalSetup(cfg, ext, ref, by_label, cfg.data_dir / "tokenizer", condition_kind(cfg.model.family), captions)


def proxy_setup(setup: EvalSetup) -> EvalSetup:
    """The FID proxy's setup: the same extractor and conditions, but its reference is the first
    eval.proxy_reference_size images of the train split, so ASHA never selects on the holdout images
    the final table is scored against (the proxy also samples with eval.proxy_seed)."""
    from dataclasses import replace

    from cca_ray.evaluate.fidelity import prepare_reference
    from cca_ray.evaluate.reference_stats import resize_images

    cfg = setup.cfg
    real = resize_images(real_split(cfg, "train", limit=cfg.eval.proxy_reference_size)[0], cfg.eval.image_size)
    return replace(setup, reference=prepare_reference(real, setup.extractor, dataset=f"{cfg.data.source}-train-proxy"))


def evaluate_model(
    setup: EvalSetup, model_path, *, guidance: float = 0.0, n: int | None = None, metrics=None, model=None,
    cca_lambda: float | None = None, guidance_beta: float | None = None, seed: int | None = None,
    task_gpus: float | None = None,
) -> tuple[dict, np.ndarray]:
    """Sample n images (eval_conditions: class-balanced, or held-out captions) from model_path (or an
    in-process `model`) and score them.
    cca_lambda / guidance_beta: the sampling-time knob of a λ-conditioned CCA / GFT model.
    seed: image i uses seed + i (default eval.seed; the FID proxy passes eval.proxy_seed).
    task_gpus: sample model_path only in Ray tasks of that many GPUs each (sampling.sample_parallel; default
    eval.gpus_per_worker when it is set). model_path is loaded in model.dtype (bf16 at real scale).

    Returns (metrics dict with fid, isc_mean, kid_mean, precision, recall, n, ..., and accuracy where the
    data has labels and the extractor a classifier head; images).
    """
    from cca_ray.evaluate.fidelity import ALL_METRICS, compute_metrics
    from cca_ray.evaluate.sampling import sample_local, sample_parallel

    cfg = setup.cfg
    n = n or cfg.eval.num_samples
    conds, labels = eval_conditions(setup, n)
    kw = dict(guidance=guidance, temperature=cfg.sample.temperature, top_k=cfg.sample.top_k, top_p=cfg.sample.top_p,
              seed=cfg.eval.seed if seed is None else seed, batch_size=cfg.sample.batch_size,
              cca_lambda=cca_lambda, guidance_beta=guidance_beta, cfg_schedule=cfg.sample.cfg_schedule)
    if model is not None:
        from cca_ray.tokenizers import load_tokenizer

        images = sample_local(model, load_tokenizer(setup.tokenizer_dir), conds, **kw)
    else:
        if task_gpus is None and cfg.eval.gpus_per_worker:
            task_gpus = cfg.eval.gpus_per_worker  # GPU tasks (a real-scale model is not sampled on CPUs)
        images = sample_parallel(model_path, setup.tokenizer_dir, conds, workers=cfg.eval.workers,
                                 load_options=loader_options(cfg.model, model_path), task_gpus=task_gpus,
                                 dtype=cfg.model.dtype, **kw)
    if cfg.eval.image_size:
        from cca_ray.evaluate.reference_stats import resize_images

        images = resize_images(images, cfg.eval.image_size)
    out = compute_metrics(
        images, setup.reference, setup.extractor, kid_subset_size=cfg.eval.kid_subset_size,
        prc_neighborhood=cfg.eval.prc_neighborhood, metrics=tuple(metrics or ALL_METRICS), labels=labels,
        seed=cfg.eval.seed,
    )
    out["guidance"] = guidance
    if cca_lambda is not None:
        out["lam"] = cca_lambda
    if guidance_beta is not None:
        out["beta"] = guidance_beta
    return out, images


def cfg_curve(setup: EvalSetup, model_path, scales, n: int | None = None, log=print) -> list[dict]:
    """The CFG baseline: the same model sampled at each guidance scale."""
    rows = []
    for s in scales:
        m, _ = evaluate_model(setup, model_path, guidance=float(s), n=n)
        rows.append(m)
        acc = f"  acc {m['accuracy']:.3f}" if "accuracy" in m else ""
        log(f"  guidance {s:<5g} FID {m['fid']:8.3f}  IS {m['isc_mean']:6.3f}{acc}")
    return rows


def knob_values(model_path, cfg: Config, values=None) -> tuple[str, list[float]]:
    """The knob a saved λ-conditioned / GFT model takes and the values to score it at: `values`, else
    eval.lam_values / eval.beta_values, kept to the trained range (ValueError for a model without a knob
    or a value given outside the range)."""
    from cca_ray.models import knob

    found = knob.saved_spec(model_path)
    if found is None:
        raise ValueError(f"{model_path}: not a λ-conditioned or GFT model (no {knob.SPEC_FILE}); "
                         "sample a fixed-λ model with --guidance")
    spec = found[0]
    if values is not None:
        return spec.name, [spec.check(float(v)) for v in values]
    grid = cfg.eval.lam_values if spec.name == "cca_lambda" else cfg.eval.beta_values
    kept = [float(v) for v in grid if spec.low <= v <= spec.high]
    return spec.name, kept or [spec.default]


def knob_curve(setup: EvalSetup, model_path, values=None, n: int | None = None, log=print) -> list[dict]:
    """One knob-conditioned model scored at many knob values (paper Table 5 / Figure 4: λ or β chosen at
    sampling time), guidance-free. Rows carry `lam` (cca_lambda) or `beta` (guidance_beta)."""
    name, values = knob_values(model_path, setup.cfg, values)
    rows = []
    for v in values:
        m, _ = evaluate_model(setup, model_path, guidance=0.0, n=n, **{name: v})
        rows.append(m)
        acc = f"  acc {m['accuracy']:.3f}" if "accuracy" in m else ""
        log(f"  {name} {v:<7g} FID {m['fid']:8.3f}  IS {m['isc_mean']:6.3f}{acc}")
    return rows


def main(argv=None) -> None:
    from cca_ray import tracking
    from cca_ray.cli import parse_stage_args

    def add(p):
        p.add_argument("--checkpoint", help="model directory to evaluate (default: the base model)")
        p.add_argument("--guidance", type=float, nargs="+", help="guidance scales (default: eval.cfg_scales)")
        p.add_argument("--num-samples", type=int, help="images per scale (default: eval.num_samples)")
        knobs = p.add_mutually_exclusive_group()
        knobs.add_argument("--cca-lambda", type=float, nargs="*", metavar="LAM",
                           help="a λ-conditioned model (train.lam_sampling=loguniform): score it guidance-free at each "
                           "λ (no value: eval.lam_values inside its trained range)")
        knobs.add_argument("--guidance-beta", type=float, nargs="*", metavar="BETA",
                           help="a GFT model (train.objective=gft): score it guidance-free at each β "
                           "(no value: eval.beta_values)")

    cfg, args = parse_stage_args("evaluate", "Sample a model and score it with torch-fidelity", argv, add)
    from cca_ray.raycluster import ensure_ray

    model_path = Path(args.checkpoint or cfg.base_model_dir)
    if not is_checkpoint(model_path):
        raise SystemExit(f"cca_ray.evaluate: error: no model at {model_path}; pass --checkpoint or run pretrain first")
    ensure_ray()
    setup = eval_setup(cfg)
    knob_given = args.cca_lambda if args.cca_lambda is not None else args.guidance_beta
    if knob_given is not None:
        try:
            name, values = knob_values(model_path, cfg, knob_given or None)
        except ValueError as e:
            raise SystemExit(f"cca_ray.evaluate: error: {e}") from None
        if name != ("cca_lambda" if args.cca_lambda is not None else "guidance_beta"):
            raise SystemExit(f"cca_ray.evaluate: error: {model_path} takes {name}, not "
                             f"{'cca_lambda' if args.cca_lambda is not None else 'guidance_beta'}")
        print(f"evaluating {model_path} at {name} {values} with n={args.num_samples or cfg.eval.num_samples}")
        rows = knob_curve(setup, model_path, values, n=args.num_samples)
    else:
        scales = args.guidance if args.guidance is not None else cfg.eval.cfg_scales
        print(f"evaluating {model_path} at guidance {scales} with n={args.num_samples or cfg.eval.num_samples}")
        rows = cfg_curve(setup, model_path, scales, n=args.num_samples)
    for r in rows:
        r["method"] = model_path.name
    table = format_table(rows)
    run_id = tracking.start_run(cfg.mlflow_uri, cfg.experiment, f"evaluate-{model_path.name}",
                                artifact_root=cfg.root / "mlartifacts", tags={"stage": "evaluate", "model": str(model_path)})
    for i, r in enumerate(rows):
        tracking.log_metrics(cfg.mlflow_uri, run_id, {k: r.get(k) for k in ("fid", "isc_mean", "kid_mean", "precision",
                                                                        "recall", "accuracy", "guidance", "lam",
                                                                        "beta") if r.get(k) is not None}, step=i)
    tracking.log_text(cfg.mlflow_uri, run_id, table, "results.md")
    tracking.end_run(cfg.mlflow_uri, run_id)
    print(table)


if __name__ == "__main__":
    main()
