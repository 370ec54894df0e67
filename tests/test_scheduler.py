"""The block manager and the scheduler on their own: reference counts, prefix sharing and LRU eviction;
continuous batching, chunked prefill under a token budget, preemption and finishing."""

import pytest

from nanoseek.serve.kv_cache import BlockManager, CacheFull
from nanoseek.serve.output import TextOutput
from nanoseek.serve.sampling import SamplingParams
from nanoseek.serve.scheduler import Scheduler
from nanoseek.serve.sequence import Sequence, Status


def seq(name: str, tokens: list[int], max_tokens: int = 4) -> Sequence:
    return Sequence(name, list(tokens), SamplingParams(max_tokens=max_tokens), TextOutput(None, []))


def test_blocks_are_reference_counted_shared_by_prefix_and_evicted_oldest_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = bm.allocate(), bm.allocate()
    first = bm.register_full(a, None, [1, 2])
    bm.register_full(b, first, [3, 4])
    blocks, last, loaded = bm.match_prefix([1, 2, 3, 4, 5])
    assert blocks == [a, b] and last != first and loaded == 0 and bm.ref[a] == bm.ref[b] == 2
    assert bm.match_prefix([1, 2, 9, 9])[0] == [a] and bm.ref[a] == 3  # only the common head
    bm.release([a])
    bm.release([a, b])
    bm.release([a, b])
    assert bm.num_free == 4 and bm.match_prefix([1, 2])[0] == [a]  # freed but still cached, found again
    bm.release([a])
    # Eviction takes the least recently freed block first; a's hash goes with it when it is reused.
    taken = [bm.allocate() for _ in range(4)]
    assert sorted(taken) == [0, 1, 2, 3] and bm.match_prefix([1, 2])[0] == []
    with pytest.raises(CacheFull):
        bm.allocate()


def test_namespaces_never_share_blocks():
    bm = BlockManager(num_blocks=2, block_size=2)
    bm.register_full(bm.allocate(), b"key-a", [1, 2])
    assert bm.match_prefix([1, 2], b"key-b")[0] == []
    assert len(bm.match_prefix([1, 2], b"key-a")[0]) == 1


def test_prefill_is_chunked_under_the_token_budget_while_others_decode():
    scheduler = Scheduler(BlockManager(num_blocks=32, block_size=4), max_batched_tokens=8, max_seqs=4)
    short, long = seq("short", [1, 2, 3]), seq("long", list(range(10, 30)))
    scheduler.add(short)
    scheduler.add(long)
    first = scheduler.schedule()
    assert [(r.seq.id, r.num_new) for r in first] == [("short", 3), ("long", 5)]  # budget 8: long gets the rest
    short.num_computed, long.num_computed = 3, 5
    short.token_ids.append(7)  # short decodes one token while long's prompt goes on in chunks
    second = scheduler.schedule()
    assert [(r.seq.id, r.num_new) for r in second] == [("short", 1), ("long", 7)]
    assert short.status is Status.RUNNING and len(scheduler.running) == 2


def test_a_full_cache_preempts_the_latest_admitted_and_requeues_it_first():
    scheduler = Scheduler(BlockManager(num_blocks=4, block_size=2), max_batched_tokens=64, max_seqs=4)
    old, new = seq("old", [1, 2, 3]), seq("new", [4, 5, 6])
    scheduler.add(old)
    scheduler.add(new)
    scheduler.schedule()  # both admitted: 2 blocks each, the cache is full
    old.num_computed, new.num_computed = 3, 3
    old.token_ids += [8, 9]  # old now needs a third block
    batch = scheduler.schedule()
    assert [r.seq.id for r in batch] == ["old"] and scheduler.preemptions == 1
    assert new.status is Status.WAITING and new.blocks == [] and new.num_computed == 0
    assert scheduler.waiting[0] is new


def test_a_request_that_can_never_fit_is_an_error_not_a_hang():
    scheduler = Scheduler(BlockManager(num_blocks=2, block_size=2), max_batched_tokens=64)
    scheduler.add(seq("huge", list(range(10))))
    with pytest.raises(CacheFull, match="huge"):
        scheduler.schedule()


def test_finishing_frees_the_blocks_and_leaves_the_queues():
    bm = BlockManager(num_blocks=8, block_size=2)
    scheduler = Scheduler(bm, max_batched_tokens=64)
    running, waiting = seq("running", [1, 2, 3]), seq("waiting", [4])
    scheduler.add(running)
    scheduler.schedule()
    scheduler.add(waiting)
    scheduler.finish(running, "stop")
    scheduler.finish(waiting, "cancelled")
    assert bm.num_free == 8 and not scheduler.has_work()
    assert (running.finish_reason, waiting.finish_reason) == ("stop", "cancelled")
