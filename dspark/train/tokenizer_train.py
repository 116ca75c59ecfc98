"""Train a byte-level BPE tokenizer with the `tokenizers` library and write it in Hugging Face form.

Special tokens: end of text (also padding's fallback), padding, chat turns (ChatML style) and a
mask token reserved for parallel drafters (DFlash/DSpark feed it at the positions they predict).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dspark.train.corpus import CorpusError, iter_texts

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
MASK_TOKEN = "<|mask|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN, IM_START, IM_END, MASK_TOKEN]

# The chat-turn tokens are reserved so a later chat fine-tune needs no new embeddings; no chat
# template is written, because a model pretrained on code alone has never seen a chat turn and
# chat-style prompt sets are then given to it as plain text.

# 256 byte symbols plus the special tokens is the least a byte-level BPE can hold.
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def train_tokenizer(files: list[Path], vocab_size: int = 8192, min_frequency: int = 2) -> Tokenizer:
    if vocab_size < MIN_VOCAB:
        raise CorpusError(
            f"vocab_size {vocab_size} is too small: a byte-level BPE needs 256 byte tokens plus "
            f"{len(SPECIAL_TOKENS)} special tokens ({', '.join(SPECIAL_TOKENS)}), at least {MIN_VOCAB}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter_texts(files), trainer=trainer, length=len(files))
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: Path, model_max_length: int) -> dict:
    """Write tokenizer.json and tokenizer_config.json; return the special-token ids."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    added = {
        str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True}
        for t in SPECIAL_TOKENS
    }
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "mask_token": MASK_TOKEN,
        "additional_special_tokens": [IM_START, IM_END],
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return ids
