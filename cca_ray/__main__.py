"""`cca-ray STAGE [args]` == `python -m cca_ray.STAGE [args]`."""

from __future__ import annotations

import importlib
import sys

# stage -> (the module whose main() runs it, what it does); in the order data flows
STAGES = {
    "prepare": ("cca_ray.data.prepare", "images + conditions -> tokenized parquet shards and negative pairs"),
    "pretrain": ("cca_ray.train.pretrain", "SFT with condition dropout (makes the demo's base model)"),
    "train": ("cca_ray.train.driver", "CCA fine-tuning on Ray Train + DeepSpeed"),
    "tune": ("cca_ray.tune.job", "the main job: CFG baseline, ASHA sweep over lam/beta, trade-off curves in MLflow"),
    "evaluate": ("cca_ray.evaluate.job", "sample and score with torch-fidelity (FID, IS, KID, precision/recall)"),
    "serve": ("cca_ray.serve.app", "Ray Serve deployment with an OpenAI-compatible images API"),
}


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        print("usage: cca-ray STAGE [--preset NAME] [--config FILE] [--workdir DIR] [key=value ...]\n\nstages:")
        for name, (_, what) in STAGES.items():
            print(f"  {name:9s} {what}")
        print("\n`cca-ray STAGE --help` explains a stage's options.")
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    importlib.import_module(STAGES[argv[0]][0]).main(argv[1:])


if __name__ == "__main__":
    main()
