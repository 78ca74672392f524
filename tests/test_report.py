import numpy as np
import pandas as pd
from pathlib import Path

import pytest

from tscray.cli import main
from tscray.report import choose_setting, make_report


def synthetic_rows():
    """Final rows for 2 attacks x 2 seeds x E in {1,2} x t in {0.2,0.4}, curve rows, MCR and no defense."""
    rows = []
    rng = np.random.default_rng(0)
    for attack in ("badnets", "blended"):
        for seed in (0, 1):
            base = dict(dataset="d", arch="cnn", attack=attack, poison_rate=0.1, seed=seed)
            rows.append({**base, "defense": "none", "e_tsc": None, "t": None, "round": 0, "stage": "final",
                         "t_curve": None, "acc": 90.0, "asr": 99.0, "trial_id": f"n{attack}{seed}"})
            for e in (1, 2):
                for t in (0.2, 0.4):
                    tid = f"{attack}{seed}{e}{t}"
                    asr = 80.0 / e - 50 * t + seed
                    rows.append({**base, "defense": "tsc", "e_tsc": e, "t": t, "round": e, "stage": "final",
                                 "t_curve": None, "acc": 85.0 + t, "asr": asr, "trial_id": tid})
                    for r in range(1, e + 1):
                        for stage in ("curve1", "curve2"):
                            for tc in (0.0, 0.5, 1.0):
                                rows.append({**base, "defense": "tsc", "e_tsc": e, "t": t, "round": r, "stage": stage,
                                             "t_curve": tc, "acc": float(rng.uniform(50, 90)),
                                             "asr": float(rng.uniform(0, 100)), "trial_id": tid})
            for tc in (0.0, 0.5, 1.0):
                rows.append({**base, "defense": "mcr", "e_tsc": None, "t": 0.4, "round": 1, "stage": "curve",
                             "t_curve": tc, "acc": 88.0, "asr": 95.0, "trial_id": f"m{attack}{seed}"})
            rows.append({**base, "defense": "mcr", "e_tsc": None, "t": 0.4, "round": 1, "stage": "final",
                         "t_curve": 0.4, "acc": 88.0, "asr": 95.0, "trial_id": f"m{attack}{seed}"})
    return pd.DataFrame(rows)


def test_every_figure_and_table_is_produced_and_traceable(tmp_path):
    df = synthetic_rows()
    rep = make_report(df, tmp_path, "png", title="tscray sweep study")
    names = sorted(p.name for p in rep.figures)
    assert "fig5_tsc_vs_t.png" in names
    assert sum(n.startswith("fig3_") for n in names) == 4  # 2 attacks x 2 seeds
    assert all(p.stat().st_size > 10_000 for p in rep.figures)
    assert any("Figure 6" in s for s in rep.skipped)
    # no (E_TSC 3, t 0.4) here: Table 1 falls back to the largest E_TSC at t 0.4, one column for TSC
    table = pd.read_csv(tmp_path / "table1_long.csv")
    row = table[(table.attack == "badnets") & (table.defense == "tsc")]
    assert len(row) == 1
    row = row.iloc[0]
    src = df[(df.attack == "badnets") & (df.defense == "tsc") & (df.e_tsc == 2) & (df.t == 0.4) & (df.stage == "final")]
    assert row.asr == pytest.approx(src.asr.mean(), abs=0.01) and row.seeds == 2
    assert bool(row.failed) == (src.asr.mean() >= 15)
    md = (tmp_path / "table1.md").read_text()
    assert "No defense" in md and "90.0±0.0 / 99.0±0.0" in md and "TSC (E 2, t 0.4)" in md
    assert "E_TSC 3, t 0.4 is not in these rows" in md
    assert (tmp_path / "tsc_grid.png").stat().st_size > 10_000
    html = rep.index.read_text()
    assert all(p.name in html for p in rep.figures) and "<table class=t1>" in html
    # (the figures' loop had taken over the page's title: every report read "Self-supervised TSC versus t")
    assert "<title>tscray sweep study</title>" in html and "<h1>tscray sweep study</h1>" in html


def test_svg_and_pdf_formats(tmp_path):
    for fmt in ("svg", "pdf"):
        rep = make_report(synthetic_rows(), tmp_path / fmt, fmt)
        assert all(p.suffix == f".{fmt}" for p in rep.figures)


def test_partial_sweep_draws_what_it_can(tmp_path):
    df = synthetic_rows()
    df = df[(df.defense == "none") | ((df.defense == "tsc") & (df.stage == "final") & (df.e_tsc == 1))]
    rep = make_report(df, tmp_path)
    assert [p.name for p in rep.figures] == ["tsc_grid.png", "fig5_tsc_vs_t.png"]
    assert any("Figure 3" in s for s in rep.skipped)


def test_empty_sweep_is_a_clear_message(tmp_path, capsys):
    with pytest.raises(ValueError, match="no result rows"):
        make_report(pd.DataFrame(columns=["stage", "defense"]), tmp_path)
    (tmp_path / "sweep").mkdir()
    import json
    (tmp_path / "sweep" / "sweep.json").write_text(json.dumps({"spec": {"name": "x"}, "sweep_id": "abc", "trials": 1,
                                                                 "steps": 1}))
    assert main(["report", str(tmp_path / "sweep"), "--no-mlflow"]) == 2
    assert "no result rows yet" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "not a tscray sweep directory" in capsys.readouterr().err


SHIPPED = sorted(p.stem for p in (Path(__file__).parents[1] / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_sweeps_dry_run(name, monkeypatch, tmp_path, capsys):
    """Every spec in sweeps/ validates and plans (a listed subset missed clean_scale_small)."""
    monkeypatch.setenv("TSCRAY_DATA", str(tmp_path))
    assert main(["sweep", f"sweeps/{name}.yaml", "--dry-run", "--storage", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "trials" in out and "curve fits" in out
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------- Table 1 in the paper's layout

ALL = ["tsc", "finetune", "sau", "fst", "i-bau", "ft-sam", "anp", "mcr", "nad", "nc", "fp", "none"]
PAPER = ["No defense", "FP", "NC", "NAD", "MCR", "ANP", "FT-SAM", "I-BAU", "SAU", "FST", "fine-tuning", "TSC"]


def final_row(defense, acc, asr, attack="badnets", seed=0, e=None, t=None, rate=0.1, **extra):
    return {"dataset": "d", "arch": "cnn", "attack": attack, "poison_rate": rate, "seed": seed, "defense": defense,
            "e_tsc": e, "t": t, "stage": "final", "acc": acc, "asr": asr, **extra}


def zoo_rows(grid=((1, 0.2), (2, 0.4), (3, 0.4), (3, 0.5)), attacks=("badnets", "blended"), seeds=(0, 1)):
    """Every known defense plus two unknown ones, TSC over ``grid`` (ASR = 10 E + 100 t + seed), MCR over t."""
    rows = []
    for attack in attacks:
        for seed in seeds:
            for d in ALL + ["zeta", "alpha-new"]:
                if d == "tsc":
                    rows += [final_row(d, 80.0 + e, 10.0 * e + 100 * t + seed, attack, seed, e, t,
                                       defense_seconds=100.0 * e) for e, t in grid]
                elif d == "mcr":
                    rows += [final_row(d, 85.0, 90.0 - t, attack, seed, None, t, defense_seconds=50.0)
                             for t in (0.2, 0.4, 0.5)]
                else:
                    rows.append(final_row(d, 90.0, 50.0, attack, seed,
                                          defense_seconds=None if d == "none" else 10.0 + seed))
    return pd.DataFrame(rows)


def md_header(path):
    line = next(s for s in path.read_text().splitlines() if s.startswith("| "))
    return [c.strip() for c in line.strip("|").split("|")]


def test_table1_one_column_per_defense_in_the_papers_order_unknown_ones_last(tmp_path):
    rep = make_report(zoo_rows(), tmp_path)
    head = md_header(tmp_path / "table1.md")
    names = [h.split(" (")[0] for h in head[2:]]
    assert names == PAPER + ["alpha-new", "zeta"]
    assert head[:2] == ["attack", "poison rate"]  # dataset and arch are constant: named in the caption instead
    wide = pd.read_csv(tmp_path / "table1.csv")
    assert [c[:-4] for c in wide.columns if c.endswith(" ACC")] == PAPER + ["alpha-new", "zeta"]
    assert list(wide.attack) == ["badnets", "blended", "average"]
    html = rep.index.read_text()
    t1 = html[html.index("<table class=t1>"):]
    pos = [t1.index(f"<th>{n}") for n in ["No defense", "FP", "NC", "NAD", "MCR", "ANP", "FT-SAM", "I-BAU", "SAU",
                                           "FST", "fine-tuning", "TSC", "alpha-new", "zeta"]]
    assert pos == sorted(pos)
    for section in ("Table 1", "Defense cost", "TSC grid", "Not drawn"):
        assert f">{section}</h2>" in html


def test_table1_tsc_at_the_papers_setting_or_a_given_one(tmp_path):
    make_report(zoo_rows(), tmp_path / "a")
    long = pd.read_csv(tmp_path / "a" / "table1_long.csv")
    tsc = long[(long.defense == "tsc") & (long.attack == "badnets")].iloc[0]
    assert tsc.acc == pytest.approx(83.0) and tsc.asr == pytest.approx(70.5)  # E 3, t 0.4: 30 + 40 + mean seed
    mcr = long[(long.defense == "mcr") & (long.attack == "badnets")].iloc[0]
    assert mcr.asr == pytest.approx(89.6)  # MCR at TSC's t, 0.4
    assert "TSC at E_TSC 3, t 0.4 (the paper's setting)" in (tmp_path / "a" / "table1.md").read_text()

    make_report(zoo_rows(), tmp_path / "b", tsc_setting=(3, 0.5))
    long = pd.read_csv(tmp_path / "b" / "table1_long.csv")
    assert long[(long.defense == "tsc")].asr.iloc[0] == pytest.approx(80.5)
    assert long[(long.defense == "mcr")].asr.iloc[0] == pytest.approx(89.5)
    assert "TSC (E 3, t 0.5)" in (tmp_path / "b" / "table1.md").read_text()


def test_table1_fallback_largest_e_at_the_t_closest_to_0_4(tmp_path):
    # no (3, 0.4): t 0.3 and 0.5 tie for closest (the larger wins), E 2 is the largest there
    make_report(zoo_rows(grid=((1, 0.3), (3, 0.3), (1, 0.5), (2, 0.5), (1, 0.9))), tmp_path / "a")
    long = pd.read_csv(tmp_path / "a" / "table1_long.csv")
    assert long[long.defense == "tsc"].acc.tolist() == [82.0, 82.0]
    md = (tmp_path / "a" / "table1.md").read_text()
    assert "TSC at E_TSC 2, t 0.5" in md and "E_TSC 3, t 0.4 is not in these rows" in md

    # E 3 exists for one attack only: the largest E every setting has (2) is shown
    df = zoo_rows(grid=((1, 0.45), (2, 0.45)))
    extra = df[(df.defense == "tsc") & (df.e_tsc == 2) & (df.attack == "badnets")].assign(e_tsc=3)
    make_report(pd.concat([df, extra]), tmp_path / "b")
    long = pd.read_csv(tmp_path / "b" / "table1_long.csv")
    assert long[long.defense == "tsc"].acc.tolist() == [82.0, 82.0]
    assert "that every setting has" in (tmp_path / "b" / "table1.md").read_text()


def test_choose_setting_defaults_to_the_papers_ssl_setting():
    df = pd.DataFrame([final_row("tsc", 80, 5, e=e, t=t, method="simclr") for e in (1, 2, 3) for t in (0.25, 0.4)])
    from tscray.report import _final

    s = choose_setting(_final(df), "simclr")
    assert (s.e_tsc, s.t, s.mcr_t) == (2, 0.25, None)
    s = choose_setting(_final(df), "simclr", (3, 0.4))
    assert (s.e_tsc, s.t) == (3, 0.4)


def test_table1_mean_and_std_over_seeds(tmp_path):
    rows = [final_row("none", 93.0, 99.0, seed=s) for s in range(3)]
    rows += [final_row("fp", acc, asr, seed=s) for s, (acc, asr) in enumerate([(90, 10), (91, 12), (95, 20)])]
    rows += [final_row("nc", 88.25, 3.5, attack="blended")]  # one seed: no ±
    make_report(pd.DataFrame(rows), tmp_path)
    md = (tmp_path / "table1.md").read_text()
    # mean 92, sample std sqrt(7) = 2.65; ASR mean 14, std sqrt(28) = 5.29
    assert "| badnets | 10% | 93.0±0.0 / 99.0±0.0 | 92.0±2.6 / 14.0±5.3 | – |" in md
    assert "| blended | 10% | – | – | 88.2 / 3.5 |" in md
    long = pd.read_csv(tmp_path / "table1_long.csv")
    fp = long[long.defense == "fp"].iloc[0]
    assert fp.acc == pytest.approx(92.0) and fp.acc_std == pytest.approx(np.sqrt(7), abs=0.01)
    assert fp.asr_std == pytest.approx(np.sqrt(28), abs=0.01) and fp.seeds == 3
    # average row: mean over settings of each column
    assert "| **average** | | 93.0 / 99.0 | 92.0 / 14.0 | 88.2 / 3.5 |" in md


def test_failed_defense_marked_at_exactly_15(tmp_path):
    rows = [final_row("none", 93.0, 99.0), final_row("fp", 90.0, 15.0), final_row("nc", 90.0, 14.99),
            final_row("none", 93.0, 10.0, attack="blended")]
    rep = make_report(pd.DataFrame(rows), tmp_path)
    md = (tmp_path / "table1.md").read_text()
    assert "| badnets | 10% | 93.0 / 99.0 | 90.0 / 15.0 ✗ | 90.0 / 15.0 |" in md  # FP 15.0 fails, NC 14.99 not
    assert "93.0 / 10.0 |" in md and "99.0 ✗" not in md  # No defense is never a failed defense
    long = pd.read_csv(tmp_path / "table1_long.csv").set_index(["attack", "defense"])
    assert long.failed[("badnets", "fp")] and not long.failed[("badnets", "nc")]
    assert not long.failed[("badnets", "none")]
    html = rep.index.read_text()
    assert html.count("<td class=fail") == 1 and "failed defense" in html  # the cell, and the legend
    assert "| ASR < 15% | | – | 0/1 | 1/1 |" in md


def test_tsc_grid_table_e_rows_by_t_columns_and_heatmap(tmp_path):
    df = zoo_rows(grid=[(e, t) for e in (1, 2, 3) for t in (0.2, 0.4, 0.6)])
    rep = make_report(df, tmp_path)
    grid = pd.read_csv(tmp_path / "tsc_grid.csv")
    assert list(grid.columns) == ["method", "e_tsc", "metric", "t=0.2", "t=0.4", "t=0.6"]
    acc = grid[grid.metric == "ACC"].set_index("e_tsc")
    asr = grid[grid.metric == "ASR"].set_index("e_tsc")
    assert list(acc.index) == [1, 2, 3]
    src = df[df.defense == "tsc"]
    for e in (1, 2, 3):
        for t in (0.2, 0.4, 0.6):
            cell = src[(src.e_tsc == e) & np.isclose(src.t, t)]
            assert acc.loc[e, f"t={t:g}"] == pytest.approx(cell.acc.mean(), abs=0.01)
            assert asr.loc[e, f"t={t:g}"] == pytest.approx(cell.asr.mean(), abs=0.01)
    assert (grid[grid.metric == "runs"].iloc[:, 3:] == 4).all().all()  # 2 attacks x 2 seeds
    md = (tmp_path / "tsc_grid.md").read_text()
    table = [s for s in md.splitlines() if s.startswith("| ")]
    assert table[0] == "| E_TSC \\ t | 0.2 | 0.4 | 0.6 |" and len(table) == 1 + 3
    assert table[1] == "| 1 | 81.0 / 30.5 ✗ | 81.0 / 50.5 ✗ | 81.0 / 70.5 ✗ |"
    assert "**83.0 / 70.5 ✗**" in md  # Table 1's setting, E 3, t 0.4, in bold
    fig = tmp_path / "tsc_grid.png"
    assert fig in rep.figures and fig.stat().st_size > 10_000
    # Table 1 shows TSC once, not one column per (E, t)
    assert sum(h.startswith("TSC") for h in md_header(tmp_path / "table1.md")) == 1


def test_tsc_grid_per_method(tmp_path):
    df = zoo_rows(grid=[(e, t) for e in (1, 2) for t in (0.25, 0.4)])
    df = pd.concat([df.assign(method="supervised"), df[df.defense.isin(["none", "tsc"])].assign(method="simclr")])
    make_report(df, tmp_path, "svg")
    grid = pd.read_csv(tmp_path / "tsc_grid.csv")
    assert list(grid.method.unique()) == ["supervised", "simclr"]
    assert (tmp_path / "tsc_grid.svg").exists()
    md = (tmp_path / "table1.md").read_text()
    assert "supervised: TSC at E_TSC 2, t 0.4" in md and "simclr: TSC at E_TSC 2, t 0.25 (the paper's setting)" in md


def test_defense_cost_and_nc_detection(tmp_path):
    df = zoo_rows()
    nc = df.defense == "nc"
    df.loc[nc, "nc_flagged"] = np.where(df[nc].seed == 0, "0", "")
    df.loc[nc, "nc_anomaly_index"] = np.where(df[nc].seed == 0, 3.0, 1.0)
    rep = make_report(df, tmp_path)
    cost = pd.read_csv(tmp_path / "defense_cost.csv").set_index("defense")
    assert list(cost.index[:3]) == ["fp", "nc", "nad"] and "none" not in cost.index
    assert cost.seconds["fp"] == pytest.approx(10.5) and cost.trials["fp"] == 4
    assert cost.seconds["tsc"] == pytest.approx(300.0)  # TSC at Table 1's E_TSC 3
    det = pd.read_csv(tmp_path / "nc_detection.csv")
    assert list(det.anomaly_index) == [2.0, 2.0] and list(det.flagged_any) == [1, 1]
    assert det.flagged.iloc[0] == "s0: 0; s1: none"
    html = rep.index.read_text()
    assert ">NC detection</h2>" in html and ">Defense cost</h2>" in html


def test_captions_name_a_constant_axis_as_tables_show_it_and_nc_leaves_out_axes_it_does_not_take(tmp_path):
    """NC's caption read 'defense.tsc.curve_epochs nan' (an axis NC does not take) and Table 1's read
    'defense.tsc.curve_epochs 50.0' for a single-valued axis the tables print as 50."""
    rows = []
    for seed in (0, 1):
        rows.append(final_row("nc", 88.0, 50.0, seed=seed, trial_id=f"nc{seed}", nc_flagged="0",
                              nc_anomaly_index=3.0))
        rows.append(final_row("tsc", 85.0, 5.0, seed=seed, e=3, t=0.4, trial_id=f"t{seed}",
                              **{"defense.tsc.curve_epochs": 50.0}))
    make_report(pd.DataFrame(rows), tmp_path)
    nc = (tmp_path / "nc_detection.md").read_text().split("\n")[0]
    assert "Rows: dataset d, arch cnn." in nc and "curve_epochs" not in nc, nc
    assert "defense.tsc.curve_epochs" not in pd.read_csv(tmp_path / "nc_detection.csv").columns
    assert "Rows: dataset d, arch cnn, defense.tsc.curve_epochs 50." in (tmp_path / "table1.md").read_text()


def test_a_field_axis_splits_every_table_and_figure_and_undefended_rows_stand_beside_each_value(tmp_path):
    """Issue 11, §1: a ``defense.clean_ratio`` axis. Table 1 has one row per ratio (never an average over
    them), the undefended model (null ratio: the axis does not apply) sits in each, TSC's grid and Figure 5
    come per ratio, and a figure draws each defense against the ratio."""
    rows = []
    for seed in (0, 1):
        rows.append(final_row("none", 90.0, 99.0, seed=seed))
        for ratio, asr in ((0.01, 60.0), (0.05, 5.0)):
            for t in (0.3, 0.4):
                rows.append(final_row("tsc", 85.0, asr + 10 * t + seed, seed=seed, e=3, t=t,
                                      **{"defense.clean_ratio": ratio}))
            rows.append(final_row("finetune", 88.0, asr + 30, seed=seed, **{"defense.clean_ratio": ratio}))
    df = pd.DataFrame(rows)
    rep = make_report(df, tmp_path, "png")
    table = pd.read_csv(tmp_path / "table1_long.csv")
    assert sorted(table["defense.clean_ratio"].unique()) == [0.01, 0.05]
    tsc = table[table.defense == "tsc"].set_index("defense.clean_ratio").asr
    assert tsc.loc[0.01] == pytest.approx(64.5) and tsc.loc[0.05] == pytest.approx(9.5)  # t 0.4, mean of 2 seeds
    none = table[table.defense == "none"]
    assert len(none) == 2 and set(none.asr) == {99.0}  # beside each ratio
    assert "attack · defense.clean_ratio |" in (tmp_path / "table1.md").read_text()  # (the path as written)
    grid = (tmp_path / "tsc_grid.md").read_text()
    assert "supervised · defense.clean_ratio 0.01" in grid and "supervised · defense.clean_ratio 0.05" in grid
    names = sorted(p.name for p in rep.figures)
    assert "fig5_tsc_vs_t_defense.clean_ratio-0.01.png" in names and "fig5_tsc_vs_t_defense.clean_ratio-0.05.png" in names
    assert "fig_vs_defense.clean_ratio.png" in names


def test_a_numeric_axis_gets_a_table_and_figure_per_attack_that_the_mean_over_attacks_hides(tmp_path):
    """Issue 11 asks for ASR and ACC against clean-set size at each setting. The only figure against an axis
    averaged over attacks: BadNets removed at every size and Blended at none read as one line near 40%."""
    rows = []
    for seed in (0, 1):
        for attack in ("badnets", "blended"):
            rows.append(final_row("none", 90.0, 99.0, attack=attack, seed=seed))
            for ratio, (bad, blend) in ((0.02, (5.0, 60.0)), (0.05, (8.0, 70.0)), (0.25, (3.0, 10.0))):
                asr = bad if attack == "badnets" else blend
                for t in (0.4, 0.5):
                    rows.append(final_row("tsc", 84.0 + seed, asr + seed + 20 * (t - 0.4), attack=attack, seed=seed,
                                          e=3, t=t, **{"defense.clean_ratio": ratio}))
    rep = make_report(pd.DataFrame(rows), tmp_path, "png")
    table = pd.read_csv(tmp_path / "vs_defense.clean_ratio.csv")
    assert set(table.defense) == {"tsc"}  # the undefended model has no clean set
    cell = table.set_index(["attack", "defense.clean_ratio"])
    assert cell.asr[("badnets", 0.02)] == pytest.approx(5.5) and cell.asr[("blended", 0.05)] == pytest.approx(70.5)
    assert cell.acc[("blended", 0.25)] == pytest.approx(84.5) and cell.seeds[("badnets", 0.25)] == 2
    assert list(cell.failed[("blended",)]) == [True, True, False]  # t 0.4: the paper's setting, not t 0.5
    md = (tmp_path / "vs_defense.clean_ratio.md").read_text()
    assert "| TSC | blended | 84.5±0.7 / 60.5±0.7 ✗ | 84.5±0.7 / 70.5±0.7 ✗ | 84.5±0.7 / 10.5±0.7 |" in md
    assert (tmp_path / "fig_vs_defense.clean_ratio_by_setting.png").stat().st_size > 0
    assert "Against defense.clean_ratio" in rep.index.read_text()
    one = make_report(pd.DataFrame([r for r in rows if r["attack"] == "badnets"]), tmp_path / "one", "png")
    assert not (tmp_path / "one" / "vs_defense.clean_ratio.csv").exists()  # one setting: fig_vs_ says it all
    assert (tmp_path / "one" / "fig_vs_defense.clean_ratio.png").exists() and one.index.exists()


def stage_rows(finetune=True):
    """TSC round rows as a sweep writes them: E_TSC 1 and 2 trials share round 1; two seeds; a field axis."""
    rows = []
    for steps in (None, 2000.0):
        for seed in (0, 1):
            for e in (1, 2):
                for r in range(1, e + 1):
                    scale = 1.0 if steps is None else 0.25  # the bigger budget: a quarter of the ASR back
                    for stage, asr in (("stage1", 5.0 * r), ("stage2", scale * 60.0 / r + seed),
                                       ("finetune", scale * 58.0 / r + seed)):
                        if stage == "finetune" and not finetune:
                            continue
                        rows.append({**final_row("tsc", 80.0 + r, asr, seed=seed, e=e, t=0.4), "stage": stage,
                                     "round": r, "defense.tsc.curve_steps": steps})
                rows.append({**final_row("tsc", 80.0, 1.0, seed=seed, e=e, t=0.4), "round": e,
                             "defense.tsc.curve_steps": steps})
    return pd.DataFrame(rows)


def test_tsc_stages_show_each_rounds_points_once_averaged_over_seeds(tmp_path):
    rep = make_report(stage_rows(), tmp_path, "png")
    table = pd.read_csv(tmp_path / "tsc_stages.csv")
    assert len(table) == 4  # 2 budgets x 2 rounds: round 1 of the E 1 and E 2 trials counted once
    r1 = table[(table["round"] == 1) & table["defense.tsc.curve_steps"].isna()].iloc[0]
    assert (r1.stage1_asr, r1.stage2_asr, r1.output_asr, r1.seeds) == (5.0, 60.5, 58.5, 2)
    md = (tmp_path / "tsc_stages.md").read_text()
    assert "| – | 5.0 → 60.5 → 58.5 (81.0) ✗ | 10.0 → 30.5 → 29.5 (82.0) ✗ |" in md  # the axis unset: –
    assert "| 2000 | 5.0 → 15.5 → 15.0 (81.0) ✗ | 10.0 → 8.0 → 7.8 (82.0) |" in md
    assert (tmp_path / "tsc_stages.png").stat().st_size > 10_000
    assert "tsc_stages.png" in rep.index.read_text()


def test_tsc_stages_use_the_stage2_point_as_output_when_the_last_round_is_not_fine_tuned(tmp_path):
    make_report(stage_rows(finetune=False), tmp_path, "png")
    table = pd.read_csv(tmp_path / "tsc_stages.csv")
    assert (table.output_asr == table.stage2_asr).all()


def test_no_round_rows_skip_the_stages_section(tmp_path):
    rep = make_report(zoo_rows(), tmp_path, "png")
    assert any(s.startswith("TSC stages by round") for s in rep.skipped)


def test_a_log_axis_is_labelled_at_its_values_only():
    """Clean ratios 0.02-0.25 on a log axis were labelled at every minor tick (2×10⁻², 3×10⁻², 4×10⁻², ...),
    which overlapped into an unreadable row; a narrow range keeps a linear axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tscray.report import _log_axis

    fig, (wide, narrow) = plt.subplots(1, 2)
    for ax in (wide, narrow):
        ax.plot([0.02, 0.05, 0.1, 0.25], [1, 2, 3, 4])
    _log_axis(wide, [0.02, 0.05, 0.1, 0.25, 0.05])
    _log_axis(narrow, [0.1, 0.2, 0.5])
    fig.canvas.draw()
    assert wide.get_xscale() == "log" and narrow.get_xscale() == "linear"
    assert [t.get_text() for t in wide.get_xticklabels()] == ["0.02", "0.05", "0.1", "0.25"]
    assert not [t.get_text() for t in wide.get_xticklabels(minor=True) if t.get_text()]
    plt.close(fig)


def test_an_axis_some_trials_do_not_sweep_counts_each_trial_once_and_never_pools_other_values(tmp_path):
    """A TSC-only axis (defense.tsc.curve_epochs 50 / 100) beside NC and MCR, and a second grid block (blended)
    without the axis. NC and MCR rows are repeated at each value so Table 1 sets them beside TSC; the defense
    cost then counted each of their trials twice (8 for 4) and each setting twice. The blended TSC trials ran at
    the spec's curve epochs: they were labelled 'nan' and averaged into both values' Figure 5."""
    from tscray.report import axis_parts

    spec_value = "as in the spec"
    rows = []
    for seed in (0, 1):
        for d, secs in (("nc", 10.0 + seed), ("mcr", 4.0)):
            rows.append(final_row(d, 88.0, 50.0, seed=seed, t=0.4 if d == "mcr" else None, trial_id=f"{d}{seed}",
                                  defense_seconds=secs))
        for epochs, asr in ((50, 30.0), (100, 5.0)):
            rows.append(final_row("tsc", 85.0, asr + seed, seed=seed, e=3, t=0.4, trial_id=f"t{epochs}{seed}",
                                  defense_seconds=20.0, **{"defense.tsc.curve_epochs": epochs}))
        rows.append(final_row("tsc", 84.0, 70.0, attack="blended", seed=seed, e=3, t=0.4, trial_id=f"b{seed}",
                              defense_seconds=20.0))
    df = pd.DataFrame(rows)
    make_report(df, tmp_path, "png")
    cost = pd.read_csv(tmp_path / "defense_cost.csv")
    once = cost[cost.defense != "tsc"].set_index("defense")  # (the axis leaves them alone: one row each)
    assert once.trials["nc"] == 2 and once.trials["mcr"] == 2 and once["defense.tsc.curve_epochs"].isna().all()
    assert once.seconds_std["nc"] == pytest.approx(np.std([10.0, 11.0], ddof=1), abs=0.01)
    tsc = cost[cost.defense == "tsc"]  # badnets at 50, at 100; blended at the spec's: a row each
    assert list(tsc["defense.tsc.curve_epochs"].fillna(0)) == [50, 100, 0]
    assert list(tsc.trials) == [2, 2, 2] and list(tsc.settings) == [1, 1, 1] and once.settings["nc"] == 1
    md = (tmp_path / "table1.md").read_text()
    assert "nan" not in md and "| blended · – |" in md
    parts = {note: rows for rows, _, note in axis_parts(df)}
    assert set(parts) == {"defense.tsc.curve_epochs 50", "defense.tsc.curve_epochs 100",
                          f"defense.tsc.curve_epochs {spec_value}"}
    at50 = parts["defense.tsc.curve_epochs 50"]
    assert set(at50[at50.defense == "tsc"].trial_id) == {"t500", "t501"}  # never the blended trials
    assert set(at50[at50.defense != "tsc"].trial_id) == {"nc0", "nc1", "mcr0", "mcr1"}  # the axis leaves them alone
    assert set(parts[f"defense.tsc.curve_epochs {spec_value}"].query("defense == 'tsc'").trial_id) == {"b0", "b1"}


def test_a_title_or_legend_wider_than_the_figure_is_saved_whole(tmp_path):
    """A one-panel Figure 5 had its title cut at both ends and tsc_stages.png its legend below the axes."""
    import matplotlib.pyplot as plt
    from PIL import Image

    from tscray.report import _finish

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1], [0, 1], label="a legend entry placed below the axes")
    fig.suptitle("a title far wider than one small panel of three inches, as Figure 5 has for one E_TSC " * 2)
    fig.legend(loc="lower center", bbox_to_anchor=(0.5, -0.3))
    _finish(fig, tmp_path / "f.png")
    w, h = Image.open(tmp_path / "f.png").size
    assert w > 3 * 130 * 1.5 and h > 2 * 130  # grown to hold the title and the legend


def test_tsc_grid_panel_titles_fit_their_panels(tmp_path, monkeypatch):
    """With a field axis in the label ('supervised · defense.tsc.curve_epochs 1: final ACC (%)') the two panels'
    titles ran into each other."""
    from tscray import report

    rows = [final_row("tsc", 85.0, 10.0, seed=s, e=1, t=0.4, **{"defense.tsc.curve_epochs": ep})
            for s in (0, 1) for ep in (1, 2)]
    grids = report.grid_means(pd.DataFrame(rows))
    figs = []
    monkeypatch.setattr(report, "_finish", lambda fig, path: figs.append(fig) or path)
    report.figure_grid(grids, tmp_path / "g.png")
    fig = figs[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        if not ax.get_title():
            continue  # (colour bars)
        title = ax.title.get_window_extent(renderer)
        panel = ax.get_window_extent(renderer)
        assert title.width <= panel.width * 1.6, ax.get_title()  # within its panel and its margin, not the next


def test_csv_files_write_settings_exactly_and_round_only_measures(tmp_path):
    """Every CSV used one float format for every column: a 0.5% poison rate read 0.01, three clean ratios
    under 1% all read 0.00, and t 0.375 read 0.38, so rows could not be told apart or joined back."""
    rows = []
    for seed, attack in ((0, "badnets"), (1, "badnets"), (0, "blended")):
        rows.append(final_row("none", 90.0, 99.0, attack=attack, seed=seed, rate=0.005))
        for ratio in (0.004, 0.005, 0.006):
            for t in (0.375, 0.625):
                for r in (1, 2, 3):
                    for stage in ("stage1", "stage2", "finetune"):
                        rows.append({**final_row("tsc", 80.0 + r, 10.0 / r + seed, attack=attack, seed=seed, e=3, t=t, rate=0.005,
                                                 **{"defense.clean_ratio": ratio}), "stage": stage, "round": r})
                rows.append(final_row("tsc", 85.123456, 4.0 + ratio * 1000 + seed / 3, attack=attack, seed=seed, e=3, t=t,
                                      rate=0.005, defense_seconds=100.0 / 3, **{"defense.clean_ratio": ratio}))
    make_report(pd.DataFrame(rows), tmp_path, "png", tsc_setting=(3, 0.375))
    long = pd.read_csv(tmp_path / "table1_long.csv")
    assert set(long.poison_rate) == {0.005} and set(long["defense.clean_ratio"].dropna()) == {0.004, 0.005, 0.006}
    tsc = long[(long.defense == "tsc") & (long.attack == "badnets")].set_index("defense.clean_ratio")
    assert tsc.asr[0.006] == 10.17 and tsc.acc[0.004] == 85.12  # measures still rounded to two places
    stages = pd.read_csv(tmp_path / "tsc_stages.csv")
    assert set(stages.t) == {0.375, 0.625} and set(stages["defense.clean_ratio"]) == {0.004, 0.005, 0.006}
    axis = pd.read_csv(tmp_path / "vs_defense.clean_ratio.csv")
    assert set(axis["defense.clean_ratio"]) == {0.004, 0.005, 0.006}
    grid = pd.read_csv(tmp_path / "tsc_grid.csv")
    assert "t=0.375" in grid.columns and grid["t=0.375"].round(2).equals(grid["t=0.375"])  # (a measure)


def test_a_round_computed_twice_with_different_results_reads_the_same_in_any_file_order(tmp_path):
    """The clean-scale study's seed-1 chains were recomputed on another machine after E 3: the E 4 trial's
    round 1 differs from the E 1 trial's. The stages table kept whichever file came first (LF's round-2 output
    read 84.6 or 77.7); now each distinct result counts once, in any order."""
    df = stage_rows()
    df = df[df["defense.tsc.curve_steps"].isna() & (df.seed == 0)]
    again = df[df.e_tsc == 2].copy()
    again["e_tsc"] = 3
    again.loc[(again["round"] == 1) & (again.stage == "stage2"), "asr"] += 20.0  # (the recomputed chain)
    df = pd.concat([df, again])

    def stages(frame: pd.DataFrame, out: Path) -> pd.DataFrame:
        make_report(frame, out, "png")
        return pd.read_csv(out / "tsc_stages.csv")

    forward, backward = stages(df, tmp_path / "a"), stages(df.iloc[::-1], tmp_path / "b")
    assert forward.equals(backward)
    r1 = forward[forward["round"] == 1].iloc[0]
    assert r1.stage2_asr == 70.0 and r1.stage1_asr == 5.0  # 60 and 80, each once; the shared copies once


def test_defense_cost_has_one_row_per_field_axis_value(tmp_path):
    """The cost table pooled every clean-set size into one row: the study's TSC read 836±766 s, a spread
    that was almost all between sizes (175 s at 200 images, 2,073 s at 2,500)."""
    rows = []
    for seed in (0, 1):
        rows.append(final_row("none", 90.0, 99.0, seed=seed))
        for ratio, secs, asr in ((0.02, 100.0, 40.0), (0.25, 1000.0, 5.0)):
            rows.append(final_row("tsc", 85.0, asr + seed, seed=seed, e=3, t=0.4, defense_seconds=secs + seed,
                                  **{"defense.clean_ratio": ratio}))
        rows.append(final_row("finetune", 88.0, 90.0, seed=seed, defense_seconds=10.0))  # (at the spec's ratio)
    make_report(pd.DataFrame(rows), tmp_path, "png")
    cost = pd.read_csv(tmp_path / "defense_cost.csv")
    tsc = cost[cost.defense == "tsc"].set_index("defense.clean_ratio")
    assert list(tsc.index) == [0.02, 0.25] and list(tsc.seconds) == [100.5, 1000.5]
    assert list(tsc.asr) == [40.5, 5.5] and list(tsc.defended) == [0, 1] and list(tsc.trials) == [2, 2]
    ft = cost[cost.defense == "finetune"]
    assert len(ft) == 1 and ft["defense.clean_ratio"].isna().all() and ft.seconds.iloc[0] == 10.0
    md = (tmp_path / "defense_cost.md").read_text()
    assert "| TSC (E 3, t 0.4) | 0.02 | 85.0 | 40.5 | 0/1 | 100±1 | 2 |" in md and "| fine-tuning | – | 88.0 | 90.0 | 0/1 |" in md


def test_the_undefended_model_stands_beside_the_specs_own_value_of_an_axis_too(tmp_path):
    """curve_budget_small: a block sweeps defense.tsc.curve_steps: [2000], another runs the spec's budget. The
    undefended model stood beside 2000 only; the spec-budget row read "–" under No defense, which the legend
    calls "not run"."""
    rows = []
    for seed in (0, 1):
        rows.append(final_row("none", 90.0, 99.0, seed=seed))
        rows.append(final_row("tsc", 85.0, 30.0, seed=seed, e=3, t=0.4))  # the spec's curve budget
        rows.append(final_row("tsc", 84.0, 10.0, seed=seed, e=3, t=0.4, **{"defense.tsc.curve_steps": 2000.0}))
    make_report(pd.DataFrame(rows), tmp_path, "png")
    long = pd.read_csv(tmp_path / "table1_long.csv")
    none = long[long.defense == "none"]
    assert sorted(none["defense.tsc.curve_steps"].fillna(0)) == [0, 2000] and set(none.asr) == {99.0}
    assert set(none.seeds) == {2}
    md = (tmp_path / "table1.md").read_text()
    assert "| badnets · – | 10% | 90.0±0.0 / 99.0±0.0 | 85.0±0.0 / 30.0±0.0 ✗ |" in md


def test_figure5_panel_titles_give_the_range_of_runs_behind_its_points(tmp_path, monkeypatch):
    """A panel read "n = 8 runs per t" where a t had 6 (two chains of the study lacked their last rounds)."""
    import matplotlib.axes

    titles: list[str] = []
    real = matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title",
                        lambda self, label, *a, **k: (titles.append(label), real(self, label, *a, **k))[1])
    rows = [final_row("tsc", 85.0, 10.0, seed=s, e=3, t=0.4) for s in (0, 1, 2)]
    rows += [final_row("tsc", 84.0, 5.0, seed=0, e=3, t=0.5), final_row("tsc", 84.0, 5.0, seed=0, e=4, t=0.5)]
    rep = make_report(pd.DataFrame(rows), tmp_path, "png")
    assert "fig5_tsc_vs_t.png" in [p.name for p in rep.figures]
    assert "E_TSC = 3  (1–3 runs per t)" in titles and "E_TSC = 4  (1 run per t)" in titles


def test_rounds_and_axis_values_sort_as_numbers_and_unset_last():
    """``_sort`` compared rounds as text (10, 11, 8, 9) and a NaN axis value with nothing, leaving the order
    to the input's; the stages figure then drew its lines out of order from E_TSC 10 on."""
    from tscray.report import _sort

    g = pd.DataFrame({"attack": ["badnets"] * 5, "round": [10, 9, 2, 11, 8],
                      "defense.clean_ratio": [1000.0, np.nan, 200.0, 50.0, np.nan]})
    assert list(_sort(g, ["attack", "round"])["round"]) == [2, 8, 9, 10, 11]
    by_axis = _sort(g, ["defense.clean_ratio"])["defense.clean_ratio"]
    assert list(by_axis[:3]) == [50.0, 200.0, 1000.0] and by_axis[3:].isna().all()


def test_steps_whose_copies_disagree_between_trials_are_named_atop_the_report(tmp_path):
    """The clean-scale study's storage was lost between sessions and some chains were recomputed on another
    machine: trials sharing a round then carried different results for it, silently (51 steps, up to 28
    points of ASR). Rows of one step must agree across the trials that share it; the report says where not."""
    from tscray.report import recomputed_steps

    def chain(e: int, seed: int, shift: float) -> list[dict]:
        rows = [{**final_row("tsc", 89.0, 99.0, seed=seed, e=e, t=0.4), "stage": "backdoored", "round": 0,
                 "step_key": f"bd{seed}", "step_kind": "backdoor", "trial_id": f"{seed}-{e}"}]
        for r in range(1, e + 1):
            for stage, asr in (("stage1", 10.0), ("stage2", 60.0 / r + (shift if r == 1 else 0.0)), ("finetune", 50.0 / r)):
                rows.append({**final_row("tsc", 84.0, asr, seed=seed, e=e, t=0.4), "stage": stage, "round": r,
                             "step_key": f"r{seed}-{r}", "step_kind": "tsc_round", "trial_id": f"{seed}-{e}"})
        rows.append({**rows[-1], "stage": "final"})
        return rows

    same = pd.DataFrame([row for e in (1, 2, 3) for row in chain(e, 0, 0.0)])
    assert recomputed_steps(same).empty
    rep = make_report(same, tmp_path / "same", "png")
    assert not any("differ between the trials" in n for n in rep.notes)
    assert not (tmp_path / "same" / "recomputed_steps.csv").exists()

    mixed = pd.concat([same, pd.DataFrame([row for e in (4, 5) for row in chain(e, 0, 12.5)])])
    found = recomputed_steps(mixed)
    assert list(found.step_key) == ["r0-1"] and found.step_kind[0] == "tsc_round" and found.trials[0] == 5
    assert found.asr_spread[0] == 12.5 and found.acc_spread[0] == 0.0
    rep = make_report(mixed, tmp_path / "mixed", "png")
    note = next(n for n in rep.notes if "differ between the trials" in n)
    assert note.startswith("1 step(s)") and "tsc_round 1" in note and "up to 12.5 points" in note
    assert "differ between the trials" in rep.index.read_text()
    assert pd.read_csv(tmp_path / "mixed" / "recomputed_steps.csv").step_key.tolist() == ["r0-1"]


def test_figures_against_an_axis_read_frames_whose_index_repeats(tmp_path):
    """Rows concatenated from per-trial files repeat their index; with two field axes set on every final row
    ``fig_vs_<axis>`` read a cell by label and raised "truth value of a Series is ambiguous"."""
    rows = [final_row("tsc", 85.0, asr, seed=seed, e=3, t=0.4, **{"defense.clean_ratio": ratio,
                                                                    "defense.tsc.curve_steps": steps})
            for seed in (0, 1) for ratio, asr in ((0.02, 40.0), (0.25, 5.0)) for steps in (500.0, 2000.0)]
    df = pd.DataFrame(rows)
    df = pd.concat([df.iloc[:4], df.iloc[4:].reset_index(drop=True)])  # (indexes 0-3 twice)
    rep = make_report(df, tmp_path, "png")
    assert "fig_vs_defense.clean_ratio.png" in [p.name for p in rep.figures]
