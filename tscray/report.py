"""``tscray report``: the paper's figures and tables from a sweep's Parquet rows.

- Figure 5 style: final ACC/ASR of TSC versus t, one panel per E_TSC, mean over attacks and seeds with
  ±1 std bands and the 15% ASR success line (``fig5_tsc_vs_t``).
- Figure 6 style: the same for self-supervised rows (``method`` = simclr), when a sweep has them.
- Figure 3 style: ACC/ASR along each curve (stage 1, stage 2, per round) with MCR beside it, one figure
  per attack setting, the chosen t marked (``fig3_<setting>``).
- Table 1 style: final ACC/ASR per attack × poison rate × defense, CSV and Markdown, ASR < 15% marked.
- ``index.html`` showing everything, openable without a server.

Every figure is drawn from rows the caller can find in the Parquet: each plotted value is a mean of
``final`` (or curve) rows grouped by the columns named in the figure.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

SUCCESS_ASR = 15.0
SETTING = ["dataset", "arch", "attack", "poison_rate"]
STYLE = {"acc": {"color": "0.15", "marker": "o", "linestyle": "-"},
         "asr": {"color": "0.45", "marker": "s", "linestyle": "--"}}


@dataclass
class Report:
    """What a report wrote, and what it could not draw and why."""

    out: Path
    figures: list[Path] = field(default_factory=list)
    tables: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    index: Path | None = None


def _slug(*parts: object) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "_".join(str(p) for p in parts)).strip("-")


def _finish(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def figure_vs_t(df: pd.DataFrame, out: Path, fmt: str, method: str | None, title: str, name: str) -> Path | None:
    """Final ACC/ASR of TSC versus t, one panel per E_TSC (mean ± std over attacks and seeds)."""
    d = df[(df.defense == "tsc") & (df.stage == "final")]
    if method is not None and "method" in d:
        d = d[d["method"] == method]
    elif method is not None:
        return None
    if d.empty:
        return None
    es = sorted(int(e) for e in d.e_tsc.dropna().unique())
    fig, axes = plt.subplots(1, len(es), figsize=(4.2 * len(es), 3.6), sharey=True, squeeze=False)
    for ax, e in zip(axes[0], es):
        g = d[d.e_tsc == e].groupby("t")
        for metric in ("acc", "asr"):
            mean, std, n = g[metric].mean(), g[metric].std().fillna(0.0), g[metric].count()
            ax.plot(mean.index, mean.values, label=f"{metric.upper()} (mean)", **STYLE[metric])
            ax.fill_between(mean.index, (mean - std).values, (mean + std).values, color=STYLE[metric]["color"],
                            alpha=0.15, linewidth=0)
        ax.axhline(SUCCESS_ASR, color="0.3", linestyle=":", linewidth=1, label="ASR 15% (success)")
        ax.set_title(f"E_TSC = {e}  (n = {int(n.max())} runs per t)")
        ax.set_xlabel("curve index t")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test ACC / ASR (%)")
    axes[0][-1].legend(loc="center right", fontsize=8)
    settings = ", ".join(f"{c}: {', '.join(map(str, sorted(d[c].unique())))}" for c in ("dataset", "arch", "attack"))
    fig.suptitle(f"{title}\n{settings}; bands: ±1 std over attacks and seeds", fontsize=9)
    return _finish(fig, out / f"{name}.{fmt}")


def figure_curves(df: pd.DataFrame, out: Path, fmt: str) -> list[Path]:
    """Figure 3 style: ACC/ASR along the curves of the TSC trial with most rounds, per setting."""
    paths = []
    curves = df[df.stage.isin(["curve1", "curve2"]) & (df.defense == "tsc")]
    for key, d in curves.groupby(SETTING + ["seed"]):
        best = d.sort_values(["e_tsc", "t"]).drop_duplicates("trial_id")
        e_max = best.e_tsc.max()
        trial = best[best.e_tsc == e_max]
        trial_id = trial.trial_id.iloc[len(trial) // 2]
        rows = d[d.trial_id == trial_id]
        t_chosen = float(rows.t.iloc[0])
        mcr = df[(df.defense == "mcr") & (df.stage == "curve")]
        for col, val in zip(SETTING + ["seed"], key):
            mcr = mcr[mcr[col] == val]
        if not mcr.empty:
            mcr = mcr[mcr.trial_id == mcr.trial_id.iloc[0]]
        rounds = sorted(int(r) for r in rows["round"].unique())
        fig, axes = plt.subplots(2, len(rounds), figsize=(3.8 * len(rounds), 6.2), sharex=True, sharey=True,
                                 squeeze=False)
        for j, r in enumerate(rounds):
            for i, metric in enumerate(("asr", "acc")):
                ax = axes[i][j]
                for stage, style in (("curve1", {"color": "0.1", "marker": "o", "linestyle": "-"}),
                                     ("curve2", {"color": "0.45", "marker": "s", "linestyle": "--"})):
                    s = rows[(rows.stage == stage) & (rows["round"] == r)].sort_values("t_curve")
                    ax.plot(s.t_curve, s[metric], label=f"{metric.upper()} of stage {stage[-1]} (TSC)", **style)
                if not mcr.empty:
                    m = mcr.sort_values("t_curve")
                    ax.plot(m.t_curve, m[metric], color="0.65", marker="^", linestyle=":",
                            label=f"{metric.upper()} of MCR")
                ax.axvline(t_chosen, color="0.5", linewidth=0.8, linestyle="-.")
                ax.set_ylim(-2, 102)
                ax.grid(alpha=0.3)
                if i == 0:
                    ax.set_title(f"round {r} (t = {t_chosen:g} marked)")
                if i == 1:
                    ax.set_xlabel("t along the curve")
                if j == 0:
                    ax.set_ylabel(f"test {metric.upper()} (%)")
        axes[0][0].legend(fontsize=7)
        axes[1][0].legend(fontsize=7)
        fig.suptitle("ACC/ASR along the curves: " + ", ".join(f"{c} {v}" for c, v in zip(SETTING + ["seed"], key)),
                     fontsize=9)
        paths.append(_finish(fig, out / f"fig3_{_slug(*key)}.{fmt}"))
    return paths


def table1(df: pd.DataFrame, out: Path) -> list[Path]:
    """Final ACC/ASR per setting × defense (mean over seeds) as CSV and Markdown."""
    d = df[df.stage == "final"].copy()
    if d.empty:
        return []
    d["defense_label"] = d.apply(lambda r: "no defense" if r.defense == "none" else
                                 f"tsc (E={int(r.e_tsc)}, t={r.t:g})" if r.defense == "tsc" else
                                 f"mcr (t={r.t:g})" if r.defense == "mcr" else r.defense, axis=1)
    g = (d.groupby(SETTING + ["defense_label"], dropna=False)
         .agg(acc=("acc", "mean"), asr=("asr", "mean"), seeds=("seed", "nunique"), rows=("acc", "size"))
         .reset_index())
    g["success"] = (g.asr < SUCCESS_ASR) & (g.defense_label != "no defense")
    csv = out / "table1.csv"
    g.to_csv(csv, index=False, float_format="%.2f")
    labels = sorted(g.defense_label.unique(), key=lambda s: (s != "no defense", s))
    lines = ["| " + " | ".join(SETTING) + " | " + " | ".join(labels) + " |",
             "|" + "---|" * (len(SETTING) + len(labels))]
    for key, rows in g.groupby(SETTING):
        cells = []
        for lab in labels:
            r = rows[rows.defense_label == lab]
            if r.empty:
                cells.append("–")
            else:
                r = r.iloc[0]
                cells.append(f"{r.acc:.2f} / {r.asr:.2f}" + (" ✓" if r.success else ""))
        lines.append("| " + " | ".join(str(k) for k in key) + " | " + " | ".join(cells) + " |")
    md = out / "table1.md"
    md.write_text("Final ACC / ASR (%), mean over seeds; ✓ marks a successful defense (ASR < 15%).\n\n"
                  + "\n".join(lines) + "\n")
    return [csv, md]


def _md_table_html(md: str) -> str:
    rows = [l for l in md.splitlines() if l.startswith("|") and not l.startswith("|---")]
    out = ["<table>"]
    for i, row in enumerate(rows):
        cells = [c.strip() for c in row.strip("|").split("|")]
        tag = "th" if i == 0 else "td"
        out.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
    return "\n".join(out + ["</table>"])


def write_index(rep: Report, title: str) -> Path:
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1400px;margin:2em auto}img{max-width:100%;"
             "border:1px solid #ccc;margin:.5em 0}table{border-collapse:collapse}td,th{border:1px solid #999;"
             "padding:3px 8px;text-align:right}</style>", f"<h1>{html.escape(title)}</h1>"]
    for p in rep.tables:
        if p.suffix == ".md":
            parts.append(f"<h2>Table 1 style</h2><p>{html.escape(p.read_text().splitlines()[0])} "
                         f"(<a href='{p.name}'>markdown</a>, <a href='table1.csv'>CSV</a>)</p>")
            parts.append(_md_table_html(p.read_text()))
    for p in rep.figures:
        parts.append(f"<h2>{html.escape(p.stem)}</h2>")
        parts.append(f"<object data='{p.name}' type='image/svg+xml'></object>" if p.suffix == ".svg"
                     else f"<a href='{p.name}'>{p.name}</a>" if p.suffix == ".pdf" else f"<img src='{p.name}'>")
    if rep.skipped:
        parts.append("<h2>Not drawn</h2><ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in rep.skipped) + "</ul>")
    path = rep.out / "index.html"
    path.write_text("\n".join(parts))
    return path


def make_report(df: pd.DataFrame, out: Path, fmt: str = "png", title: str = "tscray report") -> Report:
    """Write every figure and table the rows allow; record what was skipped and why."""
    if fmt not in ("png", "svg", "pdf"):
        raise ValueError(f"format must be png, svg or pdf, got {fmt!r}")
    if df.empty:
        raise ValueError("the sweep has no result rows yet: run `tscray sweep` first (or wait for trials to finish)")
    out.mkdir(parents=True, exist_ok=True)
    rep = Report(out)
    p = figure_vs_t(df, out, fmt, None, "Final ACC/ASR of TSC versus t (Figure 5 style)", "fig5_tsc_vs_t")
    rep.figures.append(p) if p else rep.skipped.append("Figure 5: no finished TSC trials")
    p = figure_vs_t(df, out, fmt, "simclr", "Self-supervised TSC versus t (Figure 6 style)", "fig6_ssl_vs_t")
    rep.figures.append(p) if p else rep.skipped.append("Figure 6: no self-supervised (simclr) rows in this sweep")
    curves = figure_curves(df, out, fmt)
    rep.figures += curves
    if not curves:
        rep.skipped.append("Figure 3: no curve evaluations (set eval.curve_ts in the spec)")
    rep.tables = table1(df, out)
    rep.index = write_index(rep, title)
    return rep
