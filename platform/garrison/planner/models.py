"""The model a plan is for: a named preset, a config.json, or any model `--model` takes elsewhere; and how many
parameters each part of it has, which is what the memory and time models divide among ranks."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from garrison_workers.config import ModelConfig, from_hf_config, llama3_70b, llama4_maverick, llama4_scout
from garrison_workers.errors import ModelLoadError

from garrison.weight_store.keys import KeyProvider
from garrison.weight_store.store import Store

PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "llama4-scout": llama4_scout,
    "llama4-maverick": llama4_maverick,
    "llama3-70b": llama3_70b,
}
ALIASES = {"scout": "llama4-scout", "maverick": "llama4-maverick", "llama-3.1-70b": "llama3-70b"}


def resolve_model(ref: str, store: Store | None = None, key_provider: KeyProvider | None = None
                  ) -> tuple[str, ModelConfig]:
    """(name, config) of a preset, a config.json (or a directory holding one), or a model of the store.

    Nothing is fetched: a hub id that is none of these is refused with the presets listed.
    """
    name = ALIASES.get(ref, ref)
    if name in PRESETS:
        return name, PRESETS[name]()
    path = Path(ref).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if path.is_file() and path.suffix == ".json":
        return path.parent.name or path.stem, _from_json(path)
    return ref, _from_model_ref(ref, store, key_provider)


# What a step's cost depends on; two configs alike in these are one model to the time model (names, token ids,
# norms' epsilon and RoPE's base do not change what a step computes).
_SHAPE_FIELDS = ("architecture", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                 "intermediate_size", "intermediate_size_mlp", "num_experts", "num_experts_per_tok", "moe_layers",
                 "rope_layers", "attention_chunk_size", "tie_word_embeddings")


def model_key(model: ModelConfig) -> str:
    """A model's shape as a short readable key ("llama4 h5120 L48 3f9c0a1b2d"): how a profile names the models
    whose own steps it measured, so a plan for the same shape finds them."""
    shape = json.dumps({name: getattr(model, name) for name in _SHAPE_FIELDS}, sort_keys=True)
    digest = hashlib.sha256(shape.encode()).hexdigest()[:10]
    return f"{model.architecture} h{model.hidden_size} L{model.num_layers} {digest}"


def _from_json(path: Path) -> ModelConfig:
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"cannot read {path} as a model config.json: {err}") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path} is not a config.json object")
    return from_hf_config(raw)


def _from_model_ref(ref: str, store: Store | None, key_provider: KeyProvider | None) -> ModelConfig:
    from garrison_workers.loader import open_model_files

    from garrison.model_refs import resolve_model as resolve_ref

    try:
        location = resolve_ref(ref, store, key_provider)
    except ModelLoadError as err:
        raise ModelLoadError(f"unknown model {ref!r}: not a preset ({', '.join(PRESETS)}), not a config.json and "
                             f"{err}") from None
    return open_model_files(location).config


@dataclass(slots=True, frozen=True)
class ParamCounts:
    """Parameters by where they live under TP × EP (Garrison's layout: attention, dense MLPs and shared experts
    are split by TP and repeated on every EP rank; routed experts are split by EP, each expert's width by TP;
    embeddings, LM head, router and norms are whole on every rank)."""

    embedding: int
    lm_head: int
    attention: int  # all layers: q, k, v, o projections
    dense_mlp: int  # all dense layers
    shared_expert: int  # all MoE layers
    routed_expert: int  # one expert of one MoE layer
    num_moe_layers: int
    num_experts: int
    router: int  # all MoE layers
    norms: int
    top_k: int = 0  # routed experts per token

    @property
    def total(self) -> int:
        return (self.embedding + self.lm_head + self.attention + self.dense_mlp + self.shared_expert + self.router
                + self.norms + self.routed_expert * self.num_experts * self.num_moe_layers)

    @property
    def active_per_token(self) -> int:
        """Parameters one token computes with (top-k routed experts), embedding excluded."""
        return self.total - self.embedding - self.routed_expert * self.num_moe_layers * (
            self.num_experts - self.top_k)


def param_counts(model: ModelConfig) -> ParamCounts:
    h, d = model.hidden_size, model.head_dim
    attention = model.num_layers * h * d * (2 * model.num_heads + 2 * model.num_kv_heads)
    num_moe = len(model.moe_layers)
    dense_width = model.intermediate_size_mlp if model.architecture == "llama4" else model.intermediate_size
    expert = 3 * h * model.intermediate_size
    return ParamCounts(
        embedding=model.vocab_size * h, lm_head=0 if model.tie_word_embeddings else model.vocab_size * h,
        attention=attention, dense_mlp=(model.num_layers - num_moe) * 3 * h * dense_width,
        shared_expert=num_moe * expert, routed_expert=expert if num_moe else 0, num_moe_layers=num_moe,
        num_experts=model.num_experts if num_moe else 0, router=num_moe * h * model.num_experts,
        norms=(2 * model.num_layers + 1) * h, top_k=model.num_experts_per_tok if num_moe else 0)
