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
    "segmentation pipelines shift the input distribution. Preprocessing crops to the cell, so "
    "canvas and position do not matter, but 2.x does not normalise colour: a white-balance cast "
    "moves P(lymphoblast) by 0.105 on average and blur by 0.078 (benchmarks/robustness.py).",
    "The normal class has 1470 images of 28 subject IDs, but two of them (H10, H22) hold 53 % of "
    "those images, and some normal subjects (H10 above all, also H40, H9) look blast-like to every "
    "model tried: specificity on new healthy subjects varies widely across folds.",
    "The CNN is a small ImageNet backbone (MobileNet v1 alpha 0.25); in subject-grouped "
    "cross-validation on this developer set it adds little over the cell's size alone (see the "
    "comparison table): read those figures as a ranking of recipes, not as expected accuracy.",
    "Expects one segmented cell on a black background; whole smears, clumps or unsegmented "
    "crops are out of scope.",
    "The cell's size in pixels is an input: images must be at the C-NMC magnification. At 0.8x or "
    "1.25x the decision changes for many cells (benchmarks/robustness.py measures how many).",
    "Calibration and the indeterminate band were fitted on held-out subjects of the same data "
    "set; on other data they may no longer hold.",
]


def read_card(version_dir: Path) -> dict:
    return json.loads((version_dir / CARD_FILE).read_text())


def write_card(version_dir: Path, card: dict, weights_file: str = WEIGHTS_FILE) -> None:
    """Write the JSON card (with the weights' hash and size) and its Markdown rendering.
    `weights_file` is relative to the version's folder: another version's file when two
    versions share weights and differ in how they are served."""
    weights = version_dir / weights_file
    card = {**card, "weights": {"file": weights_file, "sha256": sha256_of(weights), "bytes": weights.stat().st_size}}
    (version_dir / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    (version_dir / CARD_MARKDOWN).write_text(render_markdown(card))


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _ci(interval) -> str:
    return f"[{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "n/a"


def _prior_note(data: dict) -> str:
    """What the calibrated probability is relative to: the training data's mix of the two classes."""
    prior, other = data["lymphoblasts"] / data["images"], 0.2
    odds = (other / (1 - other)) / (prior / (1 - prior))  # P = 0.5 here, at `other`'s mix
    return (f"The probabilities are calibrated at the developer set's mix of cells, {prior * 100:.0f} % lymphoblasts. Where blasts "
            f"make up another share of the cells, the odds of P(lymphoblast) scale by the ratio of that share's odds to "
            f"this one's: at {other * 100:.0f} % blasts, P = 0.50 here stands for {odds / (1 + odds):.2f}. The call and the "
            "screen thresholds below are on this scale.")


def render_markdown(card: dict) -> str:
    """A readable card: what it is, how it was trained and checked, how far to trust it."""
    evaluation = card["evaluation"]
    pooled = evaluation["pooled_out_of_fold"]
    th = card["thresholds"]
    init = card.get("initialisation") or {}
    lines = [
        f"# Model card: lymphoblast classifier {card['version']}",
        "",
        f"- **Weights:** `{card['weights']['file']}`, {card['weights']['bytes'] / 1e6:.1f} MB, "
        f"SHA-256 `{card['weights']['sha256']}`",
        *([f"- **Served on LiteRT:** `{card['litert']['file']}`, {card['litert']['bytes'] / 1e6:.1f} MB, SHA-256 "
           f"`{card['litert']['sha256']}` (verified before loading; {card['litert']['converted_with']}; logits equal to the "
           f"Keras model's to {card['litert']['max_abs_logit_difference']:.1e} on {card['litert']['checked_on']})"]
          if "litert" in card else []),
        f"- **Trained:** {card['trained_at']} in {card['training_seconds'] / 60:.0f} min on {card['machine']}",
        f"- **Command:** `{card['command']}`",
        f"- **Architecture:** {card['architecture']}",
        f"- **Initialisation:** {init.get('source', 'random')}"
        + (f", file `{init['file']}`, SHA-256 `{init['sha256']}` (verified before loading)" if init.get("sha256") else ""),
        f"- **Served:** {card['input'].get('views', 1)} orientation(s) of the cell averaged per result",
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
        evaluation["protocol"],
        "",
    ]
    if "candidates" in evaluation:
        lines += [
            "## This model beside the reference recipes, in the same folds",
            "",
            "Cross-validation on this developer set is pessimistic (some normal subjects, H10 above all, look "
            "blast-like to every model tried): read it to rank recipes against each other, not as an absolute bar.",
            "",
            "| recipe | pooled AUROC (95 % CI over subjects) | pooled weighted F1 (95 % CI) | AUROC per fold | weighted F1 per fold |",
            "|---|---|---|---|---|",
        ]
        for name, c in evaluation["candidates"].items():
            b, p = c["bootstrap_over_subjects"], c["pooled_out_of_fold"]
            lines.append(
                f"| {name} | {_pct(p['auroc'])} {_ci(b['auroc_95ci'])} | {p['weighted_f1']:.3f} {_ci(b['weighted_f1_95ci'])} | "
                + " ".join(_pct(f["auroc"]) for f in c["folds"]) + " | " + " ".join(f"{f['weighted_f1']:.3f}" for f in c["folds"]) + " |"
            )
        lines += ["", "Differences, model - reference (pooled; per fold; folds where the model is better):", "",
                  "| reference | AUROC | weighted F1 |", "|---|---|---|"]
        for name, v in evaluation["versus_baselines"].items():
            cell = [f"{v[m]['pooled']:+.3f}; " + " ".join(f"{d:+.3f}" for d in v[m]["per_fold"]) +
                    f"; {v[m]['folds_better']}/{len(v[m]['per_fold'])}" for m in ("auroc", "weighted_f1")]
            lines.append(f"| {name} | {cell[0]} | {cell[1]} |")
        lines.append("")
    lines += [
        "## This model, per fold",
        "",
        "| fold | images | weighted F1 | AUROC | sensitivity | specificity | ECE before | ECE after | ECE floor | T |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in evaluation["folds"]:
        lines.append(
            f"| {f['fold']} | {f['images']} | {f['weighted_f1']:.3f} | {_pct(f['auroc'])} | {f['sensitivity']:.3f} | "
            f"{f['specificity']:.3f} | {f['ece_uncalibrated']:.3f} | {f['ece']:.3f} | {_pct(f.get('ece_floor'))} | {f['temperature']:.2f} |"
        )
    if "ece_floor" in evaluation.get("across_folds", {}):
        ece, floor = evaluation["across_folds"]["ece"], evaluation["across_folds"]["ece_floor"]
        lines += ["", f"Mean per-fold ECE after calibration (each fold calibrated without its subjects) {ece['mean']:.3f} "
                  f"(range {ece['min']:.3f}-{ece['max']:.3f}); a perfectly calibrated model with these confidences would "
                  f"show {floor['mean']:.3f} on folds of these sizes (the ECE floor: binned ECE is biased upwards by sampling noise)."]
    if against := evaluation.get("versus_previous"):
        n, better = len(against["folds"]), against["folds_better"]
        lines += ["", f"### Against {against['version']}, the version it replaces, in the same folds", "",
                  "| fold | AUROC (this / " + against["version"] + ") | weighted F1 | ECE |", "|---|---|---|---|"]
        lines += [f"| {k + 1} | " + " | ".join(f"{f[m][0]:.3f} / {f[m][1]:.3f}" for m in ("auroc", "weighted_f1", "ece")) + " |"
                  for k, f in enumerate(against["folds"])]
        lines += ["", f"Better in {better['auroc']}/{n} folds in AUROC, {better['weighted_f1']}/{n} in weighted F1 and "
                  f"{better['ece']}/{n} in ECE; mean per-fold ECE {against['mean_ece'][0]:.3f} against {against['mean_ece'][1]:.3f}."]
    lines += [
        "",
        "Pooled out-of-fold predictions (every image predicted by a model that never saw its subject): "
        f"AUROC {_pct(pooled['auroc'])}, ECE {_pct(pooled.get('ece_uncalibrated'))} before calibration and "
        f"{_pct(pooled['ece'])} after; at the screening threshold sensitivity {_pct(pooled['sensitivity'])} and "
        f"specificity {_pct(pooled['specificity'])}; {_pct(pooled.get('indeterminate_fraction'))} of cells "
        f"indeterminate, accuracy of the called results {_pct(pooled.get('decided_accuracy'))}.",
        "",
        "## Calibration and decision rule",
        "",
        f"Temperature scaling, T = {card['calibration']['temperature']:.3f}, fitted on "
        f"{card['calibration'].get('fitted_on', 'held-out subjects')}. Served probabilities are calibrated.",
        "",
        _prior_note(card["data"]),
        "",
        f"- Call: lymphoblast at P(lymphoblast) >= {max(th['upper'], 0.5):.3f}, normal at P < {min(th['lower'], 0.5):.3f}, "
        "indeterminate between (for a person to review). A called label is always the more probable one.",
        f"- Screen: screen-positive at P(lymphoblast) >= {th['operating_point']:.3f}, the threshold chosen on pooled "
        f"out-of-fold predictions for sensitivity >= {th['target_sensitivity']:.2f}: a flag for review, apart from the call.",
        "",
        "## Per-subject results (pooled out-of-fold; accuracy of the more probable label)",
        "",
        "| subject | label | images | accuracy | mean P(lymphoblast) |",
        "|---|---|---|---|---|",
    ]
    for s, r in pooled["per_subject"].items():
        lines.append(f"| {s} | {r['label']} | {r['images']} | {r['accuracy']:.3f} | {r['mean_p_lymphoblast']:.3f} |")
    if gate := card.get("quality_gate"):
        from .gate import CHECKS

        dev = gate["developer_set"]
        lines += [
            "",
            "## Input quality gate",
            "",
            "Before the model, each image is measured; outside any accepted range it is answered "
            "indeterminate with machine-readable reasons (`ClassifyResponse.quality`), whatever the model says. "
            f"Ranges fitted on {gate['fitted_on']}. On the developer set {dev['pass_rate']:.2%} of "
            f"{dev['images']} images pass.",
            "",
            "| code | measures | accepted range | developer images failing |",
            "|---|---|---|---|",
        ]
        for name, (code, what, _, _) in CHECKS.items():
            low, high = gate["ranges"][name]
            accepted = f"{'-inf' if low is None else f'{low:.3g}'} to {'inf' if high is None else f'{high:.3g}'}"
            lines.append(f"| {code} | {what} | {accepted} | {dev['failed_per_code'][code]} |")
        if ood := card.get("ood"):
            lines += ["", f"Out of distribution (`OUT_OF_DISTRIBUTION`): {ood['method']} features, above "
                      f"{ood['threshold']:.1f} (`{ood['file']}`, SHA-256 `{ood['sha256']}`)."]
            if "flagged_out_of_fold" in ood:
                lines[-1] += (f" The threshold is the {ood['percentile']}th percentile of {ood['threshold_from']}: each "
                              f"developer cell scored by a fit that never saw its subject; it flags "
                              f"{ood['flagged_out_of_fold']:.2%} of them. The in-sample percentile ({ood['in_sample_threshold']:.1f}) "
                              f"would flag {ood['in_sample_threshold_flagged_out_of_fold']:.2%} of unseen subjects' cells.")
        lines += ["", "An indeterminate answer means: do not act on the probabilities; re-acquire or re-segment the "
                  "cell, or have a person review it."]
    if specimen := card.get("specimen"):
        from .specimen import SpecimenRule

        rule, outcomes = SpecimenRule(**specimen["rule"]), specimen["outcomes_by_true_label"]
        enough = [r for r in specimen["per_subject"].values() if r["called"] >= rule.min_called]
        lines += [
            "",
            "## Specimen-level rule (decision support, not a diagnosis)",
            "",
            f"Within a stream, cells sent with the same `specimen_id` are summed up: {rule.describe(card['version'])}.",
            f"Outcome with {specimen['evaluated_on']}:",
            "",
            "| true label of the subject | specimen call: lymphoblast | normal | indeterminate |",
            "|---|---|---|---|",
        ] + [f"| {label} | {o.get('lymphoblast', 0)} | {o.get('normal', 0)} | {o.get('indeterminate', 0)} |"
             for label, o in outcomes.items()] + [
            "",
            f"Subjects with at least {rule.min_called} called cells: " + ", ".join(
                f"{s} ({r['label']}, blast fraction {r['blast_fraction']:.2f} of {r['called']}: {r['specimen_call']})"
                for s, r in specimen["per_subject"].items() if r in enough) + ".",
        ]
    if card.get("not_shipped"):
        lines += ["", "## Tried for this version and not shipped", "", card["not_shipped"]]
    lines += ["", "## Limitations", ""] + [f"- {item}" for item in card["limitations"]]
    return "\n".join(lines) + "\n"
