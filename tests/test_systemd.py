"""The systemd units: `systemd-analyze verify` is silent on both, the contract settings are
there (notify + watchdog + HUP reload for the daemon; the root service wants the daemon but
does not require it; /dev/shm stays shared and the segments survive a stop), the exposure
recorded in docs/systemd.md is the one `systemd-analyze security --offline=yes` computes,
and the sysusers file creates the accounts the units name.

Executables are resolved inside the test: copies of the units whose ExecStart points at this
venv's console scripts are written to a temp directory, which is put first on
``SYSTEMD_UNIT_PATH`` (the trailing ``:`` keeps the default search path for system targets).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
DOC = ROOT / "docs" / "systemd.md"
NAMES = ("feature-trimmer.service", "root-worker.service")
INSTALL_BIN = "/opt/feature-trimmer/venv/bin/"
VENV_BIN = Path(sys.executable).parent
ANALYZE = shutil.which("systemd-analyze")
DOCUMENTED_SYSTEMD = 252  # the version whose exposure scores docs/systemd.md records

if ANALYZE is None:
    if os.environ.get("FT_REQUIRE_SYSTEMD") == "1":
        pytest.fail("FT_REQUIRE_SYSTEMD=1 but systemd-analyze is not installed "
                    "(apt-get install -y systemd procps)", pytrace=False)
    pytest.skip("systemd-analyze is not installed (Debian: apt-get install -y systemd procps); "
                "the units cannot be verified", allow_module_level=True)


def analyze(*args: str, unit_path: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SYSTEMD_LOG_COLOR="0", SYSTEMD_PAGER="", LC_ALL="C.UTF-8")
    if unit_path is not None:
        env["SYSTEMD_UNIT_PATH"] = f"{unit_path}:"
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, env=env,
                          timeout=120)


def parse_unit(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) per assignment, in order (keys may repeat)."""
    out, section = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def values(unit: str, section: str, key: str) -> list[str]:
    return [v for s, k, v in parse_unit((UNITS / unit).read_text()) if (s, k) == (section, key)]


def one(unit: str, key: str, section: str = "Service") -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"{unit}: expected exactly one {section}.{key}, got {found}"
    return found[0]


@pytest.fixture(scope="module")
def resolved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Copies of both units whose executables exist on this host."""
    out = tmp_path_factory.mktemp("units")
    for script in ("trimmer-daemon", "gunicorn"):
        assert (VENV_BIN / script).exists(), f"{VENV_BIN / script} missing (pip install -e .)"
    kill = "/bin/kill"
    if not os.access(kill, os.X_OK):  # slim images without procps: a stand-in is enough
        stub = out / "bin" / "kill"
        stub.parent.mkdir()
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
        kill = str(stub)
    for name in NAMES:
        text = (UNITS / name).read_text()
        assert INSTALL_BIN in text
        text = text.replace(INSTALL_BIN, f"{VENV_BIN}/").replace("/bin/kill ", f"{kill} ")
        (out / name).write_text(text)
    return out


def test_analyze_runs() -> None:
    proc = analyze("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("systemd ")


def test_verify_is_silent(resolved: Path) -> None:
    """`systemd-analyze verify` exits 0 even on unknown keys or bad values, so any output at
    all (warning, unknown setting, missing executable or unit) fails the test."""
    proc = analyze("verify", "--man=no", "--generators=no",
                   *(str(resolved / n) for n in NAMES), unit_path=resolved)
    assert proc.returncode == 0 and proc.stdout + proc.stderr == "", proc.stdout + proc.stderr


def test_verify_would_catch_a_mistake(resolved: Path, tmp_path: Path) -> None:
    """The silence above means something: a typo in a copy of the unit is reported."""
    bad = tmp_path / "feature-trimmer.service"
    text = (resolved / "feature-trimmer.service").read_text()
    bad.write_text(text.replace("ProtectSystem=strict", "ProtectSystem=strickt")
                   .replace("NoNewPrivileges=yes", "NoNewPrivilege=yes"))
    proc = analyze("verify", "--man=no", "--generators=no", str(bad), unit_path=tmp_path)
    out = proc.stdout + proc.stderr
    assert "NoNewPrivilege" in out and "protect system" in out.lower()


def test_daemon_unit_contract() -> None:
    u = "feature-trimmer.service"
    assert one(u, "Type") == "notify" and one(u, "NotifyAccess") == "main"
    assert one(u, "WatchdogSec") and one(u, "Restart") == "on-failure"
    assert one(u, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(u, "ExecStart").startswith(f"{INSTALL_BIN}trimmer-daemon ")
    assert one(u, "User") == "feature-trimmer" and one(u, "Group") == "ml-serving"
    # the map must survive a stop or restart: no IPC removal, no dynamic user (implies it)
    assert one(u, "RemoveIPC") == "no" and not values(u, "Service", "DynamicUser")


def test_root_unit_wants_but_does_not_require_the_daemon() -> None:
    u = "root-worker.service"
    assert "feature-trimmer.service" in one(u, "After", "Unit").split()
    assert "feature-trimmer.service" in one(u, "Wants", "Unit").split()
    for key in ("Requires", "Requisite", "BindsTo", "PartOf", "Upholds"):
        assert not any("feature-trimmer" in v for v in values(u, "Unit", key)), key
    assert one(u, "Type") == "notify" and one(u, "KillMode") == "mixed"
    assert one(u, "Group") == "ml-serving" and one(u, "RuntimeDirectory")
    assert "gunicorn -c python:root_worker.gunicorn_conf root_worker.app:app" in \
        one(u, "ExecStart")


@pytest.mark.parametrize("unit", NAMES)
def test_hardening_keeps_dev_shm_shared(unit: str) -> None:
    hardening = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                 "PrivateTmp": "yes", "PrivateDevices": "yes", "CapabilityBoundingSet": "",
                 "MemoryDenyWriteExecute": "yes", "LockPersonality": "yes",
                 "RestrictNamespaces": "yes", "SystemCallArchitectures": "native",
                 "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6"}
    for key, want in hardening.items():
        assert one(unit, key) == want, key
    assert values(unit, "Service", "SystemCallFilter")[0] == "@system-service"
    # nothing may hide, replace or make read-only the shared /dev/shm
    for key in ("InaccessiblePaths", "TemporaryFileSystem", "ReadOnlyPaths", "BindPaths",
                "BindReadOnlyPaths"):
        assert not any("/dev" in v for v in values(unit, "Service", key)), key
    assert one(unit, "EnvironmentFile") == "-/etc/feature-trimmer/feature-trimmer.env"


def _documented_exposure() -> dict[str, float]:
    text = DOC.read_text()
    found = dict(re.findall(r"^\|\s*`?([\w.-]+\.service)`?\s*\|\s*([0-9.]+)\b", text, re.M))
    assert set(found) == set(NAMES), f"{DOC} must record the exposure of {NAMES}"
    return {k: float(v) for k, v in found.items()}


@pytest.mark.parametrize("unit", NAMES)
def test_security_exposure_is_documented(resolved: Path, unit: str) -> None:
    proc = analyze("security", "--offline=yes", "--no-pager", str(resolved / unit),
                   unit_path=resolved)
    assert proc.returncode == 0, proc.stderr
    match = re.search(rf"Overall exposure level for {re.escape(unit)}: ([0-9.]+)", proc.stdout)
    assert match, proc.stdout
    exposure, documented = float(match.group(1)), _documented_exposure()[unit]
    version = int(analyze("--version").stdout.split()[1])
    if version == DOCUMENTED_SYSTEMD:
        assert exposure == documented, f"update {DOC}: {unit} exposure is now {exposure}"
    else:  # other systemd versions weigh settings a little differently
        assert exposure <= documented + 0.5


def test_sysusers_creates_the_accounts(tmp_path: Path) -> None:
    sysusers = shutil.which("systemd-sysusers")
    if sysusers is None:
        pytest.skip("systemd-sysusers is not installed")
    (tmp_path / "etc").mkdir()
    conf = (UNITS / "feature-trimmer.sysusers.conf").read_text()
    proc = subprocess.run([sysusers, f"--root={tmp_path}", "-"], input=conf, text=True,
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    groups = {line.split(":")[0]: line.split(":")[2]
              for line in (tmp_path / "etc" / "group").read_text().splitlines()}
    users = {line.split(":")[0]: line.split(":")
             for line in (tmp_path / "etc" / "passwd").read_text().splitlines()}
    for name in NAMES:
        user, group = one(name, "User"), one(name, "Group")
        assert users[user][3] == groups[group]  # primary group
        assert int(users[user][2]) < 1000  # a system account
