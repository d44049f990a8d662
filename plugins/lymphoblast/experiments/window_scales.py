"""Which scales of the 320 px window pay beside the crop, and can one replace the crop's 128 px
pass at 2.0.0's cost? On round3.py's cached features, folds and heads:

    python plugins/lymphoblast/experiments/window_scales.py [--data DIR] [--cache DIR]

Research: nothing here is shipped; RESULTS.md says what it measured (against 2.1.0, whose
per-fold figures are in its card; the reference printed here is 2.0.0's, as in round3.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from round3 import cached_inputs, log, out_of_fold, report  # noqa: E402

from dxserve_lymphoblast.cli import DEFAULT_DATA  # noqa: E402

REFERENCE = [0.753, 0.838, 0.818, 0.889, 0.783]  # 2.0.0's per-fold AUROC (its card; round3.py recomputes it)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    args = parser.parse_args()
    config, cells, folds, fold, crop, window = cached_inputs(args.data, args.cache, 320)
    half = crop.shape[2] // 2  # each feature set holds the 224 px scale's features, then the 128 px scale's
    variants = {"crop 224+128 + window 128": np.concatenate([crop, window[:, :, half:]], axis=2),
                "crop 224 + window 128 (2.0.0's cost)": np.concatenate([crop[:, :, :half], window[:, :, half:]], axis=2)}
    for name, features in variants.items():
        log(f"{name}: training heads")
        for variant, z in out_of_fold(features, cells, folds, config).items():
            if variant.startswith("views 2") or variant.startswith("views 1 | 3"):
                report(f"{name} | {variant}", z, cells, fold, REFERENCE)


if __name__ == "__main__":
    main()
