"""The real model: SmolLM2-135M-Instruct from its GGUF, against transformers loading the same file."""

from __future__ import annotations

import subprocess
import sys

import torch

from garrison_workers.engine.sequence import SamplingParams

import pytest

QUESTIONS = ["What is the capital of France?", "Write a short poem about the sea."]


@pytest.mark.parametrize("question", QUESTIONS)
def test_greedy_tokens_match_transformers(smollm2_engine, hf_smollm2, question: str) -> None:
    hf_model, hf_tokenizer = hf_smollm2
    messages = [{"role": "user", "content": question}]
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = hf_tokenizer(text).input_ids
    assert smollm2_engine.tokenizer.encode(text, add_special_tokens=False) == prompt
    [ours] = smollm2_engine.generate([prompt], SamplingParams(max_tokens=32, logprobs=True))
    with torch.no_grad():
        hf_out = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32)
        hf_logits = hf_model(hf_out[:, :-1]).logits[0, len(prompt) - 1:]
    assert ours.token_ids == hf_out[0, len(prompt):].tolist()
    hf_logprobs = torch.log_softmax(hf_logits, dim=-1).gather(1, torch.tensor(ours.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(ours.logprobs), hf_logprobs, atol=1e-4)
    assert ours.text == hf_tokenizer.decode(ours.token_ids, skip_special_tokens=True)


def test_cli_answers_paris() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "garrison.cli", "generate", "--model", "smollm2", "--chat",
         "--prompt", "What is the capital of France?", "--max-new-tokens", "24"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "Traceback" not in result.stderr
