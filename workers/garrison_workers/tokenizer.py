"""Text to token ids and back: encoding, decoding, chat templates and streaming detokenization.

Two sources describe a tokenizer. A Hugging Face directory ships a ready `tokenizer.json`; a GGUF
file only stores the vocabulary, merges and special ids as metadata, so the `tokenizers` pipeline
is rebuilt here the way transformers rebuilds it (`integrations/gguf/gguf_tokenizer_mapping.py`).
transformers is the test oracle for both paths and is never imported at run time.

Chat templates are rendered with the sandboxed jinja2 environment transformers uses, so a prompt
built here is byte-for-byte the prompt the model was fine-tuned on.
"""

from __future__ import annotations

import functools
import json
import pathlib
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, NoReturn, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

from garrison_workers.errors import InvalidRequestError, ModelLoadError

if TYPE_CHECKING:
    import gguf

# Tokens that end an assistant turn in common chat formats. Checkpoints often name only the
# end-of-text token as eos, so a chat reply would run on past its turn without these.
_TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>")
# The files of a Hugging Face directory that describe its tokenizer (what `from_files` reads).
PRETRAINED_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja")

# GGUF `tokenizer.ggml.token_type` values (llama.cpp's llama_token_type).
_CONTROL = 3
_USER_DEFINED = 4

# Split regexes keyed by `tokenizer.ggml.pre`, the ones transformers knows. Any other value keeps
# the GPT-2 split built into `ByteLevel`, which is also what transformers falls back to.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}

# Sentencepiece GGUFs of these architectures need per-model fixes (respelled tokens, merge order,
# a prefix-space normalizer) that the plain llama path below would silently get wrong.
_SENTENCEPIECE_NEEDS_FIXES = ("gemma", "gemma2", "gemma3", "phi3")

# How many prompt tokens the detokenizer keeps as context: enough to span one multi-byte character
# and the word its first generated token continues.
_DETOKENIZER_CONTEXT = 5


@dataclass(frozen=True, slots=True)
class _SpecialTokens:
    """Named special tokens as strings, which chat templates read as `bos_token`, `eos_token`..."""

    bos: str | None = None
    eos: str | None = None
    unk: str | None = None
    pad: str | None = None

    def template_variables(self) -> dict[str, str]:
        named = {"bos_token": self.bos, "eos_token": self.eos, "unk_token": self.unk, "pad_token": self.pad}
        return {name: token for name, token in named.items() if token is not None}


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what serving needs around it: stop ids and the chat template."""

    vocab_size: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    has_chat_template: bool

    def __init__(self, backend: _Backend, special: _SpecialTokens, chat_template: str | None,
                 extra_eos_ids: Iterable[int] = ()) -> None:
        self._backend = backend
        self._special = special
        self._chat_template = chat_template
        self._template = _compile_chat_template(chat_template) if chat_template else None
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = self._token_id(special.bos)
        self.eos_token_ids = self._stop_ids(extra_eos_ids, chat_template or "")
        self.has_chat_template = self._template is not None

    @classmethod
    def from_gguf(cls, reader: gguf.GGUFReader) -> Tokenizer:
        """Rebuild the tokenizer a GGUF file describes in its `tokenizer.*` metadata."""
        meta = _GGUFTokenizerMetadata.read(reader)
        backend, add_bos = _gguf_backend(meta)
        special = _SpecialTokens(*(meta.token(token_id) for token_id in
                                   (meta.bos_id, meta.eos_id, meta.unk_id, meta.pad_id)))
        # The named tokens are special even when the file types them otherwise (sentencepiece's
        # <unk> is UNKNOWN, not CONTROL): matched whole in text, dropped by skip_special_tokens.
        backend.add_special_tokens([AddedToken(token, normalized=False, special=True)
                                    for token in special.template_variables().values()
                                    if backend.token_to_id(token) is not None])
        backend.post_processor = _bos_eos_processor(special, meta.bos_id, meta.eos_id, add_bos, meta.add_eos)
        return cls(backend, special, meta.chat_template, extra_eos_ids=meta.turn_end_ids)

    @classmethod
    def from_pretrained_dir(cls, path: pathlib.Path) -> Tokenizer | None:
        """Load `tokenizer.json` and its config files; None when the directory has no tokenizer.json."""
        if not (path / "tokenizer.json").is_file():
            return None
        files = {}
        for name in PRETRAINED_FILES:
            if (path / name).is_file():
                try:
                    files[name] = (path / name).read_bytes()
                except OSError as err:
                    raise ModelLoadError(f"cannot read {path / name} ({err.strerror}); check its permissions") from None
        return cls.from_files(files, path)

    @classmethod
    def from_files(cls, files: Mapping[str, bytes], where: pathlib.Path) -> Tokenizer | None:
        """The tokenizer that `files` (named as in PRETRAINED_FILES) describe, wherever they were kept:
        a model directory, or the encrypted store, whose plaintext never touches disk. `where` names
        them in errors. None without a tokenizer.json."""
        if "tokenizer.json" not in files:
            return None
        try:
            backend = _Backend.from_str(files["tokenizer.json"].decode("utf-8"))
        except Exception as err:  # tokenizers raises a bare Exception for malformed files
            raise ModelLoadError(f"{where / 'tokenizer.json'} cannot be parsed ({err}); "
                                 "re-download the tokenizer files") from None
        config = _parse_json(files.get("tokenizer_config.json"), where / "tokenizer_config.json")
        special = _SpecialTokens(*(_token_content(config.get(name))
                                   for name in ("bos_token", "eos_token", "unk_token", "pad_token")))
        # Mirror transformers: an explicit add_bos/add_eos flag, or no post-processor at all, means the
        # flags decide; otherwise tokenizer.json's own post-processor already adds what the model expects.
        if "add_bos_token" in config or "add_eos_token" in config or backend.post_processor is None:
            backend.post_processor = _bos_eos_processor(
                special, backend.token_to_id(special.bos or ""), backend.token_to_id(special.eos or ""),
                bool(config.get("add_bos_token", False)), bool(config.get("add_eos_token", False)))
        generation = _parse_json(files.get("generation_config.json"), where / "generation_config.json")
        generation_eos = generation.get("eos_token_id")
        extra_eos = generation_eos if isinstance(generation_eos, list) else [generation_eos]
        return cls(backend, special, _files_chat_template(files, config),
                   extra_eos_ids=[token_id for token_id in extra_eos if isinstance(token_id, int)])

    def to_files(self) -> dict[str, bytes]:
        """Files that `from_files` reads back into this same tokenizer (how a GGUF file's tokenizer,
        which has no files of its own, travels in the encrypted store)."""
        named = {"bos_token": self._special.bos, "eos_token": self._special.eos, "unk_token": self._special.unk,
                 "pad_token": self._special.pad, "chat_template": self._chat_template}
        # No add_bos/add_eos flags: the post-processor inside tokenizer.json already does what they would.
        return {"tokenizer.json": self._backend.to_str().encode(),
                "tokenizer_config.json": json.dumps({k: v for k, v in named.items() if v is not None}).encode(),
                "generation_config.json": json.dumps({"eos_token_id": list(self.eos_token_ids)}).encode()}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings in it (like "<|im_start|>") map to their ids."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = list(ids)
        bad = [token_id for token_id in ids if not 0 <= token_id < self.vocab_size]
        if bad:
            raise InvalidRequestError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size}); "
                                      "send ids produced by this model's tokenizer")
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def chat_template(self) -> ChatTemplate | None:
        """What rendering a conversation needs, as plain data: a serving gateway renders it in a process of its own
        (garrison.gateway.render), where a template that never ends can be stopped."""
        if self._chat_template is None:
            return None
        return ChatTemplate(self._chat_template, self._special.template_variables())

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for a conversation, rendered as transformers' apply_chat_template(tokenize=False)."""
        if self._template is None:
            raise InvalidRequestError("this model has no chat template; send a plain text prompt "
                                      "(completions) instead of chat messages")
        return render_chat(self._template, self._special.template_variables(), messages, add_generation_prompt)

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    def _stop_ids(self, extra_eos_ids: Iterable[int], chat_template: str) -> tuple[int, ...]:
        turn_ends = [token for token in _TURN_END_TOKENS if token in chat_template]
        # gpt-oss closes every message with <|end|> and the whole reply with <|return|>, so there
        # <|end|> must not stop generation.
        if self._backend.token_to_id("<|return|>") is not None:
            turn_ends = [token for token in turn_ends if token != "<|end|>"]
        candidates = [self._token_id(self._special.eos), *extra_eos_ids, *map(self._token_id, turn_ends)]
        return tuple(dict.fromkeys(token_id for token_id in candidates if token_id is not None))


@dataclass(frozen=True, slots=True)
class ChatTemplate:
    source: str
    variables: dict[str, str]  # the named special tokens a template reads (bos_token, eos_token...)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
               max_chars: int | None = None) -> str:
        return render_chat(compiled_chat_template(self.source), self.variables, messages, add_generation_prompt,
                           max_chars)


def render_chat(template: jinja2.Template, variables: Mapping[str, str], messages: list[dict[str, str]],
                add_generation_prompt: bool, max_chars: int | None = None) -> str:
    """Render a conversation; InvalidRequestError when the template refuses it or its text passes `max_chars`."""
    # transformers drops None-valued keys: templates test for a missing key, not for None.
    plain = [{key: value for key, value in message.items() if value is not None} for message in messages]
    pieces, size = [], 0
    try:
        for piece in template.generate(messages=plain, tools=None, documents=None,
                                       add_generation_prompt=add_generation_prompt, **variables):
            size += len(piece)
            if max_chars is not None and size > max_chars:
                raise InvalidRequestError(f"the chat template's text for these messages passes {max_chars} "
                                          "characters; send fewer or shorter messages")
            pieces.append(piece)
    except jinja2.TemplateError as err:
        raise InvalidRequestError(f"the model's chat template rejected the messages: {err}; "
                                  "fix the roles or order of the messages") from None
    return "".join(pieces)


@functools.lru_cache(maxsize=16)
def compiled_chat_template(source: str) -> jinja2.Template:
    return _compile_chat_template(source)


class IncrementalDetokenizer:
    """Turns a stream of generated ids into text deltas whose concatenation is their full decode.

    Decoding one token alone is wrong in general: a character can span several byte-level tokens,
    and a sentencepiece decoder drops the leading space of a sequence's first word. So each push
    decodes a short window that starts a few tokens back (`_prefix_offset`) and emits only what the
    window adds beyond the text already emitted (`_read_offset`).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # The prompt tail is context only: a first generated token that continues a word decodes
        # the way it will read after the prompt. Its own text is never emitted.
        self._ids = list(prompt_ids)[-_DETOKENIZER_CONTEXT:]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def push(self, token_id: int) -> str:
        """The text `token_id` adds, or "" while it ends in an unfinished UTF-8 character."""
        self._ids.append(token_id)
        return self._emit(hold_incomplete=True)

    def flush(self) -> str:
        """Text still held back at the end of generation (an unfinished character, decoded as U+FFFD)."""
        return self._emit(hold_incomplete=False)

    def _emit(self, hold_incomplete: bool) -> str:
        seen = self._decode(self._ids[self._prefix_offset:self._read_offset])
        text = self._decode(self._ids[self._prefix_offset:])
        if len(text) <= len(seen) or (hold_incomplete and text.endswith("\ufffd")):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return text[len(seen):]

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)


@dataclass(frozen=True, slots=True)
class _GGUFTokenizerMetadata:
    """The `tokenizer.*` keys of a GGUF file, under llama.cpp's names."""

    architecture: str
    model: str
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    scores: list[float]
    merges: list[str] | None
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool | None
    add_eos: bool
    add_space_prefix: bool
    chat_template: str | None
    turn_end_ids: tuple[int, ...]

    @classmethod
    def read(cls, reader: gguf.GGUFReader) -> _GGUFTokenizerMetadata:
        def get(key: str, default: Any = None) -> Any:
            field = reader.fields.get(key)
            return default if field is None else field.contents()

        tokens = get("tokenizer.ggml.tokens")
        if not tokens:
            raise ModelLoadError("the GGUF file has no tokenizer.ggml.tokens; convert the model with a recent "
                                 "llama.cpp convert_hf_to_gguf.py, or serve its Hugging Face directory")
        # llama.cpp writes these for models whose end-of-turn differs from eos (Llama 3.x, Gemma...).
        turn_ends = (get("tokenizer.ggml.eot_token_id"), get("tokenizer.ggml.eom_token_id"))
        return cls(
            architecture=str(get("general.architecture", "")), model=str(get("tokenizer.ggml.model", "")),
            pre=get("tokenizer.ggml.pre"), tokens=tokens, token_types=get("tokenizer.ggml.token_type", []),
            scores=get("tokenizer.ggml.scores", []), merges=get("tokenizer.ggml.merges"),
            bos_id=get("tokenizer.ggml.bos_token_id"), eos_id=get("tokenizer.ggml.eos_token_id"),
            unk_id=get("tokenizer.ggml.unknown_token_id"), pad_id=get("tokenizer.ggml.padding_token_id"),
            add_bos=get("tokenizer.ggml.add_bos_token"), add_eos=bool(get("tokenizer.ggml.add_eos_token", False)),
            add_space_prefix=bool(get("tokenizer.ggml.add_space_prefix", True)),
            chat_template=get("tokenizer.chat_template"),
            turn_end_ids=tuple(int(token_id) for token_id in turn_ends if token_id is not None))

    def token(self, token_id: int | None) -> str | None:
        if token_id is None or not 0 <= token_id < len(self.tokens):
            return None
        return self.tokens[token_id]


def _gguf_backend(meta: _GGUFTokenizerMetadata) -> tuple[_Backend, bool]:
    """The tokenizer pipeline for the file's `tokenizer.ggml.model`, and whether it adds BOS."""
    if meta.model == "gpt2":
        return _byte_level_backend(meta), bool(meta.add_bos)
    if meta.model == "llama" and meta.architecture not in _SENTENCEPIECE_NEEDS_FIXES:
        # llama.cpp adds BOS to a sentencepiece vocabulary whose file does not say otherwise.
        return _sentencepiece_backend(meta), meta.add_bos is None or meta.add_bos
    raise ModelLoadError(
        f"GGUF tokenizer model {meta.model!r} (architecture {meta.architecture!r}) is not supported; "
        "Garrison rebuilds 'gpt2' (byte-level BPE) and plain 'llama' (sentencepiece BPE) tokenizers. "
        "Serve the model from its Hugging Face directory, which ships a tokenizer.json, instead")


def _byte_level_backend(meta: _GGUFTokenizerMetadata) -> _Backend:
    """GPT-2 style byte-level BPE, the shape of transformers' GPT2Tokenizer."""
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # Vocabularies are stored in the byte alphabet, but some converters write a few tokens as plain
    # UTF-8; respell those so the BPE model can reach them.
    vocab = {token if set(token) <= alphabet else "".join(spelling[byte] for byte in token.encode("utf-8")): index
             for index, token in enumerate(meta.tokens)}
    if meta.merges is None:
        raise ModelLoadError("the byte-level (gpt2) GGUF tokenizer has no tokenizer.ggml.merges; "
                             "re-convert the model with llama.cpp's convert_hf_to_gguf.py")
    merges = [tuple(merge.split(" ", 1)) for merge in meta.merges]
    backend = _Backend(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                  end_of_word_suffix="", fuse_unk=False))
    split = _PRE_TOKENIZER_SPLITS.get(meta.pre or "")
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                  use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    # A control token spelled outside the byte alphabet is a converter mislabel: adding it would
    # grow the vocabulary past the model's embedding rows, so only in-alphabet ones are added.
    _add_marked_tokens(backend, meta, lambda token: set(token) <= alphabet)
    return backend


def _sentencepiece_backend(meta: _GGUFTokenizerMetadata) -> _Backend:
    """Sentencepiece BPE with byte fallback, the shape of transformers' LlamaTokenizer."""
    vocab = {token: index for index, token in enumerate(meta.tokens)}
    if meta.merges is not None:
        merges = [tuple(merge.split(" ", 1)) for merge in meta.merges]
    elif len(meta.scores) == len(meta.tokens):
        merges = _merges_from_scores(vocab, dict(zip(meta.tokens, meta.scores)))
    else:
        raise ModelLoadError("the sentencepiece (llama) GGUF tokenizer has neither merges nor scores; "
                             "re-convert the model with llama.cpp's convert_hf_to_gguf.py")
    backend = _Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if meta.add_space_prefix else "never", split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if meta.add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    _add_marked_tokens(backend, meta, lambda token: True)
    return backend


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Merges implied by a scored vocabulary: every split of a token into two known tokens, best score first.

    Same order as transformers' `generate_merges`, including its tie-breaks, so ids match.
    """
    merges: list[tuple[str, str, float]] = []
    for token, score in scores.items():
        splits = [(token[:i], token[i:], score) for i in range(1, len(token))
                  if token[:i] in vocab and token[i:] in vocab]
        merges.extend(sorted(splits, key=lambda split: (vocab[split[0]], vocab[split[1]])))
    merges.sort(key=lambda merge: (merge[2], len(merge[0]), len(merge[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _add_marked_tokens(backend: _Backend, meta: _GGUFTokenizerMetadata, addable: Callable[[str], bool]) -> None:
    """Match control tokens (special) and user-defined ones like `<think>` (not special) whole in text.

    Without this they are cut into pieces, and skip_special_tokens cannot drop the control ones.
    """
    marked = list(zip(meta.tokens, meta.token_types))
    backend.add_special_tokens([AddedToken(token, normalized=False, special=True)
                                for token, kind in marked if kind == _CONTROL and addable(token)])
    vocab = backend.get_vocab()
    backend.add_tokens([AddedToken(token, normalized=False, special=False)
                        for token, kind in marked if kind == _USER_DEFINED and token in vocab])


def _bos_eos_processor(special: _SpecialTokens, bos_id: int | None, eos_id: int | None,
                       add_bos: bool, add_eos: bool) -> processors.TemplateProcessing:
    """The post-processor transformers builds from add_bos_token / add_eos_token."""
    bos = special.bos if add_bos and special.bos is not None and bos_id is not None else None
    eos = special.eos if add_eos and special.eos is not None and eos_id is not None else None
    single = " ".join(part for part in (bos and f"{bos}:0", "$A:0", eos and f"{eos}:0") if part)
    pair = " ".join(part for part in (single, bos and f"{bos}:1", "$B:1", eos and f"{eos}:1") if part)
    special_ids = [(token, token_id) for token, token_id in ((bos, bos_id), (eos, eos_id)) if token is not None]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special_ids)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: printable bytes stand for themselves, the rest move to U+0100 onwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [byte for byte in range(256) if byte not in printable]
    spelling = {byte: chr(byte) for byte in printable}
    spelling.update({byte: chr(256 + n) for n, byte in enumerate(moved)})
    return spelling


def _parse_json(content: bytes | None, path: pathlib.Path) -> dict[str, Any]:
    if content is None:
        return {}
    try:
        parsed = json.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{path} is not valid JSON ({err}); re-download the model files") from None
    if not isinstance(parsed, dict):
        raise ModelLoadError(f"{path} must hold a JSON object; re-download the model files")
    return parsed


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json, written as a string or as a serialized AddedToken."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _files_chat_template(files: Mapping[str, bytes], config: dict[str, Any]) -> str | None:
    """transformers' precedence: chat_template.jinja, then tokenizer_config.json's chat_template."""
    if "chat_template.jinja" in files:
        return files["chat_template.jinja"].decode("utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates; the one named "default" is used for chat
        template = next((entry.get("template") for entry in template
                         if isinstance(entry, dict) and entry.get("name") == "default"), None)
    return template if isinstance(template, str) else None


class _GenerationTag(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (used by transformers to mask assistant tokens).

    Serving only needs the text, so the block renders its body unchanged.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # jinja2's own tojson escapes HTML characters, which would change the prompt text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _compile_chat_template(source: str) -> jinja2.Template:
    """Compile with transformers' environment; chat templates are untrusted code, hence the sandbox."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise ModelLoadError(f"the model's chat template does not compile ({err}); fix or replace "
                             "chat_template in the model files") from None
