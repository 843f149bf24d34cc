"""Progress bars (progress.py): drawn on a terminal, silent with --quiet."""

import copy
import io

from lens_iclgd import progress
from lens_iclgd.finetune import train
from lens_iclgd.prompts import build_prompts
from lens_iclgd.recording import record
from lens_iclgd.tasks import load_task


def _prompts(lm, sst2_rows, k=3, n_test=6):
    return build_prompts(lm.model, load_task("sst2"), sst2_rows["train"], sst2_rows["validation"], k=k, seed=0, n_test=n_test)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_draw_on_a_terminal_unless_quiet(gqa_model, sst2_rows, monkeypatch):
    p = _prompts(gqa_model, sst2_rows)
    for quiet in (False, True):
        term = _Terminal()
        monkeypatch.setattr("sys.stderr", term)
        monkeypatch.setenv("TQDM_DISABLE", "1")  # the CLI's setting for third-party bars
        progress.set_quiet(quiet)
        try:
            record(gqa_model.model, p.zs_prefix(), p.queries, p.options, batch_size=2)
            train(copy.deepcopy(gqa_model.model), p.demos, p.bos, "gd", 0.01, False)
        finally:
            progress.set_quiet(False)
        drawn = term.getvalue()
        assert (("recording" in drawn and "gd training" in drawn) if not quiet else drawn == ""), drawn
