"""The MoE layer under tensor and expert parallelism, with a run-time expert placement table.

Every rank of a replica holds the whole step's tokens after attention (attention is TP-split and
all-reduced). EP rank r takes the r-th slice of those tokens, routes them, and sends each (token,
expert) pair to the EP rank that owns the expert; within an EP rank, the TP ranks each hold a slice of
every local expert's width, so their outputs are partial sums finished by one TP all-reduce.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from garrison_workers.config import ModelConfig
from garrison_workers.model import MLP, Experts
from garrison_workers.parallel.context import ParallelContext
from garrison_workers.parallel.layers import Reader, set_weight_loader, shard
from garrison_workers.quant.formats import WeightFormat
from garrison_workers.quant.layers import QuantizedExperts, local_experts


def default_placement(num_experts: int, ep: int) -> list[int]:
    """Contiguous, as even as possible: expert e lives on EP rank e * ep // num_experts."""
    return [e * ep // num_experts for e in range(num_experts)]


class ParallelMoE(nn.Module):
    def __init__(self, config: ModelConfig, par: ParallelContext) -> None:
        super().__init__()
        self.config, self.par = config, par
        self.top_k, self.num_experts = config.num_experts_per_tok, config.num_experts
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        # The shared expert leaves its TP sum to this layer: one all-reduce covers routed + shared.
        self.shared_expert = MLP(config.hidden_size, config.intermediate_size, par, reduce=False)
        self.width = shard(config.intermediate_size, par.dims.tp, par.tp_rank)
        self.expert_formats: tuple[WeightFormat, WeightFormat] | None = None  # set when the experts are quantized
        # Explicit CPU device: the model may be built under torch.device("meta").
        self.placement_E = torch.tensor(default_placement(config.num_experts, par.dims.ep), device="cpu")
        self.experts = self._local_experts()
        # Tokens each local expert has processed (counted on TP rank 0 of each EP rank), for rebalancing.
        self.expert_load_E = torch.zeros(config.num_experts, dtype=torch.long, device="cpu")
        self.a2a_bytes_sent = 0  # all_to_all payload this rank sent to other ranks (its own share excluded)

    @property
    def local_expert_ids(self) -> list[int]:
        return (self.placement_E == self.par.ep_rank).nonzero().flatten().tolist()

    def _local_experts(self) -> Experts | QuantizedExperts:
        config, ids = self.config, self.local_expert_ids
        if self.expert_formats is not None:
            return local_experts(self, *self.expert_formats)
        experts = Experts(len(ids), config.hidden_size, config.intermediate_size // self.par.dims.tp)
        set_weight_loader(experts, "gate_up_proj", lambda read: self._read_gate_up(read, ids))
        set_weight_loader(experts, "down_proj", lambda read: torch.stack([read((e, self.width)) for e in ids]))
        return experts

    def _read_gate_up(self, read: Reader, ids: list[int]) -> torch.Tensor:
        """This rank's width of each local expert's fused [gate | up] columns, read expert by expert."""
        size, w = self.config.intermediate_size, self.width
        up = slice(size + w.start, size + w.stop)
        return torch.stack([torch.cat((read((e, slice(None), w)), read((e, slice(None), up))), dim=-1) for e in ids])

    def set_placement(self, placement_E: list[int], load: Callable[[str, nn.Module, str], None], prefix: str) -> None:
        """Adopt a new expert → EP rank table; this rank loads the experts it now owns.

        `load(checkpoint_name, module, param_name)` fills one parameter from the weight source.
        """
        if len(placement_E) != self.num_experts or not all(0 <= r < self.par.dims.ep for r in placement_E):
            raise ValueError(f"a placement must map each of {self.num_experts} experts to an EP rank < {self.par.dims.ep}")
        self.placement_E = torch.tensor(placement_E, device="cpu")
        weight = self.router.weight
        experts = self._local_experts()
        # Quantized payloads keep their dtypes; their kernels compute in the router's.
        experts = experts.to(device=weight.device) if self.expert_formats else experts.to(weight.device, weight.dtype)
        for name, _ in experts.named_parameters():
            load(f"{prefix}experts.{name}", experts, name)
        if isinstance(experts, QuantizedExperts):
            experts.prepare(getattr(self.experts, "kernel_dtype", weight.dtype))  # as the experts it replaces
        self.experts = experts

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        """1. slice: this EP rank takes its share of the step's T tokens;
        2. route the slice: top-k router logits, sigmoid scores; each (token, expert) pair is scaled by
           its score and addressed to the EP rank owning the expert (the placement table);
        3. EP all_to_all_single: pair counts, then pair rows and expert ids (uneven splits);
        4. run the local experts on the received rows, grouped by expert (TP-partial outputs);
        5. EP all_to_all_single back, in the order sent; add each pair's output onto its token, on top
           of the shared expert's (TP-partial) output;
        6. TP all-reduce: finish the partial sums of routed and shared experts together;
        7. EP all_gather: every rank again holds all T tokens.
        """
        ep = self.par.dims.ep
        sizes = [len(part) for part in torch.arange(x_TH.shape[0]).tensor_split(ep)]
        start = sum(sizes[:self.par.ep_rank])
        x_SH = x_TH[start:start + sizes[self.par.ep_rank]]
        topk_vals_SK, topk_ids_SK = torch.topk(self.router(x_SH), self.top_k, dim=-1)
        scores_SK = torch.sigmoid(topk_vals_SK.float()).to(x_SH.dtype)
        dest_P = self.placement_E.to(x_SH.device)[topk_ids_SK.flatten()]
        order_P = torch.argsort(dest_P * self.num_experts + topk_ids_SK.flatten(), stable=True)
        token_P = order_P // self.top_k
        send_x_PH = x_SH[token_P] * scores_SK.flatten()[order_P, None]
        send_counts = torch.bincount(dest_P, minlength=ep)
        recv_x_RH, recv_ids_R, recv_counts = self._dispatch(send_x_PH, topk_ids_SK.flatten()[order_P], send_counts)
        y_RH = self._run_local_experts(recv_x_RH, recv_ids_R)
        y_PH = self._exchange(y_RH, send_counts, recv_counts)
        out_SH = self.shared_expert(x_SH).index_add_(0, token_P, y_PH)
        out_SH = self.par.all_reduce_tp(out_SH)
        return self._gather_slices(out_SH, sizes)

    def _dispatch(self, x_PH: torch.Tensor, ids_P: torch.Tensor, send_counts: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.par.dims.ep == 1:
            return x_PH, ids_P, send_counts
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.par.ep_group)
        return self._exchange(x_PH, recv_counts, send_counts), self._exchange(ids_P, recv_counts, send_counts), recv_counts

    def _exchange(self, rows: torch.Tensor, recv_counts: torch.Tensor, send_counts: torch.Tensor) -> torch.Tensor:
        """all_to_all_single of `rows` (grouped by destination) into `recv_counts` rows from each rank."""
        if self.par.dims.ep == 1:
            return rows
        out = rows.new_empty((int(recv_counts.sum()), *rows.shape[1:]))
        to_others = int(send_counts.sum() - send_counts[self.par.ep_rank])
        self.a2a_bytes_sent += to_others * rows[0:1].numel() * rows.element_size()
        dist.all_to_all_single(out, rows.contiguous(), recv_counts.tolist(), send_counts.tolist(), group=self.par.ep_group)
        return out

    def _run_local_experts(self, x_RH: torch.Tensor, ids_R: torch.Tensor) -> torch.Tensor:
        local_index_E = torch.full((self.num_experts,), -1, dtype=torch.long, device=x_RH.device)
        local_ids = self.local_expert_ids
        local_index_E[local_ids] = torch.arange(len(local_ids), device=x_RH.device)
        local_R = local_index_E[ids_R]
        order_R = torch.argsort(local_R, stable=True)
        counts = torch.bincount(local_R, minlength=len(local_ids))
        if self.par.tp_rank == 0:
            self.expert_load_E[local_ids] += counts.cpu()
        y_RH = torch.empty_like(x_RH)
        y_RH[order_R] = self.experts(x_RH[order_R], counts.tolist())
        return y_RH

    def _gather_slices(self, out_SH: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        if self.par.dims.ep == 1:
            return out_SH
        # all_gather needs equal shapes: pad each slice to the largest, then drop the padding.
        padded = out_SH.new_zeros((max(sizes), out_SH.shape[1]))
        padded[:out_SH.shape[0]] = out_SH
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=self.par.ep_group)
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])
