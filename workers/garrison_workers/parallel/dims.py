"""`ParallelDims`: the one object that checks a replica's layout against a model, up front.

A replica has `tp × ep` ranks. Rank r sits at (ep_rank, tp_rank) = divmod(r, tp): the ranks sharing
an ep_rank form a TP group (they split attention heads and MLP widths), the ranks sharing a tp_rank
form an EP group (they split the experts of every MoE layer).
"""

from __future__ import annotations

from dataclasses import dataclass

from garrison_workers.config import ModelConfig
from garrison_workers.errors import LayoutError


@dataclass(slots=True, frozen=True)
class ParallelDims:
    tp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        if self.tp < 1 or self.ep < 1:
            raise LayoutError(f"tp and ep must be >= 1, got tp={self.tp} ep={self.ep}")

    @property
    def world_size(self) -> int:
        return self.tp * self.ep

    def coords(self, rank: int) -> tuple[int, int]:
        """(ep_rank, tp_rank) of a global rank."""
        return divmod(rank, self.tp)

    def tp_group_ranks(self, ep_rank: int) -> list[int]:
        return [ep_rank * self.tp + t for t in range(self.tp)]

    def ep_group_ranks(self, tp_rank: int) -> list[int]:
        return [e * self.tp + tp_rank for e in range(self.ep)]

    def validate(self, config: ModelConfig) -> None:
        """Raise LayoutError listing everything about this layout that does not fit `config`."""
        problems = []
        widths = {"attention heads": config.num_heads, "KV heads": config.num_kv_heads}
        if config.moe_layers:
            widths["expert intermediate size"] = config.intermediate_size
        if len(config.moe_layers) < config.num_layers:
            widths["MLP intermediate size"] = config.intermediate_size_mlp or config.intermediate_size
        undivided = {name: n for name, n in widths.items() if n % self.tp}
        if undivided:
            fits = [t for t in range(1, config.num_heads + 1) if all(n % t == 0 for n in widths.values())]
            shown = ", ".join(f"{n} {name}" for name, n in undivided.items())
            problems.append(f"tp={self.tp} does not divide the model's {shown}; tp must divide every one of "
                            f"{', '.join(f'{n} {name}' for name, n in widths.items())}: choose tp from {fits}")
        if self.ep > 1 and not config.moe_layers:
            problems.append(f"ep={self.ep} needs experts, but this model is dense; use tp to split it")
        elif self.ep > config.num_experts > 0:
            problems.append(f"ep={self.ep} exceeds the {config.num_experts} experts per MoE layer; "
                            f"choose ep <= {config.num_experts}")
        if problems:
            raise LayoutError("; ".join(problems))
