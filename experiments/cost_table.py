"""The README's cost table: wall time per phase of every committed paper-scale cell.

    python experiments/cost_table.py artifacts/results [--k 32]

Reads cells/*/results.json and timings.json (no data, no model). Times are the cell's own
wall times ("other": what the cell ran besides the four phases, mostly --lr auto's held-out
sweep); `threads` is torch's thread count in that process (1-thread cells ran two at
a time on the 2 cores, so two such cells finish in the time of one).
"""

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--k", type=int, default=32, help="only cells with this effective k (the paper's 32)")
    args = ap.parse_args()
    print("| model | baseline | task | seed | n-test | threads | ZS s | ICL s | GD s | LCGD s | other s | cell s | peak GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for f in sorted(args.results.glob("cells/*/results.json")):
        r = json.loads(f.read_text())
        c, timing = r["config"], json.loads((f.parent / "timings.json").read_text())
        if c["k_effective"] != args.k or c.get("lr_rule") == "--lr" or "note" in timing:
            continue  # sweeps, other scales, and cells whose timings are not their own
        phases = [timing.get(p) for p in ("zs", "icl", "gd", "lcgd")]
        other = timing["total"] - sum(p or 0 for p in phases)  # --lr auto's held-out sweep, metrics, writing
        if other < 0:
            continue  # its recordings were another cell's (table 1's trained cells): not its own cost
        rows.append((c["model"], c["baseline"], Path(c["task"]).stem, c["seed"], c["n_test_effective"],
                     r["environment"].get("threads"), *phases, other, timing["total"], timing.get("peak_rss_mb", 0) / 1024))
    for row in sorted(rows):
        cells = [f"{v:.0f}" if isinstance(v, float) else "-" if v is None else str(v) for v in row[:-1]]
        print("| " + " | ".join(cells) + f" | {row[-1]:.1f} |")


if __name__ == "__main__":
    main()
