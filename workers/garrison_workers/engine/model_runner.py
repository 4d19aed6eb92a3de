"""Turns a scheduled batch into tensors, runs the model over the paged KV cache, returns logits.

The only part of the engine that builds tensors. Token rows are laid out decode rows first, then each
prefill chunk contiguously (see `garrison_workers.attention`).
"""

from __future__ import annotations

import torch

from garrison_workers.attention import AttentionMetadata, PrefillSegment, causal_masks
from garrison_workers.config import ModelConfig
from garrison_workers.engine.sequence import Sequence
from garrison_workers.model import CausalLM


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        self.model, self.config = model, model.config
        self.block_size, self.device = block_size, torch.device(device)
        shape = (num_blocks * block_size, self.config.num_kv_heads, self.config.head_dim)
        # Zero-filled so that padded gathers read finite values (0 * garbage could be NaN).
        self.kv_caches = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                          for _ in range(self.config.num_layers)]

    @staticmethod
    def kv_block_bytes(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        return config.kv_bytes_per_token(torch.finfo(dtype).bits // 8) * block_size

    @torch.inference_mode()
    def run(self, work: list[tuple[Sequence, int]]) -> tuple[list[Sequence], torch.Tensor]:
        """Compute the scheduled tokens; return the sequences that reached their end and their logits `[N, V]`."""
        decode = [seq for seq, count in work if count == 1]
        prefill = [(seq, count) for seq, count in work if count != 1]
        ordered = [(seq, 1) for seq in decode] + prefill
        input_ids, positions, slots, sample_rows, sampled = [], [], [], [], []
        row = 0
        for seq, count in ordered:
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start:start + count])
            positions.append(torch.arange(start, start + count))
            slots.append(self._slots(seq, start, start + count))
            row += count
            if start + count == seq.num_tokens:
                sample_rows.append(row - 1)
                sampled.append(seq)
        meta = AttentionMetadata(
            positions_T=torch.cat(positions), slot_mapping_T=torch.cat(slots), num_decode=len(decode),
            decode_slots_BL=None, decode_mask_global_B11L=None, decode_mask_chunked_B11L=None,
            prefills=self._prefill_segments(prefill, len(decode)))
        if decode:
            self._decode_metadata(decode, meta)
        hidden_TH = self.model(torch.tensor(input_ids, device=self.device), self._to_device(meta), self.kv_caches)
        return sampled, self.model.compute_logits(hidden_TH[sample_rows])

    def _slots(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        positions = torch.arange(start, end)
        table = torch.tensor(seq.block_table[start // self.block_size:(end - 1) // self.block_size + 1])
        return table[(positions // self.block_size) - start // self.block_size] * self.block_size + positions % self.block_size

    def _prefill_segments(self, prefill: list[tuple[Sequence, int]], first_row: int) -> list[PrefillSegment]:
        segments, row = [], first_row
        for seq, count in prefill:
            context = seq.num_computed_tokens + count
            positions = torch.arange(seq.num_computed_tokens, context)
            global_mask, key_start, chunked_mask = causal_masks(positions, context, self.config.attention_chunk_size)
            segments.append(PrefillSegment(row, count, self._slots(seq, 0, context), global_mask, key_start, chunked_mask))
            row += count
        return segments

    def _decode_metadata(self, decode: list[Sequence], meta: AttentionMetadata) -> None:
        lengths = torch.tensor([seq.num_computed_tokens + 1 for seq in decode])
        max_len = int(lengths.max())
        slots_BL = torch.zeros(len(decode), max_len, dtype=torch.long)
        for b, seq in enumerate(decode):
            slots_BL[b, :lengths[b]] = self._slots(seq, 0, int(lengths[b]))
        keys_L = torch.arange(max_len)
        valid = keys_L[None, :] < lengths[:, None]
        meta.decode_slots_BL = slots_BL
        meta.decode_mask_global_B11L = valid[:, None, None, :]
        chunk = self.config.attention_chunk_size
        if chunk is not None:
            window_start = (lengths - 1) // chunk * chunk
            meta.decode_mask_chunked_B11L = (valid & (keys_L[None, :] >= window_start[:, None]))[:, None, None, :]

    def _to_device(self, meta: AttentionMetadata) -> AttentionMetadata:
        if self.device.type == "cpu":
            return meta
        move = lambda t: None if t is None else t.to(self.device, non_blocking=True)  # noqa: E731
        return AttentionMetadata(
            move(meta.positions_T), move(meta.slot_mapping_T), meta.num_decode, move(meta.decode_slots_BL),
            move(meta.decode_mask_global_B11L), move(meta.decode_mask_chunked_B11L),
            [PrefillSegment(s.query_start, s.query_len, move(s.slots_L), move(s.mask_global_QL), s.chunked_key_start,
                            move(s.mask_chunked_QL)) for s in meta.prefills])
