"""Typed, validated configuration shared by the engine, the CLI and the server (no torch import, so
the CLI's --help stays fast).

    from dspark.config import EngineConfig, VerifyPolicy
    cfg = EngineConfig(max_num_seqs=8, max_num_batched_tokens=512, policy="threshold:0.3")
    VerifyPolicy.parse("fixed:3")            # VerifyPolicy(kind='fixed', value=3.0)
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from dspark.errors import DSparkError


class ScheduleError(DSparkError, ValueError):
    """A verification policy cannot run as configured (bad name or value, drafter without confidence,
    bad step-cost table)."""


# Policy kinds: name -> (what its argument is, or None when it takes none; one line of help).
POLICY_KINDS: dict[str, tuple[str | None, str]] = {
    "static": (None, "verify every draft (each request's γ)"),
    "plain": (None, "no speculation: the drafter is not run, every step decodes one token"),
    "fixed": ("K", "verify the first K drafts (K in 1..γ; fixed:1 is the MTP-1 analogue)"),
    "threshold": ("P", "verify draft j while its calibrated survival Π_{i≤j} c_i stays above P (P in [0, 1))"),
    "confidence": (None, "the paper's Algorithm 1 on calibrated confidences and the profiled step costs"),
}
POLICY_HELP = ("verification policy, one per engine step: " +
               "; ".join(f"{k}{':' + a if a else ''} = {h}" for k, (a, h) in POLICY_KINDS.items()))


@dataclass(frozen=True)
class VerifyPolicy:
    """How many drafts each request sends to the target per round (see `POLICY_KINDS`).

    Whatever the policy, whether draft j is verified never depends on draft j itself (or later
    drafts): confidences c_j are computed from drafts < j, which is what keeps decoding lossless."""

    kind: str = "static"
    value: float | None = None  # K of fixed:K, P of threshold:P

    def __post_init__(self) -> None:
        if self.kind not in POLICY_KINDS:
            raise ScheduleError(f"unknown verification policy {self.kind!r}; choose one of "
                                f"{', '.join(k + (':' + a if a else '') for k, (a, _) in POLICY_KINDS.items())}")
        arg = POLICY_KINDS[self.kind][0]
        if arg is None and self.value is not None:
            raise ScheduleError(f"policy {self.kind!r} takes no value, got {self.kind}:{self.value:g}")
        if arg is not None and self.value is None:
            raise ScheduleError(f"policy {self.kind!r} needs a value: {self.kind}:{arg}")
        if self.kind == "fixed" and (self.value != int(self.value) or self.value < 1):
            raise ScheduleError(f"policy fixed:K needs an integer K >= 1, got fixed:{self.value:g}")
        if self.kind == "threshold" and not 0.0 <= self.value < 1.0:
            raise ScheduleError(f"policy threshold:P needs P in [0, 1), got threshold:{self.value:g}")

    @classmethod
    def parse(cls, text: "str | VerifyPolicy") -> "VerifyPolicy":
        """'static', 'plain', 'fixed:3', 'threshold:0.4', 'confidence' -> a VerifyPolicy."""
        if isinstance(text, VerifyPolicy):
            return text
        if not isinstance(text, str):
            raise ScheduleError(f"a verification policy is a string such as 'fixed:3', got {type(text).__name__}")
        kind, sep, raw = text.strip().partition(":")
        value = None
        if sep:
            try:
                value = float(raw)
            except ValueError:
                raise ScheduleError(f"policy {text!r}: {raw!r} is not a number") from None
        return cls(kind.strip(), value)

    @property
    def speculative(self) -> bool:
        return self.kind != "plain"

    @property
    def needs_confidence(self) -> bool:
        return self.kind in ("threshold", "confidence")

    def __str__(self) -> str:
        if self.value is None:
            return self.kind
        return f"{self.kind}:{int(self.value) if self.kind == 'fixed' else f'{self.value:g}'}"


def parse_policies(text: str) -> list[VerifyPolicy]:
    """A comma-separated list of policies (`--policies plain,fixed:1,confidence`), each at most once."""
    out = [VerifyPolicy.parse(x) for x in text.split(",") if x.strip()]
    if not out:
        raise ScheduleError("--policies is empty")
    names = [str(p) for p in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ScheduleError(f"--policies lists {', '.join(dup)} twice")
    return out


@dataclass(frozen=True)
class EngineConfig:
    """Everything that shapes an engine, validated once.

    ``max_num_seqs``: requests decoded together (cache slots). ``max_model_len``: tokens per sequence
    (default: the model's context). ``max_num_batched_tokens``: the token budget of one step, prefill
    chunks included (default: 512, or enough for every slot's largest speculative round).
    ``num_speculative_tokens``: default γ (default: the drafter's block). ``policy``: a `VerifyPolicy`
    or its text ("static", "plain", "fixed:K", "threshold:P", "confidence"). ``reprofile``: measure the
    step-cost table again instead of reading it from the cache (policy "confidence").
    """

    max_num_seqs: int = 8
    max_model_len: int | None = None
    max_num_batched_tokens: int | None = None
    num_speculative_tokens: int | None = None
    policy: VerifyPolicy | str = "static"
    reprofile: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "policy", VerifyPolicy.parse(self.policy))
        if not isinstance(self.max_num_seqs, int) or self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be an int >= 1, got {self.max_num_seqs!r}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")


# ---- runtime kernels (what load_target's cpu_gemm and attention take) ----------------------------

# "fp16": projections on the packed fp16-weight GEMM when their weights are fp16-exact, else F.linear;
# "int4": also the 4-bit codes of a GGUF's Q4_0/Q4_1 matrices (and a Q8_0 LM head) on the int4/int8 GEMM,
# float32 activations; "int4-a8": the same weights times activations quantized to 8 bits per group of 32
# (llama.cpp's numerics, integer dot products); "auto": int4-a8 when the attention is the batch-invariant
# row kernel (then int4 outputs do not depend on batching, see dspark.models.transformer), else fp16;
# "off": F.linear everywhere.
CPU_GEMM_MODES = ("auto", "fp16", "int4", "int4-a8", "off")
# "auto": the batch-invariant row kernel (dspark.models.row_attention) on float32 CPU models when it
# builds; "sdpa": torch's scaled_dot_product_attention.
ATTENTION_MODES = ("auto", "sdpa")
# The KV cache's dtype: "auto" = float16 when the model runs on the int4 GEMM with the row attention kernel
# (a 4-bit GGUF on CPU: what llama.cpp keeps its cache in by default; half the bytes a step's attention
# reads), else the model's dtype; "float32" / "float16": that dtype.
KV_CACHE_DTYPES = ("auto", "float32", "float16")
CPU_GEMM_HELP = ("CPU projections: auto = a 4-bit GGUF's codes on the int4 GEMM with 8-bit activations (int4-a8) "
                 "when the attention is batch-invariant, other fp16-exact weights on the packed fp16 GEMM; fp16 = "
                 "never int4; int4 = the 4-bit codes with float32 activations; int4-a8 = with 8-bit activations "
                 "(llama.cpp's numerics); either even with SDPA (outputs then depend on batching); off = plain "
                 "float GEMMs (default: auto)")
ATTENTION_HELP = ("attention kernel: auto = the batch-invariant row kernel on CPU (built with the C compiler at "
                  "first use; a token's outputs do not depend on its batch); sdpa = torch's SDPA (default: auto)")

KV_CACHE_DTYPE_HELP = ("the KV cache's dtype: auto = float16 for a 4-bit GGUF on the int4 GEMM with the row kernel "
                       "(as llama.cpp keeps it; half the bytes attention reads), else the model's dtype "
                       "(default: auto)")


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """--cpu-gemm, --attention and --kv-cache-dtype, as every command that loads a target takes them."""
    p.add_argument("--cpu-gemm", default="auto", choices=list(CPU_GEMM_MODES), help=CPU_GEMM_HELP)
    p.add_argument("--attention", default="auto", choices=list(ATTENTION_MODES), help=ATTENTION_HELP)
    p.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES), help=KV_CACHE_DTYPE_HELP)
