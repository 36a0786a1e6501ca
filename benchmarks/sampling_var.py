"""VAR sampling speed: cca-ray's next-scale sampler vs VAR's own `autoregressive_infer_cfg`, in one process, on
the same random weights (benchmarks/sampling.py --family var dispatches here). Every path ends in images
(the VQVAE decoder included, as the official method returns images):

  1. cca-ray guidance-free   B rows per scale, never an unconditional row
  2. cca-ray CFG             2B rows per scale, VAR's linear ramp (our guidance g = VAR's cfg)
  3. official, cfg 0         autoregressive_infer_cfg: it always runs 2B rows, so guidance-free costs CFG's work
  4. official, cfg g         the same call with the ramp on

The official VQVAE and VAR are built by VAR's build_vae_var from a local clone of FoundationVision/VAR whose
path you give (its patching of reset_parameters is undone right after); their weights are redrawn at unit
scale (its init scales the AdaLN gammas by 1e-5 and leaves the VQVAE to whatever torch.empty held), saved in
the released bare-state-dict format, and our adapter loads those two files. Before timing, greedy (top-k 1)
images of both are compared on two rows, guidance-free and with CFG. Paths run interleaved, `--repeats`
times each; the median is reported.

    python benchmarks/sampling.py --family var --official-var ~/src/VAR
    python benchmarks/sampling.py --family var --official-var PATH --depth 16 --batch 16     # a GPU
    python benchmarks/sampling.py --family var --official-var PATH --depth 4 --threads 1     # a busy CPU
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from sampling_llamagen import interleaved_medians, print_vs_official

_PATCHED = (nn.Linear, nn.LayerNorm, nn.BatchNorm2d, nn.SyncBatchNorm, nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d,
            nn.ConvTranspose2d)


def _official(path: Path):
    """VAR's build_vae_var from a clone, or None with a message when it is absent."""
    if not (path / "models" / "var.py").is_file():
        print(f"official VAR code not found under {path} (expected models/var.py): skipping the comparison. "
              "Clone github.com/FoundationVision/VAR and pass --official-var PATH.")
        return None
    sys.path.insert(0, str(path))
    from models import build_vae_var

    return build_vae_var


def _build_official(build_vae_var, depth: int, device: str, seed: int):
    saved = {c: c.reset_parameters for c in _PATCHED}
    try:  # build_vae_var replaces reset_parameters globally and never restores it
        vae, var = build_vae_var(device=device, depth=depth, shared_aln=False, flash_if_available=False,
                                 fused_if_available=False)
    finally:
        for c, f in saved.items():
            c.reset_parameters = f
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (var, vae):
            for name, p in model.named_parameters():
                if name.endswith("scale_mul_1H11"):
                    p.fill_(math.log(4.0))
                elif p.ndim == 1:
                    p.copy_(torch.ones_like(p) if "norm" in name and name.endswith("weight") else
                            torch.randn(p.shape, generator=g) * 0.02)
                else:
                    fan_in = p[0].numel() if p.ndim > 2 else p.shape[-1]
                    std = 1.0 if any(k in name for k in ("class_emb", "lvl_embed", "pos_", "embedding")) else fan_in**-0.5
                    p.copy_(torch.randn(p.shape, generator=g) * std)
    return vae.eval(), var.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official-var", type=Path, help="local clone of FoundationVision/VAR")
    p.add_argument("--depth", type=int, default=16, help="VAR's --depth (width 64 x depth, 680 tokens, 256 px)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cfg", type=float, default=1.5, help="VAR's cfg (= our guidance), ramped over the scales")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads (on a busy shared CPU 1 is far steadier)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.official_var is None:
        print("no --official-var PATH given: skipping the VAR comparison")
        return 0
    build_vae_var = _official(args.official_var.expanduser().resolve())
    if build_vae_var is None:
        return 0

    from cca_ray.models import load_model
    from cca_ray.models.var import load_vqvae

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_grad_enabled(False)
    vae, official = _build_official(build_vae_var, args.depth, device, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        vae_file, var_file = Path(tmp) / "vae_ch160v4096z32.pth", Path(tmp) / f"var_d{args.depth}.pth"
        torch.save({k: t.cpu() for k, t in vae.state_dict().items()}, vae_file)
        torch.save({k: t.cpu() for k, t in official.state_dict().items()}, var_file)
        ours = load_model(var_file, family="var", depth=args.depth, vae_path=vae_file, device=device)
        our_vae = load_vqvae(vae_file, device=device)
    params = sum(t.numel() for t in ours.module.parameters())
    print(f"model: VAR-d{args.depth} ({params / 1e6:.0f}M) + VQVAE, 680 codes over 10 scales, 256 px; batch "
          f"{args.batch}; cfg {args.cfg:g} (our guidance {args.cfg:g}, linear ramp); device {device}, "
          f"threads {torch.get_num_threads()}")

    def ours_images(cond, **kw):
        codes = ours.generate(cond, **kw)
        return our_vae.idx_to_img(ours.layout.split(codes)).add_(1).mul_(0.5)

    labels = torch.randint(0, 1000, (args.batch,), generator=torch.Generator().manual_seed(args.seed + 1))
    cond = ours.encode_conditions(labels.tolist())
    few = labels[:2].to(device)
    for g in (0.0, args.cfg):
        theirs = official.autoregressive_infer_cfg(2, few, g_seed=0, cfg=g, top_k=1)
        mine = ours_images(ours.encode_conditions(few.tolist()), guidance=g, top_k=1)
        print(f"greedy images, cfg {g:g}: max |ours - official| = {(mine - theirs).abs().max().item():.2e}")

    vq_proxy = official.vae_proxy[0]
    decode = vq_proxy.fhat_to_img

    def official_run(cfg, images=True):
        vq_proxy.fhat_to_img = decode if images else (lambda f_hat: f_hat)  # codes only: skip its decoder
        try:
            return official.autoregressive_infer_cfg(args.batch, labels.to(device), g_seed=0, cfg=cfg, top_k=0, top_p=0.0)
        finally:
            vq_proxy.fhat_to_img = decode

    for images in (False, True):
        paths = {
            "cca-ray guidance-free": (lambda: ours_images(cond, seed=0)) if images else (lambda: ours.generate(cond, seed=0)),
            "cca-ray CFG": ((lambda: ours_images(cond, guidance=args.cfg, seed=0)) if images
                            else (lambda: ours.generate(cond, guidance=args.cfg, seed=0))),
            "official, cfg 0 (2B rows)": lambda: official_run(0.0, images),
            f"official, cfg {args.cfg:g}": lambda: official_run(args.cfg, images),
        }
        what = "images (VQVAE decoder included)" if images else "codes only (no VQVAE decode on either side)"
        print_vs_official(interleaved_medians(paths, args.repeats, device), args.batch, args.repeats, title=what)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
