"""Decode steps through torch.compile (`EngineConfig.compile_decode`): the model's forward as one compiled graph.

A decode step computes one token per sequence; on a small batch its time goes to calling ~65 ops per layer from
Python more than to the ops themselves (SmolLM2 int4 on this project's CPU: ~9 of ~19 ms per step). Inductor
fuses the norms, RoPE, residual adds and activations into a few kernels and calls the rest (the quantized
matmuls, attention) from generated code. Only steps without prefill chunks take the compiled path: their shapes
vary in two sizes (the rows, the longest context), compiled once as dynamic sizes; a prefill step's segments are
a Python loop of their own and stay eager.

Compiling takes tens of seconds (less with inductor's on-disk cache, `TORCHINDUCTOR_CACHE_DIR`), so it happens at
start-up (`DecodeGraph.warm_up`), not on a user's first request: a batch of one row and one of two (one row is a
size of its own to the compiler). A later shape the two graphs do not cover runs eager rather than stall every
stream behind a compile.

Dynamo checks each call against guards on everything the trace read, the model's modules and weights included:
~5,000 checks, ~2 ms a step here. A model does not change after loading, so only the guards on the step's own
inputs are kept; in exchange each model compiles its own copy of the forward's code (Dynamo keeps compiled
graphs per code object), so no model's graphs can be called with another's weights. The model's tensors are
also marked static: with `dynamic=True` a quantized kernel's tensors (reached through the kernel object, not as
the module's parameters) got symbolic sizes, and their ~2,700 size relations were checked in Python on every
call (0.8 ms of SmolLM2 int4's 9 ms step).

MoE models are refused: their routing decides in Python which experts run (a graph break inside the layer loop,
which Dynamo gives up on).
"""

from __future__ import annotations

import itertools
import re
import types
import weakref
from typing import Callable

import torch

from garrison_workers.attention import AttentionMetadata
from garrison_workers.config import ModelConfig
from garrison_workers.errors import ModelLoadError
from garrison_workers.model import CausalLM, KVCaches

_copies = itertools.count()


def _forward(model: CausalLM, input_ids_T: torch.Tensor, meta: AttentionMetadata, kv_caches: KVCaches) -> torch.Tensor:
    return model(input_ids_T, meta, kv_caches)


def check_compilable(config: ModelConfig) -> None:
    """Refuse a model whose forward cannot be one graph (before any rank loads it; the CLI prints the message)."""
    if any(config.is_moe_layer(layer) for layer in range(config.num_layers)):
        raise ModelLoadError("compile_decode: this model has MoE layers, whose routing runs in Python and cannot be "
                         "compiled into one graph; set compile_decode: false (the default) for it")


def _step_guards(entries: list) -> list[bool]:
    """Keep the guards on the step's inputs (ids, metadata, caches) and global state; drop those on the model, its
    modules and their kernels (`model...`, `type(model...)`)."""
    return [not _MODEL_GUARD.match(entry.name) for entry in entries]


_MODEL_GUARD = re.compile(r"^(\w+\()*model\b")


class DecodeGraph:
    """The compiled forward of one model, shared by every model runner over it (a restarted runner reuses it)."""

    _of_model: "weakref.WeakKeyDictionary[CausalLM, DecodeGraph]" = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, model: CausalLM) -> "DecodeGraph":
        graph = cls._of_model.get(model)
        if graph is None:
            graph = cls._of_model[model] = cls(model)
        return graph

    def __init__(self, model: CausalLM) -> None:
        check_compilable(model.config)
        self.model = model
        for tensor in itertools.chain(model.parameters(), model.buffers()):  # kernels hold theirs as buffers
            torch._dynamo.mark_static(tensor)
        self.stance = "default"  # until warmed up: compile what the step needs
        code = _forward.__code__.replace(co_name=f"decode_forward_{next(_copies)}")
        self._compiled = torch.compile(types.FunctionType(code, _forward.__globals__, code.co_name), dynamic=True,
                                       options={"guard_filter_fn": _step_guards})

    def __call__(self, input_ids_T: torch.Tensor, meta: AttentionMetadata, kv_caches: KVCaches) -> torch.Tensor:
        with torch.compiler.set_stance(self.stance):
            return self._compiled(self.model, input_ids_T, meta, kv_caches)

    def warm_up(self, run_decode: Callable[[int], None]) -> None:
        """Compile both graphs now (once per model): `run_decode(n)` runs a decode step of n rows through this graph."""
        if self.stance != "default":
            return
        # Floats the forward reads (each norm's eps) as constants, not symbols: each symbol is checked by a Python
        # guard on every call.
        with torch._dynamo.config.patch(specialize_float=True):
            for rows in (1, 2):
                run_decode(rows)
        self.stance = "eager_on_recompile"
