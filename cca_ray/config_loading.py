"""Loading a run config: presets, ``--config`` files, dotted overrides, absolute paths.

The typed sections live in cca_ray.config (and every name here is importable from there too):

    load_config("smoke", "my.yaml", ["train.lam=3"], workdir="/tmp/x") -> Config
    with_overrides(cfg, {"train.lam": 3}) -> Config          # a validated copy
    dump_config(cfg) -> YAML text;  flat_params(cfg) -> {dotted key: value} (MLflow params)
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

if TYPE_CHECKING:
    from cca_ray.config import Config

PRESET_DIR = resources.files("cca_ray") / "presets"


class ConfigError(ValueError):
    """A config problem a user can fix; the message names the field or file."""


def available_presets() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in PRESET_DIR.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(path: Any, what: str) -> dict:
    try:
        data = yaml.safe_load(Path(str(path)).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what}: file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what}: {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: {path} must hold a mapping of config sections, got {type(data).__name__}")
    return data


def _deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
        node = nxt
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lam=3"`` -> ``("train.lam", 3)``; the value is parsed as YAML (so 3 is an int)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<config>"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown config key '{loc}'")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{loc}: {e['msg']}{got_s}")
    return "invalid config:\n  " + "\n  ".join(lines)


def load_config(
    preset: str | None = "demo",
    config_file: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    workdir: str | Path | None = None,
) -> "Config":
    """Build and validate a Config; raise ConfigError naming the bad field or file.

    Every path field (PATH_FIELDS, the default workdir included) comes back absolute, resolved
    against the current directory: the config can then be handed to Ray as it is."""
    tree: dict = {}
    if preset is not None:
        if preset not in available_presets():
            raise ConfigError(f"unknown preset '{preset}'; available presets: {', '.join(available_presets())}")
        tree = _deep_merge(tree, _read_yaml(PRESET_DIR / f"{preset}.yaml", f"preset {preset}"))
        tree["preset"] = preset
    if config_file is not None:
        tree = _deep_merge(tree, _read_yaml(config_file, "--config"))
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides or []]
    for key, value in items:
        _set_dotted(tree, key, value)
    if workdir is not None:
        tree["workdir"] = str(workdir)
    from cca_ray.config import Config

    tree.setdefault("workdir", Config.model_fields["workdir"].default)
    return _validate(_absolute_paths(tree))


# Every config field that holds a filesystem path. load_config makes them absolute (against the
# current directory) before anything sees them: Tune trials, Train workers and Serve replicas run
# in directories of their own, where a relative path would point somewhere else.
PATH_FIELDS = ("workdir", "data.path", "tokenizer.path", "model.path", "model.var.vae_path", "eval.inception_weights",
               "eval.reference_stats", "tune.space",
               "serve.checkpoint", "serve.tokenizer_dir", "serve.label_source")
_URI_PREFIXES = ("models:/", "runs:/", "mlflow-artifacts:/", "s3://", "gs://", "hdfs://", "file://", "http://",
                 "https://")


def absolute_path(value: str) -> str:
    """A path made absolute against the current directory (~ expanded); URIs are left as they are."""
    if value.startswith(_URI_PREFIXES):
        return value
    return str(Path(value).expanduser().resolve())


def _absolute_paths(tree: dict) -> dict:
    tree = copy.deepcopy(tree)
    for dotted in PATH_FIELDS:
        *sections, key = dotted.split(".")
        node = tree
        for sec in sections:
            node = node.get(sec) if isinstance(node, dict) else None
            if node is None:
                break
        if isinstance(node, dict) and isinstance(node.get(key), str) and node[key]:
            node[key] = absolute_path(node[key])
    return tree


def _validate(tree: dict) -> "Config":
    from cca_ray.config import Config

    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None


def with_overrides(cfg: "Config", overrides: dict[str, Any]) -> "Config":
    """A copy of cfg with dotted overrides (``{"train.lam": 3}``), validated like load_config:
    a bad key or value raises ConfigError naming the field."""
    tree = cfg.model_dump(mode="json")
    for key, value in overrides.items():
        _set_dotted(tree, key, value)
    return _validate(_absolute_paths(tree))


def dump_config(cfg: "Config") -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def flat_params(cfg: "Config", sections: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Flatten to dotted keys (for MLflow params)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = node

    dumped = cfg.model_dump(mode="json")
    for k, v in dumped.items():
        if sections is None or k in sections:
            walk(k, v)
    return out
