"""How jobs reach Ray: the cluster in ``RAY_ADDRESS`` or a local one on loopback (light to import)."""

from __future__ import annotations

import logging
import os
import signal

from pipeline.settings import ConfigError

WRITERS = 2  # concurrent write tasks per job: writing is cheap next to sampling
LOOPBACK = "127.0.0.1"
SOCKET_PATH_LIMIT = "AF_UNIX path length"  # how Ray's error begins when RAY_TMPDIR is too long for its sockets


TOKEN_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"


def _not_token_auth_notice(record: logging.LogRecord) -> bool:
    """Drops Ray's notice that a new local cluster uses token auth by default (its other warnings pass)."""
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


class ClusterError(ConfigError):
    """Ray could not start or be reached; the message names the cause and the fix."""


def connect_ray(dashboard: bool = True, verbose: bool = True) -> None:
    """Attach to the cluster in RAY_ADDRESS (as Ray jobs have), else start a local one on loopback.

    A local cluster binds every component to 127.0.0.1. Unless told it is not a cluster
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which each Ray process reads when it imports Ray),
    ``ray.init`` swaps a given 127.0.0.1 for the machine's own address, and its servers then listen on
    every interface. Token auth stays on, Ray's default, without its notice that it is the default.
    ``dashboard=False`` starts no dashboard (a head process and about ten module processes).
    ``verbose=False`` keeps Ray's own chatter off the console: workers' output stays in their log
    files, the raylet's notices in ``raylet.out``, Ray Data's operator progress in ``ray-data.log`` (the
    session's logs folder).
    """
    import ray

    if not ray.is_initialized():
        quiet = {} if verbose else {"log_to_driver": False, "logging_level": logging.WARNING}
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, **quiet)
        else:
            from ray._private import ray_constants

            os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"  # read by each process Ray starts
            ray_constants.ENABLE_RAY_CLUSTER = False  # read by this one at import: else ray.init resolves 127.0.0.1 away
            logging.getLogger(TOKEN_SETUP_LOGGER).addFilter(_not_token_auth_notice)
            _start_local(dashboard, quiet)
    if not verbose:
        _keep_raylet_notices_off_console()
        quiet_ray_data()


def _keep_raylet_notices_off_console() -> None:
    """Ray prints the raylet's notices (e.g. "N PYTHON worker processes have been started") on the
    driver's console from a thread that ``log_to_driver`` does not govern (ray-project/ray#63800);
    this drops them there. The raylet writes each to its own log, ``raylet.out``."""
    from ray._private import worker

    printer = worker.print_to_stdstream
    if getattr(printer, "drops_raylet_notices", False):
        return

    def print_all_but_raylet_notices(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") != "raylet":
            printer(data, ignore_prefix)

    print_all_but_raylet_notices.drops_raylet_notices = True
    worker.print_to_stdstream = print_all_but_raylet_notices


def _start_local(dashboard: bool, options: dict) -> None:
    import ray

    try:
        ray.init(address="local", _node_ip_address=LOOPBACK, include_dashboard=dashboard, **options)
    except Exception as error:
        ray.shutdown()
        folder = os.environ.get("RAY_TMPDIR", "/tmp")
        if SOCKET_PATH_LIMIT in str(error):
            raise ClusterError(
                f"Ray could not start: its socket paths under RAY_TMPDIR={folder} exceed the 107 bytes a Unix "
                "socket allows; set RAY_TMPDIR to a short folder, e.g. RAY_TMPDIR=/tmp") from error
        raise ClusterError(f"Ray could not start a local cluster ({type(error).__name__}: "
                           f"{str(error).splitlines()[0] if str(error) else 'no message'}); its logs are in "
                           f"{folder}/ray/session_latest/logs") from error


def quiet_ray_data() -> None:
    """Ray Data in this process without progress bars, operator blocks or INFO lines on the console; its
    log file (``ray-data.log`` in the session's logs) keeps everything."""
    import ray.data
    from ray.data._internal.logging import SessionFileHandler

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, SessionFileHandler):
            handler.setLevel(logging.CRITICAL + 1)


def leave_ray() -> None:
    """Leave Ray at once (after Ctrl-C), a second Ctrl-C ignored meanwhile: a local cluster this process
    started stops with it, a cluster in RAY_ADDRESS is only left."""
    import ray

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ray.shutdown()
    finally:
        signal.signal(signal.SIGINT, previous)


def logs_folder() -> str | None:
    """The logs folder of this machine's Ray session (workers' output, ``ray-data.log``), if connected."""
    import ray

    node = ray._private.worker._global_node
    return node.get_logs_dir_path() if node is not None else None
