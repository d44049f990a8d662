"""The codes and the words dxserve's hospital reports share (FHIR in fhir.py, HL7 v2 in
hl7v2.py): one table of codes, and the report's conclusion.

No LOINC code is used for what the model reports: LOINC's blast and leukocyte counts mean a
laboratory's count of a smear, and a model's share of the segmented cells it was sent is not
that. So each quantity has a code in dxserve's own code system, published as a FHIR
CodeSystem resource (`fhir.code_system()`, docs/fhir/CodeSystem-dxserve.json); an integrator
may map them to their lab's codes. The standard codes used beside them (FHIR observation
category, HL7 table 0074 section, UCUM units, the AI Transparency security label) are listed
in docs/hospital-integration.md.
"""

from __future__ import annotations

from .client import Specimen

#: The canonical URL of dxserve's code system (FHIR Coding.system).
SYSTEM = "urn:dxserve:fhir:CodeSystem:dxserve"
#: The same code system's name in HL7 v2 coded elements (a local "99zzz" name, HL7 table 0396).
HL7_SYSTEM = "99DXS"

#: code -> (display, definition)
CODES: dict[str, tuple[str, str]] = {
    "specimen-report": ("dxserve specimen classification report",
                        "The cells of one specimen classified by a dxserve plugin model: decision support for a person "
                        "reviewing the specimen, not a diagnosis."),
    "cells-seen": ("Cells sent", "Images of single cells of the specimen sent to the model."),
    "cells-failed": ("Cells failed", "Images that could not be classified (unreadable, refused); no label."),
    "cells-passed-gate": ("Cells passing the quality gate", "Images that passed the plugin's input quality gate."),
    "cells-indeterminate": ("Cells indeterminate", "Classified images the decision rule declined to label."),
    "label-fraction": ("Fraction of called cells with a label",
                       "Cells the model labelled with one label, as a percentage of the cells it labelled (called), "
                       "with a 95 % Wilson interval. Model-derived; not a laboratory cell count."),
    "label": ("Label", "The label a label-fraction observation counts."),
    "label-count": ("Cells with the label", "Number of called cells with the label."),
    "ci-low": ("95 % interval, lower bound", "Lower bound of the 95 % Wilson interval of the fraction."),
    "ci-high": ("95 % interval, upper bound", "Upper bound of the 95 % Wilson interval of the fraction."),
    "specimen-call": ("Specimen call", "The plugin's specimen-level label under its versioned rule, or indeterminate."),
    "cell-classification": ("Cell classification",
                            "One cell image's decided label (or indeterminate) with its calibrated confidence."),
    "confidence": ("Calibrated confidence", "The calibrated probability of the cell's top label."),
    "screen-positive": ("Screen positive", "The cell reaches the plugin's high-sensitivity screening threshold: review."),
}


def display(code: str) -> str:
    return CODES[code][0]


NOT_A_DIAGNOSIS = "Decision support for a person reviewing the specimen, not a diagnosis."


def report_conclusion(summary: Specimen) -> str:
    """The report's conclusion in words: the call and why, the counts, and what it is not."""
    call = f"Specimen call: {summary.call} ({summary.call_reason.rstrip('.')})." if summary.call else "No specimen call."
    return (f"{call} {summary.cells_seen} cells sent, {summary.cells_passed_gate} passed the quality gate, "
            f"{summary.indeterminate} indeterminate, {summary.cells_failed} failed. {NOT_A_DIAGNOSIS}")
