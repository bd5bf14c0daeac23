"""Routing: which leaf partition serves a model (loaded once per worker, after fork).

The routing file is a JSON object mapping each model to the base URL of its leaf partition,
or to a list of replica URLs that a worker uses round-robin. The key ``"*"`` is the default
route for models not listed::

    {"ads_ctr": ["http://10.0.0.7:8101", "http://10.0.0.8:8101"],
     "homefeed_rank": "http://10.0.0.9:8103",
     "*": "http://10.0.0.10:8100"}

A model's entry may also be an object naming the protocol its leaves speak::

    {"tr_ctr": {"urls": ["http://10.0.0.11:8000"], "protocol": "oip"}}

``"protocol"`` is ``"frame"`` (the default: this project's frame, ``POST <URL>/score``) or
``"oip"``: the Open Inference Protocol (KServe v2: NVIDIA Triton, KServe), REST with the
binary tensor data extension, ``POST <URL>/v2/models/<model>/versions/<version>/infer``
(:mod:`root_worker.service.oip`). ``"url"`` may stand for a one-element ``"urls"``.

Only ``http://HOST:PORT[/PATH]`` URLs are accepted; the root POSTs to ``<URL>/score``.
Routing is independent of the feature map: a model the map does not know is still routed
(and sent untrimmed). Errors raise :class:`RoutingError` naming the file, the key and why.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

DEFAULT_KEY = "*"
MAX_ROUTING_BYTES = 4 << 20
PROTOCOL_FRAME = "frame"
PROTOCOL_OIP = "oip"
PROTOCOLS = (PROTOCOL_FRAME, PROTOCOL_OIP)


class RoutingError(ValueError):
    """The routing file is unusable."""


class Endpoint(NamedTuple):
    """One leaf replica: where to connect and the path prefix to POST under."""

    host: str
    port: int
    base_path: str
    url: str

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        if not isinstance(url, str):
            raise ValueError(f"expected a URL string, got {type(url).__name__}")
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"{url!r}: expected http://HOST:PORT[/PATH]")
        if parts.query or parts.fragment:
            raise ValueError(f"{url!r}: a leaf URL takes no query or fragment")
        try:
            port = parts.port or 80
        except ValueError as exc:
            raise ValueError(f"{url!r}: {exc}") from None
        return cls(parts.hostname, port, parts.path.rstrip("/"), url.rstrip("/"))


class Routing:
    """Model -> replica endpoints, with a per-model round-robin cursor (one per worker)."""

    def __init__(self, routes: Mapping[str, list[Endpoint]],
                 protocols: Mapping[str, str] | None = None) -> None:
        self._routes = {m: tuple(eps) for m, eps in routes.items()}
        self._protocols = {m: p for m, p in (protocols or {}).items() if p != PROTOCOL_FRAME}
        self._cursors: dict[str, Iterator[int]] = {
            m: itertools.cycle(range(len(eps))) for m, eps in self._routes.items()}

    @classmethod
    def empty(cls) -> Routing:
        return cls({})

    @classmethod
    def load(cls, path: str | Path) -> Routing:
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise RoutingError(f"{path}: cannot read: {exc.strerror or exc}") from None
        if len(raw) > MAX_ROUTING_BYTES:
            raise RoutingError(f"{path}: larger than {MAX_ROUTING_BYTES} bytes")
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise RoutingError(f"{path}: not valid JSON: {exc}") from None
        return cls.from_doc(doc, str(path))

    @classmethod
    def from_doc(cls, doc: Any, where: str = "routing") -> Routing:
        if not isinstance(doc, dict):
            raise RoutingError(f"{where}: top level must be an object of model -> URL(s)")
        routes: dict[str, list[Endpoint]] = {}
        protocols: dict[str, str] = {}
        for model, urls in doc.items():
            if not model:
                raise RoutingError(f"{where}: empty model name")
            if isinstance(urls, dict):
                protocols[model], urls = _route_object(urls, f"{where}: {model!r}")
            urls = [urls] if isinstance(urls, str) else urls
            if not isinstance(urls, list) or not urls:
                raise RoutingError(f"{where}: {model!r}: expected a URL or a non-empty list "
                                   f"of URLs")
            try:
                routes[model] = [Endpoint.parse(u) for u in urls]
            except ValueError as exc:
                raise RoutingError(f"{where}: {model!r}: {exc}") from None
        return cls(routes, protocols)

    def listed(self, model: str) -> bool:
        """Is ``model`` named in the file (not only served by the default route)?"""
        return model in self._routes and model != DEFAULT_KEY

    def protocol(self, model: str) -> str:
        """What the leaves of ``model`` speak: ``"frame"`` or ``"oip"``."""
        return self._protocols.get(model if model in self._routes else DEFAULT_KEY,
                                   PROTOCOL_FRAME)

    def endpoints(self, model: str) -> tuple[Endpoint, ...]:
        eps = self._routes.get(model)
        if eps is None:
            eps = self._routes.get(DEFAULT_KEY, ())
        return eps

    def pick(self, model: str) -> list[Endpoint]:
        """The replicas of ``model``, starting at the next one in round-robin order."""
        key = model if model in self._routes else DEFAULT_KEY
        eps = self._routes.get(key)
        if not eps:
            return []
        if len(eps) == 1:
            return [eps[0]]
        start = next(self._cursors[key])
        return list(eps[start:] + eps[:start])

    def to_dict(self) -> dict[str, Any]:
        return {m: {"urls": [e.url for e in eps], "protocol": self._protocols[m]}
                if m in self._protocols else [e.url for e in eps]
                for m, eps in self._routes.items()}


def _route_object(doc: dict[str, Any], where: str) -> tuple[str, Any]:
    """``{"urls": [...] | "url": "...", "protocol": ...}`` -> (protocol, urls)."""
    unknown = set(doc) - {"url", "urls", "protocol"}
    if unknown:
        raise RoutingError(f"{where}: unknown keys {sorted(unknown)} (expected url or urls, "
                           f"and protocol)")
    if ("url" in doc) == ("urls" in doc):
        raise RoutingError(f"{where}: give exactly one of \"url\" and \"urls\"")
    protocol = doc.get("protocol", PROTOCOL_FRAME)
    if protocol not in PROTOCOLS:
        raise RoutingError(f"{where}: protocol {protocol!r} is not one of "
                           f"{', '.join(PROTOCOLS)}")
    return protocol, doc.get("urls", doc.get("url"))
