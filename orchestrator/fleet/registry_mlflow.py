"""Optional MLflow model-registry adapter: each artifact that passed its gate becomes a model version.

    registered model  "<base model>-<method>-w<bits>-g<group size>"   (one per quantization recipe)
    model version     source = the artifact's object-store URI (s3://...), tags = metrics + job id
    alias             "candidate" → the newest version whose quality gate passed

It speaks MLflow's REST API (`/api/2.0/mlflow/...`) over httpx rather than importing the `mlflow`
package: the service then needs no heavy client library and no MLflow version pin; the REST API is the
stable contract. Authentication follows MLflow's own variables (MLFLOW_TRACKING_TOKEN, or
MLFLOW_TRACKING_USERNAME + MLFLOW_TRACKING_PASSWORD).

Idempotent on retries: before creating a version it looks one up by the `quantfleet.job_id` tag, so a
registration repeated after a crash or a lost response finds the first one. Two registrations racing
for the same job can both create a version; both then keep the lowest-numbered one and delete the others,
so the registry converges to one version per job.

MLflow refuses local paths as a version source (unless they sit inside a run's artifact directory), so
artifacts must live in object storage (QF_OBJECT_STORE=s3://...) to be registered.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

JOB_TAG = "quantfleet.job_id"
GATE_TAG = "quantfleet.gate"
METRIC_TAG_PREFIX = "quantfleet.metric."
CANDIDATE_ALIAS = "candidate"
REMOTE_SCHEMES = (
    "s3",
    "gs",
    "wasbs",
    "abfss",
    "hdfs",
    "http",
    "https",
    "dbfs",
    "runs",
    "models",
    "mlflow-artifacts",
)
SAFE_VALUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/]{0,255}$")


class MlflowError(RuntimeError):
    """Registration failed; the message names the MLflow call and what MLflow said."""


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    source: str
    tags: dict[str, str]
    aliases: list[str]
    created: bool  # False when an earlier registration of the same job was found


def registered_model_name(base_model: str, method: str, bits: int, group_size: int) -> str:
    """One registered model per recipe, e.g. 'SmolLM2-135M-Instruct-gptq-w4-g64' (g-1 → 'gchannel')."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", base_model.rstrip("/").rsplit("/", 1)[-1]).strip("-") or "model"
    group = "gchannel" if group_size == -1 else f"g{group_size}"
    return f"{base}-{method}-w{bits}-{group}"


class MlflowRegistry:
    """A client of one MLflow tracking server's model registry."""

    def __init__(
        self,
        tracking_uri: str,
        *,
        timeout_s: float = 15.0,
        token: str | None = None,
        username: str | None = None,
        password: str | None = None,
        client: httpx.Client | None = None,
    ) -> None:
        parts = urlsplit(tracking_uri)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise MlflowError(
                f"MLflow tracking URI {tracking_uri!r} must be the http(s) URL of a tracking server, "
                "e.g. http://mlflow.internal:5000"
            )
        self.tracking_uri = tracking_uri.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        auth = httpx.BasicAuth(username, password) if username and password else None
        self._client = client or httpx.Client(timeout=timeout_s, headers=headers, auth=auth)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> MlflowRegistry | None:
        """The registry named by QF_MLFLOW_TRACKING_URI, or None when it is not set (the adapter is optional)."""
        uri = environ.get("QF_MLFLOW_TRACKING_URI")
        if not uri:
            return None
        return cls(
            uri,
            token=environ.get("MLFLOW_TRACKING_TOKEN"),
            username=environ.get("MLFLOW_TRACKING_USERNAME"),
            password=environ.get("MLFLOW_TRACKING_PASSWORD"),
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> MlflowRegistry:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- the one operation the service needs ------------------------------------------------------------

    def register(
        self,
        *,
        name: str,
        job_id: str,
        source: str,
        metrics: Mapping[str, Any] | None,
        gate_passed: bool | None,
        extra_tags: Mapping[str, str] | None = None,
        description: str | None = None,
    ) -> RegisteredVersion:
        """Register `source` as a version of `name` for `job_id` (or find the earlier registration), tag it,
        and point the `candidate` alias at it when its gate passed."""
        _check_value("registered model name", name)
        _check_value("job id", job_id)
        _check_source(source)
        self._ensure_registered_model(name)
        existing = self._versions_of_job(name, job_id)
        created = not existing
        if created:
            tags = {
                **dict(extra_tags or {}),
                **_metric_tags(metrics),
                JOB_TAG: job_id,
                GATE_TAG: _gate_tag(gate_passed),
            }
            body: dict[str, Any] = {
                "name": name,
                "source": source,
                "tags": [{"key": k, "value": v} for k, v in tags.items()],
            }
            if description:
                body["description"] = description
            self._call("POST", "model-versions/create", json=body)
            existing = self._versions_of_job(name, job_id)
        keep = self._keep_one(name, existing)
        if gate_passed:
            self._call(
                "POST",
                "registered-models/alias",
                json={"name": name, "alias": CANDIDATE_ALIAS, "version": keep},
            )
        return self.get_version(name, keep, created=created)

    # --- lookups ----------------------------------------------------------------------------------------

    def get_version(self, name: str, version: str, *, created: bool = False) -> RegisteredVersion:
        mv = self._call("GET", "model-versions/get", params={"name": name, "version": version})[
            "model_version"
        ]
        return _version(mv, created=created)

    def find_version(self, name: str, job_id: str) -> RegisteredVersion | None:
        """The version registered for `job_id` (the lowest-numbered one), or None."""
        _check_value("registered model name", name)
        _check_value("job id", job_id)
        versions = self._versions_of_job(name, job_id)
        return self.get_version(name, min(versions, key=int)) if versions else None

    def alias_version(self, name: str, alias: str = CANDIDATE_ALIAS) -> str | None:
        """The version an alias points at, or None when the alias is not set."""
        try:
            mv = self._call("GET", "registered-models/alias", params={"name": name, "alias": alias})
        except MlflowError as e:
            if "not found" in str(e).lower():
                return None
            raise
        return str(mv["model_version"]["version"])

    # --- internals --------------------------------------------------------------------------------------

    def _ensure_registered_model(self, name: str) -> None:
        try:
            self._call("POST", "registered-models/create", json={"name": name})
        except MlflowError as e:
            if "RESOURCE_ALREADY_EXISTS" not in str(e):
                raise

    def _versions_of_job(self, name: str, job_id: str) -> list[str]:
        query = f"name='{name}' and tags.`{JOB_TAG}`='{job_id}'"
        found = self._call("GET", "model-versions/search", params={"filter": query, "max_results": 100})
        return sorted((str(mv["version"]) for mv in found.get("model_versions", [])), key=int)

    def _keep_one(self, name: str, versions: list[str]) -> str:
        """The lowest version; any others (a lost race) are deleted."""
        if not versions:
            raise MlflowError(
                f"MLflow created a version of {name!r} but search does not find it; retry later"
            )
        keep, *extra = sorted(versions, key=int)
        for version in extra:
            try:
                self._call("DELETE", "model-versions/delete", json={"name": name, "version": version})
            except MlflowError as e:
                if "RESOURCE_DOES_NOT_EXIST" not in str(e):
                    raise
        return keep

    def _call(self, method: str, endpoint: str, **kwargs: Any) -> dict[str, Any]:
        url = f"{self.tracking_uri}/api/2.0/mlflow/{endpoint}"
        try:
            response = self._client.request(method, url, **kwargs)
        except httpx.HTTPError as e:
            raise MlflowError(
                f"MLflow at {self.tracking_uri} is unreachable ({type(e).__name__}: {e}); check QF_MLFLOW_TRACKING_URI"
            ) from e
        try:
            payload: dict[str, Any] = response.json() if response.content else {}
        except ValueError:
            payload = {"message": response.text[:300]}
        if not response.is_success:
            code = payload.get("error_code", f"HTTP {response.status_code}")
            raise MlflowError(f"MLflow {endpoint} failed: {code}: {payload.get('message', '')}".rstrip(": "))
        return payload


def _check_value(what: str, value: str) -> None:
    if not isinstance(value, str) or not SAFE_VALUE.match(value):
        raise MlflowError(f"{what} {value!r} must be 1-256 characters of letters, digits, '.', '_', '-', '/'")


def _check_source(source: str) -> None:
    scheme = urlsplit(source).scheme
    if scheme not in REMOTE_SCHEMES or len(scheme) == 1:
        raise MlflowError(
            f"artifact {source!r} is a local path, which MLflow refuses as a model version source: "
            "store artifacts in object storage (QF_OBJECT_STORE=s3://bucket/prefix) to register them"
        )


def _gate_tag(gate_passed: bool | None) -> str:
    return "none" if gate_passed is None else ("passed" if gate_passed else "failed")


def _metric_tags(metrics: Mapping[str, Any] | None) -> dict[str, str]:
    """Numbers become tags with full precision (repr of the float), so the registry can sort by them."""
    tags: dict[str, str] = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        tags[f"{METRIC_TAG_PREFIX}{key}"] = repr(float(value)) if isinstance(value, float) else str(value)
    return tags


def _version(mv: Mapping[str, Any], *, created: bool) -> RegisteredVersion:
    return RegisteredVersion(
        name=str(mv["name"]),
        version=str(mv["version"]),
        source=str(mv.get("source", "")),
        tags={t["key"]: t["value"] for t in mv.get("tags", [])},
        aliases=sorted(mv.get("aliases", [])),
        created=created,
    )
