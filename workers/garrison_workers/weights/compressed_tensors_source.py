"""Checkpoints quantized by compressed-tensors (llm-compressor's format; Llama 4 Maverick's official FP8), read
as canonical quantized tensors (`garrison_workers.quant`).

Which modules are quantized, and how, is the checkpoint's own `quantization_config`: each config group's
`targets` (a class name such as `Linear`, or `re:` a regex over module names) minus its `ignore` list;
nothing about a model's layers is hard-coded here. Supported schemes, refused otherwise by name:

- weights float 8-bit (e4m3), per channel or per tensor (`float-quantized`); input activations none
  (weight-only) or float 8-bit dynamic per token (W8A8, computed as such: `quant.kernels`);
- weights int 4-bit, per group or per channel, symmetric or with zero points (`pack-quantized`);
- weights int 8-bit, per group or per channel, symmetric (`naive-quantized` / `int-quantized`).

Experts are stored per expert (`...experts.<e>.gate_proj.*`, as transformers and vLLM write Llama 4 for
quantization); they are served fused, as `experts.gate_up_proj_<kind>` [E, 2I, H] and `experts.down_proj_<kind>`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from garrison_workers.errors import ModelLoadError
from garrison_workers.quant.codec import from_packed_int32, zero_points_from_packed
from garrison_workers.weights.safetensors_source import SafetensorsSource

Shape = tuple[int, ...]
_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)$")
_FORMATS = ("float-quantized", "pack-quantized", "naive-quantized", "int-quantized", "mixed-precision")


@dataclass(slots=True, frozen=True)
class Scheme:
    """One config group's scheme, as Garrison computes it."""

    kind: str  # int4, int8, fp8, fp8_dynamic
    strategy: str  # channel, tensor, group
    group_size: int | None
    symmetric: bool


@dataclass(slots=True, frozen=True)
class QuantizationConfig:
    groups: tuple[tuple[tuple[str, ...], Scheme], ...]  # (targets, scheme)
    ignore: tuple[str, ...]

    def scheme_of(self, module: str, names: Iterable[str]) -> Scheme | None:
        """The scheme of a linear module (known by any of `names`), or None when it stays in float."""
        names = list(names)
        if any(_matches(target, name) for target in self.ignore for name in names):
            return None
        for targets, scheme in self.groups:
            if any(target == "Linear" or _matches(target, name) for target in targets for name in names):
                return scheme
        return None


def _matches(target: str, name: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name


def parse_quantization_config(raw: Any, where: str) -> QuantizationConfig:
    """The checkpoint's `quantization_config`, every value checked; unknown methods and schemes refused."""
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{where}: quantization_config must be a JSON object")
    method = raw.get("quant_method")
    if method != "compressed-tensors":
        raise ModelLoadError(f"{where}: quantization method {str(method)[:60]!r} is not supported; Garrison reads "
                             "'compressed-tensors' checkpoints (FP8, INT4, INT8) and GGUF files (Q4_0, Q4_1, Q8_0)")
    fmt = raw.get("format")
    if fmt not in _FORMATS:
        raise ModelLoadError(f"{where}: compressed-tensors format {str(fmt)[:60]!r} is not supported; choose one of "
                             f"{', '.join(_FORMATS)}")
    groups = raw.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ModelLoadError(f"{where}: quantization_config.config_groups must be a non-empty object")
    ignore = raw.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
        raise ModelLoadError(f"{where}: quantization_config.ignore must be a list of module names or 're:' patterns")
    parsed = []
    for name, group in groups.items():
        targets = group.get("targets") if isinstance(group, dict) else None
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise ModelLoadError(f"{where}: config group {name!r} must list its targets")
        parsed.append((tuple(targets), _scheme(group, f"{where}: config group {name!r}")))
    return QuantizationConfig(tuple(parsed), tuple(ignore))


def _scheme(group: dict, where: str) -> Scheme:
    weights, inputs = group.get("weights"), group.get("input_activations")
    if not isinstance(weights, dict):
        raise ModelLoadError(f"{where} has no weights scheme")
    kind_bits = (weights.get("type"), weights.get("num_bits"))
    strategy, group_size = weights.get("strategy"), weights.get("group_size")
    symmetric = weights.get("symmetric", True) is not False
    known = {("float", 8): "fp8", ("int", 4): "int4", ("int", 8): "int8"}
    if kind_bits not in known:
        raise ModelLoadError(f"{where}: weights of type {kind_bits[0]!r} with {kind_bits[1]} bits are not supported; "
                             "Garrison reads float 8-bit, int 4-bit and int 8-bit weights")
    kind = known[kind_bits]
    strategies = ("channel", "tensor") if kind == "fp8" else ("channel", "group")
    if strategy not in strategies:
        raise ModelLoadError(f"{where}: {kind} weights with strategy {strategy!r} are not supported; use "
                             f"{' or '.join(strategies)}")
    if strategy == "group" and (not isinstance(group_size, int) or group_size < 1):
        raise ModelLoadError(f"{where}: group strategy needs a positive group_size, not {group_size!r}")
    if not symmetric and kind != "int4":
        raise ModelLoadError(f"{where}: asymmetric {kind} weights are not supported (int4 only)")
    if weights.get("dynamic", False) is not False or weights.get("actorder") not in (None, "static", False):
        raise ModelLoadError(f"{where}: dynamic or activation-ordered weight quantization is not supported")
    if inputs is not None:
        if kind != "fp8" or (inputs.get("type"), inputs.get("num_bits"), inputs.get("strategy"),
                             inputs.get("dynamic")) != ("float", 8, "token", True):
            raise ModelLoadError(f"{where}: input activations {_short(inputs)} are not supported; Garrison quantizes "
                                 "activations only for FP8 weights, dynamically per token")
        kind = "fp8_dynamic"
    if group.get("output_activations") is not None:
        raise ModelLoadError(f"{where}: output activation quantization is not supported")
    return Scheme(kind, strategy, group_size if strategy == "group" else None, symmetric)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."


class CompressedTensorsSource:
    """A SafetensorsSource of a compressed-tensors checkpoint, under Garrison's canonical quantized names."""

    def __init__(self, inner: SafetensorsSource, config: QuantizationConfig) -> None:
        self.inner = inner
        available = set(inner.names())
        self._parts: dict[str, tuple[Any, ...]] = {}  # our name -> how to build it
        self._shapes: dict[str, tuple[int, ...]] = {}
        modules = {n.rsplit(".", 1)[0] for n in available if n.endswith((".weight", ".weight_packed"))}
        experts: dict[str, dict[str, list[int]]] = {}
        quantized: list[str] = []
        for module in sorted(modules):
            match = _EXPERT.match(module)
            if match:
                experts.setdefault(match.group(1), {}).setdefault(match.group(3), []).append(int(match.group(2)))
                continue
            scheme = config.scheme_of(module, self._module_names(module))
            if scheme is not None and self._stored_quantized(module):
                self._linear(module, scheme)
                quantized.append(f"{module}.weight")
        for prefix, projections in experts.items():
            self._experts(prefix, projections, config)
        # Everything else (norms, biases, float linears and fused experts) as stored; a quantized module's
        # weight_* tensors (payload, scales, zero points, its shape) live on only in their canonical form.
        for name in available:
            module = name.rsplit(".", 1)[0]
            if not name.startswith(tuple(quantized)) and not _EXPERT.match(module):
                self._parts[name] = ("raw", name)
                self._shapes[name] = inner.shape(name)

    # -- the names -------------------------------------------------------------------------------------

    def _module_names(self, module: str) -> list[str]:
        """A module's name as Garrison calls it and as the checkpoint does (before prefix renames)."""
        stored = self.inner.where(f"{module}.weight" if f"{module}.weight" in self.inner._location
                                  else f"{module}.weight_packed")
        names = [module]
        if "(stored as " in stored:
            names.append(stored.rsplit("(stored as ", 1)[1].rstrip(")").rsplit(".", 1)[0])
        return names

    def _stored_quantized(self, module: str) -> bool:
        """Whether the writer quantized a targeted module: a writer leaves in float what it cannot compress
        (transformers' Llama 4 router is a Linear subclass that compressed-tensors does not match as `Linear`)."""
        return any(f"{module}.{t}" in self.inner._location for t in ("weight_packed", "weight_scale"))

    def _linear(self, module: str, scheme: Scheme) -> None:
        payload, scale, zero = self._shapes_of(module, scheme)
        names = self._canonical_names(module + ".weight", scheme, zero is not None)
        for name, shape, part in zip(names, (payload, scale, zero), ("payload", "scale", "zero")):
            self._parts[name] = ("quantized", module, scheme, part)
            self._shapes[name] = shape

    @staticmethod
    def _canonical_names(weight: str, scheme: Scheme, has_zero: bool) -> list[str]:
        return [f"{weight}_{scheme.kind}", f"{weight}_scale"] + ([f"{weight}_zero"] if has_zero else [])

    def _shapes_of(self, module: str, scheme: Scheme) -> tuple[Shape, Shape, Shape | None]:
        """Canonical (payload, scale, zero) shapes of a module, its stored tensors checked against its scheme."""
        if scheme.kind == "int4":
            if f"{module}.weight_packed" not in self.inner._location:
                raise ModelLoadError(f"{module}: the checkpoint's int4 scheme needs {module}.weight_packed, which is "
                                     "missing; is the checkpoint complete?")
            rows, cols = self.inner.shape(f"{module}.weight_packed")
            out_features, in_features = rows, cols * 8
        else:
            if f"{module}.weight" not in self.inner._location:
                raise ModelLoadError(f"{module}: {module}.weight is missing from the checkpoint")
            out_features, in_features = self.inner.shape(f"{module}.weight")
        scale_name = f"{module}.weight_scale"
        if scale_name not in self.inner._location:
            raise ModelLoadError(f"{module}: quantized weight without {scale_name} in {self.inner.directory}")
        stored = tuple(self.inner.shape(scale_name))
        groups = in_features // scheme.group_size if scheme.group_size else 1
        expected = [(out_features, groups)] + ([(), (1,), (1, 1)] if scheme.strategy == "tensor" else [])
        if stored not in expected or (scheme.group_size and in_features % scheme.group_size):
            raise ModelLoadError(
                f"{self.inner.where(scale_name)}: scales of shape {stored} do not match the {scheme.kind} weight "
                f"[{out_features}, {in_features}] under strategy {scheme.strategy!r}"
                + (f" with groups of {scheme.group_size}" if scheme.group_size else "")
                + f": expected {expected[0]}; the checkpoint is corrupt or its config does not describe it")
        scale = (out_features, groups)
        zero = scale if scheme.kind == "int4" and not scheme.symmetric else None
        payload = (out_features, in_features // 2 if scheme.kind == "int4" else in_features)
        return payload, scale, zero

    def _experts(self, prefix: str, projections: dict[str, list[int]], config: QuantizationConfig) -> None:
        ids = sorted(projections.get("down_proj", []))
        if ids != list(range(len(ids))) or any(sorted(projections.get(p, [])) != ids for p in ("gate_proj", "up_proj")):
            raise ModelLoadError(f"{prefix}: per-expert weights must cover experts 0..E-1 for gate, up and down")
        schemes = {p: config.scheme_of(f"{prefix}.0.{p}", self._module_names(f"{prefix}.0.{p}"))
                   if self._stored_quantized(f"{prefix}.0.{p}") else None
                   for p in ("gate_proj", "up_proj", "down_proj")}
        if schemes["gate_proj"] != schemes["up_proj"]:
            raise ModelLoadError(f"{prefix}: gate_proj and up_proj of the experts are quantized differently")
        for fused, parts in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
            scheme = schemes[parts[0]]
            if scheme is None:  # float experts, served fused [E, in, out] like a transformers checkpoint
                rows, cols = self.inner.shape(f"{prefix}.0.{parts[0]}.weight")
                self._parts[f"{prefix}.{fused}"] = ("expert_float", prefix, parts)
                self._shapes[f"{prefix}.{fused}"] = (len(ids), cols, rows * len(parts))
                continue
            shapes = [self._shapes_of(f"{prefix}.{e}.{p}", scheme) for e in ids for p in parts]
            if len(set(shapes)) != 1:
                raise ModelLoadError(f"{prefix}.{fused}: the experts' quantized shapes differ")
            payload, scale, zero = shapes[0]
            names = self._canonical_names(f"{prefix}.{fused}", scheme, zero is not None)
            for name, shape, part in zip(names, (payload, scale, zero), ("payload", "scale", "zero")):
                assert shape is not None
                self._parts[name] = ("expert", prefix, parts, scheme, part)
                self._shapes[name] = (len(ids), shape[0] * len(parts), shape[1])

    # -- WeightSource --------------------------------------------------------------------------------

    def names(self) -> Iterable[str]:
        return self._parts.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def where(self, name: str) -> str:
        part = self._parts[name]
        if part[0] == "raw":
            return self.inner.where(name)
        return f"{self.inner.directory} (compressed-tensors, {part[1]})"

    def read(self, name: str, index: Any = None) -> torch.Tensor:
        part = self._parts[name]
        if part[0] == "raw":
            return self.inner.read(name, index)
        if part[0] == "quantized":
            tensor = self._canonical(part[1], part[2], part[3])
        elif isinstance(index, tuple) and index and isinstance(index[0], int):  # one expert: read only its tensors
            return self._expert(part, index[0])[index[1:]]
        else:
            tensor = torch.stack([self._expert(part, e) for e in range(self._shapes[name][0])])
        return tensor if index is None else tensor[index]

    def _expert(self, part: tuple[Any, ...], e: int) -> torch.Tensor:
        if part[0] == "expert_float":
            return torch.cat([self.inner.read(f"{part[1]}.{e}.{p}.weight").t() for p in part[2]], dim=-1)
        _, prefix, projections, scheme, which = part
        return torch.cat([self._canonical(f"{prefix}.{e}.{p}", scheme, which) for p in projections])

    def _canonical(self, module: str, scheme: Scheme, which: str) -> torch.Tensor:
        payload_shape, scale_shape, _ = self._shapes_of(module, scheme)
        scale = self.inner.read(f"{module}.weight_scale").float().reshape(-1, scale_shape[1])
        scale = scale.expand(scale_shape).contiguous()  # a per-tensor scale, per channel
        if which == "scale":
            return scale
        if which == "zero":
            zero_points = zero_points_from_packed(self.inner.read(f"{module}.weight_zero_point"), scale_shape[0])
            return -zero_points.float() * scale
        if scheme.kind == "int4":
            return from_packed_int32(self.inner.read(f"{module}.weight_packed"))
        weight = self.inner.read(f"{module}.weight")
        expected = torch.float8_e4m3fn if scheme.kind.startswith("fp8") else torch.int8
        if weight.dtype != expected or tuple(weight.shape) != payload_shape:
            raise ModelLoadError(f"{self.inner.where(f'{module}.weight')}: a {scheme.kind} weight must be {expected} "
                                 f"{payload_shape}, not {weight.dtype} {tuple(weight.shape)}")
        return weight
