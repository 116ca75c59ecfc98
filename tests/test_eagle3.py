"""The EAGLE-3 drafter: its training-time-test forward computes what `propose` computes, speculative
decoding with it is lossless (greedy identity, chi-square on sampled output), its draft probabilities
are exactly what it sampled from, checkpoints round-trip, and `train-drafter --drafter eagle3` trains
and resumes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dspark import LLM, SamplingParams
from dspark.drafters import load_drafter
from dspark.drafters.eagle3 import Eagle3Config, Eagle3Drafter, Eagle3Model
from dspark.models import load_target
from dspark.sampling import SamplingTensors, draw_uniforms, logits_to_probs, make_generator, sample_inverse_cdf
from dspark.train.train_drafter import main
from helpers import PROMPTS, check_greedy_lossless, sampled_pairs_pvalue

G = 7


def random_eagle3(target, seed: int = 0, layers: int = 1, block_size: int = G, std: float = 0.3) -> Eagle3Model:
    """An untrained drafter with weights large enough that its proposals depend on the context."""
    cfg = Eagle3Config.for_target(target.config, block_size=block_size, num_hidden_layers=layers)
    model = Eagle3Model.from_target(cfg, target, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval().requires_grad_(False)


def taps(target, cfg: Eagle3Config, seqs: list[list[int]]) -> torch.Tensor:
    """The target's hidden states at the drafter's taps over whole sequences: [B, T, L, H]."""
    cache = target.new_cache(len(seqs), 128)
    slots = [cache.allocate() for _ in seqs]
    res = target.forward(cache, slots, seqs, hidden_layer_ids=cfg.target_layer_ids)
    return res.hidden.float()


GREEDY = SamplingTensors.from_params([SamplingParams(temperature=0)])


# ---------------------------------------------------------------------------------------------------
# Training-time test == inference


@pytest.mark.parametrize("layers", [1, 2])
def test_ttt_forward_matches_propose(qwen3_ckpt, layers):
    """Step k of the TTT unroll, fed the drafter's own greedy tokens, gives the logits step k of
    `propose` gives after a context built by add_sequence and several commits."""
    target = load_target(qwen3_ckpt.path)
    model = random_eagle3(target, seed=layers, layers=layers)
    rng = random.Random(layers)
    seqs = [[rng.randrange(4, 260) for _ in range(n)] for n in (17, 23)]
    drafter = Eagle3Drafter(model, max_seqs=2, max_len=128)
    full = taps(target, model.config, seqs)
    anchor_pos = [13, 20]
    for slot, (seq, p) in enumerate(zip(seqs, anchor_pos)):
        # Prompt, then commits of uneven sizes up to the anchor (its features are not known yet).
        cuts = [0, 5, 6, 9, p]
        drafter.add_sequence(slot, seq[:5], full[slot, :5])
        for a, b in zip(cuts[1:], cuts[2:]):
            drafter.commit(slot, seq[a:b], full[slot, a:b])
        assert drafter.cache.length(drafter._slots[slot]) == p - 1
    d = drafter.draft_block([0, 1], [seqs[0][13], seqs[1][20]], G, SamplingTensors.from_params(
        [SamplingParams(temperature=0)] * 2), [None, None])
    # Rolled back: the next proposal starts from the same context.
    assert [drafter.cache.length(drafter._slots[s]) for s in (0, 1)] == [12, 19]

    # Teacher forcing on [context, anchor, own drafts d_1..d_{G-1}], padded to one batch.
    inputs = [seq[:p + 1] + d.token_ids[i, :G - 1].tolist() for i, (seq, p) in enumerate(zip(seqs, anchor_pos))]
    T = max(map(len, inputs))
    ids = torch.tensor([x + [0] * (T - len(x)) for x in inputs])
    hidden = taps(target, model.config, [x + [0] * (T - len(x)) for x in inputs])
    # A second, earlier anchor per row checks that anchors do not see each other.
    anchors = torch.tensor([[anchor_pos[0], 4], [6, anchor_pos[1]]])
    out = model.forward_train(hidden, ids, anchors)
    torch.testing.assert_close(out.logits[0, 0], d.logits[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.logits[1, 1], d.logits[1], rtol=1e-4, atol=1e-4)
    assert out.logits[0, 0].argmax(-1).tolist() == d.token_ids[0].tolist()
    # Labels are the next data tokens, here the drafter's own drafts (and one past them).
    assert out.labels[0, 0, : G - 1].tolist() == d.token_ids[0, : G - 1].tolist()
    assert out.label_mask[1, 1].tolist() == [True] * (G - 1) + [False]  # the unpadded row ends there
    assert out.confidence_logits is None


def test_ttt_later_steps_feed_own_features(qwen3_ckpt):
    """Step k >= 2 reads the drafter's previous hidden state, not the target's features: changing
    the target's features after the anchor's step-1 row changes nothing, changing those before it
    changes every step."""
    target = load_target(qwen3_ckpt.path)
    model = random_eagle3(target, seed=3)
    ids = torch.randint(4, 260, (1, 24), generator=torch.Generator().manual_seed(0))
    hidden = taps(target, model.config, ids.tolist())
    anchors = torch.tensor([[10]])
    base = model.forward_train(hidden, ids, anchors).logits
    later = hidden.clone()
    later[:, 10:] += 1.0
    torch.testing.assert_close(model.forward_train(later, ids, anchors).logits, base)
    earlier = hidden.clone()
    earlier[:, 9] += 1.0
    changed = (model.forward_train(earlier, ids, anchors).logits - base).abs().amax(-1)[0, 0]  # [G]
    assert bool((changed > 1e-3).all()), changed


# ---------------------------------------------------------------------------------------------------
# Training through the trainer


@pytest.fixture(scope="module")
def data_file(qwen3_ckpt, tmp_path_factory) -> Path:
    """The target's own greedy continuations (as `dspark datagen` writes them) of the prompts the
    engine tests below decode, so the trained drafter gets drafts accepted there."""
    llm = LLM(model=qwen3_ckpt.path, max_num_seqs=8)
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS + ["the quick brown", "def add(a, b):"]]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=28, ignore_eos=True))
    path = tmp_path_factory.mktemp("e3data") / "data.jsonl"
    path.write_text("".join(json.dumps({"prompt_ids": p, "output_ids": o.token_ids}) + "\n"
                            for p, o in zip(prompts, outs)))
    return path


TRAIN_ARGS = ["--drafter", "eagle3", "--block-size", str(G), "--num-layers", "1", "--anchors-per-seq", "8",
              "--steps", "40", "--batch-size", "4", "--lr", "5e-3", "--warmup-steps", "2", "--eval-every", "20",
              "--ckpt-every", "4", "--threads", "1", "--val-percent", "10"]


@pytest.fixture(scope="module")
def trained(qwen3_ckpt, data_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("e3run") / "eagle3"
    assert main(["--target", str(qwen3_ckpt.path), "--data", str(data_file), "--out", str(out), *TRAIN_ARGS]) == 0
    return out


def test_training_reduces_loss_and_saves_a_loadable_drafter(qwen3_ckpt, trained):
    log = json.loads((trained / "training_log.json").read_text())
    ls = log["train_losses"]
    assert len(ls) == 40
    assert sum(ls[-5:]) / 5 < sum(ls[:5]) / 5 - 0.1, ls
    assert log["evals"][-1]["val_loss"] < log["evals"][0]["val_loss"] + 1e-6
    raw = json.loads((trained / "config.json").read_text())
    assert raw["architectures"] == ["Eagle3DraftModel"] and raw["drafter_type"] == "eagle3"
    assert raw["block_size"] == G and raw["num_hidden_layers"] == 1
    target = load_target(qwen3_ckpt.path)
    d = load_drafter(trained, target, max_seqs=1, max_len=64)
    assert isinstance(d, Eagle3Drafter) and d.name == "eagle3"
    # The same taps DSpark's trainer would choose for this target.
    from dspark.drafters import default_target_layer_ids
    assert d.target_layer_ids == default_target_layer_ids(target.num_layers)


def test_train_drafter_cli_resumes_exactly(qwen3_ckpt, data_file, trained, tmp_path):
    out = tmp_path / "resumed"
    argv = ["--target", str(qwen3_ckpt.path), "--data", str(data_file), "--out", str(out), *TRAIN_ARGS]
    assert main(argv + ["--stop-after", "6"]) == 0  # last checkpoint at step 4: steps 5-6 are redone
    assert not (out / "config.json").exists() and (out / ".work" / "checkpoint.pt").exists()
    assert main(argv) == 0
    full = json.loads((trained / "training_log.json").read_text())["train_losses"]
    assert json.loads((out / "training_log.json").read_text())["train_losses"] == pytest.approx(full, abs=1e-6)


# ---------------------------------------------------------------------------------------------------
# Losslessness in the engine


@pytest.mark.parametrize("gamma", [1, 4, 7])
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_speculative_equals_plain(qwen3_ckpt, plain, plain_greedy, trained, gamma, batch):
    """The trained drafter gets many drafts accepted (multi-token commits, full acceptance) and some
    rejected (rollback of the scratch rows)."""
    drafter = load_drafter(trained, plain.target, max_seqs=batch, max_len=plain.target.context_length)
    accepted = check_greedy_lossless(qwen3_ckpt.path, drafter, plain_greedy, gamma, batch)
    assert accepted > 20 * gamma / (gamma + 2)


@pytest.mark.parametrize("gamma,batch", [(7, 4)])
def test_greedy_untrained_drafter_equals_plain(qwen3_ckpt, plain, plain_greedy, gamma, batch):
    """An untrained drafter is almost always rejected at the first position."""
    drafter = Eagle3Drafter(random_eagle3(plain.target, seed=gamma), batch, plain.target.context_length)
    check_greedy_lossless(qwen3_ckpt.path, drafter, plain_greedy, gamma, batch)


def test_sampled_speculative_output_follows_target(qwen3_ckpt, trained):
    llm = LLM(model=qwen3_ckpt.path, drafter=str(trained), max_num_seqs=16, num_speculative_tokens=3)
    pvalue, accepted = sampled_pairs_pvalue(llm, qwen3_ckpt.hf_model)
    assert accepted > 50  # both the acceptance and the residual branches ran
    assert pvalue > 1e-3, pvalue


# ---------------------------------------------------------------------------------------------------
# Draft probabilities, checkpoints


def test_propose_probs_are_the_distributions_sampled_from(qwen3_ckpt):
    target = load_target(qwen3_ckpt.path)
    model = random_eagle3(target, seed=5, std=0.1)
    drafter = Eagle3Drafter(model, max_seqs=3, max_len=64)
    prompts = [[5, 9, 33, 70, 12], [100, 101, 102], [7, 8, 9, 10, 11, 12, 13]]
    for slot, p in enumerate(prompts):
        drafter.add_sequence(slot, p, taps(target, model.config, [p])[0])
    params = [SamplingParams(temperature=0.8, top_k=20, seed=1), SamplingParams(temperature=0),
              SamplingParams(temperature=1.3, top_p=0.9, seed=2)]
    sampling = SamplingTensors.from_params(params)
    anchors = [41, 42, 43]
    prop = drafter.propose([0, 1, 2], anchors, G, sampling, [make_generator(p.seed) for p in params])
    assert prop.probs is not None and prop.probs.shape == (3, G, target.vocab_size)
    torch.testing.assert_close(prop.probs.sum(-1), torch.ones(3, G))
    # Replaying each request's uniforms through the shared sampler reproduces its tokens.
    for i in (0, 2):
        u = draw_uniforms(G, make_generator(params[i].seed))
        assert sample_inverse_cdf(prop.probs[i], u).tolist() == prop.token_ids[i].tolist()
    assert prop.probs[1].amax(-1).tolist() == [1.0] * G  # greedy row: one-hot on its token
    assert prop.probs[1].argmax(-1).tolist() == prop.token_ids[1].tolist()
    # Independently: the teacher-forced training forward on the drafted tokens gives the same
    # distributions after the same temperature/top-k/top-p.
    for i, p in enumerate(prompts):
        seq = p + [anchors[i]] + prop.token_ids[i, : G - 1].tolist()
        out = model.forward_train(taps(target, model.config, [seq]), torch.tensor([seq]), torch.tensor([[len(p)]]))
        probs = logits_to_probs(out.logits[0, 0], sampling.temperature[i], sampling.top_k[i], sampling.top_p[i])
        torch.testing.assert_close(probs, prop.probs[i], rtol=1e-4, atol=1e-5)


def test_save_load_roundtrip_gives_identical_proposals(qwen3_ckpt, tmp_path):
    target = load_target(qwen3_ckpt.path)
    a = Eagle3Drafter(random_eagle3(target, seed=9, layers=2, block_size=5), 2, 64)
    a.save_pretrained(tmp_path / "e3")
    saved = load_file(str(tmp_path / "e3" / "model.safetensors"))
    assert "fc.weight" in saved and "embed_tokens.weight" not in saved  # the target's copy is used
    b = load_drafter(tmp_path / "e3", target, max_seqs=2, max_len=64)
    assert isinstance(b, Eagle3Drafter) and b.block_size == 5 and b.config.num_hidden_layers == 2
    prompt = [5, 6, 7, 8, 9, 10]
    hidden = taps(target, a.config, [prompt])[0]
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=4)]
    for d in (a, b):
        for slot in (0, 1):
            d.add_sequence(slot, prompt, hidden)
    pa = a.propose([0, 1], [11, 11], 5, SamplingTensors.from_params(params), [None, make_generator(4)])
    pb = b.propose([0, 1], [11, 11], 5, SamplingTensors.from_params(params), [None, make_generator(4)])
    assert torch.equal(pa.token_ids, pb.token_ids)
    torch.testing.assert_close(pa.probs, pb.probs)
    with pytest.raises(Exception, match="block_size"):
        b.propose([0], [11], 6, GREEDY, [None])
