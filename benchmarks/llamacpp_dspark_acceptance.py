"""Acceptance of the SmolLM2 DSpark drafter in llama.cpp's DSpark draft mode against ours, and
llama.cpp's speculative output against its own plain output (greedy, 4 chat prompts, 64 tokens).

    dspark export --drafter models/smollm2-dspark --format gguf --out /tmp/smollm2-dspark.gguf --target $SMOLLM2
    python benchmarks/llamacpp_dspark_acceptance.py /tmp/smollm2-dspark.gguf      # needs xllamacpp
"""

import json, sys
import xllamacpp as x
from dspark import LLM, SamplingParams
from dspark.bundled import smollm2_path

gguf = str(smollm2_path())
qs = [
    "Write a Python function that checks whether a number is even.",
    "What is 12 times 7? Explain briefly.",
    "Name three colours of the rainbow.",
    "How do I open a file in Python?",
]
llm = LLM(model=gguf, drafter="dspark", max_num_seqs=1, num_threads=1)
prompts = [llm.render_chat([{"role": "user", "content": q}]) for q in qs]
ours = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=64))
acc = sum(o.metrics.accepted_drafts for o in ours)
rounds = sum(o.metrics.rounds for o in ours)
print(
    "ours: accepted drafts per round",
    round(acc / rounds, 3),
    "tau",
    round((acc + rounds) / rounds, 3),
)


def server(draft):
    p = x.CommonParams()
    p.model.path = gguf
    p.n_ctx = 1024
    p.n_parallel = 1
    p.cpuparams.n_threads = p.cpuparams_batch.n_threads = 1
    if draft:
        p.speculative.types = [
            x.common_speculative_type.COMMON_SPECULATIVE_TYPE_DRAFT_DSPARK
        ]
        p.speculative.draft.mparams.path = draft
        p.speculative.draft.n_max = 7
        p.speculative.draft.p_min = 0.0
    return x.Server(p)


texts = {}
for name, d in (("plain", None), ("dspark", sys.argv[1])):
    s = server(d)
    tot = {"draft_n": 0, "draft_n_accepted": 0, "predicted_n": 0}
    out = []
    for pr in prompts:
        r = s.handle_completions(
            {"prompt": pr, "n_predict": 64, "temperature": 0, "cache_prompt": False}
        )
        r = json.loads(r) if isinstance(r, str) else r
        out.append(
            r.get("content")
            if r.get("content") is not None
            else r["choices"][0]["text"]
        )
        for k in tot:
            tot[k] += r.get("timings", {}).get(k, 0)
    texts[name] = out
    rounds = tot["draft_n"] / 7  # about: a round drafts up to n_max = 7 tokens
    print(
        f"llama.cpp {name}: {tot}"
        + (
            f", accepted drafts per round {tot['draft_n_accepted'] / rounds:.3f}"
            if rounds
            else ""
        )
    )
    del s
print("llama.cpp dspark output == its plain output:", texts["plain"] == texts["dspark"])
