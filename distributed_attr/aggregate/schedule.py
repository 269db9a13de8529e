"""Ray scheduling of the reader tasks: groups of units, CPUs for a local Ray, tasks in flight."""
from __future__ import annotations

import functools
import math
import os
from typing import Any, Iterable

import numpy as np

from .plan import PartialAggregate, ReadPlan
from .reader import aggregate_units


def plan_groups(units: Iterable[int], n_groups: int) -> list[list[int]]:
    """Split sorted unit indices into ``n_groups`` contiguous groups of near-equal size."""
    units = sorted(int(u) for u in units)
    n_groups = max(1, min(n_groups, len(units)))
    bounds = np.linspace(0, len(units), n_groups + 1).round().astype(int)
    return [units[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def local_cpus(num_workers: int | None, threads: int = 1) -> int:
    """CPUs for a local Ray started by the job: this machine's, or more when ``num_workers`` tasks
    of ``threads`` CPUs were asked for, so that they run side by side as asked (oversubscribing
    the cores)."""
    return max(os.cpu_count() or 1, (num_workers or 0) * threads)


@functools.lru_cache(maxsize=None)
def remote_reader_task() -> Any:
    """``aggregate_units`` as a Ray remote function, made on first use and then reused, so that it
    is exported to the cluster once per driver process, not once per job (Ray is imported only
    here, when a job runs on it)."""
    import ray

    return ray.remote(num_cpus=1, max_retries=2)(aggregate_units)


def _run_tasks(plan: ReadPlan, groups: list[list[int]], num_workers: int) -> PartialAggregate:
    """At most ``num_workers`` reader tasks in flight; states merged in completion order."""
    import ray

    task = remote_reader_task()
    plan_ref = ray.put(plan)
    total = PartialAggregate()
    pending = list(groups)
    in_flight: list[Any] = []
    # a task asks for as many CPUs as it runs threads, so the scheduler does not oversubscribe
    task = task.options(num_cpus=max(1, plan.threads))
    while pending or in_flight:
        while pending and len(in_flight) < num_workers:
            in_flight.append(task.remote(plan_ref, pending.pop(0)))
        ready, in_flight = ray.wait(in_flight, num_returns=1)
        total.merge(ray.get(ready[0]))
    return total


def aggregate_on_ray(plan: ReadPlan, done: np.ndarray, num_workers: int | None,
                      units_per_task: int) -> tuple[int, PartialAggregate]:
    """Reader tasks over the done units on the Ray cluster this process is connected to."""
    import ray

    # a task must fit on a node; with no CPU node up yet (an autoscaling cluster whose head
    # has CPU: 0) the request stands and the autoscaler brings nodes
    largest = int(max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0))
    if largest >= 1:
        plan.threads = min(plan.threads, largest)
    n_tasks = math.ceil(len(done) / max(1, units_per_task))
    cpus = int(ray.cluster_resources().get("CPU", 0))
    if num_workers:
        workers = int(num_workers)
    elif cpus >= plan.threads:
        workers = cpus // plan.threads
    else:  # no CPUs yet: put every task up, so that the autoscaler sees the whole demand
        workers = max(1, n_tasks)
    groups = plan_groups(done, max(workers, n_tasks))
    return workers, (_run_tasks(plan, groups, workers) if groups else PartialAggregate())
