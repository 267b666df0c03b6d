"""GPUs per job (`gpus` in the request → JobSpec.devices → the Ray task's resource request): the options
dict for each kind of cluster, the readable refusal of jobs no node could run, torch threads from the
CPUs a task holds, and the dispatcher failing such a job at once instead of leaving it in Ray's queue."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from orchestrator.dispatcher import Dispatcher
from orchestrator.executors import Finished, Unschedulable
from orchestrator.executors.ray_executor import ClusterShape, task_options, torch_threads
from orchestrator.queue.attempt import AttemptTicket
from orchestrator.queue.specs import engine_spec
from tests.orchestrator.support import events, gptq_body, load_job, service_settings, sessions_for, submit

CPU_ONLY = ClusterShape(total={"CPU": 8.0}, largest_node={"CPU": 8.0})
# Two nodes of 4 GPUs each: 8 in total, but one attempt can hold at most 4.
TWO_GPU_NODES = ClusterShape(total={"CPU": 32.0, "GPU": 8.0}, largest_node={"CPU": 16.0, "GPU": 4.0})


def test_gpu_cluster_requests_the_jobs_gpus() -> None:
    assert task_options(TWO_GPU_NODES, devices=1, cpus_per_task=1) == {"num_gpus": 1, "num_cpus": 1}
    assert task_options(TWO_GPU_NODES, devices=4, cpus_per_task=2) == {"num_gpus": 4, "num_cpus": 2}


def test_more_gpus_than_the_largest_node_is_refused() -> None:
    with pytest.raises(Unschedulable) as e:
        task_options(TWO_GPU_NODES, devices=8, cpus_per_task=1)
    assert str(e.value) == "gpus=8 requested but the largest node of the Ray cluster has 4 GPUs"


def test_cpu_cluster_runs_one_device_jobs_on_cpus_and_refuses_more() -> None:
    assert task_options(CPU_ONLY, devices=1, cpus_per_task=4) == {"num_cpus": 4}
    with pytest.raises(Unschedulable) as e:
        task_options(CPU_ONLY, devices=2, cpus_per_task=1)
    assert str(e.value) == "gpus=2 requested but the cluster has no GPUs"


def test_custom_resources_stand_for_each_gpu() -> None:
    shape = ClusterShape(total={"CPU": 2.0, "qf_gpu": 4.0}, largest_node={"CPU": 1.0, "qf_gpu": 2.0})
    assert task_options(shape, devices=1, cpus_per_task=1, task_resources={"qf_gpu": 1}) == {
        "num_cpus": 1,
        "resources": {"qf_gpu": 1},
    }
    assert task_options(shape, devices=2, cpus_per_task=1, task_resources={"qf_gpu": 1}) == {
        "num_cpus": 1,
        "resources": {"qf_gpu": 2},
    }
    with pytest.raises(Unschedulable, match=r"gpus=3 requested but no node .* offers 3 qf_gpu .* is 2"):
        task_options(shape, devices=3, cpus_per_task=1, task_resources={"qf_gpu": 1})


def test_custom_resources_on_a_gpu_cluster_also_ask_for_the_gpus() -> None:
    """Without num_gpus Ray sets no CUDA_VISIBLE_DEVICES, and every attempt on a node would use cuda:0."""
    shape = ClusterShape(total={"CPU": 8.0, "GPU": 4.0, "gpu_h100": 4.0}, largest_node={"CPU": 8.0, "GPU": 4.0, "gpu_h100": 4.0})
    assert task_options(shape, devices=2, cpus_per_task=1, task_resources={"gpu_h100": 1}) == {
        "num_cpus": 1,
        "resources": {"gpu_h100": 2},
        "num_gpus": 2,
    }


class FakeRay:
    """What ClusterShape.of reads: ray.nodes() and ray.cluster_resources()."""

    def nodes(self) -> list[dict[str, Any]]:
        return [
            {"Alive": True, "Resources": {"CPU": 16.0, "GPU": 4.0}},
            {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 2.0}},
            {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}},  # a dead node offers nothing
        ]

    def cluster_resources(self) -> dict[str, float]:
        return {"CPU": 24.0, "GPU": 6.0}


def test_cluster_shape_takes_the_largest_live_node() -> None:
    shape = ClusterShape.of(FakeRay())
    assert shape.largest_node == {"CPU": 16.0, "GPU": 4.0}
    assert shape.total == {"CPU": 24.0, "GPU": 6.0} and shape.gpus == 6


def test_torch_threads_follow_the_cpus_a_task_holds() -> None:
    assert torch_threads({"CPU": 6.0}) == 6
    assert torch_threads({"CPU": 1.0, "GPU": 2.0}) == 1
    assert torch_threads({"GPU": 1.0}) == 1  # a task holding no CPU still runs one thread
    assert torch_threads({"CPU": 0.5}) == 1


def test_spec_conversion_carries_gpus_to_devices() -> None:
    def same(uri: str, kind: str, what: str) -> str:
        return uri

    spec = {
        "model": "/m",
        "method": "rtn",
        "bits": 4,
        "group_size": 128,
        "symmetric": True,
        "output": {"formats": ["compressed-tensors"]},
    }
    assert engine_spec(spec, same).devices == 1  # stored before the field existed
    assert engine_spec({**spec, "gpus": 4}, same).devices == 4


class RefusingExecutor:
    """An executor whose cluster cannot run multi-GPU jobs (like RayExecutor on a CPU-only cluster)."""

    capacity = 2

    def __init__(self) -> None:
        self.started: list[str] = []

    def attach(self, sink: object) -> None:
        pass

    def submit(self, ticket: AttemptTicket) -> None:
        gpus = ticket.spec.get("gpus", 1)
        if gpus > 1:
            raise Unschedulable(f"gpus={gpus} requested but the cluster has no GPUs")
        self.started.append(ticket.job_id)

    def poll(self) -> list[Finished]:
        return []

    def cancel(self, job_id: str) -> None:
        pass

    def detach(self) -> bool:
        return False

    def adopt(self, job_id: str, attempt: int) -> bool:
        return False

    def shutdown(self) -> None:
        pass


def test_dispatcher_fails_an_unschedulable_job_at_once_without_retries(
    database_url: str, allowed_root: Path, tiny_assets: dict, tmp_path: Path
) -> None:
    settings = service_settings(database_url, allowed_root, tmp_path, max_attempts=3)
    sessions = sessions_for(database_url)
    wide = submit(sessions, gptq_body(tiny_assets, gpus=2), settings)
    narrow = submit(sessions, gptq_body(tiny_assets), settings)
    executor = RefusingExecutor()
    dispatcher = Dispatcher(sessions, executor, settings, name="d-gpus")
    assert dispatcher.step() == 2
    job = load_job(sessions, wide)
    assert job.state == "failed" and job.attempts == 1
    assert job.error == "gpus=2 requested but the cluster has no GPUs"
    assert [e.state for e in events(sessions, wide) if e.kind == "state"] == ["queued", "running", "failed"]
    assert executor.started == [narrow] and dispatcher.in_flight == {narrow: 1}


def test_an_autoscaled_cluster_asks_for_gpus_while_none_is_up() -> None:
    scaled_to_zero = ClusterShape(total={"CPU": 0.0}, largest_node={"CPU": 0.0})
    shape = scaled_to_zero.expecting(1)
    assert shape.gpus == 1
    assert task_options(shape, devices=1, cpus_per_task=1) == {"num_gpus": 1, "num_cpus": 1}
    with pytest.raises(
        Unschedulable, match="gpus=2 requested but the largest node of the Ray cluster has 1 GPUs"
    ):
        task_options(shape, devices=2, cpus_per_task=1)
    assert TWO_GPU_NODES.expecting(2) == TWO_GPU_NODES  # nodes already up that are larger count
    assert CPU_ONLY.expecting(None) is CPU_ONLY


def test_the_demo_shares_the_machines_cpus_between_its_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    from quantfleet.demo import demo_cpus_per_task

    monkeypatch.delenv("QF_CPUS_PER_TASK", raising=False)
    assert demo_cpus_per_task(2, 16, configured=1) == 8  # two jobs at once, 8 torch threads each
    assert demo_cpus_per_task(2, 2, configured=1) == 1
    assert demo_cpus_per_task(3, 1, configured=1) == 1
    monkeypatch.setenv("QF_CPUS_PER_TASK", "3")
    assert demo_cpus_per_task(2, 16, configured=3) == 3  # an explicit setting wins
