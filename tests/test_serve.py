"""The images API: pure validation rules (fast), then a real Serve app on 127.0.0.1 (e2e).

The e2e tests build a tiny random-init Emu3 and a k-means tokenizer fitted on sklearn's 8x8
digits in a tmp workdir, start Serve on a free loopback port, and call it over HTTP with
httpx and with the official `openai` client.
"""

import base64
import io
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cca_ray.config import ConfigError, load_config
from cca_ray.serve.api import APIError, ServeLimits, png_bytes, validate_request
from cca_ray.tracking import image_grid

DIGITS = "zero one two three four five six seven eight nine".split()
LABEL_PROMPTS = {i: f"a handwritten digit {w}" for i, w in enumerate(DIGITS)}


# -- pure rules -----------------------------------------------------------------------------------
def limits(**kw) -> ServeLimits:
    base = dict(model_name="m", image_size=(8, 8), grid=(4, 4), max_n=4, max_prompt_tokens=5,
                prompt_length=lambda s: len(s.split()), label_prompts=dict(LABEL_PROMPTS))
    return ServeLimits(**{**base, **kw})


@pytest.mark.parametrize("body, status, param", [
    (b'{"prompt": "a"', 400, "body"),
    (b'["a"]', 400, "body"),
    (b'{"prompt": "a", "quality": "hd"}', 400, "quality"),
    (b'{"prompt": "a", "n": "2"}', 400, "n"),
    (b'{"prompt": "a", "n": 2.5}', 400, "n"),
    (b'{"prompt": "a", "n": 0}', 400, "n"),
    (b'{"prompt": "a", "n": 5}', 400, "n"),
    (b'{"prompt": "a b c d e f"}', 400, "prompt"),
    (b'{"prompt": 7}', 400, "prompt"),
    (b'{}', 400, "prompt"),
    (b'{"prompt": "a", "size": "16x16"}', 400, "size"),
    (b'{"prompt": "a", "size": "big"}', 400, "size"),
    (b'{"prompt": "a", "temperature": -0.5}', 400, "temperature"),
    (b'{"prompt": "a", "temperature": 0}', 400, "temperature"),
    (b'{"prompt": "a", "guidance_scale": -1}', 400, "guidance_scale"),
    (b'{"prompt": "a", "top_p": 1.5}', 400, "top_p"),
    (b'{"prompt": "a", "seed": -1}', 400, "seed"),
    (b'{"prompt": "a", "response_format": "url"}', 400, "response_format"),
    (b'{"prompt": "a", "model": "dall-e-3"}', 404, "model"),
    (b'{"label": 12}', 400, "label"),
    (b'{"label": 3, "prompt": "a cat"}', 400, "label"),
])
def test_bad_requests_name_the_field(body, status, param):
    with pytest.raises(APIError) as e:
        validate_request(body, limits())
    assert (e.value.status, e.value.param) == (status, param)
    err = e.value.body()["error"]
    assert err["param"] == param and err["type"] and err["message"]
    if param != "body":
        assert param in err["message"]


def test_deep_nesting_is_a_400_and_a_big_body_a_413():
    deep = b"[" * 100_000 + b"]" * 100_000
    for body in (deep, b'{"prompt": ' + deep + b"}"):
        with pytest.raises(APIError) as e:
            validate_request(body, limits(max_body_bytes=1 << 20))
        assert (e.value.status, e.value.param) == (400, "body") and "nested too deeply" in e.value.body()["error"]["message"]
    with pytest.raises(APIError) as e:
        validate_request(b'{"prompt": "' + b"a" * 2000 + b'"}', limits(max_body_bytes=1000))
    assert e.value.status == 413 and "1000 bytes" in e.value.body()["error"]["message"]


def test_good_request_defaults_and_seeds():
    spec = validate_request(b'{"prompt": "a", "n": 3, "seed": 10, "size": "8x8", "guidance_scale": 2}',
                            limits(temperature=0.9, top_k=7))
    assert spec.seeds == [10, 11, 12] and spec.n == 3 and spec.cond_prompt == "a"
    assert spec.key == (2.0, 0.9, 7, None, (4, 4), None, None)  # no knob: cca_lambda, guidance_beta None
    assert validate_request(b'{"prompt": "a", "size": "auto"}', limits()).seeds is None


def test_class_through_label_or_prompt():
    lim = limits(max_prompt_tokens=10)
    assert validate_request(b'{"label": 7}', lim).cond_prompt == "a handwritten digit seven"
    assert validate_request(b'{"prompt": "7"}', lim).cond_prompt == "a handwritten digit seven"
    assert validate_request(b'{"prompt": "", "label": 2}', lim).cond_prompt == "a handwritten digit two"
    with pytest.raises(APIError, match="no class labels"):
        validate_request(b'{"label": 7}', limits(label_prompts={}))
    assert validate_request(b'{"prompt": ""}', lim).cond_prompt == ""  # the null condition: unconditional


def test_knob_fields_are_checked_against_the_trained_range():
    """cca_lambda / guidance_beta: a 400 naming the field and the trained range, or the knob the model lacks."""
    import math

    from cca_ray.models.knob import beta_spec, lam_spec

    lam = limits(knob=lam_spec(1.0, math.exp(9), 3.0), cca_lambda=3.0)
    spec = validate_request(b'{"prompt": "a", "cca_lambda": 300}', lam)
    assert spec.key.cca_lambda == 300.0 and spec.key.guidance_beta is None
    assert validate_request(b'{"prompt": "a"}', lam).key.cca_lambda == 3.0  # the server's default
    for body, msg in [(b'{"prompt": "a", "cca_lambda": 1e5}', r"cca_lambda=100000 is outside the range this model "
                                                                r"was trained on, \[1, 8103.08\]"),
                      (b'{"prompt": "a", "cca_lambda": 0.5}', "outside the range"),
                      (b'{"prompt": "a", "guidance_beta": 0.5}', "guidance_beta: this model is not trained with GFT")]:
        with pytest.raises(APIError, match=msg) as e:
            validate_request(body, lam)
        assert e.value.status == 400 and e.value.param in body.decode()
    plain = limits()
    assert validate_request(b'{"prompt": "a"}', plain).key.cca_lambda is None
    with pytest.raises(APIError, match="cca_lambda: this model is not λ-conditioned") as e:
        validate_request(b'{"prompt": "a", "cca_lambda": 10}', plain)
    assert e.value.param == "cca_lambda"
    gft = limits(knob=beta_spec(), guidance_beta=0.5)
    assert validate_request(b'{"prompt": "a", "guidance_beta": 0.3}', gft).key.guidance_beta == 0.3
    with pytest.raises(APIError, match=r"guidance_beta=2 is outside .*\[0, 1\]"):
        validate_request(b'{"prompt": "a", "guidance_beta": 2}', gft)
    with pytest.raises(APIError, match="guidance_beta"):
        validate_request(b'{"prompt": "a", "guidance_beta": "0.3"}', gft)  # strict: a string is not a float


def test_png_and_grid():
    img = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    back = np.asarray(Image.open(io.BytesIO(png_bytes(img))))
    assert np.array_equal(back, img)
    gray = np.asarray(Image.open(io.BytesIO(png_bytes(img[..., :1]))))
    assert gray.shape == (4, 4)
    sheet = image_grid(np.stack([img, img + 1, img + 2]))
    assert sheet.shape == (8, 8, 3) and np.array_equal(sheet[4:, :4], img + 2) and not sheet[4:, 4:].any()
    with pytest.raises(ValueError):
        png_bytes(img.astype(np.float32))


def test_serve_config_bounds():
    with pytest.raises(ConfigError, match="serve.max_n"):
        load_config("smoke", overrides={"serve.max_n": 16, "serve.max_batch_size": 8})
    with pytest.raises(ConfigError, match="backpressure_status"):
        load_config("smoke", overrides={"serve.backpressure_status": 500})


def test_checkpoint_and_label_resolution(tmp_path):
    from cca_ray.serve.app import is_loopback
    from cca_ray.serve.assets import default_checkpoint, find_model_dir, load_label_prompts

    cfg = load_config("smoke", workdir=tmp_path)
    with pytest.raises(FileNotFoundError, match="no model to serve"):
        default_checkpoint(cfg)
    old, new = cfg.checkpoint_dir / "run_a" / "export", cfg.checkpoint_dir / "run_b" / "export"
    partial = cfg.checkpoint_dir / "run_b" / ".export.tmp-123"  # an export still being written
    for d in (old, new, partial):
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
        (d / "cca_ray.json").write_text("{}")
        time.sleep(0.02)
    assert default_checkpoint(cfg) == new
    assert find_model_dir(cfg.checkpoint_dir / "run_a") == old
    assert load_label_prompts(cfg) == {}
    _write_holdout(cfg.data_dir / "holdout")
    assert load_label_prompts(cfg) == LABEL_PROMPTS
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and not is_loopback("0.0.0.0")


def test_cli_without_a_model_exits_2_naming_what_is_missing(tmp_path, capsys):
    from cca_ray.serve.app import main

    with pytest.raises(SystemExit) as e:
        main(["--preset", "smoke", "--workdir", str(tmp_path)])
    assert e.value.code == 2 and "no model to serve" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--preset", "smoke", "--checkpoint", str(tmp_path / "nope")])
    assert e.value.code == 2 and "serve.checkpoint" in capsys.readouterr().err


@pytest.mark.e2e
def test_checkpoint_from_mlflow_uris(tmp_path):
    """runs:/ and models:/ URIs resolve to a local dir holding the checkpoint (real sqlite MLflow)."""
    from mlflow.tracking import MlflowClient

    from cca_ray.serve.assets import resolve_checkpoint

    ckpt = tmp_path / "export"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "cca_ray.json").write_text('{"family": "emu3"}')
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("serve-test", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(exp)
    client.log_artifacts(run.info.run_id, str(ckpt), "model")
    local = resolve_checkpoint(f"runs:/{run.info.run_id}/model", uri)
    assert (local / "cca_ray.json").read_text() == '{"family": "emu3"}'
    client.create_registered_model("cca-tiny")
    mv = client.create_model_version("cca-tiny", f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    env_before = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    local = resolve_checkpoint(f"models:/cca-tiny/{mv.version}", uri)
    assert (local / "config.json").exists() and local != ckpt
    # resolving must not leave MLflow's URIs in the environment, where every later
    # cfg.mlflow_uri in this process would pick them up
    assert {k: os.environ.get(k) for k in env_before} == env_before


def _write_holdout(d):
    d.mkdir(parents=True, exist_ok=True)
    labels = [i % 10 for i in range(30)]
    pq.write_table(pa.table({"codes": [[0] * 16] * 30, "grid_h": [4] * 30, "grid_w": [4] * 30, "label": labels,
                             "prompt": [LABEL_PROMPTS[i] for i in labels], "source_id": [f"t:{i}" for i in range(30)]}),
                   d / "part-00000.parquet")


# -- a real Serve app on loopback -----------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(ray_local, tmp_path_factory):
    from ray import serve
    from sklearn.datasets import load_digits

    from cca_ray.models import build_tiny_model
    from cca_ray.serve.app import run_app
    from cca_ray.tokenizers import build_tokenizer

    work = tmp_path_factory.mktemp("serve")
    cfg = load_config("smoke", workdir=work, overrides={
        "serve.port": _free_port(), "serve.batch_wait_timeout_s": 0.2, "serve.log_images_to_mlflow": True})
    imgs = (load_digits().images[:300] * 16).clip(0, 255).astype(np.uint8)[..., None]
    build_tokenizer(cfg.tokenizer, image_size=8, channels=1).fit(imgs).save(cfg.data_dir / "tokenizer")
    _write_holdout(cfg.data_dir / "holdout")
    model_dir = build_tiny_model(work / "model", cfg.model, codebook_size=cfg.tokenizer.codebook_size,
                                 prompts=list(LABEL_PROMPTS.values()))
    url = run_app(cfg, model_dir)
    yield cfg, url
    serve.shutdown()


def _post(url, body, **kw):
    import httpx

    if isinstance(body, bytes):
        kw = {"content": body, "headers": {"content-type": "application/json"}}
    else:
        kw = {"json": body}
    return httpx.post(f"{url}/images/generations", timeout=60, **kw)


def _png(b64: str) -> np.ndarray:
    raw = base64.b64decode(b64)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(raw)))


@pytest.mark.e2e
def test_n_pngs_of_the_requested_size(app):
    import httpx

    cfg, url = app
    r = _post(url, {"prompt": "a handwritten digit three", "n": 3, "size": "8x8", "seed": 42, "model": "model",
                    "response_format": "b64_json"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["created"], int) and len(body["data"]) == 3
    assert [d["seed"] for d in body["data"]] == [42, 43, 44]
    for d in body["data"]:
        assert _png(d["b64_json"]).shape == (8, 8)
        assert d["timing"]["total_s"] >= d["timing"]["sample_s"] > 0
    models = httpx.get(f"{url}/models").json()
    assert [m["id"] for m in models["data"]] == ["model"]
    assert httpx.get(f"{url}/models/model").json()["id"] == "model"
    assert httpx.get(f"{url}/models/other").status_code == 404
    health = httpx.get(url.replace("/v1", "/healthz")).json()
    assert health["status"] == "ok" and health["size"] == "8x8" and health["labels"]["7"] == LABEL_PROMPTS[7]


@pytest.mark.e2e
def test_openai_client(app):
    import openai

    cfg, url = app
    client = openai.OpenAI(base_url=url, api_key="dummy", max_retries=0, timeout=60)
    assert "model" in [m.id for m in client.models.list()]
    res = client.images.generate(model="model", prompt="a handwritten digit five", n=2, size="8x8",
                                 response_format="b64_json", extra_body={"seed": 7, "temperature": 0.8})
    assert len(res.data) == 2
    assert all(_png(d.b64_json).shape == (8, 8) for d in res.data)
    assert [d.model_extra["seed"] for d in res.data] == [7, 8]
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="a", size="1024x1024")
    assert e.value.body["param"] == "size" and "size" in e.value.body["message"]


@pytest.mark.e2e
def test_same_seed_same_image_alone_and_batched(app):
    cfg, url = app
    alone = _post(url, {"prompt": "a handwritten digit one", "seed": 123}).json()["data"][0]
    # seed s, n=2 gives row 1 the seed s+1: the same image as asking for seed s+1 alone
    pair = _post(url, {"prompt": "a handwritten digit one", "seed": 122, "n": 2}).json()["data"]
    assert pair[1]["seed"] == 123 and pair[1]["b64_json"] == alone["b64_json"]
    others = [{"prompt": "a handwritten digit zero", "seed": 5, "n": 3}, {"prompt": "nine", "seed": 6},
              {"prompt": "", "seed": 123, "n": 2}]
    barrier = threading.Barrier(4)

    def call(body):
        barrier.wait()
        return _post(url, body)

    with ThreadPoolExecutor(4) as pool:
        rs = list(pool.map(call, [{"prompt": "a handwritten digit one", "seed": 123}, *others]))
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    again = rs[0].json()["data"][0]
    assert again["timing"]["batch_images"] > 1, "the concurrent requests were not batched together"
    assert again["b64_json"] == alone["b64_json"]


@pytest.mark.e2e
def test_cfg_requests_batch_apart_and_reproduce(app):
    cfg, url = app
    bodies = [{"prompt": "a handwritten digit two", "seed": 9, "guidance_scale": 3.0, "n": 2},
              {"prompt": "a handwritten digit two", "seed": 9, "n": 2},
              {"prompt": "a handwritten digit two", "seed": 9, "guidance_scale": 3.0, "top_k": 8}]
    with ThreadPoolExecutor(3) as pool:
        rs = list(pool.map(lambda b: _post(url, b), bodies))
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    cfg_imgs = [d["b64_json"] for d in rs[0].json()["data"]]
    assert rs[0].json()["data"][0]["timing"]["batch_images"] == 2  # only its own rows share its settings
    assert _post(url, bodies[0]).json()["data"][1]["b64_json"] == cfg_imgs[1]


@pytest.mark.e2e
def test_class_label_uses_the_dataset_prompt(app):
    cfg, url = app
    by_label = _post(url, {"label": 7, "seed": 3}).json()["data"][0]
    by_prompt = _post(url, {"prompt": "a handwritten digit seven", "seed": 3}).json()["data"][0]
    assert by_label["revised_prompt"] == LABEL_PROMPTS[7]
    assert by_label["b64_json"] == by_prompt["b64_json"]


@pytest.mark.e2e
def test_each_bad_request_gets_its_4xx_and_serving_goes_on(app):
    cfg, url = app
    cases = [
        (b'{"prompt": "a", "n": ', 400, "body"),
        ({"prompt": "a", "style": "vivid"}, 400, "style"),
        ({"prompt": "a", "n": "two"}, 400, "n"),
        ({"prompt": "a", "n": cfg.serve.max_n + 1}, 400, "n"),
        ({"prompt": "digit " * 40}, 400, "prompt"),
        ({"prompt": "a", "size": "16x16"}, 400, "size"),
        ({"prompt": "a", "temperature": -1.0}, 400, "temperature"),
        ({"prompt": "a", "response_format": "url"}, 400, "response_format"),
        ({"prompt": "a", "model": "gpt-image-1"}, 404, "model"),
        ({"label": 42}, 400, "label"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "body"),  # nested past the parser's recursion limit
        (b'{"prompt": "' + b"a" * (cfg.serve.max_body_bytes + 1) + b'"}', 413, "body"),
        ({"prompt": "a", "cca_lambda": 10.0}, 400, "cca_lambda"),  # this model is not λ-conditioned
    ]
    for body, status, param in cases:
        r = _post(url, body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["param"] == param and (param == "body" or param in err["message"]), err
        ok = _post(url, {"prompt": "a handwritten digit four", "seed": 1})
        assert ok.status_code == 200 and len(ok.json()["data"]) == 1, (body, ok.text)


@pytest.mark.e2e
def test_batches_are_logged_to_mlflow(app):
    from mlflow.tracking import MlflowClient

    cfg, url = app
    assert _post(url, {"prompt": "a handwritten digit six", "n": 2}).status_code == 200
    client = MlflowClient(cfg.mlflow_uri)
    deadline = time.time() + 30
    while time.time() < deadline:
        exp = client.get_experiment_by_name(cfg.experiment)
        runs = client.search_runs([exp.experiment_id], "tags.`cca_ray.stage` = 'serve'") if exp else []
        files = [f.path for f in client.list_artifacts(runs[0].info.run_id, "serve")] if runs else []
        if any(f.endswith(".png") for f in files) and any(f.endswith(".json") for f in files):
            break
        time.sleep(0.5)
    pngs = [f for f in files if f.endswith(".png")]
    assert pngs, f"no image grid logged (artifacts: {files})"
    meta = json.loads(open(client.download_artifacts(runs[0].info.run_id, pngs[0][:-4] + ".json")).read())
    assert {"prompts", "seeds", "guidance_scale"} <= set(meta)


@pytest.mark.e2e
def test_queue_bound_and_timeout(app):
    """A second app with room for one request inside and one queued: a burst gets 429s, and a
    request that waits longer than serve.request_timeout_s gets a 504; both with JSON bodies."""
    import httpx
    from ray import serve

    from cca_ray.serve.app import build_app

    cfg, url = app
    tight = cfg.model_copy(deep=True)
    tight.serve.max_ongoing_requests, tight.serve.max_queued_requests = 1, 1
    # a lone request waits for a batch far longer than its timeout (a queued one enters up to ~1 s later), then times out
    tight.serve.request_timeout_s, tight.serve.batch_wait_timeout_s = 0.5, 5.0
    tight.serve.log_images_to_mlflow = False
    serve.run(build_app(tight, cfg.root / "model"), name="cca-ray-tight", route_prefix="/tight")
    try:
        base = url.replace("/v1", "/tight/v1")
        barrier = threading.Barrier(6)

        def call(_):
            barrier.wait()
            return httpx.post(f"{base}/images/generations", json={"prompt": "a"}, timeout=60)

        with ThreadPoolExecutor(6) as pool:
            rs = list(pool.map(call, range(6)))
        codes = sorted(r.status_code for r in rs)
        assert 429 in codes and 504 in codes and set(codes) <= {429, 504}, codes
        timed_out = next(r for r in rs if r.status_code == 504).json()["error"]
        assert "request_timeout_s" in timed_out["message"]
    finally:
        serve.delete("cca-ray-tight")
    assert _post(url, {"prompt": "a", "seed": 2}).status_code == 200


@pytest.mark.e2e
def test_lambda_conditioned_model_over_http(app):
    """A λ-conditioned model served beside the first: cca_lambda picks λ per request (same seed, other
    image), the default applies when it is absent, and a λ outside the trained range is a 400 that says so."""
    import httpx
    import torch
    from ray import serve

    from cca_ray.models import knob, load_model
    from cca_ray.serve.app import build_app

    cfg, url = app
    m = load_model(cfg.root / "model")
    emb = knob.attach(m.module, m.condition_dim, knob.lam_spec(1.0, 100.0, 10.0))
    with torch.no_grad():  # a trained-looking embedder: λ moves the condition embedding a lot
        for p in emb.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 3.0)
    m.save(cfg.root / "lam_model")
    lam_cfg = cfg.model_copy(deep=True)
    lam_cfg.serve.log_images_to_mlflow = False
    serve.run(build_app(lam_cfg, cfg.root / "lam_model"), name="cca-ray-lam", route_prefix="/lam")
    try:
        base = url.replace("/v1", "/lam/v1")

        def post(body):
            return httpx.post(f"{base}/images/generations", json=body, timeout=60)

        req = {"prompt": "a handwritten digit three", "n": 4, "seed": 11}
        lo, hi, again = post({**req, "cca_lambda": 1.0}), post({**req, "cca_lambda": 100.0}), post({**req, "cca_lambda": 1.0})
        assert lo.status_code == hi.status_code == 200, (lo.text, hi.text)
        imgs = lambda r: [d["b64_json"] for d in r.json()["data"]]
        assert imgs(lo) == imgs(again) and imgs(lo) != imgs(hi)
        assert imgs(post({**req, "cca_lambda": 10.0})) == imgs(post(req))  # absent: the model's default λ
        bad = post({**req, "cca_lambda": 1000.0})
        assert bad.status_code == 400
        err = bad.json()["error"]
        assert err["param"] == "cca_lambda" and "outside the range this model was trained on, [1, 100]" in err["message"]
        health = httpx.get(url.replace("/v1", "/lam/healthz")).json()
        assert health["knob"] == {"name": "cca_lambda", "trained_range": [1.0, 100.0], "default": 10.0}
    finally:
        serve.delete("cca-ray-lam")
