"""Service settings, read from QF_* environment variables. Defaults are the embedded single-machine setup:
SQLite under ./var, objects under ./var/objects, local Ray, inputs from the assets cache and ./models."""

from __future__ import annotations

import os
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from orchestrator.fleet.webhooks import parse_networks
from workers.uris import InputPolicy


def _default_roots() -> list[Path]:
    assets = os.environ.get("QF_ASSETS_DIR") or ".cache/assets"
    return [Path(assets).resolve(), Path("models").resolve()]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QF_", extra="ignore", populate_by_name=True)

    database_url: str = Field(
        default="sqlite:///./var/quantfleet.db", description="SQLAlchemy URL of the job database"
    )
    object_store: str = Field(
        default="./var/objects", description="where artifacts go: a directory or s3://bucket/prefix"
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("QF_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"),
        description="S3-compatible endpoint (MinIO, moto); unset means AWS",
    )
    allowed_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=_default_roots, description="local directories jobs may read models and data from"
    )
    allowed_buckets: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="S3 buckets jobs may read models and data from"
    )
    allowed_output_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="local directories a job's output.uri may point into (its owner's folder in them)",
    )
    cache_dir: Path = Field(default=Path("./var/cache"), description="downloaded S3 inputs")
    work_dir: Path = Field(default=Path("./var/work"), description="scratch space for running attempts")

    executor: Literal["ray", "thread"] = "ray"
    ray_address: str | None = Field(
        default=None, validation_alias=AliasChoices("QF_RAY_ADDRESS", "RAY_ADDRESS")
    )
    ray_object_store_bytes: int = 256 * 1024 * 1024
    cpus_per_task: int = Field(default=1, ge=1)
    concurrency: int | None = Field(
        default=None, ge=1, description="attempts one dispatcher runs at once; None = auto"
    )

    lease_seconds: float = Field(
        default=60.0, gt=0, description="a running attempt whose lease is older is rescued"
    )
    heartbeat_seconds: float | None = Field(
        default=None, gt=0, description="default: a third of lease_seconds"
    )
    poll_seconds: float = Field(default=1.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    retry_backoff_seconds: float = Field(
        default=10.0, ge=0, description="first retry delay; doubles per attempt"
    )
    retry_backoff_max_seconds: float = Field(default=600.0, ge=0)

    scheduler_poll_seconds: float = Field(
        default=5.0, gt=0, description="how often the scheduler looks for due fires"
    )
    schedule_grace_seconds: float = Field(
        default=90.0,
        ge=0,
        description="a fire seen later than this after its time counts as missed (missed-fire policy)",
    )
    max_matrix_jobs: int = Field(
        default=64, ge=1, description="most jobs one batch or schedule fire may create"
    )
    webhook_allow_loopback: bool = Field(
        default=False,
        description="let webhooks target loopback addresses (single-host installs and tests only)",
    )
    webhook_allowed_networks: Annotated[list[IPv4Network | IPv6Network], NoDecode] = Field(
        default_factory=list,
        description="networks webhooks may target besides public addresses, as comma-separated CIDRs "
        "(e.g. 10.20.0.0/16 for an internal registry); cloud metadata addresses stay refused",
    )
    webhook_max_attempts: int = Field(default=6, ge=1)
    webhook_backoff_seconds: float = Field(
        default=2.0, ge=0, description="first webhook retry delay; doubles per attempt"
    )
    webhook_backoff_max_seconds: float = Field(default=300.0, ge=0)
    webhook_timeout_seconds: float = Field(default=10.0, gt=0)
    delivery_poll_seconds: float = Field(
        default=1.0, gt=0, description="how often pending webhooks/registrations are sent"
    )
    mlflow_tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking server; when set, artifacts that pass their gate are registered there",
    )
    ray_task_resources: dict[str, float] = Field(
        default_factory=dict,
        description='extra Ray resources each attempt needs, as JSON (e.g. {"gpu_a100": 1}); replaces the GPU request',
    )
    ray_gpus_per_node: int | None = Field(
        default=None,
        ge=1,
        description="GPUs of each GPU node of a cluster that autoscales them from zero (KubeRay): attempts "
        "ask Ray for GPUs even while no GPU node is up, and a job asking for more fails at once",
    )
    metrics_port: int | None = Field(
        default=None, ge=1, le=65535, description="`quantfleet dispatcher`: serve /metrics here"
    )

    no_auth: bool = False
    auth_cache_seconds: float = Field(
        default=10.0,
        ge=0,
        description="an API process keeps a checked API key this long (a revoked key works at most this much longer); 0: check every request",
    )
    db_pool_size: int = Field(
        default=20,
        ge=1,
        description="database connections an API process keeps open (PostgreSQL); a request thread past them "
        "opens one more (up to twice this many) and closes it when done, which costs a connection set-up",
    )
    submit_threads: int = Field(
        default=8,
        ge=1,
        description="submits (POST /v1/jobs) an API process runs at once, each on a thread (checks and insert); "
        "the others wait their turn in arrival order. More threads than this only contend for the interpreter",
    )
    max_active_jobs_per_owner: int = Field(default=100, ge=1)
    max_streams_per_key: int = Field(
        default=20, ge=1, description="open event streams (events?follow=true) one API key may hold per API process"
    )
    max_model_bytes: int = Field(default=200 * 1024**3, ge=1)

    @field_validator("allowed_roots", "allowed_output_roots", mode="before")
    @classmethod
    def _split_paths(cls, value: object) -> object:
        if isinstance(value, str):
            return [Path(p).expanduser().resolve() for p in value.split(",") if p.strip()]
        return value

    @field_validator("webhook_allowed_networks", mode="before")
    @classmethod
    def _split_networks(cls, value: object) -> object:
        if isinstance(value, str):
            return list(parse_networks(v for v in value.split(",") if v.strip()))
        return value

    @field_validator("allowed_buckets", mode="before")
    @classmethod
    def _split_names(cls, value: object) -> object:
        return [b.strip() for b in value.split(",") if b.strip()] if isinstance(value, str) else value

    @property
    def heartbeat_interval(self) -> float:
        return self.heartbeat_seconds or self.lease_seconds / 3

    def input_policy(self) -> InputPolicy:
        return InputPolicy(
            allowed_roots=tuple(Path(p).resolve() for p in self.allowed_roots),
            allowed_buckets=tuple(self.allowed_buckets),
            s3_endpoint_url=self.s3_endpoint_url,
        )

    def output_policy(self) -> InputPolicy:
        """Where output.uri may point: the allowed output roots and buckets, in the owner's folder
        (orchestrator.queue.outputs). The local object store is listed so that a path into it gets the clearer
        refusal of orchestrator.queue.outputs (no output.uri may lie inside the object store)."""
        roots = [Path(p).resolve() for p in self.allowed_output_roots]
        if "://" not in self.object_store:
            roots.append(Path(self.object_store).resolve())
        return InputPolicy(tuple(roots), tuple(self.allowed_buckets), self.s3_endpoint_url)
