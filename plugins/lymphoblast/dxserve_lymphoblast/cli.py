"""`dxserve-lymphoblast`: train and evaluate the lymphoblast classifier."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
import time
from pathlib import Path

MODELS_DIR = Path(__file__).parent / "models"
DEFAULT_DATA = Path("../shared/data/cnmc2019")
SPECIMEN_DEFAULTS = {"min_called": 20, "positive_at_least": 0.5, "negative_below": 0.5}


def write_out_of_fold(version_dir: Path, oof, threshold: float) -> None:
    """Every developer-set image's out-of-fold prediction (for audit), beside the reference
    recipes' in the same folds, and the model's plots."""
    import csv

    from .metrics import plot
    from .train import MODEL

    names = list(oof.logits)
    with (version_dir / "out_of_fold.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "subject", "subject_group", "label", "fold", "p_lymphoblast"] + [f"logit: {n}" for n in names])
        for i in range(len(oof.cells)):
            writer.writerow([oof.cells.paths[i], oof.cells.subjects[i], oof.cells.groups[i],
                             "lymphoblast" if oof.cells.labels[i] else "normal", int(oof.fold[i]) + 1,
                             f"{oof.probabilities[MODEL][i]:.5f}"] + [f"{oof.logits[n][i]:.5f}" for n in names])
    plot(oof.probabilities[MODEL], oof.cells.labels, version_dir, "pooled out-of-fold", threshold)


def architecture(config, feature_count: int) -> str:
    """The card's one-line description of the model a `TrainConfig` trains."""
    mlp = (f"{config.heads} MLPs (seeds {config.seed}-{config.seed + config.heads - 1}, logits averaged; " if config.heads > 1
           else "MLP (")
    return (f"ImageNet MobileNet v1 (alpha 0.25, {'fine-tuned' if config.fine_tune_epochs else 'frozen'}) applied to the cell at "
            f"{' and '.join(f'{s} px' for s in config.scales)}; global average pooling of blocks 11 and 13 at each scale "
            f"({feature_count} features){' + the standardised log cell diameter' if config.use_size else ''} -> {mlp}"
            f"{config.mlp_units} units, dropout {config.dropout}) -> 1 logit; input {config.image_size}x{config.image_size} RGB "
            + (f"of a {config.window} px square of the canvas centred on the cell" if config.window else "crop of the cell"))


def train_command(args: argparse.Namespace) -> int:
    """Cross-validate, train the final model and write the version folder (and its -tta8
    variant) with the card; a version that exists is refused unless --replace."""
    taken = [d for d in (args.out / args.version, args.out / f"{args.version}-tta8") if d.exists()]
    if taken and not args.replace:
        print(f"model version {args.version!r} exists ({', '.join(map(str, taken))}): train a new version "
              "(e.g. --version 2.1.0-dev) or pass --replace to overwrite it", file=sys.stderr)
        return 2
    import numpy as np

    from .backbone import IMAGENET_SHA256, IMAGENET_SOURCE, imagenet_weights
    from .baselines import size_alone_fit
    from .calibration import Thresholds
    from .card import DATA, INTENDED_USE, LIMITATIONS, WEIGHTS_FILE, write_card
    from .data import load_cells
    from .features import VIEWS, cached_features
    from .gate import fit_on_files
    from .plugin import shipped_versions
    from .train import MODEL_8_VIEWS, TrainConfig, config_dict, cross_validate, train_final, versus_version

    config = TrainConfig(image_size=args.image_size, scales=tuple(args.scales or TrainConfig.scales), epochs=args.epochs,
                         folds=args.folds, seed=args.seed, mlp_units=args.mlp_units, dropout=args.dropout,
                         use_size=not args.no_size, fine_tune_epochs=args.fine_tune_epochs, test_views=args.test_views,
                         augmented_copies=args.augmented_copies, fine_tune_learning_rate=args.fine_tune_learning_rate,
                         fine_tune_from=args.fine_tune_from, fine_tune_patience=args.fine_tune_patience,
                         window=args.window, heads=args.heads)
    started = time.time()
    log = lambda message: print(message, flush=True)  # noqa: E731
    weights = None if args.imagenet_weights == "none" else imagenet_weights(args.imagenet_weights and Path(args.imagenet_weights))
    cells = load_cells(args.data, config.image_size, args.cache, window=config.window)
    log(f"{len(cells)} images from {len(set(cells.subjects.tolist()))} subjects; ImageNet weights: {weights or 'none (random)'}")
    features = cached_features(cells.images, cells.paths, config.scales, args.cache, weights, log=log, window=config.window)
    copies = [cached_features(cells.images, cells.paths, config.scales, args.cache, weights, augment_seed=config.seed + k, log=log,
                              window=config.window)
              for k in range(config.augmented_copies)]
    augmented = np.concatenate(copies, axis=1) if copies else None
    log(f"features {features.shape[1:]} per cell, {config.augmented_copies} augmented copies, after {time.time() - started:.0f} s")
    evaluation, oof = cross_validate(cells, features, config, weights, log, augmented)
    # The version this one would replace as the default: the newest shipped release that is not this one.
    previous = next((v for v in shipped_versions(args.out) if "-" not in v.version and v.version != args.version), None) \
        if args.out.exists() else None
    if previous and (against := versus_version(oof, previous.version, previous.extra["folder"] / "out_of_fold.csv")):
        evaluation["versus_previous"] = against
        log(f"against {previous.version} in the same folds: better in " + ", ".join(
            f"{m} {n}/{len(against['folds'])}" for m, n in against["folds_better"].items()))
    temperature = evaluation["temperature"]
    thresholds = Thresholds(**evaluation["thresholds"])
    model, final = train_final(cells, features, config, weights, log, augmented,
                               evaluation.get("fine_tuning", {}).get("final_epochs"))

    version_dir = args.out / args.version
    version_dir.mkdir(parents=True, exist_ok=True)
    model.save(version_dir / WEIGHTS_FILE)
    write_out_of_fold(version_dir, oof, thresholds.operating_point)
    evaluation.pop("temperature")
    evaluation["protocol"] = (
        f"Stratified grouped {config.folds}-fold cross-validation over `subject_group` (no subject, nor any subject "
        "sharing images with it, is on both sides). In each fold the MLP head and the reference recipes (size "
        "alone; frozen features + size, logistic) are fitted on the training subjects and predict the test "
        "subjects. Calibration is cross-fitted: a fold's probabilities use a temperature fitted on the other folds' "
        "out-of-fold logits. Fold and pooled metrics use P >= 0.5 unless they name the operating point; the "
        "operating point and indeterminate band are chosen on the pooled out-of-fold predictions (`out_of_fold.csv`, "
        "plots `roc.png`, `reliability.png`, `confusion.png`). Intervals: 95 % percentile bootstrap over subject "
        f"groups. The shipped head is then trained on every subject with the same recipe ({config.epochs} epochs)."
    )
    card = {
        "plugin": "lymphoblast",
        "version": args.version,
        "labels": ["lymphoblast", "normal"],
        "trained_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "training_seconds": round(time.time() - started, 1),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPU cores, no GPU",
        "command": "dxserve-lymphoblast " + shlex.join(sys.argv[1:]),
        "architecture": architecture(config, features.shape[2]),
        "initialisation": {"source": IMAGENET_SOURCE if weights else "random (no pretrained weights)", "file": weights.name if weights else None,
                           "sha256": IMAGENET_SHA256 if weights else None, "frozen": not config.fine_tune_epochs},
        "input": {"image_size": config.image_size, "views": config.test_views, "window": config.window,
                  "preprocessing": (f"a {config.window} px square of the canvas centred on the cell (larger only for a "
                                    "cell that does not fit), black outside the image" if config.window else
                                    "crop to cell, pad square") + ", resize, scale to [0,1]; log of the cell's equivalent "
                                   "diameter in pixels (magnification-dependent)"},
        "training": {**config_dict(config), "final": final},
        "not_shipped": args.notes.read_text().strip() if args.notes else "",
        "data": {**DATA, "images": len(cells), "lymphoblasts": int(cells.labels.sum()),
                 "normals": int((cells.labels == 0).sum()), "subjects": len(set(cells.subjects.tolist())),
                 "subject_groups": len(set(cells.groups.tolist()))},
        "evaluation": evaluation,
        "calibration": {"method": "temperature scaling", "temperature": temperature,
                        "fitted_on": "the pooled out-of-fold logits of the cross-validation (every subject, each "
                                     "predicted by a model that never saw it)"},
        "thresholds": thresholds.to_dict(),
        "baselines": {"size_alone": size_alone_fit(cells.log_diameters, cells.labels)},
        "quality_gate": fit_on_files([str(args.data / p) for p in cells.paths]),
        "intended_use": INTENDED_USE,
        "limitations": LIMITATIONS,
    }
    card["ood"] = fit_ood_for(version_dir, features, config.test_views, oof.fold)
    write_card(version_dir, card)
    # The same weights with 8-orientation averaging: a version of its own, with its own
    # calibration and thresholds fitted on that mode's out-of-fold predictions.
    tta = evaluation.pop("test_time_averaging")
    tta_dir = args.out / f"{args.version}-tta{VIEWS}"
    tta_dir.mkdir(parents=True, exist_ok=True)
    tta_card = {**card, "version": tta_dir.name, "input": {**card["input"], "views": VIEWS},
                "ood": fit_ood_for(tta_dir, features, VIEWS, oof.fold),
                "calibration": {**card["calibration"], "temperature": tta.pop("temperature")},
                "thresholds": tta.pop("thresholds"),
                "evaluation": {**evaluation, **tta, "folds": evaluation["candidates"][MODEL_8_VIEWS]["folds"]}}
    write_card(tta_dir, tta_card, weights_file=f"../{args.version}/{WEIGHTS_FILE}")
    export_command(argparse.Namespace(models=args.out, version=args.version))  # the served format
    specimen_command(argparse.Namespace(models=args.out, version=args.version, **SPECIMEN_DEFAULTS))
    log(f"wrote {version_dir} and {tta_dir} in {(time.time() - started) / 60:.1f} min")
    return 0


def version_folders(models: Path, version: str) -> list[Path]:
    """The folders of `version` and of its serving variants (`<version>-tta8`, ...)."""
    from .card import CARD_FILE

    return [d for d in sorted(models.iterdir()) if (d / CARD_FILE).exists()
            and (d.name == version or d.name.startswith(version + "-"))]


def fit_ood_for(folder: Path, features, views: int, folds) -> dict:
    """Fit the out-of-distribution model on the developer set's features as a version serves
    them (averaged over its first `views` orientations), its threshold out of fold over
    `folds` (a fold per cell), save it there; the card's entry."""
    from . import ood

    return ood.fit_and_save(features[:, :views].astype("float32").mean(axis=1), folds, folder)


def folds_of(version_dir: Path, paths: list[str]):
    """The cross-validation fold of each cell (in `paths` order), from the version's out_of_fold.csv."""
    import csv

    import numpy as np

    with (version_dir / "out_of_fold.csv").open() as f:
        fold = {row["path"]: int(row["fold"]) for row in csv.DictReader(f)}
    return np.array([fold[p] for p in paths])


def ood_command(args: argparse.Namespace) -> int:
    """Fit the out-of-distribution model of a version (and its serving variants) on the
    developer set's cached CNN features, and write it into their cards."""
    from .backbone import imagenet_weights
    from .card import read_card, write_card
    from .data import load_cells
    from .features import cached_features

    folders = version_folders(args.models, args.version)
    if not folders:
        print(f"no model version {args.version!r} in {args.models}", file=sys.stderr)
        return 2
    # The variants share the weights and the training recipe, so one set of features serves all.
    recipe = read_card(folders[0])
    window = int(recipe["input"].get("window", 0))
    cells = load_cells(args.data, recipe["input"]["image_size"], args.cache, window=window)
    features = cached_features(cells.images, cells.paths, tuple(recipe["training"]["scales"]), args.cache, imagenet_weights(None),
                               window=window)
    for folder in folders:
        card = read_card(folder)
        weights_dir = (folder / card["weights"]["file"]).resolve().parent  # a variant's CV is its weights' version's
        entry = fit_ood_for(folder, features, int(card["input"].get("views", 1)), folds_of(weights_dir, cells.paths.tolist()))
        write_card(folder, {**card, "ood": entry}, weights_file=card["weights"]["file"])
        print(f"{folder.name}: out-of-distribution threshold {entry['threshold']:.1f} ({entry['percentile']}th percentile of "
              f"out-of-fold distances; flags {entry['flagged_out_of_fold']:.2%} of unseen subjects' cells, where the in-sample "
              f"{entry['in_sample_threshold']:.1f} flagged {entry['in_sample_threshold_flagged_out_of_fold']:.2%})")
    return 0


def gate_command(args: argparse.Namespace) -> int:
    """Fit the input quality gate on the developer set and write it into a version's card
    (and its serving variants', e.g. -tta8: the gate depends on the data, not the weights)."""
    from .card import CARD_FILE, read_card, write_card
    from .data import read_manifest
    from .gate import fit_on_files

    folders = version_folders(args.models, args.version)
    if not folders:
        print(f"no model version {args.version!r} in {args.models}", file=sys.stderr)
        return 2
    gate = fit_on_files([str(args.data / r["path"]) for r in read_manifest(args.data)])
    summary = gate["developer_set"]
    print(f"developer set: {summary['pass_rate']:.2%} of {summary['images']} images pass; "
          f"failed per check: {', '.join(f'{k} {v}' for k, v in summary['failed_per_code'].items() if v) or 'none'}")
    for folder in folders:
        card = read_card(folder)
        write_card(folder, {**card, "quality_gate": gate}, weights_file=card["weights"]["file"])
        print(f"wrote the gate into {folder / CARD_FILE}")
    return 0


def export_command(args: argparse.Namespace) -> int:
    """Export a version's Keras model to LiteRT (`export.py`) and record the file in its card
    and its serving variants' cards (-tta8 serves the same file with more views)."""
    from .card import CARD_FILE, WEIGHTS_FILE, read_card, write_card
    from .export import export

    folders = version_folders(args.models, args.version)
    own = [f for f in folders if read_card(f)["weights"]["file"] == WEIGHTS_FILE]
    if not own:
        print(f"no model version {args.version!r} with its own weights in {args.models}", file=sys.stderr)
        return 2
    folder = own[0]
    entry = export(folder, read_card(folder))
    print(f"wrote {folder / entry['file']}: {entry['bytes'] / 1e6:.1f} MB, logits equal to "
          f"{entry['max_abs_logit_difference']:.1e} ({entry['checked_on']})")
    for variant in folders:
        card = read_card(variant)
        relative = entry["file"] if variant == folder else f"../{folder.name}/{entry['file']}"
        write_card(variant, {**card, "litert": {**entry, "file": relative}}, weights_file=card["weights"]["file"])
        print(f"recorded it in {variant / CARD_FILE}")
    return 0


def specimen_command(args: argparse.Namespace) -> int:
    """Write the specimen rule, and its outcome on the developer subjects' out-of-fold
    predictions, into a version's card and its serving variants' cards."""
    from .card import read_card, write_card
    from .specimen import SpecimenRule, evaluate_out_of_fold

    folders = version_folders(args.models, args.version)
    if not folders:
        print(f"no model version {args.version!r} in {args.models}", file=sys.stderr)
        return 2
    rule = SpecimenRule(args.min_called, args.positive_at_least, args.negative_below)
    for folder in folders:
        card = read_card(folder)
        out_of_fold = (folder / card["weights"]["file"]).resolve().parent / "out_of_fold.csv"  # a variant shares its weights' folder's
        entry = evaluate_out_of_fold(rule, card, out_of_fold)
        write_card(folder, {**card, "specimen": entry}, weights_file=card["weights"]["file"])
        print(f"{folder.name}: specimen calls by true label (developer subjects, out of fold): {entry['outcomes_by_true_label']}")
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    """Score a weights version on labelled images, through the same code path as serving."""
    import numpy as np

    from .baselines import SIZE_ALONE, size_alone_probability
    from .data import read_manifest
    from .metrics import plot, summarise
    from .plugin import LymphoblastRuntime, find_version, shipped_versions

    root = args.data.parent if args.data.is_file() else args.data
    rows = read_manifest(root)
    version = find_version(args.version, args.models)
    if version is None:
        have = ", ".join(v.version for v in shipped_versions(args.models))
        print(f"no model version {args.version!r} in {args.models} (have: {have})", file=sys.stderr)
        return 2
    runtime = LymphoblastRuntime(version)
    runtime.load()
    from PIL import Image
    from tqdm import tqdm

    from dxserve.images import to_rgb  # decode as the server does (16-bit, grey, alpha)

    probabilities, log_diameters = [], []
    for start in tqdm(range(0, len(rows), 64), unit="batch", file=sys.stderr):
        batch = np.stack([runtime.preprocess(to_rgb(Image.open(root / r["path"]))) for r in rows[start:start + 64]])
        probabilities.append(runtime.predict(batch)[:, 0])
        log_diameters.append(batch["log_diameter"])
    p = np.concatenate(probabilities)
    labels = np.array([1 if r["label"] == "all" else 0 for r in rows])
    subjects = np.array([r["subject"] for r in rows])
    report = summarise(p, labels, subjects, runtime.thresholds)
    report.update(model_version=version.version, weights_sha256=version.weights_sha256, data=str(args.data))
    size_fit = version.extra["card"].get("baselines", {}).get("size_alone")
    if size_fit:  # the size-alone rule fitted on the same training cells, on the same images
        baseline = summarise(size_alone_probability(size_fit, np.concatenate(log_diameters)), labels, subjects)
        report["baselines"] = {SIZE_ALONE: baseline}
        report["versus_baselines"] = {SIZE_ALONE: {m: None if report[m] is None or baseline[m] is None else report[m] - baseline[m]
                                                   for m in ("auroc", "weighted_f1")}}
        print(f"size alone on the same images: AUROC {_round(baseline['auroc'])}, weighted F1 {baseline['weighted_f1']:.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plots = plot(p, labels, args.out, f"{version.version} on {args.data.name}", runtime.thresholds.operating_point)
    print(f"weighted F1 {report['weighted_f1']:.3f}, sensitivity {report['sensitivity']:.3f}, specificity "
          f"{report['specificity']:.3f}, AUROC {_round(report['auroc'])}, "
          f"ECE {report['ece']:.3f}, indeterminate {report['indeterminate_fraction']:.3f}")
    print(f"wrote {args.out / 'report.json'} and {', '.join(p.name for p in plots)}")
    return 0


def _round(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dxserve-lymphoblast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="cross-validate by subject, then train and write a weights version with its card")
    train.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with manifest.csv (default: %(default)s)")
    train.add_argument("--version", required=True, help="version to write, e.g. 1.0.0")
    train.add_argument("--out", type=Path, default=MODELS_DIR, help="models folder (default: the plugin's own)")
    train.add_argument("--replace", action="store_true", help="overwrite the version's folder if it exists (default: refuse)")
    train.add_argument("--cache", type=Path, default=Path(".cache"), help="cache of preprocessed cells and backbone features")
    train.add_argument("--imagenet-weights", default="",
                       help="the ImageNet MobileNet file (default: $DXSERVE_IMAGENET_WEIGHTS or ../shared/weights/imagenet); "
                            "its SHA-256 is checked; 'none' starts from random weights (tests only)")
    train.add_argument("--image-size", type=int, default=224, help="served input size of the cell crop")
    train.add_argument("--scales", type=int, nargs="*", help="sizes the backbone sees the cell at (default: 224 128)")
    train.add_argument("--epochs", type=int, default=20, help="head epochs over all 8 orientations of every cell")
    train.add_argument("--mlp-units", type=int, default=64, help="hidden units of the MLP head (0: logistic)")
    train.add_argument("--dropout", type=float, default=0.3, help="dropout before and after the MLP's hidden layer")
    train.add_argument("--no-size", action="store_true", help="leave the log cell diameter out of the head's inputs")
    train.add_argument("--fine-tune-epochs", type=int, default=0,
                       help="then train the backbone's top blocks on augmented images for at most this many epochs, "
                            "stopped early on an inner subject-grouped fold (0: frozen)")
    train.add_argument("--fine-tune-learning-rate", type=float, default=3e-5, help="peak of its cosine schedule")
    train.add_argument("--fine-tune-patience", type=int, default=1,
                       help="inner-fold epochs without a better AUROC before fine-tuning stops (default: %(default)s)")
    train.add_argument("--fine-tune-from", default="conv_dw_12",
                       help="first backbone layer fine-tuning trains (default: %(default)s, blocks 12-13; '': all)")
    train.add_argument("--augmented-copies", type=int, default=0,
                       help="augmented copies of each cell (stain, white balance, blur, zoom) whose features the head also "
                            "learns from (1 copy: stain-cast |dP| 0.105 -> 0.063, but CV AUROC -0.01 and blur and "
                            "magnification sensitivity up; see README)")
    train.add_argument("--test-views", type=int, default=1, choices=(1, 2, 4, 8),
                       help="orientations the default version averages per result (a -tta8 version is always written too)")
    train.add_argument("--window", type=int, default=0,
                       help="side in canvas pixels of a fixed square centred on the cell that the model sees (one physical "
                            "scale for every cell; 3.x: 320); 0: the cell's own box (2.x)")
    train.add_argument("--heads", type=int, default=1,
                       help="MLP heads (seeds) averaged over one backbone pass, in every fold and in the shipped model")
    train.add_argument("--notes", type=Path,
                       help="Markdown file of what was tried for this version and not shipped, with its figures: goes into the card")
    train.add_argument("--folds", type=int, default=5)
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(run=train_command)

    gate = sub.add_parser("fit-gate", help="fit the input quality gate on the developer set and write it into a version's card")
    gate.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with manifest.csv (default: %(default)s)")
    gate.add_argument("--version", required=True, help="version whose card (and variants' cards) get the gate")
    gate.add_argument("--models", type=Path, default=MODELS_DIR)
    gate.set_defaults(run=gate_command)

    ood = sub.add_parser("fit-ood", help="fit the out-of-distribution score on the developer set's cached features")
    ood.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with manifest.csv (default: %(default)s)")
    ood.add_argument("--version", required=True, help="version whose card (and variants' cards) get it")
    ood.add_argument("--models", type=Path, default=MODELS_DIR)
    ood.add_argument("--cache", type=Path, default=Path(".cache"), help="cache of preprocessed cells and backbone features")
    ood.set_defaults(run=ood_command)

    specimen = sub.add_parser("specimen-rule", help="write the specimen-level rule and its out-of-fold outcome per "
                              "developer subject into a version's card")
    specimen.add_argument("--version", required=True)
    specimen.add_argument("--models", type=Path, default=MODELS_DIR)
    specimen.add_argument("--min-called", type=int, help="fewer called cells: indeterminate")
    specimen.add_argument("--positive-at-least", type=float, help="Wilson lower end at or above: blast-like cells predominate")
    specimen.add_argument("--negative-below", type=float, help="Wilson upper end below: no excess of blast-like cells")
    specimen.set_defaults(run=specimen_command, **SPECIMEN_DEFAULTS)

    export = sub.add_parser("export-litert", help="export a version to LiteRT (model.tflite, the served format) and record it "
                            "in its card (train does this itself)")
    export.add_argument("--version", required=True)
    export.add_argument("--models", type=Path, default=MODELS_DIR)
    export.set_defaults(run=export_command)

    evaluate = sub.add_parser("evaluate", help="score a weights version on a labelled folder or manifest; JSON report and plots")
    evaluate.add_argument("--data", type=Path, required=True, help="folder of *_all/*_hem images, or a manifest.csv")
    evaluate.add_argument("--version", default="", help="weights version (default: the newest shipped)")
    evaluate.add_argument("--models", type=Path, default=MODELS_DIR)
    evaluate.add_argument("--out", type=Path, required=True, help="folder for report.json and the PNG plots")
    evaluate.set_defaults(run=evaluate_command)

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
