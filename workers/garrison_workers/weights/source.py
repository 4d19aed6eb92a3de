"""The narrow interface every weight format implements, and the loop that fills a model from one."""

from __future__ import annotations

from typing import Iterable, Protocol

import torch
from torch import nn

from garrison_workers.errors import ModelLoadError


class WeightSource(Protocol):
    """Tensors under Garrison's parameter names (transformers' Llama 4 names, `model.` prefix)."""

    def names(self) -> Iterable[str]: ...

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor; raises ModelLoadError naming the tensor and file when it cannot."""
        ...


def fill_parameters(model: nn.Module, source: WeightSource) -> None:
    """Copy every parameter of `model` from `source`, refusing missing tensors and wrong shapes."""
    available = set(source.names())
    missing = [name for name, _ in model.named_parameters() if name not in available]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(f"checkpoint lacks tensor(s) {shown}; is the model directory complete?")
    with torch.no_grad():
        for name, param in model.named_parameters():
            tensor = source.read(name)
            if tuple(tensor.shape) != tuple(param.shape):
                raise ModelLoadError(
                    f"tensor {name} has shape {tuple(tensor.shape)} but the config implies {tuple(param.shape)}; "
                    "the weights do not belong to this config.json")
            param.copy_(tensor)
