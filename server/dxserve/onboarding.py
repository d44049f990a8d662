"""`dxserve site onboard`: make a site version (`sites.py`) through a plugin's `adapt`.

    dxserve site onboard --plugin lymphoblast --base 2.1.0 --site taleqani \\
        --labelled labels.csv --unlabelled cells/ --sites-dir /var/lib/dxserve/sites

`labels.csv` has a header and the columns `path` (relative to the CSV's folder), `label` (one of
the plugin's labels) and `group` (the patient, or the block of images one came from: every
split of the validation keeps a group whole). Unlabelled images are every PNG, JPEG, BMP or
TIFF under the folder, less any file identical to a labelled one (the same bytes: a folder may
hold both), so no image is learnt from or counted twice; of a folder of more than
`MAX_UNLABELLED` (`--max-unlabelled`), a seeded sample, and site.json lists those used.
Nothing is written unless the plugin's adaptation completes; the folder of a failed one is
removed.
"""

from __future__ import annotations

import csv
import inspect
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from dxserve_client.client import image_files
from PIL import Image

from . import registry, sites
from .config import Settings
from .images import to_rgb
from .runtime import LabelledImage

#: Unlabelled images an onboarding reads at most: a seeded sample of a larger folder. Enough for what
#: they fit (colour model, out-of-distribution reference, batch-norm statistics), and it keeps an
#: onboarding within minutes and its memory within a few GB whatever the folder holds.
MAX_UNLABELLED = 2000


class OnboardingError(ValueError):
    """What the operator asked for cannot be done (unknown plugin or version, bad labels file...)."""


@dataclass(frozen=True)
class Onboarded:
    version: str
    folder: Path
    site: dict
    unmet: list[str]


@dataclass(frozen=True)
class LabelledFile:
    """One row of a labels CSV, its image not yet decoded."""

    path: Path  # the file
    label: str
    group: str
    source: str  # the path as the CSV gives it


def labelled_files(csv_path: Path, labels: tuple[str, ...]) -> tuple[list[LabelledFile], dict[str, str]]:
    """The rows of `csv_path`, checked, and {path: SHA-256} of their files."""
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"path", "label", "group"} <= set(rows[0]):
        raise OnboardingError(f"{csv_path}: expected a header with the columns path, label, group")
    for number, row in enumerate(rows, start=2):
        if row["label"] not in labels:
            raise OnboardingError(f"{csv_path}, line {number}: label {row['label']!r} is not one of {', '.join(labels)}")
    found = [LabelledFile(csv_path.parent / row["path"], row["label"], row["group"] or "?", row["path"]) for row in rows]
    return found, sites.hashed([x.path for x in found], csv_path.parent)


def read_labelled(csv_path: Path, labels: tuple[str, ...]) -> tuple[list[LabelledImage], dict[str, str]]:
    """The labelled images of `csv_path`, decoded, and {path: SHA-256} of their files."""
    found, hashes = labelled_files(csv_path, labels)
    return [LabelledImage(decoded(x.path), x.label, x.group, x.source) for x in found], hashes


def read_unlabelled(folder: Path, labelled: set[str] = frozenset(), most: int = MAX_UNLABELLED) -> tuple[list, dict[str, str], int]:
    """The images under `folder` and {path: SHA-256} of their files, less those whose SHA-256 is in
    `labelled`; of more than `most`, a seeded sample of `most` (in path order). And how many there were."""
    files = image_files([folder])  # the client's own rule for a folder of images
    if not files:
        raise OnboardingError(f"{folder}: no images (PNG, JPEG, BMP, TIFF) to learn the site's images from")
    kept = {path: digest for path, digest in sites.hashed(files, folder).items() if digest not in labelled}
    found = len(kept)
    if found > most:
        chosen = set(np.random.default_rng(0).choice(found, most, replace=False).tolist())
        kept = {path: digest for i, (path, digest) in enumerate(kept.items()) if i in chosen}
    return [decoded(folder / path) for path in kept], kept, found


def decoded(path: Path):
    try:
        with Image.open(path) as image:
            return to_rgb(image)  # as the server decodes a request
    except (OSError, ValueError) as error:
        raise OnboardingError(f"{path}: not a readable image ({error})") from None


def onboard(settings: Settings, plugin: str, base: str, site: str, labelled_csv: Path, unlabelled_dir: Path,
            log=print, max_unlabelled: int = MAX_UNLABELLED, prevalence: float | None = None) -> Onboarded:
    """`prevalence`: the share of the plugin's first label among the images the site will send, to
    which the site version is calibrated (`ModelRuntime.adapt`); None: the labelled share."""
    if settings.sites_dir is None:
        raise OnboardingError("no sites_dir: say where site versions live (--sites-dir or the sites_dir setting)")
    if not sites.SITE_NAME.match(site):
        raise OnboardingError(f"site {site!r}: use lower case letters, digits and '-' (2-41 characters, a letter first)")
    entry = registry.discover(settings).get(plugin)
    if entry is None or entry.runtime_class is None:
        raise OnboardingError(f"no plugin {plugin!r}" + (f": {entry.reason}" if entry else ""))
    if not entry.runtime_class.adapts():
        raise OnboardingError(f"plugin {plugin!r} cannot make site versions (its runtime has no `adapt`)")
    if prevalence is not None:
        if not 0 < prevalence < 1:
            raise OnboardingError(f"--prevalence {prevalence}: the share of {entry.runtime_class.info.labels[0]} among "
                                  "the site's images, between 0 and 1")
        if "prevalence" not in inspect.signature(entry.runtime_class.adapt).parameters:
            raise OnboardingError(f"plugin {plugin!r} takes no --prevalence (its `adapt` does not calibrate to one)")
    versions = {v.version: v for v in entry.runtime_class.versions()}
    parent = versions.get(base) if base else next(iter(versions.values()))
    if parent is None:
        raise OnboardingError(f"plugin {plugin!r} has no version {base!r} (has: {', '.join(versions)})")
    labels = entry.runtime_class.info.labels
    labelled, labelled_files = read_labelled(labelled_csv, labels)
    unlabelled, unlabelled_files, found = read_unlabelled(unlabelled_dir, set(labelled_files.values()), max_unlabelled)
    log(f"{len(labelled)} labelled images in {len({x.group for x in labelled})} groups, {len(unlabelled)} unlabelled "
        f"(not counting those also labelled{f'; a seeded sample of the {found} found' if found > len(unlabelled) else ''}); "
        f"loading {plugin} {parent.version}")
    runtime = registry.load_runtime(entry.runtime_class, parent)
    version = sites.next_version(settings.sites_dir, plugin, parent.version, site)
    folder = settings.sites_dir / plugin / version
    folder.mkdir(parents=True)
    try:
        adaptation = runtime.adapt(labelled, unlabelled, folder, **({} if prevalence is None else {"prevalence": prevalence}))
        criteria = sites.criteria_for(site, settings.site_acceptance)
        kind = "field" if entry.runtime_class.info.objects_plugin else "classifier"
        record = sites.record(folder, plugin=plugin, site=site, version=version, parent=parent, weights=adaptation.weights,
                              report=adaptation.report, card=adaptation.card, labelled=labelled_files,
                              unlabelled=unlabelled_files, criteria=criteria, kind=kind, groups=(x.group for x in labelled))
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return Onboarded(version, folder, record, sites.refusals(record, folder, criteria))
