"""`dxserve site verify`: a site version scored on labelled images it was never fitted on.

    dxserve site verify --plugin lymphoblast --version 2.1.0+taleqani.1 --labelled other-patients.csv

A site version's own validation report is cross-validated on the images it was fitted on, and
where those come from few patients or neighbouring images it is optimistic (on Aria: 0.93 in
the report, 0.77 on other blocks). A laboratory verifies a test on samples it kept apart before
it uses it; this is that step, on the platform:

1. The labelled CSV is read as onboarding reads one (`path,label,group`). An image the site
   version was fitted on (the same bytes, labelled or unlabelled) or a group (patient) its
   labelled images came from is refused: those would flatter the figures.
2. Every image is classified as the server classifies it: the site version loaded as the server
   loads it (weights checked against their SHA-256), `prepare` (gate), `predict_with_issues`
   (out of distribution), `decide`; an image with an issue is indeterminate. The parent version,
   unadapted, classifies the same images, for the figures beside.
3. The figures the acceptance criteria read, on these images: `labelled`, `auroc` (of the
   plugin's first label, its positive one, against the rest), `sensitivity_at_screen` (the
   positive images whose decision flags them for review), `ece` (top-label, 15 bins),
   `confidently_wrong` (P >= 0.9 for a wrong label) and `groups_per_label` (the fewest groups
   any label's images come from), with 95 % bootstrap intervals over groups, the share
   answered, and per group. A field plugin's: the share of the fields (each showing
   an object) in which the site version finds one and makes no field issue.
4. `<site folder>/verifications/<n>.json` keeps all of it, each image's SHA-256 and answer, and
   the card gains the verification. The latest verification counts for serving
   (`sites.refusals`): a site version whose latest verification misses the site's criteria is
   NOT_SERVED, and where the criteria say `require_verification`, so is one without.
"""

from __future__ import annotations

import datetime
import json
import shlex
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import registry, sites
from .batcher import shape_groups
from .config import Settings
from .onboarding import LabelledFile, OnboardingError, decoded, labelled_files
from .runtime import INDETERMINATE, ModelRuntime

#: A call made with at least this probability for a wrong label is confidently wrong.
CONFIDENT = 0.9
RESAMPLES = 1000


@dataclass(frozen=True)
class Verified:
    path: Path
    verification: dict
    unmet: list[str]  # the criteria this verification misses
    refusals: list[str]  # why the site version is not served now, this verification counted (`sites.refusals`)


def verify(settings: Settings, plugin: str, version: str, labelled_csv: Path, log=print) -> Verified:
    entry, site_version = _site_version(settings, plugin, version)
    site, folder, parent = site_version.extra["site"], site_version.extra["site_folder"], site_version.extra["parent"]
    images, files = labelled_files(labelled_csv, entry.runtime_class.info.labels)  # decoded a batch at a time
    _refuse_what_it_learnt_from(site, images, files)
    kind = site.get("kind", "classifier")
    log(f"{len(images)} images in {len({x.group for x in images})} groups; classifying them with {version} and {parent.version}")
    answers = {}
    for name, v in (("site version", site_version), ("parent", parent)):
        try:
            answers[name] = answered(registry.load_runtime(entry.runtime_class, v), images, kind)
        except OnboardingError:  # an image that cannot be read: named as such
            raise
        except Exception as error:  # noqa: BLE001 - the plugin's own failure, said as such; nothing is written
            raise OnboardingError(f"{plugin} {v.version} failed while answering the images: "
                                  f"{type(error).__name__}: {error}") from error
    labels = entry.runtime_class.info.labels
    figures = {name: (field_figures if kind == "field" else classifier_figures)(rows, images, labels)
               for name, rows in answers.items()}
    verification = sites.json_safe({
        "version": version, "weights_sha256": site_version.weights_sha256, "parent": site["parent"],
        "verified_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "dxserve " + shlex.join(sys.argv[1:]), "images": len(images), "groups": len({x.group for x in images}),
        "acceptance": figures["site version"]["acceptance"], "figures": figures,
        "report_acceptance": site["report"].get("acceptance", {}),  # what its own cross-validation said, beside
        "rows": [{"path": x.source, "sha256": files.get(str(Path(x.source))), "label": x.label, "group": x.group, **row}
                 for x, row in zip(images, answers["site version"], strict=True)]})
    path = _write(folder, verification)
    criteria = sites.criteria_for(site["site"], settings.site_acceptance)
    (folder / sites.CARD_FILE).write_text(sites.describe(site, criteria, verification))
    return Verified(path, verification, sites.unmet(verification, criteria, kind, verified=True),
                    sites.refusals(site, folder, criteria))


def _site_version(settings: Settings, plugin: str, version: str):
    """The plugin's entry and the site version `version`, whose parent is listed unchanged and whose
    weights and parent's weights match their hashes."""
    entry = registry.discover(settings).get(plugin)
    if entry is None or entry.runtime_class is None:
        raise OnboardingError(f"no plugin {plugin!r}" + (f": {entry.reason}" if entry else ""))
    found, _ = sites.site_versions(settings.sites_dir, plugin, entry.runtime_class.versions(), settings.site_acceptance)
    site_version = next((v for v in found if v.version == version), None)
    if site_version is None:
        raise OnboardingError(f"{version!r} is not a site version of {plugin} under {settings.sites_dir} "
                              f"(has: {', '.join(v.version for v in found) or 'none'})")
    site, parent = site_version.extra["site"], site_version.extra["parent"]
    if why := sites.parent_changed(site, parent):
        raise OnboardingError(f"site version {version}: {why}")
    try:
        for checked in (site_version, parent):
            registry.verify_weights(checked)
    except RuntimeError as error:  # altered weights: what the server would refuse to load
        raise OnboardingError(str(error)) from None
    return entry, site_version


def _refuse_what_it_learnt_from(site: dict, images: Sequence[LabelledFile], files: dict[str, str]) -> None:
    """Refuse an image the site version was fitted on (the same bytes, labelled or not) or a group
    (patient) its labelled images came from."""
    seen = set(site["labelled"].values()) | set(site["unlabelled"].values())
    if fitted := [path for path, digest in files.items() if digest in seen]:
        raise OnboardingError(f"{len(fitted)} of these images were used to make {site['version']} (e.g. {fitted[0]}): "
                              "verify it on images it was never fitted on")
    if shared := sorted({x.group for x in images} & set(site.get("labelled_groups", ()))):
        raise OnboardingError(f"groups {', '.join(shared[:5])} also gave {site['version']} its labelled images: verify "
                              "it on other patients (or slides), whose images it has not learnt from")


def _write(folder: Path, verification: dict) -> Path:
    """verifications/<next number>.json, whole or not at all (a full disk leaves no half-written
    verification that a later read would take for the latest); `verification` gains its number."""
    verification["number"] = 1 + max((number for number, _ in sites.verification_files(folder)), default=0)
    path = folder / sites.VERIFICATIONS / f"{verification['number']}.json"
    path.parent.mkdir(exist_ok=True)
    partial = path.with_suffix(".partial")
    try:
        partial.write_text(json.dumps(verification, indent=1, allow_nan=False) + "\n")
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def answered(runtime: ModelRuntime, images: Sequence[LabelledFile], kind: str) -> list[dict]:
    """Each image's answer as the server gives it: a classifier's probabilities, decision (an
    image with a gate or model issue: indeterminate), screening flag and issue codes; a field
    plugin's objects found and field issue codes. The images are decoded (as the server decodes
    a request) and prepared a batch at a time, so memory stays flat whatever their number."""
    if kind == "field":
        rows = []
        for x in images:
            objects, issues = runtime.find_objects(decoded(x.path))
            rows.append({"objects": 0 if issues else len(objects), "issues": [q.code for q in issues]})
        return rows
    rows: list[dict] = []
    for start in range(0, len(images), runtime.max_batch_size):
        prepared = [runtime.prepare(decoded(x.path)) for x in images[start:start + runtime.max_batch_size]]
        part: list[dict] = [{} for _ in prepared]
        for group in shape_groups([inputs for inputs, _ in prepared]):
            prediction = runtime.predict_with_issues(np.stack([prepared[i][0] for i in group]))
            for i, p, model_issues in zip(group, np.asarray(prediction.probabilities, np.float64), prediction.issues, strict=True):
                decision, issues = runtime.decide(p), [q.code for q in (*prepared[i][1], *model_issues)]
                part[i] = {"probabilities": dict(zip(runtime.info.labels, p.tolist(), strict=True)),
                           "decision": INDETERMINATE if issues else decision.label,
                           "screen_positive": bool(decision.screen_positive), "issues": issues}
        rows += part
    return rows


def field_figures(rows: list[dict], images: Sequence[LabelledFile], labels: Sequence[str]) -> dict:
    with_objects = [r["objects"] > 0 for r in rows]
    return {"acceptance": {"labelled": len(rows), "fields_with_objects": float(np.mean(with_objects)) if rows else None},
            "objects_per_field": float(np.mean([r["objects"] for r in rows])) if rows else None,
            "issues": dict(sorted(Counter(c for r in rows for c in r["issues"]).items()))}


def classifier_figures(rows: list[dict], images: Sequence[LabelledFile], labels: Sequence[str]) -> dict:
    """The acceptance figures and the rest, over all images (as the site's report computes them)
    and over those answered (no issue, not indeterminate: what a user is told)."""
    p = np.array([[r["probabilities"][label] for label in labels] for r in rows])
    truth = np.array([labels.index(x.label) for x in images])
    groups = np.array([x.group for x in images])
    positive = truth == 0
    screened = np.array([r["screen_positive"] for r in rows], bool)
    decision = np.array([labels.index(r["decision"]) if r["decision"] in labels else -1 for r in rows])  # -1: indeterminate
    answer = decision >= 0
    called_right, called_wrong = decision == truth, answer & (decision != truth)
    wrong = confidently_wrong(p, truth)
    others = np.where(np.arange(p.shape[1]) == truth[:, None], -np.inf, p).max(axis=1)
    right = p[np.arange(len(p)), truth] > others  # the true label strictly most probable (a tie is no call)
    figures = {
        "acceptance": {"labelled": len(rows), "auroc": auroc(positive, p[:, 0]),
                       "sensitivity_at_screen": float(screened[positive].mean()) if positive.any() else float("nan"),
                       "ece": ece(p, truth), "confidently_wrong": float(wrong.mean()),
                       "groups_per_label": sites.groups_per_label(((x.label, x.group) for x in images), labels)},
        "auroc_interval": bootstrap(lambda i: auroc(positive[i], p[i, 0]), groups),
        "sensitivity_at_screen_interval": bootstrap(lambda i: float(screened[i][positive[i]].mean())
                                                    if positive[i].any() else float("nan"), groups),
        "specificity_at_screen": float((~screened[~positive]).mean()) if (~positive).any() else float("nan"),
        "answered": float(answer.mean()),
        "auroc_answered": auroc(positive[answer], p[answer, 0]),
        "confidently_wrong_and_answered": float((wrong & answer).mean()),
        "decisions": {label: dict(Counter(r["decision"] for r, t in zip(rows, truth, strict=True) if t == k))
                      for k, label in enumerate(labels)},  # {true label: {decision: images}}
        "issues": dict(sorted(Counter(c for r in rows for c in r["issues"]).items())),
        "per_group": [{"group": g, "images": int(index.sum()), labels[0]: int(positive[index].sum()),
                       "mean_p": float(p[index, 0].mean()), "right": float(right[index].mean()),
                       "called_right": float(called_right[index].mean()), "called_wrong": float(called_wrong[index].mean())}
                      for g, index in ((g, groups == g) for g in sorted(set(groups.tolist())))],
    }
    return figures


def confidently_wrong(p: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Images called a wrong label with probability >= CONFIDENT."""
    return (p.max(axis=1) >= CONFIDENT) & (p.argmax(axis=1) != truth)


def auroc(positive: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve of `score` for `positive` (ties count a half); NaN with one class."""
    positive = np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    values, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]  # 1-based, ties averaged
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def ece(p: np.ndarray, truth: np.ndarray, bins: int = 15) -> float:
    """Top-label expected calibration error: the bin-weighted gap between the decided label's
    probability and how often it is right, bins of equal width from 1/labels to 1."""
    confidence, right = p.max(axis=1), p.argmax(axis=1) == truth
    edges = np.linspace(1.0 / p.shape[1], 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    return float(sum((which == b).mean() * abs(confidence[which == b].mean() - right[which == b].mean())
                     for b in range(bins) if (which == b).any()))


def bootstrap(figure, groups: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> list[float] | None:
    """95 % interval of `figure(indices)` over resamples of whole groups (patients); None when
    fewer than two groups or no resample gives a figure."""
    names = np.unique(groups)
    if len(names) < 2:
        return None
    members = [np.flatnonzero(groups == g) for g in names]
    rng = np.random.default_rng(seed)
    values = [figure(np.concatenate([members[k] for k in rng.integers(0, len(names), len(names))]))
              for _ in range(resamples)]
    values = [v for v in values if v == v]
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if values else None
