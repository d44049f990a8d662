"""A site version of a lymphoblast version (`LymphoblastRuntime.adapt`, `dxserve site onboard`).

What depends on the laboratory is fitted again on its own images; the CNN's weights stay the
parent's unless step 3 chooses the fine-tuned one (a site version is served only while its
parent is unchanged, checked by hash):

0. the CNN's batch-norm statistics, re-estimated on every site cell, labelled or not, one set per
   scale (`adabn.py`); the result is the site's own LiteRT graph, kept (when step 3 chooses it)
   inside the site's weights file so that its one SHA-256 covers everything the site version
   computes with;
1. the quality gate's colour model (mean colour and its spread) on every site cell, labelled or
   not, so the site's stain is in range and a different one is still refused;
2. the out-of-distribution reference on the site cells' CNN features, from the graph step 3
   chose (mean, Ledoit-Wolf precision, threshold at the 99.5th percentile of out-of-fold
   distances);
3. the classifier, chosen by the report's grouped cross-validation (the best pooled out-of-fold
   AUROC) from four: the parent's own head, only calibrated (a lab close to the training lab
   keeps a model trained on far more patients than it labels); a logistic regression (L2,
   C = 0.05) on the 768 CNN features and the log cell diameter, standardised on the site's
   cells, with the parent's or with the site's batch-norm statistics; or the latter with the
   full-size CNN and the head trained on (`finetune.py`: started from that head, the site's
   statistics kept), its own graph (the site's graph is kept only when one of the last two is
   chosen; the fine-tuned one is fitted on every labelled cell only when it is chosen);
4. calibration (Platt) and the thresholds (screening at sensitivity 0.95, the calling band) on
   cross-fitted out-of-fold predictions; where each fold's map, fitted on the other folds,
   overstates on its own fold (groups that differ as slides do), one last map softens them all
   (`soften`), never sharpens. Every map is calibrated to the site's declared `prevalence` (the
   share of lymphoblasts among the cells it will send; else the labelled share), the classes
   weighted to it, and the report reads its ECE, indeterminate and confidently wrong shares at
   it: cells labelled half of each class rank best, and a site whose cells are mostly blasts
   then gets probabilities that hold at its own mix (Aria, each block declaring its share:
   verified ECE lower on 5 of 5 blocks, block 1's 0.19 -> 0.09; experiments/RESULTS.md).

The validation report is grouped cross-validation on the labelled cells (every group, a patient
or a block of images, on one side only), each figure beside, in the same splits: the parent
unadapted, size alone, colour alone (the mean colour of the cell as the model sees it),
background alone (the colour of the image's outer ring: the slide, for crops taken with it) and
the four classifiers it chose from (the site version's figure is the best of four, so slightly
flattered: shadow it on other patients before promoting it). It gives 95 % bootstrap intervals
over groups, per-fold and per-group spread, and a learning curve: the pooled out-of-fold AUROC
of site heads (site statistics) fitted on 10 / 25 / 50 / 100 of each training fold's cells
(pooled, as the site version's own figure is: a fold of one class, as when every patient has
one, has no AUROC of its own).
Every fitted step sees only the training folds' labelled cells (unlabelled cells are no labels).
Every fold's model, candidate, baseline or point of the curve, is read at its own level: its
logits less their median on the same 256 site cells (`level`; labels unused), and the site
version's calibration maps its logit less its own median there. Pooled as they came, the folds'
models' levels ranked a held-out group of one class backwards (noise 0.14-0.28 AUROC on Aria).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import expit

from dxserve import Adaptation, LabelledImage

from .calibration import Thresholds, choose_thresholds, expected_calibration_error, mix_weights
from .finetune import FineTuning
from .gate import _measure, check
from .gate import fit as fit_gate
from .preprocess import input_dtype

HEAD_FILE = "site_head.npz"
#: The classifiers a site version chooses from (the report's grouped cross-validation decides).
PARENT = "the parent, calibrated"
PARENT_STATISTICS = "the parent's batch-norm statistics"
SITE_STATISTICS = "the site's batch-norm statistics"
FINE_TUNED = "the site's statistics, its full-size CNN fine-tuned"
#: The site cells (labelled and unlabelled, labels unused: a seeded sample) every fold's model is read on (`level`).
REFERENCE = 256
C = 0.05  # L2 strength of the head: stable from 0.005 to 0.2 on Aria's cells (experiments/site_aria.py)
CURVE = (10, 25, 50, 100)
CONFIDENT = 0.9
BORDER_PX = 8  # the outer ring whose colour is the "background alone" baseline


def served_inputs(runtime, images: list[np.ndarray]) -> dict[str, np.ndarray]:
    """What the parent sees of each image: its model input record, logit, CNN features, log
    diameter, mean colour of the model's input cell, and the gate's statistics (for refitting its
    colour model)."""
    records, stats, colours, mean_rgb, border_rgb = [], [], [], [], []
    for image in images:
        record, _ = runtime.prepare(image)
        records.append(record)
        measured, colour = _measure(image)
        stats.append(measured)
        colours.append(colour if colour is not None else np.full(3, np.nan))
        cell = record["cell"]
        inside = cell.max(axis=2) > 12
        mean_rgb.append(cell[inside].mean(axis=0) if inside.any() else np.zeros(3))
        border_rgb.append(border_colour(image))
    batch = np.stack(records) if records else np.zeros(0, input_dtype(runtime.image_size))
    logits, features = in_chunks(runtime._run_with_features, batch)
    return {"records": batch, "logit": logits, "features": features, "log_diameter": batch["log_diameter"].astype(np.float64),
            "mean_rgb": np.array(mean_rgb), "border_rgb": np.array(border_rgb), "stats": stats, "colours": np.array(colours)}


def in_chunks(model, batch: np.ndarray, size: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Logits and float64 CNN features of stacked model input records, `size` at a time;
    `model`: records -> (logits, features)."""
    logits, features = [], []
    for start in range(0, len(batch), size):
        lo, f = model(batch[start:start + size])
        logits.append(lo)
        features.append(f)
    return np.concatenate(logits), np.concatenate(features).astype(np.float64)


def site_cnn(runtime, records: np.ndarray) -> tuple:
    """(the parent's Keras model, its scales, {scale: its backbone with batch-norm statistics
    re-estimated on the site's cells}: `adabn.py`)."""
    import keras

    from . import model as _registers_custom_layers  # noqa: F401
    from .adabn import adapted_backbones

    card = runtime.version.extra["card"]
    scales = card["training"]["scales"]
    parent = keras.models.load_model(runtime.version.extra["folder"] / card["weights"]["file"], compile=False)
    return parent, scales, adapted_backbones(parent, records["cell"], scales, runtime.views)


def graph_of(parent, scales: list[int], backbones: dict, cells: np.ndarray, views: int, weights: str) -> tuple[bytes, dict]:
    """The parent's graph with `backbones` as LiteRT bytes, checked on a few of the site's `cells`,
    and its card entry (`weights`: what became of the parent's CNN weights)."""
    from .adabn import SAMPLE
    from .adabn import site_graph as converted

    content, difference = converted(parent, scales, backbones, cells[:8])
    return content, {
        "batch_norm": f"re-estimated on {min(SAMPLE, len(cells))} of the site's {len(cells)} cells (AdaBN: labels unused), "
                      f"in {views} views, one set per scale ({', '.join(map(str, scales))} px)",
        "weights": weights, "bytes": len(content),
        "max_feature_difference_from_tensorflow (relative)": difference}


def site_graph(runtime, records: np.ndarray) -> tuple[bytes, dict]:
    """The parent's CNN with batch-norm statistics re-estimated on the site's cells (`adabn.py`), as
    LiteRT graph bytes, and its card entry."""
    parent, scales, backbones = site_cnn(runtime, records)
    return graph_of(parent, scales, backbones, records["cell"], runtime.views, "the parent's, unchanged")


def border_colour(image: np.ndarray, width: int = BORDER_PX) -> np.ndarray:
    """Mean RGB of the image's outer `width` pixels: black for a segmented cell, the slide's
    background for a crop taken with it (where a slide shortcut would show)."""
    rows, cols = image.shape[:2]
    width = max(1, min(width, rows // 2, cols // 2))
    ring = np.concatenate([image[:width].reshape(-1, 3), image[-width:].reshape(-1, 3),
                           image[width:-width, :width].reshape(-1, 3), image[width:-width, -width:].reshape(-1, 3)])
    return ring.astype(np.float64).mean(axis=0)


def design(features: np.ndarray, log_diameter: np.ndarray) -> np.ndarray:
    return np.column_stack([features, log_diameter])


def fit_head(x: np.ndarray, y: np.ndarray, standardise: tuple[np.ndarray, np.ndarray], c: float = C) -> dict:
    from sklearn.linear_model import LogisticRegression

    mean, scale = standardise
    model = LogisticRegression(C=c, max_iter=5000).fit((x - mean) / scale, y)
    return {"mean": mean, "scale": scale, "coef": model.coef_[0], "intercept": np.float64(model.intercept_[0])}


def head_logit(head: dict, x: np.ndarray) -> np.ndarray:
    return ((x - head["mean"]) / head["scale"]) @ head["coef"] + head["intercept"]


def fit_platt(logits: np.ndarray, y: np.ndarray, share: float | None = None) -> tuple[float, float]:
    """P = expit(a * logit + b), calibrated to `share` lymphoblasts (by default their share in `y`):
    the classes weighted to it (`mix_weights`), so the map's mean P at that mix is `share`. A
    slope that comes out negative (out-of-fold logits ranking the labels backwards: the head
    learnt nothing that holds across groups) is 0, never a flipped head: every cell then gets
    `share`, and is indeterminate."""
    from sklearn.linear_model import LogisticRegression

    share = float(np.mean(y)) if share is None else share
    model = LogisticRegression(C=1e6, max_iter=1000).fit(logits[:, None], y, sample_weight=mix_weights(y, share))
    a, b = float(model.coef_[0, 0]), float(model.intercept_[0])
    if a <= 0:
        share = float(np.clip(share, 1e-6, 1 - 1e-6))
        return 0.0, float(np.log(share / (1 - share)))
    return a, b


def soften(z: np.ndarray, y: np.ndarray, share: float | None = None) -> tuple[float, float]:
    """(c, d) of a last map expit(c * z + d) on cross-fitted calibrated logits `z`: where each
    fold's Platt map, fitted on the other folds, overstates on the fold it maps (groups that
    differ as slides do), c < 1 softens them all; it never sharpens (c at least 1: no map). On
    Aria, 100 labelled cells: the other blocks' cells confidently wrong 8.5 % -> 0.1 %. `share`:
    as `fit_platt`'s."""
    c, d = fit_platt(z, y, share)
    return (c, d) if c < 1 else (1.0, 0.0)


def folds_by_group(groups: np.ndarray, y: np.ndarray, k: int = 5) -> np.ndarray:
    """A fold number per image; every group in one fold (stratified by class where groups allow)."""
    from sklearn.model_selection import StratifiedGroupKFold

    k = max(2, min(k, len(set(groups))))
    out = np.zeros(len(groups), int)
    for fold, (_, test) in enumerate(StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=0).split(groups, y, groups)):
        out[test] = fold
    return out


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score)) if len(set(y.tolist())) == 2 else float("nan")


def interval(y, score, groups, draws: int = 200, seed: int = 0) -> list[float]:
    """95 % percentile bootstrap of AUROC over groups."""
    rng, names = np.random.default_rng(seed), np.unique(groups)
    index = {g: np.flatnonzero(groups == g) for g in names}
    values = []
    for _ in range(draws):
        picked = np.concatenate([index[g] for g in rng.choice(names, len(names))])
        if len(set(y[picked].tolist())) == 2:
            values.append(auroc(y[picked], score[picked]))
    return [round(float(v), 4) for v in np.percentile(values, [2.5, 97.5])] if values else [float("nan")] * 2


def per_group(groups: np.ndarray, y: np.ndarray, p: np.ndarray, thresholds: Thresholds) -> list[dict]:
    """Each group's images, labels, mean out-of-fold P(lymphoblast), share right (P on the right
    side of 0.5), and what the version would answer (`thresholds`' band): the shares called right
    and called wrong, the rest indeterminate. A patient or slide the version gets wrong as a whole
    shows here, where a pooled figure averages it away. "right" 0 says the version leans the wrong
    way on a group; "called_wrong" says whether a user would be told so, or told nothing (at a
    declared prevalence far from a half, a normal group's P can sit over 0.5 inside the band)."""
    from .plugin import LABELS

    decided, out = thresholds.decide(p), []
    for group in sorted(set(groups.tolist())):
        index = groups == group
        called = decided[index]
        out.append({"group": group, "images": int(index.sum()), LABELS[0]: int(y[index].sum()),
                    "mean_p": round(float(p[index].mean()), 4), "right": round(float(((p[index] >= 0.5) == y[index]).mean()), 4),
                    "called_right": round(float((called == y[index]).mean()), 4),
                    "called_wrong": round(float(((called != -1) & (called != y[index])).mean()), 4)})
    return out


def level(logits: np.ndarray) -> float:
    """Where a model puts the reference site cells: the median of its logits on them. Models fitted
    on different folds sit at different levels: a fold short of one class moves the intercept,
    and where every group is of one class (a patient, a slide), the held-out class is the one the
    training folds are short of, so pooled out-of-fold logits rank it backwards. On Aria's blocks
    (100 labelled cells, 10-12 groups, all of one class), logistic regression on pure noise
    pooled 0.14-0.28 AUROC, size alone 0.14-0.39; each fold's logits less its model's `level`:
    noise 0.42-0.60, size 0.35-0.65 (experiments/RESULTS.md). Every fold's logits, the
    candidates', the baselines' and the learning curve's, are read so, and the site version's
    own by its own level: a constant per model, so nothing in one model's ranking changes."""
    return float(np.median(logits)) if len(logits) else 0.0


@dataclass(frozen=True)
class Calibrated:
    """Step 4 on the chosen candidate's pooled out-of-fold logits (`calibrate`)."""

    share: float  # the share of lymphoblasts every map is calibrated to, and the figures read at
    a: float  # the site version's map, P = expit(a * logit + b), before its own level
    b: float
    p: np.ndarray  # each labelled image's cross-fitted P: its fold mapped by a map fitted on the other folds
    screened: np.ndarray  # each one's screen, by a threshold fitted on the other folds
    thresholds: Thresholds  # the site version's, chosen on `p`

    def figures(self, y: np.ndarray) -> dict[str, float]:
        """The report's calibration figures; ece, indeterminate and confidently wrong at `share` (each
        labelled image weighted so: `mix_weights`), the screen's per class."""
        weight = mix_weights(y, self.share)
        wrong = ((self.p >= CONFIDENT) & (y == 0)) | ((self.p <= 1 - CONFIDENT) & (y == 1))
        return {"ece": round(expected_calibration_error(self.p, y, weight=weight), 4),
                "sensitivity_at_screen": round(float(self.screened[y == 1].mean()), 4),
                "specificity_at_screen": round(float((~self.screened[y == 0]).mean()), 4),
                "indeterminate": round(float(np.average(self.thresholds.decide(self.p) == -1, weights=weight)), 4),
                "confidently_wrong": round(float(np.average(wrong, weights=weight)), 4)}


def calibrate(oof: np.ndarray, y: np.ndarray, folds: np.ndarray, share: float) -> Calibrated:
    """Cross-fitted calibration and screening threshold: fold k's by a map and threshold fitted on
    the other folds, then one softening of them all (how far those maps overstate across groups),
    and the site version's map, fitted on every fold and softened alike. Every map is calibrated
    to `share`, each fold's too: where groups are of one class, the other folds are short of the
    held-out fold's class."""
    maps = {k: fit_platt(oof[folds != k], y[folds != k], share) for k in np.unique(folds)}
    z = np.zeros(len(y))
    for k, (a, b) in maps.items():
        z[folds == k] = a * oof[folds == k] + b
    c, d = soften(z, y, share)
    p, screened = expit(c * z + d), np.zeros(len(y), bool)
    for k, (a, b) in maps.items():
        other, test = folds != k, folds == k
        screened[test] = choose_thresholds(expit(c * (a * oof[other] + b) + d), y[other]).screen(p[test])
    a, b = fit_platt(oof, y, share)
    return Calibrated(share, c * a, c * b + d, p, screened, choose_thresholds(p, y, weight=mix_weights(y, share)))


def choose(candidates: dict[str, np.ndarray], y: np.ndarray) -> tuple[str, dict[str, float]]:
    """The candidate whose out-of-fold scores rank `y` best (pooled AUROC), and every candidate's
    AUROC; on a tie the one listed first (the simpler), and an undefined AUROC never wins."""
    scores = {name: auroc(y, score) for name, score in candidates.items()}
    order = list(candidates)
    return max(order, key=lambda name: (np.nan_to_num(scores[name], nan=-1.0), -order.index(name))), scores


def adapt(runtime, labelled: list[LabelledImage], unlabelled: list[np.ndarray], folder: Path,
          prevalence: float | None = None) -> Adaptation:
    from . import ood as ood_model
    from .baselines import fitted_logistic
    from .plugin import LABELS

    y = np.array([item.label == LABELS[0] for item in labelled], int)
    if len(set(y.tolist())) < 2:
        raise ValueError("the labelled images must hold both labels")
    groups = np.array([item.group for item in labelled])
    seen = served_inputs(runtime, [item.image for item in labelled])
    site = served_inputs(runtime, list(unlabelled)) if len(unlabelled) else None
    parts = [seen] + ([site] if site is not None else [])

    # 0: the site's batch-norm statistics and its graph; every cell's CNN features both ways.
    records = np.concatenate([part["records"] for part in parts])
    parent_cnn, scales, backbones = site_cnn(runtime, records)
    graph, graph_entry = graph_of(parent_cnn, scales, backbones, records["cell"], runtime.views, "the parent's, unchanged")
    from .litert import LiteRTModel

    site_model = LiteRTModel(graph, runtime.views)
    for part in parts:
        part["parent_features"] = part["features"]
        part["features"] = in_chunks(lambda r: site_model(r["cell"], r["log_diameter"]), part["records"])[1]
    every = {k: np.concatenate([part[k] for part in parts])
             for k in ("features", "parent_features", "log_diameter", "colours", "logit", "mean_rgb", "border_rgb")}
    stats = [measured for part in parts for measured in part["stats"]]

    # 1: the gate's colour model, on every site cell.
    parent_gate = runtime.version.extra["card"]["quality_gate"]
    colours = every["colours"][~np.isnan(every["colours"]).any(axis=1)]
    refitted = fit_gate(stats, colours)
    gate = {**parent_gate, "colour": refitted["colour"],
            "ranges": {**parent_gate["ranges"], "colour_distance": refitted["ranges"]["colour_distance"]},
            "fitted_on": f"the parent's ranges; colour model and colour distance refitted on {len(colours)} site cells"}

    # 3: four classifiers in the same grouped folds; the site version is the one that ranks the
    # labelled cells best out of fold: the parent as it is (only calibrated), a site head on the
    # parent's or on the site's statistics, or the latter with its full-size CNN fine-tuned too.
    designs = {PARENT_STATISTICS: (design(seen["parent_features"], seen["log_diameter"]),
                                   design(every["parent_features"], every["log_diameter"])),
               SITE_STATISTICS: (design(seen["features"], seen["log_diameter"]), design(every["features"], every["log_diameter"]))}
    standardised = {name: (all_x.mean(axis=0), np.maximum(all_x.std(axis=0), 1e-6)) for name, (_, all_x) in designs.items()}
    x, standardise = designs[SITE_STATISTICS][0], standardised[SITE_STATISTICS]
    folds = folds_by_group(groups, y)
    # Each fold's model is read relative to where it puts the same site cells (`level`).
    reference = np.sort(np.random.default_rng(0).choice(len(records), min(REFERENCE, len(records)), replace=False))
    on_reference = {name: all_x[reference] for name, (_, all_x) in designs.items()}
    candidates = {PARENT: seen["logit"] - level(every["logit"][reference]), PARENT_STATISTICS: np.zeros(len(y)),
                  SITE_STATISTICS: np.zeros(len(y)), FINE_TUNED: np.zeros(len(y))}
    tuning = FineTuning(backbones[runtime.image_size], seen["records"]["cell"], x, y, runtime.views)
    alone = {"size alone": "log_diameter", "colour alone": "mean_rgb", "background alone": "border_rgb"}
    baselines = {name: np.zeros(len(y)) for name in alone}
    curve = {n: np.full(len(y), np.nan) for n in CURVE}  # out-of-fold logits of heads fitted on n cells
    for k in np.unique(folds):
        train, test = folds != k, folds == k
        heads = {name: fit_head(x_name[train], y[train], standardised[name]) for name, (x_name, _) in designs.items()}
        for name, (x_name, _) in designs.items():
            candidates[name][test] = head_logit(heads[name], x_name[test]) - level(head_logit(heads[name], on_reference[name]))
        tuned, tuned_reference = tuning.out_of_fold(train, test, heads[SITE_STATISTICS], seed=int(k),  # started from its head
                                                    reference=(records["cell"][reference], on_reference[SITE_STATISTICS]))
        candidates[FINE_TUNED][test] = tuned - level(tuned_reference)
        for name, key in alone.items():
            columns, on_cells = seen[key].reshape(len(y), -1), every[key][reference].reshape(len(reference), -1)
            logit = fitted_logistic(columns[train], y[train])
            baselines[name][test] = logit(columns[test]) - level(logit(on_cells))
        rng = np.random.default_rng(int(k))
        for n in CURVE:
            idx = np.flatnonzero(train)
            per_class = [rng.permutation(idx[y[idx] == c])[: max(1, n // 2)] for c in (0, 1)]
            picked = np.concatenate(per_class)
            if len(picked) >= min(n, train.sum()) * 0.9 and len(set(y[picked].tolist())) == 2:
                head = fit_head(x[picked], y[picked], standardise)
                curve[n][test] = head_logit(head, x[test]) - level(head_logit(head, on_reference[SITE_STATISTICS]))
    chosen, scores = choose(candidates, y)
    oof = candidates[chosen]
    # 4: cross-fitted calibration and screening threshold, at the declared prevalence (else the labelled share).
    calibrated = calibrate(oof, y, folds, float(y.mean()) if prevalence is None else float(prevalence))
    a, b = calibrated.a, calibrated.b
    per_fold = [round(auroc(y[folds == k], oof[folds == k]), 4) for k in np.unique(folds)]

    # The chosen graph: the fine-tuned one is made now, fitted on every labelled cell. Calibration
    # maps the site version's logit less its own level, folded into the map's intercept.
    head = {}
    if chosen == FINE_TUNED:
        tuned, head = tuning.fit(fit_head(x, y, standardise))
        graph, graph_entry = graph_of(parent_cnn, scales, {**backbones, runtime.image_size: tuned}, records["cell"],
                                      runtime.views, f"the parent's, the {runtime.image_size} px backbone fine-tuned: "
                                      f"{tuning.describe()}")
        tuned_model = LiteRTModel(graph, runtime.views)
        every["features"] = in_chunks(lambda r: tuned_model(r["cell"], r["log_diameter"]), records)[1]
        own = level(head_logit(head, design(every["features"][reference], every["log_diameter"][reference])))
    elif chosen != PARENT:
        head = fit_head(designs[chosen][0], y, standardised[chosen])
        own = level(head_logit(head, on_reference[chosen]))
    else:
        own = level(every["logit"][reference])
    b -= a * own
    stored = {"platt": np.array([a, b]), **head}

    # 2: the out-of-distribution reference, on the chosen graph's features of every site cell.
    features = every["parent_features"] if chosen in (PARENT, PARENT_STATISTICS) else every["features"]
    ood = ood_model.fit(features, folds=np.arange(len(features)) % 5)
    ood_entry = ood_model.save(ood, folder, threshold_from="out-of-fold distances of the site's cells (5 folds)",
                               fitted_on=f"{len(features)} site cells")
    if chosen in (SITE_STATISTICS, FINE_TUNED):
        stored["graph"] = np.frombuffer(graph, np.uint8)
    np.savez(folder / HEAD_FILE, **stored)
    baselines = {"parent unadapted": candidates[PARENT],
                 **{f"site head, {name}": candidates[name] for name in (PARENT_STATISTICS, SITE_STATISTICS, FINE_TUNED)},
                 **baselines}
    report = {
        "protocol": (f"grouped {len(np.unique(folds))}-fold cross-validation on the labelled images (StratifiedGroupKFold "
                     "by `group`: no group on both sides); the head, Platt calibration and screening threshold of each "
                     "fold fitted on the other folds only; baselines (logistic) in the same folds; each fold's logits "
                     f"less their median on the same {len(reference)} site cells (labels unused), the site version's "
                     "less its own; intervals: 95 % bootstrap over groups"),
        "labelled": {"images": int(len(y)), "groups": int(len(set(groups.tolist()))), LABELS[0]: int(y.sum()),
                     LABELS[1]: int((1 - y).sum()),
                     # Groups of one class (patients all blasts or all normal): a fitted head's out-of-fold
                     # figures are then biased low, the more so the fewer the groups (RESULTS.md, C-NMC).
                     "groups_of_one_class": int(sum(len(set(y[groups == g].tolist())) == 1 for g in set(groups.tolist())))},
        "unlabelled_images": int(len(unlabelled)),
        # The share of lymphoblasts the probabilities are calibrated to, and ece, indeterminate and
        # confidently_wrong are read at (each labelled image weighted so): declared, or the labelled share.
        "prevalence": {"calibrated_at": round(calibrated.share, 4), "declared": prevalence is not None},
        "fine_tuning": {"schedule": tuning.describe(), "fits": tuning.fits, "seconds": round(tuning.seconds, 1)},
        "classifier": chosen,
        "auroc": {"site version": round(auroc(y, oof), 4), "interval": interval(y, oof, groups), "per_fold": per_fold,
                  **{name: round(auroc(y, s), 4) for name, s in baselines.items()},
                  **{f"{name} interval": interval(y, s, groups) for name, s in baselines.items()}},
        "margin_over_colour_alone": round(auroc(y, oof) - auroc(y, baselines["colour alone"]), 4),
        "margin_over_background_alone": round(auroc(y, oof) - auroc(y, baselines["background alone"]), 4),
        "per_group": per_group(groups, y, calibrated.p, calibrated.thresholds),
        "learning_curve_auroc": {str(n): round(auroc(y[~np.isnan(v)], v[~np.isnan(v)]), 4) for n, v in curve.items()},
        **calibrated.figures(y),
        "gate_passed_site_images": round(float(np.mean([not check(image, gate) for image in
                                                         [item.image for item in labelled] + list(unlabelled)])), 4),
        "gate_passed_site_images_parent": round(float(np.mean([not check(image, parent_gate) for image in
                                                                [item.image for item in labelled] + list(unlabelled)])), 4),
        "ood_flagged_site_images_parent": round(float(np.mean(ood_model.distance(every["parent_features"], runtime.ood)
                                                              > float(runtime.ood["threshold"]))), 4),
    }
    report["acceptance"] = {"labelled": report["labelled"]["images"], "auroc": report["auroc"]["site version"],
                            "sensitivity_at_screen": report["sensitivity_at_screen"], "ece": report["ece"],
                            "confidently_wrong": report["confidently_wrong"],
                            "margin_over_colour_alone": report["margin_over_colour_alone"]}
    card = {"quality_gate": gate, "ood": ood_entry, "thresholds": calibrated.thresholds.to_dict(),
            "calibration": {"method": f"Platt scaling of the logit of {chosen}", "a": a, "b": b,
                            "fitted_on": "the pooled out-of-fold logits of the grouped cross-validation, each fold's "
                                         f"less its model's median on {len(reference)} site cells",
                            "level": own, "prevalence": calibrated.share},
            "backbone": graph_entry if chosen in (SITE_STATISTICS, FINE_TUNED) else "the parent's, with its statistics",
            "head": {"file": HEAD_FILE, "classifier": chosen,
                     "chosen_from": {name: round(score, 4) for name, score in scores.items()},
                     "method": ("the parent's own head" if chosen == PARENT else
                                f"logistic regression, L2 C={C}, on the CNN features of {chosen} and the log cell diameter, "
                                "standardised on the site's cells"
                                + (" (the site's statistics), then trained with the CNN (finetune.py)" if chosen == FINE_TUNED else ""))}}
    return Adaptation(HEAD_FILE, report, card)
