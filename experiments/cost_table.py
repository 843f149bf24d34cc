"""The cost table on stdout (the report writes the same to cost_table.md):

    python experiments/cost_table.py artifacts/results [--k 32]
"""

import argparse
from pathlib import Path

from lens_iclgd.costs import HEADER, cost_rows

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--k", type=int, default=32, help="only cells with this effective k (the paper's 32)")
    args = ap.parse_args()
    print("\n".join(HEADER + cost_rows(args.results, args.k)))
