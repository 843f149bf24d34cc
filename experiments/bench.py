"""Benchmark the optimised pipeline against the naive reference on one cell.

    python experiments/bench.py --data-dir ../shared/data            # SST-2, k 16, n-test 100
    python experiments/bench.py --data-dir ../shared/data --n-test 20 --k 4

Same as `lens-iclgd bench`; the last line of the output is `speedup: <ratio>`.
"""

import sys

from lens_iclgd.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
