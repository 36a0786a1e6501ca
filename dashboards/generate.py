"""Write the Grafana dashboards in this folder from the compact panel lists below.

    python dashboards/generate.py          # rewrites dashboards/cca_*.json

Edit the lists here, not the JSON: a test checks that the committed JSON equals this
script's output, that every metric a query names is exported by cca_ray.telemetry (or is
one of Ray's own built-in metrics) and, end to end, that it shows up on a real Ray node.
The dashboards follow the conventions of the ones Ray generates (a ``datasource``
variable, a ``SessionName`` filter), so they sit next to them in the same Grafana.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
DS = {"type": "prometheus", "uid": "${datasource}"}
S = 'SessionName=~"$SessionName"'
RUN = f'run=~"$run", {S}'
DEP = f'deployment=~"$deployment", {S}'
RATE = "[$__rate_interval]"


def q(expr: str, legend: str) -> dict:
    return {"expr": expr, "legendFormat": legend}


def quantiles(bucket: str, selector: str, qs=(0.5, 0.9, 0.99)) -> list[dict]:
    return [q(f"histogram_quantile({x}, sum by (le) (rate({bucket}{{{selector}}}{RATE})))", f"p{round(x * 100)}") for x in qs]


TRAINING = {
    "uid": "cca-ray-training",
    "title": "cca-ray / Training",
    "variables": [("run", "label_values(ray_cca_train_loss{" + S + "}, run)")],
    "rows": [
        ("CCA curves (rank 0, all-reduced over workers)", [
            ("Loss", "Objective loss per run (CCA, CCA+CFG, DPO, unlearning or SFT).", "none", [
                q(f"max by (run, objective) (ray_cca_train_loss{{{RUN}}})", "{{run}} ({{objective}})")]),
            ("Relative likelihood log p_theta/p_phi", "Matched pairs should rise and mismatched ones fall as CCA trains (nats per image).", "none", [
                q(f"max by (run) (ray_cca_train_rel_logp_pos{{{RUN}}})", "{{run}} positive"),
                q(f"max by (run) (ray_cca_train_rel_logp_neg{{{RUN}}})", "{{run}} negative")]),
            ("Pairwise accuracy", "Fraction of pairs whose positive gained more likelihood than its negative.", "percentunit", [
                q(f"max by (run) (ray_cca_train_pair_accuracy{{{RUN}}})", "{{run}}")]),
            ("Margin (positive - negative)", "Mean rel_logp_pos - rel_logp_neg (nats).", "none", [
                q(f"max by (run) (ray_cca_train_margin{{{RUN}}})", "{{run}}")]),
        ]),
        ("Optimization", [
            ("Gradient norm", "Global L2 norm before clipping.", "none", [
                q(f"max by (run) (ray_cca_train_grad_norm{{{RUN}}})", "{{run}}")]),
            ("Learning rate", "", "none", [q(f"max by (run) (ray_cca_train_lr{{{RUN}}})", "{{run}}")]),
            ("Optimizer step", "Steps taken; a flat line on a live run means it is stuck (or checkpointing).", "none", [
                q(f"max by (run) (ray_cca_train_step{{{RUN}}})", "{{run}}")]),
            ("Time blocked in ray.train.report", "Share of wall time workers spend in report/checkpoint sync (Ray Train built-in).", "percentunit", [
                q(f"sum by (ray_train_run_name) (rate(ray_train_report_total_blocked_time_s{{{S}}}{RATE})) / "
                  f"count by (ray_train_run_name) (ray_train_report_total_blocked_time_s{{{S}}})", "{{ray_train_run_name}}")]),
        ]),
        ("Throughput", [
            ("Image tokens / s", "All workers together.", "none", [
                q(f"max by (run) (ray_cca_train_tokens_per_s{{{RUN}}})", "{{run}}")]),
            ("Pairs / s", "Training rows per second, all workers together.", "none", [
                q(f"max by (run) (ray_cca_train_samples_per_s{{{RUN}}})", "{{run}}")]),
        ]),
        ("Cluster (Ray built-in metrics)", [
            ("GPU utilization", "Per GPU, from Ray's node metrics.", "percent", [
                q(f"avg by (instance, GpuIndex) (ray_node_gpus_utilization{{{S}}})", "{{instance}} GPU {{GpuIndex}}")]),
            ("GPU memory used", "Per GPU (Ray reports MiB).", "bytes", [
                q(f"sum by (instance, GpuIndex) (ray_node_gram_used{{{S}}}) * 1048576", "{{instance}} GPU {{GpuIndex}}")]),
            ("CPU utilization", "Per node.", "percent", [
                q(f"avg by (instance) (ray_node_cpu_utilization{{{S}}})", "{{instance}}")]),
            ("Host memory used", "Per node.", "percentunit", [
                q(f"sum by (instance) (ray_node_mem_used{{{S}}}) / sum by (instance) (ray_node_mem_total{{{S}}})", "{{instance}}")]),
        ]),
    ],
}

SERVING = {
    "uid": "cca-ray-serving",
    "title": "cca-ray / Serving",
    "variables": [("deployment", "label_values(ray_cca_serve_queue_length{" + S + "}, deployment)")],
    "rows": [
        ("Traffic and errors", [
            ("Requests / s by status", "Every finished request, failed ones included.", "reqps", [
                q(f"sum by (status) (rate(ray_cca_serve_request_latency_seconds_count{{{DEP}}}{RATE}))", "{{status}}")]),
            ("Error rate", "Failed requests / all requests.", "percentunit", [
                q(f"sum(rate(ray_cca_serve_errors_total{{{DEP}}}{RATE})) / "
                  f"clamp_min(sum(rate(ray_cca_serve_request_latency_seconds_count{{{DEP}}}{RATE})), 1e-9)", "error rate")]),
            ("Errors / s by reason", "", "reqps", [
                q(f"sum by (status, reason) (rate(ray_cca_serve_errors_total{{{DEP}}}{RATE}))", "{{status}} {{reason}}")]),
            ("Images / s", "", "none", [
                q(f"sum by (deployment) (rate(ray_cca_serve_images_total{{{DEP}}}{RATE}))", "{{deployment}}")]),
        ]),
        ("Latency and batching", [
            ("Request latency (successful requests)", "Percentiles from the histogram buckets.", "s",
             quantiles("ray_cca_serve_request_latency_seconds_bucket", DEP + ', status=~"2.."')),
            ("Batch size", "Requests per @serve.batch call.", "none", quantiles("ray_cca_serve_batch_size_bucket", DEP)),
            ("Queue length", "Requests waiting for a batch slot, per deployment.", "none", [
                q(f"sum by (deployment) (ray_cca_serve_queue_length{{{DEP}}})", "{{deployment}}")]),
            ("Healthy replicas", "Ray Serve built-in.", "none", [
                q(f"sum by (application, deployment) (ray_serve_deployment_replica_healthy{{{S}}})", "{{application}}/{{deployment}}")]),
            ("GPU utilization", "Per GPU, from Ray's node metrics.", "percent", [
                q(f"avg by (instance, GpuIndex) (ray_node_gpus_utilization{{{S}}})", "{{instance}} GPU {{GpuIndex}}")]),
        ]),
    ],
}


def _variable(name: str, query: str) -> dict:
    return {
        "name": name, "type": "query", "datasource": DS, "definition": query,
        "query": {"query": query, "refId": f"{name}-variable"},
        "includeAll": True, "allValue": ".+", "multi": True, "refresh": 2, "sort": 1,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    }


def build(spec: dict) -> dict:
    """A Grafana (schema 39) dashboard: one collapsed-off row per group, two panels per line."""
    panels, pid, y = [], 1, 0
    for row_title, row_panels in spec["rows"]:
        panels.append({"id": pid, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y = pid + 1, y + 1
        for i, (title, desc, unit, targets) in enumerate(row_panels):
            panels.append({
                "id": pid, "type": "timeseries", "title": title, "description": desc, "datasource": DS,
                "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": y + 8 * (i // 2)},
                "fieldConfig": {"defaults": {"unit": unit, "custom": {"fillOpacity": 0, "lineWidth": 1}}, "overrides": []},
                "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
                            "tooltip": {"mode": "multi", "sort": "desc"}},
                "targets": [{"refId": chr(ord("A") + k), "datasource": DS, "expr": t["expr"],
                             "legendFormat": t["legendFormat"], "range": True} for k, t in enumerate(targets)],
            })
            pid += 1
        y += 8 * ((len(row_panels) + 1) // 2)
    session = _variable("SessionName", "label_values(ray_node_cpu_utilization, SessionName)")
    session.update(multi=False, includeAll=True, sort=2)
    datasource = {"name": "datasource", "type": "datasource", "query": "prometheus", "hide": 0,
                  "label": "Data source", "current": {}, "options": [], "refresh": 1}
    return {
        "uid": spec["uid"], "title": spec["title"], "tags": ["cca-ray", "ray"],
        "editable": True, "graphTooltip": 1, "schemaVersion": 39, "version": 1,
        "refresh": "30s", "time": {"from": "now-3h", "to": "now"}, "timezone": "",
        "annotations": {"list": []}, "links": [],
        "templating": {"list": [datasource, session] + [_variable(n, qq) for n, qq in spec["variables"]]},
        "panels": panels,
    }


DASHBOARDS = {"cca_training.json": TRAINING, "cca_serving.json": SERVING}


def render(spec: dict) -> str:
    return json.dumps(build(spec), indent=2) + "\n"


def main() -> None:
    for fname, spec in DASHBOARDS.items():
        tmp = HERE / f".{fname}.tmp"
        tmp.write_text(render(spec))
        tmp.replace(HERE / fname)  # atomic: a reader never sees half a dashboard
        print(f"wrote {HERE / fname}")


if __name__ == "__main__":
    main()
