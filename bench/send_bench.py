"""What the kernel charges a root to receive one request and send its fan-out on loopback:
the floor under "root CPU per request, trim / off" (issue #9, item 6).

    python bench/send_bench.py [--rounds 15] [--requests 40]    (make bench-send; ~30 s)

One process plays the root's socket work only, no HTTP and no Python per part: it receives
the e2e bench's frame (2000 features, 64 candidates, 2.8 MB; a distinct frame per request,
cycled from --frames) with ``recv_into`` into a reused buffer in wake-ups of the worker's
BODY_RCVLOWAT (``receive_plain``: without, for comparison), then sends it to three
kept-alive loopback connections, one per model of the example bundles (ads_ctr, ads_cvr,
homefeed_rank), in one of three ways:

    off        the untrimmed frame, one contiguous buffer per ``sendmsg``
    trim_sg    the trimmed frame as Trimmer.trim_parts' scatter-gather parts (what the pool
               sends): the header, views of the kept runs of the receive buffer, the metadata
    trim_copy  Trimmer.trim into a reused buffer, then one contiguous ``sendmsg``

Forked peers feed and drain the sockets. CPU is this process's utime + stime per request
(receive + trims + three sends), so on loopback it includes the receive-side TCP processing
the kernel does in the sender's context. Modes are interleaved round by round; figures are
medians with [min..max] over rounds.

The ratios printed are the floor of trim / off for any root on this machine: a root adds its
own per-request work (HTTP, parsing, the leaves' answers) to both modes, which only moves
the ratio towards 1. Writes bench/results/send_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import statistics
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minimal_root import send_all  # noqa: E402  (bench/: the yardstick root's blocking send)
from report import RESULTS_DIR, write_results  # noqa: E402

from flatbuffers_schema.keys import Allowlist  # noqa: E402
from root_worker.frame import Trimmer  # noqa: E402
from root_worker.service.worker import BODY_RCVLOWAT  # noqa: E402
from root_worker.testing.workload import load_universe, make_frame  # noqa: E402

RESULTS = RESULTS_DIR / "send_bench.json"
EXAMPLES = ROOT / "examples"
MODELS = (("ads", "ads_ctr"), ("ads", "ads_cvr"), ("homefeed", "homefeed_rank"))
DRAIN_CHUNK = 1 << 20
PEER_TIMEOUT_S = 60.0  # every wait of the bench and its peers is bounded


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def allowlists() -> list[Allowlist]:
    out = []
    for bundle, model in MODELS:
        doc = json.loads((EXAMPLES / "bundles" / bundle / "module_info.json").read_text())
        out.append(Allowlist.from_names(doc[model][0]["input_names"]))
    return out


def fork_peer(port: int, work: Callable[[socket.socket], None]) -> int:
    """A child connected to 127.0.0.1:port that runs ``work`` until the socket closes."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the peer process
        code = 0
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=PEER_TIMEOUT_S) as sock:
                work(sock)
        except OSError:
            code = 1
        except BaseException:  # never return into the parent's code
            code = 2
        os._exit(code)
    return pid


def drain(sock: socket.socket) -> None:
    buf = bytearray(DRAIN_CHUNK)
    while sock.recv_into(buf):
        pass


def feeder(frames: list[bytes]) -> Callable[[socket.socket], None]:
    """Sends a frame each time the root asks with one byte (closed loop, no queueing)."""
    def work(sock: socket.socket) -> None:
        k = 0
        while sock.recv(1):
            sock.sendall(frames[k % len(frames)])
            k += 1
    return work


class Rig:
    """The root's sockets: a client feeding frames, three leaves draining (forked peers)."""

    def __init__(self, frames: list[bytes]) -> None:
        self.frames, self.k = frames, 0
        self.rx = bytearray(max(map(len, frames)))
        self.out = bytearray(len(self.rx))
        self.trimmer, self.lists = Trimmer(), allowlists()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(PEER_TIMEOUT_S)
        self.pids: list[int] = []
        self.socks: list[socket.socket] = []
        try:
            self.client = self._peer(feeder(frames))
            self.client.settimeout(PEER_TIMEOUT_S)
            self.leaves = [self._peer(drain) for _ in MODELS]
        except BaseException:
            self.close()
            raise

    def _peer(self, work: Callable[[socket.socket], None]) -> socket.socket:
        self.pids.append(fork_peer(self.listener.getsockname()[1], work))
        sock, _ = self.listener.accept()
        # Blocking sends (one sendmsg takes the whole frame, as in the minimal root), bounded
        # by the kernel's SO_SNDTIMEO; receives wait in poll with a timeout, as the worker
        # waits in epoll (a blocking recv under SO_RCVLOWAT hung on this kernel).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("ll", int(PEER_TIMEOUT_S), 0))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.socks.append(sock)
        return sock

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.listener.close()
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)

    def receive(self, lowat: bool = True) -> memoryview:
        """The next frame, read as the worker reads a body: in wake-ups of BODY_RCVLOWAT
        (never more than the rest), or (``lowat=False``) whatever each recv finds."""
        n = len(self.frames[self.k % len(self.frames)])
        self.k += 1
        self.client.sendall(b"?")
        view, got, mark = memoryview(self.rx)[:n], 0, 1
        while got < n:
            want = min(n - got, BODY_RCVLOWAT) if lowat else 1
            if want != mark:
                self.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
                mark = want
            got += self.client.recv_into(view[got:])
        if mark != 1:
            self.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        return view

    # each mode serves one request and returns the bytes it sent
    def off(self) -> int:
        body = self.receive()
        for leaf in self.leaves:
            send_all(leaf, [body], len(body))
        return 3 * len(body)

    def trim_sg(self) -> int:
        body, sent = self.receive(), 0
        for leaf, allow in zip(self.leaves, self.lists, strict=True):
            res = self.trimmer.trim_parts(body, allow)
            send_all(leaf, res.parts, res.bytes_out)
            sent += res.bytes_out
        return sent

    def trim_copy(self) -> int:
        body, sent = self.receive(), 0
        for leaf, allow in zip(self.leaves, self.lists, strict=True):
            res = self.trimmer.trim(body, allow, out=self.out)
            send_all(leaf, [res.data], res.bytes_out)
            sent += res.bytes_out
        return sent

    def receive_only(self) -> int:
        self.receive()
        return 0

    def receive_plain(self) -> int:
        self.receive(lowat=False)
        return 0


def spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    universe = load_universe(EXAMPLES / "features.json")
    frames = [make_frame(universe, args.candidates, seed=1000 + k,
                         targets=[m for _, m in MODELS], request_id=f"send-{k}")
              for k in range(args.frames)]
    rig = Rig(frames)
    try:
        modes = {m: getattr(rig, m) for m in ("off", "trim_sg", "trim_copy", "receive_only",
                                              "receive_plain")}
        samples: dict[str, list[float]] = {m: [] for m in modes}
        sent = {m: [fn() for _ in frames][-1] for m, fn in modes.items()}  # warm-up
        for _ in range(args.rounds):  # modes interleaved round by round
            for m, fn in modes.items():
                c0 = cpu_seconds()
                for _ in range(args.requests):
                    fn()
                samples[m].append((cpu_seconds() - c0) / args.requests * 1e3)
    finally:
        rig.close()

    def ratio(num: str, den: str) -> dict[str, float]:
        return spread([a / b for a, b in zip(samples[num], samples[den], strict=True)])

    send_ms = {m: [a - b for a, b in zip(samples[m], samples["receive_only"], strict=True)]
               for m in ("off", "trim_sg", "trim_copy")}
    return {
        "frame_bytes": statistics.median_low(map(len, frames)), "distinct_frames": len(frames),
        "sent_bytes_per_request": sent,
        "cpu_ms_per_request": {m: spread(v) for m, v in samples.items()},
        "send_cpu_ms_per_mb": {m: round(statistics.median(v) / (sent[m] / 1e6), 3)
                               for m, v in send_ms.items()},
        "trim_sg_over_off": ratio("trim_sg", "off"),
        "trim_copy_over_off": ratio("trim_copy", "off"),
        "receive_share_of_off": ratio("receive_only", "off"),
        "receive_lowat_over_plain": ratio("receive_only", "receive_plain"),
    }


def fmt(r: dict[str, float]) -> str:
    return f"{r['median']:.3f} [{r['min']:.3f}..{r['max']:.3f}]"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/send_bench.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--requests", type=int, default=40, help="requests per mode per round")
    p.add_argument("--frames", type=int, default=8, help="distinct frames, cycled")
    p.add_argument("--candidates", type=int, default=64)
    args = p.parse_args(argv)
    r = run(args)
    print(f"frame {r['frame_bytes'] / 1e6:.2f} MB, 3 targets; CPU ms per request "
          "(receive + trims + 3 sends), median [min..max] over rounds:")
    for m, v in r["cpu_ms_per_request"].items():
        print(f"  {m:<13} {fmt(v)}   sent {r['sent_bytes_per_request'][m] / 1e6:5.2f} MB")
    print(f"send CPU per MB sent (ms): {r['send_cpu_ms_per_mb']}")
    print(f"trim_sg / off   {fmt(r['trim_sg_over_off'])}   <- the floor of the pool's "
          "root CPU trim / off on this machine")
    print(f"trim_copy / off {fmt(r['trim_copy_over_off'])}")
    print(f"receive / off   {fmt(r['receive_share_of_off'])}   (paid in both modes)")
    print(f"receive in BODY_RCVLOWAT wake-ups / plain recv {fmt(r['receive_lowat_over_plain'])}")
    write_results(RESULTS, "send", {"results": r})
    return 0


if __name__ == "__main__":
    sys.exit(main())
