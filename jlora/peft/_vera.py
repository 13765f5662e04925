"""PEFT's VeRA files: ``vera_lambda_b``/``vera_lambda_d`` per module and the shared ``base_model.vera_A``/``vera_B``.

PEFT (``peft.tuners.vera``) stores the projections in its ``(r, max_in)``/``(max_out, r)`` order, sized to the
largest ``in_features``/``out_features`` of the adapted modules; jlora keeps them as ``(max_in, r)``/``(r, max_out)``
in ``params["jlora:state"]["vera"]``. A file without them (``save_projection=False``) would need torch's generator
replayed from ``projection_prng_key``, which jlora cannot do: such files are refused, and jlora writes them always.
"""

import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora import _paths
from jlora._config import LoraConfig
from jlora._errors import JloraError
from jlora._lora import Lora
from jlora._safety import LoadPolicy, enforce_norms, norm_report
from jlora._variant import STATE_KEY, split_state
from jlora.models._hf_configs import config_to_hf
from jlora.peft._export import PREFIX, write_adapter_dir
from jlora.peft._fingerprint import METADATA_KEY, base_fingerprint
from jlora.peft._formats import (
  adapted_modules,
  by_kernel,
  common_fields,
  config_error,
  escaped,
  host_leaf,
  linear_targets,
  read_weights,
)
from jlora.peft._import import _check_config, _fail, _is_number
from jlora.peft._matching import target_modules_for
from jlora.peft._modules import module_table
from jlora.variants._vera import fan_out, init_state

PROJECTION_A, PROJECTION_B = "base_model.vera_A", "base_model.vera_B"
# VeraConfig's fields beyond those the LoRA checks cover.
_VERA_KEYS = ("projection_prng_key", "save_projection", "vera_dropout", "d_initial", "init_weights")


def _example_targets(model, config: LoraConfig):
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
  return Lora(model, config).trace(abstract, jnp.zeros((1, 1), jnp.int32))


def save_vera(path, adapters: Mapping, config: LoraConfig, model, *, params: Mapping | None = None,
              base_model_name_or_path: str | None = None, task_type: str | None = "auto", manifest: bool = True,
              initial_adapters: Mapping | None = None) -> dict[str, Any]:
  """Writes a jlora VeRA adapter as PEFT's VeRA directory (see ``jlora.peft.save_pretrained``).

  The projections are ``params["jlora:state"]["vera"]`` when ``params`` carries them, else those
  ``config.projection_seed`` draws (what ``Lora.init_with_base`` gave the adapter).
  """
  if initial_adapters is not None:
    raise JloraError("initial_adapters= converts PiSSA/OLoRA adapters; a VeRA adapter is exported as it is.")
  if not config.save_projection:
    raise JloraError("A VeRA export with save_projection=False would leave PEFT to draw the projections with torch's "
                     "generator from projection_prng_key, which gives other projections than jlora's (drawn by jax): "
                     "export with save_projection=True.")
  nodes, modules, shapes = adapted_modules(adapters, config, model, "VeRA")
  targets = _example_targets(model, config)
  missing = sorted(set(targets) - set(nodes))
  if missing:
    raise JloraError(f"The config targets {missing}, which have no adapter: PEFT sizes the projections over the adapted "
                     "modules only, so they would not be the ones the adapter was trained with.")
  base, state = split_state(params) if params is not None else (None, None)
  projections = (state or {}).get("vera") or init_state(None, targets, config)
  rank = config.rank
  max_in = max(t.layout.fan_in for t in targets.values())
  max_out = max(fan_out(t) for t in targets.values())
  vera_a, vera_b = np.asarray(projections["vera_a"]), np.asarray(projections["vera_b"])
  if vera_a.shape != (max_in, rank) or vera_b.shape != (rank, max_out):
    raise JloraError(f"The VeRA projections are {vera_a.shape} and {vera_b.shape}; PEFT sizes them over the adapted "
                     f"modules, ({max_in}, {rank}) and ({rank}, {max_out}) here: were they made for other targets?")
  tensors = {PROJECTION_A: vera_a.T, PROJECTION_B: vera_b.T}
  conv1d = False
  for kernel_path, node in nodes.items():
    stack = shapes[kernel_path][:1] if modules[kernel_path][0].layer is not None else ()
    lambda_b = host_leaf(node, "vera_lambda_b", stack + shapes[kernel_path][-1:], kernel_path)
    lambda_d = host_leaf(node, "vera_lambda_d", stack + (rank,), kernel_path)
    for module in modules[kernel_path]:
      key = PREFIX + module.name
      tensors[f"{key}.vera_lambda_b"] = lambda_b[module.layer] if module.layer is not None else lambda_b
      tensors[f"{key}.vera_lambda_d"] = lambda_d[module.layer] if module.layer is not None else lambda_d
      conv1d |= module.kind == "conv1d"
  adapted = [m.name for group in modules.values() for m in group]
  peft_config = {
      **common_fields(model, task_type, base_model_name_or_path),
      "bias": "none",
      "d_initial": float(config.d_initial),
      "fan_in_fan_out": conv1d,
      "init_weights": True,
      "layers_pattern": None,
      "layers_to_transform": None,
      "modules_to_save": None,
      "peft_type": "VERA",
      "projection_prng_key": config.projection_seed,
      "r": rank,
      "save_projection": True,
      "target_modules": target_modules_for(adapted, module_table(model.config)),
      "vera_dropout": float(config.dropout),
  }
  metadata = {"format": "pt"}
  if base is not None:
    metadata[METADATA_KEY] = base_fingerprint(model, base)
  write_adapter_dir(path, tensors, metadata, peft_config, manifest)
  return peft_config


def _check_vera_config(raw: dict, where: pathlib.Path, model_type: str) -> dict[str, Any]:
  """PEFT's VeraConfig, checked: its module selection as the LoRA checks do it, then its own fields."""
  as_lora = {key: value for key, value in raw.items() if key not in _VERA_KEYS}
  as_lora.update(peft_type="LORA", lora_alpha=1, lora_dropout=raw.get("vera_dropout", 0.0))
  config = _check_config(as_lora, where, model_type)
  seed = raw.get("projection_prng_key", 0)
  if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
    raise _fail(where, f"projection_prng_key={seed!r} must be an int in [0, 2**63).")
  if raw.get("save_projection", True) is not True:
    raise _fail(where, "was saved with save_projection=False: PEFT would draw the projections with torch's generator "
                       "from projection_prng_key, which jlora cannot replay; re-save it with save_projection=True.")
  if not _is_number(raw.get("d_initial", 0.1)):
    raise _fail(where, f"d_initial={raw.get('d_initial')!r} must be a finite number.")
  if raw.get("init_weights", True) is not True:
    raise _fail(where, f"init_weights={raw['init_weights']!r}: only PEFT's default initialisation is supported.")
  return {**config, "projection_prng_key": seed, "d_initial": float(raw.get("d_initial", 0.1))}


def load_vera(directory: pathlib.Path, weights: pathlib.Path, digests: dict, raw: dict, model, params: Mapping,
              example_inputs: tuple, policy: LoadPolicy, expected_fingerprint: str | None
              ) -> tuple[dict, dict, LoraConfig]:
  """A PEFT VeRA directory as ``(params + projections, adapters, LoraConfig(variant="vera"))``, checked."""
  config = _check_vera_config(raw, directory, config_to_hf(model.config)["model_type"])
  table, modules = linear_targets(config, model, directory, "VeRA")
  rank = config["r"]
  base, _ = split_state(params)
  sizes = {}
  for module in modules:
    leaf = base
    for key in module.path.split("/"):
      leaf = leaf[key]
    sizes[module.name] = tuple(leaf.shape[-2:])  # (in, out) of the layer's kernel
  max_in, max_out = max(s[0] for s in sizes.values()), max(s[1] for s in sizes.values())
  expected = {PROJECTION_A: (rank, max_in), PROJECTION_B: (max_out, rank)}
  for module in modules:
    expected[f"{PREFIX}{module.name}.vera_lambda_b"] = (sizes[module.name][1],)
    expected[f"{PREFIX}{module.name}.vera_lambda_d"] = (rank,)
  tensors, dtype = read_weights(directory, weights, digests, model, params, policy, expected, expected_fingerprint)

  adapters = {}
  groups = by_kernel(modules, table, directory)
  for kernel_path, group in groups.items():
    stacked = group[0].layer is not None
    leaves = {name: [tensors[f"{PREFIX}{m.name}.{name}"].astype(dtype) for m in group]
              for name in ("vera_lambda_b", "vera_lambda_d")}
    adapters[tuple(kernel_path.split("/"))] = {name: jnp.asarray(np.stack(v) if stacked else v[0])
                                               for name, v in leaves.items()}
  state = {"vera_a": jnp.asarray(tensors[PROJECTION_A].T.astype(dtype)),
           "vera_b": jnp.asarray(tensors[PROJECTION_B].T.astype(dtype))}
  try:
    lora_config = LoraConfig(targets=escaped(groups), rank=rank, dropout=float(config["lora_dropout"]), dtype=dtype,
                             variant="vera", projection_seed=config["projection_prng_key"],
                             d_initial=config["d_initial"], save_projection=True)
  except JloraError as e:
    raise config_error(directory, e) from None
  adapters = _paths.nest(adapters)
  with_state = {**params, STATE_KEY: {**params.get(STATE_KEY, {}), "vera": state}}
  lora = Lora(model, lora_config)
  targets = lora.trace(base, *(example_inputs or (jnp.zeros((1, 1), jnp.int32),)))
  if set(targets) != set(groups):  # the config lists exactly these paths, so this is a jlora bug
    raise JloraError(f"jlora.peft: traced targets {sorted(targets)} differ from the adapter's {sorted(groups)}.")
  enforce_norms(norm_report(lora, with_state, adapters, policy), policy, str(directory))
  return with_state, adapters, lora_config
