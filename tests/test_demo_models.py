"""The bundled demo target (and drafter): transformers loads them as they are, greedy decoding
matches transformers token for token, and speculative decoding with the demo pair is lossless."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dspark import LLM, SamplingParams

REPO = Path(__file__).resolve().parent.parent
TARGET = REPO / "models" / "dspark-demo-target"
DRAFTER = REPO / "models" / "dspark-demo-drafter"

# Openings of ordinary Python code, written for these tests.
PROMPTS = [
    "def binary_search(items, target):",
    "class Stack:\n    def __init__(self):",
    "import os\nimport sys\n\n\ndef main(argv):",
    "def read_lines(path):\n    with open(path) as f:",
    "    def __repr__(self):",
    "def _is_valid(name):\n    \"\"\"Return True if name is a valid identifier.\"\"\"",
    "for key, value in sorted(d.items()):",
    "try:\n    import zlib\nexcept ImportError:",
    "def encode(self, data):",
    "class Error(Exception):",
    "    if not isinstance(value, int):",
    "def copy(self):\n    return self.__class__(",
    "def split_path(path):\n    head, tail = ",
    "    while i < len(data):",
    "def add(a, b):",
    "result = []\nfor item in items:",
    "def __init__(self, name, value=None):",
    "    raise ValueError(\"",
    "def main():\n    parser = argparse.ArgumentParser(",
    "    return '<%s %r>' % (",
]


@pytest.fixture(scope="module")
def plain() -> LLM:
    return LLM(model=TARGET, max_num_seqs=4)


@pytest.fixture(scope="module")
def plain_greedy(plain) -> list[list[int]]:
    outs = plain.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    return [o.token_ids for o in outs]


def test_transformers_loads_demo_target_and_matches_greedy(plain, plain_greedy):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TARGET))
    model = AutoModelForCausalLM.from_pretrained(str(TARGET), dtype=torch.float32).eval()
    assert model.config.model_type == "qwen3"
    assert tok.mask_token is not None
    for prompt, ours in list(zip(PROMPTS, plain_greedy))[:4]:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        assert ids[0].tolist() == plain.tokenizer.encode(prompt)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                 attention_mask=torch.ones_like(ids), pad_token_id=tok.pad_token_id)
        assert out[0, ids.shape[1]:].tolist() == ours


def test_demo_target_writes_python(plain):
    out = plain.generate("def fibonacci(n):", SamplingParams(temperature=0, max_tokens=48))[0]
    # A code model trained on the standard library continues a header with an indented body.
    assert out.text.startswith("\n    ")
    assert any(kw in out.text for kw in ("return", "if ", "for ", "=", "("))


@pytest.mark.parametrize("gamma", [1, 4, 7])
@pytest.mark.parametrize("batch", [1, 4])
def test_demo_pair_greedy_is_lossless(plain_greedy, gamma, batch):
    spec = LLM(model=TARGET, drafter=DRAFTER, max_num_seqs=batch, num_speculative_tokens=gamma)
    outs = spec.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    assert [o.token_ids for o in outs] == plain_greedy
    rounds = sum(o.metrics.rounds for o in outs)
    emitted = sum(len(o.token_ids) - 1 for o in outs)  # the first token comes from the prefill
    if gamma > 1:
        assert emitted / rounds > 1.5  # the trained drafter is accepted: fewer target forwards
