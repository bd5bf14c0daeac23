"""Unit tests of the root worker's :class:`BufferPool` (root_worker/service/buffers.py):
size classes, reuse, the byte cap over handed-out *and* kept buffers, the half-cap bound on
what is kept, ``shrink`` (real ``munmap``: the kept mappings are closed), and the counters
the metrics read (``in_use``, ``kept``, ``refused``, ``peak``). Real anonymous mappings."""

from __future__ import annotations

import mmap
import random

import pytest
from daemon_helpers import run_threads

from root_worker.service.buffers import MIN_BUFFER, BufferPool

M = MIN_BUFFER


@pytest.mark.parametrize("n, size", [(0, M), (1, M), (M - 1, M), (M, M), (M + 1, 2 * M),
                                     (3 * M, 4 * M), (1 << 20, 1 << 20),
                                     ((1 << 20) + 1, 2 << 20)])
def test_size_classes_are_powers_of_two_of_at_least_min_buffer(n: int, size: int) -> None:
    assert BufferPool.size_class(n) == size
    pool = BufferPool(8 << 20)
    assert (pool.cap, pool.in_use, pool.kept, pool.refused, pool.peak) == (8 << 20, 0, 0, 0, 0)
    buf = pool.take(n)
    assert isinstance(buf, mmap.mmap) and len(buf) == size
    buf[size - 1] = 7  # writable to its last byte
    assert pool.in_use == size and pool.peak == size
    pool.give(buf)
    assert pool.in_use == 0 and pool.kept == size


def test_a_given_buffer_is_reused_for_its_size_class_only() -> None:
    pool = BufferPool(16 * M)
    a = pool.take(M)
    pool.give(a)
    b = pool.take(2 * M)  # another class: a new mapping, the kept one stays
    assert b is not a and pool.kept == M and pool.in_use == 2 * M
    c = pool.take(10)
    assert c is a and pool.kept == 0 and pool.in_use == 3 * M
    assert pool.peak == 3 * M and pool.refused == 0


def test_the_cap_refuses_what_would_pass_it_and_counts_the_refusal() -> None:
    pool = BufferPool(4 * M)
    held = [pool.take(M) for _ in range(4)]
    assert all(b is not None for b in held) and pool.in_use == 4 * M
    assert pool.take(1) is None and pool.refused == 1
    assert pool.take(5 * M) is None and pool.refused == 2
    assert pool.in_use == 4 * M and pool.peak == 4 * M
    pool.give(held.pop())  # room again: the kept buffer is handed out
    again = pool.take(M)
    assert again is not None and pool.in_use == 4 * M and pool.refused == 2
    assert BufferPool(4 * M).take(4 * M + 1) is None  # larger than the whole cap


def test_kept_buffers_count_against_the_cap_and_are_unmapped_to_make_room() -> None:
    pool = BufferPool(4 * M)
    small = pool.take(M)
    assert small is not None
    pool.give(small)
    assert pool.kept == M
    big = pool.take(4 * M)  # 0 in use + M kept + 4M > cap: the kept ones go first
    assert big is not None and len(big) == 4 * M
    assert pool.kept == 0 and pool.in_use == 4 * M and small.closed
    assert pool.refused == 0


def test_kept_buffers_stay_while_everything_fits_exactly_under_the_cap() -> None:
    pool = BufferPool(3 * M)
    a = pool.take(M)
    assert a is not None
    pool.give(a)
    b = pool.take(2 * M)  # 2M in use + M kept == the cap: nothing to unmap
    assert b is not None and pool.kept == M and not a.closed
    assert pool.take(10) is a  # and the kept one is still reused


def test_at_most_half_the_cap_is_kept_and_the_rest_is_unmapped() -> None:
    pool = BufferPool(8 * M)
    bufs = [pool.take(M) for _ in range(8)]
    for b in bufs:
        assert b is not None
        pool.give(b)
    assert pool.in_use == 0 and pool.kept == 4 * M
    assert [b.closed for b in bufs] == [False] * 4 + [True] * 4


def test_shrink_unmaps_every_kept_buffer() -> None:
    pool = BufferPool(16 * M)
    bufs = [pool.take(n) for n in (M, M, 2 * M)]
    for b in bufs:
        assert b is not None
        pool.give(b)
    assert pool.kept == 4 * M
    pool.shrink()
    assert pool.kept == 0 and all(b.closed for b in bufs)
    fresh = pool.take(M)
    assert fresh is not None and all(fresh is not b for b in bufs)


def test_a_buffer_still_exported_survives_being_given_and_shrunk() -> None:
    pool = BufferPool(4 * M)
    buf = pool.take(M)
    assert buf is not None
    buf[:5] = b"hello"
    view = memoryview(buf)  # e.g. a reply still being sent from it
    pool.give(buf)
    pool.shrink()  # close() raises BufferError while exported: no crash, no leak of count
    assert pool.kept == 0 and pool.in_use == 0
    assert bytes(view[:5]) == b"hello"
    view.release()


def test_random_take_and_give_keep_the_counts_exact_and_under_the_cap() -> None:
    rng = random.Random(21)
    cap = 32 * M
    pool = BufferPool(cap)
    out: list[mmap.mmap] = []
    refusals = 0
    for _ in range(2000):
        if out and rng.random() < 0.45:
            pool.give(out.pop(rng.randrange(len(out))))
        elif rng.random() < 0.02:
            pool.shrink()
            assert pool.kept == 0
        else:
            n = rng.choice([1, M, 2 * M + 3, 5 * M, 9 * M, 40 * M])
            buf = pool.take(n)
            if buf is None:
                refusals += 1
                assert pool.in_use + BufferPool.size_class(n) > cap
            else:
                assert len(buf) == BufferPool.size_class(n)
                out.append(buf)
        assert pool.in_use == sum(len(b) for b in out)
        assert 0 <= pool.kept <= cap // 2 and pool.in_use + pool.kept <= cap
        assert pool.peak >= pool.in_use
    assert pool.refused == refusals > 0


def test_threads_sharing_a_pool_never_lose_a_byte() -> None:
    pool = BufferPool(64 * M)
    taken: list[int] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(500):
            buf = pool.take(rng.choice([M, 2 * M, 3 * M]))
            assert buf is not None  # 4 threads x 4M at most: never near the cap
            taken.append(len(buf))
            pool.give(buf)

    run_threads(work, 4, 60)
    assert len(taken) == 2000 and pool.refused == 0
    assert pool.in_use == 0 and 0 < pool.kept <= 32 * M


# -- request bodies: a mapping taken uncharged, counted as its bytes arrive (charge) ------


def test_a_body_taken_uncharged_is_counted_only_as_it_is_charged() -> None:
    """The request path takes a body's mapping with ``charge=0`` and counts its bytes with
    ``charge`` as they arrive, then gives back what was counted: a client that announces
    a large body holds nothing until it sends it. Fails if ``take`` ignores ``charge``,
    ``charge`` miscounts ``in_use``/``peak`` or its answer, or ``give`` ignores
    ``charged``."""
    pool = BufferPool(8 * M)
    body = pool.take(4 * M, charge=0)
    assert body is not None and len(body) == 4 * M
    assert (pool.in_use, pool.peak, pool.refused) == (0, 0, 0)  # mapped, not counted
    assert pool.charge(M) is True
    assert (pool.in_use, pool.peak) == (M, M)
    assert pool.charge(2 * M) is True
    assert (pool.in_use, pool.peak) == (3 * M, 3 * M)
    other = pool.take(M)  # a whole buffer meanwhile: counted at once
    assert other is not None and (pool.in_use, pool.peak) == (4 * M, 4 * M)
    pool.give(other)
    assert (pool.in_use, pool.kept, pool.peak) == (3 * M, M, 4 * M)
    assert pool.charge(M // 2) is True  # below the peak: the peak stays
    assert (pool.in_use, pool.peak) == (3 * M + M // 2, 4 * M)
    pool.give(body, charged=3 * M + M // 2)  # what was counted, not its size
    assert (pool.in_use, pool.kept, pool.refused) == (0, M, 0)
    assert body.closed  # M kept + 4M would pass half the cap: unmapped


def test_charging_past_the_cap_is_refused_counted_and_changes_nothing() -> None:
    """A body whose next bytes would pass the cap: ``charge`` answers False (the worker
    answers 503), counts the refusal, counts no byte; charging exactly up to the cap is
    allowed. Fails on an off-by-one in the cap check, on a refusal that is not counted (or
    counted wrong), or on a refused charge that still adds to ``in_use``."""
    pool = BufferPool(4 * M)
    body = pool.take(4 * M, charge=0)
    assert body is not None
    assert pool.charge(3 * M) is True
    assert pool.charge(M + 1) is False
    assert (pool.in_use, pool.peak, pool.refused) == (3 * M, 3 * M, 1)
    assert pool.charge(2 * M) is False
    assert (pool.in_use, pool.refused) == (3 * M, 2)
    assert pool.charge(M) is True  # exactly the cap
    assert (pool.in_use, pool.peak, pool.refused) == (4 * M, 4 * M, 2)
    assert pool.charge(1) is False and pool.refused == 3
    pool.give(body, charged=4 * M)
    assert pool.in_use == 0


def test_charging_unmaps_kept_buffers_when_they_and_the_body_would_pass_the_cap() -> None:
    """Kept buffers count against the cap: a charge that would take handed-out plus kept
    bytes past it unmaps the kept ones first (and succeeds), one that fits exactly leaves
    them kept. Fails if the check ignores the kept bytes or is off by one."""
    pool = BufferPool(4 * M)
    spare = [pool.take(M), pool.take(M)]
    for buf in spare:
        assert buf is not None
        pool.give(buf)
    assert pool.kept == 2 * M
    body = pool.take(2 * M, charge=0)
    assert body is not None and pool.kept == 2 * M  # nothing counted yet: all kept
    assert pool.charge(2 * M) is True  # 2M in use + 2M kept == the cap: they stay
    assert pool.kept == 2 * M and not any(b.closed for b in spare)
    assert pool.charge(M // 2) is True  # would pass the cap with the kept ones: unmapped
    assert pool.kept == 0 and all(b.closed for b in spare)
    assert (pool.in_use, pool.refused) == (2 * M + M // 2, 0)
    pool.give(body, charged=2 * M + M // 2)
    assert pool.in_use == 0


def test_a_buffer_given_back_without_reuse_is_unmapped_not_kept() -> None:
    """``give(reuse=False)`` (a buffer someone may still read, e.g. a reply being sent) is
    never handed out again: it is unmapped, not kept, though there is room to keep it."""
    pool = BufferPool(8 * M)
    buf = pool.take(M)
    assert buf is not None
    pool.give(buf, reuse=False)
    assert (pool.in_use, pool.kept) == (0, 0) and buf.closed
    again = pool.take(M)
    assert again is not None and again is not buf
