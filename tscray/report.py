"""``tscray report``: the paper's figures and tables from a sweep's Parquet rows.

- Table 1 in the paper's layout (``table1.md``, ``table1.csv``, ``table1_long.csv``): one row per dataset ×
  arch × attack × poison rate, one column per defense (No defense, then the paper's order FP, NC, NAD, MCR,
  ANP, FT-SAM, I-BAU, SAU, FST, fine-tuning, TSC last, then any other defense alphabetically), each cell
  final ACC / ASR as mean ± std over seeds, ASR ≥ 15% marked as a failed defense, and an average row. TSC
  and MCR, whose rows span a grid, appear at one configured setting (:func:`choose_setting`).
- Against each numeric field axis (``defense.clean_ratio``...): ``fig_vs_<axis>`` (each defense, mean over
  attacks) and, per attack setting, ``vs_<axis>.md/csv`` with ``fig_vs_<axis>_by_setting``.
- Defense cost (``defense_cost.md/csv``): each defense's mean ``defense_seconds`` beside its mean ACC/ASR.
- NC detection (``nc_detection.md/csv``): NC's anomaly index and flagged classes, when the rows have them.
- TSC's (E_TSC, t) grid (``tsc_grid.md/csv``) and its heatmaps (``tsc_grid.<fmt>``), per method.
- Figure 5 style: final ACC/ASR of TSC versus t, one panel per E_TSC, mean over attacks and seeds with
  ±1 std bands and the 15% ASR success line (``fig5_tsc_vs_t``).
- Figure 6 style: the same for self-supervised rows (``method`` = simclr), when a sweep has them.
- Figure 3 style: ACC/ASR along each curve (stage 1, stage 2, per round) with MCR beside it, one figure
  per attack setting, the chosen t marked (``fig3_<setting>``).
- ``index.html`` showing everything, openable without a server.

Every number is drawn from rows the caller can find in the Parquet: each value is a mean of ``final``
(or curve) rows grouped by the columns named beside it.
"""

from __future__ import annotations

import html
import math
import re
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

SUCCESS_ASR = 15.0  # the paper's threshold: a defense with final ASR >= 15% failed
SETTING = ["dataset", "arch", "attack", "poison_rate"]
# Table 1's column order: No defense, the paper's baselines in its order, then ours, TSC last
PAPER_ORDER = ("none", "fp", "nc", "nad", "mcr", "anp", "ft-sam", "i-bau", "sau", "fst", "finetune", "tsc")
LABELS = {"none": "No defense", "fp": "FP", "nc": "NC", "nad": "NAD", "mcr": "MCR", "anp": "ANP",
          "ft-sam": "FT-SAM", "i-bau": "I-BAU", "sau": "SAU", "fst": "FST", "finetune": "fine-tuning",
          "tsc": "TSC"}
# Table 1's row order: the paper's attacks in its order, then the rest alphabetically
ATTACK_ORDER = ("badnets", "blended", "lf", "ssba", "sbl", "sbl-blended", "sapa", "lc", "narcissus", "sig")
# the paper's TSC settings (Section 5.1): supervised E_TSC 3, t 0.4; SimCLR and CLIP E_TSC 2, t 0.25
PAPER_SETTING = {"supervised": (3, 0.4), "simclr": (2, 0.25)}
DEFAULT_SETTING = (3, 0.4)
STYLE = {"acc": {"color": "0.15", "marker": "o", "linestyle": "-"},
         "asr": {"color": "0.45", "marker": "s", "linestyle": "--"}}


@dataclass
class Report:
    """What a report wrote, and what it could not draw and why."""

    out: Path
    figures: list[Path] = field(default_factory=list)
    tables: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what a reader must know first (shown atop index.html)
    index: Path | None = None
    sections: list[Section] = field(default_factory=list)


@dataclass
class Section:
    """One table section of index.html: its title, caption, HTML table(s), the files it wrote, its numbers."""

    title: str
    anchor: str
    caption: str
    html: str
    paths: list[Path] = field(default_factory=list)
    data: pd.DataFrame | None = None
    figure: Path | None = None


# the columns that say which setting a row is: written as they are, never rounded (0.005 is not 0.01)
KEY_COLUMNS = {*SETTING, "method", "defense", "seed", "seeds", "e_tsc", "t", "round", "rounds", "runs", "stage",
               "clean_ratio"}


def _to_csv(frame: pd.DataFrame, path: Path, digits: int = 2) -> None:
    """``frame`` as CSV with its measures (ACC, ASR, seconds, their std) rounded to ``digits`` and its settings
    (poison rate, t, field-axis values) exact: a format for every float column had written a 0.5% poison
    rate as 0.01 and three clean ratios under 1% alike as 0.00."""
    from tscray.config import FIELD_AXIS_SECTIONS

    axes = tuple(f"{section}." for section in FIELD_AXIS_SECTIONS)
    measures = [c for c in frame.columns
                if c not in KEY_COLUMNS and not str(c).startswith(axes) and pd.api.types.is_float_dtype(frame[c])]
    frame.round({c: digits for c in measures}).to_csv(path, index=False)


def _slug(*parts: object) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "_".join(str(p) for p in parts)).strip("-")


def _finish(fig: plt.Figure, path: Path) -> Path:
    """Save and close ``fig``. The saved area grows to hold every title and legend: a suptitle wider than one
    panel, or a legend below the axes, was cut off at the figure's edge."""
    fig.tight_layout()
    fig.savefig(path, dpi=130, bbox_inches="tight", pad_inches=0.1)
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
        ax.set_title(f"E_TSC = {e}  ({_runs(int(n.min()), int(n.max()))} per t)")  # (a t may lack some runs)
        ax.set_xlabel("curve index t")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test ACC / ASR (%)")
    axes[0][-1].legend(loc="center right", fontsize=8)
    settings = ", ".join(f"{c}: {', '.join(map(str, sorted(d[c].unique())))}" for c in ("dataset", "arch", "attack"))
    fig.suptitle(f"{title}\n{settings}; bands: ±1 std over attacks and seeds", fontsize=9)
    return _finish(fig, out / f"{name}.{fmt}")


def axis_parts(df: pd.DataFrame) -> list[tuple[pd.DataFrame, str, str]]:
    """The rows split by the sweep's field-axis values: ``(rows, file suffix, title note)`` per combination
    (a row the axis does not apply to belongs to every part); one part of all rows when there are none."""
    axes = field_axes(df)
    if not axes:
        return [(df, "", "")]
    free = {a: df[a].isna() & ~_applies_to(df, a) for a in axes}
    # a trial the axis changes but whose block did not sweep it ran at the spec's value: a part of its own
    values = pd.DataFrame({a: df[a].astype(object).where(df[a].notna() | free[a], SPEC_VALUE) for a in axes})
    combos = values[~pd.concat(free, axis=1).all(axis=1)].drop_duplicates()
    combos = combos.assign(_o=combos.apply(lambda r: [_axis_rank(v) for v in r], axis=1)).sort_values("_o")
    parts = []
    for _, combo in combos.drop(columns="_o").iterrows():
        mask = pd.Series(True, index=df.index)
        for a, v in combo.items():
            mask &= free[a] if pd.isna(v) else (values[a] == v) | free[a]
        note = ", ".join(f"{a} {_value(v)}" for a, v in combo.items() if pd.notna(v))
        parts.append((df[mask], "_" + _slug(note), note))
    return parts


SPEC_VALUE = "as in the spec"  # a field axis' value shown for a trial whose grid block did not sweep it


def _applies_to(df: pd.DataFrame, axis: str) -> pd.Series:
    """Per row, whether field ``axis`` changes that trial (a ``defense.tsc.*`` axis not MCR's, ``defense.*`` not
    the undefended model's, ``train.attack_kw.<attack>.*`` only that attack's)."""
    from tscray.plan import axis_applies

    cols = [c for c in ("defense", "attack", "arch") if c in df]
    if "defense" not in cols:
        return pd.Series(True, index=df.index)
    memo: dict[tuple[Any, ...], bool] = {}
    out = []
    for row in df[cols].itertuples(index=False):
        key = tuple(row)
        if key not in memo:
            kw = dict(zip(cols, key))
            memo[key] = axis_applies(axis, str(kw["defense"]), kw.get("attack"), kw.get("arch"))
        out.append(memo[key])
    return pd.Series(out, index=df.index, dtype=bool)


def _axis_rows(df: pd.DataFrame, axis: str,
               tsc_setting: tuple[int, float] | None) -> tuple["Selection", pd.DataFrame] | None:
    """Table 1's defended rows with a numeric ``axis`` holding two values or more (None otherwise: a
    non-numeric axis is Table 1's to show)."""
    sel = select(df, tsc_setting)
    if sel is None or axis not in sel.rows:
        return None
    rows = sel.rows.dropna(subset=[axis])
    rows = rows[rows.defense != "none"]
    try:
        rows = rows.assign(**{axis: rows[axis].astype(float)})
    except (TypeError, ValueError):
        return None
    return (sel, rows) if rows[axis].nunique() >= 2 else None


def _other_axes(rows: pd.DataFrame, axis: str) -> tuple[list[str], pd.DataFrame]:
    """The sweep's field axes other than ``axis``, and ``rows`` with a ``_line`` column naming each row's values
    of them as a legend shows them ("defense.tsc.curve_steps 2000"; unset: "as in the spec"; an axis the trial
    does not depend on left out) and ``_line_o`` ordering them. A trial ``_final`` repeated along such an axis
    is kept once per value of ``axis`` (its copies would count it once per value of the other axis)."""
    others = [a for a in field_axes(rows) if a != axis]
    rows = rows.reset_index(drop=True)  # (cells are read by label below: concatenated files repeat an index)
    if not others:
        return others, rows.assign(_line="", _line_o=[()] * len(rows))
    shown = {a: _applies_to(rows, a) for a in others}
    values = [[(rows.at[i, a] if pd.notna(rows.at[i, a]) else SPEC_VALUE) if shown[a].at[i] else None
               for a in others] for i in rows.index]
    line = [", ".join(f"{a} {_value(v)}" for a, v in zip(others, vs) if v is not None) for vs in values]
    order = [tuple(_axis_rank(v) for v in vs) for vs in values]
    rows = rows.assign(_line=line, _line_o=order)
    if "_spread" in rows:
        copies = rows["_spread"].map(lambda s: any(a in s for a in others))
        same = [c for c in (*SETTING, "method", "seed", "trial_id", "e_tsc", "t", axis, "_line") if c in rows]
        rows = rows[~(copies & rows.duplicated(subset=same))]
    return others, rows


def figure_vs_axis(df: pd.DataFrame, axis: str, out: Path, fmt: str,
                   tsc_setting: tuple[int, float] | None = None) -> Path | None:
    """Final ACC and ASR of each defense against a numeric field axis (clean-set size, curve epochs...):
    the rows Table 1 shows (TSC and MCR at its setting), mean over attacks and seeds, ±1 std bands. One line
    per defense and value of the sweep's other field axes (never averaged over them)."""
    found = _axis_rows(df, axis, tsc_setting)
    if found is None:
        return None
    sel, rows = found
    others, rows = _other_axes(rows, axis)
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.6), sharex=True)
    lines = [(d, n) for d in defense_order(rows.defense.unique())
             for n in rows[rows.defense == d].sort_values("_line_o", kind="stable")._line.unique()]
    for d, name in lines:
        g = rows[(rows.defense == d) & (rows._line == name)].groupby(axis)
        for ax, metric in zip(axes, ("acc", "asr")):
            mean, std = g[metric].mean(), g[metric].std().fillna(0.0)
            (line,) = ax.plot(mean.index, mean.values, marker="o",
                              label=defense_label(d) + (f" ({name})" if name else ""))
            ax.fill_between(mean.index, (mean - std).clip(lower=0).values, (mean + std).clip(upper=100).values,
                            color=line.get_color(), alpha=0.12, linewidth=0)
    axes[1].axhline(SUCCESS_ASR, color="0.3", linestyle=":", linewidth=1, label="ASR 15% (success)")
    for ax, metric in zip(axes, ("ACC", "ASR")):
        ax.set_xlabel(axis)
        ax.set_ylabel(f"final {metric} (%)")
        ax.grid(alpha=0.3)
        _log_axis(ax, rows[axis].unique())
    axes[1].set_ylim(-2, 102)
    axes[1].legend(fontsize=7, loc="upper right")
    notes = "; ".join(s.why for s in sel.settings.values() if s.why)
    kept = f"; one line per value of {', '.join(others)} ({SPEC_VALUE}: the spec's own value)" if others else ""
    fig.suptitle(textwrap.fill(f"Final ACC / ASR against {axis}: mean over attacks and seeds, bands ±1 std"
                               + kept + (f". {notes}" if notes else ""), 130), fontsize=8)
    return _finish(fig, out / f"fig_vs_{_slug(axis)}.{fmt}")


def _log_axis(ax: Any, values: Any) -> None:
    """A log x axis where the values span 10x or more, ticked and labelled at the values themselves (the
    default labels every minor tick, '2×10⁻² 3×10⁻² 4×10⁻²...', which overlap); else the axis as it is."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    vals = sorted({float(v) for v in values})
    if not vals or vals[0] <= 0 or vals[-1] / vals[0] < 10:
        return
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(vals))
    ax.set_xticklabels([f"{v:g}" for v in vals])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


def vs_axis_by_setting(df: pd.DataFrame, axis: str, out: Path, fmt: str,
                       tsc_setting: tuple[int, float] | None = None) -> Section | None:
    """Each defense's final ACC / ASR against a numeric field axis per attack setting (mean over seeds):
    ``vs_<axis>.md`` / ``.csv`` and a figure with one line per setting (±1 std bars). The mean over attacks
    in ``fig_vs_<axis>`` hides what a clean-set study is after: one attack removed at every size, another at
    none. None when the rows hold one setting (that figure then says it all)."""
    found = _axis_rows(df, axis, tsc_setting)
    if found is None:
        return None
    sel, rows = found
    setting = [k for k in sel.keys if k != axis and k in rows and rows[k].nunique(dropna=False) > 1]
    if not setting:
        return None
    per_seed = rows.groupby(["defense", *setting, axis, "seed"], dropna=False)[["acc", "asr"]].mean().reset_index()
    table = (per_seed.groupby(["defense", *setting, axis], dropna=False)
             .agg(acc=("acc", "mean"), acc_std=("acc", "std"), asr=("asr", "mean"), asr_std=("asr", "std"),
                  seeds=("seed", "nunique")).reset_index())
    order = defense_order(table.defense.unique())
    table = table.assign(_d=table.defense.map(order.index)).sort_values(["_d", *setting, axis]).drop(columns="_d")
    table["failed"] = table.asr >= SUCCESS_ASR
    values = sorted(table[axis].unique())
    head = ["defense", *setting, *[f"{axis} {_value(v)}" for v in values]]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    trs = []
    for (d, *key), g in table.groupby(["defense", *setting], dropna=False, sort=False):
        by = g.set_index(axis)
        cells, tds = [], []
        for v in values:
            if v not in by.index:
                cells.append("–")
                tds.append("<td class='na'>–</td>")
                continue
            x = by.loc[v]
            n = int(x.seeds)  # (a mean over seeds alone hid a seed past the line: 13.0 of 9.9 and 16.2)
            cells.append(f"{_pm(x.acc, x.acc_std, n)} / {_pm(x.asr, x.asr_std, n)}" + (" ✗" if x.failed else ""))
            tds.append(f"<td{' class=fail' if x.failed else ''} title='{n} seed(s)'>{_pm_html(x.acc, x.acc_std, n)} / "
                       f"<span class=asr>{_pm_html(x.asr, x.asr_std, n)}</span></td>")
        names = [defense_label(d), *(_value(k) for k in key)]
        lines.append("| " + " | ".join(map(str, names)) + " | " + " | ".join(cells) + " |")
        trs.append("<tr>" + "".join(f"<th class=l>{_esc(n)}</th>" for n in names) + "".join(tds) + "</tr>")
    notes = "; ".join(s.why for s in sel.settings.values() if s.why)
    caption = (f"Final ACC / ASR (%) against {axis} per {' · '.join(setting)}, mean ± std over seeds; "
               f"✗: ASR ≥ {SUCCESS_ASR:g}%." + (f" {notes}." if notes else ""))
    slug = _slug(axis)
    csv, md = out / f"vs_{slug}.csv", out / f"vs_{slug}.md"
    _to_csv(table, csv, 3)
    md.write_text(caption + "\n\n" + "\n".join(lines) + "\n")
    html = ("<div class=scroll><table><thead><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head)
            + "</tr></thead><tbody>" + "".join(trs) + "</tbody></table></div>")
    fig, axes = plt.subplots(len(order), 2, figsize=(9.5, 3.2 * len(order)), sharex=True, squeeze=False)
    for (ax_acc, ax_asr), d in zip(axes, order):
        for key, line in table[table.defense == d].groupby(setting, dropna=False, sort=False):
            label = " · ".join(str(_value(v)) for v in (key if isinstance(key, tuple) else (key,)))
            for ax, metric in ((ax_acc, "acc"), (ax_asr, "asr")):
                ax.errorbar(line[axis], line[metric], yerr=line[f"{metric}_std"].fillna(0.0), marker="o",
                            capsize=2, label=label)
        ax_asr.axhline(SUCCESS_ASR, color="0.3", linestyle=":", linewidth=1)
        ax_asr.set_ylim(-2, 102)
        for ax, metric in ((ax_acc, "ACC"), (ax_asr, "ASR")):
            ax.set_title(f"{defense_label(d)}: final {metric}", fontsize=9)
            ax.set_ylabel(f"{metric} (%)")
            ax.grid(alpha=0.3)
            _log_axis(ax, values)
        ax_asr.legend(fontsize=7, loc="upper right")
    for ax in axes[-1]:
        ax.set_xlabel(axis)
    fig.suptitle(textwrap.fill(caption + " Bars: ±1 std over seeds; dotted: ASR 15%.", 130), fontsize=8)
    path = _finish(fig, out / f"fig_vs_{slug}_by_setting.{fmt}")
    return Section(f"Against {axis}", f"vs-{slug}", caption, html, [csv, md], table, path)


def _figure_curves_part(part: pd.DataFrame, keys: list[str], out: Path, fmt: str, suffix: str,
                        note: str) -> list[Path]:
    """:func:`figure_curves` for ``part``, the rows of one field-axis value combination."""
    paths = []
    curves = part[part.stage.isin(["curve1", "curve2"]) & (part.defense == "tsc")]
    for key, d in curves.groupby(keys):
        best = d.sort_values(["e_tsc", "t"]).drop_duplicates("trial_id")
        e_max = best.e_tsc.max()
        trial = best[best.e_tsc == e_max]
        trial_id = trial.trial_id.iloc[len(trial) // 2]
        rows = d[d.trial_id == trial_id]
        t_chosen = float(rows.t.iloc[0])
        mcr = part[(part.defense == "mcr") & (part.stage == "curve") & (part.method == rows.method.iloc[0])]
        for col, val in zip(keys, key):
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
        fig.suptitle("ACC/ASR along the curves: " + ", ".join(f"{c} {v}" for c, v in zip(keys, key))
                     + (f"; {note}" if note else ""), fontsize=9)
        paths.append(_finish(fig, out / f"fig3_{_slug(*key)}{suffix}.{fmt}"))
    return paths


def figure_curves(df: pd.DataFrame, out: Path, fmt: str) -> list[Path]:
    """Figure 3 style: ACC/ASR along the curves of the TSC trial with most rounds, per setting (and method
    where the curves have several), one figure per field-axis value combination (see :func:`axis_parts`; its
    file name and title name the values) beside the MCR curve of the same setting, method and values."""
    paths = []
    df = df.assign(method=df["method"].fillna("supervised") if "method" in df else "supervised")
    keys = SETTING + ["seed"]
    if df.loc[df.stage.isin(["curve1", "curve2"]) & (df.defense == "tsc"), "method"].nunique() > 1:
        keys = SETTING + ["method", "seed"]
    for part, suffix, note in axis_parts(df):
        paths += _figure_curves_part(part, keys, out, fmt, suffix, note)
    return paths


# ----------------------------------------------------------------------------------------------- helpers


def defense_order(names: Iterable[str]) -> list[str]:
    """Table 1's column order: the paper's defenses in its order, then unknown ones alphabetically."""
    names = {str(n) for n in names}
    return [d for d in PAPER_ORDER if d in names] + sorted(names - set(PAPER_ORDER))


def defense_label(name: str) -> str:
    return LABELS.get(name, name)


def is_failed(asr: float) -> bool:
    """The paper's rule: a defense whose final ASR is 15% or more failed (NaN: unknown, not failed)."""
    return bool(pd.notna(asr) and asr >= SUCCESS_ASR)


def _attack_rank(a: object) -> tuple[int, str]:
    a = str(a)
    return (ATTACK_ORDER.index(a), a) if a in ATTACK_ORDER else (len(ATTACK_ORDER), a)


def _method_rank(m: object) -> tuple[int, str]:
    return (m != "supervised", str(m))


def field_axes(df: pd.DataFrame) -> list[str]:
    """The sweep's field-axis columns (dotted spec paths such as ``defense.clean_ratio``) that hold values."""
    return [c for c in df.columns if "." in c and df[c].notna().any()]


def _final(df: pd.DataFrame) -> pd.DataFrame:
    """The ``final`` rows (each trial's output model), with a ``method`` (supervised when unrecorded).

    A trial a field axis does not apply to (the undefended model on a ``defense.clean_ratio`` axis, MCR on
    ``defense.tsc.curve_epochs``) holds for every value of that axis in its setting: its row is repeated at
    each, so it sits beside the trials it is compared with."""
    d = df[df.stage == "final"].copy()
    d["_spread"] = [()] * len(d)  # the field axes a row was repeated along
    d["method"] = d["method"].fillna("supervised") if "method" in d else "supervised"
    if "seed" not in d:
        d["seed"] = 0
    keys = [k for k in (*SETTING, "method") if k in d]
    for a in field_axes(d):
        has = d[a].notna()
        if has.all():
            continue
        applies = _applies_to(d, a)
        spread = ~has & ~applies  # (a trial the axis changes, from a block without it: its own row)
        # its values: those set, and the spec's own (unset) where a trial the axis changes ran at it
        values = d.loc[has | applies, keys + [a]].drop_duplicates()
        copies = d[spread].drop(columns=[a]).merge(values, on=keys, how="left")
        copies["_spread"] = copies["_spread"].map(lambda done, a=a: (*done, a))
        d = pd.concat([d[~spread], copies], ignore_index=True)
    return d


def _unspread(rows: pd.DataFrame) -> pd.DataFrame:
    """``_final`` rows with each trial once, an axis it was repeated along unset again: what counts trials
    (seconds per trial, settings defended, NC's detections), where the repeats would count it at every value."""
    if "trial_id" not in rows or "_spread" not in rows:
        return rows
    u = rows.drop_duplicates("trial_id").copy()
    for i, spread in u["_spread"].items():
        for a in spread:
            u.at[i, a] = np.nan
    return u


def _keys(d: pd.DataFrame) -> list[str]:
    """Table 1's row key: dataset, arch, attack, poison rate (and method when the rows have several), then
    the sweep's field axes."""
    base = ["dataset", "method", *SETTING[1:]] if d["method"].nunique() > 1 else list(SETTING)
    return base + field_axes(d)


def _axis_rank(v: Any) -> tuple[int, float, str]:
    """Values in numeric order where they are numbers, then words, then unset (the spec's own value): a NaN
    key compared with nothing and left the order to the input's."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return (2, 0.0, "")
    try:
        return (0, float(v), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(v))


def _sort(g: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    order = g[keys].astype(object).apply(
        lambda r: tuple(_attack_rank(v) if k == "attack" else _method_rank(v) if k == "method" else
                        (-float(v) if pd.notna(v) else math.inf) if k == "poison_rate" else
                        _axis_rank(v) for k, v in r.items()), axis=1)  # (round 10 after round 9, not before 2)
    return g.assign(_o=order).sort_values("_o", kind="stable").drop(columns="_o").reset_index(drop=True)


def _rate(r: Any) -> str:
    try:
        return f"{100 * float(r):g}%"
    except (TypeError, ValueError):
        return str(r)


def _pm(mean: float, std: float, n: int, digits: int = 1) -> str:
    """``mean±std`` over seeds when there are several, else the mean; ``–`` when there is none."""
    if pd.isna(mean):
        return "–"
    return f"{mean:.{digits}f}±{std:.{digits}f}" if n > 1 and pd.notna(std) else f"{mean:.{digits}f}"


def _runs(lo: int, hi: int) -> str:
    return f"{lo} run" + ("" if hi == 1 else "s") if lo == hi else f"{lo}–{hi} runs"


def _t(t: float) -> str:
    return f"{t:g}"


def _esc(s: object) -> str:
    return html.escape(str(s))


def _display(g: pd.DataFrame, keys: list[str]) -> tuple[list[str], str]:
    """The key columns worth a column (those that vary; attack and poison rate always), and a note naming
    the constant ones ("dataset fashion-mnist-embedded, arch cnn")."""
    shown = [k for k in keys if k in ("attack", "poison_rate") or g[k].nunique(dropna=False) > 1]
    const = [f"{k} {_value(g[k].iloc[0]) if '.' in k else g[k].iloc[0]}" for k in keys if k not in shown and len(g)]
    return shown, ", ".join(const)


def _column_name(key: str) -> str:
    """A row key as a header names it: a field axis by its spec path, as the user wrote it
    (``defense.clean_ratio``), a result column in words."""
    return key if "." in key else key.replace("_", " ")


def _group_label(row: pd.Series, shown: list[str]) -> str:
    return " · ".join(_value(row[k]) if "." in k else str(row[k]) for k in shown if k != "poison_rate")


def _group_th(labels: list[str], i: int) -> str:
    """The row-header cell of row ``i``: spanning the following rows with the same label, or nothing when a
    cell above already spans it."""
    if i > 0 and labels[i] == labels[i - 1]:
        return ""
    span = 1
    while i + span < len(labels) and labels[i + span] == labels[i]:
        span += 1
    return f"<th class='l' rowspan='{span}'>{_esc(labels[i])}</th>"


def _pm_html(mean: float, std: float, n: int, digits: int = 1) -> str:
    """``mean±std`` with the ± part small (HTML)."""
    if pd.isna(mean):
        return "–"
    if n > 1 and pd.notna(std):
        return f"{mean:.{digits}f}<small>±{std:.{digits}f}</small>"
    return f"{mean:.{digits}f}"


# ------------------------------------------------------------------------------------- Table 1's setting


@dataclass(frozen=True)
class Setting:
    """The single (E_TSC, t) that Table 1 shows for TSC, and the t it shows for MCR, for one method."""

    method: str
    e_tsc: int | None
    t: float | None
    mcr_t: float | None
    why: str


def choose_setting(final: pd.DataFrame, method: str = "supervised",
                   tsc_setting: tuple[int, float] | None = None) -> Setting:
    """TSC at ``tsc_setting`` (default: the paper's, E_TSC 3, t 0.4 supervised; 2, 0.25 SimCLR) when the rows
    have it; otherwise at the t closest to the wanted t (ties: the larger t), with the largest E_TSC there
    that every setting has (the largest there when none is shared). MCR at TSC's t when it has it, else at
    its t closest to it."""
    want = tuple(tsc_setting) if tsc_setting is not None else PAPER_SETTING.get(method, DEFAULT_SETTING)
    origin = "the requested" if tsc_setting is not None else "the paper's"
    keys = [k for k in SETTING if k in final]
    rows = final[final.method == method] if "method" in final else final
    tsc = rows[rows.defense == "tsc"].dropna(subset=["e_tsc", "t"])
    e = t = None
    why = ""
    if not tsc.empty:
        pairs = {(int(a), float(b)) for a, b in zip(tsc.e_tsc, tsc.t)}
        if any(a == int(want[0]) and math.isclose(b, float(want[1]), abs_tol=1e-9) for a, b in pairs):
            e, t = int(want[0]), float(want[1])
            why = f"TSC at E_TSC {e}, t {_t(t)} ({origin} setting)"
        else:
            ts = sorted({b for _, b in pairs})
            t = min(ts, key=lambda x: (round(abs(x - float(want[1])), 9), -x))
            at = tsc[np.isclose(tsc.t.astype(float), t)]
            es = sorted(int(a) for a in at.e_tsc.unique())
            n = at.groupby(keys, dropna=False).ngroups
            shared = [a for a in es if at[at.e_tsc == a].groupby(keys, dropna=False).ngroups == n]
            e = max(shared) if shared else max(es)
            why = (f"TSC at E_TSC {e}, t {_t(t)}: {origin} E_TSC {want[0]}, t {_t(want[1])} is not in these rows, "
                   f"so the largest E_TSC at the t closest to {_t(want[1])}"
                   + (" that every setting has" if shared and e != max(es) else "")
                   + (" (not every setting has it)" if not shared else ""))
    mcr = rows[rows.defense == "mcr"].dropna(subset=["t"])
    mcr_t = None
    if not mcr.empty:
        aim = t if t is not None else float(want[1])
        mcr_t = min(sorted(float(x) for x in mcr.t.unique()), key=lambda x: (round(abs(x - aim), 9), -x))
        why = (why + "; " if why else "") + f"MCR at t {_t(mcr_t)}"
    return Setting(method, e, t, mcr_t, why)


def _select(final: pd.DataFrame, settings: dict[str, Setting]) -> pd.DataFrame:
    """The final rows Table 1 shows: TSC and MCR only at their chosen setting, every other defense whole."""
    keep = pd.Series(True, index=final.index)
    for m, s in settings.items():
        in_m = final.method == m
        tsc = in_m & (final.defense == "tsc")
        if s.t is None:
            keep &= ~tsc
        else:
            keep &= ~tsc | ((final.e_tsc == s.e_tsc) & np.isclose(final.t.astype(float).fillna(-1.0), s.t))
        mcr = in_m & (final.defense == "mcr")
        if s.mcr_t is None:
            keep &= ~mcr
        else:
            keep &= ~mcr | np.isclose(final.t.astype(float).fillna(-1.0), s.mcr_t)
    return final[keep]


@dataclass
class Selection:
    """The final rows Table 1 shows (TSC and MCR at their chosen setting) and their cells."""

    keys: list[str]
    settings: dict[str, Setting]
    rows: pd.DataFrame
    cells: pd.DataFrame


def select(df: pd.DataFrame, tsc_setting: tuple[int, float] | None = None) -> Selection | None:
    """Table 1's rows: every final row, TSC and MCR only at the setting :func:`choose_setting` picks per method."""
    final = _final(df)
    if final.empty:
        return None
    keys = _keys(final)
    settings = {m: choose_setting(final, m, tsc_setting) for m in sorted(final.method.unique(), key=_method_rank)}
    rows = _select(final, settings)
    return Selection(keys, settings, rows, _cells(rows, keys))


def _cells(rows: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Mean and std over seeds of final ACC/ASR per key × defense (a seed's rows averaged first)."""
    per_seed = (rows.groupby(keys + ["defense", "seed"], dropna=False)[["acc", "asr"]].mean().reset_index())
    g = (per_seed.groupby(keys + ["defense"], dropna=False)
         .agg(acc=("acc", "mean"), acc_std=("acc", "std"), asr=("asr", "mean"), asr_std=("asr", "std"),
              seeds=("seed", "nunique"))
         .reset_index())
    g["failed"] = (g.defense != "none") & (g.asr >= SUCCESS_ASR)
    return g


# ----------------------------------------------------------------------------------------------- Table 1


def _header_note(d: str, settings: dict[str, Setting]) -> str:
    """What setting a TSC / MCR column shows ("E 3, t 0.4"), for its header."""
    parts = []
    for s in settings.values():
        if d == "tsc" and s.t is not None:
            parts.append(f"E {s.e_tsc}, t {_t(s.t)}")
        elif d == "mcr" and s.mcr_t is not None:
            parts.append(f"t {_t(s.mcr_t)}")
    return " | ".join(dict.fromkeys(parts))


def table1(df: pd.DataFrame, out: Path, tsc_setting: tuple[int, float] | None = None) -> Section | None:
    """Table 1 in the paper's layout: rows dataset × arch × attack × poison rate, one column per defense (TSC
    and MCR at one configured setting, see :func:`choose_setting`), cells final ACC / ASR as mean ± std over
    seeds, ASR ≥ 15% marked failed, and an average row. Writes ``table1.md``, ``table1.csv`` (wide: per
    defense its ACC, ACC std, ASR, ASR std) and ``table1_long.csv`` (one row per setting × defense)."""
    sel = select(df, tsc_setting)
    if sel is None:
        return None
    keys, settings, g = sel.keys, sel.settings, sel.cells.copy()
    defenses = defense_order(g.defense.unique())
    settings_rows = _sort(g[keys].drop_duplicates(), keys)
    shown, const = _display(settings_rows, keys)

    # the numbers: long and wide CSV, and the average over settings per defense
    g["label"] = g.defense.map(defense_label)
    g = g.merge(settings_rows.reset_index().rename(columns={"index": "table_row"}), on=keys, how="left")
    g = g.sort_values(["table_row", "defense"], key=lambda s: s.map(defenses.index) if s.name == "defense" else s)
    long = out / "table1_long.csv"
    _to_csv(g.drop(columns="table_row"), long, 2)
    avg = (g.groupby("defense").agg(acc=("acc", "mean"), asr=("asr", "mean"), n=("asr", "count"),
                                    defended=("asr", lambda a: int((a < SUCCESS_ASR).sum())))
           .reindex(defenses))
    wide = settings_rows.copy()
    for d in defenses:
        c = g[g.defense == d].set_index("table_row")
        lab = defense_label(d)
        for col, name in (("acc", "ACC"), ("acc_std", "ACC std"), ("asr", "ASR"), ("asr_std", "ASR std")):
            wide[f"{lab} {name}"] = c[col].reindex(wide.index)
    avg_row = {k: "" for k in keys} | {"attack": "average"}
    for d in defenses:
        lab = defense_label(d)
        avg_row |= {f"{lab} ACC": avg.acc[d], f"{lab} ASR": avg.asr[d]}
    if len(settings_rows) > 1:
        wide = pd.concat([wide, pd.DataFrame([avg_row])], ignore_index=True)
    csv = out / "table1.csv"
    _to_csv(wide, csv, 2)

    seeds = sorted(int(s) for s in g.seeds.unique())
    seed_note = (f"mean ± std over {seeds[0]} seeds" if seeds == [seeds[0]] and seeds[0] > 1 else
                 "one seed" if seeds == [1] else f"mean ± std over seeds ({min(seeds)}–{max(seeds)} per cell)")
    whys = "; ".join(f"{m}: {s.why}" if len(settings) > 1 else s.why for m, s in settings.items() if s.why)
    caption = (f"Final ACC / ASR (%) after each defense, {seed_note}. "
               f"✗ (a red cell in index.html): ASR ≥ {SUCCESS_ASR:g}%, a failed defense (the paper's threshold; "
               f"No defense is the attack itself). {whys + '. ' if whys else ''}"
               f"{'Rows: ' + const + '. ' if const else ''}"
               + (f"Average: mean over the settings a defense has; ASR < {SUCCESS_ASR:g}%: how many it defended."
                  if len(settings_rows) > 1 else ""))

    # Markdown
    cell = {(r.table_row, r.defense): r for r in g.itertuples()}
    group_head = " · ".join(_column_name(k) for k in shown if k != "poison_rate")
    heads = [defense_label(d) + (f" ({_header_note(d, settings)})" if _header_note(d, settings) else "")
             for d in defenses]
    md_lines = [f"| {group_head} | poison rate | " + " | ".join(heads) + " |", "|---" * (2 + len(defenses)) + "|"]
    for i, row in settings_rows.iterrows():
        cells = []
        for d in defenses:
            r = cell.get((i, d))
            cells.append("–" if r is None else f"{_pm(r.acc, r.acc_std, r.seeds)} / {_pm(r.asr, r.asr_std, r.seeds)}"
                         + (" ✗" if r.failed else ""))
        md_lines.append(f"| {_group_label(row, shown)} | {_rate(row.poison_rate)} | " + " | ".join(cells) + " |")
    several = len(settings_rows) > 1
    md_lines.append("| **average** | | " + " | ".join(
        "–" if avg.n[d] == 0 else f"{avg.acc[d]:.1f} / {avg.asr[d]:.1f}" for d in defenses) + " |")
    md_lines.append(f"| ASR < {SUCCESS_ASR:g}% | | " + " | ".join(
        "–" if d == "none" else f"{avg.defended[d]}/{avg.n[d]}" for d in defenses) + " |")
    if not several:
        md_lines = md_lines[:-2]
    md = out / "table1.md"
    md.write_text(caption + "\n\n" + "\n".join(md_lines) + "\n")

    # HTML: two-line cells (ACC over ASR), the group label spanning its poison rates
    thead = (f"<tr><th class='l'>{_esc(group_head)}</th><th>poison<br>rate</th>" + "".join(
        f"<th>{_esc(defense_label(d))}" + (f"<br><small>{_esc(_header_note(d, settings))}</small>"
                                           if _header_note(d, settings) else "") + "</th>" for d in defenses)
        + "</tr>")
    body, labels = [], [_group_label(r, shown) for _, r in settings_rows.iterrows()]
    for i, row in settings_rows.iterrows():
        th = _group_th(labels, i)
        tr = f"<tr{' class=g' if th and i else ''}>{th}<th>{_esc(_rate(row.poison_rate))}</th>"
        for d in defenses:
            r = cell.get((i, d))
            if r is None:
                tr += "<td class='na'>–</td>"
                continue
            tip = f"{defense_label(d)}: ACC {r.acc:.2f}, ASR {r.asr:.2f}, {r.seeds} seed(s)"
            tr += (f"<td{' class=fail' if r.failed else ''} title='{_esc(tip)}'>"
                   f"{_pm_html(r.acc, r.acc_std, r.seeds)}<br>"
                   f"<span class=asr>{_pm_html(r.asr, r.asr_std, r.seeds)}</span></td>")
        body.append(tr + "</tr>")
    foot = ("<tr class=avg><th class='l' colspan=2>average</th>" + "".join(
        "<td>–</td>" if avg.n[d] == 0 else f"<td>{avg.acc[d]:.1f}<br><span class=asr>{avg.asr[d]:.1f}</span></td>"
        for d in defenses) + "</tr>"
        + f"<tr class=avg><th class='l' colspan=2>ASR &lt; {SUCCESS_ASR:g}%</th>" + "".join(
        "<td>–</td>" if d == "none" else f"<td>{avg.defended[d]}/{avg.n[d]}</td>" for d in defenses) + "</tr>")
    table = (f"<div class=scroll><table class=t1><thead>{thead}</thead><tbody>{''.join(body)}</tbody>"
             + (f"<tfoot>{foot}</tfoot>" if several else "") + "</table></div>")
    legend = (f"<p class=legend>Each cell: ACC (top) / <span class=asr>ASR</span> (bottom), %. "
              f"<span class='sw fail'></span> ASR ≥ {SUCCESS_ASR:g}%: failed defense. "
              f"<span class='sw'></span> ASR &lt; {SUCCESS_ASR:g}%: successful. – : not run.</p>")
    return Section("Table 1", "table1", caption, legend + table, [csv, md, long], g.drop(columns="table_row"))


# ----------------------------------------------------------------------------------- cost, NC detection


def _secs(mean: float, std: float, n: int) -> str:
    if pd.isna(mean):
        return "–"
    digits = 0 if mean >= 100 else 1
    return _pm(mean, std, n, digits)


def defense_cost(df: pd.DataFrame, out: Path, tsc_setting: tuple[int, float] | None = None) -> Section | None:
    """Each defense's mean ``defense_seconds`` over its final rows (TSC and MCR at Table 1's setting) beside
    its ACC/ASR averaged over Table 1's settings; one row per value of the sweep's field axes (a clean set of
    2,500 images costs ten times one of 200: pooled, the mean and std described neither)."""
    if "defense_seconds" not in df or df.defense_seconds.isna().all():
        return None
    sel_ = select(df, tsc_setting)
    if sel_ is None:
        return None
    sel = _unspread(sel_.rows[sel_.rows.defense != "none"])
    cells = _cells(sel, sel_.keys)
    axes = [a for a in field_axes(sel) if a in cells]
    shown_setting = {d: _header_note(d, sel_.settings) for d in ("tsc", "mcr")}
    keys = ["defense", *axes]

    def groups(f: pd.DataFrame) -> dict[tuple[str, ...], pd.DataFrame]:
        """``f`` per defense and axis values, keyed as the tables show the values (NaN: "–", which matches)."""
        return {tuple(_value(v) for v in (k if isinstance(k, tuple) else (k,))): g
                for k, g in f.groupby(keys, dropna=False, sort=False)}

    sel_groups, cell_groups = groups(sel), groups(cells)
    rank = {d: i for i, d in enumerate(defense_order(sel.defense.unique()))}
    out_rows = []
    for key in sorted(sel_groups, key=lambda k: (rank[k[0]], tuple(_axis_rank(v) for v in k[1:]))):
        s, d = sel_groups[key], key[0]
        c = cell_groups.get(key, cells.iloc[:0])
        secs = s.defense_seconds.dropna()
        out_rows.append({"defense": d, "label": defense_label(d), "setting": shown_setting.get(d, ""),
                         **{a: s[a].iloc[0] for a in axes},
                         "acc": c.acc.mean(), "asr": c.asr.mean(), "defended": int((c.asr < SUCCESS_ASR).sum()),
                         "settings": len(c), "seconds": secs.mean(), "seconds_std": secs.std(),
                         "trials": len(secs)})
    t = pd.DataFrame(out_rows)
    if t.empty or t.seconds.isna().all():
        return None
    csv = out / "defense_cost.csv"
    _to_csv(t, csv, 2)
    caption = ("Each defense's cost: seconds its steps took per trial (defense_seconds of its final rows, a step "
               "shared between trials counted whole in each; mean ± std over trials), beside its final ACC / ASR "
               "(%) averaged over Table 1's settings and how many of them it defended"
               + (f"; one row per {', '.join(axes)} (–: as in the spec, or an axis the defense does not take)."
                  if axes else "."))
    head = ["defense", *axes, "ACC", "ASR", f"ASR < {SUCCESS_ASR:g}%", "seconds", "trials"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    trs = []
    for r in t.to_dict("records"):
        name = r["label"] + (f" ({r['setting']})" if r["setting"] else "")
        vals = [*(_value(r[a]) for a in axes), f"{r['acc']:.1f}", f"{r['asr']:.1f}",
                f"{r['defended']}/{r['settings']}", _secs(r["seconds"], r["seconds_std"], r["trials"]),
                str(r["trials"])]
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
        trs.append(f"<tr><th class='l'>{_esc(name)}</th>" + "".join(f"<td>{_esc(v)}</td>" for v in vals) + "</tr>")
    md = out / "defense_cost.md"
    md.write_text(caption + "\n\n" + "\n".join(lines) + "\n")
    table = ("<table><thead><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head) + "</tr></thead><tbody>"
             + "".join(trs) + "</tbody></table>")
    return Section("Defense cost", "cost", caption, table, [csv, md], t)


def nc_detection(df: pd.DataFrame, out: Path) -> Section | None:
    """NC's detection per setting: the anomaly index (mean ± std over seeds) and the classes it flagged per
    seed, when the rows carry ``nc_flagged`` / ``nc_anomaly_index``."""
    cols = [c for c in ("nc_flagged", "nc_anomaly_index") if c in df]
    if not cols:
        return None
    final = _final(df)
    nc = _unspread(final[final.defense == "nc"])
    if nc.empty or nc[cols].isna().all().all():
        return None
    keys = [k for k in _keys(final) if "." not in k or nc[k].notna().any()]  # not the axes NC does not take
    out_rows = []
    for key, g in nc.groupby(keys, dropna=False):
        g = g.sort_values("seed")
        idx = g.nc_anomaly_index.astype(float) if "nc_anomaly_index" in g else pd.Series(dtype=float)
        flags = (g.nc_flagged if "nc_flagged" in g else pd.Series([None] * len(g), index=g.index))
        per_seed = [f"s{s}: " + ("?" if pd.isna(f) else (str(f).replace(",", " ") or "none"))
                    for s, f in zip(g.seed, flags)]
        out_rows.append({**dict(zip(keys, key)), "anomaly_index": idx.mean(), "anomaly_index_std": idx.std(),
                         "seeds": len(g), "flagged_any": int(sum(bool(isinstance(f, str) and f) for f in flags)),
                         "flagged": "; ".join(per_seed)})
    t = _sort(pd.DataFrame(out_rows), keys)
    csv = out / "nc_detection.csv"
    _to_csv(t, csv, 2)
    shown, const = _display(t, keys)
    caption = ("Neural Cleanse's detection: anomaly index of the smallest reversed-trigger norm (mean ± std over "
               "seeds; flagged when above the threshold, 2 by default) and the classes it flagged per seed "
               "(none: NC returned the model unchanged)." + (f" Rows: {const}." if const else ""))
    head = [" · ".join(_column_name(k) for k in shown if k != "poison_rate"), "poison rate", "anomaly index",
            "seeds flagging", "flagged classes per seed"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    trs = []
    labels = [_group_label(r, shown) for _, r in t.iterrows()]
    for i, r in t.iterrows():
        vals = [labels[i], _rate(r.poison_rate), _pm(r.anomaly_index, r.anomaly_index_std, r.seeds, 2),
                f"{r.flagged_any}/{r.seeds}", r.flagged]
        lines.append("| " + " | ".join(vals) + " |")
        th = _group_th(labels, i)
        trs.append(f"<tr{' class=g' if th and i else ''}>{th}<th>{_esc(vals[1])}</th>"
                   + "".join(f"<td>{_esc(v)}</td>" for v in vals[2:4]) + f"<td class='l'>{_esc(vals[4])}</td></tr>")
    md = out / "nc_detection.md"
    md.write_text(caption + "\n\n" + "\n".join(lines) + "\n")
    table = ("<div class=scroll><table><thead><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head)
             + "</tr></thead><tbody>" + "".join(trs) + "</tbody></table></div>")
    return Section("NC detection", "nc", caption, table, [csv, md], t)


# --------------------------------------------------------------------------------------------- TSC grid


def grid_means(df: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per method, TSC's final ACC, ASR (mean over settings and seeds) and run count as E_TSC × t frames."""
    final = _final(df)
    tsc = final[final.defense == "tsc"].dropna(subset=["e_tsc", "t"]).copy()
    tsc["e_tsc"] = tsc.e_tsc.astype(int)
    tsc["t"] = tsc.t.astype(float).round(6)
    out = {}
    axes = field_axes(tsc)
    for m in sorted(tsc.method.unique(), key=_method_rank):
        at = tsc[tsc.method == m]
        parts = (sorted(at.groupby(axes, dropna=False), key=lambda kv: [_axis_rank(v) for v in kv[0]])
                 if axes else [((), at)])
        for values, part in parts:
            label = " · ".join([str(m), *(f"{a} {_value(v)}" for a, v in zip(axes, values))])
            g = part.groupby(["e_tsc", "t"])
            out[label] = {"acc": g.acc.mean().unstack("t"), "asr": g.asr.mean().unstack("t"),
                          "n": g.size().unstack("t"), "method": str(m)}
    return out


def figure_grid(grids: dict[str, dict[str, Any]], path: Path,
                chosen: dict[str, Setting] | None = None) -> Path:
    """Two grey heatmaps per method, final ACC and ASR over E_TSC × t, values written in; cells with ASR
    < 15% (a successful defense) outlined, Table 1's setting marked with a dot."""
    n_t = max(g["acc"].shape[1] for g in grids.values())
    n_e = max(g["acc"].shape[0] for g in grids.values())
    w = max(3.0, 0.5 * n_t + 1.4)
    fig, axes = plt.subplots(len(grids), 2, figsize=(2 * w, len(grids) * (0.42 * n_e + 1.3) + 0.3),
                             squeeze=False)
    cmap = matplotlib.colormaps["Greys"].with_extremes(bad="white")
    for row, (m, g) in zip(axes, grids.items()):
        acc, asr, runs = g["acc"], g["asr"], g["n"].to_numpy(dtype=float)
        ragged = np.nanmin(runs) != np.nanmax(runs)
        ok = asr.to_numpy() < SUCCESS_ASR
        for ax, metric, data in zip(row, ("ACC", "ASR"), (acc, asr)):
            vals = data.to_numpy(dtype=float)
            lo, hi = (0.0, 100.0) if metric == "ASR" else (np.nanmin(vals) - 1, np.nanmax(vals) + 0.5)
            im = ax.imshow(np.ma.masked_invalid(vals), cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
            for i in range(vals.shape[0]):
                for j in range(vals.shape[1]):
                    v = vals[i, j]
                    if np.isnan(v):
                        ax.text(j, i, "–", ha="center", va="center", fontsize=8, color="0.5")
                        continue
                    dark = (v - lo) / (hi - lo) > 0.55
                    ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8,
                            color="white" if dark else "black", fontweight="bold" if ok[i, j] else "normal")
                    if ragged:
                        ax.text(j, i + 0.32, f"n={int(runs[i, j])}", ha="center", va="center", fontsize=6,
                                color="white" if dark else "0.3")
                    if ok[i, j]:
                        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#1f5fbf",
                                               linewidth=2.4, zorder=3))
            s = (chosen or {}).get(g["method"])
            if s is not None and s.t is not None and s.e_tsc in data.index:
                cols = [k for k, c in enumerate(data.columns) if math.isclose(c, s.t, abs_tol=1e-6)]
                if cols:
                    ax.plot(cols[0] + 0.36, list(data.index).index(s.e_tsc) - 0.3, marker="o", markersize=4,
                            color="#d0302a", zorder=4)
            ax.set_xticks(range(vals.shape[1]), [_t(c) for c in data.columns])
            ax.set_yticks(range(vals.shape[0]), [str(e) for e in data.index])
            ax.set_xlabel("curve index t")
            ax.set_ylabel("E_TSC")
            # (a label carrying field-axis values is long: wrapped to its panel, it never runs into the next)
            title = f"{m}: final {metric} (%)" if len(grids) > 1 else f"final {metric} (%)"
            ax.set_title(textwrap.fill(title, max(20, int(w * 9))), fontsize=10)
            ax.tick_params(length=0)
            fig.colorbar(im, ax=ax, fraction=0.035, pad=0.02)
    lo = int(min(g["n"].min().min() for g in grids.values()))
    hi = int(max(g["n"].max().max() for g in grids.values()))
    text = (f"TSC's (E_TSC, t) grid: mean over settings and seeds ({_runs(lo, hi)} per cell); "
            f"blue outline: ASR < {SUCCESS_ASR:g}% (success); red dot: Table 1's setting")
    fig.suptitle(textwrap.fill(text, int(2 * w * 11)), fontsize=9)
    return _finish(fig, path)


def tsc_grid(df: pd.DataFrame, out: Path, fmt: str, tsc_setting: tuple[int, float] | None = None) -> Section | None:
    """TSC's (E_TSC, t) grid: ``tsc_grid.md`` / ``.csv`` (rows E_TSC, columns t, per method) and the heatmaps."""
    grids = grid_means(df)
    if not grids:
        return None
    sel = select(df, tsc_setting)
    chosen = sel.settings if sel else {}
    csv_rows, md_parts, html_parts = [], [], []
    for m, g in grids.items():
        ts = list(g["acc"].columns)
        for e in g["acc"].index:
            for metric in ("acc", "asr", "n"):
                csv_rows.append({"method": m, "e_tsc": e, "metric": metric.upper() if metric != "n" else "runs",
                                 **{f"t={_t(t)}": g[metric].loc[e, t] for t in ts}})
        s = chosen.get(g["method"])
        head = ["E_TSC \\ t", *[_t(t) for t in ts]]
        lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        trs = []
        for e in g["acc"].index:
            cells, tds = [], []
            for t in ts:
                a, r = g["acc"].loc[e, t], g["asr"].loc[e, t]
                if pd.isna(a):
                    cells.append("–")
                    tds.append("<td class='na'>–</td>")
                    continue
                mark = s is not None and s.e_tsc == e and s.t is not None and math.isclose(s.t, t, abs_tol=1e-6)
                txt = f"{a:.1f} / {r:.1f}" + (" ✗" if is_failed(r) else "")
                cells.append(f"**{txt}**" if mark else txt)
                cls = " ".join(c for c in ("fail" if is_failed(r) else "", "chosen" if mark else "") if c)
                tip = f"E_TSC {e}, t {_t(t)}: ACC {a:.2f}, ASR {r:.2f} over {int(g['n'].loc[e, t])} runs"
                tds.append(f"<td{f' class={chr(39)}{cls}{chr(39)}' if cls else ''} title='{_esc(tip)}'>{a:.1f}<br>"
                           f"<span class=asr>{r:.1f}</span></td>")
            lines.append(f"| {e} | " + " | ".join(cells) + " |")
            trs.append(f"<tr><th>{e}</th>{''.join(tds)}</tr>")
        n = g["n"].stack()
        title = (f"{m}: " if len(grids) > 1 else "") + f"{_runs(int(n.min()), int(n.max()))} per cell"
        md_parts.append(f"**{title}**\n\n" + "\n".join(lines))
        html_parts.append(f"<h3>{_esc(title)}</h3><div class=scroll><table class=grid><thead><tr>"
                          + "".join(f"<th>{_esc(h)}</th>" for h in head) + "</tr></thead><tbody>" + "".join(trs)
                          + "</tbody></table></div>")
    caption = (f"TSC's final ACC / ASR (%) over its (E_TSC, t) grid: rows E_TSC, columns t, each cell the mean "
               f"over the settings (attacks, poison rates) and seeds that ran it. ✗ (a red cell in index.html): "
               f"ASR ≥ {SUCCESS_ASR:g}%. "
               f"Bold (outlined in index.html): the setting Table 1 shows.")
    csv = out / "tsc_grid.csv"
    _to_csv(pd.DataFrame(csv_rows), csv, 2)
    md = out / "tsc_grid.md"
    md.write_text(caption + "\n\n" + "\n\n".join(md_parts) + "\n")
    fig = figure_grid(grids, out / f"tsc_grid.{fmt}", chosen)
    legend = ("<p class=legend>Each cell: ACC (top) / <span class=asr>ASR</span> (bottom). "
              f"<span class='sw fail'></span> ASR ≥ {SUCCESS_ASR:g}%: failed. "
              "<span class='sw chosen'></span> the setting Table 1 shows.</p>")
    return Section("TSC grid", "grid", caption, legend + "".join(html_parts), [csv, md], pd.DataFrame(csv_rows), fig)


ROUND_STAGES = ("stage1", "stage2", "finetune")


def _value(v: Any) -> str:
    """A setting's value as a table shows it: a whole number without ``.0``; unset (the spec's value) as –."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float) and v.is_integer() and abs(v) >= 1:
        return str(int(v))
    return str(v)


def stage_means(df: pd.DataFrame) -> pd.DataFrame:
    """Each TSC round's stage-1 point, stage-2 point and output (the fine-tuned model, else the stage-2
    point): ACC and ASR per setting, t and round, the mean over seeds. Trials with E_TSC 1..5 share their
    rounds, so each round counts once; a round computed twice with different results (its chain recomputed on
    another machine) counts each result once, whatever order the files are read in."""
    if "round" not in df:
        return pd.DataFrame()
    d = df[(df.defense == "tsc") & df.stage.isin(ROUND_STAGES) & (df["round"] >= 1)].copy()
    if d.empty:
        return pd.DataFrame()
    d["method"] = d["method"].fillna("supervised") if "method" in d else "supervised"
    if "seed" not in d:
        d["seed"] = 0
    keys = [k for k in (*SETTING, "method") if k in d] + field_axes(d) + ["t"]
    d = d.drop_duplicates(subset=keys + ["seed", "round", "stage", "acc", "asr"])
    wide = d.pivot_table(index=keys + ["seed", "round"], columns="stage", values=["acc", "asr"], dropna=False,
                         aggfunc="mean")
    out = pd.DataFrame(index=wide.index)
    for metric in ("acc", "asr"):
        for st in ("stage1", "stage2"):
            out[f"{st}_{metric}"] = wide[(metric, st)] if (metric, st) in wide else float("nan")
        tuned = wide[(metric, "finetune")] if (metric, "finetune") in wide else out[f"stage2_{metric}"]
        out[f"output_{metric}"] = tuned.fillna(out[f"stage2_{metric}"])
    out = out.dropna(subset=["stage1_asr", "stage2_asr"], how="all").reset_index()
    g = out.groupby(keys + ["round"], dropna=False)
    means = g[[c for c in out.columns if c.endswith(("_acc", "_asr"))]].mean()
    means["seeds"] = g["seed"].nunique()
    return _sort(means.reset_index(), keys + ["round"])


def tsc_stages(df: pd.DataFrame, out: Path, fmt: str) -> Section | None:
    """Where the backdoor goes inside each TSC round: ``tsc_stages.md`` / ``.csv`` (ASR of the stage-1 point,
    the stage-2 point and the round's output, per setting and round) and a figure of the same."""
    m = stage_means(df)
    if m.empty:
        return None
    keys = [k for k in m.columns if k not in ("round", "seeds") and not k.endswith(("_acc", "_asr"))]
    shown = [k for k in keys if m[k].nunique(dropna=False) > 1] or ["t"]
    rounds = sorted(int(r) for r in m["round"].unique())
    head = [*shown, *[f"E{r}" for r in rounds]]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    trs, csv_rows = [], []
    for label, g in m.groupby(keys, dropna=False, sort=False):
        row = dict(zip(keys, label if isinstance(label, tuple) else (label,)))
        cells, tds = [], []
        for r in rounds:
            x = g[g["round"] == r]
            if x.empty:
                cells.append("–")
                tds.append("<td class='na'>–</td>")
                continue
            x = x.iloc[0]
            csv_rows.append({**row, "round": r, **{c: x[c] for c in g.columns if c.endswith(("_acc", "_asr"))},
                             "seeds": int(x["seeds"])})
            txt = f"{x.stage1_asr:.1f} → {x.stage2_asr:.1f} → {x.output_asr:.1f} ({x.output_acc:.1f})"
            cells.append(txt + (" ✗" if is_failed(x.output_asr) else ""))
            tip = (f"round {r}: stage-1 point ACC {x.stage1_acc:.2f} / ASR {x.stage1_asr:.2f}; stage-2 point "
                   f"{x.stage2_acc:.2f} / {x.stage2_asr:.2f}; output {x.output_acc:.2f} / {x.output_asr:.2f}; "
                   f"{int(x['seeds'])} seed(s)")
            tds.append(f"<td{' class=fail' if is_failed(x.output_asr) else ''} title='{_esc(tip)}'>"
                       f"{x.stage1_asr:.1f} → {x.stage2_asr:.1f} → <span class=asr>{x.output_asr:.1f}</span>"
                       f"<br><small>ACC {x.output_acc:.1f}</small></td>")
        vals = [_esc(_value(row[k])) for k in shown]
        lines.append("| " + " | ".join(map(str, vals)) + " | " + " | ".join(cells) + " |")
        trs.append("<tr>" + "".join(f"<th class=l>{v}</th>" for v in vals) + "".join(tds) + "</tr>")
    caption = ("Inside each TSC round: ASR (%) of the stage-1 point (θp mixed with its un-aligned copy) → the "
               "stage-2 point (on the curve fitted back to θp) → the round's output (fine-tuned), and the "
               f"output's ACC; mean over seeds; each round counted once. ✗: output ASR ≥ {SUCCESS_ASR:g}%.")
    csv = out / "tsc_stages.csv"
    _to_csv(pd.DataFrame(csv_rows), csv, 2)
    md = out / "tsc_stages.md"
    md.write_text(caption + "\n\n" + "\n".join(lines) + "\n")
    html = ("<div class=scroll><table><thead><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head)
            + "</tr></thead><tbody>" + "".join(trs) + "</tbody></table></div>")
    fig = figure_stages(m, keys, shown, out / f"tsc_stages.{fmt}")
    return Section("TSC stages by round", "stages", caption, html, [csv, md], pd.DataFrame(csv_rows), fig)


def figure_stages(m: pd.DataFrame, keys: list[str], shown: list[str], path: Path) -> Path:
    """ASR of the stage-2 point (solid) and the stage-1 point (dotted) by round: a panel per attack, a colour
    per other setting (the same in every panel)."""
    attacks = list(dict.fromkeys(m["attack"])) if "attack" in m else [None]
    others = [k for k in keys if k != "attack"]
    named = [k for k in shown if k != "attack"]
    combos = list(dict.fromkeys(tuple(_value(v) for v in r) for r in m[others].itertuples(index=False)))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {c: palette[i % len(palette)] for i, c in enumerate(combos)}
    fig, axes = plt.subplots(1, len(attacks), figsize=(4.2 * len(attacks), 3.4), sharey=True, squeeze=False)
    handles: dict[str, Any] = {}
    for ax, a in zip(axes[0], attacks):
        part = m if a is None else m[m["attack"] == a]
        for label, g in part.groupby(others, dropna=False, sort=False):
            combo = tuple(_value(v) for v in (label if isinstance(label, tuple) else (label,)))
            row = dict(zip(others, combo))
            name = ", ".join(f"{k.split('.')[-1]} {row[k]}" for k in named) or "TSC"
            (line,) = ax.plot(g["round"], g["stage2_asr"], marker="o", color=color[combo], label=name)
            ax.plot(g["round"], g["stage1_asr"], marker=".", linestyle=":", color=color[combo])
            handles.setdefault(name, line)
        ax.axhline(SUCCESS_ASR, color="0.3", linestyle=":", linewidth=1)
        ax.set_title(str(a) if a is not None else "TSC")
        ax.set_xlabel("round (E_TSC)")
        ax.set_xticks(sorted(int(r) for r in part["round"].unique()))
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("ASR (%)")
    fig.suptitle("ASR of each round's stage-2 point (solid) and stage-1 point (dotted); mean over seeds", fontsize=9)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(4, len(handles)), fontsize=7,
               frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * ((len(handles) - 1) // 4), 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------- index.html

CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1320px;margin:1em auto;padding:0 1em;
color:#222}
h1{font-size:1.5em;margin:.3em 0}
h2{font-size:1.2em;border-bottom:1px solid #ccc;margin:1.8em 0 .4em;padding-bottom:.15em}
h3{font-size:1em;margin:1em 0 .3em}
nav{position:sticky;top:0;background:#fff;padding:.3em 0;border-bottom:1px solid #eee;z-index:3;font-size:13px}
nav a{margin-right:1.1em;text-decoration:none}
p.cap,p.legend{font-size:13px;color:#444;margin:.3em 0 .5em;max-width:75em}
.scroll{overflow:auto;max-height:85vh;max-width:100%;width:fit-content;border:1px solid #ddd}
table{border-collapse:separate;border-spacing:0;font-size:12px;font-variant-numeric:tabular-nums}
th,td{border-right:1px solid #ddd;border-bottom:1px solid #ddd;padding:2px 5px;text-align:right;
white-space:nowrap;line-height:1.3}
thead th{position:sticky;top:0;background:#eef0f3;z-index:2;text-align:center;vertical-align:bottom;
white-space:normal;min-width:3em}
td small{font-size:85%;color:#555}
thead th small{font-weight:normal;color:#555}
tbody th{background:#fafafa;font-weight:normal}
th.l,td.l{text-align:left}
.asr{color:#333}
td.fail{background:#f9d5d2}
td.fail .asr,td.fail .asr small{color:#a11}
td.na{color:#aaa;text-align:center}
tr.g>th,tr.g>td{border-top:1px solid #999}
td.chosen{outline:2px solid #1f5fbf;outline-offset:-2px}
tfoot th,tfoot td{background:#f1f3f7;font-weight:600;border-top:2px solid #bbb}
.sw{display:inline-block;width:1.4em;height:.9em;vertical-align:-1px;border:1px solid #aaa;background:#fff}
.sw.fail{background:#f9d5d2}.sw.chosen{outline:2px solid #1f5fbf;outline-offset:-2px}
img{max-width:100%;border:1px solid #ddd;margin:.4em 0}
object{max-width:100%}
details summary{cursor:pointer;margin:.5em 0}
ul.files{font-size:13px;color:#444}
"""


def _figure_html(p: Path) -> str:
    if p.suffix == ".svg":
        return f"<object data='{_esc(p.name)}' type='image/svg+xml'></object>"
    if p.suffix == ".pdf":
        return f"<p><a href='{_esc(p.name)}'>{_esc(p.name)}</a></p>"
    return f"<img src='{_esc(p.name)}' alt='{_esc(p.stem)}'>"


GENERATOR = "<meta name=generator content=tscray>"  # what marks a folder as a report's (tscray report --out)


def is_report_folder(path: Path) -> bool:
    """Whether ``path`` holds a tscray report (its index.html is one): a report may replace its files."""
    index = path / "index.html"
    try:
        text = index.read_text(errors="replace")[:4000]
    except OSError:
        return False
    # (pages written before the generator tag: their title or heading names tscray, or the Figure 6 title
    # that a bug put there)
    return GENERATOR in text or "<title>tscray" in text or "(Figure 6 style)</title>" in text


def write_index(rep: Report, title: str) -> Path:
    """``index.html``: Table 1, defense cost, NC detection, TSC grid, the figures and what was not drawn."""
    parts = [f"<!doctype html><html lang=en><meta charset='utf-8'>"
             f"<meta name=viewport content='width=device-width,initial-scale=1'>{GENERATOR}",
             f"<title>{_esc(title)}</title>",
             f"<style>{CSS}</style>", f"<h1>{_esc(title)}</h1>"]
    parts += [f"<p class=cap><b>Note:</b> {_esc(n)}</p>" for n in rep.notes]
    nav = [(s.anchor, s.title) for s in rep.sections]
    others = [p for p in rep.figures if all(p != s.figure for s in rep.sections)]
    if others:
        nav.append(("figures", "Figures"))
    if rep.skipped:
        nav.append(("skipped", "Not drawn"))
    parts.append("<nav>" + "".join(f"<a href='#{a}'>{_esc(t)}</a>" for a, t in nav) + "</nav>")
    for s in rep.sections:
        files = ", ".join(f"<a href='{_esc(p.name)}'>{_esc(p.name)}</a>" for p in s.paths)
        parts.append(f"<h2 id='{s.anchor}'>{_esc(s.title)}</h2><p class=cap>{_esc(s.caption)} ({files})</p>")
        parts.append(s.html)
        if s.figure is not None:
            parts.append(_figure_html(s.figure))
    if others:
        parts.append("<h2 id='figures'>Figures</h2>")
        fig3 = [p for p in others if p.stem.startswith("fig3_")]
        for p in others:
            if p not in fig3:
                parts.append(f"<h3>{_esc(p.stem)}</h3>{_figure_html(p)}")
        if fig3:
            inner = "".join(f"<h3>{_esc(p.stem)}</h3>{_figure_html(p)}" for p in fig3)
            parts.append(f"<details{' open' if len(fig3) <= 4 else ''}><summary>Figure 3 style: ACC/ASR along the "
                         f"curves, {len(fig3)} figure(s), one per setting and seed</summary>{inner}</details>")
    if rep.skipped:
        parts.append("<h2 id='skipped'>Not drawn</h2><ul>" + "".join(f"<li>{_esc(s)}</li>" for s in rep.skipped)
                     + "</ul>")
    path = rep.out / "index.html"
    path.write_text("\n".join(parts) + "\n")
    return path


def recomputed_steps(df: pd.DataFrame) -> pd.DataFrame:
    """Steps whose evaluations differ between the trials that share them: one row per step (``step_key``,
    ``step_kind``, ``trials``, the largest ``acc_spread`` and ``asr_spread`` over its evaluations). A step
    computed once gives every trial the same rows; different rows mean it was computed or evaluated more than
    once (its storage lost and recomputed on another machine, NHWC on and off), and the copies are not bitwise
    equal: a trial's rounds may then come from another computation than a shorter trial's."""
    cols = ["step_key", "step_kind", "trials", "acc_spread", "asr_spread"]
    if not {"step_key", "stage", "acc", "asr", "trial_id"} <= set(df.columns):
        return pd.DataFrame(columns=cols)
    d = df[df.step_key.notna() & (df.stage != "final")]  # (a final row repeats one of its trial's own rows)
    keys = ["step_key", "stage"] + [c for c in ("round", "t_curve") if c in d]
    g = d.groupby(keys, dropna=False).agg(acc_hi=("acc", "max"), acc_lo=("acc", "min"), asr_hi=("asr", "max"),
                                           asr_lo=("asr", "min"), trials=("trial_id", "nunique"))
    g = g.assign(acc_spread=g.acc_hi - g.acc_lo, asr_spread=g.asr_hi - g.asr_lo)  # (vectorised: millions of rows)
    g = g[(g.acc_spread > 1e-9) | (g.asr_spread > 1e-9)].reset_index()
    if g.empty:
        return pd.DataFrame(columns=cols)
    kinds = d.drop_duplicates("step_key").set_index("step_key")["step_kind"] if "step_kind" in d else None
    out = g.groupby("step_key").agg(trials=("trials", "max"), acc_spread=("acc_spread", "max"),
                                    asr_spread=("asr_spread", "max")).reset_index()
    out["step_kind"] = out.step_key.map(kinds) if kinds is not None else None
    return out[cols].sort_values(["step_kind", "asr_spread"], ascending=[True, False]).reset_index(drop=True)


def _recomputed_note(r: pd.DataFrame) -> str | None:
    """The report's note on :func:`recomputed_steps`' rows ``r``, or None."""
    if r.empty:
        return None
    kinds = ", ".join(f"{k} {n}" for k, n in r.step_kind.fillna("?").value_counts().sort_index().items())
    return (f"{len(r)} step(s) have results that differ between the trials sharing them ({kinds}): each was "
            "computed or evaluated more than once (its storage lost and recomputed on another machine, or with "
            "NHWC on and off), and such copies are not bitwise equal. Their ASR differs by up to "
            f"{r.asr_spread.max():.1f} points (median {r.asr_spread.median():.1f}) and their ACC by up to "
            f"{r.acc_spread.max():.1f}. A trial's rounds may come from another computation than a shorter "
            "trial's; the stages table counts each copy once. recomputed_steps.csv lists them")


def make_report(df: pd.DataFrame, out: Path, fmt: str = "png", title: str = "tscray report",
                tsc_setting: tuple[int, float] | None = None, notes: Iterable[str] = ()) -> Report:
    """Write every figure and table the rows allow; record what was skipped and why. ``tsc_setting``: the
    (E_TSC, t) Table 1 shows for TSC (default: the paper's, see :func:`choose_setting`); ``notes``: what a
    reader must know first (an unfinished sweep), atop index.html."""
    if fmt not in ("png", "svg", "pdf"):
        raise ValueError(f"format must be png, svg or pdf, got {fmt!r}")
    if df.empty:
        raise ValueError("the sweep has no result rows yet: run `tscray sweep` first (or wait for trials to finish)")
    out.mkdir(parents=True, exist_ok=True)
    rep = Report(out, notes=list(notes))
    recomputed = recomputed_steps(df)
    if (note := _recomputed_note(recomputed)) is not None:
        rep.notes.append(note)
        _to_csv(recomputed, out / "recomputed_steps.csv", 2)
    if tsc_setting is not None:  # a setting the rows lack is replaced: say so where it is read first
        final = _final(df)
        want_e, want_t = int(tsc_setting[0]), float(tsc_setting[1])
        for m in sorted(final.method.unique(), key=_method_rank):
            chosen = choose_setting(final, m, tsc_setting)
            if chosen.t is not None and (chosen.e_tsc != want_e or not math.isclose(chosen.t, want_t, abs_tol=1e-9)):
                rep.notes.append(f"{m}: {chosen.why.split(';')[0]}")
    for build, skip in ((lambda: table1(df, out, tsc_setting), "Table 1: no final rows"),
                        (lambda: defense_cost(df, out, tsc_setting),
                         "Defense cost: no defense_seconds in these rows (written by an older tscray?)"),
                        (lambda: nc_detection(df, out), "NC detection: no NC rows with nc_flagged / nc_anomaly_index"),
                        (lambda: tsc_grid(df, out, fmt, tsc_setting), "TSC grid: no finished TSC trials"),
                        (lambda: tsc_stages(df, out, fmt), "TSC stages by round: no TSC round rows")):
        s = build()
        if s is None:
            rep.skipped.append(skip)
            continue
        rep.sections.append(s)
        rep.tables += s.paths
        if s.figure is not None:
            rep.figures.append(s.figure)
    for what, method, fig_title, name in (
            ("Figure 5: no finished TSC trials", None, "Final ACC/ASR of TSC versus t (Figure 5 style)",
             "fig5_tsc_vs_t"),
            ("Figure 6: no self-supervised (simclr) rows in this sweep", "simclr",
             "Self-supervised TSC versus t (Figure 6 style)", "fig6_ssl_vs_t")):
        drawn = [p for rows, suffix, note in axis_parts(df)  # one figure per field-axis value: never averaged over
                 if (p := figure_vs_t(rows, out, fmt, method, fig_title + (f" at {note}" if note else ""),
                                        name + suffix))]
        rep.figures += drawn
        if not drawn:
            rep.skipped.append(what)
    for axis in field_axes(df):
        p = figure_vs_axis(df, axis, out, fmt, tsc_setting)
        if p is not None:
            rep.figures.append(p)
        sec = vs_axis_by_setting(df, axis, out, fmt, tsc_setting)
        if sec is not None:
            rep.sections.append(sec)
            rep.tables += sec.paths
            rep.figures += [sec.figure] if sec.figure is not None else []
    curves = figure_curves(df, out, fmt)
    rep.figures += curves
    if not curves:
        rep.skipped.append("Figure 3: no curve evaluations (set eval.curve_ts in the spec)")
    rep.index = write_index(rep, title)
    return rep
