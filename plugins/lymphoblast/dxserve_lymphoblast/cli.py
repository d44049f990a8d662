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


def write_out_of_fold(version_dir: Path, oof, threshold: float) -> None:
    """Every developer-set image's out-of-fold prediction (for audit) and its plots."""
    import csv

    from .metrics import plot

    with (version_dir / "out_of_fold.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "subject", "label", "fold", "logit", "p_lymphoblast"])
        for row in zip(oof.cells.paths, oof.cells.subjects, oof.cells.labels, oof.fold, oof.logits, oof.probabilities, strict=True):
            writer.writerow([row[0], row[1], "lymphoblast" if row[2] else "normal", int(row[3]) + 1, f"{row[4]:.5f}", f"{row[5]:.5f}"])
    plot(oof.probabilities, oof.cells.labels, version_dir, "pooled out-of-fold", threshold)


def train_command(args: argparse.Namespace) -> int:
    from .calibration import Thresholds
    from .card import DATA, INTENDED_USE, LIMITATIONS, WEIGHTS_FILE, write_card
    from .data import load_cells
    from .train import TrainConfig, config_dict, cross_validate, train_final

    config = TrainConfig(image_size=args.image_size, epochs=args.epochs, folds=args.folds, seed=args.seed,
                         patience=args.patience, batch_size=args.batch_size, grey=args.grey, dropout=args.dropout)
    started = time.time()
    cells = load_cells(args.data, config.image_size, args.cache)
    print(f"{len(cells)} images from {len(set(cells.subjects.tolist()))} subjects", flush=True)
    log = lambda message: print(message, flush=True)  # noqa: E731
    evaluation, oof = cross_validate(cells, config, log)
    temperature = evaluation.pop("temperature")
    thresholds = Thresholds(**evaluation["thresholds"])
    model, final = train_final(cells, config, evaluation["final_epochs"], log)

    version_dir = args.out / args.version
    version_dir.mkdir(parents=True, exist_ok=True)
    model.save(version_dir / WEIGHTS_FILE)
    write_out_of_fold(version_dir, oof, thresholds.operating_point)
    evaluation["protocol"] = (
        f"Stratified grouped {config.folds}-fold cross-validation over `subject_group` (no subject, nor any "
        "subject sharing images with it, is on both sides). In each fold the training subjects are split "
        "again by group; the inner validation subjects choose the epoch (early stopping on AUROC). The fold's "
        "test subjects are only predicted. Calibration is cross-fitted: a fold's probabilities use a temperature "
        "fitted on the other folds' out-of-fold logits. Fold metrics use P >= 0.5; the operating point and "
        "indeterminate band are chosen on the pooled out-of-fold predictions (`out_of_fold.csv`, plots "
        "`roc.png`, `reliability.png`, `confusion.png`). The shipped model is then trained on every subject "
        f"for {evaluation['final_epochs']} epochs, the folds' median best epoch."
    )
    card = {
        "plugin": "lymphoblast",
        "version": args.version,
        "labels": ["lymphoblast", "normal"],
        "trained_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "training_seconds": round(time.time() - started, 1),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPU cores, no GPU",
        "command": "dxserve-lymphoblast " + shlex.join(sys.argv[1:]),
        "architecture": (
            f"CNN feature extractor (stain normalisation{', greyscale' if config.grey else ''}, "
            f"strided stem {config.stem}, conv blocks {list(config.widths)}, "
            f"global average pooling) + the cell's standardised log diameter -> MLP ({config.mlp_units} units, "
            f"dropout {config.dropout}) -> 1 logit; input {config.image_size}x{config.image_size} RGB crop of the cell"
        ),
        "input": {"image_size": config.image_size, "preprocessing": "crop to cell, pad square, resize, scale to [0,1]; "
                  "log of the cell's equivalent diameter in pixels (magnification-dependent)"},
        "training": {**config_dict(config), "final": final},
        "data": {**DATA, "images": len(cells), "lymphoblasts": int(cells.labels.sum()),
                 "normals": int((cells.labels == 0).sum()), "subjects": len(set(cells.subjects.tolist())),
                 "subject_groups": len(set(cells.groups.tolist()))},
        "evaluation": evaluation,
        "calibration": {"method": "temperature scaling", "temperature": temperature,
                        "fitted_on": "the pooled out-of-fold logits of the cross-validation (every subject, each "
                                     "predicted by a model that never saw it)"},
        "thresholds": thresholds.to_dict(),
        "intended_use": INTENDED_USE,
        "limitations": LIMITATIONS,
    }
    write_card(version_dir, card)
    print(f"wrote {version_dir} in {(time.time() - started) / 60:.1f} min", flush=True)
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    """Score a weights version on labelled images, through the same code path as serving."""
    import numpy as np

    from .data import read_manifest
    from .metrics import plot, summarise
    from .plugin import LymphoblastRuntime, shipped_versions

    root = args.data.parent if args.data.is_file() else args.data
    rows = read_manifest(root)
    versions = {v.version: v for v in shipped_versions(args.models)}
    version = versions.get(args.version) if args.version else next(iter(versions.values()), None)
    if version is None:
        print(f"no model version {args.version!r} in {args.models} (have: {', '.join(versions)})", file=sys.stderr)
        return 2
    runtime = LymphoblastRuntime(version)
    runtime.load()
    from PIL import Image
    from tqdm import tqdm

    from dxserve.images import to_rgb  # decode as the server does (16-bit, grey, alpha)

    probabilities = []
    for start in tqdm(range(0, len(rows), 64), unit="batch", file=sys.stderr):
        batch = [runtime.preprocess(to_rgb(Image.open(root / r["path"]))) for r in rows[start:start + 64]]
        probabilities.append(runtime.predict(np.stack(batch))[:, 0])
    p = np.concatenate(probabilities)
    labels = np.array([1 if r["label"] == "all" else 0 for r in rows])
    subjects = np.array([r["subject"] for r in rows])
    report = summarise(p, labels, subjects, runtime.thresholds)
    report.update(model_version=version.version, weights_sha256=version.weights_sha256, data=str(args.data))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plots = plot(p, labels, args.out, f"{version.version} on {args.data.name}", runtime.thresholds.operating_point)
    print(f"weighted F1 {report['weighted_f1']:.3f}, sensitivity {report['sensitivity']:.3f}, specificity "
          f"{report['specificity']:.3f}, AUROC {report['auroc'] if report['auroc'] is None else round(report['auroc'], 3)}, "
          f"ECE {report['ece']:.3f}, indeterminate {report['indeterminate_fraction']:.3f}")
    print(f"wrote {args.out / 'report.json'} and {', '.join(p.name for p in plots)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dxserve-lymphoblast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="cross-validate by subject, then train and write a weights version with its card")
    train.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with manifest.csv (default: %(default)s)")
    train.add_argument("--version", required=True, help="version to write, e.g. 1.0.0")
    train.add_argument("--out", type=Path, default=MODELS_DIR, help="models folder (default: the plugin's own)")
    train.add_argument("--cache", type=Path, default=Path(".cache"), help="cache of preprocessed cells")
    train.add_argument("--image-size", type=int, default=96)
    train.add_argument("--epochs", type=int, default=30)
    train.add_argument("--patience", type=int, default=8)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--folds", type=int, default=5)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--dropout", type=float, default=0.4, help="dropout before and after the MLP's hidden layer")
    train.add_argument("--grey", action="store_true", help="the CNN sees the stain-normalised luminance only")
    train.set_defaults(run=train_command)

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
