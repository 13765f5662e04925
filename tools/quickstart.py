"""Quickstart: LoRA on an unmodified linen transformer, end to end, in about a minute on 2 CPU cores.

    python -m tools.quickstart [--steps 200]

Real text that ships with Python (the interpreter's help topics, ``pydoc_data``): a small
character-level transformer (nn.scan-stacked blocks, tied embeddings) is first trained fully on the
*lowercased* text of 90% of the topics and frozen. A rank-8 LoRA on the attention and MLP projections
and the tied embedding then adapts it to UPPERCASE text. The script prints the trainable-parameter
summary, the held-out loss (on the other 10% of topics, uppercased) of the frozen base before and
after LoRA, and checks that the merged params reproduce the adapted model.
"""

import argparse
from pydoc_data.topics import topics

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora

D, HEADS, LAYERS, T = 64, 4, 2, 64


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = nn.LayerNorm(name="ln_1")(x)
    q, k, v = (nn.DenseGeneral((HEADS, D // HEADS), name=n)(h) for n in ("q_proj", "k_proj", "v_proj"))
    mask = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D // HEADS)
    scores = jnp.where(mask[None, None], scores, -1e9)
    attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
    x = x + nn.DenseGeneral(D, axis=(-2, -1), name="o_proj")(attn)
    h = nn.LayerNorm(name="ln_2")(x)
    return x + nn.Dense(D, name="down_proj")(jax.nn.gelu(nn.Dense(4 * D, name="up_proj")(h))), None


class TinyLM(nn.Module):
  vocab: int

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(self.vocab, D, name="embed")
    pos = self.param("pos", nn.initializers.normal(0.02), (T, D))
    x = embed(ids) + pos[None, : ids.shape[1]]
    x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                   length=LAYERS)(name="layers")(x, None)
    return embed.attend(nn.LayerNorm(name="ln_f")(x))


def help_topics() -> tuple[str, str]:
  """(train, held-out) text: the help topics, split by topic 90/10."""
  names = sorted(topics)
  cut = int(0.9 * len(names))
  return "\n".join(topics[k] for k in names[:cut]), "\n".join(topics[k] for k in names[cut:])


def batches(ids: np.ndarray, rng: np.random.Generator, batch: int):
  while True:
    starts = rng.integers(0, len(ids) - T - 1, batch)
    window = np.stack([ids[s : s + T + 1] for s in starts])
    yield {"x": window[:, :-1], "y": window[:, 1:]}


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def main(steps: int = 200) -> dict:
  train_text, heldout_text = help_topics()
  vocab = {c: i for i, c in enumerate(sorted(set(train_text + heldout_text + train_text.upper() + heldout_text.lower())))}
  encode = lambda text: np.array([vocab[c] for c in text], np.int32)  # noqa: E731
  base_ids = encode(train_text.lower())
  tune_train, tune_eval = encode(train_text.upper()), encode(heldout_text.upper())[: 64 * T]
  rng = np.random.default_rng(0)
  model = TinyLM(len(vocab))
  batch = next(batches(base_ids, rng, 16))
  params = model.init(jax.random.key(0), batch["x"])["params"]

  # 1. A frozen "pretrained" base: full training on the first half of the text.
  tx = optax.adam(3e-3)

  @jax.jit
  def full_step(params, state, batch):
    loss, grads = jax.value_and_grad(lambda p: cross_entropy(model.apply({"params": p}, batch["x"]), batch["y"]))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  state = tx.init(params)
  for _, batch in zip(range(steps), batches(base_ids, rng, 16)):
    params, state, _ = full_step(params, state, batch)

  # 2. LoRA on the second half: the snippet from README.md.
  config = jlora.LoraConfig(targets=[r"layers/(q_proj|v_proj|o_proj|up_proj|down_proj)/kernel", r"embed/embedding"], rank=8, alpha=16.0,
                            dropout=0.05)
  lora = jlora.Lora(model, config)
  adapters = lora.init(jax.random.key(1), params, batch["x"])
  summary = lora.summary(params, adapters)
  print(summary)

  def loss_fn(adapters, params, batch, rng):
    return cross_entropy(lora.apply(params, adapters, batch["x"], rngs={"dropout": rng}), batch["y"])

  tx = optax.adamw(3e-3)
  opt_state = tx.init(adapters)

  @jax.jit
  def lora_step(adapters, opt_state, batch, rng):
    loss, grads = jax.value_and_grad(loss_fn)(adapters, params, batch, rng)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss

  eval_batch = {"x": np.stack([tune_eval[i : i + T] for i in range(0, len(tune_eval) - T - 1, T)]),
                "y": np.stack([tune_eval[i + 1 : i + T + 1] for i in range(0, len(tune_eval) - T - 1, T)])}

  @jax.jit
  def eval_loss(adapters):
    return cross_entropy(lora.apply(params, adapters, eval_batch["x"]), eval_batch["y"])

  before = float(eval_loss(adapters))
  key = jax.random.key(2)
  for step, batch in zip(range(steps), batches(tune_train, rng, 16)):
    adapters, opt_state, loss = lora_step(adapters, opt_state, batch, jax.random.fold_in(key, step))
    if step % 50 == 0 or step == steps - 1:
      print(f"step {step:4d}  train loss {float(loss):.3f}")
  after = float(eval_loss(adapters))
  print(f"held-out loss of the frozen base: {before:.3f} -> with LoRA: {after:.3f}")

  # 3. Merge for serving: plain params, same outputs.
  merged = lora.merge(params, adapters)
  diff = float(jnp.abs(model.apply({"params": merged}, eval_batch["x"]) - lora.apply(params, adapters, eval_batch["x"])).max())
  print(f"max |merged - adapted| logits: {diff:.2e}")
  return {"before": before, "after": after, "merge_diff": diff, "trainable": summary.trainable, "total": summary.total}


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=200, help="training steps for the base and for LoRA")
  main(parser.parse_args().steps)
