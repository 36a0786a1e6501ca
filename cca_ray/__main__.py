"""`cca-ray STAGE [args]` == `python -m cca_ray.STAGE [args]`."""

from __future__ import annotations

import importlib
import sys

STAGES = {
    "prepare": "images + conditions -> tokenized parquet shards, negative pairs, reference log-probs",
    "pretrain": "SFT with condition dropout (makes the demo's base model)",
    "train": "CCA fine-tuning on Ray Train + DeepSpeed",
    "tune": "the main job: ASHA sweep over lam/beta, CFG baseline, trade-off curves in MLflow",
    "evaluate": "sample and score with torch-fidelity (FID, IS, KID, precision/recall)",
    "serve": "Ray Serve deployment with an OpenAI-compatible images API",
}


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        print("usage: cca-ray STAGE [--preset NAME] [--config FILE] [--workdir DIR] [key=value ...]\n\nstages:")
        for name, what in STAGES.items():
            print(f"  {name:9s} {what}")
        print("\n`cca-ray STAGE --help` explains a stage's options.")
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    importlib.import_module(f"cca_ray.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    main()
