"""Ray Serve over HTTP on 127.0.0.1: scores that match the library, generation that matches the batch
job, batching that keeps answers apart, bounds answered with 4xx, the dataset page's API, and the
page itself driven in Debian's headless chromium (installed by `make test`) through Selenium."""

from __future__ import annotations

import base64
import io
import json
import shutil
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.feather as feather
import pytest
import requests
import torch
from PIL import Image

from guidance import jepa_scores, load_encoder
from guidance.generate import generate
from guidance.methods import SamplingConfig
from guidance.models import WorkItem
from guidance.presets import load_model
from pipeline.generate.config import load_config
from pipeline.generate.work import Manifest
from pipeline.images import png_bytes
from pipeline.rows import read_committed
from pipeline.schema import MANIFEST_FILE
from pipeline.serve.config import ServeLimits
from pipeline.serve.inputs import RequestError, parse_generate
from pipeline.storage import StorageConfig, resolve
from tests.conftest import ENCODER_NAME, TINY_SIZE, tracking_section
from tests.services import free_port

LIMITS = ServeLimits(max_body_bytes=64 * 1024, max_pixels=256 * 256, max_n=3, max_steps=4)


def decompression_bomb(width: int = 40_000, height: int = 40_000) -> bytes:
    """A few hundred bytes of valid PNG header that declares 1.6 billion pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def served_config(tmp_path_factory, class_unet, tiny_vit_folder):
    import yaml

    folder = tmp_path_factory.mktemp("serve")
    config = {
        "model": {"preset": "pixel-unet", "source": str(class_unet)},
        "encoder": {"name": ENCODER_NAME, "weights": str(tiny_vit_folder), "input_size": TINY_SIZE},
        "sampling": {"method": "jepa", "steps": 3, "guidance": {"tau": 1.0, "k": 4}},
        "work": {"class_labels": [0, 3, 7], "samples_per_label": 8},
        "ray": {"actors": 1, "cpus_per_actor": 0.5, "batch_size": 4},
        "tracking": tracking_section(folder),
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="module")
def dataset_root(ray_cluster, served_config, tmp_path_factory):
    """A refresh root with one published version: 24 generated samples, the rarest 15 kept."""
    from pipeline.curate.config import RefreshConfig
    from pipeline.curate.refresh import run_refresh

    root = tmp_path_factory.mktemp("served-dataset")
    result = run_refresh(RefreshConfig(config=served_config, root=str(root), version="2026-11-28", keep_fraction=0.625))
    assert result.published
    return root


@pytest.fixture(scope="module")
def service(ray_cluster, served_config, dataset_root):
    from ray import serve

    from pipeline.serve.config import ServeConfig
    from pipeline.serve.service import run_serve

    url = run_serve(ServeConfig(config=served_config, dataset=str(dataset_root), port=free_port(),
                                cpus_per_replica=0.5, max_batch_size=6, batch_wait_s=0.2, limits=LIMITS),
                    blocking=False)
    yield url
    serve.shutdown()


@pytest.fixture(scope="module")
def encoder(tiny_vit_folder):
    return load_encoder(ENCODER_NAME, str(tiny_vit_folder), input_size=TINY_SIZE)


def rarest_rows(dataset_root) -> list[dict]:
    location = resolve(str(dataset_root / "versions" / "2026-11-28" / "rarest"), StorageConfig())
    rows = read_committed(location, ["sample_id", "seed", "class_label", "jepa_score", "topk_score", "image"]).to_pylist()
    return sorted(rows, key=lambda row: (row["jepa_score"], row["sample_id"]))


def local_scores(encoder, image_bytes: bytes, k: int = 4) -> dict:
    """What the library computes for an uploaded image alone (exact score and exact top-k from one SVD,
    embedding), in one thread like the replica (``cpus_per_replica`` 0.5), so equal bit for bit."""
    pixels = np.asarray(Image.open(io.BytesIO(image_bytes)).convert("RGB"))
    images = encoder.resize(torch.from_numpy(pixels.copy()).permute(2, 0, 1).float()[None] / 255)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            embedding = encoder(images)[0]
        exact, topk = jepa_scores(encoder, images, k)
    finally:
        torch.set_num_threads(threads)
    return {"jepa_score": float(exact[0]), "topk_score": float(topk[0]), "embedding": embedding.tolist()}


# The exact score of the same pixels computed in another batch or thread count differs by fp32 rounding of
# the Jacobian, which the smallest singular values (near the 1e-6 floor) amplify: measured up to 0.08 on
# random 8x8 images with this encoder. Only comparisons across batches use it.
BATCH_NOISE = 0.1


def test_healthz_names_what_is_served(service, served_config, dataset_root):
    health = requests.get(f"{service}/healthz", timeout=30).json()
    config = load_config(served_config)
    assert health == {"status": "ok", "model": config.model.preset, "encoder": config.encoder.name,
                      "dataset": str(dataset_root), "max_n": LIMITS.max_n}
    assert (config.model.preset, config.encoder.name) == ("pixel-unet", ENCODER_NAME)
    assert json.loads((dataset_root / "LATEST.json").read_text())["version"] == "2026-11-28"


def test_score_matches_the_library_and_ranks_against_the_dataset(service, dataset_root, encoder):
    rows = rarest_rows(dataset_root)
    image = rows[4]["image"]["bytes"]
    response = requests.post(f"{service}/score", data=image, headers={"Content-Type": "image/png"}, timeout=120)
    assert response.status_code == 200, response.text
    scored = response.json()
    local = local_scores(encoder, image)
    assert {key: scored[key] for key in local} == local  # exactly the library's values
    assert scored["jepa_score"] == pytest.approx(rows[4]["jepa_score"], abs=BATCH_NOISE)  # the batch job's
    assert scored["topk_score"] == pytest.approx(rows[4]["topk_score"], abs=BATCH_NOISE)
    assert len(scored["embedding"]) == encoder.embed_dim and scored["k"] == 4
    rarer = sum(row["jepa_score"] < scored["jepa_score"] for row in rows)
    assert scored["dataset_rank"] == {"version": "2026-11-28", "rank": rarer + 1, "total": len(rows)}


def test_concurrent_scores_are_batched_and_kept_apart(service, dataset_root, encoder):
    images = [row["image"]["bytes"] for row in rarest_rows(dataset_root)[:6]]

    def post(image: bytes) -> dict:
        response = requests.post(f"{service}/score", data=image, timeout=300)
        assert response.status_code == 200, response.text
        return response.json()

    alone = [post(image) for image in images]
    with ThreadPoolExecutor(len(images)) as pool:
        together = list(pool.map(post, images))
    assert max(result["batch_size"] for result in together) > 1
    for image, single, batched in zip(images, alone, together):
        local = local_scores(encoder, image)
        assert {key: single[key] for key in local} == local  # alone: exactly the library's values
        np.testing.assert_allclose(batched["embedding"], local["embedding"], rtol=0, atol=2e-6)  # fp32 rounding
        assert batched["topk_score"] == pytest.approx(local["topk_score"], abs=1e-4)
        assert batched["jepa_score"] == pytest.approx(local["jepa_score"], abs=BATCH_NOISE)
    assert len({round(result["jepa_score"], 6) for result in together}) == len(images)


def test_generate_returns_what_the_batch_job_made_for_the_same_seed(service, dataset_root, served_config):
    manifest = Manifest.read(feather.read_table(dataset_root / "versions" / "2026-11-28" / "generated" / MANIFEST_FILE)).table.to_pylist()
    row = rarest_rows(dataset_root)[0]
    seed, label = row["seed"], row["class_label"]
    assert {"seed": seed, "class_label": label} in [{"seed": m["seed"], "class_label": m["class_label"]} for m in manifest]
    response = requests.post(f"{service}/generate", json={"class_label": label, "seed": seed, "n": 2}, timeout=300)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["method"] == "jepa" and [s["seed"] for s in body["samples"]] == [seed, seed + 1]
    assert base64.b64decode(body["samples"][0]["png_base64"]) == row["image"]["bytes"]  # the same PNG, byte for byte
    assert body["samples"][0]["jepa_score"] == pytest.approx(row["jepa_score"], abs=BATCH_NOISE)
    assert body["samples"][0]["topk_score"] == pytest.approx(row["topk_score"], abs=BATCH_NOISE)
    assert body["samples"][0]["steps_guided"] == 3


def test_generate_takes_method_overrides_and_batches_requests_that_share_them(service, served_config):
    request = {"class_label": 7, "seed": 11, "n": 1, "sampling": {"method": "unguided", "steps": 2}}
    with ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(lambda seed: requests.post(f"{service}/generate", json=request | {"seed": seed},
                                                             timeout=300), [11, 12, 11]))
    assert [r.status_code for r in responses] == [200, 200, 200], [r.text for r in responses]
    samples = [r.json()["samples"][0] for r in responses]
    assert samples[0]["png_base64"] == samples[2]["png_base64"] != samples[1]["png_base64"]
    assert samples[0]["steps_guided"] == 0
    config = load_config(served_config)
    model = load_model("pixel-unet", config.model.source)
    sampling = load_config(served_config, ["sampling.method=unguided", "sampling.steps=2"]).sampling
    local = generate(model, [WorkItem(12, 7)], sampling, load_encoder(ENCODER_NAME, config.encoder.weights,
                                                                     input_size=TINY_SIZE))[0]
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(samples[1]["png_base64"]))))
    assert np.array_equal(served, local.image)
    assert samples[1]["jepa_score"] == pytest.approx(local.jepa_score, abs=BATCH_NOISE)


def test_concurrent_small_generate_requests_run_as_one_batch(service):
    """Generate batches count samples (generate_batch_samples, default 8), not requests: three requests
    of one sample each, within the batch wait, are sampled together."""
    request = {"class_label": 3, "n": 1, "sampling": {"method": "unguided", "steps": 1}}
    with ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(lambda seed: requests.post(f"{service}/generate", json=request | {"seed": seed},
                                                             timeout=300), [21, 22, 23]))
    assert [r.status_code for r in responses] == [200, 200, 200], [r.text for r in responses]
    assert [r.json()["batch_size"] for r in responses] == [3, 3, 3]
    assert [r.json()["samples"][0]["seed"] for r in responses] == [21, 22, 23]


def test_a_generate_batch_smaller_than_a_request_is_refused():
    from pipeline.serve.config import ServeConfig

    with pytest.raises(ValueError, match="generate_batch_samples \\(2\\) must be >= max_n \\(3\\)"):
        ServeConfig(config="c.yaml", generate_batch_samples=2, limits=LIMITS)


@pytest.mark.parametrize("route, body, status, message", [
    ("score", b"", 400, "empty body"),
    ("score", b"not an image at all", 400, "cannot decode"),
    ("score", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, 400, "cannot decode"),
    ("score", "gif", 415, "GIF"),
    ("score", "large", 413, "pixels"),
    ("score", "bomb", 413, "pixels"),
    ("score", b"x" * (64 * 1024 + 1), 413, "at most 65536"),
    ("generate", b"{not json", 400, "not JSON"),
    ("generate", b"[1, 2]", 400, "JSON object"),
    ("generate", {"class_label": 3, "n": 4}, 422, "n must be an integer in [1, 3]"),
    ("generate", {"class_label": 3, "n": 0}, 422, "n must be"),
    ("generate", {"class_label": 3, "seed": -1}, 422, "seed must be"),
    ("generate", {"class_label": 10}, 422, "out of range"),
    ("generate", {"class_label": True}, 422, "class_label must be"),
    ("generate", {"prompt": "a cat"}, 422, "takes no prompts"),
    ("generate", {"class_label": 3, "colour": "red"}, 422, "unknown field 'colour'"),
    ("generate", {"class_label": 3, "sampling": {"steps": 5}}, 422, "at most 4"),
    ("generate", {"class_label": 3, "sampling": {"guidance": {"eta": float("nan")}}}, 422, "eta"),
    ("generate", {"class_label": 3, "sampling": {"guidance": {"k": 40}}}, 422, "k"),
    ("generate", {"class_label": 3, "sampling": {"method": "magic"}}, 422, "method must be one of"),
    ("generate", {"class_label": 3, "sampling": {"temperature": 2}}, 422, "unknown key sampling.temperature"),
    ("generate", {"class_label": 3, "sampling": 5}, 422, "sampling must be an object"),
])
def test_bad_requests_get_a_4xx_that_names_the_problem(service, route, body, status, message):
    if body == "gif":
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, format="GIF")
        body = buffer.getvalue()
    elif body == "large":
        body = png_bytes(np.zeros((300, 300, 3), np.uint8))  # 90,000 pixels > 65,536, but a small file
    elif body == "bomb":
        body = decompression_bomb()
    elif isinstance(body, dict):
        body = json.dumps(body).encode()  # json.dumps writes NaN, as careless clients do
    response = requests.post(f"{service}/{route}", data=body, timeout=120)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]


def test_dataset_api_pages_the_rarest_rows_and_serves_their_images(service, dataset_root):
    rows = rarest_rows(dataset_root)
    first = requests.get(f"{service}/api/dataset", params={"limit": 10}, timeout=60).json()
    assert first["version"] == "2026-11-28" and first["versions"] == ["2026-11-28"]
    assert first["total"] == len(rows) == 15
    second = requests.get(f"{service}/api/dataset",
                          params={"version": "2026-11-28", "offset": 10, "limit": 10}, timeout=60).json()
    listed = first["rows"] + second["rows"]
    assert [r["sample_id"] for r in listed] == [r["sample_id"] for r in rows]
    assert [r["rank"] for r in listed] == list(range(1, 16))
    assert [r["topk_score"] for r in listed] == [r["topk_score"] for r in rows]
    image = requests.get(f"{service}/api/image", params={"version": "2026-11-28", "sample_id": rows[3]["sample_id"]},
                         timeout=60)
    assert image.headers["content-type"] == "image/png" and image.content == rows[3]["image"]["bytes"]
    missing = requests.get(f"{service}/api/image", params={"version": "2026-11-28", "sample_id": "nope"}, timeout=60)
    assert missing.status_code == 404 and "no sample 'nope'" in missing.json()["detail"]
    unknown = requests.get(f"{service}/api/dataset", params={"version": "1999-01-01"}, timeout=60)
    assert unknown.status_code == 404 and "complete versions: 2026-11-28" in unknown.json()["detail"]
    assert requests.get(f"{service}/api/dataset", params={"limit": 1000}, timeout=60).status_code == 422
    assert requests.get(f"{service}/api/dataset", params={"offset": "x"}, timeout=60).status_code == 422


def test_an_incomplete_version_is_not_shown(tmp_path):
    from pipeline.serve.browse import DatasetBrowser, DatasetError

    (tmp_path / "versions" / "2026-11-29" / "rarest" / "data").mkdir(parents=True)  # no _selection.json yet
    browser = DatasetBrowser(str(tmp_path), StorageConfig())
    assert browser.versions() == []
    with pytest.raises(DatasetError, match="holds no complete dataset yet"):
        browser.latest()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.fail("the page test drives Debian's chromium: `make test` installs it "
                    "(apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    yield driver
    driver.quit()


def test_page_pages_the_rarest_samples_and_scores_an_image_a_person_drops_in(service, dataset_root, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    rows = rarest_rows(dataset_root)
    wait = WebDriverWait(browser, 120)
    shown = lambda: browser.execute_script(
        "return [...document.querySelectorAll('#grid figure')].map(f => f.dataset.sampleId)")
    browser.get(f"{service}/")
    wait.until(lambda _: len(shown()) == 12)
    assert shown() == [row["sample_id"] for row in rows[:12]]
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth === 8)"))
    first = browser.find_element(By.CSS_SELECTOR, "#grid figcaption").text
    assert first.startswith(f"#1 · score {rows[0]['jepa_score']:.3f} · class {rows[0]['class_label']}")
    assert first.endswith(f"top-k {rows[0]['topk_score']:.3f}")
    assert browser.find_element(By.ID, "range").text == "rows 1–12 of 15"
    assert browser.find_element(By.ID, "version").get_attribute("value") == "2026-11-28"

    browser.find_element(By.ID, "next").click()
    wait.until(lambda _: len(shown()) == 3)
    assert shown() == [row["sample_id"] for row in rows[12:]]
    assert not browser.find_element(By.ID, "next").is_enabled()
    browser.find_element(By.ID, "prev").click()
    wait.until(lambda _: len(shown()) == 12)

    upload = tmp_path / "mine.png"
    upload.write_bytes(rows[4]["image"]["bytes"])
    expected = requests.post(f"{service}/score", data=upload.read_bytes(), timeout=120).json()
    browser.find_element(By.ID, "file").send_keys(str(upload))
    wait.until(lambda _: browser.find_elements(By.ID, "score"))
    result = browser.find_element(By.ID, "score")
    assert float(result.get_attribute("data-score")) == pytest.approx(expected["jepa_score"], abs=1e-6)
    assert float(result.get_attribute("data-topk-score")) == pytest.approx(expected["topk_score"], abs=1e-6)
    assert f"would rank #{expected['dataset_rank']['rank']} of 16 in version 2026-11-28" in result.text

    drop = """
        const [name, bytes, type] = arguments;
        const transfer = new DataTransfer();
        transfer.items.add(new File([new TextEncoder().encode(bytes)], name, { type }));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true }));
    """
    browser.execute_script(drop, "notes.png", "not really a picture", "image/png")
    wait.until(lambda _: browser.find_elements(By.CSS_SELECTOR, "#result .error"))
    assert "cannot decode the body as a PNG or JPEG image" in browser.find_element(By.CSS_SELECTOR, "#result .error").text


@pytest.mark.parametrize("label", [-1, 2**62 + 1, "3", 2.0])
def test_a_bad_class_label_is_refused_in_words_not_in_machine_bounds(label):
    with pytest.raises(RequestError) as refused:
        parse_generate({"class_label": label}, SamplingConfig(), ServeLimits())
    assert refused.value.status == 422
    assert str(refused.value) == f"class_label must be a class of the model, an integer >= 0, got {label!r}"
