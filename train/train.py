"""``train_and_evaluate(config, workdir)``: the training job's loop, importable and testable.

Resumes from the latest complete checkpoint in ``workdir`` (train state *and* data position, so a
resumed run sees exactly the batches an uninterrupted one would), evaluates before training and
every ``eval_every`` steps, stops on a non-finite loss or gradient (or skips the step), saves on
SIGTERM, and exports the final adapter with its LoraConfig and base-model fingerprint.

Every adapter variant comes from ``config.lora`` (``train.variants``): a variant that rewrites the frozen base
(PiSSA/OLoRA's residual, VeRA's projections) gets it recomputed from the base and the seed at every start, and is
exported in a form for the original base; ReLoRA (``config.relora``, ``train.relora``) restarts the adapters
every ``relora.every`` steps and keeps what it folded into the base in the train state.

Rerunning a finished job evaluates its final checkpoint and keeps its adapter (exporting it only if it
is missing); rerunning it with a larger ``train.steps`` trains on from the last step.
"""

import functools
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jlora
from jlora import sharding
from train import distributed, memory, tasks, variants
from train.checkpoint import Checkpointer
from train.metrics import MetricWriter, plot_curves, read_metrics
from train.optimizer import learning_rate_schedule, make_optimizer
from train.progress import Progress
from train.relora import Relora
from train.step import make_train_step


class NonFiniteError(RuntimeError):
  """The loss or gradient became NaN/inf and ``train.on_nonfinite == "stop"``."""


class WorkdirStateError(ValueError):
  """The workdir holds a job the config cannot continue (a checkpoint past ``train.steps``)."""


def _stack_micro_batches(iterator, accum_steps: int) -> dict:
  micro = [next(iterator) for _ in range(accum_steps)]
  return {k: np.stack([m[k] for m in micro]) for k in micro[0]}


def _host(x) -> np.ndarray:
  """A replicated (or single-device) array's value on this host, also when other hosts hold copies."""
  return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def _global_batch(local: dict, batch_sharding: NamedSharding) -> dict:
  """The global batch from every process's rows (``jax.make_array_from_process_local_data``)."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()}


def _evaluate(task, eval_step, trainable, params, *, eval_sharding) -> dict:
  sums: dict[str, float] = {}
  for batch in task.eval_batches():
    for name, value in eval_step(trainable, params, _global_batch(batch, eval_sharding)).items():
      sums[name] = sums.get(name, 0.0) + float(_host(value))
  return {name: float(value) for name, value in task.summarize_eval(sums).items()}


def _format(metrics: dict) -> str:
  return "  ".join(f"{k}={v:.4f}" for k, v in metrics.items())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the job described by ``config`` in ``workdir``.

  A workdir whose latest checkpoint is at ``train.steps`` is a finished job: its final state is evaluated,
  its exported adapter kept (or exported if missing) and nothing is trained. A checkpoint at an earlier
  step resumes (also when ``train.steps`` grew since; the learning-rate schedule is then the new total's,
  continued at the checkpoint's step count); one past ``train.steps`` is a ``WorkdirStateError``.

  Returns:
    ``{"before": eval metrics at step 0 (None when resumed), "after": final eval metrics (None when
    preempted), "steps": last step, "preempted": bool, "skipped_steps": int (this run's), "adapter":
    export dir | None, "already_complete": bool (nothing was left to train)}``.
  """
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  devices = jax.devices()[: config.mesh.num_devices] if config.mesh.num_devices else None
  mesh = sharding.make_mesh(dict(config.mesh.axes), devices=devices)
  variants.check(config, variants.lora_config(config))  # before any loading: a refused combination fails fast
  task = tasks.build(config, workdir, mesh)
  lora = task.lora
  total_steps = config.train.steps
  tx = make_optimizer(config.optimizer, total_steps, relora=config.get("relora"), lora_config=lora.config)
  schedule = learning_rate_schedule(config.optimizer, total_steps, config.get("relora"))

  # The frozen base arrives sharded by its rules; adapters follow their kernels; optimizer state its parameter.
  params = task.params  # quantized kernels (model.quantize) come with a spec per stored leaf (param_specs)
  base_fingerprint = jlora.fingerprint(params)  # a checkpoint resumes only over the base it was trained on
  param_specs = jax.tree.map(lambda x: x.sharding.spec, params)
  param_shardings = sharding.named(param_specs, mesh)
  replicated = NamedSharding(mesh, P())
  batch_axes = tuple(a for a in ("data", "fsdp") if a in mesh.shape) or None
  batch_shards = int(np.prod([mesh.shape[a] for a in batch_axes or ()]))
  micro_batch = config.data.batch_size // config.train.accum_steps
  for what, size in (("data.batch_size / train.accum_steps", micro_batch), ("data.eval_batch_size",
                                                                            config.data.eval_batch_size)):
    if size % batch_shards:
      raise ValueError(f"{what} = {size} must be divisible by the {batch_shards} batch shards of the mesh "
                       f"{dict(mesh.shape)} (the batch is split over {batch_axes}).")
  train_batch_sharding = NamedSharding(mesh, P(None, batch_axes))  # [accum, batch, ...]
  eval_batch_sharding = NamedSharding(mesh, P(batch_axes))

  def init_adapters(params):
    # Only what init changed in the base is an output (PiSSA/OLoRA's residual kernels, VeRA's projections), so the
    # base is not copied; rerun at every start, it gives the same values from the same base and seed.
    new_params, trainable = task.init(jax.random.fold_in(jax.random.PRNGKey(config.seed), 0), params)
    return variants.base_changes(params, new_params), trainable

  original = params  # the base as loaded; PiSSA/OLoRA adapters are exported for it
  relora = Relora(config, lora)

  def initial_state(trainable):
    state = {"trainable": trainable, "opt_state": tx.init(trainable), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)}
    if relora.active:  # what restarts folded into the base: the targeted kernels' float32 update
      state["relora"] = relora.initial_state(original)
    return state

  abstract_changes, abstract_trainable = jax.eval_shape(init_adapters, params)
  abstract_state = jax.eval_shape(initial_state, abstract_trainable)
  trainable_specs = {
      name: (sharding.adapter_specs(tree, param_specs, lora.targets) if name == "lora"
             else jax.tree.map(lambda _: P(), tree))
      for name, tree in abstract_state["trainable"].items()
  }
  state_shardings = sharding.tree_shardings_like(
      abstract_state, {**trainable_specs, **(relora.specs(param_specs) if relora.active else {})}, mesh)
  change_specs = variants.change_specs(abstract_changes, param_specs)
  changes, trainable = jax.jit(init_adapters, out_shardings=(sharding.named(change_specs, mesh),
                                                           state_shardings["trainable"]))(params)
  base = params = variants.overlay(original, changes)  # the base the adapters train on (before any ReLoRA restart)
  param_specs = variants.overlay(param_specs, change_specs)
  param_shardings = sharding.named(param_specs, mesh)
  if relora.active:
    relora.compile(state_shardings, param_shardings)  # ReLoRA's variants change nothing in the base: base = original
  initial = trainable["lora"] if lora.config.rewrites_base else None  # PiSSA/OLoRA's A0, B0: the export needs them
  state = jax.jit(initial_state, out_shardings=state_shardings)(trainable)
  if is_main:
    print(lora.summary(base, state["trainable"]["lora"]))  # the variant's trainable leaves and the frozen base
    if relora.active:
      print(relora.describe(original, total_steps))
  train_iter = task.train_batches()
  # Process 0 did more (the summary); orbax's first barrier below is a gloo collective on CPU, which fails when the
  # processes arrive more than 30 s apart: they leave this barrier together.
  distributed.barrier("jlora_state_initialized")
  checkpointer = Checkpointer(workdir, every=config.checkpoint.every, keep=config.checkpoint.keep,
                              use_async=config.checkpoint.use_async)
  target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract_state,
                        state_shardings)
  restored = checkpointer.restore_latest(target)
  start = 0
  if restored is not None:
    state, data_state = restored
    train_iter.set_state(data_state["iterator"])
    start = int(_host(state["step"]))
    logging.warning("Resumed from %s at step %d.", checkpointer.directory, start)
    try:
      _check_resume(start, data_state.get("total_steps"), config.optimizer, total_steps, workdir,
                    relora=config.get("relora"), variant=lora.config.variant)
      _check_base(data_state.get("base_fingerprint"), base_fingerprint, config.model.get("quantize", ""), workdir)
    except WorkdirStateError:
      checkpointer.close()
      raise

  eval_step = jax.jit(task.eval_sums, in_shardings=(state_shardings["trainable"], param_shardings,
                                                    eval_batch_sharding), out_shardings=replicated)
  evaluate = functools.partial(_evaluate, task, eval_step, eval_sharding=eval_batch_sharding)
  params = relora.trained_on(base, state, start)  # after a ReLoRA restart: the base plus the update so far
  export = functools.partial(_export, task=task, original=original, initial=initial, relora=relora,
                             total_steps=total_steps, base=base)
  if start == total_steps:
    checkpointer.close()
    if is_main:
      print(f"already complete: {checkpointer.directory} holds the final step {start} of train.steps={total_steps}; "
            f"nothing to train (a larger --config.train.steps continues from step {start}).")
    after, source = _logged_eval(workdir, start), "logged at"
    if after is None:  # metrics.jsonl lost or truncated: the restored state is evaluated instead
      after, source = evaluate(state["trainable"], params), "evaluated from the checkpoint of"
    return _finish(workdir, task, params, state, train_iter, export, before=None, after=after, skipped=0,
                   preempted=False, restored_final=True, note=f"({source} step {start}; the job was already complete)")

  # The step never sees ReLoRA's update (only a restart changes it): it is not passed through and copied each step.
  step_shardings = _without_update(state_shardings)
  train_step = jax.jit(make_train_step(variants.wrap_loss(task.loss, lora.config), tx),
                       in_shardings=(step_shardings, param_shardings, train_batch_sharding),
                       out_shardings=(step_shardings, replicated))
  compiled_step = None  # compiled ahead of the first step, which reports its memory plan
  writer = MetricWriter(workdir)
  before = None
  if start == 0:
    before = evaluate(state["trainable"], params)
    if task.generation_eval is not None:  # decoding is slow: before training and after the last step only
      before.update(task.generation_eval(state["trainable"], params, 0))
    writer.write(0, before)
    if is_main:
      print(f"eval before training: {_format(before)}")

  progress = Progress(total_steps, start, every=config.train.log_every, active=is_main)
  after, skipped, preempted = None, 0, False
  for step in range(start + 1, total_steps + 1):
    batch = _stack_micro_batches(train_iter, config.train.accum_steps)
    global_batch = _global_batch(batch, train_batch_sharding)
    if compiled_step is None:
      compiled_step = train_step.lower(_without_update(state), params, global_batch).compile()
      figures = memory.step_memory(compiled_step, params)
      memory.write(workdir, figures)
      if is_main:
        print(memory.describe(figures))
    stepped, metrics = compiled_step(_without_update(state), params, global_batch)
    state = {**state, **stepped}
    metrics = {k: _host(v) for k, v in metrics.items()}
    loss, finite = float(metrics["loss"]), bool(metrics["finite"])
    if not finite:
      if config.train.on_nonfinite == "stop":
        checkpointer.close()
        raise NonFiniteError(
            f"Step {step}: loss {loss} / gradient norm {float(metrics['grad_norm'])} is not finite; the update was "
            f"not applied and training stopped. The last checkpoint ({checkpointer.latest_step()}) is intact. Lower "
            "optimizer.learning_rate, check the data, or set train.on_nonfinite='skip'.")
      skipped += 1
      logging.warning("Step %d: non-finite loss/gradient, update skipped (%d so far).", step, skipped)
    if step % config.train.log_every == 0 or step == total_steps:
      writer.write(step, {"train/loss": loss, "train/grad_norm": float(metrics["grad_norm"]),
                          "train/learning_rate": float(schedule(step - 1)), "train/skipped_steps": skipped})
    local_tokens = sum(task.count_tokens({k: v[i] for k, v in batch.items()}) for i in range(config.train.accum_steps))
    progress.update(step, loss=loss, tokens_per_step=local_tokens * jax.process_count())  # hosts hold equal shares
    if step % config.train.eval_every == 0 or step == total_steps:
      after = evaluate(state["trainable"], params)
      if step == total_steps and task.generation_eval is not None:
        after.update(task.generation_eval(state["trainable"], params, step))
      writer.write(step, after)
    if relora.due(step, total_steps):  # before the save: a checkpoint at a restart step holds the restarted state
      state = relora.restart(state, base, step)
      params = relora.trained_on(base, state, step)
      writer.write(step, {"train/relora_restarts": relora.restarts(step, total_steps)})
    preempted = checkpointer.preempted
    checkpointer.maybe_save(step, state, {"iterator": train_iter.get_state(), "total_steps": total_steps,
                                          "base_fingerprint": base_fingerprint},
                            force=preempted or step == total_steps)
    if preempted:
      break
  checkpointer.close()
  writer.close()
  return _finish(workdir, task, params, state, train_iter, export, before=before, after=after, skipped=skipped,
                 preempted=preempted, restored_final=False)


def _without_update(tree: dict) -> dict:
  """A train state (or its shardings) without ReLoRA's update: what the train step takes and returns."""
  return {k: v for k, v in tree.items() if k != "relora"}


def _check_resume(start: int, saved_total: int | None, optimizer_config, total_steps: int, workdir: str, *,
                  relora=None, variant: str = "lora") -> None:
  """Refuses a checkpoint past ``train.steps`` (and, for AdaLoRA, a changed one); says what a changed
  ``train.steps`` does to the schedule."""
  if start > total_steps:
    raise WorkdirStateError(
        f"{workdir} holds a checkpoint at step {start}, past train.steps={total_steps}. Rerun with "
        f"--config.train.steps={start} (or more) to use it, or give another --workdir to train {total_steps} steps.")
  if saved_total is None or saved_total == total_steps:
    return
  if variant == "adalora":
    raise WorkdirStateError(
        f"{workdir} holds an AdaLoRA checkpoint of a {saved_total}-step run; train.steps={total_steps} would change "
        f"its rank budget schedule (total_step) midway. Rerun with --config.train.steps={saved_total}, or give "
        "another --workdir.")
  # The schedule is a function of the optimizer's step count, which the checkpoint carries on: it is not restarted.
  old = learning_rate_schedule(optimizer_config, saved_total, relora)
  new = learning_rate_schedule(optimizer_config, total_steps, relora)
  was = (f"the {saved_total}-step schedule would have used {float(old(start)):.4g}" if start < saved_total else
         f"the {saved_total}-step schedule ended at {float(old(saved_total - 1)):.4g} at step {saved_total}")
  logging.warning(
      "train.steps changed from %d (when this checkpoint was written) to %d: the learning rate now follows the "
      "warmup + cosine decay schedule of a %d-step run, continued at step %d (no new warmup): %.4g at step %d; %s.",
      saved_total, total_steps, total_steps, start + 1, float(new(start)), start + 1, was)


def _check_base(saved: str | None, current: str, quantize: str, workdir: str) -> None:
  """Refuses a checkpoint trained over another frozen base (another checkpoint, or one quantized otherwise)."""
  if saved is not None and saved != current:
    raise WorkdirStateError(
        f"{workdir} holds a checkpoint trained over another frozen base (fingerprint {saved}); this config's base "
        f"(model.quantize={quantize!r}) has {current}. Adapters learn around their base (a quantized one's rounding "
        "too): rerun with the model settings that job used (its config.json), or give another --workdir.")


def _finish(workdir: str, task, params, state: dict, train_iter, export, *, before, after, skipped: int,
            preempted: bool, restored_final: bool, note: str = "") -> dict:
  """Exports the adapter (unless preempted), draws the curves and reports; the job's result."""
  is_main = jax.process_index() == 0
  adapter_dir = None
  last = int(_host(state["step"]))
  if not preempted:
    if is_main:
      print(f"eval after training:  {_format(after)}  {note}".rstrip())
    adapter_dir = os.path.join(workdir, "adapter")
    if restored_final and _exported_step(adapter_dir) == last:
      if is_main:
        print(f"adapter: {adapter_dir} (step {last}) kept")
    else:
      export(adapter_dir, params=params, state=state, step=last)
    if not restored_final or not os.path.exists(os.path.join(workdir, "curves.png")):
      plot_curves(workdir, ("train/loss", "eval/loss"))
  if is_main:
    print(f"data: {train_iter.report()}")
  return {"before": before, "after": after, "steps": last, "preempted": preempted, "skipped_steps": skipped,
          "adapter": adapter_dir, "already_complete": restored_final}


def _logged_eval(workdir: str, step: int) -> dict | None:
  """The eval metrics the job logged at ``step`` (the same on every host: the workdir is shared), or None."""
  rows = [r for r in read_metrics(workdir) if r["step"] == step and any(k.startswith("eval/") for k in r)] \
      if os.path.exists(os.path.join(workdir, "metrics.jsonl")) else []
  logged = {k: float("nan") if v is None else v for k, v in rows[-1].items() if k != "step"} if rows else None
  if jax.process_count() > 1:  # evaluating is collective: every host must take the same branch
    found = multihost_utils.broadcast_one_to_all(np.int32(logged is not None))
    logged = logged if found else None
  return logged


def _exported_step(directory: str) -> int | None:
  """The step of the adapter exported in ``directory``, or None if there is none (the swap in _export makes a
  present directory a complete one)."""
  if not os.path.isdir(directory):
    return None
  try:
    return jlora.load_adapter_metadata(directory)["extra"].get("step")
  except jlora.UnsafeAdapterError as e:  # e.g. left half-written by a version without the swap: ours to replace
    logging.warning("Exporting the adapter again: %s", e)
    return None


def _export(directory: str, *, params, state: dict, step: int, task, original, base, initial, relora: Relora,
            total_steps: int) -> str:
  """The adapter alone (jlora.save_adapters, written by all hosts) plus other trained leaves (a task head).

  The adapter is exported in the form ``train.variants.exported`` gives (PiSSA/OLoRA as plain LoRA on the original
  base, AdaLoRA at its allocated ranks), with the fingerprint of the base it applies to. A ReLoRA run also writes
  its whole update (``train.relora``); its adapter is the last cycle's, on that cycle's base (``params``).

  Written next to ``directory`` and swapped in by a rename, so ``directory`` is either absent or a complete
  export, whenever the job is killed; a rerun of a finished job exports again only if it is absent.
  """
  partial = directory + ".partial"
  if jax.process_index() == 0 and os.path.exists(partial):
    shutil.rmtree(partial)
  distributed.barrier("jlora_export_start")
  trainable = state["trainable"]
  others = {k: v for k, v in trainable.items() if k != "lora"}
  if others:  # first, so that save_adapters' SHA256SUMS manifest covers them
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(os.path.join(os.path.abspath(partial), "trainable_extras"), others)
  extra = {**task.metadata, "step": step}
  if relora.active:
    extra["relora"] = relora.export(partial, base, state, step, total_steps)  # before the adapter: in its manifest
    adapters, lora_config, adapter_base = trainable["lora"], task.lora.config, params
  else:
    adapters, lora_config, adapter_base = variants.exported(task.lora, trainable, state["opt_state"], initial=initial,
                                                            original=original, trained_on=params)
  if task.export_extra is not None and jax.process_index() == 0:  # e.g. a PEFT copy; covered by the manifest too
    if relora.active:  # the last cycle's adapter is not the run's result, and PEFT has no form for the update
      logging.warning("ReLoRA: no PEFT copy of the adapter (its result is %s/%s, a full-rank update).", directory,
                      "relora_update")
    else:
      task.export_extra(os.path.abspath(partial), adapter_base, adapters, lora_config)
  jlora.save_adapters(partial, adapters, lora_config, base_fingerprint=jlora.fingerprint(adapter_base), extra=extra)
  distributed.barrier("jlora_export_written")
  if jax.process_index() == 0:
    if os.path.exists(directory):
      shutil.rmtree(directory)
    os.replace(partial, directory)
  distributed.barrier("jlora_export_done")
  return directory


__all__ = ["NonFiniteError", "WorkdirStateError", "train_and_evaluate"]
