"""The `draft-model` drafter (an independent small causal LM sharing the target's tokenizer): a plain
Hugging Face directory loads as a drafter, speculative decoding with it is lossless, its probabilities
are exactly what it sampled from, its cache bookkeeping matches a fresh prefill, vocabulary mismatches
are refused, and `dspark pretrain --tokenizer` trains such a model."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import build_checkpoint, write_tokenizer
from dspark import LLM, SamplingParams
from dspark.drafters import load_drafter
from dspark.drafters.draft_model import DraftModelDrafter
from dspark.errors import CheckpointError
from dspark.sampling import SamplingTensors, draw_uniforms, logits_to_probs, make_generator, sample_inverse_cdf
from helpers import PROMPTS, check_greedy_lossless, sampled_pairs_pvalue

SMALL = dict(num_layers=1, hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1,
             head_dim=16)


@pytest.fixture(scope="module")
def small_draft(tmp_path_factory) -> Path:
    """An independent tiny LM with the target's tokenizer: its drafts are mostly rejected."""
    return build_checkpoint(tmp_path_factory.mktemp("draft"), "qwen3", seed=7, **SMALL).path


@pytest.fixture(scope="module")
def close_draft(qwen3_ckpt, tmp_path_factory) -> Path:
    """The target with its weights perturbed: a draft model that is often, not always, right."""
    path = tmp_path_factory.mktemp("close")
    model = copy.deepcopy(qwen3_ckpt.hf_model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.03)
    model.save_pretrained(str(path))
    write_tokenizer(path)
    return path


def test_hf_directory_loads_as_draft_model(plain, small_draft):
    d = load_drafter(small_draft, plain.target, max_seqs=2, max_len=128)
    assert isinstance(d, DraftModelDrafter) and d.name == "draft-model"
    assert d.target_layer_ids == [] and d.block_size == 7
    assert d.draft.config.num_layers == 1 and d.draft.config.hidden_size == 32
    with pytest.raises(CheckpointError, match="needs a model directory"):
        load_drafter("draft-model", plain.target, max_seqs=1, max_len=64)


@pytest.mark.parametrize("gamma", [1, 4, 7])
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_speculative_equals_plain(qwen3_ckpt, plain, plain_greedy, close_draft, gamma, batch):
    drafter = load_drafter(close_draft, plain.target, max_seqs=batch, max_len=plain.target.context_length)
    accepted = check_greedy_lossless(qwen3_ckpt.path, drafter, plain_greedy, gamma, batch)
    assert accepted > 20 * gamma / (gamma + 2)  # full acceptances (the unread last draft) happen


def test_greedy_small_draft_equals_plain(qwen3_ckpt, plain, plain_greedy, small_draft):
    drafter = load_drafter(small_draft, plain.target, max_seqs=4, max_len=plain.target.context_length)
    check_greedy_lossless(qwen3_ckpt.path, drafter, plain_greedy, 4, 4)


def test_sampled_speculative_output_follows_target(qwen3_ckpt, close_draft):
    llm = LLM(model=qwen3_ckpt.path, drafter=str(close_draft), max_num_seqs=16, num_speculative_tokens=3)
    pvalue, accepted = sampled_pairs_pvalue(llm, qwen3_ckpt.hf_model)
    assert accepted > 50
    assert pvalue > 1e-3, pvalue


def fresh_logits(draft, ids: list[int]) -> torch.Tensor:
    """The draft model's next-token logits at every position of `ids`, from an empty cache: [len, V]."""
    cache = draft.new_cache(1, 128)
    return draft.forward(cache, [cache.allocate()], [ids]).logits[0]


def test_propose_probs_are_the_distributions_sampled_from(plain, close_draft):
    target = plain.target
    d = load_drafter(close_draft, target, max_seqs=3, max_len=128)
    prompts = [[5, 9, 33, 70, 12], [100, 101, 102], [7, 8, 9, 10, 11, 12, 13]]
    for slot, p in enumerate(prompts):
        d.add_sequence(slot, p, None)
    params = [SamplingParams(temperature=0.8, top_k=20, seed=1), SamplingParams(temperature=0),
              SamplingParams(temperature=1.3, top_p=0.9, seed=2)]
    sampling = SamplingTensors.from_params(params)
    anchors, G = [41, 42, 43], 6
    prop = d.propose([0, 1, 2], anchors, G, sampling, [make_generator(p.seed) for p in params])
    assert prop.probs is not None and prop.probs.shape == (3, G, target.vocab_size) and prop.confidence is None
    for i in (0, 2):  # replaying the request's uniforms through the shared sampler gives its tokens
        u = draw_uniforms(G, make_generator(params[i].seed))
        assert sample_inverse_cdf(prop.probs[i], u).tolist() == prop.token_ids[i].tolist()
    assert prop.probs[1].argmax(-1).tolist() == prop.token_ids[1].tolist()
    assert prop.probs[1].amax(-1).tolist() == [1.0] * G
    for i, p in enumerate(prompts):  # independently recomputed from an empty cache
        seq = p + [anchors[i]] + prop.token_ids[i, : G - 1].tolist()
        logits = fresh_logits(d.draft, seq)[len(p):]
        probs = logits_to_probs(logits, sampling.temperature[i], sampling.top_k[i], sampling.top_p[i])
        torch.testing.assert_close(probs, prop.probs[i], rtol=1e-4, atol=1e-5)


def test_commit_keeps_exactly_the_accepted_prefix(plain, close_draft):
    """After rounds with every acceptance pattern (none, some, all, a round without proposal), the
    next proposal equals that of a fresh drafter prefilled with the whole sequence."""
    target = plain.target
    d = load_drafter(close_draft, target, max_seqs=1, max_len=128)
    greedy = SamplingTensors.from_params([SamplingParams(temperature=0)])
    seq = [5, 9, 33, 70, 12]
    d.add_sequence(0, seq, None)
    anchor = 41
    for accept in (0, 2, 5, None, 5, 1, 0):
        if accept is None:  # the engine verified no drafts this round (ℓ = 0 for every request)
            d.commit(0, [anchor], None)
            seq, anchor = seq + [anchor], 60 + len(seq)
            continue
        prop = d.propose([0], [anchor], 5, greedy, [None])
        drafts = prop.token_ids[0].tolist()
        ref = DraftModelDrafter(d.draft, 1, 128, block_size=5)
        ref.add_sequence(0, seq, None)
        assert ref.propose([0], [anchor], 5, greedy, [None]).token_ids[0].tolist() == drafts
        accepted = drafts[:accept]
        d.commit(0, [anchor] + accepted, None)
        seq = seq + [anchor] + accepted
        anchor = 200 + len(seq)  # a bonus token the draft model did not propose
    assert d.cache.length(d._slots[0].cslot) <= len(seq)
    d.free(0)
    assert d._slots == {} and d.cache.num_free == 1


def test_save_load_roundtrip_gives_identical_proposals(plain, small_draft, tmp_path):
    target = plain.target
    a = DraftModelDrafter.from_pretrained(small_draft, target, 2, 128, block_size=5)
    a.save_pretrained(tmp_path / "saved")
    raw = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert raw["drafter_type"] == "draft-model" and raw["block_size"] == 5
    b = load_drafter(tmp_path / "saved", target, max_seqs=2, max_len=128)
    assert isinstance(b, DraftModelDrafter) and b.block_size == 5
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=3)]
    props = []
    for d in (a, b):
        for slot in (0, 1):
            d.add_sequence(slot, [5, 6, 7, 8, 9], None)
        props.append(d.propose([0, 1], [10, 10], 5, SamplingTensors.from_params(params), [None, make_generator(3)]))
    assert torch.equal(props[0].token_ids, props[1].token_ids)
    torch.testing.assert_close(props[0].probs, props[1].probs)


def test_vocabulary_mismatch_is_a_clear_error(plain, small_draft, tmp_path):
    other = build_checkpoint(tmp_path / "v280", "qwen3", seed=1, vocab_size=280, **SMALL).path
    with pytest.raises(CheckpointError, match=r"vocab_size=280 does not match the target model's 300"):
        load_drafter(other, plain.target, max_seqs=1, max_len=64)
    # Same size, different token -> id map.
    swapped = tmp_path / "swapped"
    shutil.copytree(small_draft, swapped)
    tok = json.loads((swapped / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (swapped / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(CheckpointError, match="tokenizer differs from the target's"):
        load_drafter(swapped, plain.target, max_seqs=1, max_len=64)


def test_pretrain_with_target_tokenizer_makes_a_draft_model(qwen3_ckpt, plain, tmp_path):
    from dspark.train import pretrain
    from test_pretrain import TINY, make_corpus

    corpus = make_corpus(tmp_path / "corpus")
    out = tmp_path / "draft"
    # TINY asks for --vocab-size 320; --tokenizer overrides it with the target's 300.
    argv = ["--corpus", str(corpus), "--out", str(out), "--tokenizer", str(qwen3_ckpt.path), "--steps", "6",
            "--save-dtype", "float32", *TINY]
    assert pretrain.main(argv) == 0
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 300
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_text() == (qwen3_ckpt.path / name).read_text()
    assert "reused from" in (out / "README.md").read_text()
    d = load_drafter(out, plain.target, max_seqs=2, max_len=plain.target.context_length)
    assert isinstance(d, DraftModelDrafter)
    spec = LLM(model=qwen3_ckpt.path, drafter=d, max_num_seqs=2, num_speculative_tokens=3)
    p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    assert [o.token_ids for o in spec.generate(PROMPTS[:4], p)] == \
        [o.token_ids for o in plain.generate(PROMPTS[:4], p)]
