"""The paper's findings as data: what the paper claims, the rule that decides whether a
set of results agrees, the numbers it rests on, and the verdict.

report.py computes them from one model's cells; the per-model report and the
cross-model verdict table (crossmodel.py) both render these objects, so a verdict is
never parsed back out of text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# A setting (ICL, GD, LCGD) predicting one label on at least this share of its predictions
# has collapsed: its "effect" is the collapse, not the task. Shen et al.'s order claims and
# the causal study's overlaps both leave such tasks out, and name them.
COLLAPSED_SHARE = 0.95

VERDICTS = ("agrees", "partly agrees", "does not agree", "depends on the rate", "not available")


@dataclass(frozen=True)
class Claim:
    number: int
    name: str  # short, for tables
    claim: str  # the paper's claim, in one sentence
    rule: str  # how the verdict is decided, with its thresholds


CLAIMS = {
    1: Claim(1, "SimAOU alone is no evidence",
             "Models with re-initialised weights score SimAOU (GD) as high as the trained model, so a high SimAOU "
             "alone does not show that ICL behaves like GD.",
             "agrees when every re-initialised baseline's mean SimAOU is at least the trained model's minus 0.05 "
             "(GD, on the task-seed pairs run for every baseline)"),
    2: Claim(2, "SimAOU_norm inflates similarity",
             "Normalising the updates before comparing them (SimAOU_norm, as Dai et al. did) makes ICL and GD look "
             "more alike than the unnormalised SimAOU does.",
             "agrees when SimAOU_norm - SimAOU is positive on average and in more than half of the cell-methods"),
    3: Claim(3, "LCGD more ICL-like than GD",
             "Layer-causal GD is more similar to ICL than vanilla GD by SimAM_delta, and alpha (SimAM_delta "
             "between LCGD's and GD's own attention-score updates) is only about 0.1-0.2.",
             "agrees when LCGD's SimAM_delta is above GD's on more than half of the tasks and the mean alpha lies in "
             "[0.05, 0.3]; partly agrees when one of the two holds"),
    4: Claim(4, "LCGD's gradients are larger",
             "LCGD's per-layer gradients are several times larger than GD's (each layer gets its own loss).",
             "agrees when LCGD's per-layer gradient norms average more than 2x GD's"),
}


@dataclass(frozen=True)
class Finding:
    number: int
    verdict: str  # one of VERDICTS
    evidence: str  # the numbers the verdict rests on, in words
    numbers: dict[str, float] = field(default_factory=dict)
    scope: str = ""  # which cells (e.g. "at the chosen learning rates")

    @property
    def claim(self) -> Claim:
        return CLAIMS[self.number]

    def markdown(self) -> str:
        """One list item: name, claim, rule, evidence, verdict."""
        c = self.claim
        if self.verdict == "not available":
            return f"{c.number}. **{c.name}**: {self.evidence}"
        return (f"{c.number}. **{c.name}.** Paper: {c.claim} Rule: {c.rule}. Here: {self.evidence} "
                f"-> **{self.verdict}**.")


def unavailable(number: int, why: str) -> Finding:
    return Finding(number, "not available", why)
