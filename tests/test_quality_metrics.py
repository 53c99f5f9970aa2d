"""PickScore and cFID / sFID against the reference's minority in `jepa-minority evaluate`: a tiny random CLIP saved in
transformers' folder layout and loaded back through the job's loader, hand computations, and the refusals."""

from __future__ import annotations

import io
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from jobs import evaluate as evaluate_job
from pipeline.evaluate.config import EvaluateConfig
from pipeline.evaluate.features import InceptionFeatures, PickScorer, clean_resize
from pipeline.evaluate.job import run_evaluation
from pipeline.evaluate.metrics import frechet_distance
from pipeline.images import png_bytes
from pipeline.schema import DATA_FILE_PREFIX
from tests.test_evaluation import clip_scores, fake_run, rewrite, stored
from tests.tiny_diffusion import tiny_tokenizer

PROMPTS = ["a red square", "a blue circle on grass"]


@pytest.fixture(scope="session")
def tiny_pickscore(tmp_path_factory):
    """A tiny random CLIPModel (logit scale 30, not CLIP's 100) and its processor, saved as PickScore_v1's folder."""
    folder = tmp_path_factory.mktemp("pickscore")
    tokenizer = tiny_tokenizer(folder / "tokenizer")
    config = CLIPConfig(
        text_config=dict(vocab_size=600, bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_size=32,
                         intermediate_size=37, num_attention_heads=4, num_hidden_layers=1),
        vision_config=dict(image_size=32, patch_size=16, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                           num_hidden_layers=1),
        projection_dim=16, logit_scale_init_value=math.log(30))
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    model.save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder, model


def hand_pickscore(folder, model: CLIPModel, images: list, prompts: list[str]) -> np.ndarray:
    """PickScore from the towers and projections themselves: logit scale x cosine of image and prompt."""
    processor = CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text = model.text_model(**processor(text=prompts, padding=True, return_tensors="pt"))
        cosine = torch.nn.functional.cosine_similarity(image, model.text_projection(text.pooler_output))
        return (model.logit_scale.exp() * cosine).numpy()


def images_of(folder) -> list[Image.Image]:
    (path,) = (folder / "data").glob(f"{DATA_FILE_PREFIX}*.parquet")
    return [Image.open(io.BytesIO(cell["bytes"])).convert("RGB") for cell in pq.read_table(path).column("image").to_pylist()]


def test_pickscore_is_the_logit_scale_times_the_cosine(tiny_pickscore):
    folder, model = tiny_pickscore
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)) for _ in range(3)]
    prompts = [PROMPTS[0], PROMPTS[1], "x"]
    scores = PickScorer(str(folder), None, "cpu").score(images, prompts)
    assert scores == pytest.approx(hand_pickscore(folder, model, images, prompts), rel=1e-5, abs=1e-6)


def test_clean_resize_is_pillow_bicubic_on_float_channels():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (12, 9, 3), dtype=np.uint8))
    resized = clean_resize(image).numpy()
    assert resized.shape == (3, 299, 299) and resized.dtype == np.uint8
    for channel in range(3):
        plane = Image.fromarray(np.asarray(image)[..., channel].astype(np.float32), mode="F").resize((299, 299), Image.BICUBIC)
        assert np.array_equal(resized[channel], np.rint(np.clip(np.asarray(plane), 0, 255)))


@pytest.mark.parametrize("flags, message", [
    (["--pickscore-weights", "{tmp}/nowhere"], "PickScore weights not found: {tmp}/nowhere is not a folder"),
    (["--pickscore-weights", "{tmp}/empty"], "PickScore weights incomplete in {tmp}/empty: no config.json, "
                                             "model.safetensors or pytorch_model.bin, {tmp}/empty/preprocessor_config.json or "
                                             "{tmp}/empty/processor_config.json"),
    (["--pickscore-weights", "{model}", "--pickscore-processor", "{tmp}/empty"],
     "no {tmp}/empty/preprocessor_config.json"),
    (["--pickscore-processor", "{model}"], "--pickscore-processor goes with --pickscore-weights"),
])
def test_absent_pickscore_weights_are_refused_in_one_line(tiny_pickscore, tmp_path, capsys, flags, message):
    (tmp_path / "empty").mkdir()
    fill = dict(tmp=tmp_path, model=tiny_pickscore[0])
    argv = ["--generated", str(tmp_path / "run"), *[flag.format(**fill) for flag in flags]]
    assert evaluate_job.main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("jepa-minority evaluate: ") and message.format(**fill) in line
    assert "nothing is downloaded here" in line or "goes with" in line


def test_a_minority_too_small_for_cfid_is_refused_before_any_model_loads(tmp_path, capsys):
    fake_run(tmp_path / "gen", "gen", 0, count=4)
    fake_run(tmp_path / "ref", "ref", 1, count=4)  # a quarter of 4 rows is 1: no covariance
    (tmp_path / "inception.pth").write_bytes(b"never loaded")
    argv = ["--generated", str(tmp_path / "gen"), "--reference", str(tmp_path / "ref"), "--rarity-k", "2",
            "--nearest-k", "1", "--inception-weights", str(tmp_path / "inception.pth"), "--output", str(tmp_path / "eval")]
    assert evaluate_job.main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == ("jepa-minority evaluate: cFID / sFID against the reference's minority need at least 2 minority rows, "
                    "but 0.25 of 4 is 1: raise --minority-quantile or give a larger reference")
    assert not (tmp_path / "eval" / "evaluation.json").exists()


def shaded(values: list[int], seed: int) -> list[bytes]:
    """16 x 16 PNGs of the given grey levels with a little noise."""
    rng = np.random.default_rng(seed)
    return [png_bytes(np.clip(value + rng.integers(-8, 9, (16, 16, 3)), 0, 255).astype(np.uint8)) for value in values]


@pytest.mark.slow  # one evaluation with Inception-v3 at 299 on the CPU: four sets
def test_fid_cfid_sfid_clip_and_pickscore_from_local_weights(ray_cluster, tmp_path, tracking, inception_weights,
                                                            tiny_clip, tiny_pickscore):
    folder, model = tiny_pickscore
    clip_config, clip_file, clip_model = tiny_clip
    # the reference: six random-noise images (near mid-grey in pixels-4) and two far apart (near black, near
    # white), its rarest quarter in pixels; noise keeps Inception's features spread, so FID to itself is 0
    noise = fake_run(tmp_path / "ref", "ref", 0).column("image").to_pylist()[:6]
    rewrite(tmp_path / "ref", "image", noise + [{"bytes": data, "path": f"{i}.png"} for i, data in
                                               enumerate(shaded([10, 245], 0), start=6)])
    prompted = fake_run(tmp_path / "sd", "sd", 1, count=4)
    fake_run(tmp_path / "cc", "cc", 2, count=4, prompts=False)
    report = run_evaluation(EvaluateConfig(
        generated=(str(tmp_path / "ref"), str(tmp_path / "sd"), str(tmp_path / "cc")), reference=str(tmp_path / "ref"),
        output=str(tmp_path / "eval"), nearest_k=2, rarity_features="pixels-4", inception_weights=str(inception_weights),
        clip_weights=str(clip_file), clip_arch=str(clip_config), pickscore_weights=str(folder), batch_size=8,
        cpus_per_actor=0.5, tracking=tracking))

    itself, sd, cc = report["rows"]
    pool, spatial = InceptionFeatures(str(inception_weights), "cpu")(images_of(tmp_path / "ref") + images_of(tmp_path / "sd"))
    # the reference evaluated as a run: every distance is zero (up to the matrix square root's rounding, relative
    # to the features' total variance) and every manifold covered
    assert itself["embedding"]["fd"] == pytest.approx(0, abs=1e-9)
    for key, features in (("fid", pool[:8]), ("sfid", spatial[:8])):
        assert itself["inception"][key] == pytest.approx(0, abs=1e-5 * np.trace(np.cov(features, rowvar=False)))
    assert sd["inception"]["fid"] > 0 and sd["inception"]["sfid"] > 0
    assert itself["embedding"]["precision"] == itself["embedding"]["recall"] == itself["embedding"]["coverage"] == 1
    for row, run in ((itself, "ref"), (sd, "sd")):
        assert row["clip_score"] == pytest.approx(clip_scores(clip_model, stored(tmp_path / run)).mean(), rel=1e-5)
    assert itself["clip_rows"] == 8 and sd["clip_rows"] == 4
    # by hand: the two far images are the minority; Gaussians of their features and of the run's, and their FD
    for key, features in (("cfid_minority", pool), ("sfid_minority", spatial)):
        theirs, mine = features[6:8], features[8:]
        want = frechet_distance(mine.mean(0), np.cov(mine, rowvar=False), theirs.mean(0), np.cov(theirs, rowvar=False))
        assert sd["inception"][key] == pytest.approx(want, rel=1e-4)
    assert sd["inception"]["cfid_minority"] != pytest.approx(sd["inception"]["fid"], rel=1e-3)
    assert cc["inception"]["cfid_minority"] > 0 and cc["inception"]["sfid_minority"] > 0
    want = hand_pickscore(folder, model, images_of(tmp_path / "sd"), prompted.column("prompt").to_pylist())
    assert sd["pickscore"] == pytest.approx(want.mean(), rel=1e-5) and sd["pickscore_rows"] == 4
    assert cc["pickscore"] is None and cc["pickscore_rows"] == 0
    assert report["inception_minority"]["rows"] == 2

    table = (tmp_path / "eval" / "evaluation.md").read_text()
    header, _, _, sd_line, cc_line = table.splitlines()[:5]
    cells = lambda line: [cell.strip() for cell in line.strip().strip("|").split("|")]
    columns = cells(header)
    assert {"FID ↓", "sFID ↓", "CLIP ↑", "cFID (minority) ↓", "sFID (minority) ↓", "PickScore ↑"} <= set(columns)
    assert cells(cc_line)[columns.index("PickScore ↑")] == "—" != cells(sd_line)[columns.index("PickScore ↑")]
    assert "a run without prompts (class-conditional) has none: its cell is empty (—)" in table
    assert "rarest 25% by leave-one-out AvgkNN in pixels-4 (2 rows)" in table
    child = MlflowClient(tracking.tracking_uri).get_run(sd["evaluation_run_id"])
    for name in ("cfid_minority", "sfid_minority"):
        assert child.data.metrics[name] == pytest.approx(sd["inception"][name])
    assert child.data.metrics["pickscore"] == pytest.approx(sd["pickscore"])
