"""Workarounds for behaviour of Ray and DeepSpeed that no public option changes, each with its reason.

Everything here is a candidate for deletion when the library grows a switch; nothing else in
cca-ray reaches past a library's public API.
"""

from __future__ import annotations

import logging


def skip_deepspeed_shm_build() -> None:
    """On CPU, keep DeepSpeed from JIT-compiling its shared-memory all-reduce op (~2 min per fresh machine).

    The op serves only `inference_all_reduce` (tensor-parallel inference); training collectives go
    through torch.distributed (gloo) either way. DeepSpeed builds it whenever its op-compatibility
    table says it can, and offers no config or environment switch (DS_BUILD_SHM_COMM only affects
    pre-building at install time), so the table entry is the one place to say no. Private API:
    `deepspeed.ops.__compatible_ops__`.
    """
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class _DropRayTrainReportLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(("Reporting training result", "Checkpoint successfully created"))


def quiet_ray_train_reports() -> None:
    """Drop Ray Train's `Reporting training result ...` and `Checkpoint successfully created ...` lines in this worker.

    Ray Train logs every ray.train.report call in full, once per rank, through a logger named after
    its source file, which drowned our own per-step lines (they carry the same metrics); likewise one
    checkpoint line per rank per report (our own step lines say when a checkpoint is kept). A filter on
    the root handlers (public logging API) removes just those lines and nothing else.
    """
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _DropRayTrainReportLines) for f in handler.filters):
            handler.addFilter(_DropRayTrainReportLines())


def free_orphan_placement_groups(bundle_cpu: float) -> int:
    """Free worker placement groups left behind by Tune trials that ASHA stopped.

    Ray Train's own PlacementGroupCleaner does this, but it gives up when it cannot reach the state
    API (seen with more than one Ray instance on a machine), and the next trial then waits forever
    for CPUs. Call it only when one trial runs at a time: then no live trial owns a placement group
    of the trial-worker shape, so every such group is an orphan, created or still pending (a pending
    one would take the CPUs once they free up). Returns how many were freed.
    """
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    removed = 0
    for pg_id, info in placement_group_table().items():
        bundles = list(info.get("bundles", {}).values())
        if (info.get("state") in ("CREATED", "PENDING", "RESCHEDULING") and bundles
                and all(b.get("CPU") == bundle_cpu for b in bundles)):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg_id)))
            removed += 1
    if removed:
        print(f"freed {removed} placement group(s) left by stopped trials", flush=True)
    return removed


def wait_for_train_controllers_to_exit(timeout_s: float = 30.0) -> bool:
    """Wait (bounded) until no Ray Train controller actor of this job is alive; True if none is.

    After Ctrl-C, Tune returns once it stopped the trials, but each trial's Train controller dies with
    its owner a little later, asynchronously, and meanwhile may still register its workers' placement
    group. The GCS marks a job's placement groups "creator job dead" once, when the job ends, and
    removes a group only when both its creator job and creator actor are dead (gcs_placement_group_
    manager.cc, Ray 2.60): a group registered after the job ended is never removed and holds its CPUs
    for good. So the job waits here before it frees the orphans and exits. Uses the state API (the
    dashboard); without it, returns False after one try.
    """
    import time

    import ray
    from ray.util.state import list_actors

    job = ray.get_runtime_context().get_job_id()
    deadline = time.time() + timeout_s
    while True:
        try:
            alive = list_actors(filters=[("class_name", "=", "TrainController"), ("job_id", "=", job),
                                         ("state", "!=", "DEAD")], raise_on_missing_output=False)
        except Exception:  # no state API: the caller frees what it can see
            return False
        if not alive:
            return True
        if time.time() > deadline:
            return False
        time.sleep(0.5)


def is_worker_start_timeout(e: BaseException) -> bool:
    """Whether a Train run failed because its worker group never got its resources.

    Ray Train V2 raises it as a ControllerError (public) wrapping WorkerGroupStartupTimeoutError,
    which lives in a private module; only that class tells "no resources" from other controller
    failures, and the run must then name what it asked for (cca_ray.train.driver)."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
    from ray.train.v2.api.exceptions import ControllerError

    return isinstance(e, ControllerError) and isinstance(e.controller_failure, WorkerGroupStartupTimeoutError)
