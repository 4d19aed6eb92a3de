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

    def read(self, name: str, index: Any = None) -> torch.Tensor:
        """The tensor, or `tensor[index]` reading no more than that part where the format allows.

        Raises ModelLoadError naming the tensor and file when it cannot.
        """
        ...


def fill_parameters(model: nn.Module, source: WeightSource) -> None:
    """Copy every parameter of `model` from `source`, refusing missing tensors and wrong shapes.

    A parameter whose module registered a weight loader (the parallel layers) picks its own shard.
    """
    available = set(source.names())
    missing = [name for name, _ in model.named_parameters() if name not in available]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(f"checkpoint lacks tensor(s) {shown}; is the model directory complete?")
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
