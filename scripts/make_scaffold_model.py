"""Regenerate `server/dxserve/scaffold_model.tflite`, the placeholder model `dxserve plugin new`
copies into a new plugin: mean brightness (n, 1) -> P(dark), P(bright) (n, 2), a logistic with
slope 12 around 0.5, as LiteRT runs it. Needs TensorFlow (`pip install 'dxserve-lymphoblast[train]'`).

    python scripts/make_scaffold_model.py
"""

from pathlib import Path

import tensorflow as tf

OUT = Path(__file__).resolve().parent.parent / "server" / "dxserve" / "scaffold_model.tflite"
SLOPE, MIDPOINT = 12.0, 0.5


@tf.function(input_signature=[tf.TensorSpec((None, 1), tf.float32, name="brightness")])
def placeholder(brightness):
    bright = tf.sigmoid(SLOPE * (brightness - MIDPOINT))
    return tf.concat([1.0 - bright, bright], axis=1)


if __name__ == "__main__":
    converter = tf.lite.TFLiteConverter.from_concrete_functions([placeholder.get_concrete_function()], placeholder)
    OUT.write_bytes(converter.convert())
    print(f"wrote {OUT}")
