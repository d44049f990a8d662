"""The model card: one JSON file per weights version (read by the plugin and served by
ListPlugins), rendered as Markdown for people."""

from __future__ import annotations

import json
from pathlib import Path

from dxserve.runtime import sha256_of

WEIGHTS_FILE = "model.keras"
CARD_FILE = "model_card.json"
CARD_MARKDOWN = "MODEL_CARD.md"

DATA = {
    "name": "C-NMC 2019 (ALL Challenge dataset of ISBI 2019), developer subset",
    "license": "CC BY 3.0",
    "citation": "Gupta, A., & Gupta, R. (2019). ALL Challenge dataset of ISBI 2019 [Data set]. "
    "The Cancer Imaging Archive. https://doi.org/10.7937/tcia.2019.dc64i46r",
    "description": "Segmented single B-lymphoid cells on black, 450x450 px, stain-normalised by the "
    "dataset creators (SBI Lab, IIIT-Delhi; AIIMS New Delhi); expert-labelled leukemic blasts (all) "
    "and normal precursors (hem).",
}
INTENDED_USE = (
    "Research use only. Flags single segmented white-blood-cell images as lymphoblast or normal "
    "B-lymphoid precursor to support, never replace, review by a qualified haematologist. Not a "
    "stand-alone diagnosis and not a cleared medical device."
)
LIMITATIONS = [
    "Trained on one laboratory's stain-normalised images; other stains, microscopes and "
    "segmentation pipelines shift the input distribution (preprocessing crops to the cell and "
    "normalises its mean colour, which reduces but does not remove the shift).",
    "The normal class rests mainly on two subjects (H10, H22); specificity on new healthy "
    "subjects is estimated from few of them and varies widely across folds.",
    "Expects one segmented cell on a black background; whole smears, clumps or unsegmented "
    "crops are out of scope.",
    "The cell's size in pixels is an input: images must be at the C-NMC magnification. At 0.8x or "
    "1.25x the decision changes for many cells (benchmarks/robustness.py measures how many).",
    "Calibration and the indeterminate band were fitted on held-out subjects of the same data "
    "set; on other data they may no longer hold.",
]


def read_card(version_dir: Path) -> dict:
    return json.loads((version_dir / CARD_FILE).read_text())


def write_card(version_dir: Path, card: dict) -> None:
    """Write the JSON card (with the weights' hash and size) and its Markdown rendering."""
    weights = version_dir / WEIGHTS_FILE
    card = {**card, "weights": {"file": WEIGHTS_FILE, "sha256": sha256_of(weights), "bytes": weights.stat().st_size}}
    (version_dir / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    (version_dir / CARD_MARKDOWN).write_text(render_markdown(card))


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def render_markdown(card: dict) -> str:
    """A readable card: what it is, how it was trained and checked, how far to trust it."""
    cv = card["evaluation"]["across_folds"]
    pooled = card["evaluation"]["pooled_out_of_fold"]
    th = card["thresholds"]
    lines = [
        f"# Model card: lymphoblast classifier {card['version']}",
        "",
        f"- **Weights:** `{card['weights']['file']}`, {card['weights']['bytes'] / 1e6:.1f} MB, "
        f"SHA-256 `{card['weights']['sha256']}`",
        f"- **Trained:** {card['trained_at']} in {card['training_seconds'] / 60:.0f} min on {card['machine']}",
        f"- **Command:** `{card['command']}`",
        f"- **Architecture:** {card['architecture']}",
        "",
        "## Intended use",
        "",
        card["intended_use"],
        "",
        "## Data",
        "",
        f"{card['data']['name']}. {card['data']['description']} License: {card['data']['license']}. "
        f"Cite: {card['data']['citation']}",
        "",
        f"{card['data']['images']} images ({card['data']['lymphoblasts']} lymphoblast, {card['data']['normals']} normal) "
        f"from {card['data']['subjects']} subjects in {card['data']['subject_groups']} subject groups.",
        "",
        "## Evaluation protocol",
        "",
        card["evaluation"]["protocol"],
        "",
        "| metric | mean | std | min | max |",
        "|---|---|---|---|---|",
    ]
    for name, s in cv.items():
        lines.append(f"| {name} | {s['mean']:.3f} | {s['std']:.3f} | {s['min']:.3f} | {s['max']:.3f} |")
    lines += [
        "",
        "Pooled out-of-fold predictions (every image predicted by a model that never saw its subject), "
        f"at the operating point: weighted F1 {_pct(pooled['weighted_f1'])}, sensitivity {_pct(pooled['sensitivity'])}, "
        f"specificity {_pct(pooled['specificity'])}, AUROC {_pct(pooled['auroc'])}, ECE {_pct(pooled['ece'])}, "
        f"indeterminate {_pct(pooled.get('indeterminate_fraction'))}, accuracy of decided results "
        f"{_pct(pooled.get('decided_accuracy'))}.",
        "",
        "| fold | test subjects | images | weighted F1 | AUROC | sensitivity | specificity | ECE before | ECE after | T |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in card["evaluation"]["folds"]:
        lines.append(
            f"| {f['fold']} | {len(f['per_subject'])} | {f['images']} | {f['weighted_f1']:.3f} | {_pct(f['auroc'])} | "
            f"{f['sensitivity']:.3f} | {f['specificity']:.3f} | {f['ece_uncalibrated']:.3f} | {f['ece']:.3f} | {f['temperature']:.2f} |"
        )
    lines += [
        "",
        "## Calibration and decision rule",
        "",
        f"Temperature scaling, T = {card['calibration']['temperature']:.3f}, fitted on "
        f"{card['calibration'].get('fitted_on', 'held-out subjects')}. Served probabilities are calibrated.",
        "",
        f"- Operating point: P(lymphoblast) >= {th['operating_point']:.3f}, chosen on pooled out-of-fold "
        f"predictions for sensitivity >= {th['target_sensitivity']:.2f}.",
        f"- Indeterminate band: {th['lower']:.3f} <= P(lymphoblast) < {th['upper']:.3f}; results there are "
        "returned as indeterminate, for a person to review.",
        "",
        "## Per-subject results (pooled out-of-fold)",
        "",
        "| subject | label | images | accuracy | mean P(lymphoblast) |",
        "|---|---|---|---|---|",
    ]
    for s, r in pooled["per_subject"].items():
        lines.append(f"| {s} | {r['label']} | {r['images']} | {r['accuracy']:.3f} | {r['mean_p_lymphoblast']:.3f} |")
    lines += ["", "## Limitations", ""] + [f"- {item}" for item in card["limitations"]]
    return "\n".join(lines) + "\n"
