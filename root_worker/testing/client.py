"""A small keep-alive HTTP client for the root service and leaves (demo, tests, benchmarks).

As a command, it sends one synthetic request and prints what each target got::

    python -m root_worker.testing.client http://127.0.0.1:8100 --target ads_ctr --target ads_cvr@1

Not used by the service itself. One :class:`Client` holds one HTTP/1.1 connection and
re-opens it when the server closed it; it is not thread-safe (use one per thread).
``fresh=True`` on a call uses a new connection for that call only, which lets a caller reach
different gunicorn workers.

    root = Client("http://127.0.0.1:8100")
    status, doc = root.score(frame, ["ads_ctr", ("homefeed_rank", "2")])
    metric_value(root.metrics(), "feature_trimmer_root_targets_total",
                 model="ads_ctr", outcome="trimmed")
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlencode, urlsplit

from prometheus_client.parser import text_string_to_metric_families

from root_worker.service.keepalive import (
    STALE_ERRORS,
    StaleConnection,
    retry_stale_once,
    should_retry,
)

TargetSpec = str | tuple[str, str | None]


class Client:
    def __init__(self, base_url: str, timeout: float = 30.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"expected http://HOST:PORT, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.host, self.port = parts.hostname, parts.port or 80
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def _new(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def request(self, method: str, path: str, body: Any = None,
                headers: dict[str, str] | None = None,
                fresh: bool = False) -> tuple[int, dict[str, str], bytes]:
        """``(status, headers, body)``; retries once if a kept-alive connection went stale."""
        def attempt(n: int) -> tuple[int, dict[str, str], bytes]:
            reused = self._conn is not None and not fresh
            conn = self._new() if fresh else (self._conn or self._new())
            try:
                conn.request(method, path, body=body, headers=headers or {})
                resp = conn.getresponse()
                data = resp.read()
            except STALE_ERRORS as exc:
                conn.close()
                self._conn = None if not fresh else self._conn
                if should_retry(exc, reused, n):
                    raise StaleConnection() from exc
                raise
            hdrs = {k.lower(): v for k, v in resp.getheaders()}
            if fresh or resp.will_close:
                conn.close()
                if not fresh:
                    self._conn = None
            else:
                self._conn = conn
            return resp.status, hdrs, data
        return retry_stale_once(attempt)

    def json(self, method: str, path: str, body: Any = None, *,
             headers: dict[str, str] | None = None, fresh: bool = False) -> tuple[int, Any]:
        status, _, data = self.request(method, path, body, headers, fresh)
        return status, json.loads(data)

    def score(self, frame: bytes, targets: Sequence[TargetSpec] | None = None,
              **kwargs: Any) -> tuple[int, Any]:
        """POST a frame; ``targets`` (if given) go into the query string."""
        path = "/score"
        if targets is not None:
            path += "?" + urlencode([("target", _target(t)) for t in targets])
        return self.json("POST", path, frame, **kwargs)

    def metrics(self, fresh: bool = False) -> str:
        status, _, data = self.request("GET", "/metrics", fresh=fresh)
        if status != 200:
            raise RuntimeError(f"GET /metrics answered {status}")
        return data.decode()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _target(t: TargetSpec) -> str:
    if isinstance(t, str):
        return t
    model, version = t
    return model if version is None else f"{model}@{version}"


def metric_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of a Prometheus text exposition as ``(name, labels, value)``."""
    return [(s.name, dict(s.labels), s.value)
            for fam in text_string_to_metric_families(text) for s in fam.samples]


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels`` (0 if none)."""
    return sum(v for n, lbl, v in metric_samples(text)
               if n == name and all(lbl.get(k) == want for k, want in labels.items()))


def main(argv: list[str] | None = None) -> int:
    from root_worker.testing.stack import EXAMPLES_DIR
    from root_worker.testing.workload import load_universe, make_frame

    p = argparse.ArgumentParser(prog="python -m root_worker.testing.client",
                                description="Send one synthetic score request to a root.")
    p.add_argument("url", nargs="?", default="http://127.0.0.1:8100")
    p.add_argument("--target", action="append", metavar="MODEL[@VERSION]",
                   help="default: ads_ctr, ads_cvr, homefeed_rank")
    p.add_argument("--features", default=str(EXAMPLES_DIR / "features.json"),
                   help="the feature universe (default: the example features)")
    p.add_argument("--candidates", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the whole answer")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    targets = args.target or ["ads_ctr", "ads_cvr", "homefeed_rank"]
    frame = make_frame(load_universe(args.features), args.candidates, seed=args.seed,
                       targets=targets)
    with Client(args.url) as c:
        status, doc = c.score(frame)
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0 if status == 200 else 1
    print(f"HTTP {status}  generation={doc.get('generation')} mode={doc.get('mode')} "
          f"lz4={doc.get('lz4')} frame={len(frame)} bytes")
    for t in doc.get("targets", []):
        detail = (f"sent={t.get('bytes_sent')} scores[0]={t['scores'][0] if t['scores'] else None}"
                  if t["status"] == "ok" else f"error={t['error']['kind']}: "
                  f"{t['error']['message']}")
        print(f"  {t['model']:<16} v={t['version']!s:<4} {t['outcome']:<26} "
              f"trimmed={t['bytes_trimmed']:<9} {detail}")
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
