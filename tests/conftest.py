import os

import pytest

# Keep Ray quiet and local in tests; MLflow never reaches a server unless the user set one.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray cluster for the whole test session (loopback only).

    Stage CLIs started by tests as subprocesses join it through RAY_ADDRESS instead of starting
    a second cluster: with two local clusters on one machine, Ray Train's placement-group cleaner
    cannot tell which one to ask ("multiple active Ray instances") and stops cleaning up.
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    if os.path.exists(os.path.expanduser("~/.ray/auth_token")):
        os.environ["RAY_AUTH_MODE"] = "token"
    yield ray
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    ray.shutdown()


@pytest.fixture(scope="session")
def process_group():
    """One single-process gloo group (what Ray Train sets up per worker) for the whole session: DeepSpeed
    keeps the first group it saw, so a group destroyed and re-created between test modules breaks the
    engines of the later module ("Group ... is not registered")."""
    import torch.distributed as dist

    from cca_ray.train.recipe import local_process_group

    local_process_group()
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
