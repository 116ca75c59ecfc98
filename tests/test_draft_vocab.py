"""Reduced draft vocabularies (`draft_vocab_size` + `d2t`, as vLLM loads them): the drafter predicts a
subset of the target's tokens, and decoding with it stays lossless (greedy identity, chi-square on
sampled output); the training loss is the exact L1 distance to the target for the distribution
actually drafted; checkpoints round-trip; train-drafter chooses the subset from the data."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from dspark import LLM, SamplingParams
from dspark.drafters import DSparkConfig, DSparkDrafter, DSparkModel
from dspark.drafters.eagle3 import Eagle3Config, Eagle3Drafter, Eagle3Model
from dspark.errors import CheckpointError
from dspark.sampling import SamplingTensors, make_generator
from dspark.train.losses import l1_distance, loss_terms
from dspark.train.train_drafter import Sequence, frequent_tokens, main
from helpers import PROMPTS, check_greedy_lossless, sampled_pairs_pvalue

pytestmark = pytest.mark.usefixtures("one_thread")


def subset(vocab: int, n: int, seed: int) -> torch.Tensor:
    return torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))[:n]


def reduced_drafter(target, kind: str, n: int, seed: int = 0, max_seqs: int = 4, include: list[int] = ()):
    """An untrained drafter over `n` random target tokens (plus `include`), weights large enough that
    its proposals vary with the context."""
    ids = torch.unique(torch.cat([torch.tensor(list(include), dtype=torch.long), subset(target.vocab_size, n, seed)]))
    ids = ids[:n] if ids.numel() > n else torch.cat([ids, torch.tensor([i for i in range(target.vocab_size)
                                                                         if i not in set(ids.tolist())][:n - ids.numel()])])
    if kind == "eagle3":
        cfg = Eagle3Config.for_target(target.config, block_size=7, num_hidden_layers=1, draft_vocab_size=n)
        model = Eagle3Model.from_target(cfg, target, seed=seed)
    else:
        cfg = DSparkConfig.for_target(target.config, target.tokenizer.mask_token_id, block_size=7,
                                      num_hidden_layers=1, markov_rank=0 if kind == "dflash" else 16,
                                      drafter_type=kind, draft_vocab_size=n)
        model = DSparkModel.from_target(cfg, target, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    model.set_draft_vocab(ids)
    model.requires_grad_(False).eval()
    cls = Eagle3Drafter if kind == "eagle3" else DSparkDrafter
    return cls(model, max_seqs, target.context_length)


def test_loss_is_the_exact_l1_of_the_zero_padded_draft() -> None:
    g = torch.Generator().manual_seed(0)
    V, Vd, G = 40, 12, 3
    ids = subset(V, Vd, 1).sort().values
    draft = torch.randn(2, G, Vd, generator=g, requires_grad=True)
    target = torch.randn(2, G, V, generator=g)
    labels = torch.randint(0, V, (2, G), generator=g)
    labels[0, 0] = int(ids[3])  # one label inside the draft vocabulary, one surely outside
    outside = sorted(set(range(V)) - set(ids.tolist()))[0]
    labels[0, 1] = outside
    mask = torch.ones(2, G, dtype=torch.bool)
    t = loss_terms(draft, target, labels, mask, decay=None, draft_ids=ids)
    full = torch.zeros(2, G, V)
    full[..., ids] = torch.softmax(draft.detach(), -1)
    want = l1_distance(full, torch.softmax(target, -1)).sum()
    assert torch.allclose(t.tv, want, atol=1e-5)
    # CE only where the label can be drafted: the outside label contributes nothing.
    logp = torch.log_softmax(draft.detach(), -1)
    t2d = {int(v): i for i, v in enumerate(ids)}
    ce = sum(-float(logp[b, k, t2d[int(labels[b, k])]]) for b in range(2) for k in range(G) if int(labels[b, k]) in t2d)
    assert t.ce.item() == pytest.approx(ce, rel=1e-5)
    # τ̂ from the same exact acceptance rates
    acc = (1 - 0.5 * l1_distance(full, torch.softmax(target, -1))).clamp(0, 1)
    assert t.tau_sum.item() == pytest.approx(float((1 + acc.cumprod(-1).sum(-1)).sum()), rel=1e-5)
    t.tv.backward()
    assert draft.grad is not None and draft.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["dspark", "dflash", "eagle3"])
def test_proposals_are_target_ids_inside_the_draft_vocab(plain, kind) -> None:
    d = reduced_drafter(plain.target, kind, 60, seed=3, max_seqs=2)
    allowed = set(d.model.draft_ids.tolist())
    H = plain.target.config.hidden_size
    L = len(d.model.config.target_layer_ids)
    prompt = [5, 9, 13, 17, 21]
    d.add_sequence(0, prompt, torch.randn(len(prompt), L, H))
    sampling = SamplingTensors.from_params([SamplingParams(temperature=1.0, top_k=10)])
    out = d.draft_block([0], [40], 7, sampling, [make_generator(1)])
    assert set(out.token_ids.flatten().tolist()) <= allowed
    assert out.logits.shape[-1] == 60  # logits live in the draft vocabulary
    probs = out.probs[0]  # [gamma, V]: over the target's vocabulary, zero outside the draft one
    assert probs.shape[-1] == plain.target.vocab_size
    assert torch.allclose(probs.sum(-1), torch.ones(7), atol=1e-5)
    outside = torch.tensor(sorted(set(range(plain.target.vocab_size)) - allowed))
    assert float(probs[:, outside].abs().max()) == 0.0
    for k, tok in enumerate(out.token_ids[0].tolist()):
        assert probs[k, tok] > 0  # each token was drawn from the distribution reported for it


@pytest.mark.parametrize("kind", ["dspark", "eagle3"])
@pytest.mark.parametrize("gamma,batch", [(1, 1), (4, 4), (7, 1)])
def test_greedy_with_reduced_vocab_equals_plain(qwen3_ckpt, plain, plain_greedy, kind, gamma, batch) -> None:
    # Half the vocabulary, always holding the target's own greedy tokens, so drafts are accepted too.
    own = sorted({t for seq in plain_greedy for t in seq})
    d = reduced_drafter(plain.target, kind, plain.target.vocab_size // 2, seed=gamma, max_seqs=batch, include=own)
    check_greedy_lossless(qwen3_ckpt.path, d, plain_greedy, gamma, batch)


def test_sampled_with_reduced_vocab_follows_target(qwen3_ckpt, plain) -> None:
    d = reduced_drafter(plain.target, "dspark", plain.target.vocab_size // 3, seed=5, max_seqs=8)
    llm = LLM(model=qwen3_ckpt.path, drafter=d, max_num_seqs=8, num_speculative_tokens=3)
    pvalue, _ = sampled_pairs_pvalue(llm, qwen3_ckpt.hf_model, n=2000, top_k=4)
    assert pvalue > 1e-3, pvalue


@pytest.mark.parametrize("kind", ["dspark", "eagle3"])
def test_save_load_roundtrip_keeps_vocab_and_proposals(qwen3_ckpt, plain, tmp_path, kind) -> None:
    d = reduced_drafter(plain.target, kind, 77, seed=7, max_seqs=1)
    out = d.save_pretrained(tmp_path / kind)
    raw = json.loads((out / "config.json").read_text())
    assert raw["draft_vocab_size"] == 77 and raw["vocab_size"] == plain.target.vocab_size
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        d2t = f.get_tensor("d2t")
    assert d2t.dtype == torch.int64  # offsets, never rounded to the weights' float dtype
    assert torch.equal(torch.arange(77) + d2t, d.model.draft_ids)
    spec = LLM(model=qwen3_ckpt.path, drafter=str(out), max_num_seqs=1, num_speculative_tokens=5)
    assert torch.equal(spec.drafter.model.draft_ids, d.model.draft_ids)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    plain_out = plain.generate(PROMPTS[:2], params)
    assert [o.token_ids for o in spec.generate(PROMPTS[:2], params)] == [o.token_ids for o in plain_out]


def test_bad_vocab_is_refused(plain, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="draft_vocab_size"):
        DSparkConfig.for_target(plain.target.config, 1, draft_vocab_size=plain.target.vocab_size + 1)
    d = reduced_drafter(plain.target, "dspark", 20, seed=1, max_seqs=1)
    with pytest.raises(ValueError, match="20 distinct"):
        d.model.set_draft_vocab(torch.tensor([1, 1, 2]))
    out = d.save_pretrained(tmp_path / "bad")
    from safetensors.torch import load_file, save_file
    w = load_file(str(out / "model.safetensors"))
    w["d2t"] = w["d2t"] + 10_000  # maps draft ids past the target's vocabulary
    save_file(w, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match="d2t"):
        DSparkModel.load(out, plain.target)


def test_draft_ids_follow_a_new_vocabulary(plain) -> None:
    """draft_ids is cached for the draft loop; choosing another vocabulary (or loading d2t) renews it."""
    d = reduced_drafter(plain.target, "dspark", 20, seed=1, max_seqs=1)
    first = d.model.draft_ids.clone()
    with torch.inference_mode():
        assert torch.equal(d.model.draft_ids, first)
    other = subset(plain.target.vocab_size, 20, seed=7).sort().values
    assert not torch.equal(other, first)
    d.model.set_draft_vocab(other)
    assert torch.equal(d.model.draft_ids, other)
    assert torch.equal(d.model.to_target_tokens(torch.arange(20)), other)
    d.model.load_state_dict({**d.model.state_dict(), "d2t": first - torch.arange(20)}, strict=False)
    assert torch.equal(d.model.draft_ids, first)


def test_frequent_tokens_picks_the_response_counts() -> None:
    # Responses: 1 x4, 2 x2, 3 x1, 4 x1 (8 tokens); prompts only: 9 x2, 8 x2.
    seqs = [Sequence(ids=[9, 9, 8, 1, 1, 1, 2, 2, 3], output_start=3), Sequence(ids=[8, 1, 4], output_start=1)]
    ids, covered = frequent_tokens(seqs, 3, 10)
    assert ids.tolist() == [1, 2, 3]  # 3 and 4 tie on every count: the lower id
    assert covered == pytest.approx(7 / 8)
    ids, covered = frequent_tokens(seqs, 5, 10)
    assert ids.tolist() == [1, 2, 3, 4, 8] and covered == 1.0  # then prompt tokens (8 and 9 tie: lower id)


def test_train_drafter_with_reduced_vocab(qwen3_ckpt, plain, tmp_path) -> None:
    llm = plain
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS[:10]]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt_ids": p, "output_ids": o.token_ids}) + "\n"
                            for p, o in zip(prompts, outs)))
    out = tmp_path / "drafter"
    args = ["--target", str(qwen3_ckpt.path), "--data", str(data), "--out", str(out), "--drafter", "dspark",
            "--block-size", "4", "--num-layers", "1", "--markov-rank", "8", "--anchors-per-seq", "4",
            "--steps", "30", "--batch-size", "4", "--lr", "3e-3", "--eval-every", "15", "--eval-seqs", "4",
            "--threads", "1", "--draft-vocab-size", "64"]
    assert main(args) == 0
    log = json.loads((out / "training_log.json").read_text())
    assert log["train_losses"][-1] < log["train_losses"][0]
    assert 0.5 < log["draft_vocab_coverage"] <= 1.0
    raw = json.loads((out / "config.json").read_text())
    assert raw["draft_vocab_size"] == 64
    assert "Draft vocabulary" in (out / "README.md").read_text()
    spec = LLM(model=qwen3_ckpt.path, drafter=str(out), max_num_seqs=2, num_speculative_tokens=4)
    got = spec.generate(prompts[:4], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    assert [o.token_ids for o in got] == [o.token_ids for o in outs[:4]]
    assert sum(o.metrics.accepted_drafts for o in got) > 0


def test_stored_normalisers_give_the_full_vocabulary_loss(qwen3_ckpt, plain) -> None:
    """Offline training with a reduced vocabulary runs the target's head over the draft rows only (its
    log-normaliser cached per sequence); the loss terms equal those from the full-vocabulary logits."""
    from dspark.train.train_drafter import (TargetNormalisers, aligned_target_logits, make_batch,
                                            sample_anchors, target_features)

    target = plain.target
    d = reduced_drafter(target, "dspark", 90, seed=11, max_seqs=1)
    model = d.model
    prompts = [plain.tokenizer.encode(p) for p in PROMPTS[:3]]
    outs = plain.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    seqs = [Sequence(ids=p + o.token_ids, output_start=len(p), hidden=("mem", i))
            for i, (p, o) in enumerate(zip(prompts, outs))]
    anchors = [sample_anchors(s, 4, [0, i]) for i, s in enumerate(seqs)]
    batch = make_batch(seqs, anchors, 4)
    cfgd = model.config
    feats = target_features(target, target.new_cache(3, 128), batch, cfgd.target_layer_ids)
    out = model(feats.hidden, batch.input_ids, batch.anchors, batch.anchor_mask, batch.loss_mask)
    full = loss_terms(out.logits, aligned_target_logits(target, feats.last, batch.anchors, cfgd.block_size),
                      out.labels, out.label_mask, out.confidence_logits, 4.0, model.draft_ids)
    norm = TargetNormalisers(target, model.draft_ids, chunk=5)  # chunks smaller than a sequence
    for _ in range(2):  # the second pass reads the cached normalisers
        lp = norm.log_probs(batch, feats.last, cfgd.block_size)
        red = loss_terms(out.logits, lp, out.labels, out.label_mask, out.confidence_logits, 4.0, model.draft_ids,
                         target_in_draft_vocab=True)
        for name in ("ce", "tv", "conf", "weight_sum", "tau_sum"):
            assert getattr(red, name).item() == pytest.approx(getattr(full, name).item(), rel=1e-4, abs=1e-5), name
    assert len(norm._lse) == 3
