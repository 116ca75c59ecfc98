"""Tokenizer wrapper over `tokenizers.Tokenizer`, read from a Hugging Face model directory.

Reads `tokenizer.json`, `tokenizer_config.json` (special tokens, `added_tokens_decoder`,
`chat_template`), an optional `chat_template.jinja`, and the eos ids of `generation_config.json`.

Usage:
    tok = Tokenizer.from_dir("/models/Qwen3-8B")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    ids = tok.encode(prompt)
    detok = IncrementalDetokenizer(tok)
    for new_ids in stream: print(detok.push(new_ids), end="")
    print(detok.flush())
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import tokenizers

from dspark.errors import CheckpointError, TokenizerError


def read_json(path: Path, required: bool = True) -> dict[str, Any] | None:
    """Load a JSON object, turning a missing or malformed file into a `CheckpointError` naming it."""
    if not path.is_file():
        if required:
            raise CheckpointError(f"missing file {path.name} in {path.parent}")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"malformed JSON in {path}: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"malformed JSON in {path}: expected an object, got {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    # tokenizer_config stores special tokens either as a string or as a serialised AddedToken dict.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


class Tokenizer:
    """Text <-> token ids, special-token ids, and chat templating."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        config: Mapping[str, Any] | None = None,
        generation_config: Mapping[str, Any] | None = None,
        chat_template: str | None = None,
        source: str = "tokenizer_config.json",
    ) -> None:
        self.backend = backend
        self.config = dict(config or {})
        self.source = source
        self._register_added_tokens()
        self.bos_token = _token_content(self.config.get("bos_token"))
        self.eos_token = _token_content(self.config.get("eos_token"))
        self.pad_token = _token_content(self.config.get("pad_token"))
        self.unk_token = _token_content(self.config.get("unk_token"))
        self.mask_token = _token_content(self.config.get("mask_token"))
        self.bos_token_id = self._id_of(self.bos_token, "bos_token")
        self.pad_token_id = self._id_of(self.pad_token, "pad_token")
        self.unk_token_id = self._id_of(self.unk_token, "unk_token")
        self.mask_token_id = self._id_of(self.mask_token, "mask_token")
        eos = [] if self.eos_token is None else [self._id_of(self.eos_token, "eos_token")]
        gen_eos = _as_id_list((generation_config or {}).get("eos_token_id"))
        # Union, tokenizer's first: chat models often stop on an end-of-turn token that only
        # generation_config.json lists.
        self.eos_token_ids: list[int] = list(dict.fromkeys([i for i in eos if i is not None] + gen_eos))
        self.chat_template = chat_template if chat_template is not None else self._template_from_config()

    @classmethod
    def from_dir(cls, path: str | Path, generation_config: Mapping[str, Any] | None = None) -> "Tokenizer":
        """Load from a model directory; `generation_config` defaults to its generation_config.json."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise CheckpointError(f"missing file tokenizer.json in {path}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise CheckpointError(f"malformed tokenizer file {tok_file}: {e}") from None
        config = read_json(path / "tokenizer_config.json", required=False) or {}
        if generation_config is None:
            generation_config = read_json(path / "generation_config.json", required=False) or {}
        template_file = path / "chat_template.jinja"
        template = template_file.read_text(encoding="utf-8") if template_file.is_file() else None
        return cls(backend, config, generation_config, template, source=str(path / "tokenizer_config.json"))

    # ---- special tokens ---------------------------------------------------------------------------

    def _register_added_tokens(self) -> None:
        """Make sure every `added_tokens_decoder` entry exists with the id the config gives it."""
        decoder = self.config.get("added_tokens_decoder") or {}
        missing: list[tuple[int, str, bool]] = []
        for id_str, spec in sorted(decoder.items(), key=lambda kv: int(kv[0])):
            content = _token_content(spec)
            if content is None:
                continue
            found = self.backend.token_to_id(content)
            if found is None:
                missing.append((int(id_str), content, bool(spec.get("special", False))))
            elif found != int(id_str):
                raise CheckpointError(
                    f"{self.source}: added_tokens_decoder[{id_str}] is {content!r}, "
                    f"but tokenizer.json gives it id {found}"
                )
        # Added tokens take the next free id, so adding them in id order reproduces the config's ids.
        for wanted, content, special in missing:
            token = tokenizers.AddedToken(content, special=special, normalized=False)
            if special:
                self.backend.add_special_tokens([token])
            else:
                self.backend.add_tokens([token])
            got = self.backend.token_to_id(content)
            if got != wanted:
                raise CheckpointError(
                    f"{self.source}: added_tokens_decoder[{wanted}] = {content!r} is not in tokenizer.json "
                    f"and cannot be added with that id (it would get id {got})"
                )

    def _id_of(self, token: str | None, key: str) -> int | None:
        if token is None:
            return None
        tid = self.backend.token_to_id(token)
        if tid is None:
            raise CheckpointError(f"{self.source}: {key} {token!r} is not in the tokenizer vocabulary")
        return tid

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    # ---- text <-> ids -----------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        # Default False: prompts usually come from a chat template that already holds the special tokens.
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    # ---- chat -------------------------------------------------------------------------------------

    def _template_from_config(self) -> str | None:
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        return template if isinstance(template, str) else None

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render `messages` with the model's Jinja chat template (sandboxed).

        Extra keyword arguments (`tools`, `enable_thinking`, ...) are passed to the template.
        """
        if self.chat_template is None:
            raise TokenizerError(
                f"this tokenizer has no chat template ({self.source} has no 'chat_template' and there is "
                "no chat_template.jinja); pass a plain prompt instead"
            )
        template = _compile_template(self.chat_template)
        return template.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            pad_token=self.pad_token or "",
            unk_token=self.unk_token or "",
            **kwargs,
        )


_TEMPLATE_CACHE: dict[str, Any] = {}


def _compile_template(source: str) -> Any:
    if source in _TEMPLATE_CACHE:
        return _TEMPLATE_CACHE[source]
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TokenizerError(f"chat template error: {message}")

    def tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
        # jinja's own tojson HTML-escapes quotes; chat templates expect plain JSON.
        return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        compiled = env.from_string(source)
    except TemplateError as e:
        raise TokenizerError(f"chat template does not compile: {e}") from None
    _TEMPLATE_CACHE[source] = compiled
    return compiled


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas, holding back incomplete UTF-8 sequences.

    Decoding token by token is wrong for byte-level BPE (a character can span tokens) and for
    tokenizers whose decoder depends on neighbours (leading-space handling), so each step decodes a
    short window that starts a few tokens back and emits what it adds beyond the characters already
    emitted from that window. A trailing U+FFFD (an unfinished multi-byte character) is held back.
    """

    # Tokens of context kept at the window start once everything in it has been emitted.
    CONTEXT = 4

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._start = 0  # window start (token index)
        self._sent = 0  # characters of decode(ids[_start:]) already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, new_ids: Iterable[int]) -> str:
        """Add ids; return the text they complete (possibly empty)."""
        self.ids.extend(int(i) for i in new_ids)
        window = self._decode(self.ids[self._start :])
        stable = window.rstrip("\ufffd")
        delta = stable[self._sent :] if len(stable) > self._sent else ""
        self._sent = max(self._sent, len(stable))
        if len(stable) == len(window) and len(self.ids) - self._start > 2 * self.CONTEXT:
            # Everything is emitted: slide the window so decoding cost stays constant per step.
            self._start = len(self.ids) - self.CONTEXT
            self._sent = len(self._decode(self.ids[self._start :]))
        return delta

    def flush(self) -> str:
        """Emit whatever is held back (e.g. a truncated character at the end of generation)."""
        window = self._decode(self.ids[self._start :])
        delta = window[self._sent :]
        self._sent = len(window)
        return delta

    @property
    def text(self) -> str:
        """Everything decoded so far, held-back part included."""
        return self._decode(self.ids)
