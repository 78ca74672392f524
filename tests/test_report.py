import numpy as np
import pandas as pd
import pytest

from tscray.cli import main
from tscray.report import make_report


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
    rep = make_report(df, tmp_path, "png")
    names = sorted(p.name for p in rep.figures)
    assert "fig5_tsc_vs_t.png" in names
    assert sum(n.startswith("fig3_") for n in names) == 4  # 2 attacks x 2 seeds
    assert all(p.stat().st_size > 10_000 for p in rep.figures)
    assert any("Figure 6" in s for s in rep.skipped)
    table = pd.read_csv(tmp_path / "table1.csv")
    row = table[(table.attack == "badnets") & (table.defense_label == "tsc (E=2, t=0.4)")].iloc[0]
    src = df[(df.attack == "badnets") & (df.defense == "tsc") & (df.e_tsc == 2) & (df.t == 0.4) & (df.stage == "final")]
    assert row.asr == pytest.approx(src.asr.mean(), abs=0.01) and row.seeds == 2
    assert bool(row.success) == (src.asr.mean() < 15)
    md = (tmp_path / "table1.md").read_text()
    assert "✓" in md and "no defense" in md and "90.00 / 99.00" in md
    html = rep.index.read_text()
    assert all(p.name in html for p in rep.figures) and "<table>" in html


def test_svg_and_pdf_formats(tmp_path):
    for fmt in ("svg", "pdf"):
        rep = make_report(synthetic_rows(), tmp_path / fmt, fmt)
        assert all(p.suffix == f".{fmt}" for p in rep.figures)


def test_partial_sweep_draws_what_it_can(tmp_path):
    df = synthetic_rows()
    df = df[(df.defense == "none") | ((df.defense == "tsc") & (df.stage == "final") & (df.e_tsc == 1))]
    rep = make_report(df, tmp_path)
    assert [p.name for p in rep.figures] == ["fig5_tsc_vs_t.png"]
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


@pytest.mark.parametrize("name", ["quickstart", "ablation", "ablation_small", "table1", "attacks_small",
                                  "ablation_ssl", "ablation_ssl_small", "attacks_small_long"])
def test_shipped_sweeps_dry_run(name, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TSCRAY_DATA", str(tmp_path))
    assert main(["sweep", f"sweeps/{name}.yaml", "--dry-run", "--storage", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "trials" in out and "curve fits" in out
    assert not (tmp_path / "s").exists()
