"""Request and response bodies of the fleet endpoints: schedules, batches, webhooks and the artifact index.
Like api/schemas.py, request models forbid unknown fields so a typo is a 422 naming the field."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from api.schemas import ArtifactOut, Strict

EXAMPLE_TEMPLATE = {
    "calibration": {"uri": "/srv/data/shakespeare-calibration.txt", "num_samples": 128, "seq_len": 512},
    "eval": {"uri": "/srv/data/shakespeare-eval.txt", "seq_len": 512},
    "gate": {"max_delta_ppl_pct": 5.0, "max_kl": 0.05},
    "labels": {"team": "nlp"},
}
EXAMPLE_MATRIX = {
    "model": ["/srv/models/SmolLM2-135M-Instruct"],
    "method": ["gptq", "awq"],
    "bits": [4, 8],
    "group_size": [32, 64],
}

MAX_AXIS_VALUES = 1024  # above any sensible QF_MAX_MATRIX_JOBS: the product is checked against that
MAX_TEMPLATE_FIELDS = 64  # a job request has fewer fields; unknown ones are refused when it is checked
# axes: model, method, bits, group_size (checked by orchestrator.fleet.schedules)
Matrix = Annotated[dict[str, Annotated[list[Any], Field(max_length=MAX_AXIS_VALUES)]], Field(max_length=8)]
Template = Annotated[dict[str, Any], Field(max_length=MAX_TEMPLATE_FIELDS)]
EventName = Annotated[str, Field(max_length=64)]


class MatrixIn(Strict):
    template: Template = Field(
        description="Fields of a job request (as for POST /v1/jobs) shared by every job; the matrix axes "
        "(model, method, bits, group_size) go in `matrix` instead",
        examples=[EXAMPLE_TEMPLATE],
    )
    matrix: Matrix | None = Field(
        default=None, description="Axis → values; one job per combination", examples=[EXAMPLE_MATRIX]
    )


class BatchCreate(MatrixIn):
    name: str | None = Field(default=None, max_length=128)


class BatchJobRow(BaseModel):
    job_id: str
    url: str
    state: str
    model: str | None
    method: str | None
    bits: int | None
    group_size: int | None
    ppl_original: float | None = None
    ppl_quantized: float | None = None
    delta_ppl_pct: float | None = None
    kl_mean: float | None = None
    kl_p99: float | None = None
    top1_agreement: float | None = None
    gate_passed: bool | None = None
    bytes_quantized: int | None = None
    duration_s: float | None = None
    attempts: int
    error: str | None = None
    output_uri: str | None = None


class BatchOut(BaseModel):
    id: str
    url: str
    name: str | None
    owner: str
    schedule_id: str | None = Field(default=None, description="The schedule whose fire created this batch")
    fire_time: datetime | None = None
    created_at: datetime
    total: int
    done: bool = Field(description="Every job reached succeeded, failed or cancelled")
    counts: dict[str, int] = Field(description="Jobs per state")
    jobs: list[BatchJobRow] = Field(description="One row per job: matrix cell, state, metrics, gate")


class BatchSummaryOut(BaseModel):
    id: str
    url: str
    name: str | None
    schedule_id: str | None
    fire_time: datetime | None
    created_at: datetime


class BatchPage(BaseModel):
    batches: list[BatchSummaryOut]


class ScheduleCreate(MatrixIn):
    name: str = Field(min_length=1, max_length=128)
    cron: str = Field(
        max_length=128, description="Five cron fields (minute hour day month weekday) or @daily/@hourly/..."
    )
    tz: str = Field(default="UTC", max_length=64, description="IANA time zone the cron expression is read in")
    missed_fire_policy: Literal["skip", "run_once"] = Field(
        default="skip", description="After scheduler downtime: skip missed fires, or run one catch-up"
    )
    paused: bool = False


class ScheduleUpdate(Strict):
    name: str | None = Field(default=None, min_length=1, max_length=128)
    cron: str | None = Field(default=None, max_length=128)
    tz: str | None = Field(default=None, max_length=64)
    missed_fire_policy: Literal["skip", "run_once"] | None = None
    template: Template | None = None
    matrix: Matrix | None = None


class FireOut(BaseModel):
    fire_time: datetime
    catch_up: bool
    batch_id: str | None
    fired_by: str
    created_at: datetime


class ScheduleOut(BaseModel):
    id: str
    url: str
    name: str
    owner: str
    cron: str
    tz: str
    missed_fire_policy: str
    paused: bool
    next_fire_at: datetime | None = Field(description="Next occurrence (UTC); null while paused")
    last_fire_at: datetime | None
    template: dict[str, Any]
    matrix: dict[str, Any] | None
    jobs_per_fire: int
    recent_fires: list[FireOut] = Field(description="The last fires, newest first")
    created_at: datetime
    updated_at: datetime


class SchedulePage(BaseModel):
    schedules: list[ScheduleOut]


class WebhookCreate(Strict):
    url: str = Field(description="http(s) URL that receives signed POSTs", max_length=2048)
    events: list[EventName] = Field(
        default_factory=lambda: ["job.succeeded", "job.failed", "job.gate_failed"],
        max_length=16,
        description="Any of job.succeeded, job.failed, job.gate_failed",
    )
    secret: str | None = Field(
        default=None, min_length=16, max_length=128, description="HMAC-SHA256 key; generated when omitted"
    )
    all_owners: bool = Field(default=False, description="Admin keys only: events of every owner's jobs")


class WebhookUpdate(Strict):
    url: str | None = Field(default=None, max_length=2048)
    events: list[EventName] | None = Field(default=None, max_length=16)
    active: bool | None = None


class WebhookOut(BaseModel):
    id: str
    url: str
    owner: str
    events: list[str]
    all_owners: bool
    active: bool
    created_at: datetime
    secret: str | None = Field(
        default=None,
        description="Only in the response that created the webhook: verify X-QuantFleet-Signature with it",
    )


class WebhookPage(BaseModel):
    webhooks: list[WebhookOut]


class AttemptOut(BaseModel):
    attempt: int
    at: datetime
    duration_ms: int
    status_code: int | None
    ok: bool
    error: str | None = Field(description="Why the attempt failed (the receiver's reply is never kept)")


class DeliveryOut(BaseModel):
    id: str = Field(description="Also sent as X-QuantFleet-Delivery: receivers deduplicate on it")
    event: str
    job_id: str | None
    state: Literal["pending", "succeeded", "failed"]
    attempts: int
    next_attempt_at: datetime | None
    created_at: datetime
    finished_at: datetime | None
    attempt_log: list[AttemptOut]


class DeliveryPage(BaseModel):
    deliveries: list[DeliveryOut]


class ArtifactSetOut(BaseModel):
    job_id: str
    job_url: str
    owner: str
    model: str
    base_model: str | None
    method: str
    bits: int
    group_size: int
    labels: dict[str, str]
    output_uri: str | None
    manifest_uri: str | None = Field(description="manifest.json: every file with its sha256 and size")
    finished_at: datetime | None
    metrics: dict[str, Any] | None
    gate: dict[str, Any] | None = Field(description="Verdict of the job's quality gate; null without a gate")
    files: list[ArtifactOut]


class ArtifactPage(BaseModel):
    artifacts: list[ArtifactSetOut]
    next_cursor: str | None = None
