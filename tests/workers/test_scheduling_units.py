"""Block manager, scheduler and sampler on their own: sequences and block ids, no model."""

from __future__ import annotations

import math

import pytest
import torch

from garrison_workers.engine.block_manager import BlockManager
from garrison_workers.engine.sampler import TokenDraw, sample
from garrison_workers.engine.scheduler import Scheduler
from garrison_workers.engine.sequence import SamplingParams, Sequence


def seq(request_id: str, tokens: list[int], salt: bytes = b"", **params) -> Sequence:
    return Sequence(request_id, list(tokens), len(tokens), SamplingParams(**params), salt)


def compute(manager: BlockManager, s: Sequence, upto: int) -> None:
    assert manager.ensure_slots(s, upto)
    s.num_computed_tokens = upto
    manager.publish_full_blocks(s)


def test_ref_counts_and_prefix_reuse() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    a = seq("a", list(range(10)))
    manager.reuse_cached_prefix(a)
    compute(manager, a, 10)
    assert len(a.block_table) == 3 and manager.num_free_blocks == 5
    b = seq("b", list(range(10)) + [99])
    manager.reuse_cached_prefix(b)
    assert b.num_computed_tokens == 8 and b.block_table == a.block_table[:2]
    manager.free(a)
    assert manager.num_free_blocks == 6  # the two shared blocks are still held by b
    manager.free(b)
    assert manager.num_free_blocks == 8


def test_last_prompt_token_is_always_recomputed() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    a = seq("a", list(range(8)))
    compute(manager, a, 8)
    b = seq("b", list(range(8)))
    manager.reuse_cached_prefix(b)
    assert b.num_computed_tokens == 4


def test_salt_isolates_prefix_cache() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    compute(manager, seq("a", list(range(9)), salt=b"tenant-a"), 9)
    b = seq("b", list(range(9)), salt=b"tenant-b")
    manager.reuse_cached_prefix(b)
    assert b.num_computed_tokens == 0


def test_freed_blocks_stay_reusable_until_handed_out() -> None:
    manager = BlockManager(num_blocks=4, block_size=4)
    a = seq("a", list(range(9)))
    compute(manager, a, 9)
    manager.free(a)
    again = seq("again", list(range(9)))
    manager.reuse_cached_prefix(again)
    assert again.num_computed_tokens == 8
    manager.free(again)
    hog = seq("hog", list(range(100, 116)))
    assert manager.ensure_slots(hog, 16)  # takes every block, evicting the cached prefix
    manager.free(hog)
    late = seq("late", list(range(9)))
    manager.reuse_cached_prefix(late)
    assert late.num_computed_tokens == 0


def test_scheduler_chunks_prompts_under_the_budget_and_decodes_first() -> None:
    scheduler = Scheduler(BlockManager(num_blocks=64, block_size=4), max_num_seqs=8, max_num_batched_tokens=10)
    decoding = seq("decoding", [1, 2, 3])
    scheduler.add(decoding)
    batch = scheduler.schedule()
    assert batch.work == [(decoding, 3)]
    decoding.num_computed_tokens = 3
    decoding.token_ids.append(7)
    long = seq("long", list(range(25)))
    scheduler.add(long)
    budgets = []
    for _ in range(3):
        batch = scheduler.schedule()
        assert batch.work[0] == (decoding, 1)  # the stream keeps flowing while the long prompt advances
        budgets.append(batch.work[1][1])
        long.num_computed_tokens += batch.work[1][1]
        decoding.num_computed_tokens += 1
        decoding.token_ids.append(7)
    assert budgets == [9, 9, 7]


def test_a_long_prompt_leaves_room_for_a_short_one_that_arrives() -> None:
    scheduler = Scheduler(BlockManager(num_blocks=64, block_size=4), max_num_seqs=8, max_num_batched_tokens=16)
    long = seq("long", list(range(100)))
    scheduler.add(long)
    batch = scheduler.schedule()
    assert batch.work == [(long, 16)]  # alone, it takes the whole budget
    long.num_computed_tokens += 16
    short = seq("short", list(range(5)))
    scheduler.add(short)
    batch = scheduler.schedule()
    assert batch.work == [(long, 11), (short, 5)]  # the short prompt starts at once, whole
    long.num_computed_tokens += 11
    short.num_computed_tokens += 5
    short.token_ids.append(9)
    huge = seq("huge", list(range(200)))
    scheduler.add(huge)
    batch = scheduler.schedule()
    # One token for the decoding stream; the waiting huge prompt is owed at most half the budget.
    assert batch.work == [(long, 8), (short, 1), (huge, 7)]


def test_scheduler_preempts_newest_when_blocks_run_out() -> None:
    scheduler = Scheduler(BlockManager(num_blocks=4, block_size=4), max_num_seqs=8, max_num_batched_tokens=64)
    old, new = seq("old", list(range(8))), seq("new", list(range(50, 58)))
    scheduler.add(old)
    scheduler.add(new)
    batch = scheduler.schedule()
    assert [s.request_id for s, _ in batch.work] == ["old", "new"]
    for s in (old, new):
        s.num_computed_tokens = 8
        s.token_ids.append(1)
    batch = scheduler.schedule()  # each needs a third block; only one can have it
    assert [s.request_id for s, _ in batch.work] == ["old"]
    assert batch.preempted == [new] and new.block_table == [] and scheduler.waiting[0] is new


def test_sampler_greedy_topk_topp_seed_and_logprobs() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    [greedy] = sample(logits, [TokenDraw(logprobs=True)])
    assert greedy.token_id == 0 and abs(greedy.logprob - torch.log(torch.tensor(0.5)).item()) < 1e-6
    top_k = {sample(logits, [TokenDraw(temperature=1.0, top_k=2, seed=s)])[0].token_id for s in range(200)}
    assert top_k == {0, 1}
    top_p = {sample(logits, [TokenDraw(temperature=1.0, top_p=0.7, seed=s)])[0].token_id for s in range(200)}
    assert top_p == {0, 1}  # 0.5 alone is short of 0.7; 0.5 + 0.3 reaches it
    assert len({sample(logits, [TokenDraw(temperature=1.0, seed=42)])[0].token_id for _ in range(5)}) == 1
    # Each draw of a sequence has a seed of its own: the index moves the draw, the seed fixes it.
    assert len({sample(logits, [TokenDraw(temperature=1.0, seed=42, index=i)])[0].token_id for i in range(50)}) > 1


EXTREMES = [0.0, 1e-45, 1.17549435e-38, 1e-30, 1e-6, 1.0, 100.0]


@pytest.mark.parametrize("temperature", EXTREMES)
@pytest.mark.parametrize("top_p", [1.4e-45, 1e-30, 0.5, 1.0])
@pytest.mark.parametrize("top_k", [0, 1, 3, 2**31 - 1])
def test_every_sampling_value_the_api_accepts_gives_a_token(temperature: float, top_p: float, top_k: int) -> None:
    """Logits as a model gives them (one large, some tied, a huge spread): never NaN, never an error."""
    logits = torch.tensor([[30.0, 30.0, -50.0, 1e4, -1e4, 0.0, 3.5]])
    for seed in (0, 2**63 - 1, 2**64 - 1):
        [token] = sample(logits, [TokenDraw(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, logprobs=True)])
        assert token.error is None and 0 <= token.token_id < logits.shape[1]
        if temperature < 1e-6 or top_p < 0.5 or top_k == 1:  # the distribution collapses onto the largest logit
            assert token.token_id == 3
        assert math.isfinite(token.logprob)


def test_a_row_without_finite_logits_fails_alone() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [float("nan"), 1.0, 2.0], [-math.inf] * 3, [1.0, math.inf, 0.0],
                           [math.inf, -math.inf, math.inf], [math.inf, float("nan"), 0.0]])
    tokens = sample(logits, [TokenDraw(), TokenDraw(temperature=0.7), TokenDraw(), TokenDraw(temperature=0.7, seed=3),
                             TokenDraw(), TokenDraw()])
    assert [t.error is None for t in tokens] == [True, False, False, True, False, False]
    assert tokens[0].token_id == 2 and tokens[3].token_id == 1  # +inf (an overflow) still wins
