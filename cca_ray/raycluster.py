"""How every stage reaches Ray: one function, so data, train, tune and serve share one cluster setup.

    ensure_ray()    # no-op if this process is already connected

Order of preference (what `ray.init()` does with no address): the cluster this process already
joined (tests' `ray_local`, a Tune trial), then RAY_ADDRESS (a `ray job submit` driver, a test's
subprocess), then the latest cluster `ray start` left on this machine, else a new local one.
A new local cluster keeps its dashboard on, bound to 127.0.0.1 only: Ray Train's placement-group
cleaner asks the dashboard's state API whether a run's controller still lives, and with the
dashboard off it concludes "dead" and removes the workers' placement group mid-run (STACK.md).
"""

from __future__ import annotations


def ensure_ray() -> None:
    """Join the caller's Ray cluster (or RAY_ADDRESS), else start a local one, dashboard on 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    # include_dashboard/dashboard_host only apply when a new local cluster starts; joining ignores them
    ray.init(include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True)
