"""jlora.AdapterBank: mixed-adapter batches against PEFT's ``adapter_names=`` and against single-adapter runs row by
row, in inference, in training (gradients per slot) and in generation; loading through the safe paths, compiled once.

The PEFT adapters (``_multi_adapter``) differ in rank, alpha, rsLoRA, targets and variant (one is activated LoRA);
every factor is random and non-zero.
"""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _cases import CASES
from _multi_adapter import ALLOW_NO_FINGERPRINT, INVOCATION, TARGETS, base, batch, peft_adapters, peft_logits
from test_safe_load import random_like

import jlora
import jlora.peft
from jlora import models

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

SLOTS = {"a": 0, "b": 1, "c": 2}  # slot 3 stays free until a test replaces something
ROWS = ["a", "b", "__base__", "c", "c"]


@pytest.fixture(scope="module")
def loaded():
  """The bank over the tiny Llama with PEFT's three adapters loaded through jlora.peft (slot 3 free)."""
  _, model, params = base()
  _, paths = peft_adapters()
  ids, _ = batch()
  bank = jlora.AdapterBank(model, params, ids[:1], targets=TARGETS, slots=4, max_rank=4, max_invocation_length=3)
  state = bank.init()
  for name, slot in SLOTS.items():
    state = bank.load(state, slot, paths[name], policy=ALLOW_NO_FINGERPRINT)
  singles = {name: jlora.peft.from_pretrained(paths[name], model, params, ids[:1], policy=ALLOW_NO_FINGERPRINT)
             for name in SLOTS}
  return model, params, bank, state, singles


def _adapter_ids(names):
  return jnp.array([SLOTS.get(name, -1) for name in names], jnp.int32)


def test_mixed_batch_matches_peft_adapter_names(loaded):
  model, params, bank, state, _ = loaded
  peft_model, _ = peft_adapters()
  ids, mask = batch()
  expected = peft_logits(peft_model, ids, mask, adapter_names=ROWS)
  got = np.asarray(jax.jit(lambda p, s, a: bank.apply(p, s, ids, mask, adapter_ids=a))(params, state,
                                                                                         _adapter_ids(ROWS)))
  keep = mask.astype(bool)
  np.testing.assert_allclose(got[keep], expected[keep], rtol=0, atol=1e-4)
  # Not a vacuous match: every adapted row differs from the base, and the aLoRA rows only from the invocation on.
  plain = np.asarray(model.apply({"params": params}, ids, mask))
  changed = np.abs(got - plain).max(-1) > 1e-3
  assert changed[0].all() and changed[1, 2:].all() and not changed[2].any()
  assert changed[3].tolist() == [False] * 4 + [True] * 5 and changed[4].tolist() == [False] * 6 + [True] * 3


@pytest.fixture(scope="module")
def alone(loaded):
  """Logits of every row of ``batch()`` run with its adapter alone (a jlora.Lora per adapter), or the base."""
  model, params, _, _, singles = loaded
  ids, mask = batch()
  out = np.array(model.apply({"params": params}, ids, mask))
  for name, (adapters, config) in singles.items():
    rows = [row for row, n in enumerate(ROWS) if n == name]
    out[rows] = np.asarray(jlora.Lora(model, config).apply(params, adapters, ids[rows], mask[rows]))
  return out


@pytest.mark.parametrize("kernel", ["bgmv", "sgmv"])
def test_each_row_equals_its_adapter_run_alone(loaded, alone, kernel):
  model, params, loaded_bank, state, _ = loaded
  bank = jlora.AdapterBank(model, params, batch()[0][:1], targets=TARGETS, slots=4, max_rank=4,
                           max_invocation_length=3, kernel=kernel)
  ids, mask = batch()
  got = np.asarray(bank.apply(params, state, ids, mask, adapter_ids=_adapter_ids(ROWS)))
  keep = mask.astype(bool)
  np.testing.assert_allclose(got[keep], alone[keep], rtol=0, atol=2e-5)
  # A slot comes back out as an ordinary adapter that computes the same rows.
  adapters, config = loaded_bank.adapter(state, SLOTS["c"])
  assert config.invocation_tokens == tuple(INVOCATION) and config.rank == 4
  np.testing.assert_allclose(np.asarray(jlora.Lora(model, config).apply(params, adapters, ids[3:], mask[3:])),
                             alone[3:], rtol=0, atol=2e-5)


def _per_row_loss(apply, ids):
  logits = apply(ids).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).sum()


def test_training_gradients_are_each_slots_own(loaded):
  """Several adapters trained at once on their own rows: the gradient w.r.t. slot j's factors is the gradient of
  adapter j alone on the rows that use it (zero in the rank padding and on kernels it does not adapt)."""
  model, params, bank, state, singles = loaded
  ids, _ = batch()
  names = ["c", "b", "__base__", "b", "c"]  # b: ranks 2 and 3 under max_rank 4; c: activated LoRA
  grads = jax.grad(lambda factors: _per_row_loss(
      lambda x: bank.apply(params, state._replace(factors=factors), x, adapter_ids=_adapter_ids(names)), ids))(
          state.factors)
  for name, slot in SLOTS.items():
    if name not in names:  # slot a has no row: no gradient at all
      assert not any(np.any(np.asarray(g)[:, slot]) for g in jax.tree.leaves(grads))
      continue
    adapters, config = singles[name]
    lora = jlora.Lora(model, config)
    lora.trace(params, ids[:1])
    rows = ids[np.array([n == name for n in names])]
    want = jax.grad(lambda a, lora=lora, rows=rows: _per_row_loss(lambda x: lora.apply(params, a, x), rows))(adapters)
    for path in bank.targets:
      keys = tuple(path.split("/"))
      node = grads
      for key in keys:
        node = node[key]
      got_a, got_b = node["lora_a"][:, slot], node["lora_b"][:, slot]
      if path not in lora.targets:
        assert not np.any(got_a) and not np.any(got_b), (name, path)
        continue
      mine = want
      for key in keys:
        mine = mine[key]
      rank = mine["lora_a"].shape[-1]
      np.testing.assert_allclose(got_a[..., :rank], mine["lora_a"], rtol=1e-4, atol=1e-6, err_msg=f"{name} {path}")
      np.testing.assert_allclose(got_b[:, :rank], mine["lora_b"], rtol=1e-4, atol=1e-6, err_msg=f"{name} {path}")
      assert not np.any(got_a[..., rank:]) and not np.any(got_b[:, rank:])


def test_generate_mixed_batch_and_hot_swap_without_recompiling(loaded, tmp_path):
  model, params, bank, state, singles = loaded
  ids, mask = batch()
  ids[3, -2:] = INVOCATION  # the aLoRA rows end in the invocation, as a prompt that calls the adapter would
  names = ["a", "c", "__base__", "a", "c"]
  generate_traces = []

  def apply_fn(variables, *args, **kwargs):  # one object for every call: generate compiles once per shape
    generate_traces.append(args[0].shape)
    return bank.apply_fn()(variables, *args, **kwargs)

  def mixed(state):
    return models.generate(model, bank.inject(params, state), ids, mask, max_new_tokens=4, apply_fn=apply_fn,
                           adapter_ids=_adapter_ids(names))

  got = np.asarray(mixed(state))
  for row, name in enumerate(names):
    if name == "__base__":
      alone = models.generate(model, params, ids[row:row + 1], mask[row:row + 1], max_new_tokens=4)
    else:
      adapters, config = singles[name]
      lora = jlora.Lora(model, config)
      alone = models.generate(model, lora.inject(params, adapters), ids[row:row + 1], mask[row:row + 1],
                              max_new_tokens=4, apply_fn=lora.apply_fn())
    np.testing.assert_array_equal(got[row], np.asarray(alone)[0], err_msg=f"row {row} ({name})")
  assert len({tuple(r) for r in got[:, -4:].tolist()}) > 2  # the adapters make the rows decode differently

  # Hot swap: a jlora checkpoint replaces slot 0 and fills slot 3 (through load_adapters, fingerprint checked);
  # neither the jitted step nor generate is traced again.
  adapters, config = singles["b"]
  jlora.save_adapters(tmp_path / "b", adapters, config, base_fingerprint=jlora.fingerprint(params))
  traces = []

  @jax.jit
  def step(state, ids):
    traces.append(1)
    return bank.apply(params, state, ids, mask, adapter_ids=_adapter_ids(names))

  before = step(state, ids)
  traced = len(generate_traces)
  swapped = bank.load(bank.load(state, 0, tmp_path / "b"), 3, tmp_path / "b")  # replace a slot, fill the free one
  after = step(swapped, ids)
  swapped_tokens = np.asarray(mixed(swapped))
  assert len(traces) == 1 and len(generate_traces) == traced  # neither the step nor generate was traced again
  on_slot_0 = np.array([name == "a" for name in names])
  assert not np.allclose(before[on_slot_0], after[on_slot_0]) and np.allclose(before[~on_slot_0], after[~on_slot_0])
  np.testing.assert_array_equal(swapped_tokens[~on_slot_0], got[~on_slot_0])
  assert not np.array_equal(swapped_tokens[on_slot_0], got[on_slot_0])


def _tree_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_loads_that_fail_leave_the_bank_unchanged(loaded, tmp_path):
  model, params, bank, state, singles = loaded
  peft_model, paths = peft_adapters()
  before = jax.device_get(state)
  other = jax.tree.map(lambda v: v * 1.01, params)
  adapters, config = singles["a"]
  # Another base: a jlora checkpoint and a PEFT directory that store another base's fingerprint.
  jlora.save_adapters(tmp_path / "other", adapters, config, base_fingerprint=jlora.fingerprint(other))
  with pytest.raises(jlora.UnsafeAdapterError, match="base"):
    bank.load(state, 3, tmp_path / "other")
  jlora.peft.save_pretrained(tmp_path / "other_peft", adapters, config, model, params=other)
  with pytest.raises(jlora.UnsafeAdapterError, match="fingerprint"):
    bank.load(state, 3, tmp_path / "other_peft")
  # A genuine PEFT file needs the explicit allowance; a tampered one fails its manifest.
  with pytest.raises(jlora.UnsafeAdapterError, match="allow_missing_fingerprint"):
    bank.load(state, 3, paths["a"])
  jlora.save_adapters(tmp_path / "tampered", adapters, config, base_fingerprint=jlora.fingerprint(params))
  metadata = tmp_path / "tampered" / "jlora_adapter.json"
  metadata.write_text(json.dumps({**json.loads(metadata.read_text()), "extra": {"x": 1}}))
  with pytest.raises(jlora.UnsafeAdapterError, match="SHA256SUMS|manifest"):
    bank.load(state, 3, tmp_path / "tampered")
  # What the bank cannot hold: DoRA, a rank above max_rank, a kernel outside its targets, a long invocation.
  ids = batch()[0][:1]
  cases = {
      "DoRA": jlora.LoraConfig(targets=r".*/q_proj/kernel", rank=2, use_dora=True),
      "max_rank": jlora.LoraConfig(targets=r".*/q_proj/kernel", rank=6),
      "not built for": jlora.LoraConfig(targets=r".*/gate_proj/kernel", rank=2),
      "max_invocation_length": jlora.LoraConfig(targets=r".*/q_proj/kernel", rank=2, invocation_tokens=[1, 2, 3, 4]),
  }
  for message, bad in cases.items():
    lora = jlora.Lora(model, bad)
    bad_adapters = random_like(jax.eval_shape(lora.init, jax.random.key(0), params, ids), seed=1, scale=0.01)
    if bad.use_dora:
      bad_adapters = jax.tree_util.tree_map_with_path(
          lambda p, v, init: init if p[-1].key == "lora_magnitude" else v, bad_adapters,
          lora.init(jax.random.key(0), params, ids))
    with pytest.raises(jlora.JloraError, match=message):
      bank.insert(state, 3, bad_adapters, bad)
  assert _tree_equal(jax.device_get(state), before)


def test_an_outsized_slot_stands_out_across_slots(loaded):
  """On its own an adapter scaled up 200x looks uniform; across the bank's slots it is flagged (warned, or refused
  under a strict policy). The absolute cap on ||update|| / ||W|| is lifted so only the across-slot check speaks."""
  model, params, bank, state, singles = loaded
  adapters, config = singles["a"]
  big = jax.tree.map(lambda v: v * np.sqrt(200.0), adapters)
  lenient = jlora.LoadPolicy(max_relative_update=1e3)
  assert not jlora.norm_report(_traced(model, config, params), params, big, lenient).outliers
  with pytest.warns(jlora.AdapterNormWarning, match=r"slot 3: .*against the other adapters"):
    warned = bank.insert(state, 3, big, config, policy=lenient)
  assert bool(warned.occupied[3])
  assert {row.module.split(":")[0] for row in bank.norm_report(warned, lenient).outliers} == {"slot 3"}
  with pytest.raises(jlora.UnsafeAdapterError, match="slot 3"):
    bank.insert(state, 3, big, config, policy=jlora.LoadPolicy(max_relative_update=1e3, strict=True))
  assert not bool(state.occupied[3]) and not bank.norm_report(state, lenient).outliers


def _traced(model, config, params):
  lora = jlora.Lora(model, config)
  lora.trace(params, batch()[0][:1])
  return lora


CASE_NAMES = ["dense", "dense_general", "einsum_interleaved", "einsum_per_head", "conv", "embed_tied", "scan_remat"]


@pytest.mark.parametrize("case", [c for c in CASES if c.name in CASE_NAMES], ids=lambda c: c.name)
def test_every_module_kind_row_by_row(case):
  x = case.inputs[0]
  params = random_like(jax.eval_shape(case.model.init, jax.random.key(0), x)["params"], seed=0)
  bank = jlora.AdapterBank(case.model, params, x, targets=case.targets, slots=3, max_rank=3)
  state, singles = bank.init(), {}
  for slot, rank in ((0, 2), (2, 3)):
    lora = jlora.Lora(case.model, jlora.LoraConfig(targets=case.targets, rank=rank, alpha=1.5 * rank))
    singles[slot] = (lora, random_like(jax.eval_shape(lora.init, jax.random.key(1), params, x), seed=slot,
                                       scale=0.3))
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", jlora.AdapterNormWarning)  # random adapters on random kernels
      state = bank.insert(state, slot, singles[slot][1], lora.config)
  plain = np.asarray(case.model.apply({"params": params}, x))
  for adapter_ids in ([2, 0], [-1, 2]):
    got = np.asarray(bank.apply(params, state, x, adapter_ids=jnp.array(adapter_ids)))
    for row, slot in enumerate(adapter_ids):
      want = plain[row] if slot < 0 else np.asarray(singles[slot][0].apply(params, singles[slot][1], x))[row]
      np.testing.assert_allclose(got[row], want, rtol=1e-5, atol=1e-5, err_msg=f"row {row}, slot {slot}")
      assert slot < 0 or not np.allclose(got[row], plain[row], atol=1e-3)


def test_kernel_batch_axis_on_the_rows_is_refused():
  case = next(c for c in CASES if c.name == "dense_general_batch_dims")
  x = case.inputs[0]
  params = random_like(jax.eval_shape(case.model.init, jax.random.key(0), x)["params"], seed=0)
  bank = jlora.AdapterBank(case.model, params, x, targets=case.targets, slots=2, max_rank=2)
  with pytest.raises(jlora.JloraError, match="kernel axis"):
    bank.apply(params, bank.init(), x, adapter_ids=jnp.zeros((x.shape[0],), jnp.int32))


def test_vera_and_adalora_slots_in_lora_form():
  case = next(c for c in CASES if c.name == "dense")
  x = case.inputs[0]
  params = random_like(jax.eval_shape(case.model.init, jax.random.key(0), x)["params"], seed=0)
  bank = jlora.AdapterBank(case.model, params, x, targets=case.targets, slots=2, max_rank=4)
  vera = jlora.Lora(case.model, jlora.LoraConfig(targets=case.targets, variant="vera", rank=4))
  vera_params, vera_adapters = vera.init_with_base(jax.random.key(1), params, x)
  vera_adapters = random_like(vera_adapters, seed=3, scale=0.5)
  adalora = jlora.Lora(case.model, jlora.LoraConfig(targets=case.targets, variant="adalora", init_rank=3,
                                                    target_rank=2, total_step=10, alpha=2.0))
  ada_adapters = random_like(jax.eval_shape(adalora.init, jax.random.key(2), params, x), seed=4, scale=0.5)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", jlora.AdapterNormWarning)
    state = bank.insert(bank.init(), 0, vera_adapters, vera.config, params=vera_params)
    state = bank.insert(state, 1, ada_adapters, adalora.config)
  got = np.asarray(bank.apply(params, state, x, adapter_ids=jnp.array([0, 1])))
  np.testing.assert_allclose(got[0], np.asarray(vera.apply(vera_params, vera_adapters, x))[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[1], np.asarray(adalora.apply(params, ada_adapters, x))[1], rtol=1e-5, atol=1e-5)


def test_each_slot_keeps_its_dropout_rate():
  case = next(c for c in CASES if c.name == "dense")
  x = np.repeat(case.inputs[0], 2, axis=0)
  params = random_like(jax.eval_shape(case.model.init, jax.random.key(0), x)["params"], seed=0)
  bank = jlora.AdapterBank(case.model, params, x, targets=case.targets, slots=2, max_rank=2)
  state = bank.init()
  for slot, rate in ((0, 0.0), (1, 0.5)):
    config = jlora.LoraConfig(targets=case.targets, rank=2, dropout=rate)
    lora = jlora.Lora(case.model, config)
    adapters = random_like(jax.eval_shape(lora.init, jax.random.key(1), params, x), seed=slot, scale=0.3)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", jlora.AdapterNormWarning)
      state = bank.insert(state, slot, adapters, config)
  ids = jnp.array([0, 1, 0, 1])
  plain = np.asarray(bank.apply(params, state, x, adapter_ids=ids))
  dropped = np.asarray(bank.apply(params, state, x, adapter_ids=ids, rngs={"dropout": jax.random.key(3)}))
  np.testing.assert_array_equal(dropped[::2], plain[::2])  # slot 0: rate 0
  assert not np.allclose(dropped[1::2], plain[1::2])  # slot 1: rate 0.5
  with pytest.raises(jlora.JloraError, match="no 'dropout' rng"):
    bank.apply(params, state, x, adapter_ids=ids, lora_dropout=True)
  assert bank.adapter(state, 1)[1].dropout == 0.5
