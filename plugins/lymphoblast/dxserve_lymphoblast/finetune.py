"""The site's full-size CNN fine-tuned on its labelled cells, with its site head (a fourth candidate
of `adaptation.adapt`).

The other candidates train only a head on frozen features; on Aria's cells they level off at
0.82-0.85 per cell from 100 labelled cells. Training the CNN too, from the site's batch-norm
statistics (`adabn.py`) and the site head fitted on them, ranked the other blocks' cells at 0.870
against 0.823 for that head alone, better in 10 of 10 draws (`experiments/site_aria_finetune.py`).

What is trained, and what is not:
- the backbone at the full input size (224 px): every weight but the batch-norm layers, which
  keep the site's statistics (inference mode: a batch of 16 cells estimates nothing well);
- the head: a dense layer on the standardised design (`adaptation.design`: the CNN features and
  the log diameter), started from the logistic site head, with dropout before it;
- not the smaller scales' backbone: its features are the site-statistics graph's, held fixed.
Each cell is seen in a random one of its 8 orientations each epoch (a cell has no "up").

The result is the same kind of thing as a site head on the site's statistics, so it is served the
same way: a LiteRT graph (`adabn.site_graph` with this backbone at 224 px) and a head of the same
form (`mean`, `scale`, `coef`, `intercept`).

Needs TensorFlow (the training extra), as onboarding does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .features import view


@dataclass(frozen=True)
class Schedule:
    """How the CNN is fine-tuned. 40 epochs at Adam 1e-4 ranked best on Aria (3e-4: 0.857 against
    0.870); a fit on 100 cells takes about 40 s on 2 cores."""

    epochs: int = 40
    learning_rate: float = 1e-4
    batch: int = 16
    dropout: float = 0.2


#: The schedule `adapt` uses (tests shorten it).
SCHEDULE = Schedule()


def oriented(cells: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Cell i (n, s, s, 3) in orientation k[i] of 8, as training's views (`features.view`)."""
    out = np.empty_like(cells)
    for turn in np.unique(k):
        out[k == turn] = view(cells[k == turn], int(turn))
    return out


def pooled_features(backbone, cells: np.ndarray, views: int, batch: int = 32) -> np.ndarray:
    """(n, d) float64: `backbone`'s outputs (a list, `model.FEATURE_LAYERS`) globally average-pooled
    and joined, on uint8 cells at the backbone's own size, averaged over the first `views`
    orientations: the full-size columns of the served graph's features (`export.single_view_function`)."""
    from .litert import views_of

    out = []
    for start in range(0, len(cells), batch):
        part = cells[start:start + batch]
        x = views_of(part, views).astype(np.float32) / 127.5 - 1.0  # MobileNet's [-1, 1]
        joined = np.concatenate([np.asarray(o).mean(axis=(1, 2)) for o in backbone([x], training=False)], axis=1)
        out.append(joined.reshape(views, len(part), -1).mean(axis=0))
    return np.concatenate(out).astype(np.float64)


def trainable_copy(backbone):
    """A copy of `backbone` to train: every weight trains but the batch-norm layers', which run in
    inference mode, so that their statistics (the site's) stay."""
    import keras

    copy = keras.models.clone_model(backbone)
    copy.set_weights(backbone.get_weights())
    for layer in copy.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    return copy


def fine_tuned(backbone, head: dict, cells: np.ndarray, fixed: np.ndarray, y: np.ndarray, schedule: Schedule = SCHEDULE,
               seed: int = 0) -> tuple:
    """(a fine-tuned copy of `backbone`, its head) from the labelled `cells` (uint8, at the
    backbone's size) and labels `y`. `head`: the logistic site head (`adaptation.fit_head`) on the
    design [backbone's pooled features, `fixed`], where `fixed` (n, k) are the columns the fit
    does not change (the smaller scales' features and the log diameter); the returned head has
    the same form, its standardisation unchanged."""
    import keras

    keras.utils.set_random_seed(seed)
    tuned = trainable_copy(backbone)
    size = cells.shape[1]
    image, rest = keras.Input((size, size, 3)), keras.Input((fixed.shape[1],))
    joined = keras.layers.Concatenate()([keras.layers.GlobalAveragePooling2D()(o) for o in tuned([image])] + [rest])
    standardised = keras.layers.Normalization(mean=head["mean"], variance=np.square(head["scale"]))(joined)
    dense = keras.layers.Dense(1)
    model = keras.Model([image, rest], dense(keras.layers.Dropout(schedule.dropout)(standardised)))
    dense.set_weights([head["coef"][:, None].astype(np.float32), np.array([head["intercept"]], np.float32)])
    model.compile(optimizer=keras.optimizers.Adam(schedule.learning_rate), loss=keras.losses.BinaryCrossentropy(from_logits=True))
    rng, target, rest_x = np.random.default_rng(seed), y.astype(np.float32)[:, None], fixed.astype(np.float32)
    for _ in range(schedule.epochs):
        order = rng.permutation(len(cells))
        for start in range(0, len(order), schedule.batch):
            part = order[start:start + schedule.batch]
            x = oriented(cells[part], rng.integers(8, size=len(part))).astype(np.float32) / 127.5 - 1.0
            model.train_on_batch([x, rest_x[part]], target[part])
    kernel, bias = dense.get_weights()
    return tuned, {"mean": head["mean"], "scale": head["scale"], "coef": kernel[:, 0].astype(np.float64),
                   "intercept": np.float64(bias[0])}


class FineTuning:
    """Fine-tuning within `adapt`'s folds and on every labelled cell, with the time it took.
    `backbone`: the full-size backbone with the site's statistics; `cells`: the labelled cells
    (uint8); `x`: their design on the site's statistics (full-size features first, as the graph
    orders them); `y`: their labels."""

    def __init__(self, backbone, cells: np.ndarray, x: np.ndarray, y: np.ndarray, views: int, schedule: Schedule | None = None):
        self.backbone, self.cells, self.x, self.y, self.views = backbone, cells, x, y, views
        self.schedule = schedule or SCHEDULE
        self.full = sum(int(output.shape[-1]) for output in backbone.outputs)  # the full-size columns of x
        self.seconds, self.fits = 0.0, 0

    def out_of_fold(self, train: np.ndarray, test: np.ndarray, head: dict, seed: int,
                    reference: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Logits of the `test` cells from a fine-tuning on the `train` cells, started from `head`,
        and of the `reference` cells (uint8, and their design on the site's statistics)."""
        from .adaptation import head_logit

        tuned, tuned_head = self._fit(train, head, seed)
        started = time.perf_counter()
        test_logits, reference_logits = [
            head_logit(tuned_head, np.column_stack([pooled_features(tuned, cells, self.views), x[:, self.full:]]))
            for cells, x in ((self.cells[test], self.x[test]), reference)]
        self.seconds += time.perf_counter() - started
        return test_logits, reference_logits

    def fit(self, head: dict) -> tuple:
        """(the backbone, its head) fine-tuned on every labelled cell, started from `head`."""
        return self._fit(np.ones(len(self.y), bool), head, seed=len(self.y))

    def _fit(self, index: np.ndarray, head: dict, seed: int) -> tuple:
        started = time.perf_counter()
        out = fine_tuned(self.backbone, head, self.cells[index], self.x[index, self.full:], self.y[index], self.schedule, seed)
        self.seconds, self.fits = self.seconds + time.perf_counter() - started, self.fits + 1
        return out

    def describe(self) -> str:
        s = self.schedule
        return (f"{s.epochs} epochs, Adam {s.learning_rate:g}, batches of {s.batch}, dropout {s.dropout:g} before the head, "
                "batch norm frozen at the site's statistics, a random orientation of 8 each epoch")
