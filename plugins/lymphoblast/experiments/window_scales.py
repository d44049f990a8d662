"""Which scales of the 320 px window pay beside the crop, and can one replace the crop's 128 px
pass at 2.0.0's cost? On round3.py's cached features, folds and heads (run round3.py first):

    python plugins/lymphoblast/experiments/window_scales.py

Research: nothing here is shipped; RESULTS.md says what it measured."""
import sys
sys.path.insert(0, "plugins/lymphoblast/experiments")
import numpy as np
from sklearn.metrics import roc_auc_score
from round3 import out_of_fold, report, window_cells, log
from dxserve_lymphoblast.backbone import imagenet_weights
from dxserve_lymphoblast.cli import DEFAULT_DATA
from dxserve_lymphoblast.data import grouped_folds, load_cells
from dxserve_lymphoblast.features import cached_features
from dxserve_lymphoblast.train import TrainConfig
from pathlib import Path

cache = Path(".cache")
config, backbone = TrainConfig(test_views=2), imagenet_weights()
cells = load_cells(DEFAULT_DATA, config.image_size, cache)
folds = grouped_folds(cells, config.folds, config.seed)
fold = np.zeros(len(cells), int)
for k, (_, test) in enumerate(folds):
    fold[test] = k
crop = cached_features(cells.images, cells.paths, config.scales, cache, backbone, log=log)
windowed = window_cells(DEFAULT_DATA, cells, 320, cache)
window = cached_features(windowed.images, windowed.paths, config.scales, cache, backbone, log=log)
half = crop.shape[2] // 2  # 224 px scale first, then 128 px
variants = {"crop 224+128 + window 128": np.concatenate([crop, window[:, :, half:]], axis=2),
            "crop 224 + window 128 (2.0.0's cost)": np.concatenate([crop[:, :, :half], window[:, :, half:]], axis=2)}
ref = [0.753, 0.838, 0.818, 0.889, 0.783]
for name, features in variants.items():
    log(f"{name}: training heads")
    for variant, z in out_of_fold(features, cells, folds, config).items():
        if variant.startswith("views 2") or variant.startswith("views 1 | 3"):
            report(f"{name} | {variant}", z, cells, fold, ref)
