"""The narrow interface every weight format implements, and the loop that fills a model from one."""

from __future__ import annotations

from typing import Any, Iterable, Protocol

import torch
from torch import nn

from garrison_workers.errors import ModelLoadError
from garrison_workers.parallel.layers import weight_loader


class WeightSource(Protocol):
    """Tensors under Garrison's parameter names (transformers' Llama 4 names, `model.` prefix).

    A source may also offer `read_into(name, out) -> bool`: fill the tensor `out` with the whole of
    `name` in place, or return False (out untouched) when it cannot; the encrypted store decrypts
    straight into the parameter that way.
    """

    def names(self) -> Iterable[str]: ...

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored tensor's shape, from the file's header or manifest (nothing is read or allocated)."""
        ...

    def where(self, name: str) -> str:
        """The file that holds the tensor (and its name there, where that differs), for messages."""
        ...

    def read(self, name: str, index: Any = None) -> torch.Tensor:
        """The tensor, or `tensor[index]` reading no more than that part where the format allows.

        Raises ModelLoadError naming the tensor and file when it cannot.
        """
        ...


def check_parameters(model: nn.Module, source: WeightSource) -> None:
    """Refuse, before any memory is allocated for `model` (built on the meta device), a checkpoint that lacks a
    tensor or whose tensor would not give a parameter its shape: what each parameter's weight loader would
    cut from the stored tensor is computed on meta tensors of the stored shapes."""
    _refuse_missing(model, source)
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{module_name}.{param_name}" if module_name else param_name
            _check_shape(source, name, weight_loader(module, param_name), tuple(param.shape))


def _check_shape(source: WeightSource, name: str, loader: Any, expected: tuple[int, ...]) -> None:
    stored = tuple(source.shape(name))
    whole = torch.empty(stored, device="meta")

    def read(index: Any = None) -> torch.Tensor:
        return whole if index is None else whole[index]

    try:
        got = tuple((loader(read) if loader is not None else read()).shape)
    except (IndexError, RuntimeError, ValueError):
        got = None
    if got != expected:
        raise ModelLoadError(f"tensor {name} in {source.where(name)} has shape {stored}, which does not give the shape "
                             f"{expected} that the model's config implies (for this rank's shard): the weights and "
                             f"the config do not belong together")


def _refuse_missing(model: nn.Module, source: WeightSource) -> None:
    available = set(source.names())
    missing = [name for name, _ in model.named_parameters() if name not in available]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(f"checkpoint lacks tensor(s) {shown}; is the model directory complete?")


def fill_parameters(model: nn.Module, source: WeightSource) -> None:
    """Copy every parameter of `model` from `source`, refusing missing tensors and wrong shapes.

    A parameter whose module registered a weight loader (the parallel layers) picks its own shard.
    """
    _refuse_missing(model, source)
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) not in seen:  # a tied parameter is loaded once, under its first name
                seen.add(id(param))
                load_parameter(source, f"{module_name}.{param_name}" if module_name else param_name, module, param_name)


@torch.no_grad()
def load_parameter(source: WeightSource, name: str, module: nn.Module, param_name: str) -> None:
    """Fill `module.<param_name>` from the checkpoint tensor `name` (or this rank's shard of it)."""
    def read(index: Any = None) -> torch.Tensor:
        return source.read(name, index)

    param = getattr(module, param_name)
    loader = weight_loader(module, param_name)
    read_into = getattr(source, "read_into", None)
    if loader is None and read_into is not None and read_into(name, param):
        return
    tensor = loader(read) if loader is not None else read()
    if tuple(tensor.shape) != tuple(param.shape):
        raise ModelLoadError(
            f"tensor {name} has shape {tuple(tensor.shape)} where the config implies {tuple(param.shape)} "
            "(for this rank's shard); the weights do not belong to this config.json")
    param.copy_(tensor)
