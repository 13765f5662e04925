"""The trainable-parameter summary, checked against hand counts."""

import jax
import numpy as np
from _cases import ScannedStack

import jlora


def test_counts_and_table():
  model = ScannedStack()
  x = np.ones((2, 4), np.float32)
  params = model.init(jax.random.key(0), x)["params"]
  lora = jlora.Lora(model, jlora.LoraConfig(targets=r".*/kernel", rank=2, alpha=4.0))
  adapters = lora.init(jax.random.key(1), params, x)
  summary = lora.summary(params, adapters)
  # 3 stacked 4x4 layers (+bias) and a 4x2 head (+bias).
  frozen = 3 * (16 + 4) + (8 + 2)
  trainable = 3 * (4 * 2 + 2 * 4) + (4 * 2 + 2 * 2)
  assert (summary.trainable, summary.total) == (trainable, frozen + trainable)
  assert abs(summary.percent - 100 * trainable / (frozen + trainable)) < 1e-9
  rows = {r.path: r for r in summary.rows}
  assert rows["layers/fc/kernel"].kernel_shape == (3, 4, 4) and rows["layers/fc/kernel"].params == 48
  assert rows["head/kernel"].scale == 2.0
  text = str(summary)
  assert "layers/fc/kernel" in text and f"trainable params: {trainable:,} || all params: {frozen + trainable:,}" in text
