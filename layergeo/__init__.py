"""layergeo: why intermediate-layer distillation works whatever the layer order.

Train students under every layer-matching strategy, then measure the geometry of
teacher layers as seen from the student's representations.
"""

__version__ = "0.1.0"
