"""Helpers for tests/test_shm.py: deterministic blobs, a fake clock, and child-process roles.

Run as a script, it plays one role in a real separate process (the tests start it with
``subprocess`` so a ``kill -9`` hits a real publisher)::

    python tests/shm_helpers.py writer PREFIX COUNT MAX_SIZE      # COUNT 0 = until killed
    python tests/shm_helpers.py reader PREFIX MAX_SIZE UNTIL_GEN STOP_FILE
    python tests/shm_helpers.py holder PREFIX
    python tests/shm_helpers.py fsize_start PREFIX

Every role reports with lines on stdout (``ready``/``started N``, then one JSON line).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import resource
import selectors
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # when run as a script from a child process
    sys.path.insert(0, _ROOT)

from flatbuffers_schema import shm_layout as L  # noqa: E402
from root_worker.featuremap.shm_reader import ShmReader  # noqa: E402
from trimmer_daemon.publisher import Publisher, PublishError  # noqa: E402

T = TypeVar("T")
_BLOB_HEADER = struct.Struct("<QQ")  # generation, size


class FakeClock:
    """A settable clock (seconds) for injecting into Publisher / ShmReader."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def blob_size(generation: int, max_size: int) -> int:
    return _BLOB_HEADER.size + (generation * 2654435761) % max_size


def make_blob(generation: int, max_size: int = 4096) -> bytes:
    """A blob whose size and every byte are derived from its generation."""
    size = blob_size(generation, max_size)
    seed = hashlib.blake2b(generation.to_bytes(8, "little"), digest_size=64).digest()
    body_len = size - _BLOB_HEADER.size
    body = seed * (body_len // len(seed) + 1)
    return _BLOB_HEADER.pack(generation, size) + body[:body_len]


def check_blob(buffer: memoryview | bytes, generation: int, max_size: int) -> str | None:
    """``None`` if ``buffer`` is exactly generation's blob, else what is wrong."""
    if len(buffer) < _BLOB_HEADER.size:
        return f"gen {generation}: blob of {len(buffer)} bytes is too short"
    gen_in_blob, size = _BLOB_HEADER.unpack_from(buffer, 0)
    if gen_in_blob != generation:
        return f"gen {generation}: blob says generation {gen_in_blob}"
    if bytes(buffer) != make_blob(generation, max_size):
        return f"gen {generation}: content differs (size {len(buffer)}, header size {size})"
    return None


shm_names = L.segment_files


def control_problem(ctl: L.Buffer, prefix: str) -> str | None:
    """``None`` if the control is in a state a reader may meet: the active word is 0 or
    RETIRED, or names a slot holding exactly that generation (valid crc) whose blob segment
    is complete (its size and crc are the slot's). Else what is wrong (the write order of
    shm_layout broken: blob, then slot, then -- last -- the active word)."""
    word = L.read_active(ctl)
    if word in (L.NONE_PUBLISHED, L.RETIRED):
        return None
    offset = L.slot_offset(word)
    record = L.decode_slot(bytes(ctl[offset:offset + L.SLOT_SIZE]))
    if record is None:
        return f"active word {word} names a slot with a bad crc"
    if record.generation != word:
        return f"active word {word} names the slot of generation {record.generation}"
    try:
        with open(os.path.join(L.SHM_DIR, f"{prefix}.g{word}"), "rb") as f:
            blob = f.read()
    except FileNotFoundError:
        return f"active word {word} names a generation with no blob segment"
    if len(blob) != record.blob_size or L.checksum(blob) != record.blob_checksum:
        return f"generation {word}: the blob is not the one its slot describes"
    return None


def stable_mismatch(ctl: L.Buffer) -> str | None:
    """One lock-free read as a worker makes it (word, slot copy, word): a description if the
    word did not move and the slot is whole but of another generation -- a state only a
    publisher that writes the active word before the slot can leave -- else ``None``."""
    first = L.read_active(ctl)
    if first in (L.NONE_PUBLISHED, L.RETIRED):
        return None
    offset = L.slot_offset(first)
    raw = bytes(ctl[offset:offset + L.SLOT_SIZE])
    record = L.decode_slot(raw)
    if L.read_active(ctl) == first and record is not None and record.generation != first:
        return f"active word {first} named the slot of generation {record.generation}"
    return None


class ObservedControl(mmap.mmap):
    """A control mapping that calls ``hook(key)`` after every write into it: put in place
    of a real Publisher's own mapping (same fd, same shared pages), it lets a test look at
    the segment between one write of a publication and the next."""

    hook: Callable[[object], None]

    def __setitem__(self, key: object, value: object) -> None:
        super().__setitem__(key, value)  # type: ignore[index]
        self.hook(key)


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """A stand-in for a full /dev/shm in this process: writes past ``limit`` bytes of any
    file fail with ``EFBIG`` (``RLIMIT_FSIZE``, ``SIGXFSZ`` ignored) until the block ends,
    then the limit and the signal's disposition are restored."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


# -- driving child processes from the tests ---------------------------------------------


def spawn(*args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def reap(*procs: subprocess.Popen[str] | None) -> None:
    """SIGKILL what still runs, wait for it and close its pipes (no ResourceWarning)."""
    for proc in procs:
        if proc is None:
            continue
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


def read_line(proc: subprocess.Popen[str], timeout: float = 30.0) -> str:
    """Next stdout line of ``proc``, waiting at most ``timeout`` seconds (never forever)."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise TimeoutError(f"no output from pid {proc.pid} within {timeout}s")
    line = proc.stdout.readline()
    if not line:
        raise EOFError(f"pid {proc.pid} exited (rc={proc.wait(timeout)}) without output")
    return line.strip()


def wait_until(predicate: Callable[[], T], timeout: float = 30.0, what: str = "condition") -> T:
    """Re-check ``predicate`` until truthy; fail after ``timeout`` seconds (a deadline, not
    a sleep: the short pause only keeps this loop from starving the processes it watches)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.0005)
    raise TimeoutError(f"{what} not reached within {timeout}s")


# -- roles ------------------------------------------------------------------------------


def _writer(prefix: str, count: int, max_size: int) -> int:
    publisher = Publisher(prefix, grace_s=0.0)
    print(f"started {publisher.generation}", flush=True)
    published = 0
    while count == 0 or published < count:
        generation = publisher.generation + 1
        got = publisher.publish(make_blob(generation, max_size))
        if got != generation:
            print(json.dumps({"error": f"published {got}, expected {generation}"}), flush=True)
            return 3
        published += 1
    publisher.close()
    print(json.dumps({"last": publisher.generation, "published": published}), flush=True)
    return 0


class OrderWatch:
    """The raw write-order check a stress reader makes beside its own polls: maps
    ``prefix``'s control once it exists, then each :meth:`step` is one
    :func:`stable_mismatch` read, counted in ``violations`` when it finds one."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.ctl: mmap.mmap | None = None
        self.violations = 0

    def step(self) -> str | None:
        if self.ctl is None:
            self.ctl = map_control(self.prefix)
            return None
        problem = stable_mismatch(self.ctl)
        if problem:
            self.violations += 1
        return problem


def _reader(prefix: str, max_size: int, until_gen: int, stop_file: str) -> int:
    reader = ShmReader(prefix)
    reader.poll()
    print("ready", flush=True)
    seen: list[int] = []
    violations: list[str] = []
    polls = 0
    order = OrderWatch(prefix)  # never a whole slot of another generation
    deadline = time.monotonic() + 120.0
    while time.monotonic() < deadline:
        problem = order.step()
        if problem:
            violations.append(problem)
        snapshot = reader.poll()
        polls += 1
        if snapshot is not None and (not seen or snapshot.generation != seen[-1]):
            if seen and snapshot.generation < seen[-1]:
                violations.append(f"generation went back {seen[-1]} -> {snapshot.generation}")
            problem = check_blob(snapshot.buffer, snapshot.generation, max_size)
            if problem:
                violations.append(problem)
            seen.append(snapshot.generation)
        if until_gen and seen and seen[-1] >= until_gen:
            break
        if polls % 256 == 0 and stop_file != "-" and os.path.exists(stop_file):
            break
    stats = reader.stats
    print(
        json.dumps(
            {
                "polls": polls,
                "distinct": len(set(seen)),
                "last": seen[-1] if seen else 0,
                "violations": violations[:10],
                "n_violations": len(violations),
                "order_violations": order.violations,
                "verify_failures": stats.verify_failures,
                "attach_errors": stats.attach_errors,
                "inconsistent_reads": stats.inconsistent_reads,
                "attaches": stats.attaches,
                "last_error": stats.last_error,
            }
        ),
        flush=True,
    )
    return 0


def map_control(prefix: str) -> mmap.mmap | None:
    """A read-only mapping of ``prefix``'s control segment, or ``None`` if none is there."""
    try:
        fd = os.open(os.path.join(L.SHM_DIR, prefix + ".ctl"), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        if os.fstat(fd).st_size < L.CTL_SIZE:
            return None
        return mmap.mmap(fd, L.CTL_SIZE, prot=mmap.PROT_READ)
    finally:
        os.close(fd)


def _holder(prefix: str) -> int:
    publisher = Publisher(prefix)
    publisher.publish(make_blob(1))
    print("ready", flush=True)
    sys.stdin.read()  # hold the lock until killed or stdin closes
    publisher.close()
    return 0


def _fsize_start(prefix: str) -> int:
    """Start a publisher while its control segment cannot be written (a full /dev/shm),
    then make room and publish."""
    with file_size_limit(1024):
        publisher = Publisher(prefix)  # must not raise
        result: dict[str, object] = {"first_error": publisher.control_problem}
        try:
            publisher.publish(b"x" * 100)
        except PublishError as exc:
            result["publish_error"] = str(exc)
        result["problem_while_full"] = bool(publisher.control_problem)
    result["generation"] = publisher.publish(make_blob(1))
    result["problem_after"] = publisher.control_problem
    publisher.close()
    print(json.dumps(result), flush=True)
    return 0


def main(argv: list[str]) -> int:
    role, prefix, *rest = argv
    if role == "writer":
        return _writer(prefix, int(rest[0]), int(rest[1]))
    if role == "reader":
        return _reader(prefix, int(rest[0]), int(rest[1]), rest[2])
    if role == "holder":
        return _holder(prefix)
    if role == "fsize_start":
        return _fsize_start(prefix)
    raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
