"""Independent references for jlora.models: tiny transformers (PyTorch) models with random weights.

The other ``test_models_*`` files import the builders below. The tests here guard the harness itself:
a reference whose norms or biases kept their default init would let convention bugs (Gemma's
``1 + w``, a dropped bias) pass unnoticed.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

torch.set_num_threads(2)

VOCAB = 128

# name -> (config class, model class, config kwargs). Small enough to compile in ~1 s.
_DECODER_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
ARCHITECTURES = {
    "llama": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(_DECODER_COMMON, attention_bias=True, mlp_bias=True, rope_theta=500.0),
    ),
    "llama3_rope": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(
            _DECODER_COMMON,
            tie_word_embeddings=True,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
    ),
    "mistral": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        dict(_DECODER_COMMON, sliding_window=4),
    ),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(_DECODER_COMMON)),
    "gemma": (
        transformers.GemmaConfig,
        transformers.GemmaForCausalLM,
        dict(_DECODER_COMMON, head_dim=24, num_key_value_heads=1),
    ),
    "gpt2": (
        transformers.GPT2Config,
        transformers.GPT2LMHeadModel,
        dict(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4),
    ),
    "bert": (
        transformers.BertConfig,
        transformers.BertModel,
        dict(
            vocab_size=VOCAB,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=96,
            max_position_embeddings=64,
        ),
    ),
}
DECODERS = ("llama", "llama3_rope", "mistral", "qwen2", "gemma", "gpt2")


_EMBEDDINGS = ("embed_tokens", "wte", "wpe", "embeddings")


def tiny_hf_model(arch: str, seed: int = 0, matrix_noise: float = 0.05, **overrides) -> torch.nn.Module:
  """A tiny transformers model of ``arch`` whose every parameter is randomised (norms, biases too).

  ``matrix_noise`` is the std of the noise added to projection matrices. Generation tests raise it:
  with the default, tied-embedding models mostly repeat their input token, which would let a broken
  KV cache go unnoticed.
  """
  config_cls, model_cls, kwargs = ARCHITECTURES[arch]
  config = config_cls(**{**kwargs, **overrides})
  config._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = model_cls(config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      is_projection = param.ndim == 2 and not any(e in name for e in _EMBEDDINGS)
      param.add_((matrix_noise if is_projection else 0.05) * torch.randn_like(param))
  return model


def save_hf(model: torch.nn.Module, directory, **kwargs) -> str:
  model.save_pretrained(directory, safe_serialization=True, **kwargs)
  return str(directory)


def left_padded_batch(seed: int = 0, length: int = 10, pad: int = 3) -> tuple[np.ndarray, np.ndarray]:
  """Two rows of random tokens; row 0 is left-padded by ``pad`` tokens (id 0)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, VOCAB, size=(2, length)).astype(np.int32)
  mask = np.ones((2, length), np.int32)
  mask[0, :pad] = 0
  ids[0, :pad] = 0
  return ids, mask


def position_ids(mask: np.ndarray) -> np.ndarray:
  """transformers' generate() positions: cumsum(mask) - 1, clipped at 0."""
  return np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)


def torch_outputs(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray, **kwargs) -> np.ndarray:
  """Logits (decoders) or last hidden states (BERT) of the reference model, as float32 numpy."""
  with torch.no_grad():
    out = model(
        input_ids=torch.from_numpy(ids.astype(np.int64)),
        attention_mask=torch.from_numpy(mask.astype(np.int64)),
        **{k: torch.from_numpy(v.astype(np.int64)) for k, v in kwargs.items()},
    )
  result = out.logits if hasattr(out, "logits") else out.last_hidden_state
  return result.float().numpy()


def assert_close_on_tokens(actual, expected, mask, atol: float) -> None:
  """Max-abs comparison restricted to real (unpadded) positions."""
  keep = np.asarray(mask).astype(bool)
  np.testing.assert_allclose(np.asarray(actual, np.float32)[keep], expected[keep], rtol=0, atol=atol)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_reference_weights_are_all_randomised(arch):
  model = tiny_hf_model(arch)
  assert model.config._attn_implementation == "eager"
  for name, param in model.named_parameters():
    # Default inits of norms and biases are constants (1 or 0); a randomised tensor has spread.
    assert param.detach().numpy().std() > 0.01, f"{name} kept a constant init"


def test_left_padded_batch_and_positions():
  ids, mask = left_padded_batch()
  assert mask[0].tolist() == [0, 0, 0] + [1] * 7
  assert position_ids(mask)[0].tolist() == [0, 0, 0, 0, 1, 2, 3, 4, 5, 6]
  assert position_ids(mask)[1].tolist() == list(range(10))
