"""Real services for the tests, bound to 127.0.0.1 and stopped afterwards: an S3-protocol server
(moto's standalone server, with IAM authentication switched on), a proxy in front of it that injects
network faults, and a local Ray cluster."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import boto3
import botocore.exceptions

BOOTSTRAP_ACTIONS = 3  # create user, attach its S3 policy, create its key; every later request is authenticated


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    process: subprocess.Popen

    def client(self, access_key: str | None = None, secret_key: str | None = None):
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=access_key or self.access_key,
                            aws_secret_access_key=secret_key or self.secret_key)

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=30)


def start_s3_server(log: Path) -> S3Server:
    """moto_server on a free loopback port; returns the credentials of an S3-only IAM user."""
    port = free_port()
    env = os.environ | {"INITIAL_NO_AUTH_ACTION_COUNT": str(BOOTSTRAP_ACTIONS)}
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                   env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                       aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
    deadline = time.monotonic() + 60
    while True:
        try:
            iam.create_user(UserName="tester")
            break
        except botocore.exceptions.EndpointConnectionError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"moto_server did not start; see {log}")
            time.sleep(0.2)
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="tester", PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="tester")["AccessKey"]
    return S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"], process)


@dataclass(frozen=True)
class RayHead:
    """A Ray head started with ``ray start --head`` on loopback, with its token auth on."""

    address: str  # the job API
    gcs_port: int
    process: subprocess.Popen

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)  # `ray start --block` stops what it started
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:  # it waits about 30 s for its processes to exit: end the group now
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        current = Path("/tmp/ray/ray_current_cluster")  # as `ray stop` would, forget this head
        if current.exists() and current.read_text().strip().endswith(f":{self.gcs_port}"):
            current.unlink()


def start_ray_head(log: Path) -> RayHead:
    from ray.job_submission import JobSubmissionClient

    port, dashboard = free_port(), free_port()
    ray = Path(sys.executable).parent / "ray"
    # Jobs run `python -m jobs.<name>`: on this head, as in a cluster's image, `python` is the runtime's.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = os.environ | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PATH": path}
    # Every per-node port on its own free port: the test session's local cluster holds Ray's defaults.
    own_ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "node-manager-port", "object-manager-port", "ray-client-server-port")]
    with log.open("w") as out:
        process = subprocess.Popen(
            [str(ray), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2", *own_ports],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while True:
        try:
            JobSubmissionClient(address).list_jobs()
            return RayHead(address, port, process)
        except Exception:
            if time.monotonic() > deadline or process.poll() is not None:
                process.poll() is None and os.killpg(process.pid, signal.SIGTERM)
                raise RuntimeError(f"the Ray head did not come up; see {log}")
            time.sleep(1)


@dataclass(frozen=True)
class MlflowServer:
    uri: str
    process: subprocess.Popen

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=30)


def start_mlflow_server(folder: Path) -> MlflowServer:
    """An MLflow tracking server on loopback: sqlite backend, proxied artifacts in ``folder``."""
    import urllib.request

    port = free_port()
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with (folder / "server.log").open("w") as out:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
             f"sqlite:///{folder}/server.db", "--artifacts-destination", str(folder / "artifacts"),
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            return MlflowServer(uri, process)
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.poll() is None and os.killpg(process.pid, signal.SIGTERM)
                raise RuntimeError(f"the MLflow server did not start; see {folder / 'server.log'}")
            time.sleep(0.5)


class FaultyS3Proxy:
    """A real HTTP proxy on 127.0.0.1 in front of an S3 endpoint that injects faults a network and a
    busy server really produce. With ``fail_first_tries`` the first try of every distinct request
    (method and path) fails, alternately answered 503 SlowDown and reset (TCP RST), and its retry
    goes through: a client that does not retry fails, one that does succeeds, every time. With
    ``fail_parts_from`` N every try of a multipart upload's part N or later is answered 503, so an
    upload fails midway whatever the client retries. ``down()`` makes the port refuse connections until
    ``up()``. Requests are forwarded byte for byte, the Host
    header included, so signatures still verify; the proxy never sees or needs the credentials."""

    SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                b"<Message>Please reduce your request rate.</Message></Error>")

    def __init__(self, target: str, fail_first_tries: bool = False, fail_parts_from: int | None = None):
        self.target = urlparse(target).netloc
        self.fail_first_tries = fail_first_tries
        self.fail_parts_from = fail_parts_from
        self.failed_parts = 0
        self.seen: set[str] = set()
        self.slowdowns = self.resets = 0
        self.lock = threading.Lock()
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None
        self.up()

    def up(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def down(self) -> None:
        """Stop answering: the port refuses new connections and open ones are closed."""
        self.server.shutdown()
        self.server.server_close()

    def _fault(self, request: str) -> str | None:
        with self.lock:
            part = parse_qs(urlparse(request.split(" ", 1)[1]).query).get("partNumber")
            if self.fail_parts_from is not None and part and int(part[0]) >= self.fail_parts_from:
                self.failed_parts += 1
                return "slowdown"
            if not self.fail_first_tries or request in self.seen:
                return None
            self.seen.add(request)
            if len(self.seen) % 2:
                self.slowdowns += 1
                return "slowdown"
            self.resets += 1
            return "reset"

    def _handler(self):
        proxy = self

        class Forward(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while (size := int(self.rfile.readline().split(b";")[0], 16)):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def _forward(self) -> None:
                body = self._body()
                fault = proxy._fault(f"{self.command} {self.path}")
                if fault == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                if fault == "slowdown":
                    self.send_response(503, "Slow Down")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(proxy.SLOWDOWN)))
                    self.end_headers()
                    self.wfile.write(proxy.SLOWDOWN)
                    return
                upstream = http.client.HTTPConnection(proxy.target, timeout=60)
                upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for key, value in self.headers.items():
                    if key.lower() not in ("transfer-encoding", "content-length"):
                        upstream.putheader(key, value)
                upstream.putheader("Content-Length", str(len(body)))
                upstream.endheaders(body)
                response = upstream.getresponse()
                data = response.read()
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "content-length", "connection", "server", "date"):
                        self.send_header(key, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                elif response.getheader("Content-Length"):
                    self.send_header("Content-Length", response.getheader("Content-Length"))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        return Forward


CLUSTER_SCRIPT = """
import json, sys
from ray.cluster_utils import Cluster

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1"})
workers = [cluster.add_node(num_cpus=int(sys.argv[2]), node_ip_address="127.0.0.1") for _ in range(int(sys.argv[1]))]
raylets = [node.all_processes["raylet"][0].process.pid for node in workers]
print(json.dumps({"address": cluster.address, "raylets": raylets}), flush=True)
for line in sys.stdin:  # the index of a worker node to kill, or "stop"
    if line.strip() == "stop":
        break
    cluster.remove_node(workers[int(line)], allow_graceful=False)
    print("removed", flush=True)
for node in [*cluster.worker_nodes, cluster.head_node]:
    cluster.remove_node(node, allow_graceful=False)
"""


@dataclass(frozen=True)
class MultiNodeCluster:
    """Ray's ``cluster_utils.Cluster`` on 127.0.0.1, run by a process of its own so that this process
    may keep its own Ray connection: a head with no CPUs and worker nodes that can be killed."""

    address: str  # the head's GCS address, for RAY_ADDRESS
    raylets: list[int]  # each worker node's raylet PID; its workers are the raylet's children
    process: subprocess.Popen
    recorded: str | None  # what /tmp/ray/ray_current_cluster held before, put back by stop()

    def kill_node(self, index: int) -> None:
        """SIGKILL a worker node's raylet, workers and agents at once, as when its machine dies."""
        self.process.stdin.write(f"{index}\n")
        self.process.stdin.flush()
        assert self.process.stdout.readline().strip() == "removed"

    def stop(self) -> None:
        self.process.communicate("stop\n", timeout=120)
        current = Path("/tmp/ray/ray_current_cluster")  # Cluster records itself there
        if self.recorded is None:
            current.unlink(missing_ok=True)
        else:
            current.write_text(self.recorded)


def start_multi_node_cluster(log: Path, workers: int, cpus_per_worker: int) -> MultiNodeCluster:
    current = Path("/tmp/ray/ray_current_cluster")
    recorded = current.read_text() if current.exists() else None
    env = os.environ | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # every address on loopback
    with log.open("w") as errors:
        process = subprocess.Popen([sys.executable, "-c", CLUSTER_SCRIPT, str(workers), str(cpus_per_worker)],
                                   env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors,
                                   text=True, start_new_session=True)
    line = process.stdout.readline()
    if not line:
        process.wait(timeout=60)
        raise RuntimeError(f"the multi-node Ray cluster did not start; see {log}")
    info = json.loads(line)
    return MultiNodeCluster(info["address"], info["raylets"], process, recorded)
