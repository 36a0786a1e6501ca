"""The scaled-down assets the `emu3-sim` preset reads, written offline (no downloads, no real weights).

    python -m cca_ray.sim_assets DIR        # then, from the directory holding DIR=sim_assets:
    python -m cca_ray.tune --preset emu3-sim

DIR gets what `emu3-gen-a100` expects to find on a cluster's shared disk, each in the same layout:

    inception/weights-inception-random-init.pth   torch-fidelity's FeatureExtractorInceptionV3 state dict
                                                  (random init: the real file cannot be downloaded here)
    captions/part-0.parquet                       image bytes (PNG) + caption columns, no labels, like JourneyDB
    Emu3-Gen-hf/                                  a tiny random-init Emu3 (transformers' Emu3 config, BPE
                                                  tokenizer, visual-token vocabulary map), no cca_ray sidecar

Captions name a colour and a shape ("a red circle"), so the condition decides the picture.
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
SOURCE_SIZE = 48  # the parquet's images; the preset's data.image_size resizes them, as JourneyDB's are
INCEPTION_FILE = "weights-inception-random-init.pth"
CODEBOOK_SIZE = 256  # the tiny VQ-VAE's codes (Emu3-Gen: 32,768)


def shape_image(colour: str, shape: str, rng: np.random.Generator) -> np.ndarray:
    """One uint8 [48, 48, 3] picture: a coloured shape of random size and place on a light background."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (SOURCE_SIZE, SOURCE_SIZE), tuple(int(v) for v in rng.integers(225, 256, 3)))
    r = int(rng.integers(10, 18))
    cx, cy = (int(v) for v in rng.integers(r + 2, SOURCE_SIZE - r - 2, 2))
    box = (cx - r, cy - r, cx + r, cy + r)
    draw = ImageDraw.Draw(img)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return np.asarray(img)


def captions() -> list[str]:
    return [f"a {c} {s}" for c in COLOURS for s in SHAPES]


def write_caption_parquet(path: Path, n: int = 240, seed: int = 0, row_group_size: int = 64) -> Path:
    """n shape pictures as PNG bytes with their captions (columns image, caption; no label column),
    in several row groups so the parquet source reads it unit by unit."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(seed)
    caps = captions()
    images, texts = [], []
    for i in range(n):
        colour, shape = caps[i % len(caps)].split()[1:]
        buf = io.BytesIO()
        Image.fromarray(shape_image(colour, shape, rng)).save(buf, format="PNG")
        images.append(buf.getvalue())
        texts.append(caps[i % len(caps)])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "caption": texts}), path,
                   row_group_size=row_group_size)
    return path


def write_random_inception(path: Path, seed: int = 0) -> Path:
    """A random-init state dict in exactly the layout torch-fidelity's FeatureExtractorInceptionV3 loads.

    Its constructor always loads weights (a URL when given no path), so it is built from an empty
    file with a non-strict load: nothing is fetched. The convolutions are then drawn He-normal:
    PyTorch's default init shrinks activations about 3x per layer, and after Inception's 40-odd
    layers the 2048-d features would be ~1e-8, too small for FID's covariances."""
    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class RandomInitInceptionV3(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return super().load_state_dict(state_dict, strict=False, assign=assign)

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = RandomInitInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
            for m in net.modules():
                if isinstance(m, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return path


def write_tiny_emu3(out_dir: Path, seed: int = 0) -> Path:
    """A tiny random-init Emu3 in the Emu3-Gen-hf layout: what from_pretrained and the emu3-vqvae tokenizer
    read (config.json with vq_config and vocabulary_map, model.vqmodel.* weights, tokenizer files).
    The sidecar our own saves carry is removed: a released checkpoint has none."""
    from cca_ray.models.emu3.adapter import SIDECAR
    from cca_ray.models.emu3.build import build_tiny_emu3

    build_tiny_emu3(out_dir, codebook_size=CODEBOOK_SIZE, hidden_size=64, num_layers=2, num_heads=4,
                    max_prompt_tokens=32, prompts=captions(), seed=seed)
    (out_dir / SIDECAR).unlink()
    return out_dir


def write_assets(root: Path) -> dict[str, Path]:
    root = Path(root)
    return {
        "inception": write_random_inception(root / "inception" / INCEPTION_FILE),
        "captions": write_caption_parquet(root / "captions" / "part-0.parquet"),
        "emu3": write_tiny_emu3(root / "Emu3-Gen-hf"),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m cca_ray.sim_assets", description=__doc__.split("\n")[0])
    p.add_argument("dir", type=Path, help="where to write the assets (the emu3-sim preset reads ./sim_assets)")
    args = p.parse_args(argv)
    for name, path in write_assets(args.dir).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
