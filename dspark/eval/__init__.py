"""Evaluation: accepted length and conditional acceptance (`dspark eval`), wall-clock speed against
plain decoding and Hugging Face transformers (`dspark bench`), and their plots.

    python -m dspark.eval.acceptance --drafters dspark,ngram --data-dir ../shared/benchmarks --sets humaneval
    python -m dspark.eval.speed --drafters dspark,ngram --num-prompts 4 --max-tokens 128

Submodules are imported on use, so `import dspark.eval` stays cheap for the CLI's --help.
"""
