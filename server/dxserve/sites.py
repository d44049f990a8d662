"""Site versions: a served model version adapted to one laboratory (issue 33).

A site version is made offline by `dxserve site onboard` through the plugin's optional
`ModelRuntime.adapt`, from a few of the lab's labelled images and its unlabelled ones, and
stored outside the installed package, in the `sites_dir` setting:

    <sites_dir>/<plugin>/<parent>+<site>.<n>/
        site.json        what it is: site, parent version and the parent's weights SHA-256, its own
                         weights and their SHA-256, the SHA-256 of every file it was fitted on and
                         the groups (patients) they came from, the validation report, when and by
                         which command it was made
        <weights>        written by the plugin's `adapt`
        MODEL_CARD.md    the card people read (model_card_json: site.json itself)
        verifications/   `dxserve site verify`: the site version scored on labelled images of other
                         patients it was never fitted on, one numbered JSON file per run

The server lists it beside the plugin's own versions, `2.1.0+taleqani.1`, and serves it only
while (1) its parent version is listed with the weights hash it was made from, (2) its weights
match their hash, and (3) its validation report meets the acceptance criteria the operator
declares for the site (`site_acceptance`), and so does its latest verification, if it has one
(it must have one where the site's criteria say `require_verification`); otherwise it is
NOT_SERVED with the reason, as a version without safety checks is. It is never a plugin's
default: a caller names it (or is bound to it by its key).
"""

from __future__ import annotations

import datetime
import json
import math
import re
import shlex
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from pydantic import BaseModel, Field

from .runtime import ModelVersion, sha256_of

SITE_FILE = "site.json"
CARD_FILE = "MODEL_CARD.md"
VERIFICATIONS = "verifications"
SITE_NAME = re.compile(r"^[a-z][a-z0-9-]{1,40}$")


class SiteAcceptance(BaseModel):
    """What a site version's validation report must show before it is served (one lab's quality
    manager's criteria; `site_acceptance` maps a site's name, or "*" for any site, to these)."""

    min_labelled: int = Field(50, ge=1, description="labelled images the adaptation and its validation used, at least")
    min_sensitivity_at_screen: float = Field(0.90, ge=0, le=1, description="cross-validated sensitivity of the screening "
                                             "flag for the positive label, at least")
    max_ece: float = Field(0.10, ge=0, le=1, description="cross-validated expected calibration error, at most")
    max_confidently_wrong: float = Field(0.05, ge=0, le=1, description="share of cross-validated calls made with "
                                         "P >= 0.9 for the wrong label, at most")
    min_auroc: float = Field(0.80, ge=0, le=1, description="cross-validated AUROC, at least")
    min_margin_over_colour_alone: float = Field(0.05, ge=-1, le=1, description="cross-validated AUROC above a model of "
                                                "the image's colour alone in the same folds, at least: a site whose classes "
                                                "were stained or imaged apart is otherwise learned by its slides, not its cells")
    min_fields_with_objects: float = Field(0.95, ge=0, le=1, description="field plugins (a detector's site version): "
                                           "share of the labelled fields, each showing an object, in which one is found")
    min_verified_groups_per_label: int = Field(3, ge=1, description="a verification's groups (patients) per label, at "
                                               "least: each label's images from this many, since figures from fewer "
                                               "patients say little about the next one")
    require_verification: bool = Field(False, description="serve a site version only once `dxserve site verify` has "
                                       "scored it on labelled images of other patients and that verification met these "
                                       "criteria too (a verification that misses them refuses it whether required or not)")


def criteria_for(site: str, acceptance: dict[str, SiteAcceptance]) -> SiteAcceptance:
    return acceptance.get(site) or acceptance.get("*") or SiteAcceptance()


def unmet(report: dict, criteria: SiteAcceptance, kind: str = "classifier", verified: bool = False) -> list[str]:
    """Each acceptance criterion the report's `acceptance` figures miss, in words (empty: all met).
    `kind`: "classifier", or "field" for a field plugin (a detector), whose report shows how often it
    finds an object in fields that show one. `verified`: `report` is a verification's, on images the
    site version was not fitted on: every criterion but the margin over colour alone, which needs a
    model of colour fitted on labelled images, and is the fitting's own check; and the groups
    (patients) behind each label."""
    figures = report.get("acceptance", {})
    if kind == "field":
        checks = (("labelled", ">=", criteria.min_labelled), ("fields_with_objects", ">=", criteria.min_fields_with_objects))
    else:
        checks = (("labelled", ">=", criteria.min_labelled), ("sensitivity_at_screen", ">=", criteria.min_sensitivity_at_screen),
                  ("ece", "<=", criteria.max_ece), ("confidently_wrong", "<=", criteria.max_confidently_wrong),
                  ("auroc", ">=", criteria.min_auroc), ("margin_over_colour_alone", ">=", criteria.min_margin_over_colour_alone))
        if verified:
            checks = (*checks[:-1], ("groups_per_label", ">=", criteria.min_verified_groups_per_label))
    missed = []
    for name, op, bar in checks:
        value = figures.get(name)
        if value is None or value != value:  # missing, or undefined (NaN compares False with any bar: never a pass)
            missed.append(f"{name} {'missing' if value is None else 'undefined'} (needs {op} {bar:g})")
        elif value < bar if op == ">=" else value > bar:
            missed.append(f"{name} {value:.3g} (needs {op} {bar:g})")
    return missed


def verification_files(folder: Path) -> list[tuple[int, Path]]:
    """(number, path) of the site version's verifications (`dxserve site verify`), in number order."""
    return sorted((int(p.stem), p) for p in (folder / VERIFICATIONS).glob("*.json") if p.stem.isdigit())


def latest_verification(folder: Path) -> dict | None:
    """The site version's last `dxserve site verify` (the highest number), or None before any.
    One that cannot be read is returned as a verification that meets nothing; one made before
    `groups_per_label` was recorded gets it from its rows."""
    found = verification_files(folder)
    if not found:
        return None
    number, path = found[-1]
    try:
        verification = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return {"number": number, "unreadable": f"{path} is unreadable: {type(error).__name__}: {error}"}
    acceptance = verification.get("acceptance")
    if isinstance(acceptance, dict) and "groups_per_label" not in acceptance and verification.get("rows"):
        # made before the figure was recorded: read from its rows
        acceptance["groups_per_label"] = groups_per_label((row.get("label"), row.get("group")) for row in verification["rows"])
    return verification


def groups_per_label(images: Iterable[tuple[str, str]], labels: Iterable[str] = ()) -> int:
    """The fewest groups (patients) any label's images come from, of (label, group) per image; a
    label of `labels` that no image has counts 0."""
    groups: dict[str, set] = {label: set() for label in labels}
    for label, group in images:
        groups.setdefault(label, set()).add(group)
    return min((len(g) for g in groups.values()), default=0)


def refusals(site: dict, folder: Path, criteria: SiteAcceptance) -> list[str]:
    """Why the site version's figures keep it from being served (empty: they do not): each criterion
    its validation report misses, and each its latest verification misses, or the verification the
    criteria require and it lacks."""
    kind = site.get("kind", "classifier")
    missed = unmet(site["report"], criteria, kind)
    verification = latest_verification(folder)
    if verification is None:
        if criteria.require_verification:
            missed.append("no verification on labelled images of other patients (`dxserve site verify`), which the site's "
                          "criteria require")
    elif "unreadable" in verification:
        missed.append(f"verification {verification['number']}: {verification['unreadable']}")
    elif verification.get("weights_sha256") != site["weights"]["sha256"]:
        missed.append(f"verification {verification['number']}: made on other weights "
                      f"({str(verification.get('weights_sha256'))[:12]}...), not this site version's")
    else:
        missed += [f"verification {verification['number']}: {m}" for m in unmet(verification, criteria, kind, verified=True)]
    return missed


def json_safe(value):
    """`value` with every NaN or infinite float as None (JSON's null): a figure a report could not
    compute (an AUROC over one class) is written as valid JSON any reader takes."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def site_folders(sites_dir: Path | None, plugin: str) -> list[Path]:
    folder = (sites_dir / plugin) if sites_dir else None
    if folder is None or not folder.is_dir():
        return []
    return sorted(d for d in folder.iterdir() if (d / SITE_FILE).is_file())


def site_versions(sites_dir: Path | None, plugin: str, parents: Sequence[ModelVersion],
                  acceptance: dict[str, SiteAcceptance]) -> tuple[list[ModelVersion], dict[str, str]]:
    """The plugin's site versions under `sites_dir`, and {version: why} for those that cannot be
    served: unreadable, parent missing or changed, or a report short of the site's `acceptance`."""
    by_name = {v.version: v for v in parents}
    versions, refused = [], {}
    for folder in site_folders(sites_dir, plugin):
        try:
            site_json = (folder / SITE_FILE).read_text()
            site = json.loads(site_json)
            name, parent = site["version"], by_name.get(site["parent"]["version"])
            weights = folder / site["weights"]["file"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            refused[folder.name] = f"{folder / SITE_FILE} is unreadable: {type(error).__name__}: {error}"
            continue
        card = folder / CARD_FILE
        version = ModelVersion(version=name, weights=weights, weights_sha256=site["weights"]["sha256"],
                               model_card=card.read_text() if card.is_file() else "", model_card_json=site_json,
                               extra={**(parent.extra if parent else {}), "site": site, "parent": parent, "site_folder": folder})
        versions.append(version)
        if why := parent_changed(site, parent):
            refused[name] = why
        elif missed := refusals(site, folder, criteria_for(site["site"], acceptance)):
            refused[name] = f"it does not meet the acceptance criteria declared for site {site['site']!r}: {'; '.join(missed)}"
    return versions, refused


def parent_changed(site: dict, parent: ModelVersion | None) -> str | None:
    """Why the site version's parent is no longer the one it was made from (`parent`: the plugin's
    version of that name, None when not listed), or None while it is (either served form of it)."""
    if parent is None:
        return f"its parent version {site['parent']['version']!r} is not listed by the plugin"
    if site["parent"]["weights_sha256"] not in (parent.weights_sha256, *parent.same_model_sha256):
        return (f"it was made from {site['parent']['version']} with weights {site['parent']['weights_sha256'][:12]}..., "
                f"which are now {parent.weights_sha256[:12]}...: onboard the site again")
    return None


def next_version(sites_dir: Path, plugin: str, parent: str, site: str) -> str:
    """`<parent>+<site>.<n>` with the next free n."""
    taken = {d.name for d in (sites_dir / plugin).glob("*")}  # with folders of failed or unreadable ones
    n = 1
    while f"{parent}+{site}.{n}" in taken:
        n += 1
    return f"{parent}+{site}.{n}"


def describe(site: dict, criteria: SiteAcceptance, verification: dict | None = None) -> str:
    """The site version's Markdown card: what it is, what it was fitted on, its figures (`site`
    as `record` writes it: `json_safe` already), and its latest verification's."""
    report, missed = site["report"], unmet(site["report"], criteria, site.get("kind", "classifier"))
    lines = [f"# Site version {site['version']} ({site['plugin']})", "",
             f"- **Site:** {site['site']}",
             f"- **Parent version:** {site['parent']['version']}, weights SHA-256 `{site['parent']['weights_sha256']}`",
             f"- **Weights:** `{site['weights']['file']}`, SHA-256 `{site['weights']['sha256']}`",
             f"- **Made:** {site['made_at']} by `{site['command']}`",
             f"- **Fitted on:** {len(site['labelled'])} labelled and {len(site['unlabelled'])} unlabelled images "
             "(their SHA-256 in site.json)",
             f"- **Acceptance ({'met' if not missed else 'NOT met: ' + '; '.join(missed)}):** "
             + figures_text(report.get("acceptance", {})),
             "", "## Validation report", "", "```json", json.dumps(report, indent=1, allow_nan=False), "```", ""]
    if verification is not None:
        v_missed = unmet(verification, criteria, site.get("kind", "classifier"), verified=True)
        lines += [f"## Verification {verification['number']}: {verification['images']} labelled images of "
                  f"{verification['groups']} groups it was not fitted on", "",
                  f"- **Verified:** {verification['verified_at']} by `{verification['command']}`",
                  f"- **Acceptance ({'met' if not v_missed else 'NOT met: ' + '; '.join(v_missed)}):** "
                  + figures_text(verification["acceptance"]),
                  "", "```json", json.dumps(verification["figures"], indent=1, allow_nan=False), "```", ""]
    return "\n".join(lines)


def figures_text(figures: dict) -> str:
    """"auroc 0.743, labelled 2480, ...": an acceptance block in words."""
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items())


def hashed(paths: Iterable[Path], root: Path | None = None) -> dict[str, str]:
    return {str(p.relative_to(root) if root else p): sha256_of(p) for p in paths}


def record(folder: Path, *, plugin: str, site: str, version: str, parent: ModelVersion, weights: str, report: dict,
           card: dict, labelled: dict[str, str], unlabelled: dict[str, str], criteria: SiteAcceptance,
           kind: str = "classifier", groups: Iterable[str] = ()) -> dict:
    """Write site.json and MODEL_CARD.md for an adaptation `adapt` wrote into `folder`. `groups`: the
    labelled images' groups (patients), which a verification must not share."""
    site = {"plugin": plugin, "kind": kind, "site": site, "version": version,
            "parent": {"version": parent.version, "weights_sha256": parent.weights_sha256},
            "weights": {"file": weights, "sha256": sha256_of(folder / weights)},
            "made_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "dxserve " + shlex.join(sys.argv[1:]),
            "labelled": labelled, "labelled_groups": sorted(set(groups)), "unlabelled": unlabelled, "report": report, **card}
    site = json_safe(site)
    (folder / SITE_FILE).write_text(json.dumps(site, indent=1, allow_nan=False) + "\n")
    (folder / CARD_FILE).write_text(describe(site, criteria))
    return site
