"""Offline schema validation for the deployment files under infra/.

Nothing here reaches a cluster or the network: the schemas come with the test environment.

* Kubernetes objects: the official Kubernetes JSON schemas (generated from the API server's
  OpenAPI document) that the `kubernetes-validate` package ships for every minor release. We use
  its *strict* variant, in which every object rejects unknown fields, because that is what
  `kubectl apply` does by default (server-side field validation `Strict`): a misspelled field is
  an error, not something silently dropped.
* The KubeRay RayCluster: the CRD's openAPIV3Schema, vendored in infra/schemas/ (trimmed, see the
  file's header) and turned into a JSON Schema here with the same strictness.
* compose.yaml: the Compose Specification's JSON schema, vendored in infra/schemas/.

Every function returns a list of human-readable problems; an empty list means valid. Messages
name the object and the path of the bad field so a failing test says what to fix.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource

REPO_ROOT = Path(__file__).resolve().parents[2]
INFRA_DIR = REPO_ROOT / "infra"
SCHEMAS_DIR = INFRA_DIR / "schemas"
RAYCLUSTER_SCHEMA_PATH = SCHEMAS_DIR / "ray.io_rayclusters_v1.openapi.yaml"
COMPOSE_SCHEMA_PATH = SCHEMAS_DIR / "compose-spec.json"

# Oldest Kubernetes minor we promise to support, and the one the vendored KubeRay CRD was generated
# against (its pod templates are that release's core/v1 PodSpec).
OLDEST_KUBERNETES = "1.30"
CRD_KUBERNETES = "1.35"
KUBERNETES_VERSIONS = (OLDEST_KUBERNETES, CRD_KUBERNETES)

K8S_DEFINITIONS_ID = "https://kubernetes.io/api/_definitions.json"

# A Kubernetes resource quantity ("500m", "2Gi", "1"), as in the API's own validation pattern.
QUANTITY_PATTERN = re.compile(
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    """All YAML documents of a file, skipping empty ones; each must be a mapping."""
    documents = []
    with path.open(encoding="utf-8") as stream:
        for index, document in enumerate(yaml.safe_load_all(stream)):
            if document is None:
                continue
            if not isinstance(document, dict):
                raise ValueError(
                    f"{path}: document {index} is a {type(document).__name__}, expected a mapping"
                )
            documents.append(document)
    return documents


def describe(obj: Mapping[str, Any]) -> str:
    """`Kind/name` of a Kubernetes object, for messages."""
    name = (obj.get("metadata") or {}).get("name", "<no name>")
    return f"{obj.get('kind', '<no kind>')}/{name}"


def _format_errors(errors: Iterable[jsonschema.ValidationError], where: str) -> list[str]:
    messages = []
    for error in sorted(errors, key=lambda e: [str(part) for part in e.absolute_path]):
        path = "/".join(str(part) for part in error.absolute_path) or "<root>"
        messages.append(f"{where} at {path}: {error.message}")
    return messages


# --- Kubernetes built-in kinds -------------------------------------------------------------------


def _kubernetes_schema_dir(version: str) -> Any:
    directory = (
        importlib.resources.files("kubernetes_validate")
        / "kubernetes-json-schema"
        / f"v{version}.0-local-strict"
    )
    if not directory.is_dir():
        raise ValueError(
            f"kubernetes-validate ships no schemas for Kubernetes {version}; pick another version"
        )
    return directory


@functools.cache
def _kubernetes_definitions(version: str) -> dict[str, Any]:
    definitions: dict[str, Any] = json.loads(
        (_kubernetes_schema_dir(version) / "_definitions.json").read_text()
    )
    return definitions


@functools.cache
def _kubernetes_registry(version: str) -> Registry:
    definitions = _kubernetes_definitions(version)
    return Registry().with_resource(K8S_DEFINITIONS_ID, Resource.from_contents(definitions))


def _schema_file_name(kind: str, api_version: str) -> str:
    # "apps/v1" -> "apps-v1", "networking.k8s.io/v1" -> "networking-v1", "v1" -> "v1"
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    return f"{kind.lower()}-{group_version}.json"


@functools.cache
def _kubernetes_validator(kind: str, api_version: str, version: str) -> jsonschema.protocols.Validator | None:
    schema_file = _kubernetes_schema_dir(version) / _schema_file_name(kind, api_version)
    if not schema_file.is_file():
        return None
    schema = json.loads(schema_file.read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    return validator_class(schema, registry=_kubernetes_registry(version))


def kubernetes_errors(obj: Mapping[str, Any], version: str) -> list[str]:
    """Problems of one built-in Kubernetes object against the official schema of `version`."""
    kind, api_version = obj.get("kind"), obj.get("apiVersion")
    if not isinstance(kind, str) or not isinstance(api_version, str):
        return [f"{describe(obj)}: every object needs string `apiVersion` and `kind`"]
    validator = _kubernetes_validator(kind, api_version, version)
    if validator is None:
        return [
            f"{describe(obj)}: Kubernetes {version} has no kind {kind} in {api_version} (typo in kind/apiVersion?)"
        ]
    problems = _format_errors(validator.iter_errors(obj), f"{describe(obj)} (Kubernetes {version})")
    # The OpenAPI document leaves metadata.name optional (generateName exists); manifests need it.
    if not (obj.get("metadata") or {}).get("name"):
        problems.append(f"{describe(obj)}: metadata.name is required in a manifest")
    return problems


# --- KubeRay RayCluster ---------------------------------------------------------------------------


def openapi_to_json_schema(node: Mapping[str, Any]) -> dict[str, Any]:
    """Turn a CRD structural schema (OpenAPI v3 subset) into an equivalent strict JSON Schema.

    `nullable: true` becomes an extra "null" type; an object that lists its `properties` and
    neither has `additionalProperties` nor `x-kubernetes-preserve-unknown-fields` rejects unknown
    fields (the API server's strict field validation). Kubernetes extensions (`x-kubernetes-*`)
    are dropped: list/map merge semantics and CEL rules are not checked offline.
    """
    schema: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key == "properties":
            schema[key] = {name: openapi_to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, Mapping):
            schema[key] = openapi_to_json_schema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            schema[key] = [openapi_to_json_schema(sub) for sub in value]
        else:
            schema[key] = value
    if node.get("nullable") and isinstance(node.get("type"), str):
        schema["type"] = [node["type"], "null"]
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        schema["additionalProperties"] = False
    return schema


@functools.cache
def _raycluster_validator() -> jsonschema.protocols.Validator:
    with RAYCLUSTER_SCHEMA_PATH.open(encoding="utf-8") as stream:
        openapi = yaml.safe_load(stream)
    schema = openapi_to_json_schema(openapi)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    # Pod templates and metadata $ref the Kubernetes definitions of the CRD's own release.
    return jsonschema.Draft202012Validator(schema, registry=_kubernetes_registry(CRD_KUBERNETES))


def raycluster_errors(obj: Mapping[str, Any]) -> list[str]:
    """Problems of a RayCluster against the vendored KubeRay CRD schema (ray.io/v1)."""
    problems = _format_errors(_raycluster_validator().iter_errors(obj), describe(obj))
    if not (obj.get("metadata") or {}).get("name"):
        problems.append(f"{describe(obj)}: metadata.name is required in a manifest")
    return problems


# --- Dispatch ----------------------------------------------------------------------------------


def manifest_errors(obj: Mapping[str, Any], kubernetes_version: str) -> list[str]:
    """Problems of any object found in infra/k8s or infra/kuberay."""
    if obj.get("apiVersion") == "ray.io/v1" and obj.get("kind") == "RayCluster":
        return raycluster_errors(obj)
    if str(obj.get("apiVersion", "")).startswith("ray.io/"):
        return [f"{describe(obj)}: only ray.io/v1 RayCluster has a vendored schema (infra/schemas/)"]
    return kubernetes_errors(obj, kubernetes_version)


# --- Compose --------------------------------------------------------------------------------------


@functools.cache
def _compose_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(COMPOSE_SCHEMA_PATH.read_text(encoding="utf-8"))
    validator_class = jsonschema.validators.validator_for(schema)
    return validator_class(schema)


def compose_errors(document: Mapping[str, Any]) -> list[str]:
    """Problems of a Compose file (already parsed, before variable interpolation)."""
    return _format_errors(_compose_validator().iter_errors(document), "compose")
