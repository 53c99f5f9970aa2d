"""The few private attributes of dependencies that tests read, each because no public API says the same.

Each has one function here and a check in tests/test_private_apis.py that fails, naming it and the
installed version, when an upgrade removes or changes it.
"""

from __future__ import annotations

from torch import nn


def compiled_in_place(module: nn.Module) -> bool:
    """Whether ``module.compile()`` ran on this module.

    torch has no public query: ``nn.Module.compile()`` stores its compiled call in the private
    ``Module._compiled_call_impl`` (None until then). Running the module under a hook would tell too,
    but costs a full inductor compile.
    """
    return getattr(module, "_compiled_call_impl", None) is not None
