"""dxserve plugin: lymphoblast vs normal white blood cell, a Keras CNN + MLP."""
