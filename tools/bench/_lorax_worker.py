"""The lorax (PyPI ``jax-lorax``) LoRA train step, run in lorax's own virtualenv as a subprocess contender.

lorax 0.3.1 needs jax 0.4.38, which cannot share a process with the benchmark's jax, so this script runs with
that virtualenv's Python and imports only jax, optax and lorax (no jlora, no flax). It builds the benchmark's
Llama decoder as a plain JAX function of a params dict (the same shapes, float32, layers unrolled, untied
``lm_head``), puts ``lorax.LoraWeight`` on the seven projections (rank, alpha as given), and trains only the
factors: the loss rebuilds each ``LoraWeight`` from the frozen kernel and the trained ``a``/``b``, so, as in every
other contender, no frozen kernel's gradient is computed. AdamW from optax, next-token cross-entropy.

Protocol on stdin/stdout, one line each: the worker prints ``ready <compile seconds>`` once compiled; then every
``step`` line runs one train step to completion and answers ``done``; ``quit`` (or end of input) exits. The
parent times each ``step`` round trip inside its interleaved rounds.

Usage: ``python _lorax_worker.py '{"hidden": 1024, "intermediate": 2816, "layers": 4, "heads": 16,
"kv_heads": 4, "vocab": 16384, "batch": 1, "seq": 256, "rank": 16, "alpha": 32.0}'``
"""

import json
import sys
import time

import jax
import jax.numpy as jnp
import lorax
import optax

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def init_params(shape: dict, key: jax.Array) -> dict:
  d, f, v = shape["hidden"], shape["intermediate"], shape["vocab"]
  head_dim = d // shape["heads"]
  kv = shape["kv_heads"] * head_dim
  dims = {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d), "gate_proj": (d, f),
          "up_proj": (d, f), "down_proj": (f, d)}
  keys = iter(jax.random.split(key, 2 + 7 * shape["layers"]))
  params = {"embed": 0.02 * jax.random.normal(next(keys), (v, d)), "lm_head": 0.02 * jax.random.normal(next(keys), (d, v)),
            "norm": jnp.ones((d,)), "layers": []}
  for _ in range(shape["layers"]):
    layer = {name: 0.02 * jax.random.normal(next(keys), dims[name]) for name in PROJECTIONS}
    layer.update(input_norm=jnp.ones((d,)), post_norm=jnp.ones((d,)))
    params["layers"].append(layer)
  return params


def rms_norm(x, weight, eps=1e-6):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope(x_btnh, positions, base=10000.0):
  half = x_btnh.shape[-1] // 2
  freqs = 1.0 / base ** (jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions[:, None] * freqs[None, :]
  cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
  x1, x2 = x_btnh[..., :half], x_btnh[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def mm(x, w):
  """``x @ w`` as the ``dot_general`` primitive itself: lorax handles that primitive, and ``jnp.matmul`` wraps it in
  a jitted call that this qax release cannot trace through."""
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def forward(shape: dict, params: dict, ids):
  b, t = ids.shape
  n, k = shape["heads"], shape["kv_heads"]
  h = shape["hidden"] // n
  positions = jnp.arange(t, dtype=jnp.float32)
  causal = jnp.tril(jnp.ones((t, t), bool))
  x = params["embed"][ids]
  for layer in params["layers"]:
    y = rms_norm(x, layer["input_norm"])
    q = rope(mm(y, layer["q_proj"]).reshape(b, t, n, h), positions)
    kk = rope(mm(y, layer["k_proj"]).reshape(b, t, k, h), positions)
    vv = mm(y, layer["v_proj"]).reshape(b, t, k, h)
    kk, vv = jnp.repeat(kk, n // k, axis=2), jnp.repeat(vv, n // k, axis=2)
    scores = jnp.einsum("btnh,bsnh->bnts", q, kk) / jnp.sqrt(jnp.float32(h))
    probs = jax.nn.softmax(jnp.where(causal, scores, -1e30), axis=-1)
    x = x + mm(jnp.einsum("bnts,bsnh->btnh", probs, vv).reshape(b, t, n * h), layer["o_proj"])
    y = rms_norm(x, layer["post_norm"])
    x = x + mm(jax.nn.silu(mm(y, layer["gate_proj"])) * mm(y, layer["up_proj"]), layer["down_proj"])
  return rms_norm(x, params["norm"]) @ params["lm_head"]


def main() -> None:
  shape = json.loads(sys.argv[1])
  rank, alpha = shape["rank"], shape["alpha"]
  params = init_params(shape, jax.random.key(0))
  # lorax's own initialisation (B zero, A normal), then the factors are split off as the trained tree.
  spec = lorax.simple_spec(params, decision_fn=lambda path, arr: rank if any(
      getattr(p, "key", None) in PROJECTIONS for p in path) else lorax.LORA_FREEZE)
  lora_params = lorax.init_lora(params, spec, jax.random.key(1), alpha=alpha)
  is_lora = lambda leaf: isinstance(leaf, lorax.LoraWeight)  # noqa: E731
  trainable = jax.tree.map(lambda w: {"a": w.a, "b": w.b} if is_lora(w) else None, lora_params, is_leaf=is_lora)
  frozen = jax.tree.map(lambda w: w.w if is_lora(w) else w, lora_params, is_leaf=is_lora)
  ids = jax.random.randint(jax.random.key(2), (shape["batch"], shape["seq"]), 0, shape["vocab"])
  tx = optax.adamw(1e-4)
  lora_forward = lorax.lora(lambda p, ids: forward(shape, p, ids))

  def step(trainable, opt_state, frozen, ids):
    def loss(trainable):
      model = jax.tree.map(lambda w, t: w if t is None else lorax.LoraWeight(w=w, a=t["a"], b=t["b"], alpha=alpha),
                           frozen, trainable, is_leaf=lambda t: t is None or isinstance(t, dict) and "a" in t)
      logits = lora_forward(model, ids)
      return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    grads = jax.grad(loss)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state

  start = time.perf_counter()
  opt_state = tx.init(trainable)
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(trainable, opt_state, frozen, ids).compile()
  print(f"ready {time.perf_counter() - start:.2f} jax {jax.__version__}", flush=True)
  state = (trainable, opt_state)
  for line in sys.stdin:
    command = line.strip()
    if command == "quit":
      break
    if command == "step":
      state = compiled(*state, frozen, ids)
      jax.block_until_ready(state)
      print("done", flush=True)


if __name__ == "__main__":
  main()
