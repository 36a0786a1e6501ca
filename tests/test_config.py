"""Configs: every preset and tune space loads; bad input names the field and exits 2."""

import subprocess
import sys
from importlib import resources

import numpy as np
import pytest
import yaml

from cca_ray.config import ConfigError, available_presets, flat_params, load_config, parse_override, with_overrides


def test_presets_shipped():
    assert {"smoke", "demo", "emu3-gen-a100"} <= set(available_presets())


@pytest.mark.parametrize("preset", available_presets())
def test_every_preset_loads(preset):
    cfg = load_config(preset)
    assert cfg.preset == preset
    assert cfg.train.beta > 0 and cfg.train.lam >= 0


def test_every_tune_space_names_real_fields():
    from cca_ray.tune_spaces import SPACE_DIR

    files = [p for p in SPACE_DIR.iterdir() if p.name.endswith(".yaml")]
    assert files, f"no tune spaces found in {SPACE_DIR}"
    for path in files:
        space = yaml.safe_load(path.read_text())
        params = flat_params(load_config("smoke"))
        for key in space.get("params", {}):
            assert key in params, f"{path.name}: '{key}' is not a config field"


def test_layers_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lam: 5.0\n  beta: 0.3\n")
    cfg = load_config("smoke", f, ["train.lam=7", "data.source=mnist"], workdir=tmp_path)
    assert cfg.train.lam == 7.0  # override beats file
    assert cfg.train.beta == 0.3  # file beats preset
    assert cfg.data.source == "mnist"
    assert cfg.root == tmp_path.resolve()
    assert cfg.mlflow_uri.startswith("sqlite:///") and cfg.mlflow_uri.endswith("mlflow.db")


def test_override_values_are_typed():
    assert parse_override("train.max_steps=3") == ("train.max_steps", 3)
    assert parse_override("eval.cfg_scales=[0, 1.5]") == ("eval.cfg_scales", [0, 1.5])
    assert parse_override("model.path=/x/y") == ("model.path", "/x/y")


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["train.lam=-1"], "train.lam"),
        (["train.beta=0"], "train.beta"),
        (["train.bogus=1"], "unknown config key 'train.bogus'"),
        (["nosuch.key=1"], "unknown config key 'nosuch'"),
        (["train.max_steps=abc"], "train.max_steps"),
        (["data.source=imagenet"], "data.source"),
        (["model.hidden_size=30", "model.num_heads=4"], "model.hidden_size"),
    ],
)
def test_bad_values_name_the_field(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config("smoke", overrides=overrides)
    assert needle in str(e.value)


def test_unknown_preset_lists_choices():
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*smoke"):
        load_config("nope")


def test_bad_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config("smoke", tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config("smoke", bad)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--preset", "nope"], "unknown preset"),
        (["train.lam=-0.5"], "train.lam"),
        (["train.typo=1"], "train.typo"),
    ],
)
def test_cli_exit_code_2(args, needle, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "cca_ray.train", "--workdir", str(tmp_path), *args],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr


def test_cli_print_config(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "cca_ray.tune", "--preset", "smoke", "--print-config", "train.lam=2.5"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["train"]["lam"] == 2.5


def test_overrides_may_come_before_and_after_options():
    from cca_ray.cli import parse_stage_args

    cfg, args = parse_stage_args(
        "train", "t", ["train.lam=2.5", "--preset", "smoke", "--run-name", "x", "train.beta=0.3"],
        lambda p: p.add_argument("--run-name"))
    assert (cfg.preset, cfg.train.lam, cfg.train.beta, args.run_name) == ("smoke", 2.5, 0.3, "x")


def test_pyproject_packages_name_every_package_folder():
    """pyproject lists packages explicitly (tune_spaces/ is mapped in from the top level): a new
    package folder that is not listed would be missing from the wheel."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "cca_ray").rglob("__init__.py")}
    assert found - listed == set(), f"package folders missing from pyproject's packages: {sorted(found - listed)}"
    assert "cca_ray.tune_spaces" in listed


def test_every_path_is_absolute_once_loaded(tmp_path, monkeypatch):
    """Tune trials and Ray workers run in directories of their own: a relative path must be resolved
    against the user's current directory when the config is loaded, never later."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config("smoke", overrides=["data.path=imgs", "model.path=~/m", "serve.checkpoint=models:/x/1",
                                          "tokenizer.path=tok", "tune.space=spaces/s.yaml"])
    assert cfg.workdir == str(tmp_path / "cca_work")  # the default ./cca_work
    assert cfg.data.path == str(tmp_path / "imgs")
    assert cfg.model.path.startswith("/") and "~" not in cfg.model.path
    assert cfg.tokenizer.path == str(tmp_path / "tok") and cfg.tune.space == str(tmp_path / "spaces/s.yaml")
    trial = with_overrides(cfg, {"train.lam": 2.0, "tune.space": "other.yaml"})  # as a Tune trial applies its sample
    assert trial.tune.space == str(tmp_path / "other.yaml") and trial.workdir == cfg.workdir
    assert cfg.serve.checkpoint == "models:/x/1"  # URIs stay as they are
    assert load_config("smoke", workdir="w").workdir == str(tmp_path / "w")
    monkeypatch.chdir("/")
    assert cfg.root == tmp_path / "cca_work"  # the same place from anywhere


def test_proxy_seeds_are_disjoint_from_the_final_evaluation_seeds(tmp_path):
    """ASHA selects on the FID proxy; the reported table must use other seeds (and other real images)."""
    for name in available_presets():
        e = load_config(name, workdir=tmp_path).eval
        proxy = set(range(e.proxy_seed, e.proxy_seed + e.proxy_num_samples))
        final = set(range(e.seed, e.seed + e.num_samples))
        assert proxy and final and not proxy & final, name
    cfg = load_config("smoke", workdir=tmp_path)
    with pytest.raises(ConfigError, match=r"eval.proxy_seed.*overlap"):
        with_overrides(cfg, {"eval.proxy_seed": cfg.eval.seed + cfg.eval.num_samples - 1})
    ok = with_overrides(cfg, {"eval.proxy_seed": cfg.eval.seed + cfg.eval.num_samples})  # adjacent is fine
    assert ok.eval.proxy_seed == cfg.eval.seed + cfg.eval.num_samples


def test_the_proxy_reference_comes_from_the_train_split(tmp_path):
    """The proxy compares against train-split images; the final table against the holdout."""
    from cca_ray.data.sources import iter_rows, make_source, split_of
    from cca_ray.evaluate.job import real_split

    cfg = load_config("smoke", workdir=tmp_path)
    train, _ = real_split(cfg, "train", limit=50)
    holdout, _ = real_split(cfg, "holdout")
    assert len(train) == 50
    rows = [r for r in iter_rows(make_source(cfg.data)) if r.error is None]
    splits = [split_of(r.source_id, cfg.data.seed, cfg.data.holdout_fraction) for r in rows]
    want = np.stack([r.image for r, s in zip(rows, splits) if s == "train"][:50])
    assert np.array_equal(train, want) and len(holdout) == splits.count("holdout")
