"""Figures against one field axis, and Figure 3, keep the other field axes' values (and methods) apart."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import tscray.report as report
from tscray.report import SPEC_VALUE, figure_curves, figure_vs_axis

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _parquets(name: str) -> pd.DataFrame:
    files = sorted((DOCS / "fidelity" / name / "results").glob("*.parquet"))
    if not files:
        pytest.skip(f"no {name} results")
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


@pytest.fixture
def drawn(monkeypatch):
    """Every figure the report finishes: its suptitle and its labelled lines ``(label, x, y)``, by file name."""
    seen: dict[str, dict] = {}
    finish = report._finish

    def spy(fig, path):
        lines = [(ln.get_label(), list(map(float, ln.get_xdata())), list(map(float, ln.get_ydata())))
                 for ax in fig.axes for ln in ax.get_lines() if not ln.get_label().startswith("_")]
        seen[Path(path).name] = {"title": fig._suptitle.get_text() if fig._suptitle else "", "lines": lines,
                                 "axes": fig.axes}
        return finish(fig, path)

    monkeypatch.setattr(report, "_finish", spy)
    return seen


def _asr_lines(fig: dict) -> dict[str, tuple[list[float], list[float]]]:
    """The ASR panel's lines (the second of the two panels) by label."""
    ax = fig["axes"][1]
    return {ln.get_label(): (list(map(float, ln.get_xdata())), list(map(float, ln.get_ydata())))
            for ln in ax.get_lines() if not ln.get_label().startswith("_") and "success" not in ln.get_label()}


def test_vs_axis_keeps_the_other_axis_values_apart(tmp_path, drawn):
    df = _parquets("curve_budget_small")
    path = figure_vs_axis(df, "defense.clean_ratio", tmp_path, "png")
    assert path is not None and path.exists()
    lines = _asr_lines(drawn[path.name])
    at = {label: dict(zip(x, y))[0.02] for label, (x, y) in lines.items()}
    # curve_steps 2000 (ASR 18.1) and the spec's curve steps (30.1) were pooled into one TSC line at 24.1
    assert len(at) == 2, lines
    by_value = {("2000" in label, SPEC_VALUE in label): v for label, v in at.items()}
    assert by_value[(True, False)] == pytest.approx(18.0556, abs=1e-3)
    assert by_value[(False, True)] == pytest.approx(30.1389, abs=1e-3)
    assert all("TSC" in label and "curve_steps" in label for label in at)


def test_vs_axis_with_one_axis_is_unchanged(tmp_path, drawn):
    df = _parquets("clean_scale")
    path = figure_vs_axis(df, "defense.clean_ratio", tmp_path, "png")
    assert path is not None and path.name == "fig_vs_defense.clean_ratio.png"
    labels = set(_asr_lines(drawn[path.name]))
    assert labels and all("." not in label and SPEC_VALUE not in label for label in labels), labels


def test_vs_axis_does_not_split_a_defense_an_other_axis_leaves_alone(tmp_path, drawn):
    """MCR's trials do not depend on defense.tsc.curve_steps: one MCR line, its mean over each trial once."""
    rows = []
    for seed in (0, 1):
        base = dict(dataset="d", arch="cnn", attack="badnets", poison_rate=0.1, seed=seed, stage="final",
                    method="supervised")
        rows.append({**base, "defense": "none", "acc": 90.0, "asr": 99.0, "trial_id": f"n{seed}"})
        for cr in (0.02, 0.05):
            rows.append({**base, "defense": "mcr", "t": 0.4, "acc": 80.0, "asr": 50.0 + 10 * seed + 100 * cr,
                         "trial_id": f"m{cr}{seed}", "defense.clean_ratio": cr})
            for steps in (1000.0, 2000.0, np.nan):
                rows.append({**base, "defense": "tsc", "e_tsc": 3, "t": 0.4, "acc": 85.0,
                             "asr": (steps if steps == steps else 3000.0) / 100 + cr + seed,
                             "trial_id": f"t{cr}{steps}{seed}", "defense.clean_ratio": cr,
                             "defense.tsc.curve_steps": steps})
    path = figure_vs_axis(pd.DataFrame(rows), "defense.clean_ratio", tmp_path, "png")
    assert path is not None
    lines = _asr_lines(drawn[path.name])
    mcr = [label for label in lines if label.startswith("MCR")]
    assert mcr == ["MCR"], lines
    assert lines["MCR"][1] == pytest.approx([57.0, 60.0])
    tsc = {label: y for label, (x, y) in lines.items() if label.startswith("TSC")}
    assert sorted(tsc.values()) == [pytest.approx([10.52, 10.55]), pytest.approx([20.52, 20.55]),
                                    pytest.approx([30.52, 30.55])]
    assert sum(SPEC_VALUE in label for label in tsc) == 1
    # each line's band: ±1 std over the two seeds (a trial repeated per curve_steps value would shrink MCR's)
    ax = drawn[path.name]["axes"][1]
    bands = [c.get_paths()[0].vertices[:, 1] for c in ax.collections]
    assert any(np.isclose(b.max(), 60.0 + np.std([55.0, 65.0], ddof=1)) for b in bands)


def _ablation() -> pd.DataFrame:
    df = pd.read_csv(DOCS / "ablation_small" / "rows.csv")
    copy = df.assign(asr=df.asr * 0.1 + 0.01, trial_id=df.trial_id + "-b", **{"defense.clean_ratio": 0.25})
    return pd.concat([df.assign(**{"defense.clean_ratio": 0.02}), copy], ignore_index=True)


def _curve_asr(fig: dict) -> dict[str, list[float]]:
    return {label: y for label, _, y in fig["lines"] if label.startswith("ASR")}


def test_figure3_one_figure_per_axis_value_with_its_own_mcr(tmp_path, drawn):
    df = _ablation()
    paths = figure_curves(df, tmp_path, "png")
    names = sorted(p.name for p in paths)
    assert names == ["fig3_fashion-mnist-embedded_cnn_badnets_0.1_0_defense.clean_ratio-0.02.png",
                     "fig3_fashion-mnist-embedded_cnn_badnets_0.1_0_defense.clean_ratio-0.25.png"]
    curves = df[df.stage.isin(["curve", "curve1", "curve2"])]
    for name in names:
        ratio = 0.02 if "0.02" in name else 0.25
        fig = drawn[name]
        assert f"defense.clean_ratio {ratio:g}" in fig["title"]
        own = set(np.round(curves[curves["defense.clean_ratio"] == ratio].asr, 6))
        mcr = _curve_asr(fig)["ASR of MCR"]
        tsc = [y for label, y in _curve_asr(fig).items() if "TSC" in label]
        assert tsc and mcr
        for y in [mcr, *tsc]:
            assert set(np.round(y, 6)) <= own, name


def test_figure3_one_figure_per_method(tmp_path, drawn):
    df = pd.read_csv(DOCS / "ablation_small" / "rows.csv")
    ssl = df.assign(asr=df.asr * 0.1 + 0.01, trial_id=df.trial_id + "-s", method="simclr")
    df = pd.concat([df.assign(method="supervised"), ssl], ignore_index=True)
    paths = figure_curves(df, tmp_path, "png")
    assert len(paths) == 2 and len({p.name for p in paths}) == 2
    curves = df[df.stage.isin(["curve", "curve1", "curve2"])]
    for p in paths:
        fig = drawn[p.name]
        method = "simclr" if "simclr" in p.name else "supervised"
        assert method in p.name and method in fig["title"]
        own = set(np.round(curves[curves.method == method].asr, 6))
        for y in _curve_asr(fig).values():
            assert set(np.round(y, 6)) <= own, p.name


def test_figure3_without_axes_is_unchanged(tmp_path, drawn):
    df = pd.read_csv(DOCS / "ablation_small" / "rows.csv")
    paths = figure_curves(df, tmp_path, "png")
    assert [p.name for p in paths] == ["fig3_fashion-mnist-embedded_cnn_badnets_0.1_0.png"]
    assert drawn[paths[0].name]["title"] == (
        "ACC/ASR along the curves: dataset fashion-mnist-embedded, arch cnn, attack badnets, poison_rate 0.1, seed 0")
