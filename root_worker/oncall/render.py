"""How ``trimmer-inspect`` shows what it read: JSON documents and text for people.

Runs in the ``trimmer-inspect`` process only. Every JSON document starts with the same
envelope (``shm_name``, ``status``, ``exit_code``, ``checked_at``, ``findings``); text output
is aligned tables (:mod:`root_worker.oncall.format`). No I/O besides printing to stdout.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from root_worker.featuremap.map_reader import FeatureMapView
from root_worker.frame.backends import describe_backend
from root_worker.oncall import format as fmt
from root_worker.oncall.diff import BundleDiff, describe_change
from root_worker.oncall.state import Level, MapState


def envelope(state: MapState) -> dict[str, Any]:
    level = state.level
    return {"shm_name": state.prefix, "status": level.name.lower(), "exit_code": int(level),
            "checked_at": fmt.iso_utc(state.now_ns),
            "findings": [f.to_dict() for f in state.findings]}


def status_facts(state: MapState) -> dict[str, Any]:
    c, snap, view = state.control, state.snapshot, state.view
    published = c is not None and c.generation > 0
    return {
        "generation": c.generation if published and c else None,
        "published_at": fmt.iso_utc(c.published_at_ns) if published and c else None,
        "map_age_s": state.map_age_s() if published else None,
        "heartbeat_at": fmt.iso_utc(c.heartbeat_ns) if c and c.heartbeat_ns else None,
        "heartbeat_age_s": state.heartbeat_age_s(),
        "daemon": state.daemon.to_dict() if state.daemon else None,
        "blob": {"segment": snap.segment, "size": snap.size,
                 "crc32": f"{snap.checksum:#010x}", "verified": True} if snap else None,
        "models": view.model_count if view else None,
        "bundles": view.bundles() if view else [],
        "conflicts": view.conflicts() if view else [],
        "trim_backend": describe_backend(),
    }


def summary(state: MapState) -> str:
    level = state.level
    worst = [f for f in state.findings if f.level == level and level > Level.OK]
    gen = state.control.generation if state.control else 0
    head = f"{level.name} - feature-trimmer shm={state.prefix} generation={gen}"
    if not worst:
        return head
    more = f" (+{len(worst) - 1} more)" if len(worst) > 1 else ""
    return f"{head}: {worst[0].message}{more}"


def status_lines(state: MapState) -> list[tuple[str, object]]:
    c, d, snap, view = state.control, state.daemon, state.snapshot, state.view
    # what this host's install trims with (the root workers import the same package)
    lines: list[tuple[str, object]] = [("trim backend", describe_backend()["reason"])]
    if c is None:
        return lines
    if c.generation:
        lines.append(("generation", f"{c.generation} published {fmt.iso_utc(c.published_at_ns)}"
                                    f" ({fmt.ago(c.published_at_ns, state.now_ns)})"))
    if d is not None:
        alive = {True: "alive", False: "NOT RUNNING", None: "unknown"}[d.alive]
        lock = {True: f"writer lock held{f' by pid {d.lock_pid}' if d.lock_pid else ''}",
                False: "writer lock FREE", None: "writer lock unknown"}[d.lock_held]
        lines.append(("daemon", f"pid {d.pid} {alive}, {lock}"))
    lines.append(("heartbeat", f"{fmt.iso_utc(c.heartbeat_ns)} "
                               f"({fmt.ago(c.heartbeat_ns, state.now_ns)})"))
    if snap is not None:
        lines.append(("blob", f"{snap.segment}, {snap.size} bytes, crc32 {snap.checksum:#010x} "
                              "verified"))
    if view is not None:
        lines.append(("map", f"{view.model_count} models, {len(view.bundles())} bundles, "
                             f"{len(view.conflicts())} conflicts, built by pid "
                             f"{view.daemon_pid}"))
    return lines


def bundle_table(view: FeatureMapView, now_ns: int) -> str:
    rows = [(b["name"], b["state"], b["model_count"], b["version_count"],
             fmt.ago(b["loaded_at_ns"], now_ns), b["sha256"][:12] or None,
             b["error"] or b["path"]) for b in view.bundles()]
    return fmt.table(["BUNDLE", "STATE", "MODELS", "VERSIONS", "LOADED", "SHA256",
                      "ERROR / PATH"], rows)


def diff_text(diffs: list[BundleDiff]) -> str:
    rows = [(d.name, d.status, d.published_state or None, d.published_sha256[:12] or None,
             d.disk_sha256[:12] or None, d.detail or d.path) for d in diffs]
    lines = [fmt.table(["BUNDLE", "STATUS", "PUBLISHED", "SERVED SHA", "DISK SHA", "DETAIL"],
                       rows)]
    for d in diffs:
        for change in d.models:
            lines.append(f"  {d.name}: {describe_change(change)}")
    return "\n".join(lines)


def show(value: Any) -> object:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "-"
    return value


def print_json(doc: dict[str, Any]) -> None:
    json.dump(doc, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")
