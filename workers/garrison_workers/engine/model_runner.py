"""Turns a scheduled batch into tensors, runs the model over the paged KV cache, samples the next tokens.

The only part of the engine that builds tensors. Token rows are laid out decode rows first, then each
prefill chunk contiguously (see `garrison_workers.attention`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from garrison_workers.attention import AttentionMetadata, PrefillSegment, causal_masks
from garrison_workers.compiled import DecodeGraph
from garrison_workers.config import ModelConfig
from garrison_workers.engine.config import EngineConfig
from garrison_workers.engine.sampler import SampledToken, TokenDraw, sample
from garrison_workers.kv_transfer import KVPayload
from garrison_workers.model import CausalLM


@dataclass(slots=True)
class SeqChunk:
    """One sequence's share of a step: all a rank needs to compute it (plain data, cheap to ship)."""

    token_ids: list[int]  # the tokens computed in this step
    start: int  # position of token_ids[0]; positions before it are already in the cache
    block_table: list[int]
    draw: TokenDraw | None  # set when the chunk ends at the sequence's last known token: sample from it
    # Overlapped steps (LLMEngine's async scheduling): the chunk's one token is the one the ranks sampled for the
    # previous step's draw number `follows`, not yet known to the engine when it sent this step (the worker fills
    # it in).
    follows: int | None = None

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)

    @property
    def needs_logits(self) -> bool:
        return self.draw is not None


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, engine_config: EngineConfig) -> None:
        self.model, self.config = model, model.config
        self.key_block = engine_config.attention_key_block
        self.block_size, self.device = engine_config.block_size, torch.device(engine_config.device)
        self.kv_device = torch.device(engine_config.kv_device)
        dtype, device = engine_config.dtype, self.kv_device
        pin = device.type == "cpu" and self.device.type == "cuda"  # host memory the GPU copies from directly
        # One slot past the blocks pads the decode batch's gathers. No sequence ever writes it, so it stays zero: a
        # masked key then adds an exact 0, where 0 * (a NaN one sequence's bad numerics left in a block) is NaN and
        # would spread to every row padded with it.
        self.pad_slot = num_blocks * self.block_size
        shape = (self.pad_slot + 1, model.num_local_kv_heads, self.config.head_dim)

        def zeros() -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin)

        self.kv_caches = [(zeros(), zeros()) for _ in range(self.config.num_layers)]
        self.decode_graph = DecodeGraph.of(model) if engine_config.compile_decode else None
        if self.decode_graph is not None:
            self.decode_graph.warm_up(self._warm_up)

    @staticmethod
    def kv_block_bytes(config: ModelConfig, block_size: int, dtype: torch.dtype, tp: int = 1) -> int:
        """Bytes one block takes on one rank (each TP rank holds num_kv_heads / tp heads)."""
        return config.kv_bytes_per_token(torch.finfo(dtype).bits // 8) * block_size // tp

    def step(self, chunks: list[SeqChunk]) -> list[SampledToken]:
        """Compute every chunk's tokens into the cache and sample a token for each chunk with a draw, in order."""
        logits_NV = self.run(chunks)
        assert logits_NV is not None
        return sample(logits_NV, [chunk.draw for chunk in chunks if chunk.draw is not None])

    @torch.inference_mode()
    def run(self, chunks: list[SeqChunk], want_logits: bool = True) -> torch.Tensor | None:
        """Compute every chunk's tokens into the cache; logits `[N, V]` of the chunks that need them, in order."""
        # Decode rows first. A one-token row over a context longer than a key block is attended like a prefill
        # chunk (blockwise on global layers): in the padded decode batch, every short row would be padded to its
        # length, so one long prompt decoding would make the whole batch's step as slow as the longest row.
        padded = [len(chunk.token_ids) == 1 and chunk.end <= self.key_block for chunk in chunks]
        order = sorted(range(len(chunks)), key=lambda i: not padded[i])
        decode = [chunks[i] for i in order if padded[i]]
        prefill = [chunks[i] for i in order if not padded[i]]
        input_ids, sample_rows = [], []
        for i in order:
            input_ids.extend(chunks[i].token_ids)
            if chunks[i].needs_logits:
                sample_rows.append((i, len(input_ids) - 1))
        # A decode row's position and slot are two integers: built in Python, one tensor for all the rows (a
        # tensor op per row cost more than the tiny models' whole layers).
        bs = self.block_size
        positions = [torch.tensor([chunk.start for chunk in decode], dtype=torch.long)]
        slots = [torch.tensor([chunk.block_table[chunk.start // bs] * bs + chunk.start % bs for chunk in decode],
                              dtype=torch.long)]
        for chunk in prefill:
            positions.append(torch.arange(chunk.start, chunk.end))
            slots.append(self._slots(chunk.block_table, chunk.start, chunk.end))
        meta = AttentionMetadata(
            positions_T=torch.cat(positions), slot_mapping_T=torch.cat(slots), num_decode=len(decode),
            decode_slots_BL=None, decode_mask_global_B11L=None, decode_mask_chunked_B11W=None,
            decode_chunked_slots_BW=None,
            prefills=self._prefill_segments(prefill, len(decode)))
        if decode:
            self._decode_metadata(decode, meta)
        forward = self.decode_graph if self.decode_graph is not None and not prefill else self.model
        hidden_TH = forward(torch.tensor(input_ids, device=self.device), self._to_device(meta), self.kv_caches)
        if not want_logits:
            return None
        rows = [row for _, row in sorted(sample_rows)]  # back in the caller's chunk order
        return self.model.compute_logits(hidden_TH[rows])

    def _warm_up(self, rows: int) -> None:
        """A decode step of `rows` rows over contexts of a few keys, within one key block (so the rows are the padded
        batch's) and more than one key (a one-key context would be a size of its own to the compiler). It writes into
        blocks 0 and 1, free now; a sequence given them later writes every slot before it reads it, as after any
        sequence that held them."""
        bs = self.block_size
        table = [0, min(1, self.pad_slot // bs - 1)]
        start = max(1, min(bs, self.key_block - 2))
        self.run([SeqChunk([0], start + row, table, None) for row in range(rows)], want_logits=False)

    @torch.inference_mode()
    def export_kv(self, block_table: list[int], num_tokens: int, head_start: int, checksum: bool,
                  device: str | torch.device = "cpu") -> KVPayload:
        """This rank's K and V of every layer for tokens 0..num_tokens-1 of a sequence, copied out to `device`."""
        slots = self._slots(block_table, 0, num_tokens).to(self.kv_device)
        k = torch.stack([k_cache.index_select(0, slots) for k_cache, _ in self.kv_caches]).to(device)
        v = torch.stack([v_cache.index_select(0, slots) for _, v_cache in self.kv_caches]).to(device)
        payload = KVPayload(num_tokens, head_start, k, v)
        payload.checksum = payload.digest() if checksum else None
        return payload

    @torch.inference_mode()
    def import_kv(self, block_table: list[int], k_LTKD: torch.Tensor, v_LTKD: torch.Tensor, start: int = 0) -> None:
        """Write K and V (this rank's heads) of a sequence's tokens from `start` on into its blocks."""
        slots = self._slots(block_table, start, start + k_LTKD.shape[1]).to(self.kv_device)
        for (k_cache, v_cache), k_TKD, v_TKD in zip(self.kv_caches, k_LTKD, v_LTKD):
            k_cache.index_copy_(0, slots, k_TKD.to(self.kv_device, k_cache.dtype))
            v_cache.index_copy_(0, slots, v_TKD.to(self.kv_device, v_cache.dtype))

    def _slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        positions = torch.arange(start, end)
        first = start // self.block_size
        table = torch.tensor(block_table[first:(end - 1) // self.block_size + 1])
        return table[positions // self.block_size - first] * self.block_size + positions % self.block_size

    def _prefill_segments(self, prefill: list[SeqChunk], first_row: int) -> list[PrefillSegment]:
        segments, row = [], first_row
        for chunk in prefill:
            positions = torch.arange(chunk.start, chunk.end)
            global_mask, key_start, chunked_mask = causal_masks(
                positions, chunk.end, self.config.attention_chunk_size, self.key_block)
            segments.append(PrefillSegment(row, len(chunk.token_ids), self._slots(chunk.block_table, 0, chunk.end),
                                           positions, global_mask, key_start, chunked_mask, self.key_block))
            row += len(chunk.token_ids)
        return segments

    def _decode_metadata(self, decode: list[SeqChunk], meta: AttentionMetadata) -> None:
        lengths = [chunk.end for chunk in decode]
        meta.decode_slots_BL, meta.decode_mask_global_B11L = self._padded_keys(decode, [0] * len(decode), lengths)
        chunk_size = self.config.attention_chunk_size
        if chunk_size is not None:  # chunked layers read only each row's window, however long the context
            starts = [(n - 1) // chunk_size * chunk_size for n in lengths]
            meta.decode_chunked_slots_BW, meta.decode_mask_chunked_B11W = self._padded_keys(decode, starts, lengths)

    def _padded_keys(self, decode: list[SeqChunk], starts: list[int], ends: list[int]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather index of keys [start, end) per row, padded (with the pad slot) to the longest, and its mask."""
        bs = self.block_size
        tables = [chunk.block_table[:(end - 1) // bs + 1] for chunk, end in zip(decode, ends)]
        width = max(len(table) for table in tables)
        tables_BK = torch.tensor([table + [0] * (width - len(table)) for table in tables], dtype=torch.long)
        starts_B, sizes_B = torch.tensor(starts), torch.tensor([e - s for s, e in zip(starts, ends)])
        offsets_L = torch.arange(int(sizes_B.max()))
        valid_BL = offsets_L[None, :] < sizes_B[:, None]
        positions_BL = torch.where(valid_BL, starts_B[:, None] + offsets_L[None, :], 0)
        slots_BL = tables_BK.gather(1, positions_BL // bs) * bs + positions_BL % bs
        return slots_BL.masked_fill_(~valid_BL, self.pad_slot), valid_BL[:, None, None, :]

    def _to_device(self, meta: AttentionMetadata) -> AttentionMetadata:
        """Cache slots go where the cache is (they index it), positions and masks where the model computes."""
        if self.device.type == "cpu" and self.kv_device.type == "cpu":
            return meta
        move = lambda t: None if t is None else t.to(self.device, non_blocking=True)  # noqa: E731
        slots = lambda t: None if t is None else t.to(self.kv_device, non_blocking=True)  # noqa: E731
        return AttentionMetadata(
            move(meta.positions_T), slots(meta.slot_mapping_T), meta.num_decode, slots(meta.decode_slots_BL),
            move(meta.decode_mask_global_B11L), move(meta.decode_mask_chunked_B11W),
            slots(meta.decode_chunked_slots_BW),
            [PrefillSegment(s.query_start, s.query_len, slots(s.slots_L), move(s.positions_Q), move(s.mask_global_QL),
                            s.chunked_key_start, move(s.mask_chunked_QL), s.key_block) for s in meta.prefills])
