"""Metric names (cca_ray.telemetry) and the Grafana dashboards that query them.

Unit tests: names and recorders; every dashboard query names only metrics cca-ray
exports or Ray's own built-ins. End to end: record every metric from a Ray actor,
scrape the node's Prometheus endpoint on 127.0.0.1 and find what the dashboards query.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
import urllib.request
from functools import lru_cache
from pathlib import Path

import pytest

from cca_ray import telemetry
from cca_ray.telemetry import METRIC_NAMES, TRAIN_GAUGES, ServeMetrics, TrainMetrics

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD_DIR = ROOT / "dashboards"
PROM_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


# -- PromQL: which metrics does an expression read? --------------------------------------
_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                 "and", "or", "unless", "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names selected in a PromQL expression (Grafana $variables allowed).

    Strings, label matchers ``{..}``, ranges ``[..]``, grouping label lists and numbers
    and ``offset``/``@`` modifiers are dropped; what is left that is not a function call or a keyword is a metric.
    Cross-checked against a real PromQL parser in ``test_promql_parses_and_extractor_agrees``.
    """
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    s = re.sub(r"\{[^}]*\}", "", s)
    s = re.sub(r"\[[^\]]*\]", "", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\boffset\s+-?[\w$]+|@\s*[\w$.]+(\(\))?", " ", s)  # offset 5m, @ 1609746000, @ end()
    s = re.sub(r"(?<![\w:])\d+(\.\d*)?([eE][+-]?\d+)?", " ", s)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][\w:]*", s):
        if m.group(0).lower() not in _PROMQL_WORDS and not re.match(r"\s*\(", s[m.end():]):
            names.add(m.group(0))
    return names


def dashboard_queries(dashboard: dict) -> list[str]:
    """Every PromQL string a dashboard runs: panel targets (rows included) and variable queries."""
    out = []

    def walk(panel):
        out.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
        for child in panel.get("panels", []):
            walk(child)

    for p in dashboard.get("panels", []):
        walk(p)
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        query = query.get("query") if isinstance(query, dict) else None
        if var.get("type") == "query" and query:
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", query.strip())
            out.append(m.group(1) if m else query)
    return out


@lru_cache(maxsize=1)
def ray_builtin_metric_names() -> frozenset[str]:
    """Metrics Ray's own generated Grafana dashboards query, on the installed Ray version."""
    from ray.dashboard.modules.metrics import grafana_dashboard_factory as f

    names: set[str] = set()
    for gen in (f.generate_default_grafana_dashboard, f.generate_serve_grafana_dashboard,
                f.generate_serve_deployment_grafana_dashboard, f.generate_train_grafana_dashboard,
                f.generate_data_grafana_dashboard):
        for expr in dashboard_queries(json.loads(gen()[0])):
            names |= promql_metric_names(expr)
    return frozenset(names)


def our_dashboards() -> dict[str, dict]:
    files = sorted(DASHBOARD_DIR.glob("*.json"))
    assert files, f"no dashboards in {DASHBOARD_DIR}"
    return {f.name: json.loads(f.read_text()) for f in files}


def queried_names(dashboards: dict[str, dict]) -> set[str]:
    return {n for d in dashboards.values() for e in dashboard_queries(d) for n in promql_metric_names(e)}


def _load_generator():
    spec = importlib.util.spec_from_file_location("cca_dashboards_generate", DASHBOARD_DIR / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- names ---------------------------------------------------------------------------------
def test_metric_specs_and_exported_names():
    specs = telemetry.ALL_METRICS
    assert len({s.name for s in specs}) == len(specs), "duplicate metric name"
    for s in specs:
        assert s.name.startswith("cca_") and PROM_NAME.match(s.name), s.name
        assert not s.name.endswith("_total"), f"{s.name}: Ray adds _total to counters itself"
        assert s.series == {"counter": (f"ray_{s.name}_total",), "gauge": (f"ray_{s.name}",),
                            "histogram": tuple(f"ray_{s.name}_{x}" for x in ("bucket", "count", "sum"))}[s.kind]
        if s.kind == "histogram":
            assert list(s.boundaries) == sorted(set(s.boundaries)) and s.boundaries[0] > 0, s.name
    assert METRIC_NAMES == {n for s in specs for n in s.series}
    # the trainer's metric keys (cca_ray.loss) all have a gauge
    assert {"loss", "rel_logp_pos", "rel_logp_neg", "pair_accuracy", "margin", "grad_norm", "lr",
            "tokens_per_s", "samples_per_s"} <= set(TRAIN_GAUGES)
    assert "ray_cca_serve_request_latency_seconds_bucket" in METRIC_NAMES
    assert "ray_cca_serve_errors_total" in METRIC_NAMES


def test_bad_input_is_named_even_without_ray():
    with pytest.raises(ValueError, match=r"cca_train_loss.*objective"):
        TrainMetrics().record({"loss": 1.0}, {"run": "r"})
    with pytest.raises(TypeError, match="cca_train_lr"):
        TrainMetrics().record({"lr": "fast"}, {"run": "r", "objective": "cca"})
    with pytest.raises(TypeError, match="cca_serve_request_latency_seconds"):
        ServeMetrics("d").observe_request(None)
    # unknown keys and None values are skipped, tensors-like scalars accepted
    TrainMetrics().record({"epoch": 3, "loss": None, "lr": 1}, {"run": "r", "objective": "cca"})


def test_recorders_record_nothing_before_ray_init():
    """Without ray.init the recorders create no Ray metric objects (run in a fresh process)."""
    code = (
        "import ray\n"
        "from cca_ray import telemetry as t\n"
        "t.TrainMetrics().record({'loss': 1.0, 'tokens_per_s': 5}, {'run': 'r', 'objective': 'cca'})\n"
        "s = t.ServeMetrics('d'); s.observe_request(0.1); s.observe_batch(2); s.set_queue_length(1)\n"
        "s.add_images(3); s.record_error(500, 'boom')\n"
        "assert not ray.is_initialized()\n"
        "print('objects', len(t._objects))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "objects 0" in out.stdout


# -- dashboards ----------------------------------------------------------------------------
def test_promql_extractor():
    expr = ('histogram_quantile(0.99, sum by (le, status) (rate(ray_cca_a_bucket{x=~"$run", y="foo(bar)"}[$__rate_interval])))'
            ' / on() clamp_min(sum without (z) (ray_node_b), 1e-9) or vector(0) + c:recorded offset 5m + d @ end()')
    assert promql_metric_names(expr) == {"ray_cca_a_bucket", "ray_node_b", "c:recorded", "d"}


def test_dashboards_are_generated_and_well_formed():
    gen = _load_generator()
    dashboards = our_dashboards()
    assert set(dashboards) == set(gen.DASHBOARDS), "dashboards/*.json differ from generate.py's list"
    for fname, spec in gen.DASHBOARDS.items():
        assert (DASHBOARD_DIR / fname).read_text() == gen.render(spec), f"{fname} is stale: run python dashboards/generate.py"
    for fname, d in dashboards.items():
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)), f"{fname}: duplicate panel ids"
        assert any(v["type"] == "datasource" and v["query"] == "prometheus" for v in d["templating"]["list"])
        graphs = [p for p in d["panels"] if p["type"] != "row"]
        assert graphs, fname
        for p in graphs:
            assert p["targets"] and p["datasource"]["uid"] == "${datasource}", f"{fname}: {p['title']}"
            for t in p["targets"]:
                assert "__name__" not in t["expr"], f"{fname}: {p['title']}: name metrics explicitly"


def test_dashboards_query_only_exported_metrics():
    builtins = ray_builtin_metric_names()
    assert {"ray_node_cpu_utilization", "ray_node_gpus_utilization"} <= builtins  # the extractor found Ray's
    names = queried_names(our_dashboards())
    unknown = sorted(n for n in names if n not in METRIC_NAMES and n not in builtins)
    assert not unknown, f"dashboards query metrics that neither cca_ray.telemetry nor Ray exports: {unknown}"
    # and every metric cca-ray exports is charted somewhere
    uncharted = [s.name for s in telemetry.ALL_METRICS if not set(s.series) & names]
    assert not uncharted, f"exported but on no dashboard: {uncharted}"


def test_promql_parses_and_extractor_agrees():
    """A real PromQL parser accepts every query and finds the same metric names."""
    pp = pytest.importorskip("promql_parser", reason="pip install promql-parser (test extra)")

    def names(node) -> set[str]:
        if type(node).__name__ == "VectorSelector":
            return {node.name}
        found = set()
        for attr in ("lhs", "rhs", "expr", "param", "vector_selector"):
            child = getattr(node, attr, None)
            if child is not None:
                found |= names(child)
        for arg in getattr(node, "args", None) or []:
            found |= names(arg)
        return found

    for fname, d in our_dashboards().items():
        for expr in dashboard_queries(d):
            ast = pp.parse(re.sub(r"\[\$\w+\]", "[5m]", expr))  # Grafana's range variables
            assert names(ast) == promql_metric_names(expr), f"{fname}: {expr}"


# -- end to end: a real Ray node's metrics endpoint ---------------------------------------
def _scrape(port: int) -> dict[str, list]:
    """Sample name -> [(labels, value)] from http://127.0.0.1:<port>/metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


@pytest.mark.e2e
def test_every_dashboard_metric_is_exported(ray_local):
    ray = ray_local

    @ray.remote(num_cpus=0)
    class Recorder:
        def record(self, run: str) -> None:
            TrainMetrics().record({k: 0.5 for k in TRAIN_GAUGES}, {"run": run, "objective": "cca"})
            s = ServeMetrics("cca-e2e")
            s.observe_request(0.2, 200)
            s.observe_request(3.0, 503)
            s.observe_batch(4)
            s.set_queue_length(2)
            s.add_images(4)
            s.record_error(503, "queue_full")

    run = f"e2e-{time.time_ns()}"
    rec = Recorder.remote()  # an actor, so the recording process outlives the export interval
    ray.get(rec.record.remote(run))
    node = next(n for n in ray.nodes() if n["Alive"])
    port = node["MetricsExportPort"]
    dashboard_cca = {n for n in queried_names(our_dashboards()) if n.startswith("ray_cca_")}
    assert dashboard_cca, "no dashboard queries a cca metric"
    wanted = dashboard_cca | METRIC_NAMES
    deadline, missing, samples = time.monotonic() + 90, wanted, {}
    while missing and time.monotonic() < deadline:  # Ray exports every ~10 s
        time.sleep(2)
        samples = _scrape(port)
        missing = {n for n in wanted if n not in samples}
    ray.kill(rec)
    assert not missing, f"not exported by Ray after 90 s: {sorted(missing)}; cca names seen: " \
                        f"{sorted(n for n in samples if 'cca' in n)}"
    loss = [v for labels, v in samples["ray_cca_train_loss"] if labels.get("run") == run]
    assert loss == [0.5], samples["ray_cca_train_loss"]
    errors = [labels for labels, _ in samples["ray_cca_serve_errors_total"] if labels.get("deployment") == "cca-e2e"]
    assert errors and errors[0]["status"] == "503" and errors[0]["reason"] == "queue_full"
    # Ray's own node metrics the dashboards chart are there too (GPU ones need a GPU)
    assert {"ray_node_cpu_utilization", "ray_node_mem_used", "ray_node_mem_total"} <= set(samples)
    print("exported cca metrics:", " ".join(sorted(n for n in samples if n.startswith("ray_cca_"))))


@pytest.mark.e2e
def test_training_exports_every_train_metric_a_dashboard_charts(ray_local, tmp_path):
    """A real 2-step CCA run (smoke preset, 2 Ray Train workers, DeepSpeed) exports, from rank 0, every
    ray_cca_train_* series the dashboards query, tagged with the run's name and objective."""
    from cca_ray.config import load_config
    from cca_ray.data.prepare import prepare
    from cca_ray.train.pretrain import build_init_model
    from cca_ray.train.driver import run_training

    ray = ray_local
    cfg = load_config("smoke", overrides=["train.max_steps=2", "train.log_every=1", "train.checkpoint_every=2"],
                      workdir=tmp_path)
    prepare(cfg)
    model_dir = build_init_model(cfg, tmp_path / "init")  # random init: the curves' values do not matter here
    run = f"telemetry-{time.time_ns()}"
    res = run_training(cfg, "train", run_name=run, model_dir=model_dir, export=False)
    assert res.metrics["step"] == 2

    wanted = {n for n in queried_names(our_dashboards()) if n.startswith("ray_cca_train_")}
    assert len(wanted) >= 8, wanted  # loss, relative likelihoods, accuracy, margin, throughput, lr, ...
    port = next(n for n in ray.nodes() if n["Alive"])["MetricsExportPort"]
    ours: dict[str, list] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # Ray exports every ~10 s; usually the series are there at once
        ours = {name: [(labels, v) for labels, v in series if labels.get("run") == run]
                for name, series in _scrape(port).items() if name.startswith("ray_cca_train_")}
        if wanted <= {name for name, series in ours.items() if series}:
            break
        time.sleep(2)
    missing = sorted(n for n in wanted if not ours.get(n))
    assert not missing, f"run {run}: not exported after 60 s: {missing}; seen: {sorted(ours)}"
    # one series per run (rank 0 only), at the final step, tagged with the objective
    assert [v for _, v in ours["ray_cca_train_step"]] == [2.0], ours["ray_cca_train_step"]
    assert all(labels["objective"] == "cca" for series in ours.values() for labels, _ in series)
    assert ours["ray_cca_train_tokens_per_s"][0][1] > 0
