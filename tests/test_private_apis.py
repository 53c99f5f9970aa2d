"""Private dependency APIs the project still reads (no public one says the same): loud when an upgrade moves them.

Each test names the private attribute, who reads it and the installed version, so the failure says
what to fix. All are cheap: nothing is compiled by inductor.
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
