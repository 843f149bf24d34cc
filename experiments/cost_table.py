"""The README's cost table: wall time per phase of every committed paper-scale cell.

    python experiments/cost_table.py artifacts/results [--k 32]

Reads cells/*/results.json and timings.json (no data, no model). Times are the cell's own
wall times ("other": what the cell ran besides the four phases, mostly --lr auto's held-out
sweep; "reused": a phase whose recording another cell made, e.g. seed 1's ZS on the trained
model, the test set not depending on the seed); `threads` is torch's thread count in that process (1-thread cells ran two at
a time on the 2 cores, so two such cells finish in the time of one).
"""

import argparse
import json
from pathlib import Path

PHASES = ("zs", "icl", "gd", "lcgd")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--k", type=int, default=32, help="only cells with this effective k (the paper's 32)")
    args = ap.parse_args()
    print("| model | baseline | task | seed | n-test | threads | ZS s | ICL s | GD s | LCGD s | other s | cell s | peak GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    cells = []
    for f in sorted(args.results.glob("cells/*/results.json")):
        r = json.loads(f.read_text())
        c, timing = r["config"], json.loads((f.parent / "timings.json").read_text())
        if c["k_effective"] != args.k or c.get("lr_rule") == "--lr" or "note" in timing:
            continue  # sweeps, other scales, and cells whose timings are not their own
        cells.append((r, c, timing))
    # A cell's timings.json lists the stages it reused; cells from before that list inherit
    # the phase time of the run that made the recording. Of the cells that could share a
    # recording (runner.stage_keys: same model, task and baseline; the same seed unless it is
    # the trained model's ZS) with an identical time (to 0.01 s) for a phase, the one that
    # ran longest made it.
    def share_key(c: dict, p: str, seconds: float) -> tuple:
        seed = None if (c["baseline"] == "trained" and p == "zs") else c["seed"]
        return (c["model"], c["task"], c["baseline"], seed, p, seconds)

    maker: dict[tuple, tuple[float, int]] = {}
    for i, (_, c, timing) in enumerate(cells):
        for p in PHASES:
            if timing.get(p) is not None and p not in timing.get("reused", ()):
                key = share_key(c, p, timing[p])
                maker[key] = max(maker.get(key, (-1.0, -1)), (timing["total"], i))
    rows = []
    for i, (r, c, timing) in enumerate(cells):
        reused = timing.get("reused") or [p for p in PHASES if timing.get(p) is not None
                                          and maker[share_key(c, p, timing[p])][1] != i]
        own = [None if p in reused else timing.get(p) for p in PHASES]
        other = timing["total"] - sum(t or 0 for t in own)  # --lr auto's held-out sweep, metrics, writing
        if other < 0 or not any(own):
            continue  # nothing of its own recorded (table 1's trained cells reuse table 2's stages)
        phases = ["reused" if p in reused else timing.get(p) for p in PHASES]
        rows.append((c["model"], c["baseline"], Path(c["task"]).stem, c["seed"], c["n_test_effective"],
                     r["environment"].get("threads"), *phases, other, timing["total"], timing.get("peak_rss_mb", 0) / 1024))
    # A Table 1 trained cell that recomputed a deleted Table 2 stage shares its first six
    # fields with the Table 2 cell; order those by cell time (phases mix numbers and "reused").
    for row in sorted(rows, key=lambda row: (row[:6], row[-2])):
        shown = [f"{v:.0f}" if isinstance(v, float) else "-" if v is None else str(v) for v in row[:-1]]
        print("| " + " | ".join(shown) + f" | {row[-1]:.1f} |")


if __name__ == "__main__":
    main()
