"""The few private attributes of dependencies that tests read, each because no public API says the same.

Each has one function here and a check in tests/test_private_apis.py that fails, naming it and the
installed version, when an upgrade removes or changes it.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Callable

from torch import nn


def compiled_in_place(module: nn.Module) -> bool:
    """Whether ``module.compile()`` ran on this module.

    torch has no public query: ``nn.Module.compile()`` stores its compiled call in the private
    ``Module._compiled_call_impl`` (None until then). Running the module under a hook would tell too,
    but costs a full inductor compile.
    """
    return getattr(module, "_compiled_call_impl", None) is not None



def migrate_new_mlflow_stores_once(folder: Path) -> Callable[[], None]:
    """Build one empty sqlite MLflow store at MLflow's latest schema in ``folder``, and make every new
    sqlite store this process opens from then on start as a copy of it; returns the function that undoes it.

    MLflow builds a new sqlite store by replaying each of its schema migrations (seconds of CPU and disk
    syncs, in most tests); sqlite's backup API copies the migrated result at once: still a new, empty store
    of its own. No public API skips the replay: it is the private ``mlflow.store.db.utils._initialize_tables``,
    which SqlAlchemyStore calls on a store without tables.
    """
    import sqlalchemy
    from mlflow.store.db import utils

    replay = utils._initialize_tables
    template = folder / "migrated.db"
    engine = sqlalchemy.create_engine(f"sqlite:///{template}")
    replay(engine)
    engine.dispose()

    def copy_template(engine) -> None:
        if engine.dialect.name != "sqlite":
            return replay(engine)
        target = engine.raw_connection()
        try:
            with closing(sqlite3.connect(template)) as source:
                source.backup(target.driver_connection)
        finally:
            target.close()

    utils._initialize_tables = copy_template
    return lambda: setattr(utils, "_initialize_tables", replay)
