"""The specimen-level rule: from one specimen's called cells to "blast-like cells predominate",
"no excess of blast-like cells", or indeterminate.

Decision support for the person who reviews the smear, not a diagnosis: a leukaemia is
diagnosed from the whole marrow or blood picture, immunophenotyping and more. The rule
uses the fraction of called cells (indeterminate and gate-refused cells left out) that were
called lymphoblast, with its 95 % Wilson score interval, so a specimen of 12 cells cannot
look as certain as one of 400:

- fewer than `min_called` called cells: indeterminate (too few to say);
- interval's lower end >= `positive_at_least`: "lymphoblast" (blast-like cells predominate);
- interval's upper end < `negative_below`: "normal" (no excess of blast-like cells);
- otherwise indeterminate.

The thresholds are versioned with the model (its card's `specimen`), with the rule's
outcome on every developer subject's out-of-fold predictions (`evaluate`).
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dxserve import Decision, SpecimenCounts
from dxserve.runtime import INDETERMINATE

from .calibration import Thresholds, calibrated

BLAST, NORMAL = "lymphoblast", "normal"


@dataclass(frozen=True)
class SpecimenRule:
    min_called: int = 20
    positive_at_least: float = 0.5
    negative_below: float = 0.5
    confidence: float = 0.95

    def describe(self, version: str) -> str:
        return (f"blast-like cells predominate when the {self.confidence:.0%} Wilson interval of the called blast fraction "
                f"lies at or above {self.positive_at_least:.2f}, no excess when it lies below {self.negative_below:.2f}, "
                f"else indeterminate; at least {self.min_called} called cells (model {version})")

    def decide(self, counts: SpecimenCounts, version: str) -> Decision:
        rule = self.describe(version)
        n = counts.total_called
        if n < self.min_called:
            return Decision(INDETERMINATE, True, f"{n} called cells, fewer than the {self.min_called} the rule needs", rule=rule)
        fraction, low, high = counts.fraction(BLAST, self.confidence)
        measured = f"blast fraction {fraction:.2f} [{low:.2f}, {high:.2f}] of {n} called cells"
        if low >= self.positive_at_least:
            return Decision(BLAST, False, f"blast-like cells predominate: {measured}; review the specimen", rule=rule)
        if high < self.negative_below:
            return Decision(NORMAL, False, f"no excess of blast-like cells: {measured}", rule=rule)
        return Decision(INDETERMINATE, True, f"{measured}: the interval straddles the thresholds; review the specimen", rule=rule)


def evaluate(rule: SpecimenRule, subjects: list[str], labels: list[str], calls: list[str], version: str) -> dict:
    """The rule applied to each subject's cells as one specimen: outcome counts per true
    label, and per subject (its label, called cells, blast fraction, the specimen call)."""
    per_subject, outcomes = {}, {BLAST: Counter(), NORMAL: Counter()}
    for subject in sorted(set(subjects), key=lambda s: (s[0], int(s[1:]) if s[1:].isdigit() else s)):
        mine = [c for s, c in zip(subjects, calls, strict=True) if s == subject]
        label = next(l for s, l in zip(subjects, labels, strict=True) if s == subject)
        counted = Counter(mine)
        counts = SpecimenCounts(len(mine), 0, len(mine), counted[INDETERMINATE], {BLAST: counted[BLAST], NORMAL: counted[NORMAL]})
        decision = rule.decide(counts, version)
        outcomes[label][decision.label] += 1
        per_subject[subject] = {"label": label, "cells": len(mine), "called": counts.total_called,
                                "blast_fraction": round(counts.fraction(BLAST)[0], 3), "specimen_call": decision.label}
    return {"rule": asdict(rule), "outcomes_by_true_label": {k: dict(v) for k, v in outcomes.items()}, "per_subject": per_subject}


def evaluate_out_of_fold(rule: SpecimenRule, card: dict, out_of_fold: Path) -> dict:
    """`evaluate` on a version's out-of-fold predictions (`out_of_fold.csv`), each cell called
    with the version's own logit (its number of views), temperature and thresholds."""
    column = "logit: model, 8-view averaging" if int(card["input"].get("views", 1)) == 8 else "logit: model"
    with out_of_fold.open() as f:
        rows = list(csv.DictReader(f))
    p_blast = calibrated(np.array([float(r[column]) for r in rows]), float(card["calibration"]["temperature"]))
    coded = Thresholds(**card["thresholds"]).decide(p_blast)
    calls = [BLAST if c == 1 else NORMAL if c == 0 else INDETERMINATE for c in coded]
    result = evaluate(rule, [r["subject"] for r in rows], [r["label"] for r in rows], calls, card["version"])
    result["evaluated_on"] = (f"each developer subject's cells as one specimen, from the pooled out-of-fold predictions "
                              f"({out_of_fold.name}; every cell called by a model that never saw its subject); the quality "
                              "gate is not applied")
    return result
