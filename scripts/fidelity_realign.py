"""Which part of a TSC round decides how much backdoor the stage-2 point keeps on a small clean set?

docs/fidelity/README.md, "Small clean sets": with the same number of curve updates, TSC on 200 clean images
ended with less backdoor than on 500. A round has three places where the clean set enters after the stage-1
curve: the images π is matched on (re-aligning the stage-1 point θt to the backdoored θp), the images the
stage-2 bend is fitted on, and the stage-1 curve that θt comes from. This probe holds all but one fixed.

- Matching: θt fixed, π matched on the defender's own set, then on supersets of it (the subsets share one
  seeded order, so 200 ⊂ 500 ⊂ 2,500). For each: the matched correlation, ‖π(θt) − θp‖ / ‖θp‖ and the
  ACC / ASR of the untrained stage-2 curve's point at t, the straight line (1 − t)·θp + t·π(θt).
- ``--fit``: θt and π (from the defender's set) fixed, the stage-2 bend fitted on each set at the sweep's
  budget; ACC / ASR of the point at t.
- ``--stage1-ratio``: θt taken from the stage-1 curve fitted at another clean-set size (crossing the two).

BatchNorm of θt is refreshed on its own stage-1 set, of every later point on the defender's set (the first
of ``--ratios``), as TSC does. It reads a sweep's stored steps: the round-1 stage-1 step of the attack.

    python scripts/fidelity_realign.py sweeps/preset_small_check.yaml --storage runs/preset_small_check \
        --attack lc --ratios 0.02 0.05 --fit
"""

from __future__ import annotations

import argparse
import sys

import torch

from tscray.config import load_spec
from tscray.curves import BezierCurve, fit
from tscray.defenses.tsc import _fit_batch, _match_batch, _step_config, curve_epochs, stage_seed
from tscray.plan import make_plan, root_step
from tscray.steps import Context
from tscray.store import Store
from tscray.symmetry import permute
from tscray.symmetry.match import correlations, matched_correlation, solve


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("spec")
    ap.add_argument("--storage", required=True)
    ap.add_argument("--attack", required=True)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.02, 0.05, 0.25],
                    help="clean ratios to match on (the first is the defender's own set)")
    ap.add_argument("--target", type=int, default=None, help="the backdoor's target class (default: any)")
    ap.add_argument("--fit", action="store_true",
                    help="also fit the stage-2 bend (the preset's budget, π from the defender's set) on each set")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="with --fit: offsets of the fit's seed (its batch order and t draws), to see its spread")
    ap.add_argument("--stage1-ratio", type=float, default=None,
                    help="take θt from the stage-1 curve fitted at this clean ratio (default: the first of --ratios)")
    ap.add_argument("--t", type=float, default=0.5, help="the curve index t of the sweep's TSC (default 0.5)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    spec = load_spec(args.spec, check_data=False)
    s1_ratio = args.ratios[0] if args.stage1_ratio is None else args.stage1_ratio
    store = Store(args.storage)
    steps = [s for s in make_plan(spec).steps.values()
             if s.kind == "tsc_stage1" and s.params["round"] == 1 and root_step(s).params["attack"] == args.attack
             and s.params["clean_ratio"] == s1_ratio and s.params["clean_seed"] == 0
             and (args.target is None or root_step(s).params["target"] == args.target)]
    stored = [s for s in steps if store.has_step(s.kind, s.key)]
    if not stored:
        print(f"no stored round-1 stage-1 step for {args.attack} at clean ratio {s1_ratio}", file=sys.stderr)
        return 2
    s1 = stored[0]
    ctx = Context(store)
    bd = root_step(s1)
    theta_p = ctx.load_model(bd, "model").eval()
    t = args.t
    cfg = _step_config(s1.params, t)
    s1_clean, method, evaluate = ctx.defense_env(s1)
    curve1 = ctx.load_curve(s1, theta_p, ctx.load_model(s1, "end"))
    theta_t = curve1.point(t, s1_clean.loader(cfg.batch_size, stage_seed(cfg, 1, 3))).eval()
    clean = ctx.clean(bd.params, args.ratios[0], 0)  # the defender's set: BatchNorm refresh of later points
    bn = clean.loader(cfg.batch_size, stage_seed(cfg, 1, 3))
    e_p, e_t = evaluate(theta_p), evaluate(theta_t)
    print(f"{args.attack}: θp ACC / ASR {e_p['acc']:.1f} / {e_p['asr']:.1f}; θt (t {t} on the stage-1 curve fitted "
          f"at clean ratio {s1_ratio}) {e_t['acc']:.1f} / {e_t['asr']:.1f}")
    norm = float(_flat(theta_p).norm())
    print("| matched on | images | matched corr. | ‖π(θt) − θp‖ / ‖θp‖ | line point at t: ACC / ASR |")
    print("|---|---|---|---|---|")
    own: dict[str, torch.Tensor] = {}
    for ratio in args.ratios:
        sub = ctx.clean(bd.params, ratio, 0)
        corr = correlations(theta_p, theta_t, sub.loader(_match_batch(cfg), stage_seed(cfg, 1, 2), shuffle=False),
                            cfg.probes, cfg.match_batches)
        perm = {g: solve(c, "align") for g, c in corr.items()}
        own = own or perm
        aligned = permute(theta_t, perm)
        line = BezierCurve(theta_p, aligned).point(t, bn)  # untrained bend: the straight line
        r = evaluate(line)
        dist = float((_flat(aligned) - _flat(theta_p)).norm()) / norm
        print(f"| {'own set' if ratio == args.ratios[0] else 'superset'} | {len(sub.data)} | "
              f"{matched_correlation(corr, perm):.3f} | {dist:.3f} | {r['acc']:.1f} / {r['asr']:.1f} |")
    if args.fit:
        aligned = permute(theta_t, own)
        print(f"\nThe stage-2 bend fitted on each set ({cfg.curve_steps or cfg.curve_epochs} "
              f"{'updates' if cfg.curve_steps else 'epochs'}, θt and π fixed):")
        print("| fitted on | images | epochs | seed offset | stage-2 point: ACC / ASR | BN refreshed on the fit set |")
        print("|---|---|---|---|---|---|")
        for ratio in args.ratios:
            sub = ctx.clean(bd.params, ratio, 0)
            for k in args.seeds:
                seed = stage_seed(cfg, 1, 2) + 7919 * k
                loader = sub.loader(_fit_batch(cfg), seed)
                epochs = curve_epochs(cfg, len(loader))
                curve = fit(BezierCurve(theta_p, aligned), loader, method, epochs, cfg.curve_optim, seed)
                a = evaluate(curve.point(t, bn))
                b = evaluate(curve.point(t, sub.loader(cfg.batch_size, stage_seed(cfg, 1, 3))))
                print(f"| {'own set' if ratio == args.ratios[0] else 'superset'} | {len(sub.data)} | {epochs} | {k} | "
                      f"{a['acc']:.1f} / {a['asr']:.1f} | {b['acc']:.1f} / {b['asr']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
