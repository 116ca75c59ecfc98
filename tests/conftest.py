"""Shared fixtures: tiny random checkpoints built with transformers' own classes, and a tiny tokenizer.

Everything is created in pytest's tmp dirs; nothing comes from the Hugging Face hub.

    def test_x(qwen3_ckpt):            # TinyCheckpoint(path, hf_model)
        target = load_target(qwen3_ckpt.path)
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

# Tiny models: one thread is as fast as two and immune to oversubscription on a busy machine.
torch.set_num_threads(1)

# Let the tests import `dspark` from this checkout without installing it.
_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]
TOKENIZER_VOCAB = 260  # < TINY_VOCAB so the model can embed every token
TINY_VOCAB = 300

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Speculative decoding drafts a block of tokens and the target verifies them in one pass.",
    "Hello world! Bonjour le monde. Hallo Welt. 你好，世界。 héllo wörld ñ",
    "def add(a, b):\n    return a + b\n",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 and symbols #$%&*()[]{}",
] * 20


def write_tokenizer(path: Path, chat_template: str | None = CHAT_TEMPLATE, mask: bool = True) -> None:
    """Train a tiny byte-level BPE and write tokenizer.json + tokenizer_config.json into `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config: dict[str, Any] = {
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": {"content": "<|endoftext|>", "special": True},
        "unk_token": None,
        "added_tokens_decoder": {
            str(tok.token_to_id(t)): {"content": t, "special": True} for t in SPECIAL_TOKENS
        },
    }
    if mask:
        config["mask_token"] = "<|mask|>"
    if chat_template is not None:
        config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


@dataclass
class TinyCheckpoint:
    path: Path
    hf_model: Any  # the transformers model the checkpoint was saved from (float32, eval mode)


def build_checkpoint(
    path: Path,
    family: str = "qwen3",
    *,
    seed: int = 0,
    tie: bool = False,
    max_shard_size: str | None = None,
    num_layers: int = 3,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> TinyCheckpoint:
    """Save a tiny random transformers model (and the tiny tokenizer) into `path`."""
    import transformers

    classes = {
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }
    config_cls, model_cls = classes[family]
    kwargs: dict[str, Any] = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        eos_token_id=2,
    )
    if family == "qwen3":
        kwargs["head_dim"] = 16
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs))
    # Default init (std 0.02) makes every layer nearly the identity; larger weights make parity bite.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    model.eval()
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.to(dtype).save_pretrained(str(path), **save_kwargs)
    if dtype != torch.float32:
        # Casting back would leave buffers (RoPE inv_freq) rounded: reload the reference from disk.
        model = model_cls.from_pretrained(str(path), dtype=torch.float32).eval()
    write_tokenizer(path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return TinyCheckpoint(path, model)


@pytest.fixture(scope="session")
def qwen3_ckpt(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoint:
    return build_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")


@pytest.fixture(scope="session")
def llama_ckpt(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoint:
    # Llama 3.1 RoPE scaling with a short original context, so scaled frequencies actually matter.
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    return build_checkpoint(
        tmp_path_factory.mktemp("llama"), "llama", seed=1, tie=True, rope_scaling=scaling,
        attention_bias=True, mlp_bias=True,
    )


@pytest.fixture(scope="session")
def qwen3_bf16_ckpt(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoint:
    # bf16 weights (exact fp16 values): loaded as float32 on CPU, they run the packed fp16-weight GEMM.
    return build_checkpoint(tmp_path_factory.mktemp("qwen3bf16"), "qwen3", seed=5, tie=True, dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def llama_bf16_ckpt(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoint:
    return build_checkpoint(tmp_path_factory.mktemp("llamabf16"), "llama", seed=6, attention_bias=True,
                            mlp_bias=True, dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def qwen2_ckpt(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoint:
    return build_checkpoint(tmp_path_factory.mktemp("qwen2"), "qwen2", seed=2, num_layers=2)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    write_tokenizer(path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return path


# ---------------------------------------------------------------------------------------------------
# Fixtures several test modules share (per module: each module gets its own instance)


@pytest.fixture(scope="session")
def _smollm2_cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("smollm2-cache")


@pytest.fixture(scope="module")
def smollm2_cache(_smollm2_cache_root):
    """GGUF conversions go to one test cache for the session (converted once), never the user's."""
    old = os.environ.get("DSPARK_CACHE_DIR")
    os.environ["DSPARK_CACHE_DIR"] = str(_smollm2_cache_root)
    yield _smollm2_cache_root
    if old is None:
        os.environ.pop("DSPARK_CACHE_DIR", None)
    else:
        os.environ["DSPARK_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def one_thread():
    # Tiny tensors: extra threads only contend with each other (and anything else on the machine).
    # For modules whose code may change the thread count (trainers set it from their config).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def target(qwen3_ckpt):
    """The tiny Qwen3 target, loaded by DSpark."""
    from dspark.models import load_target

    return load_target(qwen3_ckpt.path)


@pytest.fixture(scope="module")
def plain(qwen3_ckpt):
    """A plain (no drafter) LLM over the tiny Qwen3 target."""
    from dspark import LLM

    return LLM(model=qwen3_ckpt.path, max_num_seqs=4)


@pytest.fixture(scope="module")
def plain_greedy(plain) -> list[list[int]]:
    """Plain greedy output for helpers.PROMPTS, 20 tokens each: what lossless speculation must reproduce."""
    from dspark import SamplingParams
    from helpers import PROMPTS

    outs = plain.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    return [o.token_ids for o in outs]
