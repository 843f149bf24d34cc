#!/usr/bin/env bash
# gemma-3-270m's paper grids (k 16), in the order they depend on each other. Finished
# cells go to artifacts/results (committed: results.json + timings.json only), recordings
# to SCRATCH_DIR; the report under artifacts/report covers every committed cell.
# Resumable: rerun after an interruption and finished cells are skipped. About 2 hours on
# a 2-core CPU (docs/paper-study.md).
#   experiments/paper.sh [DATA_DIR] [SCRATCH_DIR]
# With --update-lrs as first argument it stops after the lr_sweep and says where the
# chosen learning rates are (to copy into lens_iclgd/learning_rates.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
update_lrs=0
if [ "${1:-}" = "--update-lrs" ]; then update_lrs=1; shift; fi
data=${1:-../shared/data}
results=artifacts/results
scratch=${2:-runs/scratch}
cli=${CLI:-.venv/bin/lens-iclgd}

$cli grid experiments/lr_sweep.toml --data-dir "$data" --results "$results" --scratch "$scratch"
$cli report "$results" --out "$scratch/report_lr"
if [ $update_lrs = 1 ]; then  # the other models' tables in learning_rates.toml stay as they are
  echo "chosen rates: $scratch/report_lr/*chosen_learning_rates.toml; copy gemma-3-270m's tables into lens_iclgd/learning_rates.toml, then rerun without --update-lrs"
  exit 0
fi
for name in table2 table1 ablation; do
  $cli grid "experiments/$name.toml" --data-dir "$data" --results "$results" --scratch "$scratch"
done
$cli report "$results" --out artifacts/report --icl-gain-out artifacts/icl_gain --command-line "experiments/paper.sh $data $scratch"
