"""deploy/kubernetes validated offline against the API schemas of a pinned Kubernetes
release (kubernetes-validate, strict: unknown fields are errors), and the properties the
design relies on checked in the parsed manifests; the sidecar's VMM lookup runs against a
real process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from subprocess import Popen
from typing import Any

import pytest

from tests.harness import ROOT, BrokerProcess, wait_until

K8S = ROOT / "deploy/kubernetes"
KUBERNETES_VERSION = "1.31.0"
yaml = pytest.importorskip("yaml", reason="PyYAML comes with kubernetes-validate (dev extra)")


def _validator() -> str:
    exe = shutil.which("kubernetes-validate", path=str(ROOT / ".venv/bin")) or shutil.which(
        "kubernetes-validate"
    )
    if exe is None:
        why = "kubernetes-validate not installed (the dev extra has it)"
        print(f"\nSKIP: {why}")
        pytest.skip(why)
    return exe


def _validate(*files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_validator(), "--strict", "-k", KUBERNETES_VERSION, *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def test_manifests_validate_against_pinned_kubernetes() -> None:
    files = sorted(K8S.glob("*.yaml"))
    assert {f.name for f in files} >= {"daemonset.yaml", "vmm-pod-example.yaml"}
    r = _validate(*files)
    assert r.returncode == 0, r.stdout + r.stderr
    # ... and the validator does reject a manifest with a misspelled field.
    bad = Path(tempfile.mkdtemp()) / "bad.yaml"
    bad.write_text((K8S / "daemonset.yaml").read_text().replace("hostPID:", "hostPid:"))
    try:
        assert _validate(bad).returncode != 0
    finally:
        shutil.rmtree(bad.parent)


def test_daemonset_has_what_the_design_needs() -> None:
    (ds,) = [d for d in _docs("daemonset.yaml") if d["kind"] == "DaemonSet"]
    tpl = ds["spec"]["template"]
    spec = tpl["spec"]
    (broker,) = spec["containers"]
    ann = tpl["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == "9464"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert broker[probe]["grpc"]["port"] == 9465
    # Metrics and health on the pod's IP (downward API), not 0.0.0.0 (issue 21): the
    # kubelet expands $(POD_IP) in later values; here as it would on a node.
    pod_ip = {e["name"]: e for e in broker["env"]}["POD_IP"]
    assert pod_ip["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    env = {
        e["name"]: e["value"].replace("$(POD_IP)", "10.244.1.7")
        for e in broker["env"]
        if "value" in e
    }
    assert env["PASID_BROKER_HEALTH_ADDRESS"] == "10.244.1.7:9465"
    assert env["PASID_BROKER_METRICS_ADDRESS"] == "10.244.1.7:9464"
    assert set(broker["resources"]["limits"]) == {"cpu", "memory"}
    sc = broker["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["readOnlyRootFilesystem"] is True and spec["securityContext"]["runAsNonRoot"]
    host = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert host == {
        "run": "/run/pasid-broker",
        "state": "/var/lib/pasid-broker",
        "dev-vfio": "/dev/vfio",
    }
    # Every env variable is one the broker knows (an unknown one would refuse to start).
    from broker import config

    assert set(env) <= {o.env for o in config.OPTIONS}
    config.load_full([], env)  # and every value is valid (socket group: a numeric gid)


def _pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "Pod":
        return [doc["spec"]]
    if doc["kind"] in ("DaemonSet", "Deployment", "StatefulSet", "Job"):
        return [doc["spec"]["template"]["spec"]]
    return []


def test_pod_security_levels_admit_the_pods() -> None:
    """A namespace's Pod Security level admits its pods: hostPID, hostNetwork and hostPath
    volumes are forbidden by baseline (and restricted), so a namespace with such a pod must
    enforce privileged (issue 21: the VMM pod's hostPath socket needs more than baseline).
    The namespace's level is read from the manifests, never assumed."""
    docs = [d for f in sorted(K8S.glob("*.yaml")) for d in _docs(f.name)]
    levels = {
        d["metadata"]["name"]: d["metadata"]
        .get("labels", {})
        .get("pod-security.kubernetes.io/enforce", "privileged (no label: the cluster default)")
        for d in docs
        if d["kind"] == "Namespace"
    }
    checked = 0
    for d in docs:
        for spec in _pod_specs(d):
            needs = [k for k in ("hostPID", "hostNetwork", "hostIPC") if spec.get(k)]
            needs += [f"hostPath {v['name']}" for v in spec.get("volumes", []) if "hostPath" in v]
            ns = d["metadata"]["namespace"]
            if needs:
                checked += 1
                assert levels[ns] == "privileged", (
                    f"{d['kind']} {d['metadata']['name']} uses {', '.join(needs)}, which "
                    f"baseline forbids, in namespace {ns} at level {levels[ns]}"
                )
    assert checked == 2  # the broker's DaemonSet and the VMM pod


def test_vmm_pod_shares_its_pid_namespace_without_host_pid() -> None:
    docs = _docs("vmm-pod-example.yaml")
    (pod,) = [d for d in docs if d["kind"] == "Pod"]
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    spec = pod["spec"]
    assert spec["shareProcessNamespace"] is True
    assert not spec.get("hostPID")
    assert 10002 in spec["securityContext"]["supplementalGroups"]  # the socket's group
    # One uid for VMM and sidecar: what lets the broker accept the pidfd delegation.
    assert all("runAsUser" not in c.get("securityContext", {}) for c in spec["containers"])
    script = (K8S / "sidecar/pasid_sidecar.py").read_text()
    assert cm["data"]["pasid_sidecar.py"] == script, "ConfigMap drifted from the script"
    compile(script, "pasid_sidecar.py", "exec")
    assert "delegate_pidfd=pidfd" in script and "os.pidfd_open(pid)" in script


def start_fake_vmm(tmp_path: Path, seconds: int, prefix: str = "vmm") -> tuple[str, Popen[bytes]]:
    """A stand-in VMM that the sidecar finds by its command name: a copy of sleep(1)
    named for this test process. Returns that name and the process."""
    fake = tmp_path / f"{prefix}-{os.getpid()}"
    sleep = shutil.which("sleep")
    assert sleep
    shutil.copy(sleep, fake)
    return fake.name, subprocess.Popen([str(fake), str(seconds)])


def start_sidecar(broker: BrokerProcess, vmm: str, out: Path, count: int) -> Popen[str]:
    """The example sidecar script, run as the pod runs it: it finds `vmm`, holds `count`
    PASIDs for it and writes them to `out`; its output on stdout."""
    env = {
        **os.environ,
        "VMM_COMMAND": vmm,
        "PASID_COUNT": str(count),
        "PASID_BROKER_SOCKET": broker.socket,
        "PASID_FILE": str(out),
        "VMM_WAIT_SECONDS": "10",
    }
    return subprocess.Popen(
        [sys.executable, str(K8S / "sidecar/pasid_sidecar.py")],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_sidecar_finds_the_vmm_process_of_its_own_uid(tmp_path: Path) -> None:
    sys.path.insert(0, str(K8S / "sidecar"))
    try:
        import pasid_sidecar
    finally:
        sys.path.pop(0)
    name, proc = start_fake_vmm(tmp_path, 30, "fake-vmm")
    try:
        # Just after fork the child may not have exec'd yet: poll.
        found = wait_until(lambda: pasid_sidecar.find_vmm(name), 10, 0.02, "the VMM")
        assert found == proc.pid
        assert pasid_sidecar.find_vmm(f"no-such-vmm-{os.getpid()}") is None
    finally:
        proc.kill()
        proc.wait()


def test_sidecar_holds_pasids_for_the_vmm_against_a_real_broker(
    broker: BrokerProcess, tmp_path: Path
) -> None:
    """The example sidecar, run as it is, against a real broker: the set's verified holder
    is the 'VMM' (a process the sidecar only found), and it ends when the VMM exits."""
    from pasid_client import Client

    name, vmm = start_fake_vmm(tmp_path, 60)
    out = tmp_path / "pasids.json"
    sidecar = start_sidecar(broker, name, out, 3)
    try:
        wait_until(lambda: out.exists() or sidecar.poll() is not None, 30, 0.05, "PASIDs")
        assert out.exists(), sidecar.stdout.read() if sidecar.stdout else ""
        held = __import__("json").loads(out.read_text())
        assert len(held["pasids"]) == 3 and held["holder_pid"] == vmm.pid
        with Client(broker.admin_address) as admin:
            (s,) = [s for s in admin.list_sets() if s.client == f"vmm-{vmm.pid}"]
            assert s.verified and s.pid == vmm.pid and s.delegated_by_pid == sidecar.pid
        vmm.kill()
        vmm.wait()
        assert sidecar.wait(30) == 0  # it saw the VMM's pidfd become readable
        with Client(broker.admin_address) as admin:
            wait_until(
                lambda: not [s for s in admin.list_sets() if s.client == f"vmm-{vmm.pid}"],
                10,
                0.05,
                "the VMM's set to be destroyed",
            )
    finally:
        for p in (vmm, sidecar):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_restarted_sidecar_takes_the_vmms_set_back(broker: BrokerProcess, tmp_path: Path) -> None:
    """The kubelet restarts the sidecar container (SIGTERM, then the same command again)
    while the VMM runs: the set stays, detached, and the new sidecar re-attaches it, with
    the same PASIDs (issue 19: a set follows its holder, the VMM)."""
    import json

    from pasid_client import Client

    name, vmm = start_fake_vmm(tmp_path, 60)
    out = tmp_path / "pasids.json"

    def sidecar() -> Popen[str]:
        p = start_sidecar(broker, name, out, 3)
        wait_until(lambda: out.exists() or p.poll() is not None, 30, 0.05, "PASIDs")
        assert out.exists(), p.stdout.read() if p.stdout else ""
        return p

    def the_set() -> Any:
        with Client(broker.admin_address) as admin:
            (s,) = [s for s in admin.list_sets() if s.client == f"vmm-{vmm.pid}"]
            return s

    first = second = None
    try:
        first = sidecar()
        held = json.loads(out.read_text())
        set_id = the_set().set_id
        first.send_signal(signal.SIGTERM)
        assert first.wait(30) == 0
        assert the_set().state == "detached"
        out.unlink()
        second = sidecar()
        assert json.loads(out.read_text())["pasids"] == held["pasids"]
        s = the_set()
        assert (s.set_id, s.state, s.count) == (set_id, "attached", 3)
        assert s.delegated_by_pid == first.pid  # as created; the holder is what matters
        vmm.kill()
        vmm.wait()
        assert second.wait(30) == 0
    finally:
        for p in (vmm, first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
def test_sidecar_lives_through_a_broker_restart(
    broker: BrokerProcess, tmp_path: Path, how: str
) -> None:
    """The broker is killed (a crash) or stopped (a DaemonSet update) under a running
    sidecar: the sidecar says so, resumes the same set for the same VMM, and keeps
    running."""
    import signal
    import threading

    from pasid_client import Client

    name, vmm = start_fake_vmm(tmp_path, 120)
    out = tmp_path / "pasids.json"
    sidecar = start_sidecar(broker, name, out, 2)
    said: list[str] = []
    threading.Thread(target=lambda: said.extend(sidecar.stdout or ()), daemon=True).start()
    try:
        wait_until(lambda: out.exists() or sidecar.poll() is not None, 30, 0.05, "PASIDs")
        assert out.exists(), said
        with Client(broker.admin_address) as admin:
            (before,) = admin.list_sets()
        if how == "kill -9":
            broker.kill(signal.SIGKILL)
        else:
            assert broker.stop() == 0
        broker.start()
        wait_until(lambda: any("resumed set" in x for x in said), 30, 0.05, "the resume")
        assert any("broker went away" in x for x in said) and sidecar.poll() is None
        with Client(broker.admin_address) as admin:
            (after,) = admin.list_sets()
        assert (after.set_id, after.ranges, after.state) == (
            before.set_id,
            before.ranges,
            "attached",
        )
        assert after.verified and after.pid == vmm.pid
        vmm.kill()
        vmm.wait()
        assert sidecar.wait(30) == 0
    finally:
        for p in (vmm, sidecar):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_sidecar_restarted_while_the_broker_recovers_waits_and_reattaches(
    make_broker: Any, tmp_path: Path
) -> None:
    """The node's broker and the VMM pod's sidecar restart together: the sidecar starts
    while the broker recovers (it listens, every call is UNAVAILABLE; held there by a
    test fault). The sidecar waits, says so, then takes the VMM's detached set back:
    the same set and PASIDs, not a second set and not an exit."""
    import json
    import threading

    from pasid_client import Client

    b = make_broker()
    name, vmm = start_fake_vmm(tmp_path, 120)
    out = tmp_path / "pasids.json"
    first = start_sidecar(b, name, out, 2)
    second = None
    said: list[str] = []
    try:
        wait_until(lambda: out.exists() or first.poll() is not None, 30, 0.05, "PASIDs")
        held = json.loads(out.read_text())
        first.send_signal(signal.SIGTERM)  # the kubelet stops it: the set is detached
        assert first.wait(30) == 0
        assert b.stop() == 0
        out.unlink()
        gate = tmp_path / "recovering"  # the recovery waits while it exists (tests/faults)
        gate.touch()
        b.env["PASID_BROKER_TEST_FAULTS"] = f"recovery_delay_ms=60000,recovery_delay_file={gate}"
        b.start(wait=False)
        wait_until(lambda: os.path.exists(b.socket), 30, 0.02, "the broker's socket")
        second = start_sidecar(b, name, out, 2)
        threading.Thread(target=lambda: said.extend(second.stdout or ()), daemon=True).start()
        wait_until(lambda: said or second.poll() is not None, 60, 0.05, "the sidecar's word")
        assert b.health() == "NOT_SERVING", "the sidecar did not meet the recovery"
        assert said[0].startswith("pasid-sidecar: waiting for the broker"), said
        gate.unlink()  # the recovery goes on
        wait_until(lambda: out.exists() or second.poll() is not None, 60, 0.05, "PASIDs")
        assert second.poll() is None, said
        assert json.loads(out.read_text())["pasids"] == held["pasids"]
        assert any("re-attached" in line for line in said), said
        with Client(b.admin_address) as admin:
            (s,) = admin.list_sets()
        assert (s.state, s.pid, s.count) == ("attached", vmm.pid, 2)
    finally:
        for p in (vmm, first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
