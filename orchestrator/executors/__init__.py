"""Where attempts run: the one narrow interface (`base.Executor`), attempts on threads of the dispatcher's
process (`threads.ThreadExecutor`) and on Ray (`ray_executor.RayExecutor`, the only module that imports
Ray, imported only when chosen). Executors know the attempt (orchestrator.queue.attempt) and its reports,
never the database.
"""

from __future__ import annotations

from orchestrator.executors.base import Executor, Finished, Unschedulable
from orchestrator.executors.threads import ThreadExecutor
from orchestrator.settings import Settings

__all__ = ["Executor", "Finished", "ThreadExecutor", "Unschedulable", "build_executor"]


def build_executor(settings: Settings) -> Executor:
    """The executor the settings ask for; Ray is imported only when chosen."""
    if settings.executor == "thread":
        return ThreadExecutor(settings.concurrency or 1)
    from orchestrator.executors.ray_executor import RayExecutor

    return RayExecutor(
        address=settings.ray_address,
        cpus_per_task=settings.cpus_per_task,
        capacity=settings.concurrency,
        object_store_bytes=settings.ray_object_store_bytes,
        task_resources=settings.ray_task_resources or None,
        gpus_per_node=settings.ray_gpus_per_node,
    )
