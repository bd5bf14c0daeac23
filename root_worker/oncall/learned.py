"""The leaf versions the root workers learned, read from a root's ``/metrics``.

Runs in ``trimmer-inspect lookup --root URL``. Each root worker learns, from its leaves'
answers, which version each leaf endpoint serves for requests that name no version, and
exports it as ``feature_trimmer_root_leaf_version{model,endpoint,version,pid} 1``
(:mod:`root_worker.service.metrics`; ``/metrics`` on any worker merges every worker's).
The learned table lives in each worker's memory; this is where it can be read from outside.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass

METRIC = "feature_trimmer_root_leaf_version"
TIMEOUT_S = 5.0
MAX_BYTES = 32 << 20


class LearnedError(Exception):
    """The root's metrics could not be read; the message says which URL and why."""


@dataclass(frozen=True)
class Learned:
    root: str
    pid: str
    endpoint: str
    version: str


def learned_versions(root: str, model: str, *, timeout: float = TIMEOUT_S,
                     max_bytes: int = MAX_BYTES) -> list[Learned]:
    """Every live worker's learned (endpoint, version) for ``model`` at the root ``root``
    (``http://HOST:PORT``); raises :class:`LearnedError`."""
    from prometheus_client.parser import text_string_to_metric_families  # only this verb

    url = root.rstrip("/") + "/metrics"
    if not url.startswith(("http://", "https://")):
        raise LearnedError(f"{root}: expected http://HOST:PORT")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - http(s) only
            data = resp.read(max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise LearnedError(f"{url}: {getattr(exc, 'reason', None) or exc}") from None
    if len(data) > max_bytes:
        raise LearnedError(f"{url}: more than {max_bytes} bytes")
    out = []
    try:
        for family in text_string_to_metric_families(data.decode("utf-8", "replace")):
            if family.name != METRIC:
                continue
            for s in family.samples:
                if s.value == 1 and s.labels.get("model") == model:
                    out.append(Learned(root, s.labels.get("pid", ""), s.labels["endpoint"],
                                       s.labels["version"]))
    except (ValueError, KeyError) as exc:
        raise LearnedError(f"{url}: unreadable metrics: {exc}") from None
    return sorted(out, key=lambda x: (x.endpoint, x.pid))
