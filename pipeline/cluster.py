"""How jobs reach Ray: the cluster in ``RAY_ADDRESS`` or a local one on loopback (light to import)."""

from __future__ import annotations

import os

WRITERS = 2  # concurrent write tasks per job: writing is cheap next to sampling


def connect_ray(dashboard: bool = True) -> None:
    """Attach to the cluster in RAY_ADDRESS (as Ray jobs have), else start a local one on loopback.

    ``dashboard=False`` starts the local cluster without Ray's dashboard (a head process and about
    ten module processes): a job nobody watches saves their memory. A given cluster keeps its own.
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=dashboard)
