"""Quantized counterparts of the model's linear, expert and embedding layers, and how a model adopts them.

The model is written for float weights (`garrison_workers.model`); `adopt_quantized` swaps, on the
meta-device model, each layer whose weight the source holds quantized for its quantized counterpart,
which registers the canonical tensors (see the package docstring) with weight loaders that cut this
rank's shard: column-parallel rows with their scales, row-parallel input features with the scale
groups that cover them (refused when a group would be split). After the weights are loaded,
`prepare_kernels` turns each layer's canonical tensors into its kernel's layout and drops them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from garrison_workers.errors import ModelLoadError
from garrison_workers.model import CausalLM, Experts
from garrison_workers.parallel.context import ParallelContext
from garrison_workers.parallel.layers import ColumnParallelLinear, RowParallelLinear, set_weight_loader
from garrison_workers.quant.codec import dequantize
from garrison_workers.quant.formats import Names, WeightFormat, find_format
from garrison_workers.quant.kernels import AmaxReduce, Kernel, input_dtype, make_kernel

Canonical = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


class QuantizedTensors:
    """One quantized weight [*lead, N, K] (this rank's shard) as parameters of its owner module, named like
    the checkpoint's: `<name>_<kind>`, `<name>_scale` and, with zero points, `<name>_zero`."""

    def __init__(self, owner: nn.Module, fmt: WeightFormat, name: str, lead: tuple[int, ...], out_features: int,
                 in_features: int) -> None:
        self.fmt = fmt
        groups, cpe = 1 if fmt.per_channel else in_features // fmt.group_size, fmt.format.codes_per_element
        self.names = [f"{name}_{fmt.kind}", f"{name}_scale"] + ([f"{name}_zero"] if fmt.has_zero else [])
        shapes = [(*lead, out_features, in_features // cpe)] + [(*lead, out_features, groups)] * 2
        for tensor, shape, dtype in zip(self.names, shapes, [fmt.format.dtype, torch.float32, torch.float32]):
            owner.register_parameter(tensor, nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False))

    def canonical(self, owner: nn.Module, index: int | torch.Tensor | None = None) -> Canonical:
        tensors = [getattr(owner, n) if index is None else getattr(owner, n)[index] for n in self.names]
        return tensors[0], tensors[1], tensors[2] if len(tensors) > 2 else None

    def column_slices(self, cols: slice) -> dict[str, slice]:
        """Each tensor's columns for input features `cols` (payload bytes, scale groups)."""
        cpe, group = self.fmt.format.codes_per_element, self.fmt.group_size
        return {n: slice(cols.start // cpe, cols.stop // cpe) if i == 0 else
                slice(None) if self.fmt.per_channel else slice(cols.start // group, cols.stop // group)
                for i, n in enumerate(self.names)}

    def kernel(self, owner: nn.Module, dtype: torch.dtype, index: int | None = None,
               amax_reduce: AmaxReduce | None = None) -> Kernel:
        return make_kernel(self.fmt.kind, *self.canonical(owner, index), dtype, amax_reduce)


def hold(module: nn.Module, kernels: list[Kernel], drop: Sequence[str] = ()) -> None:
    """Keep the kernels' tensors as buffers (resident bytes count them), in place of any held before, and drop
    the canonical tensors."""
    for name in drop:
        del module._parameters[name]
    for name in [n for n in module._buffers if n.startswith("kernel_")]:
        del module._buffers[name]
    for i, tensor in enumerate(t for kernel in kernels for t in kernel.tensors()):
        module.register_buffer(f"kernel_{i}", tensor, persistent=False)


def run_kernel(kernel: Kernel, kernel_dtype: torch.dtype, x: torch.Tensor) -> torch.Tensor:
    """`kernel` over the last dimension of `x` (any leading shape): its input in the dtype it takes, its output
    back in x's."""
    out = kernel(x.reshape(-1, x.shape[-1]).to(input_dtype(kernel, kernel_dtype, x.dtype))).to(x.dtype)
    return out.reshape(*x.shape[:-1], out.shape[-1])


class QuantizedLinear(nn.Module):
    """A (column- or row-parallel) linear whose weight is quantized; a bias stays in float."""

    def __init__(self, fmt: WeightFormat, linear: nn.Linear, par: ParallelContext, name: str = "a linear") -> None:
        super().__init__()
        self.par = par
        self.row_parallel = isinstance(linear, RowParallelLinear)
        self.reduce = self.row_parallel and linear.reduce
        self.out_features, self.in_features = linear.out_features, linear.in_features
        self.quant = QuantizedTensors(self, fmt, "weight", (), self.out_features, self.in_features)
        rows, cols = slice(None), {n: slice(None) for n in self.quant.names}
        if isinstance(linear, ColumnParallelLinear):
            rows = slice(par.tp_rank * self.out_features, (par.tp_rank + 1) * self.out_features)
        elif isinstance(linear, RowParallelLinear):
            fmt.check_shard(f"{name} (row-parallel, tp={par.dims.tp})", self.in_features)
            cols = self.quant.column_slices(slice(par.tp_rank * self.in_features, (par.tp_rank + 1) * self.in_features))
        for name in self.quant.names:
            set_weight_loader(self, name, lambda read, col=cols[name]: read((rows, col)))
        self.bias = linear.bias
        bias_loader = linear.__dict__.get("weight_loaders", {}).get("bias")
        if bias_loader is not None:
            set_weight_loader(self, "bias", bias_loader)
        self._kernel: Kernel | None = None

    def prepare(self, dtype: torch.dtype, keep_canonical: bool = False) -> None:
        # A row-parallel rank sees part of each token's inputs; dynamic activation scales are taken over all of them.
        amax = self.par.all_reduce_tp_max if self.row_parallel and self.par.dims.tp > 1 else None
        self._kernel = self.quant.kernel(self, dtype, amax_reduce=amax)
        self.kernel_dtype = dtype
        hold(self, [self._kernel], [] if keep_canonical else self.quant.names)

    @property
    def kernel(self) -> Kernel:
        assert self._kernel is not None, "prepare_kernels was not run after loading"
        return self._kernel

    def compute_with(self, kernel: Kernel) -> None:
        """Compute with `kernel` from now on (its part of a stacked kernel, which holds the weights)."""
        self._kernel = kernel
        hold(self, [kernel])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = run_kernel(self.kernel, self.kernel_dtype, x)
        if self.reduce:
            out = self.par.all_reduce_tp(out)
        return out + self.bias if self.bias is not None else out


class QuantizedHead(QuantizedLinear):
    """A quantized LM head whose most likely logits are exact.

    With 16-bit kernel activations the kernel's output is 16-bit too: a logit of 20 is then known to ±0.06,
    enough to swap two near-tied tokens (with a8_mm's int8 activations, to about as much). The `REFINED`
    largest logits of each row are recomputed in float32 from their rows of the quantized table (a few rows,
    against the whole table the kernel reads), so greedy choices and the top log-probabilities are those of the
    quantized weights; the others keep the kernel's rounding, which moves the softmax normalizer by far less."""

    REFINED = 16

    def prepare(self, dtype: torch.dtype, keep_canonical: bool = False) -> None:
        super().prepare(dtype, keep_canonical=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        if self.kernel_dtype == x.dtype or x.dim() != 2 or not x.shape[0]:
            return logits
        ids_NR = logits.topk(min(self.REFINED, logits.shape[-1]), dim=-1).indices
        rows_NRK = dequantize(self.quant.fmt.kind, *self.quant.canonical(self, ids_NR))
        return logits.scatter(-1, ids_NR, (rows_NRK @ x[:, :, None].float()).squeeze(-1).to(logits.dtype))


class QuantizedEmbedding(nn.Module):
    """Rows of a quantized table, dequantized as they are looked up (the table stays quantized)."""

    def __init__(self, fmt: WeightFormat) -> None:
        super().__init__()
        self.quant = QuantizedTensors(self, fmt, "weight", (), fmt.out_features, fmt.in_features)
        self.dtype = torch.float32

    def forward(self, ids_T: torch.Tensor) -> torch.Tensor:
        return dequantize(self.quant.fmt.kind, *self.quant.canonical(self, ids_T)).to(self.dtype)


class QuantizedExperts(nn.Module):
    """The routed experts of one MoE layer with quantized weights, one pair of kernels per expert.

    Stored out-major like a linear's weight (gate_up [E, 2I, H], down [E, H, I]), not like the float
    fused tensors ([E, H, 2I], [E, I, H]), because each expert is computed as two linears."""

    def __init__(self, gate_up: WeightFormat, down: WeightFormat, expert_ids: list[int], hidden_size: int,
                 intermediate_size: int, width: slice, par: ParallelContext | None = None) -> None:
        super().__init__()
        self.par = par or ParallelContext.single()
        local = width.stop - width.start
        down.check_shard(f"the experts' down_proj (tp={self.par.dims.tp})", local)
        self.gate_up = QuantizedTensors(self, gate_up, "gate_up_proj", (len(expert_ids),), 2 * local, hidden_size)
        self.down = QuantizedTensors(self, down, "down_proj", (len(expert_ids),), hidden_size, local)
        up = slice(intermediate_size + width.start, intermediate_size + width.stop)
        for name in self.gate_up.names:  # this rank's rows of the gate half, then of the up half
            set_weight_loader(self, name, lambda read: torch.stack(
                [torch.cat((read((e, width)), read((e, up)))) for e in expert_ids]))
        for name, cols in self.down.column_slices(width).items():
            set_weight_loader(self, name, lambda read, cols=cols: torch.stack(
                [read((e, slice(None), cols)) for e in expert_ids]))
        self.num_local = len(expert_ids)
        self._kernels: list[tuple[Kernel, Kernel]] = []
        self.kernel_dtype = torch.float32

    def prepare(self, dtype: torch.dtype) -> None:
        # Each TP rank holds a slice of every expert's width: down_proj is row-parallel within the expert (every
        # rank of the TP group runs the same experts on the same rows, so their amax reductions pair up).
        amax = self.par.all_reduce_tp_max if self.par.dims.tp > 1 else None
        self.kernel_dtype = dtype
        self._kernels = [(self.gate_up.kernel(self, dtype, e), self.down.kernel(self, dtype, e, amax_reduce=amax))
                         for e in range(self.num_local)]
        hold(self, [k for pair in self._kernels for k in pair], self.gate_up.names + self.down.names)

    def forward(self, x_PH: torch.Tensor, counts_E: list[int]) -> torch.Tensor:
        """Rows of `x_PH` are sorted by expert; `counts_E[e]` rows belong to local expert e."""
        out_PH = torch.empty_like(x_PH)
        start = 0
        for (gate_up, down), count in zip(self._kernels, counts_E):
            if count:
                x_CH = x_PH[start:start + count]
                gate_CI, up_CI = gate_up(x_CH.to(input_dtype(gate_up, self.kernel_dtype, x_CH.dtype))).chunk(2, dim=-1)
                h_CI = F.silu(gate_CI) * up_CI
                out_PH[start:start + count] = down(h_CI.to(input_dtype(down, self.kernel_dtype, h_CI.dtype)))
                start += count
        return out_PH


# -- adoption -------------------------------------------------------------------------------------------


def adopt_quantized(model: CausalLM, source: Names) -> bool:
    """Swap every layer whose weight `source` holds quantized for its quantized counterpart (on the meta
    model, before any memory is allocated); True when any was."""
    available = set(source.names())
    swapped = False
    for name, module in list(model.named_modules()):
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        if isinstance(module, nn.Linear) and name != "lm_head":
            fmt = find_format(source, f"{name}.weight", available)
            if fmt is not None:
                setattr(owner, attr, QuantizedLinear(fmt, module, model.par, f"{name}.weight"))
                swapped = True
        elif isinstance(module, Experts):
            gate_up = find_format(source, f"{name}.gate_up_proj", available)
            down = find_format(source, f"{name}.down_proj", available)
            if (gate_up is None) != (down is None):
                raise ModelLoadError(f"{name}: the checkpoint quantizes only one of gate_up_proj and down_proj; "
                                     "Garrison needs both experts' weights quantized, or neither")
            if gate_up is not None and down is not None:
                setattr(owner, attr, local_experts(owner, gate_up, down))
                swapped = True
    return _adopt_head(model, source, available) or swapped


def local_experts(moe: nn.Module, gate_up: WeightFormat, down: WeightFormat) -> QuantizedExperts:
    """The quantized experts this rank holds in `moe`: every expert, whole, in the single-device MoE; a
    ParallelMoE's placement and TP width otherwise (it keeps the formats to rebuild them on a new placement)."""
    moe.expert_formats = (gate_up, down)
    intermediate = down.in_features
    ids = getattr(moe, "local_expert_ids", None)
    ids = list(range(moe.num_experts)) if ids is None else ids
    width = getattr(moe, "width", slice(0, intermediate))
    return QuantizedExperts(gate_up, down, ids, gate_up.in_features, intermediate, width, getattr(moe, "par", None))


def _adopt_head(model: CausalLM, source: Names, available: set[str]) -> bool:
    """The embedding and LM head, quantized when the checkpoint stores them so (a GGUF file does; tied, they
    share the one quantized table, loaded once under the embedding's name)."""
    embed = find_format(source, "model.embed_tokens.weight", available)
    tied = model.config.tie_word_embeddings
    head = embed if tied else find_format(source, "lm_head.weight", available)
    if embed is not None:
        model.model.embed_tokens = QuantizedEmbedding(embed)
    if head is not None:
        lm_head = QuantizedHead(head, model.lm_head, ParallelContext.single(), "lm_head.weight")
        if tied:
            for name in lm_head.quant.names:
                setattr(lm_head, name, getattr(model.model.embed_tokens, name))
        model.lm_head = lm_head
    return embed is not None or head is not None


def tie_head(model: CausalLM) -> None:
    """Point the LM head at the embedding's table again (to_empty gives a shared parameter two tensors)."""
    embed, head = model.model.embed_tokens, model.lm_head
    if isinstance(head, QuantizedLinear):
        for name in head.quant.names:
            setattr(head, name, getattr(embed, name))
    else:
        head.weight = embed.weight


def cast_floats(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the float parameters to the compute dtype, leaving quantized payloads and their float32 scales as
    stored (an FP8 payload is a float tensor too, which Module.to(dtype) would widen)."""
    quantized = {id(getattr(m, n)) for m in model.modules() if isinstance(getattr(m, "quant", None), QuantizedTensors)
                 for n in m.quant.names}
    quantized |= {id(getattr(m, n)) for m in model.modules() if isinstance(m, QuantizedExperts)
                  for n in m.gate_up.names + m.down.names}
    for param in model.parameters():
        if id(param) not in quantized and param.is_floating_point():
            param.data = param.data.to(dtype)


def prepare_kernels(model: nn.Module, dtype: torch.dtype, model_dtype: torch.dtype | None = None) -> None:
    """Turn every quantized layer's loaded canonical tensors into its kernel's layout, computing with `dtype`
    activations; a quantized embedding gives rows in `model_dtype` (default `dtype`)."""
    tied = {id(p) for m in model.modules() if isinstance(m, QuantizedEmbedding) for p in m.parameters(recurse=False)}
    for module in model.modules():
        if isinstance(module, QuantizedEmbedding):
            module.dtype = model_dtype or dtype
        elif isinstance(module, QuantizedLinear):
            module.prepare(dtype, keep_canonical=any(id(p) in tied for p in module.parameters(recurse=False)))
        elif isinstance(module, QuantizedExperts):
            module.prepare(dtype)
