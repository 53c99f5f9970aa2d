"""Private dependency APIs the project still reads (no public one says the same): loud when an upgrade moves them.

Each test names the private attribute, who reads it and the installed version, so the failure says
what to fix. All are cheap: nothing is compiled by inductor, no Ray is started.
"""

from __future__ import annotations

import torch
from mlflow import MlflowClient
from torch import nn

from benchmarks.bench_compile import graphs_compiled
from tests.private_apis import compiled_in_place


def test_module_compile_still_sets_the_private_compiled_call():
    module = nn.Linear(2, 2)
    assert not compiled_in_place(module)
    module.compile()
    assert compiled_in_place(module), (
        f"torch {torch.__version__}: nn.Module.compile() no longer sets the private Module._compiled_call_impl "
        "that tests/private_apis.py compiled_in_place reads; find what marks a module compiled in place now")


def test_dynamo_still_counts_the_graphs_it_compiles():
    before = graphs_compiled()
    add_one = torch.compile(lambda x: x + 1, backend="eager")  # dynamo traces; no inductor compile
    add_one(torch.ones(3))
    assert graphs_compiled() == before + 1, (
        f"torch {torch.__version__}: torch._dynamo.utils.counters['stats']['unique_graphs'] no longer counts "
        "compiled graphs; benchmarks/bench_compile.py graphs_compiled reads it")


def test_ray_still_has_the_private_names_cluster_reads():
    import importlib.util
    import inspect

    import ray
    from ray._private import ray_constants, worker

    from pipeline.cluster import TOKEN_SETUP_LOGGER

    version = f"ray {ray.__version__}"
    assert isinstance(getattr(ray_constants, "ENABLE_RAY_CLUSTERS_ENV_VAR", None), str), (
        f"{version}: ray._private.ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR is gone; pipeline/cluster.py connect_ray "
        "sets it so that a local cluster stays on 127.0.0.1")
    assert hasattr(ray_constants, "ENABLE_RAY_CLUSTER"), (
        f"{version}: ray._private.ray_constants.ENABLE_RAY_CLUSTER is gone; pipeline/cluster.py connect_ray clears it")
    assert hasattr(worker, "_global_node"), (
        f"{version}: ray._private.worker._global_node is gone; pipeline/cluster.py logs_folder reads the session's logs from it")
    assert 'kwargs.pop("_node_ip_address"' in inspect.getsource(ray.init), (  # a keyword it pops from **kwargs
        f"{version}: ray.init lost its _node_ip_address keyword; pipeline/cluster.py _start_local binds to loopback with it")
    assert importlib.util.find_spec(TOKEN_SETUP_LOGGER) is not None, (
        f"{version}: the logger module {TOKEN_SETUP_LOGGER} is gone; pipeline/cluster.py filters its notice by this name")


def test_ray_data_still_has_its_session_file_handler():
    import logging

    import ray

    from ray.data._internal.logging import SessionFileHandler

    assert issubclass(SessionFileHandler, logging.Handler), (
        f"ray {ray.__version__}: ray.data._internal.logging.SessionFileHandler is no longer a logging handler; "
        "pipeline/cluster.py quiet_ray_data keeps it while it silences Ray Data's console handlers")


def test_ray_job_head_still_says_no_available_agent():
    import inspect

    import ray
    from ray.dashboard.modules.job import job_head

    assert "No available agent" in inspect.getsource(job_head), (
        f"ray {ray.__version__}: the job head no longer answers 'No available agent' while its agent starts; "
        "jobs/submission.py submit retries on that text")


def test_torch_still_has_its_jvp_decompositions_module():
    import importlib.util

    assert importlib.util.find_spec("torch._decomp.decompositions_for_jvp") is not None, (
        f"torch {torch.__version__}: torch._decomp.decompositions_for_jvp is gone; guidance/log_volume.py imports it "
        "early to keep its torch.jit.script warning quiet")


def test_a_new_mlflow_store_is_still_built_by_the_private_initialize_tables(tmp_path, monkeypatch):
    """The session's stores start as copies of one migrated store (tests/private_apis.py): MLflow must still
    build a new store's tables through the function the copy replaces, and accept the copy's schema."""
    import mlflow
    from mlflow.store.db import utils

    calls = []
    builds = utils._initialize_tables
    monkeypatch.setattr(utils, "_initialize_tables", lambda engine: calls.append(engine) or builds(engine))
    experiments = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_experiments()  # the schema is checked here
    assert len(calls) == 1, (
        f"mlflow {mlflow.__version__}: a new sqlite store no longer calls the private "
        "mlflow.store.db.utils._initialize_tables that tests/private_apis.py migrate_new_mlflow_stores_once replaces")
    assert [experiment.name for experiment in experiments] == ["Default"]
