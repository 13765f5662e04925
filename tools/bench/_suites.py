"""The three suites: ``smoke`` (seconds, tiny shapes: exercises the harness), ``quick`` (a few minutes) and
``full`` (the figures of record, with the d_model=2048, T=512 decoder the targets are stated for).
"""

import dataclasses

from tools.bench._models import Shape


@dataclasses.dataclass(frozen=True)
class Suite:
  """What one benchmark run measures.

  Attributes:
    name: ``smoke``, ``quick`` or ``full``.
    train_shapes: LoRA vs full fine-tuning train steps, smallest first; the last is the headline.
    memory_shape: a shape where parameters (not activations) dominate memory: compiled, not run.
    peer_shape: jlora vs flax ``nnx.LoRALinear`` vs PEFT train steps.
    inference_shape: base / unmerged / merged forwards, and the decoder used for KV-cache decoding.
    decode_batch: sequences decoded at once.
    decode_prompt: prompt tokens before decoding.
    decode_new_tokens: tokens generated per sequence.
    warmup: untimed rounds before timing (at least 1: the first call of ``generate`` compiles).
    reps: the least number of timed rounds; figures are medians over them.
    budget_s: keep timing more rounds (up to 25) until the timed rounds of a comparison took this long.
  """

  name: str
  train_shapes: tuple[Shape, ...]
  memory_shape: Shape
  peer_shape: Shape
  inference_shape: Shape
  decode_batch: int
  decode_prompt: int
  decode_new_tokens: int
  warmup: int
  reps: int
  budget_s: float


_TINY = Shape(hidden=64, intermediate=128, layers=1, heads=4, kv_heads=2, vocab=256, batch=2, seq=32)
# Llama-style widths: d_model 512 / 1024 / 2048 with a SwiGLU MLP of ~2.75x, 4 query heads per kv head;
# 2048 is TinyLlama-1.1B's width, vocabulary and head layout (with 4 of its 22 layers).
_D512 = Shape(hidden=512, intermediate=1408, layers=4, heads=8, kv_heads=2, vocab=8192, batch=2, seq=256)
_D1024 = Shape(hidden=1024, intermediate=2816, layers=4, heads=16, kv_heads=4, vocab=16384, batch=1, seq=512)
_D2048 = Shape(hidden=2048, intermediate=5632, layers=4, heads=32, kv_heads=4, vocab=32000, batch=1, seq=512)

SUITES = {
    "smoke": Suite(
        name="smoke",
        train_shapes=(_TINY,),
        memory_shape=_TINY,
        peer_shape=_TINY,
        inference_shape=_TINY,
        decode_batch=2,
        decode_prompt=4,
        decode_new_tokens=4,
        warmup=1,
        reps=2,
        budget_s=0.0,
    ),
    "quick": Suite(
        name="quick",
        train_shapes=(_D512, dataclasses.replace(_D1024, seq=256)),
        memory_shape=dataclasses.replace(_D1024, seq=64),
        peer_shape=dataclasses.replace(_D512, seq=128),
        inference_shape=_D512,
        decode_batch=4,
        decode_prompt=32,
        decode_new_tokens=32,
        warmup=1,
        reps=5,
        budget_s=20.0,
    ),
    "full": Suite(
        name="full",
        train_shapes=(dataclasses.replace(_D512, seq=512), _D1024, _D2048),
        memory_shape=dataclasses.replace(_D2048, seq=128),
        peer_shape=dataclasses.replace(_D1024, seq=256),
        inference_shape=_D1024,
        decode_batch=4,
        decode_prompt=64,
        decode_new_tokens=64,
        warmup=1,
        reps=7,
        budget_s=45.0,
    ),
}
