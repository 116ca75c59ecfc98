"""DSpark: lossless speculative decoding with semi-autoregressive drafters.

    from dspark import LLM, SamplingParams
    llm = LLM()  # the bundled demo target
    print(llm.generate("def add(a, b):", SamplingParams(temperature=0, max_tokens=32))[0].text)
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import dspark` (e.g. for the CLI's --help) does not pay for importing torch.
    if name in ("LLM", "RequestOutput"):
        from dspark import engine
        return getattr(engine, name)
    if name == "SamplingParams":
        from dspark.sampling import SamplingParams
        return SamplingParams
    raise AttributeError(f"module 'dspark' has no attribute {name!r}")
