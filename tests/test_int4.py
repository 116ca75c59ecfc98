"""The int4 weight GEMM for GGUF Q4_0 / Q4_1 matrices: the codes reproduce the file, the kernel matches
its plain reference (float32 activations, and 8-bit activations: `--cpu-gemm int4-a8`, the default), and
speculative decoding on it stays lossless (greedy identity, chi-square) on both numerics."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import build_checkpoint
from gguf_files import write_gguf
from helpers import PROMPTS, sampled_pairs_pvalue

from dspark import LLM, SamplingParams
from dspark.drafters import DSparkConfig, DSparkDrafter, DSparkModel
from dspark.models import load_target
from dspark.models import int4_gemm, row_attention
from dspark.models.gguf import q4_codes
from dspark.models.transformer import Int4Linear, Int8Linear, _torch_int4_available, int4_available

pytestmark = pytest.mark.skipif(not int4_available(), reason="no CPU int4 GEMM here")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "int4-cache"))


@pytest.fixture(scope="module")
def q4_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("int4")
    ck = build_checkpoint(root / "llama", "llama", seed=21, num_layers=2, hidden_size=64, intermediate_size=128)
    types = {"blk.0.ffn_up.weight": "Q4_0", "blk.1.attn_q.weight": "Q4_0"}  # the rest Q4_1
    return write_gguf(ck.path, root / "q4.gguf", qtype="Q4_1", hf_model=ck.hf_model, tensor_qtypes=types)


@pytest.fixture(scope="module")
def int4_target(q4_file):
    return load_target(q4_file, cpu_gemm="int4")


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_codes_reproduce_the_gguf_weights(tmp_path, qtype):
    import gguf

    rng = np.random.default_rng(0)
    w = rng.normal(size=(48, 96)).astype(np.float32)
    writer = gguf.GGUFWriter(str(tmp_path / "w.gguf"), "llama")
    qt = gguf.GGMLQuantizationType[qtype]
    writer.add_tensor("x.weight", gguf.quants.quantize(w, qt), raw_dtype=qt)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    t = gguf.GGUFReader(str(tmp_path / "w.gguf")).tensors[0]
    codes, scale, zero = q4_codes(tmp_path / "w.gguf", t)
    assert codes.dtype == np.uint8 and codes.max() <= 15 and codes.shape == (48, 96)
    rebuilt = (codes.astype(np.float32) - 8) * np.repeat(scale, 32, 1) + np.repeat(zero, 32, 1)
    ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(48, 96)
    np.testing.assert_allclose(rebuilt, ref, rtol=0, atol=1e-6)


NO_KERNEL = pytest.mark.skipif(not int4_gemm.available(), reason="no int4_gemm.c here")
KERNELS = [pytest.param("dspark", marks=NO_KERNEL), pytest.param("dspark-a8", marks=NO_KERNEL),
           pytest.param("torch", marks=pytest.mark.skipif(not _torch_int4_available(), reason="no torch int4 GEMM"))]
# the two numerics of this project's kernel, as load_target's cpu_gemm names them
GEMMS = [pytest.param("int4", marks=NO_KERNEL), pytest.param("int4-a8", marks=NO_KERNEL)]


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_matches_its_reference(kernel):
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (96, 128), dtype=torch.uint8)
    scale, zero = torch.rand(96, 4) * 0.05, torch.randn(96, 4) * 0.05
    bias = torch.randn(96)
    act8 = kernel == "dspark-a8"
    kernel = "dspark" if act8 else kernel
    lin = Int4Linear(codes, scale, zero, bias, kernel=kernel, act8=act8)
    w = lin.dequantized(codes)
    s, z = scale.repeat_interleave(32, 1), zero.repeat_interleave(32, 1)
    if kernel == "dspark":
        # The file's weights in float32: d * q + m with m = zero - 8 d (one rounding, in the add).
        want = codes.float() * s + (z - 8 * s)
        assert (w - ((codes.float() - 8) * s + z)).abs().max().item() <= 1e-7
    else:
        # (q - 8) * bf16(scale) + bf16(zero).
        want = (codes.float() - 8) * s.bfloat16().float() + z.bfloat16().float()
    assert torch.equal(w, want)
    for rows in (1, 3, 8):
        x = torch.randn(2, rows, 128)
        got, ref = lin(x), lin.reference(x, w)
        assert got.shape == (2, rows, 96)
        if act8:  # the same 8-bit activations and integer sums; float32 rounding of the group terms only
            assert (got - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
            # and it is the float model up to the activations' 8-bit rounding (~0.4% of a group's max)
            exact = x @ w.t() + bias
            assert 0 < (got - exact).abs().max().item() <= 0.02 * exact.abs().max().item()
        elif kernel == "dspark":  # float32 throughout: summation order only
            assert (got - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
        else:  # both round the product to bf16; summation order may move it by one bf16 step
            assert (got - ref).abs().max().item() <= 2 * 2 ** -8 * ref.abs().max().item()


@pytest.mark.skipif(not int4_gemm.available(), reason="no int4_gemm.c here")
@pytest.mark.parametrize("a8", [False, True], ids=["float-act", "8bit-act"])
@pytest.mark.parametrize("q8", [False, True], ids=["q4", "q8"])
@pytest.mark.parametrize("n,k", [(64, 32), (13, 96), (130, 576)])
def test_int4_gemm_rows_are_independent_of_the_call(n, k, q8, a8):
    """Every row count 1..24 (each kernel block shape, column tails) gives a row the bits it gets alone,
    on 1 and 2 threads, for Q4 and Q8_0 weights, float32 and 8-bit activations."""
    g = torch.Generator().manual_seed(n)
    if q8:
        codes = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    else:
        codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    d, m = torch.rand(n, k // 32, generator=g) * 0.05, torch.randn(n, k // 32, generator=g) * 0.05
    x = torch.randn(24, k, generator=g)
    x[3, :32] = 0  # a group of zeros (scale 0)
    if q8 and a8:
        sc4 = int4_gemm.scales4(d, None)
        mm, ref = (lambda rows: int4_gemm.mm8_a8(rows, codes, sc4)), int4_gemm.reference_a8(x, codes, d, None)
    elif q8:
        mm, ref = (lambda rows: int4_gemm.mm8(rows, codes, d)), x @ int4_gemm.weights8(codes, d).t()
    elif a8:
        packed, sc4 = int4_gemm.pack_codes(codes), int4_gemm.scales4(d, m)
        mm, ref = (lambda rows: int4_gemm.mm_a8(rows, packed, sc4, n)), int4_gemm.reference_a8(x, codes, d, m)
    else:
        packed = int4_gemm.pack_codes(codes)
        mm, ref = (lambda rows: int4_gemm.mm(rows, packed, d, m)), int4_gemm.reference(x, codes, d, m)
    alone = torch.cat([mm(x[i:i + 1]) for i in range(24)])
    assert (alone - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            for rows in range(1, 25):
                assert torch.equal(mm(x[:rows]), alone[:rows]), (t, rows)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not int4_gemm.vnni_available(), reason="this CPU has no AVX512-VNNI / AVX-VNNI")
@pytest.mark.parametrize("q8", [False, True], ids=["q4", "q8"])
@pytest.mark.parametrize("n,k", [(64, 32), (16, 96), (136, 576)])
def test_vnni_kernels_give_the_bits_of_the_avx2_ones(n, k, q8):
    """The interleaved VNNI kernels (`mm_il`) give every row, at every row count 1..20 and on 1 and 2
    threads, exactly the bits of the 8-bit-activation kernels they replace (`mm_a8`, `mm8_a8`); a layer
    built on a VNNI CPU uses them, with DSPARK_VNNI=0 it does not."""
    g = torch.Generator().manual_seed(n + k)
    d, m = torch.rand(n, k // 32, generator=g) * 0.05, torch.randn(n, k // 32, generator=g) * 0.05
    x = torch.randn(20, k, generator=g) * 3
    x[3, :32] = 0  # a group of zeros (scale 0)
    x[5, :32] = 0.001 * torch.arange(32)  # one value far above the rest: codes at the ends of the range
    if q8:
        codes = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        codes[0, :32] = -128  # the bias of 128 the kernel takes off must be exact at the extremes
        codes[1, :32] = 127
        il, want = int4_gemm.interleave8(codes, d), int4_gemm.mm8_a8(x, codes, int4_gemm.scales4(d, None))
    else:
        codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
        packed = int4_gemm.pack_codes(codes)
        il, want = int4_gemm.interleave4(packed, d, m), int4_gemm.mm_a8(x, packed, int4_gemm.scales4(d, m), n)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            for rows in range(1, 21):
                assert torch.equal(int4_gemm.mm_il(x[:rows], *il, n, q8=q8), want[:rows]), (t, rows)
    finally:
        torch.set_num_threads(threads)
    if q8:
        lin = Int8Linear(codes, d, act8=True)
        assert lin.il is not None and torch.equal(lin(x), want)
    else:
        lin = Int4Linear(codes, d, m, None, act8=True)
        assert lin.il is not None and torch.equal(lin(x), int4_gemm.mm_a8(x, lin.packed, lin.sc4, n))


def test_vnni_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("DSPARK_VNNI", "0")
    assert not int4_gemm.vnni_available()
    g = torch.Generator().manual_seed(0)
    assert Int8Linear(torch.randint(-128, 128, (16, 32), generator=g, dtype=torch.int8), torch.ones(16, 1),
                      act8=True).il is None


@pytest.mark.skipif(not int4_gemm.available(), reason="no int4_gemm.c here")
@pytest.mark.parametrize("act8", [False, True], ids=["float-act", "8bit-act"])
def test_int8_head_is_the_q8_weights_and_its_rows_the_same_outputs(act8):
    """The Q8_0 LM head: exactly d * q as weights, float32 products (or 8-bit activations); a drafter's
    reduced vocabulary (`rows`) gets those rows' outputs bit for bit."""
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(-128, 128, (70, 96), generator=g, dtype=torch.int8)
    d = torch.rand(70, 3, generator=g) * 0.01
    head = Int8Linear(codes, d, act8=act8)
    w = head.dequantized()
    assert torch.equal(w, codes.float() * d.repeat_interleave(32, 1))
    x = torch.randn(2, 5, 96, generator=g)
    y = head(x)
    assert y.shape == (2, 5, 70)
    want = int4_gemm.reference_a8(x.view(-1, 96), codes, d, None).view(2, 5, 70) if act8 else x @ w.t()
    assert (y - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    ids = torch.tensor([3, 0, 69, 17, 18])
    assert torch.equal(head.rows(ids)(x), y[..., ids])


def test_int4_gemm_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("DSPARK_INT4_GEMM", "0")
    assert not int4_gemm.available() and int4_gemm.unavailable_reason() == "DSPARK_INT4_GEMM=0"
    if _torch_int4_available():
        assert Int4Linear(torch.zeros(16, 32, dtype=torch.uint8), torch.ones(16, 1), torch.zeros(16, 1), None).kernel == "torch"


def test_loaded_q4_model_runs_int4_with_its_own_weights(int4_target, q4_file):
    assert int4_target.cpu_gemm.startswith("int4")
    t = int4_target.transformer
    packs = [(l.mlp.down_weight, l.mlp.packed["down"]) for l in t.layers] + \
        [(l.attn.qkv_weight, l.attn.packed["qkv"]) for l in t.layers]
    for weight, packed in packs:
        assert isinstance(packed, Int4Linear)
        x = torch.randn(1, 3, weight.shape[1])
        ref = packed.reference(x, weight.data)
        tol = 1e-5 if packed.kernel == "dspark" else 2 * 2 ** -8
        assert (packed(x) - ref).abs().max().item() <= tol * ref.abs().max().item() + 1e-6
    # Same checkpoint, exactly dequantized in float32: the same model up to summation order with this
    # project's kernel; close with torch's (bf16 rounding of activations, scales, outputs).
    exact = load_target(q4_file, dtype="float32", cpu_gemm="fp16")
    assert exact.cpu_gemm in ("fp32", "fp16-weights")
    ids = [5, 17, 33, 40, 99, 120, 7]

    def logits(target):
        cache = target.new_cache(1, 32)
        return target.forward(cache, [cache.allocate()], [ids]).logits[0]

    a, b = logits(int4_target), logits(exact)
    if int4_target.transformer.layers[0].mlp.packed["down"].kernel == "dspark":
        # With the other tensors in float32 too (the default stores them as float16), only summation
        # order differs.
        # (and the KV cache in float32: "auto" keeps a 4-bit GGUF's in float16)
        a32 = logits(load_target(q4_file, dtype="float32", cpu_gemm="int4", kv_cache_dtype="float32"))
        assert (a32 - b).abs().max().item() < 1e-4 * b.std().item()
        assert torch.equal(a32.argmax(-1), b.argmax(-1))
    assert (a - b).abs().max().item() < 0.15 * b.std().item()  # torch's kernel, measured: 0.06 std
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.85


def _dspark(target, max_seqs: int) -> DSparkDrafter:
    cfg = DSparkConfig.for_target(target.config, 3, block_size=8, num_hidden_layers=1, markov_rank=16)
    return DSparkDrafter(DSparkModel.from_target(cfg, target, seed=0), max_seqs, target.context_length)


@pytest.fixture(scope="module", params=GEMMS)
def gemm(request):
    return request.param


@pytest.fixture(scope="module")
def int4_plain_greedy(q4_file, gemm):
    plain = LLM(model=q4_file, max_num_seqs=4, cpu_gemm=gemm)
    assert plain.target.cpu_gemm.split("+")[0] == gemm
    outs = plain.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    return [o.token_ids for o in outs]


@pytest.mark.parametrize("kind", ["ngram", "dspark"])
@pytest.mark.parametrize("gamma,batch", [(1, 1), (4, 4), (7, 1), (7, 4)])
def test_greedy_identity_on_int4(q4_file, gemm, int4_plain_greedy, kind, gamma, batch):
    llm = LLM(model=q4_file, max_num_seqs=batch, num_speculative_tokens=gamma,
              drafter="ngram" if kind == "ngram" else None, cpu_gemm=gemm)
    if kind == "dspark":
        llm = LLM(model=q4_file, max_num_seqs=batch, num_speculative_tokens=gamma,
                  drafter=_dspark(llm.target, batch), cpu_gemm=gemm)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert [o.token_ids for o in outs] == int4_plain_greedy


def test_loaded_drafter_follows_the_int4_target_onto_a_packed_gemm(q4_file, gemm, int4_plain_greedy, tmp_path):
    """A drafter loaded for the int4 target runs its projections on the packed fp16-weight GEMM (as it
    does for an fp16-weight target) and greedy output still equals plain decoding."""
    target = LLM(model=q4_file, max_num_seqs=4, cpu_gemm=gemm).target
    drafter_dir = _dspark(target, 4).save_pretrained(tmp_path / "drafter")
    llm = LLM(model=q4_file, max_num_seqs=4, num_speculative_tokens=4, drafter=str(drafter_dir), cpu_gemm=gemm)
    assert llm.target.cpu_gemm.startswith("int4") and "forward" in vars(llm.drafter.model.fc)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert [o.token_ids for o in outs] == int4_plain_greedy


class _OwnLogits:
    """The int4 target as an exact-distribution reference (its plain forward), shaped like a HF model."""

    def __init__(self, target) -> None:
        self.target = target

    def __call__(self, ids: torch.Tensor) -> SimpleNamespace:
        cache = self.target.new_cache(ids.shape[0], ids.shape[1] + 1)
        slots = [cache.allocate() for _ in range(ids.shape[0])]
        return SimpleNamespace(logits=self.target.forward(cache, slots, ids).logits)


@pytest.mark.parametrize("gemm", GEMMS)
def test_sampled_output_follows_the_int4_target(q4_file, gemm):
    llm = LLM(model=q4_file, max_num_seqs=64, num_speculative_tokens=3, cpu_gemm=gemm)
    llm = LLM(model=q4_file, max_num_seqs=64, num_speculative_tokens=3, drafter=_dspark(llm.target, 64),
              cpu_gemm=gemm)
    assert llm.target.cpu_gemm.split("+")[0] == gemm
    # An untrained drafter's top-4 meets the target's top-4 only after some prompts (which ones depends
    # on the numerics): the first prompt whose run accepts drafts is tested, so both the acceptance and
    # the residual branch of verification run.
    for text in ("the quick brown", "the"):
        p, accepted = sampled_pairs_pvalue(llm, _OwnLogits(llm.target), n=800, text=text)
        if accepted:
            break
    assert accepted > 0 and p > 1e-3, p


def test_cpu_gemm_modes(q4_file):
    # int4 (on 8-bit activations) is the default exactly when the attention is batch-invariant.
    default = load_target(q4_file)
    assert default.cpu_gemm == ("int4-a8+fp16-weights" if row_attention.available() else "fp16-weights")
    assert default.attention == ("rows" if row_attention.available() else "sdpa")
    sdpa = load_target(q4_file, attention="sdpa")
    assert (sdpa.cpu_gemm, sdpa.attention) == ("fp16-weights", "sdpa")
    assert load_target(q4_file, cpu_gemm="int4", attention="sdpa").cpu_gemm == "int4+fp16-weights"
    assert load_target(q4_file, cpu_gemm="int4-a8").cpu_gemm == "int4-a8+fp16-weights"
    assert load_target(q4_file, cpu_gemm="fp16").cpu_gemm in ("fp16-weights", "fp32")
    assert load_target(q4_file, cpu_gemm="off").cpu_gemm == "fp32"
    with pytest.raises(ValueError, match="cpu_gemm must be one of auto, fp16, int4, int4-a8, off"):
        load_target(q4_file, cpu_gemm="int8")
    with pytest.raises(ValueError, match="attention must be one of auto, sdpa"):
        load_target(q4_file, attention="flash")


@pytest.mark.parametrize("gemm", ["int4", "int4-a8", "fp16"])
def test_verification_equals_decoding_bit_for_bit(int4_target, q4_file, gemm):
    """With the batch-invariant attention (the default), a token's logits do not depend on its call:
    verified together with others or decoded one by one, the same bits. int4: its bf16 rounding would
    magnify any difference; int4-a8: each row's activations are quantized on their own; fp16: fbgemm's
    kernels differ by row count on some CPUs (RowPlan pads)."""
    target = int4_target if gemm == "int4" else load_target(q4_file, cpu_gemm=gemm)
    if target.attention != "rows":
        pytest.skip(f"no row attention here: {row_attention.unavailable_reason()}")
    prompt, new = [5, 17, 33, 40, 99, 120, 7, 8, 9], [11, 12, 13, 14, 15, 16, 17]
    cache = target.new_cache(2, 64)
    a, b = cache.allocate(), cache.allocate()
    with torch.inference_mode():
        target.forward(cache, [a, b], [prompt, prompt[:4]], all_logits=False)
        verified = target.forward(cache, [a, b], [new, new[:2]]).logits[0]
        cache.truncate(a, len(prompt))
        decoded = torch.cat([target.forward(cache, [a], [[x]]).logits[0] for x in new])
    assert torch.equal(verified, decoded)


@pytest.mark.parametrize("gemm", GEMMS)
def test_fused_layers_match_the_per_op_path(q4_file, monkeypatch, gemm):
    """The fused C layer parts (norm, QKV, RoPE / output projection, norm, gate-up, SiLU, down, residuals)
    compute the per-op layer: logits and hidden-state taps agree to float rounding, prompt and decode
    steps, and a kept tap is not overwritten by the next layer (a float32 KV cache: rounding keys to
    float16 would turn the paths' last-bit differences into float16 ones)."""
    target = load_target(q4_file, cpu_gemm=gemm, kv_cache_dtype="float32")
    t = target.transformer
    if not int4_gemm.available():
        pytest.skip(f"no int4 kernel here: {int4_gemm.unavailable_reason()}")
    assert all(layer.fused for layer in t.layers)
    prompt, steps = [5, 17, 33, 40, 99, 120, 7, 8, 9], [11, 12, 13]
    taps = [-1, 0, 1]

    def run(fused: bool):
        t.update_fused_layers(fused)
        cache = target.new_cache(2, 64)
        a, b = cache.allocate(), cache.allocate()
        outs = []
        with torch.inference_mode():
            out = target.forward(cache, [a, b], [prompt, prompt[:4]], hidden_layer_ids=taps)
            outs.append((out.logits, out.hidden))
            for x in steps:
                out = target.forward(cache, [a, b], [[x], [x + 1]], hidden_layer_ids=taps)
                outs.append((out.logits, out.hidden))
        return outs

    try:
        fused, per_op = run(True), run(False)
    finally:
        t.update_fused_layers(True)
    for (lf, hf), (lp, hp) in zip(fused, per_op):
        assert (lf - lp).abs().max().item() <= 1e-5 * lp.abs().max().item()
        assert (hf - hp).abs().max().item() <= 1e-5 * hp.abs().max().item()
        assert not torch.equal(hf[:, :, 1], hf[:, :, 2])  # each tap is its own layer's output
    monkeypatch.setenv("DSPARK_FUSED_LAYERS", "0")
    assert not any(layer.fused for layer in load_target(q4_file, cpu_gemm="int4").transformer.layers)
    torch_kernel = load_target(q4_file, cpu_gemm="int4")
    for layer in torch_kernel.transformer.layers:  # a layer not on this project's kernel is never fused
        layer.attn.packed["qkv"].kernel = "torch"
    assert torch_kernel.transformer.update_fused_layers(True) == 0


def _count_rows(monkeypatch, name: str) -> list[int]:
    """Wrap `int4_gemm.<name>` so each call appends its row count to the returned list."""
    used: list[int] = []
    real = getattr(int4_gemm, name)
    monkeypatch.setattr(int4_gemm, name, lambda *a: (used.append(a[0].shape[0]), real(*a))[1])
    return used


def _two_sequence_forwards(target, calls):
    """Prefill two sequences, then run each (token lists, taps) of `calls` as one forward over both.
    Returns ([(logits, taps)], the K cache, the V cache)."""
    cache = target.new_cache(2, 64)
    a, b = cache.allocate(), cache.allocate()
    outs = []
    with torch.inference_mode():
        target.forward(cache, [a, b], [[5, 17, 33, 40, 99], [120, 7, 8]])
        for ids, taps in calls:
            out = target.forward(cache, [a, b], ids, hidden_layer_ids=taps)
            outs.append((out.logits, out.hidden))
    return outs, cache.k.clone(), cache.v.clone()


@pytest.mark.parametrize("kv", ["float32", "float16"])
@pytest.mark.parametrize("gemm", GEMMS)
def test_whole_layer_call_gives_the_bits_of_the_three_part_path(q4_file, monkeypatch, gemm, kv):
    """The whole layer in one C call (parts, cache write and row attention) where every row of a call is
    on the row kernel: logits, taps and the KV cache bit-identical to the layer parts with the cache
    write and attention in Python, on decode steps of 2 sequences, a verification-sized call of 4 tokens
    and a ragged call (padding: the parts path); DSPARK_WHOLE_LAYER=0 turns the one call off."""
    if not int4_gemm.available():
        pytest.skip(f"no int4 kernel here: {int4_gemm.unavailable_reason()}")
    monkeypatch.setenv("DSPARK_ONE_CALL", "0")  # layer by layer here (the one call: the next test)
    target = load_target(q4_file, cpu_gemm=gemm, kv_cache_dtype=kv)
    assert target.kv_cache_dtype == getattr(torch, kv)  # float16: the C kernel rounds as torch's copy does
    t = target.transformer
    assert all(layer.whole is not None for layer in t.layers) and t.layer_table is None
    calls = [(ids, [0, 1]) for ids in ([[11], [12]], [[13, 14, 15, 16], [17, 18, 19, 20]], [[21, 22], [23]],
                                       [[24], [25]])]
    used = _count_rows(monkeypatch, "layer")

    whole = _two_sequence_forwards(target, calls)
    assert used and set(used) == {2, 8}  # the 1-token steps and the 4-token call; not the ragged one
    from dspark.schedule import step_cost_key
    assert step_cost_key(target)["whole_layers"] == 2  # same bits, not the same speed: its own step costs
    monkeypatch.setenv("DSPARK_WHOLE_LAYER", "0")
    t.update_fused_layers(True)
    try:
        assert all(layer.fused and layer.whole is None for layer in t.layers)
        assert "whole_layers" not in step_cost_key(target)
        used.clear()
        parts = _two_sequence_forwards(target, calls)
        assert not used
    finally:
        monkeypatch.delenv("DSPARK_WHOLE_LAYER")
        t.update_fused_layers(True)
    for (lw, hw), (lp, hp) in zip(whole[0], parts[0]):
        assert torch.equal(lw, lp) and torch.equal(hw, hp)
    assert torch.equal(whole[1], parts[1]) and torch.equal(whole[2], parts[2])


@pytest.mark.parametrize("kv", ["float32", "float16"])
@pytest.mark.parametrize("gemm", GEMMS)
def test_all_layers_in_one_call_give_the_bits_of_layer_by_layer(q4_file, monkeypatch, gemm, kv):
    """Every layer of a step in one C call (`int4_gemm.layers`, the taps copied out as it goes): logits,
    taps (in the order asked) and the KV cache bit-identical to one whole-layer call per layer, on
    decode steps and a verification-sized call; a ragged call or an embedding tap (-1) goes layer by
    layer; DSPARK_ONE_CALL=0 turns it off."""
    if not int4_gemm.available():
        pytest.skip(f"no int4 kernel here: {int4_gemm.unavailable_reason()}")
    target = load_target(q4_file, cpu_gemm=gemm, kv_cache_dtype=kv)
    t = target.transformer
    assert t.layer_table is not None and target.kv_cache_dtype == getattr(torch, kv)
    calls = [([[11], [12]], [0, 1]), ([[13, 14, 15, 16], [17, 18, 19, 20]], [1, 0]), ([[21, 22], [23]], [0]),
             ([[24], [25]], [-1, 1]), ([[26], [27]], [])]
    used = _count_rows(monkeypatch, "layers")

    one = _two_sequence_forwards(target, calls)
    assert used == [2, 8, 2]  # decode steps and the 4-token call; not the ragged call nor the -1 tap
    from dspark.schedule import step_cost_key
    assert step_cost_key(target).get("one_call") is True
    monkeypatch.setenv("DSPARK_ONE_CALL", "0")
    t.update_fused_layers(True)
    try:
        assert t.layer_table is None and "one_call" not in step_cost_key(target)
        used.clear()
        by_layer = _two_sequence_forwards(target, calls)
        assert not used
    finally:
        monkeypatch.delenv("DSPARK_ONE_CALL")
        t.update_fused_layers(True)
    for (lo, ho), (ll, hl) in zip(one[0], by_layer[0]):
        assert torch.equal(lo, ll)
        assert (ho is None and hl is None) or torch.equal(ho, hl)
    assert not torch.equal(one[0][1][1][:, :, 0], one[0][1][1][:, :, 1])  # taps in the order asked
    assert torch.equal(one[1], by_layer[1]) and torch.equal(one[2], by_layer[2])


def test_fused_silu_and_norm_are_accurate():
    """The fused parts' own SiLU (a polynomial exp) and RMSNorm against torch's, over a wide range."""
    if not int4_gemm.available():
        pytest.skip(f"no int4 kernel here: {int4_gemm.unavailable_reason()}")
    g = torch.Generator().manual_seed(3)
    k, inter, rows = 64, 96, 5
    x = torch.randn(rows, k, generator=g) * 3
    codes = torch.randint(0, 16, (2 * inter, k), generator=g)
    gu = Int4Linear(codes, torch.rand(2 * inter, k // 32, generator=g) * 0.5,
                    torch.randn(2 * inter, k // 32, generator=g), None)
    o = Int4Linear(torch.randint(0, 16, (k, k), generator=g), torch.rand(k, 2, generator=g) * 0.1,
                   torch.randn(k, 2, generator=g) * 0.1, None)
    dn = Int4Linear(torch.randint(0, 16, (k, inter), generator=g), torch.rand(k, 3, generator=g) * 0.1,
                    torch.randn(k, 3, generator=g) * 0.1, None)
    attn = torch.randn(rows, k, generator=g)
    norm_w = torch.rand(k, generator=g) + 0.5
    y = x.clone()
    int4_gemm.layer_out(y, attn, o, norm_w, 1e-5, gu, dn)
    x1 = x + o(attn)
    h = x1 * torch.rsqrt(x1.pow(2).mean(-1, keepdim=True) + 1e-5) * norm_w
    gate, up = gu(h).split(inter, dim=-1)
    assert gate.abs().max() > 20  # the exp is exercised far from zero
    ref = x1 + dn(torch.nn.functional.silu(gate) * up)
    assert (y - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_kv_cache_dtype_auto_is_float16_on_the_int4_gemm(q4_file):
    """"auto" keeps a 4-bit GGUF's cache in float16 where it runs on the int4 GEMM and the row kernel (as
    llama.cpp does), in the model's dtype elsewhere; the choice is part of the target's identity (cached
    plain-decoding results and step costs are not shared across it); a bad value names the choices."""
    if not int4_gemm.available():
        pytest.skip(f"no int4 kernel here: {int4_gemm.unavailable_reason()}")
    from dspark.eval.acceptance import target_identity

    auto = load_target(q4_file)
    assert auto.cpu_gemm.startswith("int4") and auto.kv_cache_dtype == torch.float16
    cache = auto.new_cache(2, 32)
    assert cache.k.dtype == cache.v.dtype == torch.float16
    assert load_target(q4_file, cpu_gemm="fp16").kv_cache_dtype == torch.float32
    forced = load_target(q4_file, kv_cache_dtype="float32")
    assert forced.kv_cache_dtype == torch.float32
    assert target_identity(auto)["kv_cache_dtype"] == "torch.float16" and "kv_cache_dtype" not in target_identity(forced)
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, float32, float16, got 'fp8'"):
        load_target(q4_file, kv_cache_dtype="fp8")
