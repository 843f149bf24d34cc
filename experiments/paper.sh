#!/usr/bin/env bash
# The paper grids for the default model, in the order they depend on each other, and the
# report under artifacts/. Resumable: rerun after an interruption and finished cells are
# skipped. About 2 hours on a 2-core CPU (README, "Paper experiments").
#   experiments/paper.sh [DATA_DIR] [RESULTS_DIR]
# With --update-lrs as first argument, the learning rates chosen from the lr_sweep are
# written to lens_iclgd/learning_rates.toml before the grids that use the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
update_lrs=0
if [ "${1:-}" = "--update-lrs" ]; then update_lrs=1; shift; fi
data=${1:-../shared/data}
results=${2:-runs/paper}
cli=${CLI:-.venv/bin/lens-iclgd}

$cli grid experiments/lr_sweep.toml --data-dir "$data" --results "$results"
$cli report "$results" --out "$results/report_lr"
if [ $update_lrs = 1 ]; then
  { sed -n '1,3p' lens_iclgd/learning_rates.toml; echo; cat "$results/report_lr/chosen_learning_rates.toml"; } > lens_iclgd/learning_rates.toml.new
  mv lens_iclgd/learning_rates.toml.new lens_iclgd/learning_rates.toml
fi
for name in table2 table1 ablation; do
  $cli grid "experiments/$name.toml" --data-dir "$data" --results "$results"
done
$cli report "$results" --out artifacts/report --command-line "experiments/paper.sh $data $results"
