"""Ray Serve: the samplers and the JEPA-SCORE online, and a page to browse a dataset's rarest samples.

Routes (one FastAPI app behind ``@serve.ingress``):
  GET  /healthz        the replica's model, encoder and dataset
  POST /score          a PNG / JPEG body -> exact JEPA-SCORE, exact top-k log-volume, embedding
  POST /generate       {"class_label" | "prompt", "n", "seed", "sampling"} -> PNGs with exact scores
  GET  /               the page: a dataset version's rarest samples, paged, and drop-in scoring
  GET  /api/dataset    a page of rows (version, offset, limit);  GET /api/image: one row's PNG
Concurrent requests are batched with ``@serve.batch``: score batches count requests, generate batches
count samples (the requests' ``n`` summed, up to ``generate_batch_samples``), and generate requests that
share a sampling config run as one batch. Models load once per replica through the same code the batch job uses.
No ``from __future__ import annotations`` here: FastAPI reads the route signatures' types at runtime.
"""

import asyncio
import base64
import json
import logging
from importlib.resources import files

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve

from guidance import generate, jepa_scores
from guidance.generate import check_work
from pipeline.cluster import connect_ray
from pipeline.generate.config import GenerateConfig, load_config
from pipeline.generate.preflight import check_files
from pipeline.generate.sampler_stage import load_models
from pipeline.images import png_bytes
from pipeline.serve.browse import DatasetBrowser, DatasetError
from pipeline.serve.config import ServeConfig
from pipeline.serve.inputs import GenerateRequest, RequestError, decode_upload, parse_generate
from pipeline.settings import UserError

log = logging.getLogger(__name__)
APP_NAME = "jepa-minority"
MAX_PAGE_ROWS = 100

app = FastAPI(title="jepa-minority", description=__doc__)


@app.exception_handler(RequestError)
async def _refused(request: Request, error: RequestError) -> JSONResponse:
    return JSONResponse({"detail": str(error)}, status_code=error.status)


@app.exception_handler(DatasetError)
async def _not_found(request: Request, error: DatasetError) -> JSONResponse:
    return JSONResponse({"detail": str(error)}, status_code=404)


@serve.deployment
@serve.ingress(app)
class JepaService:
    def __init__(self, config: GenerateConfig, service: ServeConfig):
        torch.set_num_threads(max(1, int(service.cpus_per_replica)))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.config, self.service, self.limits = config, service, service.limits
        self.model, self.encoder = load_models(config, self.device)
        self.browser = DatasetBrowser(service.dataset, config.storage) if service.dataset else None
        self.score_batch.set_max_batch_size(service.max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(service.batch_wait_s)
        self.generate_batch.set_max_batch_size(service.generate_batch_samples)
        self.generate_batch.set_batch_wait_timeout_s(service.batch_wait_s)

    @app.get("/healthz")
    def get_healthz(self) -> dict:
        return {"status": "ok", "model": self.config.model.preset, "encoder": self.config.encoder.name,
                "dataset": self.service.dataset, "max_n": self.limits.max_n}

    @app.get("/", response_class=HTMLResponse)
    def get_page(self) -> str:
        return (files("pipeline.serve") / "static" / "index.html").read_text()

    @app.post("/score")
    async def post_score(self, request: Request, version: str | None = None) -> dict:
        image = decode_upload(await self._body(request), self.limits)
        result = await self.score_batch(image)
        if self.browser is not None:
            try:
                version = version or self.browser.latest()
                rarer, total = self.browser.rank(version, result["jepa_score"])
                result["dataset_rank"] = {"version": version, "rank": rarer + 1, "total": total}
            except DatasetError as error:
                result["dataset_rank"] = {"error": str(error)}
        return result

    @app.post("/generate")
    async def post_generate(self, request: Request):
        body = await self._body(request)
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RequestError(400, f"the body is not JSON: {error}") from error
        job = parse_generate(payload, self.config.sampling, self.limits)
        try:
            check_work(self.model, job.items, job.sampling, self.encoder)
        except ValueError as error:
            raise RequestError(422, str(error)) from error
        outcome = await self.generate_batch(job)
        if isinstance(outcome, str):
            return JSONResponse({"detail": f"sampling failed: {outcome}"}, status_code=500)
        return {"method": job.sampling.method} | outcome

    @app.get("/api/dataset")
    def get_dataset(self, version: str | None = None, offset: int = 0, limit: int = 24) -> dict:
        if self.browser is None:
            raise DatasetError("this service shows no dataset: start it with --dataset URI")
        if offset < 0 or not 0 <= limit <= MAX_PAGE_ROWS:
            raise RequestError(422, f"offset must be >= 0 and limit in 0..{MAX_PAGE_ROWS}")
        page = self.browser.page(version, offset, limit)
        return {"version": page.version, "versions": page.versions, "total": page.total,
                "offset": page.offset, "rows": page.rows}

    @app.get("/api/image")
    def get_image(self, version: str, sample_id: str) -> Response:
        if self.browser is None:
            raise DatasetError("this service shows no dataset: start it with --dataset URI")
        return Response(self.browser.image(version, sample_id), media_type="image/png",
                        headers={"Cache-Control": "max-age=86400"})

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def score_batch(self, images: list[torch.Tensor]) -> list[dict]:
        return await asyncio.to_thread(self._score, images)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02, batch_size_fn=lambda jobs: sum(len(j.items) for j in jobs))
    async def generate_batch(self, jobs: list[GenerateRequest]) -> list[dict | str]:
        return await asyncio.to_thread(self._generate, jobs)

    def _score(self, images: list[torch.Tensor]) -> list[dict]:
        """Exact JEPA-SCORE, exact top-k log-volume at the config's guidance k (the same SVD, as rows store it),
        and embedding."""
        guidance = self.config.sampling.guidance
        with torch.no_grad():
            batch = torch.cat([self.encoder.resize(image[None].to(self.device)) for image in images])
            embeddings = self.encoder(batch).cpu()
        exact, topk = (values.cpu() for values in jepa_scores(self.encoder, batch, guidance.k))
        return [{"jepa_score": float(exact[b]), "topk_score": float(topk[b]), "k": guidance.k,
                 "width": int(images[b].shape[2]), "height": int(images[b].shape[1]),
                 "encoder": self.config.encoder.name, "embedding": embeddings[b].tolist(),
                 "batch_size": len(images)}  # requests answered together by @serve.batch
                for b in range(len(images))]

    def _generate(self, jobs: list[GenerateRequest]) -> list[dict | str]:
        """Jobs sharing a sampling config run as one batch; a failing batch is retried job by job."""
        groups: dict = {}
        for index, job in enumerate(jobs):
            groups.setdefault(job.sampling, []).append(index)
        outcomes: list = [None] * len(jobs)
        for members in groups.values():
            try:
                for member, samples in zip(members, self._sample([jobs[m] for m in members])):
                    outcomes[member] = samples
            except Exception as error:
                if len(members) == 1:
                    outcomes[members[0]] = f"{type(error).__name__}: {error}"
                    continue
                log.warning("a generate batch of %d requests failed (%s); retrying them one by one", len(members), error)
                for member in members:
                    outcomes[member] = self._generate([jobs[member]])[0]
        return outcomes

    def _sample(self, jobs: list[GenerateRequest]) -> list[dict]:
        """Each job's samples, and how many samples its batch ran together."""
        items = [item for job in jobs for item in job.items]
        samples = iter(generate(self.model, items, jobs[0].sampling, self.encoder))
        return [{"samples": [self._sample_json(next(samples), item) for item in job.items], "batch_size": len(items)}
                for job in jobs]

    @staticmethod
    def _sample_json(sample, item) -> dict:
        return {"seed": item.seed, "class_label": item.class_label, "prompt": item.prompt,
                "jepa_score": sample.jepa_score, "topk_score": sample.topk_score,
                "steps_guided": sample.steps_guided,
                "png_base64": base64.b64encode(png_bytes(sample.image)).decode()}

    async def _body(self, request: Request) -> bytes:
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"body of {declared} bytes; this service takes at most {limit}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise RequestError(413, f"body larger than {limit} bytes; this service takes at most {limit}")
        return bytes(body)


def check_service(service: ServeConfig) -> GenerateConfig:
    """The generation config, its model and encoder files and the dataset, checked before Ray starts: a
    mistake is the last line on screen, not a replica's traceback."""
    config = load_config(service.config, list(service.overrides))
    check_files(config)
    if service.dataset:
        try:  # a bad URI, or a folder holding no finished dataset, fails here, not on the page
            DatasetBrowser(service.dataset, config.storage).latest()
        except DatasetError as error:
            raise UserError(f"--dataset: {error}") from error
    return config


def build_app(service: ServeConfig, config: GenerateConfig):
    """The Serve application over a checked config; models load in each replica."""
    import ray

    gpus = service.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    options = {"num_cpus": service.cpus_per_replica, "num_gpus": gpus}
    return JepaService.options(num_replicas=service.replicas, ray_actor_options=options).bind(config, service)


def run_serve(service: ServeConfig, *, blocking: bool = True) -> str:
    """Deploy on the cluster in RAY_ADDRESS (else a local one); returns the service's base URL."""
    config = check_service(service)
    connect_ray(verbose=config.console.verbose)
    serve.start(http_options={"host": service.host, "port": service.port})
    application = build_app(service, config)
    url = f"http://{service.host}:{service.port}"
    log.info("serving %s at %s (GET / for the page)", service.config, url)
    serve.run(application, name=APP_NAME, route_prefix="/", blocking=blocking)
    return url
