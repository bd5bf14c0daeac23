"""``trimmer-inspect diff``: each bundle file on disk versus what the daemon published.

Runs in the ``trimmer-inspect`` process only. Every file is read and validated with the
daemon's own parser (:func:`trimmer_daemon.bundle.parse.load_bundle_file`), so "invalid" here means
exactly "the daemon rejects it". Nothing is written anywhere.

Per bundle, ``status`` is one of:

===============  ========================================================================
in_sync          the file's sha256 equals the content the daemon loaded and serves
not_loaded       the file is valid but differs from what is served: the daemon has not
                 picked it up (yet) — a reload in flight, a daemon that is down, or limits
                 that differ from the ones used here (pass ``--config``)
invalid          the daemon's validator rejects the file; the last-known-good content is
                 still served (the bundle shows ``stale`` once the daemon has seen it)
missing          the file does not exist
unreadable       the file exists but cannot be read (permissions, not a regular file)
not_published    configured in ``--config`` but not in the map (SIGHUP not sent yet?)
not_configured   in the map but no longer in ``--config`` (SIGHUP not sent yet?)
===============  ========================================================================

With ``models=True`` the models and versions of a valid file are compared with the versions
the map attributes to that bundle (added / removed / features changed). A version defined by
two bundles with different inputs is published as the union (``conflict``), so features of
the other bundle show up as "only published" there.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flatbuffers_schema.keys import KEY_DTYPE, name_key
from root_worker.featuremap.map_reader import FeatureMapView
from trimmer_daemon.bundle.parse import (
    BundleError,
    Limits,
    ModelVersion,
    ParsedBundle,
    load_bundle_file,
    read_file_bounded,
    version_sort_key,
)

IN_SYNC = "in_sync"


@dataclass
class BundleDiff:
    name: str
    path: str
    status: str
    detail: str = ""
    published_state: str = ""
    published_sha256: str = ""
    disk_sha256: str = ""
    models: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "status": self.status,
                "detail": self.detail, "published_state": self.published_state,
                "published_sha256": self.published_sha256, "disk_sha256": self.disk_sha256,
                "models": self.models}


def diff_bundles(view: FeatureMapView, *, limits: Limits,
                 configured: Mapping[str, str] | None = None,
                 models: bool = False) -> list[BundleDiff]:
    """Compare every published (and, if given, configured) bundle with its file."""
    published = {b["name"]: b for b in view.bundles()}
    out = []
    for name in sorted(published.keys() | (configured or {}).keys()):
        b = published.get(name)
        if b is None:
            assert configured is not None
            out.append(BundleDiff(name, configured[name], "not_published",
                                  "configured but not in the published map: send SIGHUP "
                                  "(systemctl reload feature-trimmer)"))
            continue
        diff = _diff_one(view, b, limits, models)
        if configured is not None and name not in configured:
            diff.status = "not_configured"
            diff.detail = ("in the published map but not in the configuration: send SIGHUP "
                           "(systemctl reload feature-trimmer)")
        elif configured is not None and configured[name] != b["path"]:
            diff.detail += (f"; the configuration names {configured[name]} (SIGHUP not sent "
                            "yet?)")
        out.append(diff)
    return out


def _diff_one(view: FeatureMapView, b: dict[str, Any], limits: Limits,
              models: bool) -> BundleDiff:
    d = BundleDiff(b["name"], b["path"], "", published_state=b["state"],
                   published_sha256=b["sha256"])
    try:
        parsed = load_bundle_file(b["path"], limits=limits)
    except BundleError as exc:
        _classify_error(d, exc, b, limits)
        return d
    d.disk_sha256 = parsed.sha256
    if parsed.sha256 == b["sha256"]:
        d.status = IN_SYNC
        if b["state"] != "ok":
            d.detail = (f"the file matches the served content, but the map still says "
                        f"{b['state']}: the daemon has not re-checked it yet")
    else:
        d.status = "not_loaded"
        d.detail = ("valid, but differs from the served content: the daemon has not loaded "
                    "it (reload in flight, daemon down, or different --max-* limits)")
    if models:
        d.models = model_changes(view, b["name"], parsed)
    return d


def _classify_error(d: BundleDiff, exc: BundleError, b: dict[str, Any],
                    limits: Limits) -> None:
    d.detail = str(exc)
    if exc.json_path == "$" and exc.reason == "file not found":
        d.status = "missing"
        return
    if exc.json_path == "$" and (exc.reason == "permission denied"
                                 or exc.reason.startswith(("cannot ", "not a regular"))):
        d.status = "unreadable"
        return
    d.status = "invalid"
    try:
        d.disk_sha256 = hashlib.sha256(read_file_bounded(b["path"],
                                                         limits.max_file_bytes)).hexdigest()
    except BundleError:
        return
    if b["current_sha256"] and b["current_sha256"] == d.disk_sha256:
        d.detail += " (the daemon has seen this content and serves the last-known-good)"
    else:
        d.detail += " (the daemon has not reported this content yet)"


def model_changes(view: FeatureMapView, bundle: str,
                  parsed: ParsedBundle) -> list[dict[str, Any]]:
    """Versions added on disk, removed from disk, or whose inputs differ from the map's."""
    published: dict[tuple[str, str], dict[str, Any]] = {}
    for m in view.models():
        for v in m["versions"]:
            if bundle in v["bundles"]:
                published[(m["name"], v["version"])] = v
    disk: dict[tuple[str, str], ModelVersion] = {
        (model, mv.version): mv for model, versions in parsed.models.items() for mv in versions}
    changes = []
    for model, version in sorted(disk.keys() | published.keys(),
                                 key=lambda k: (k[0], version_sort_key(k[1]))):
        mv, pv = disk.get((model, version)), published.get((model, version))
        if pv is None:
            assert mv is not None
            changes.append(_change(model, version, "added", list(mv.input_names), []))
        elif mv is None:
            changes.append(_change(model, version, "removed", [],
                                   _published_names(view, model, version), pv["conflict"]))
        else:
            change = _feature_change(view, model, version, mv, pv["conflict"])
            if change is None and mv.pending != pv.get("pending", False):
                change = _change(model, version, "promoted" if pv.get("pending") else
                                 "pending_on_disk", [], [], pv["conflict"])
            if change is not None:
                changes.append(change)
    return changes


def _feature_change(view: FeatureMapView, model: str, version: str, mv: ModelVersion,
                    conflict: bool) -> dict[str, Any] | None:
    res = view.resolve(model, version)
    pub_keys = set(res.allowlist.keys.tolist()) if res.allowlist is not None else set()
    disk_by_key = {name_key(n): n for n in mv.input_names}
    only_disk = [n for k, n in disk_by_key.items() if k not in pub_keys]
    only_pub_keys = sorted(pub_keys - disk_by_key.keys())
    if not only_disk and not only_pub_keys:
        return None
    only_pub = view.feature_names(np.array(only_pub_keys, dtype=KEY_DTYPE))
    return _change(model, version, "features_changed", only_disk, sorted(only_pub), conflict)


def _published_names(view: FeatureMapView, model: str, version: str) -> list[str]:
    res = view.resolve(model, version)
    return sorted(view.feature_names(res.allowlist.keys)) if res.allowlist is not None else []


def _change(model: str, version: str, change: str, only_disk: list[str],
            only_published: list[str], conflict: bool = False) -> dict[str, Any]:
    return {"model": model, "version": version, "change": change,
            "only_on_disk": only_disk, "only_published": only_published, "conflict": conflict}


def describe_change(c: dict[str, Any], max_names: int = 8) -> str:
    """One line for people: ``ctr 2: features changed (+f9, -f3)``."""
    names = [f"+{n}" for n in c["only_on_disk"]] + [f"-{n}" for n in c["only_published"]]
    shown = ", ".join(names[:max_names]) + (f", … {len(names) - max_names} more"
                                            if len(names) > max_names else "")
    what = {"added": "only on disk (not published)",
            "removed": "only published (not on disk)",
            "features_changed": "features differ",
            "promoted": "promoted on disk, still pending in the map",
            "pending_on_disk": "pending on disk, current in the map"}.get(c["change"],
                                                                        c["change"])
    conflict = " [conflict: published is a union]" if c["conflict"] else ""
    return f"{c['model']} {c['version']}: {what} ({shown}){conflict}"
