"""deploy/k8s/: the Kubernetes manifests are valid against the Kubernetes API's
own schemas (kubernetes-validate, strict: an unknown field is refused), the
services' arguments in them are accepted by the services' own settings
loaders, and the node-local wiring docs/scaling.md describes holds: one
admission and one kvstore per GPU node reached through node-local Services,
NVML's pids shared, the kvstore's shared memory at the same path in every
pod, one user for all."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="install the dev extras (pip install -e '.[dev]')")

from services.admission.settings import load_settings as admission_settings  # noqa: E402
from services.front.settings import load_settings as front_settings  # noqa: E402
from services.kvstore.settings import load_settings as kvstore_settings  # noqa: E402
from services.worker.settings import load_settings as worker_settings  # noqa: E402

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
FILES = sorted(K8S.rglob("*.yaml"))
VERSION = "1.33.0"
LOADERS = {"admission": admission_settings, "kvstore": kvstore_settings,
           "worker": worker_settings, "front": front_settings}


def documents() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in FILES
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def by_kind(kind: str) -> list[dict]:
    return [doc for _, doc in documents() if doc["kind"] == kind]


def container(doc: dict) -> dict:
    (main,) = doc["spec"]["template"]["spec"]["containers"]
    return main


def args_of(doc: dict) -> list[str]:
    return [arg.replace("$(POD_IP)", "10.0.0.7") for arg in container(doc)["args"]]


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_there_are_manifests_and_the_namespace_comes_first():
    assert FILES and FILES[0].name == "00-namespace.yaml", FILES
    kinds = sorted(doc["kind"] for _, doc in documents())
    assert kinds == ["ConfigMap", "DaemonSet", "DaemonSet", "DaemonSet", "Deployment",
                     "Deployment", "Namespace", "Service", "Service", "Service"], kinds


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_is_valid_against_the_kubernetes_schemas(path):
    for doc in yaml.safe_load_all(path.read_text()):
        if doc:
            kubernetes_validate.validate(doc, VERSION, strict=True)


def test_a_misspelt_field_is_refused():
    (daemonset,) = [d for d in by_kind("DaemonSet") if d["metadata"]["name"] == "lmx-admission"]
    wrong = copy.deepcopy(daemonset)
    container(wrong)["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, VERSION, strict=True)


def test_the_services_accept_their_arguments():
    for doc in [*by_kind("DaemonSet"), *by_kind("Deployment")]:
        args = args_of(doc)
        service, rest = args[0], args[1:]
        LOADERS[service](rest, environ={})   # raises ConfigError on an unknown flag or value


def test_node_local_wiring():
    services = {doc["metadata"]["name"]: doc for doc in by_kind("Service")}
    for name in ("lmx-admission", "lmx-kvstore"):
        assert services[name]["spec"]["internalTrafficPolicy"] == "Local", (
            f"{name}: a worker must reach its own node's {name}")
    daemonsets = {doc["metadata"]["name"]: doc for doc in by_kind("DaemonSet")}
    admission = daemonsets["lmx-admission"]
    assert admission["spec"]["template"]["spec"]["hostPID"] is True
    assert flag(args_of(admission), "--device-backend") == "nvml"
    kvstore = daemonsets["lmx-kvstore"]
    shm_dir = flag(args_of(kvstore), "--shm-dir")
    users = set()
    for doc in [admission, kvstore, *by_kind("Deployment")]:
        users.add(doc["spec"]["template"]["spec"]["securityContext"]["runAsUser"])
    assert users == {10001}, f"segments are owner-only: one user for all, not {users}"
    for worker in by_kind("Deployment"):
        spec = worker["spec"]["template"]["spec"]
        args = args_of(worker)
        assert spec["hostPID"] is True, "NVML's pids must match admission's view"
        assert flag(args, "--admission").split(".")[0] == "lmx-admission"
        assert flag(args, "--admission").endswith(":50051")
        assert flag(args, "--kvstore").split(".")[0] == "lmx-kvstore"
        assert flag(args, "--kvstore").endswith(":50052")
        mounts = {m["mountPath"] for m in container(worker)["volumeMounts"]}
        assert shm_dir in mounts, f"{worker['metadata']['name']} does not see {shm_dir}"
        assert container(worker)["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert flag(args, "--advertise").startswith("10.0.0.7:"), "advertise the pod's IP"


def test_the_front_reaches_its_nodes_admission_and_answers_health_checks():
    (front,) = [d for d in by_kind("DaemonSet") if d["metadata"]["name"] == "lmx-front"]
    args = args_of(front)
    assert flag(args, "--admission") == "lmx-admission.lmx.svc.cluster.local:50051"
    assert flag(args, "--listen").startswith("0.0.0.0:")
    port = int(flag(args, "--listen").rsplit(":", 1)[1])
    main = container(front)
    assert main["ports"][0]["containerPort"] == port
    assert main["readinessProbe"]["httpGet"]["path"] == "/health"
    assert front["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001
    (service,) = [d for d in by_kind("Service") if d["metadata"]["name"] == "lmx-front"]
    assert service["spec"]["sessionAffinity"] == "ClientIP"
