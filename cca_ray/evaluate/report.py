"""Results as people read them: the markdown/CSV table and the trade-off plot (FID vs IS, precision vs recall)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

TABLE_COLUMNS = ["method", "guidance", "lam", "beta", "fid", "isc_mean", "kid_mean", "precision", "recall", "accuracy", "n"]


def format_table(rows: list[dict]) -> str:
    """Markdown table of result rows (missing values shown as '-')."""

    def cell(v):
        if v is None:
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    head = "| " + " | ".join(TABLE_COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"
    body = ["| " + " | ".join(cell(r.get(c)) for c in TABLE_COLUMNS) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=TABLE_COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


# knob curves of the trade-off plot: one model, many points (the knob chosen at sampling time)
CURVES = {
    "lam_conditioned": ("λ-conditioned CCA, λ at sampling", "tab:purple", "D", "λ", "lam"),
    "gft": ("GFT, β at sampling", "tab:orange", "v", "β", "beta"),
}


def trade_off_plot(cfg_rows: list[dict], points: list[dict], path: Path,
                   curves: dict[str, list[dict]] | None = None) -> Path:
    """The paper's Figure 4: FID vs IS (left) and precision vs recall (right).

    cfg_rows: the base model over CFG scales (a gray line, one point per `guidance`); points: one
    guidance-free model each (fixed-λ CCA trials, DPO, unlearning: markers); curves: {"lam_conditioned" |
    "gft": rows of one knob model scored at several `lam` / `beta`} drawn as lines like the CFG one.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, (x, y) in zip(axes, [("isc_mean", "fid"), ("recall", "precision")]):
        ax.plot([r[x] for r in cfg_rows], [r[y] for r in cfg_rows], "o-", color="tab:gray", label="base + CFG (scale)")
        for r in cfg_rows:
            ax.annotate(f"s={r['guidance']:g}", (r[x], r[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for name, rows in (curves or {}).items():
            label, color, marker, sym, key = CURVES[name]
            ax.plot([r[x] for r in rows], [r[y] for r in rows], "-", marker=marker, color=color, label=label)
            for r in rows:
                ax.annotate(f"{sym}={r[key]:.3g}", (r[x], r[y]), fontsize=7, xytext=(3, 3), textcoords="offset points",
                            color=color)
        styles = {"cca": ("tab:red", "*"), "dpo": ("tab:blue", "s"), "unlearning": ("tab:green", "^")}
        for method, (color, marker) in styles.items():
            pts = [p for p in points if p["method"].startswith(method)]
            if pts:
                ax.scatter([p[x] for p in pts], [p[y] for p in pts], c=color, marker=marker, s=60,
                           label="CCA, fixed λ (trials)" if method == "cca" else f"{method}, guidance-free")
            for p in pts:
                label = ",".join(f"{sym}={p[k]:.2g}" for sym, k in (("λ", "lam"), ("β", "beta")) if p.get(k) is not None)
                ax.annotate(label, (p[x], p[y]), fontsize=6, xytext=(3, -8), textcoords="offset points", color=color)
        ax.set_xlabel({"isc_mean": "Inception Score (extractor)", "recall": "recall"}[x])
        ax.set_ylabel({"fid": "FID (lower is better)", "precision": "precision"}[y])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Guidance-free CCA, λ-conditioned CCA and GFT vs the base model with CFG" if curves
                 else "CCA without guidance vs the base model with CFG")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
