"""An asyncio root on the contract library: ``POST /score`` fanned out to real leaves.

What a team that already runs an asyncio service needs to embed the trimmer: the root's half
of the root <-> leaf contract comes from :class:`root_worker.contract.Contract` (targets,
trim, ``?model=``/``?version=``, ``X-FT-Trimmed-For``, the 409 re-send, the rollout's
learned leaf versions, Open Inference Protocol targets, metrics, the answer document); this
file only does the I/O, with the standard library's asyncio streams and the root's own
llhttp-based parsers (``RequestStream``, ``ReplyParser``). It answers the same documents as
the gunicorn root (docs/root-service.md)::

    python examples/asyncio_root.py --shm-name feature_trimmer \\
        --routing examples/routing.json --bind 127.0.0.1:8200
    curl --data-binary @frame.ft 'http://127.0.0.1:8200/score?target=ads_ctr'

Settings are the root's ``FT_*`` variables (``FT_LEAF_TIMEOUT``, ``FT_MODE``, ``FT_LZ4``,
the caps); ``GET /metrics`` serves the contract's Prometheus metrics. The map is never
attached on the event loop: requests use the generation already attached, and a new one is
attached in a thread (``Contract.refresh``) as soon as a request sees it waiting. For
brevity it opens one connection per leaf call (no keep-alive pool) and does not drain on
SIGTERM beyond closing the listener.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from root_worker.contract import BadRequest, Contract, LeafError, LeafRequest, Plan, Routing
from root_worker.featuremap.live_map import LiveMap
from root_worker.service.http1 import (
    HttpError,
    ReplyParser,
    RequestStream,
    error_body,
    json_body,
    response_head,
    status_text,
)
from root_worker.service.replies import answer_body
from root_worker.service.settings import load_settings

log = logging.getLogger("asyncio_root")
READ_CHUNK = 256 << 10
MAX_HEAD = 64 << 10


class Root:
    """The asyncio root: one :class:`Contract`, shared by every connection's task."""

    def __init__(self, contract: Contract) -> None:
        self.contract = contract
        self.timeout = contract.settings.leaf_timeout
        self._attaching: asyncio.Future[Any] | None = None

    # -- the map: attached in a thread, never on the loop ---------------------------------
    async def attach(self) -> None:
        await asyncio.to_thread(self.contract.refresh)

    def _keep_fresh(self, plan: Plan) -> None:
        if plan.map_stale and (self._attaching is None or self._attaching.done()):
            self._attaching = asyncio.ensure_future(self.attach())

    # -- POST /score ---------------------------------------------------------------------
    async def score(self, body: bytes, query: str) -> tuple[int, dict[str, Any]]:
        """The answer document; raises BadRequest (4xx) before any leaf is called."""
        plan = self.contract.prepare(body, query, attach=False)
        self._keep_fresh(plan)
        try:
            deadline = asyncio.get_running_loop().time() + self.timeout
            await asyncio.gather(*(self._target(plan, i, deadline)
                                   for i in range(len(plan.targets))))
        finally:
            status, doc = self.contract.finish(plan, raw=True)
        return status, doc

    async def _target(self, plan: Plan, i: int, deadline: float) -> None:
        """One target to its end; a bug here fails this target alone (``internal``)."""
        try:
            await self._call(plan, i, deadline)
        except Exception as exc:
            log.exception("target %d of request %s failed", i, plan.request_id)
            self.contract.fail(plan, i, LeafError("internal", f"internal error (logged): "
                                                  f"{type(exc).__name__}"))

    async def _call(self, plan: Plan, i: int, deadline: float) -> None:
        req = self.contract.request(plan, i)
        while req is not None:  # a 409 to a trimmed frame: once more, untrimmed
            if not req.endpoints:
                self.contract.fail(plan, i, LeafError("no_route", "no leaf is routed for "
                                                      f"{plan.targets[i].target.model!r}"))
                return
            try:
                url, status, headers, data = await asyncio.wait_for(
                    self._post(req), max(0.0, deadline - asyncio.get_running_loop().time()))
            except TimeoutError:
                self.contract.fail(plan, i, LeafError("timeout", f"no answer within "
                                                      f"{self.timeout}s (FT_LEAF_TIMEOUT)"))
                return
            except LeafError as exc:
                self.contract.fail(plan, i, exc)
                return
            req = self.contract.answer(plan, i, url, status, data, headers)

    async def _post(self, req: LeafRequest) -> tuple[str, int, dict[str, str], bytes]:
        """POST to the first replica that takes the connection; ``(its URL, status,
        headers, body)``; raises LeafError with the root's kinds (``connect``, ``io``,
        ``bad_reply``)."""
        refused = []
        for ep in req.endpoints:
            try:
                reader, writer = await asyncio.open_connection(ep.host, ep.port)
            except OSError as exc:
                refused.append(f"{ep.url}: {exc.strerror or exc}")
                continue
            try:
                head = [f"POST {ep.base_path}{req.path} HTTP/1.1", f"Host: {ep.host}:{ep.port}",
                        *(f"{k}: {v}" for k, v in req.headers.items()),
                        f"Content-Length: {req.nbytes}", "Connection: close", "", ""]
                writer.write("\r\n".join(head).encode("latin-1"))
                writer.writelines(req.parts)  # the trimmed frame's views: no copy
                await writer.drain()
                reply = ReplyParser(self.contract.settings.max_leaf_reply_bytes)
                while True:
                    chunk = await reader.read(READ_CHUNK)
                    if not chunk:
                        if not reply.eof():
                            raise HttpError(502, "bad_reply", f"{ep.url} closed mid-answer")
                        break
                    if reply.feed(chunk):
                        break
                return ep.url, reply.status, reply.headers, bytes(reply.body)
            except HttpError as exc:
                raise LeafError("bad_reply", f"{ep.url}: {exc.message}") from None
            except OSError as exc:
                raise LeafError("io", f"{ep.url}: {exc.strerror or exc}") from None
            finally:
                writer.close()
        raise LeafError("connect", "no leaf replica accepted a connection: " +
                        "; ".join(refused))

    # -- the server ----------------------------------------------------------------------
    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                    ) -> None:
        stream = RequestStream(MAX_HEAD, self.contract.settings.max_request_bytes)
        try:
            while not stream.closed:
                try:
                    chunk = await asyncio.wait_for(reader.read(READ_CHUNK), 60.0)
                except TimeoutError:
                    return
                if not chunk:
                    return
                try:
                    stream.feed(chunk)
                except HttpError as exc:
                    await self._send(writer, error_body(exc.status, exc.code, exc.message),
                                     False)
                    return
                while stream.done:
                    msg = stream.done.popleft()
                    answer = await self._dispatch(msg.method, msg.path, msg.query,
                                                  bytes(msg.store or b""))
                    await self._send(writer, answer, msg.keep_alive)
                    if not msg.keep_alive:
                        return
        finally:
            writer.close()

    async def _dispatch(self, method: str, path: str, query: str, body: bytes
                        ) -> tuple[int, list[tuple[str, str]], bytes]:
        if path == "/score" and method == "POST":
            try:
                return answer_body(*await self.score(body, query))
            except BadRequest as exc:
                return error_body(exc.status, exc.code, exc.message)
        if path == "/metrics" and method == "GET":
            text, ctype = self.contract.metrics.render()
            return 200, [("Content-Type", ctype)], text
        if path == "/healthz" and method == "GET":
            return json_body(200, {"status": "ok",
                                   "generation": self.contract.live_map.generation})
        return error_body(404, "not_found", f"{method} {path}: POST /score, GET /metrics, "
                          "GET /healthz")

    @staticmethod
    async def _send(writer: asyncio.StreamWriter,
                    answer: tuple[int, list[tuple[str, str]], bytes], keep: bool) -> None:
        status, headers, body = answer
        writer.write(response_head(status, status_text(status), headers, len(body), keep))
        writer.write(body)
        await writer.drain()


async def main_async(args: argparse.Namespace) -> None:
    overrides: dict[str, Any] = {"shm_name": args.shm_name}
    if args.routing:
        overrides["routing"] = args.routing
    settings = load_settings(**overrides)
    routing = Routing.load(settings.routing) if settings.routing else Routing.empty()
    live = LiveMap(settings.shm_name)
    root = Root(Contract(settings, live, routing))
    await root.attach()  # the generation published now, before the first request
    host, _, port = args.bind.rpartition(":")
    server = await asyncio.start_server(root.serve, host or "127.0.0.1", int(port))
    bound = server.sockets[0].getsockname()
    address = f"http://{bound[0]}:{bound[1]}"
    log.info("listening on %s map generation=%d", address, live.generation)
    if args.address_file:
        tmp = Path(args.address_file + ".tmp")
        tmp.write_text(address + "\n")
        tmp.replace(args.address_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    live.close()
    log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shm-name", default="feature_trimmer",
                        help="the daemon's --shm-name (default: %(default)s)")
    parser.add_argument("--routing", default="",
                        help="routing file (JSON model -> leaf URL(s)); default: FT_ROUTING")
    parser.add_argument("--bind", default="127.0.0.1:8200",
                        help="HOST:PORT to listen on (port 0: a free one)")
    parser.add_argument("--address-file", default="",
                        help="write the bound http://HOST:PORT here once listening")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
