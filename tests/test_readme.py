"""The README and the adopter docs hold: the "Library API" snippet runs (without a daemon:
untrimmed; with one on the example bundles: trimmed), "Bring your own leaf" is linked, the
runbook's commands exist in the documented install, and the docs' relative links and
anchors resolve."""

from __future__ import annotations

import configparser
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import DaemonProc, remove_segments, run_threads

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
ADOPTER_DOCS = ["README.md", "docs/leaf-sdk.md", "docs/kubernetes.md", "docs/operations.md",
                "docs/frame-format.md", "docs/daemon.md"]


def _snippet() -> str:
    section = README.read_text().split("## Library API", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return code


def _run_snippet(shm_name: str) -> list[list[str]]:
    out = subprocess.run([sys.executable, "-c", _snippet()], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "FT_SHM_NAME": shm_name})
    assert out.returncode == 0, out.stderr
    return [line.split() for line in out.stdout.splitlines()]


def test_library_snippet_runs_without_a_daemon(shm_prefix: str) -> None:
    sent, answer = _run_snippet(shm_prefix)
    assert sent[0] == "http://127.0.0.1:8101/score?model=ads_ctr"
    assert "'unused_emb']" in sent  # sent untrimmed: every column
    assert answer[:2] == ["passthrough_no_map", "200"]


def _example_daemon(shm_prefix: str, tmp_path: Path) -> DaemonProc:
    daemon = DaemonProc(shm_prefix, {"ads": ROOT / "examples/bundles/ads/module_info.json"},
                        tmp_path / "daemon.log")
    daemon.wait_view(lambda v: v.generation > 0)
    return daemon


def test_library_snippet_trims_with_a_daemon_on_the_example_bundles(
        shm_prefix: str, tmp_path: Path) -> None:
    daemon = _example_daemon(shm_prefix, tmp_path)
    try:
        sent, answer = _run_snippet(shm_prefix)
    finally:
        daemon.stop()
        daemon.close()
        remove_segments(shm_prefix)
    assert " ".join(sent[1:3]) == "['ctx_num_0002', 'pin_seq_0009']"
    before, after = int(sent[3]), int(sent[5])
    assert after < before
    assert answer[:2] == ["trimmed", "200"]


def test_library_snippet_is_safe_from_four_threads(
        shm_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The snippet's own score() from 4 threads at once, 250 distinct frames each: every
    frame a leaf gets is exactly its request's frame trimmed, and every answer goes back
    to its own request (the old snippet's shared bytearray corrupted frames here)."""
    import numpy as np

    from root_worker.frame import Ragged, decode, encode

    daemon = _example_daemon(shm_prefix, tmp_path)
    monkeypatch.setenv("FT_SHM_NAME", shm_prefix)
    ns: dict[str, Any] = {}
    try:
        exec(compile(_snippet(), "README.md#library-api", "exec"), ns)  # noqa: S102
        allowlist = ns["live"].resolve("ads_ctr").allowlist
        assert allowlist is not None
        errors: list[str] = []

        def worker(t: int) -> None:
            rng = np.random.default_rng(t)
            for k in range(250):
                n = 1 + (k + t) % 32
                ctx = rng.standard_normal(n).astype(np.float32)
                seqs = [list(rng.integers(0, 1000, size=int(rng.integers(0, 5))))
                        for _ in range(n)]
                frame = encode({"ctx_num_0002": ctx,
                                "pin_seq_0009": Ragged.from_lists(seqs, np.int64),
                                "unused_emb": rng.standard_normal((n, 8)).astype(np.float16)},
                               {"request_id": f"t{t}-{k}", "targets": ["ads_ctr"]})
                want = ns["trim"](frame, allowlist).data  # a private output per call

                def post(url: str, headers: dict[str, str], parts: list[Any],
                         want: bytes = bytes(want), where: str = f"thread {t} frame {k}"
                         ) -> tuple[int, bytes]:
                    time.sleep(0)  # a real client's I/O: let the other threads run
                    sent = b"".join(parts)
                    if sent != want:
                        errors.append(f"{where}: the leaf got another frame")
                    scores = decode(sent).columns["ctx_num_0002"].tolist()
                    return 200, json.dumps({"scores": scores}).encode()

                status, doc = ns["score"](frame, None, post)
                target = doc["targets"][0]
                if status != 200 or target["scores"] != ctx.tolist() or \
                        doc["request_id"] != f"t{t}-{k}" or target["outcome"] != "trimmed":
                    errors.append(f"thread {t} frame {k}: {status} {target}")

        run_threads(worker, 4)
        assert not errors, errors[:5]
    finally:
        if "live" in ns:
            ns["live"].close()
        daemon.stop()
        daemon.close()
        remove_segments(shm_prefix)


def test_readme_links_bring_your_own_leaf() -> None:
    text = README.read_text()
    assert "[Bring your own leaf](docs/leaf-sdk.md)" in text
    assert "docs/kubernetes.md" in text and "deploy/prometheus/" in text


def _console_scripts() -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return {line.split("=")[0].strip()
            for line in cfg["options.entry_points"]["console_scripts"].splitlines() if line}


def test_runbook_commands_exist_in_the_documented_install() -> None:
    scripts = _console_scripts()
    runbook = (ROOT / "docs/operations.md").read_text()
    blocks = "\n".join(re.findall(r"```sh\n(.*?)```", runbook, re.S))
    used = set(re.findall(r"\b(trimmer-[a-z]+)\b", blocks))
    assert used and used <= scripts
    inspect_help = subprocess.run([str(BIN / "trimmer-inspect"), "--help"], capture_output=True,
                                  text=True, timeout=60).stdout
    for verb in re.findall(r"trimmer-inspect(?: --\S+)* ([a-z]+)", blocks):
        assert verb in inspect_help, verb
    # the install puts them on PATH (docs/systemd.md), or the runbook says where they are
    install = (ROOT / "docs/systemd.md").read_text()
    for script in used:
        assert f"/opt/feature-trimmer/venv/bin/{script}" in install, script
    assert "/usr/local/bin" in install and "/opt/feature-trimmer/venv/bin" in runbook


def _anchors(text: str) -> set[str]:
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("doc", ADOPTER_DOCS)
def test_relative_links_and_anchors_resolve(doc: str) -> None:
    path = ROOT / doc
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        assert dest.exists(), (doc, target)
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest.read_text()), (doc, target)


def test_make_run_prints_a_working_trimmer_inspect_line() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "root_worker.testing.demo", "run"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # ends when the stack is up (or the process dies)
            lines.append(line)
            if line.startswith("Ctrl-C stops everything"):
                break
        text = "".join(lines)
        status = re.search(r"^\s+(\S+trimmer-inspect --shm-name (\S+) status)$", text, re.M)
        assert status, text
        out = subprocess.run(status.group(1).split(), capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stdout
        assert status.group(2) in out.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rest = proc.communicate(timeout=60)[0]  # drains and closes the pipe
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rest = proc.communicate()[0]
    assert proc.returncode == 0, rest


def _tracked_text() -> dict[str, str]:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           timeout=60, check=True).stdout.split()
    out = {}
    for name in files:
        path = ROOT / name
        if path.is_file() and not path.is_symlink() and path.suffix in {
                ".py", ".md", ".yml", ".yaml", ".toml", ".cfg", ".h", ".c", ".service",
                ".json", ".conf", ""}:
            try:
                out[name] = path.read_text()
            except UnicodeDecodeError:
                continue
    return out


def test_the_repository_states_its_rules_itself() -> None:
    """No citation of a document the repository does not hold (a spec's sections, a
    directory beside the checkout)."""
    for name, text in _tracked_text().items():
        for bad in ("SPEC " + "\u00a7", "../" + "shared"):
            assert bad not in text, f"{name} cites {bad!r}"


def test_every_trimmer_inspect_verb_in_the_docs_exists() -> None:
    out = subprocess.run([str(BIN / "trimmer-inspect"), "--help"], capture_output=True,
                         text=True, timeout=60)
    verbs = set(re.findall(r"^    (\w+) {2,}", out.stdout, re.M))
    assert {"status", "models", "lookup", "diff", "dump"} <= verbs
    for name in ["README.md", *(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]:
        for verb in re.findall(r"trimmer-inspect (?:--[\w-]+(?: \S+)? )*([a-z]+)\b",
                               (ROOT / name).read_text()):
            assert verb in verbs, f"{name}: trimmer-inspect {verb} is no verb"
