"""LoRA SFT of a Llama-family checkpoint (Llama 2/3, Mistral, Qwen2, Gemma) on chat-style JSONL.

Real checkpoint (any HF directory jlora.models can load):
  python -m train --config configs/llama_sft.py --workdir DIR --config.model.path=/ckpt/Llama-3.2-1B \\
      --config.data.source="{'train': 'train.jsonl', 'validation': 'val.jsonl'}" --config.data.end_token='<|eot_id|>'
Smoke (a tiny random-weight Llama and BPE tokenizer created locally; seconds):
  python -m train --config configs/llama_sft.py:smoke --workdir /tmp/llama_sft_smoke
Another variant (train/variants.py), e.g. DoRA with ReLoRA restarts every 4 steps:
  python -m train --config configs/llama_sft.py:smoke --workdir /tmp/dora_relora --config.lora.use_dora=True \\
      --config.relora.every=4 --config.relora.warmup_steps=2
"""

import ml_collections

from configs import common


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "causal_lm"  # train.tasks: packed next-token loss on trained tokens only
  config.seed = 0  # seeds adapter init, adapter dropout and the data shuffle

  config.model = ml_collections.ConfigDict()
  config.model.path = ""  # HF checkpoint dir (config.json + *.safetensors + tokenizer.json)
  config.model.create_tiny = False  # create a tiny random Llama in WORKDIR/tiny_llama instead (smoke tests)
  config.model.dtype = "bfloat16"  # compute dtype of the frozen base (adapters stay float32)
  config.model.param_dtype = "bfloat16"  # storage dtype of the frozen base params
  config.model.scan_layers = True  # stack decoder layers with nn.scan (one compiled layer)
  config.model.remat = "dots"  # per-layer rematerialisation: "none", "full", "dots", "dots_no_batch"
  common.add_quantization(config, targets=r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel")

  config.lora = ml_collections.ConfigDict()  # fields of jlora.LoraConfig
  config.lora.targets = r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel"  # all linear layers
  config.lora.rank = 16  # adapter rank r
  config.lora.alpha = 32.0  # scale s = alpha / r
  config.lora.dropout = 0.05  # dropout on the adapter input, training only
  config.lora.use_rslora = False  # s = alpha / sqrt(r) instead
  config.lora.init = "kaiming_uniform"  # "kaiming_uniform" (PEFT's), "gaussian"; from W: "pissa", "pissa_niter_K", "olora"
  common.add_variants(config)  # lora.use_dora, lora.variant and its options; config.relora (ReLoRA)

  config.data = ml_collections.ConfigDict()
  config.data.source = "pydoc_sft"  # "pydoc_sft" (built-in, from Python's help text) or {split: JSONL path}
  config.data.name = "pydoc_sft"  # TFDS config name under WORKDIR/data/tfds
  config.data.seq_len = 512  # tokens per packed row
  config.data.batch_size = 16  # rows per optimizer step (split into train.accum_steps micro-batches)
  config.data.eval_batch_size = 16  # rows per eval batch
  config.data.end_token = "</s>"  # end-of-turn token of the chat template (must be in the tokenizer)
  config.data.bos_token = ""  # token before every example ("" for none), e.g. "<s>"
  config.data.tfds = ml_collections.ConfigDict()  # read a registered TFDS dataset by name instead of data.source
  config.data.tfds.name = ""  # e.g. "imdb_reviews" or "jlora_jsonl_classification/my_data"; "" = use data.source
  config.data.tfds.data_dir = ""  # where it is stored ("" = TFDS default)
  config.data.tfds.train_split = "train"  # split (TFDS slicing allowed, e.g. "train[:90%]")
  config.data.tfds.eval_split = "validation"  # held-out split, e.g. "test" or "train[90%:]"
  config.data.tfds.text_field = "text"  # the text feature
  config.data.on_bad_example = "skip"  # "raise" or "skip" (count and report) malformed/over-long examples

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 2e-4  # peak learning rate
  config.optimizer.warmup_steps = 50  # linear warmup steps
  config.optimizer.final_lr_fraction = 0.1  # cosine decays to learning_rate * this
  config.optimizer.b1 = 0.9  # Adam beta1
  config.optimizer.b2 = 0.999  # Adam beta2
  config.optimizer.weight_decay = 0.0  # AdamW decoupled weight decay
  config.optimizer.grad_clip_norm = 1.0  # global-norm clipping; 0 disables
  config.optimizer.lora_plus_ratio = 0.0  # LoRA+: lr_B / lr_A; 0 disables

  config.train = ml_collections.ConfigDict()
  config.train.steps = 1000  # optimizer steps
  config.train.accum_steps = 1  # gradient-accumulation micro-batches per step
  config.train.log_every = 10  # steps between train-metric lines
  config.train.eval_every = 200  # steps between evaluations (and at the end)
  config.train.on_nonfinite = "stop"  # "stop": NaN/inf loss or gradient ends the run; "skip": drop that update

  common.add_runtime(config, checkpoint_every=200, keep=3)

  if variant == "smoke":
    config.model.create_tiny = True
    config.model.dtype = "float32"
    config.model.param_dtype = "float32"
    config.data.seq_len = 128
    config.data.batch_size = 8
    config.data.eval_batch_size = 8
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 2
    config.train.steps = 16
    config.train.accum_steps = 2
    config.train.log_every = 2
    config.train.eval_every = 8
    config.checkpoint.every = 8
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; known: '' (default), 'smoke'")
  return config
