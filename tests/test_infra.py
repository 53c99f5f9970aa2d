"""infra/ agrees with the package: every manifest is parsed and checked against the code it runs.

Entry points are parsed by the job modules' own argument parsers, the job config by
pipeline.generate.config.load_config, the MLflow server's flags by MLflow's own CLI, secret keys against
the names botocore reads; the image, user, paths and versions against the Dockerfile and pyproject.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import botocore.credentials
import pytest
import torch
import yaml
from croniter import croniter
from mlflow.cli import server as mlflow_server
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from jobs.commands import COMMANDS
from pipeline.generate.config import load_config
from pipeline.generate.preflight import preflight_generation

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "infra" / "k8s"
DOCKERFILE = ROOT / "infra" / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
KUBECTL_IMAGE = re.compile(r"^registry\.k8s\.io/kubectl:v\d+\.\d+\.\d+$")


# --- reading the manifests and the Dockerfile ---------------------------------------------------

def load_docs(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


MANIFESTS = {path.name: load_docs(path.name) for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml"}
KUSTOMIZATION = yaml.safe_load((K8S / "kustomization.yaml").read_text())


def objects(kind: str) -> list[dict]:
    return [doc for docs in MANIFESTS.values() for doc in docs if doc.get("kind") == kind]


def one(kind: str, name: str) -> dict:
    found = [doc for doc in objects(kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} named {name!r} in infra/k8s, found {len(found)}"
    return found[0]


def embedded_rayjobs() -> list[dict]:
    """RayJobs carried inside ConfigMaps (the plain CronJob creates them with kubectl)."""
    found = []
    for config_map in objects("ConfigMap"):
        for text in config_map.get("data", {}).values():
            doc = yaml.safe_load(text)
            if isinstance(doc, dict) and doc.get("kind") == "RayJob":
                found.append(doc)
    return found


def rayjob_specs() -> list[dict]:
    """Every RayJob spec that will run: RayJobs, RayCronJob templates, RayJobs in ConfigMaps."""
    return ([job["spec"] for job in objects("RayJob") + embedded_rayjobs()]
            + [cron["spec"]["jobTemplate"] for cron in objects("RayCronJob")])


def pod_specs(doc: dict) -> list[dict]:
    """Pod specs anywhere in a manifest (Deployments, CronJobs, RayCluster groups)."""
    if isinstance(doc, dict):
        found = [doc] if "containers" in doc else []
        return found + [spec for value in doc.values() for spec in pod_specs(value)]
    if isinstance(doc, list):
        return [spec for item in doc for spec in pod_specs(item)]
    return []


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines() if line.strip()]


def instruction(name: str) -> list[str]:
    return [args for inst, args in dockerfile() if inst == name]


WORKDIR = instruction("WORKDIR")[-1]
IMAGE = KUSTOMIZATION["images"][0]
RAYCLUSTER = one("RayCluster", "jepa-minority")
HEAD = RAYCLUSTER["spec"]["headGroupSpec"]["template"]["spec"]


def head_files() -> dict[str, str]:
    """Files the head container sees from ConfigMap volumes: absolute path -> content."""
    container = HEAD["containers"][0]
    files = {}
    for volume in HEAD.get("volumes", []):
        if "configMap" not in volume:
            continue
        data = one("ConfigMap", volume["configMap"]["name"])["data"]
        for mount in container.get("volumeMounts", []):
            if mount["name"] == volume["name"]:
                files |= {f"{mount['mountPath']}/{key}": text for key, text in data.items()}
    return files


# --- entry points through the job modules' own parsers ------------------------------------------

class EntrypointError(AssertionError):
    """An entrypoint names no job module, or its module's parser rejects the arguments."""


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace):
        self.namespace = namespace


def parse_entrypoint(entrypoint: str, monkeypatch) -> tuple[str, argparse.Namespace]:
    """Run the job module's main() until its argument parser has parsed the arguments, then stop:
    the module's real parser decides, and no work starts."""
    words = shlex.split(entrypoint)
    if words[:2] != ["python", "-m"] or len(words) < 3:
        raise EntrypointError(f"{entrypoint!r}: expected 'python -m jobs.<name> ...'")
    module = words[2]
    modules = sorted(command.module for command in COMMANDS.values())
    if module not in modules or importlib.util.find_spec(module) is None:
        raise EntrypointError(f"{entrypoint!r}: {module} is not a job module (jobs/commands.py: {modules})")
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, args=None, namespace=None):
        errors = io.StringIO()
        try:
            with contextlib.redirect_stderr(errors):
                parsed = original(parser, args, namespace)
        except SystemExit:
            raise EntrypointError(f"{entrypoint!r}: {module} rejects its arguments: {errors.getvalue().strip()}") from None
        raise _Parsed(parsed)

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        try:
            importlib.import_module(module).main(words[3:])
        except _Parsed as parsed:
            return module, parsed.namespace
    raise EntrypointError(f"{entrypoint!r}: {module}.main() returned without parsing its arguments")


ENTRYPOINTS = sorted({spec["entrypoint"] for spec in rayjob_specs()})


def test_every_entrypoint_names_a_job_module_that_accepts_its_flags(monkeypatch):
    assert ENTRYPOINTS, "no RayJob entrypoints found in infra/k8s"
    for entrypoint in ENTRYPOINTS:
        parse_entrypoint(entrypoint, monkeypatch)


@pytest.mark.parametrize("drifted", [
    "python -m jobs.generate /app/configs/cluster.yaml --dryrun",  # a renamed flag
    "python -m jobs.generator /app/configs/cluster.yaml",  # a renamed module
    "python -m jobs.refresh /app/configs/cluster.yaml",  # a required flag (--root) missing
    "python -m jobs.filter --input s3://b/x --output s3://b/y --keep-fraction 0.1 --per shape",  # a value the parser refuses
])
def test_the_entrypoint_check_fails_on_drift(drifted, monkeypatch):
    with pytest.raises(EntrypointError):
        parse_entrypoint(drifted, monkeypatch)


def test_config_paths_in_entrypoints_are_mounted_configs_that_load_strictly(monkeypatch, tmp_path):
    files = head_files()
    for entrypoint in ENTRYPOINTS:
        _, args = parse_entrypoint(entrypoint, monkeypatch)
        if getattr(args, "config", None) is None:
            continue
        assert args.config in files, f"{entrypoint!r}: {args.config} is not mounted on the Ray head from a ConfigMap"
        path = tmp_path / Path(args.config).name
        path.write_text(files[args.config])
        load_config(path, args.overrides)


def test_every_rayjob_runs_on_the_raycluster():
    for spec in rayjob_specs():
        assert spec.get("clusterSelector") == {"ray.io/cluster": RAYCLUSTER["metadata"]["name"]}, spec
        assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode"), spec


# --- the job config ------------------------------------------------------------------------------

def cluster_config(tmp_path):
    (path,) = [path for path in head_files() if path.endswith(".yaml")]
    file = tmp_path / "cluster.yaml"
    file.write_text(head_files()[path])
    return load_config(file)


def image_path(path: str) -> Path:
    """A path inside the image -> the repository file the Dockerfile copies there."""
    assert path.startswith(f"{WORKDIR}/"), f"{path} is not under the image's WORKDIR {WORKDIR}"
    relative = path.removeprefix(f"{WORKDIR}/")
    copied = {args.split()[-1].rstrip("/") for args in instruction("COPY")}
    assert relative.split("/")[0] in copied, f"{path}: the Dockerfile copies no {relative.split('/')[0]}"
    return ROOT / relative


def test_config_dry_runs_against_the_models_the_image_carries(tmp_path):
    """The product's own dry run (work expanded, checked against the model's config) on the weights
    the config names, read from where the Dockerfile copies them from."""
    config = cluster_config(tmp_path)
    for path in (config.model.source, config.encoder.weights):
        assert image_path(path).is_dir(), f"{path} does not exist in the repository as {image_path(path)}"
    local = load_config(tmp_path / "cluster.yaml", [f"model.source={image_path(config.model.source)}",
                                                    f"encoder.weights={image_path(config.encoder.weights)}",
                                                    f"output.uri={tmp_path / 'output'}"])
    assert preflight_generation(local).planned == len(config.work.class_labels) * config.work.samples_per_label


def test_tracking_uri_points_at_the_mlflow_service(tmp_path):
    uri = urlparse(cluster_config(tmp_path).tracking.tracking_uri)
    service = one("Service", uri.hostname)
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == uri.port]
    deployment = one("Deployment", service["metadata"]["name"])
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"][:2] == ["mlflow", "server"]
    params = mlflow_server.make_context("mlflow server", container["command"][2:]).params
    (target,) = [p for p in container["ports"] if port["targetPort"] in (p["name"], p["containerPort"])]
    assert params["port"] == target["containerPort"]
    assert f"{uri.hostname}:{uri.port}" in params["allowed_hosts"].split(","), "MLflow would refuse the jobs' Host header"


def test_one_bucket_for_data_refresh_and_mlflow_artifacts(tmp_path, monkeypatch):
    buckets = {urlparse(cluster_config(tmp_path).output.uri).netloc}
    for entrypoint in ENTRYPOINTS:
        _, args = parse_entrypoint(entrypoint, monkeypatch)
        for uri in (getattr(args, "root", None), getattr(args, "dataset", None)):  # refresh root, served dataset
            if uri:
                buckets.add(urlparse(uri).netloc)
    (mlflow,) = one("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    params = mlflow_server.make_context("mlflow server", mlflow["command"][2:]).params
    buckets.add(urlparse(params["artifacts_destination"]).netloc)
    assert len(buckets) == 1, f"the S3 secret serves one bucket; manifests use {sorted(buckets)}"


def test_gpu_group_requests_gpus_and_fits_the_actor_pool(tmp_path):
    config = cluster_config(tmp_path)
    (gpu,) = [g for g in RAYCLUSTER["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    (container,) = gpu["template"]["spec"]["containers"]
    limits = container["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
    # The group starts empty, so auto-detection (gpus_per_actor None) would find no GPU and sample on CPUs.
    assert gpu["minReplicas"] > 0 or config.ray.gpus_per_actor, "set ray.gpus_per_actor: the GPU group starts at 0"
    assert config.ray.gpus_per_actor <= int(limits["nvidia.com/gpu"])
    assert config.ray.pool[1] * config.ray.gpus_per_actor <= gpu["maxReplicas"] * int(limits["nvidia.com/gpu"])


def cluster_page_settings() -> dict[str, str]:
    """The settings table of docs/cluster.md: `setting` -> `value`."""
    text = (ROOT / "docs" / "cluster.md").read_text()
    return dict(re.findall(r"^\| `([^`]+)` \| `([^`]+)` \|", text, re.MULTILINE))


def test_the_cluster_page_quotes_the_manifests(tmp_path):
    """docs/cluster.md's rates and costs assume these settings: the page and the manifests name the same ones."""
    config = cluster_config(tmp_path)
    (gpu,) = [g for g in RAYCLUSTER["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    actual = {"gpu.nvidia.com/gpu": str(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]),
              "gpu.maxReplicas": str(gpu["maxReplicas"]),
              "ray.gpus_per_actor": f"{config.ray.gpus_per_actor:g}",
              "ray.actors": str(list(config.ray.pool)),
              "ray.batch_size": str(config.ray.batch_size),
              "output.max_rows_per_file": str(config.output.max_rows_per_file),
              "head.memory": HEAD["containers"][0]["resources"]["limits"]["memory"]}
    assert cluster_page_settings() == actual


def test_serve_listens_on_a_head_port_and_asks_for_gpus(monkeypatch):
    served = [args for module, args in (parse_entrypoint(e, monkeypatch) for e in ENTRYPOINTS) if module == "jobs.serve"]
    assert served, "no RayJob runs jobs.serve"
    ports = {port["containerPort"] for port in HEAD["containers"][0]["ports"]}
    (gpu,) = [g for g in RAYCLUSTER["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    for args in served:
        assert args.host == "0.0.0.0", "Serve must listen beyond the head's loopback to be reached through the head Service"
        assert args.port in ports, f"Serve's port {args.port} is not a port of the head container {sorted(ports)}"
        # As for generation: the GPU group starts empty, so auto-detection would place replicas on CPUs.
        assert 0 < args.gpus_per_replica <= int(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])


def test_ray_version_is_the_one_every_environment_installs():
    (requirement,) = [r for r in PYPROJECT["project"]["dependencies"] if r.startswith("ray[")]
    assert Version(RAYCLUSTER["spec"]["rayVersion"]) in SpecifierSet(requirement.split("]", 1)[1])
    constraints = (ROOT / "infra" / "constraints.txt").read_text().splitlines()
    assert f"ray=={RAYCLUSTER['spec']['rayVersion']}" in constraints, "the image installs with infra/constraints.txt"
    assert Version(RAYCLUSTER["spec"]["rayVersion"]) >= Version("2.52"), "authOptions needs Ray >= 2.52"


# --- the image -----------------------------------------------------------------------------------

def runtime_pods() -> list[dict]:
    return [spec for docs in MANIFESTS.values() for doc in docs for spec in pod_specs(doc)
            if not any(KUBECTL_IMAGE.match(c["image"]) for c in spec["containers"])]


def test_one_image_name_everywhere_tagged_with_the_package_version():
    images = {c["image"] for spec in runtime_pods() for c in spec["containers"]}
    assert images == {IMAGE["name"]}, f"containers use {images}; kustomization.yaml rewrites only {IMAGE['name']!r}"
    assert IMAGE["newTag"] == PYPROJECT["project"]["version"]
    build = f"docker build -f infra/Dockerfile -t {IMAGE['newName']}:{IMAGE['newTag']} ."
    assert build in (ROOT / "README.md").read_text(), f"README should show: {build}"
    assert build in DOCKERFILE.read_text(), f"infra/Dockerfile's header should show: {build}"


def test_kustomization_lists_the_long_lived_manifests_and_never_the_secrets():
    for name in KUSTOMIZATION["resources"]:
        assert (K8S / name).is_file(), name
    assert "secrets.example.yaml" not in KUSTOMIZATION["resources"]
    runtime_files = {name for name, docs in MANIFESTS.items()
                     if any(c["image"] == IMAGE["name"] for doc in docs for s in pod_specs(doc) for c in s["containers"])}
    assert runtime_files <= set(KUSTOMIZATION["resources"]), "the images: rewrite applies only to listed resources"


def test_base_image_cuda_matches_the_pinned_torch_build():
    pins = dict(line.split("==") for line in (ROOT / "infra/constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert torch.__version__.split("+")[0] == pins["torch"], "this environment's torch is not the pinned build"
    (base,) = instruction("FROM")
    match = re.fullmatch(r"nvidia/cuda:(\d+\.\d+)\.\d+-\w+-ubuntu[\d.]+", base)
    assert match, f"expected an nvidia/cuda base, got {base}"
    assert match.group(1) == torch.version.cuda, f"base CUDA {match.group(1)}, torch built for {torch.version.cuda}"


def test_image_python_satisfies_requires_python():
    versions = set(re.findall(r"python(3\.\d+)", " ".join(instruction("RUN"))))
    assert len(versions) == 1, f"the Dockerfile should install one Python, found {versions}"
    assert Version(versions.pop()) in SpecifierSet(PYPROJECT["project"]["requires-python"])


def test_image_installs_the_package_with_the_constraints():
    copied = [args.split()[:-1] for args in instruction("COPY")]
    for sources in copied:
        for source in sources:
            assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which does not exist"
    sources = {source for sources in copied for source in sources}
    packages = {name.rstrip("*") for name in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages | {"pyproject.toml", "README.md", "infra/constraints.txt"} <= sources
    installs = [args for args in instruction("RUN") if "pip install" in args]
    assert installs and all("-c infra/constraints.txt" in args for args in installs)
    extras = re.findall(r"'\.\[(\w+)\]'", " ".join(installs))
    assert extras and set(extras) <= set(PYPROJECT["project"]["optional-dependencies"])
    assert "jepa-minority" in PYPROJECT["project"]["scripts"]
    assert any("jepa-minority --help" in args for args in installs), "the build should prove the console script runs"
    allowed = {line[1:] for line in (ROOT / "infra/Dockerfile.dockerignore").read_text().splitlines() if line.startswith("!")}
    assert sources <= allowed, f"Dockerfile.dockerignore leaves out {sorted(sources - allowed)}"


def test_the_copied_files_build_the_package_with_its_console_script(tmp_path):
    """What the Dockerfile copies is enough to build the package it installs, every module included."""
    context = tmp_path / "context"
    for sources in (args.split()[:-1] for args in instruction("COPY")):
        for source in sources:
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, context / source, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                (context / source).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / source, context / source)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path / "wheel"), str(context)], check=True)
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (entry_points,) = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
        assert "jepa-minority = jobs.cli:main" in archive.read(entry_points).decode()
    packages = [name.rstrip("*") for name in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]]
    modules = {str(path.relative_to(ROOT)) for package in packages for path in (ROOT / package).rglob("*.py")}
    assert modules <= names, f"missing from the image's package: {sorted(modules - names)}"


def test_every_pod_runs_as_the_image_user():
    (user,) = instruction("USER")
    assert user != "0" and f"--uid {user}" in " ".join(instruction("RUN")), "USER should be the uid the image creates"
    for spec in runtime_pods():
        context = spec.get("securityContext", {})
        assert context.get("runAsNonRoot") is True and str(context.get("runAsUser")) == user, spec["containers"][0]["name"]


def test_config_mounts_live_under_the_image_workdir():
    for mount in HEAD["containers"][0]["volumeMounts"]:
        assert mount["mountPath"].startswith(f"{WORKDIR}/")


# --- secrets -------------------------------------------------------------------------------------

SECRETS = {doc["metadata"]["name"]: doc for doc in MANIFESTS["secrets.example.yaml"]}


def test_secret_templates_hold_placeholders_under_the_names_the_s3_clients_read():
    env = botocore.credentials.EnvProvider
    assert set(SECRETS["jepa-minority-s3"]["stringData"]) == {env.ACCESS_KEY, env.SECRET_KEY}
    for secret in SECRETS.values():
        assert all(value.startswith("REPLACE_") for value in secret["stringData"].values()), "placeholders only"


def test_every_secret_reference_names_a_templated_secret():
    references = [("jepa-minority-ray-token", "auth_token")]  # KubeRay reads this key (authOptions)
    assert RAYCLUSTER["spec"]["authOptions"]["secretName"] == references[0][0]
    for docs in MANIFESTS.values():
        for doc in docs:
            for spec in pod_specs(doc):
                for container in spec["containers"]:
                    references += [(ref["secretRef"]["name"], None) for ref in container.get("envFrom", []) if "secretRef" in ref]
                    references += [(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
                                   for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]
    for name, key in references:
        assert name in SECRETS, f"{name} is not in secrets.example.yaml"
        assert key is None or key in SECRETS[name]["stringData"], f"{name} has no key {key}"
    s3_users = [c for spec in runtime_pods() for c in spec["containers"]]
    assert all({"secretRef": {"name": "jepa-minority-s3"}} in c.get("envFrom", []) for c in s3_users)


# --- schedules -----------------------------------------------------------------------------------

def test_raycronjob_and_cronjob_run_the_same_refresh_on_the_same_valid_schedule(monkeypatch):
    (raycron,) = objects("RayCronJob")
    (cron,) = objects("CronJob")
    (scheduled,) = embedded_rayjobs()
    assert raycron["spec"]["jobTemplate"]["entrypoint"] == scheduled["spec"]["entrypoint"]
    assert parse_entrypoint(scheduled["spec"]["entrypoint"], monkeypatch)[0] == "jobs.refresh"
    assert "generateName" in scheduled["metadata"], "each scheduled RayJob needs a fresh name"
    schedules = {raycron["spec"]["schedule"], cron["spec"]["schedule"]}
    assert len(schedules) == 1, f"the two schedules differ: {schedules}"
    schedule = schedules.pop()
    assert len(schedule.split()) == 5 and croniter.is_valid(schedule), f"not a 5-field cron schedule: {schedule!r}"


def test_cronjob_creates_the_rayjob_with_only_the_rights_it_needs():
    (cron,) = objects("CronJob")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert KUBECTL_IMAGE.match(container["image"])
    words = container["command"] + container["args"]
    assert words[:3] == ["kubectl", "create", "-f"]
    (mount,) = [m for m in container["volumeMounts"] if words[3].startswith(f"{m['mountPath']}/")]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    data = one("ConfigMap", volume["configMap"]["name"])["data"]
    assert yaml.safe_load(data[words[3].removeprefix(f"{mount['mountPath']}/")])["kind"] == "RayJob"
    binding = one("RoleBinding", pod["serviceAccountName"])
    assert {"kind": "ServiceAccount", "name": pod["serviceAccountName"],
            "namespace": cron["metadata"]["namespace"]} in binding["subjects"]
    role = one("Role", binding["roleRef"]["name"])
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create"]}]


API_VERSIONS = {
    "Namespace": "v1", "ConfigMap": "v1", "Secret": "v1", "Service": "v1", "ServiceAccount": "v1",
    "PersistentVolumeClaim": "v1", "Deployment": "apps/v1", "CronJob": "batch/v1",
    "Role": "rbac.authorization.k8s.io/v1", "RoleBinding": "rbac.authorization.k8s.io/v1",
    "RayCluster": "ray.io/v1", "RayJob": "ray.io/v1", "RayCronJob": "ray.io/v1",
}


def test_every_manifest_is_an_object_of_a_known_api():
    for name, docs in MANIFESTS.items():
        assert docs, f"{name} holds no object"
        for doc in docs + (embedded_rayjobs() if name == "refresh-cronjob.yaml" else []):
            assert API_VERSIONS.get(doc["kind"]) == doc["apiVersion"], f"{name}: {doc['kind']} {doc['apiVersion']}"
            assert doc["metadata"].get("name") or doc["metadata"].get("generateName"), f"{name}: an object without a name"


def test_everything_lives_in_one_namespace():
    (namespace,) = objects("Namespace")
    for docs in MANIFESTS.values():
        for doc in docs:
            if doc["kind"] != "Namespace":
                assert doc["metadata"].get("namespace") == namespace["metadata"]["name"], doc["metadata"]
