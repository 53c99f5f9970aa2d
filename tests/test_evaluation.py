"""jepa-minority evaluate: closed forms for FD and the k-NN metrics, then whole evaluations on real
generated runs (local Ray, MLflow sqlite), tiny random Inception / CLIP weights saved and loaded back."""

from __future__ import annotations

import contextlib
import io
import json
from datetime import datetime, timezone

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import scipy.linalg
import scipy.stats
from scipy import sparse
import torch
from mlflow import MlflowClient
from PIL import Image

from jobs import evaluate as evaluate_job
from pipeline.evaluate.config import EvaluateConfig, ScoreConfig
from pipeline.evaluate.job import run_evaluation
from pipeline.evaluate.metrics import Balls, Moments, Subsample, frechet_distance, manifold_metrics, subsample_keys
from pipeline.evaluate.minority import VERDICTS, MinorityConfig, MinorityReference, minority_test
from pipeline.evaluate.prior import verdict
from pipeline.evaluate.rarity import avg_knn, avg_knn_within, local_outlier_factor
from pipeline.evaluate.scoring import score_images
from pipeline.generate.config import load_config
from pipeline.generate.job import run_generation
from pipeline.generate.preflight import preflight_generation
from pipeline.images import png_bytes
from pipeline.schema import DATA_FILE_PREFIX, OUTPUT_SCHEMA
from pipeline.storage import StorageConfig
from tests.conftest import ENCODER_NAME, TINY_SIZE


def gaussian_fd(mu1, var1, mu2, var2) -> float:
    """FD of two Gaussians with diagonal covariances: ||mu1 - mu2||^2 + sum (sqrt(v1) - sqrt(v2))^2."""
    return float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum())


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    sigma = a @ a.T + 0.1 * np.eye(6)
    mu = rng.normal(size=6)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-9)
    var1, var2 = rng.uniform(0.5, 2, 6), rng.uniform(0.5, 2, 6)
    mu2 = mu + 1
    assert frechet_distance(mu, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(gaussian_fd(mu, var1, mu2, var2), rel=1e-12)
    b = rng.normal(size=(6, 6))
    other = b @ b.T + np.eye(6)  # not commuting with sigma: against scipy's matrix square root
    root = scipy.linalg.sqrtm(sigma @ other).real
    want = ((mu - mu2) ** 2).sum() + np.trace(sigma) + np.trace(other) - 2 * np.trace(root)
    assert frechet_distance(mu, sigma, mu2, other) == pytest.approx(want, rel=1e-9)


def test_moments_over_blocks_estimate_the_analytic_fd():
    rng = np.random.default_rng(1)
    mu1, var1, mu2, var2 = np.zeros(4), np.full(4, 1.0), np.full(4, 0.5), np.full(4, 4.0)
    first, second = Moments(4), Moments(4)
    x = rng.normal(mu1, np.sqrt(var1), size=(40_000, 4))
    for block in np.array_split(x, 7):
        first.add(block)
    second.add(rng.normal(mu2, np.sqrt(var2), size=(40_000, 4)))
    mean, cov = first.gaussian()
    assert np.allclose(mean, x.mean(0)) and np.allclose(cov, np.cov(x, rowvar=False))
    fd = frechet_distance(*first.gaussian(), *second.gaussian())
    assert fd == pytest.approx(gaussian_fd(mu1, var1, mu2, var2), rel=0.03)  # 1 + 4 = 5, up to sampling noise


def lattice(n: int, offset: float = 0.0) -> np.ndarray:
    """Points 0, 1, ..., n-1 (plus an offset) on a line in 3 dimensions: exact distances."""
    return np.stack([np.arange(n) + offset, np.zeros(n), np.zeros(n)], 1).astype(np.float32)


def test_precision_recall_density_coverage_on_known_manifolds():
    real = lattice(20)
    same = manifold_metrics(real, real.copy(), nearest_k=1)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    far = manifold_metrics(real, lattice(20, offset=1000), nearest_k=1)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    # Half the fakes copy real points 0..9, half lie far away. With k = 1 every ball has radius 1 and
    # the comparisons are strict, so real point 10 (at distance 1 from fake 9) is neither covered nor
    # recalled: every metric is exactly one half.
    half = np.concatenate([real[:10], lattice(10, offset=1000)])
    assert manifold_metrics(real, half, nearest_k=1) == {"precision": 0.5, "recall": 0.5, "density": 0.5,
                                                        "coverage": 0.5}
    with pytest.raises(ValueError, match="need at least 7 samples in each set"):
        manifold_metrics(real, real[:6], nearest_k=5)  # k + 1 points: prdc's own radius needs k + 2
    assert set(manifold_metrics(real, real[:7], nearest_k=5)) == {"precision", "recall", "density", "coverage"}


@pytest.mark.parametrize("block_mib", [256, 0.01])  # one block, and blocks of a few rows
def test_blocked_k_nn_balls_equal_prdc_and_hold_only_memberships(block_mib, monkeypatch):
    """The same four figures as the prdc package's own all-pairs compute_prdc, on clustered and spread points."""
    from prdc import compute_prdc

    from pipeline.evaluate import metrics

    monkeypatch.setattr(metrics, "BLOCK_MIB", block_mib)

    rng = np.random.default_rng(0)
    real = np.concatenate([rng.normal(0, 1, (150, 8)), rng.normal(4, 0.5, (50, 8))]).astype(np.float32)
    fake = np.concatenate([rng.normal(0.3, 1.2, (120, 8)), rng.normal(9, 1, (40, 8))]).astype(np.float32)
    ours, balls = manifold_metrics(real, fake, nearest_k=5), Balls(real, fake, 5)
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the set sizes
        theirs = compute_prdc(real, fake, 5)
    assert ours == {name: float(value) for name, value in theirs.items()}
    assert 0 < ours["precision"] < 1 and 0 < ours["recall"] < 1 and 0 < ours["coverage"] < 1  # not a trivial case
    assert sparse.issparse(balls.inside) and balls.inside.nnz < real.shape[0] * fake.shape[0] / 10


def test_ball_figures_of_a_resample_equal_those_of_its_rows_drawn_out():
    rng = np.random.default_rng(1)
    real, fake = rng.normal(0, 1, (80, 4)), rng.normal(0.5, 1, (60, 4))
    balls, index = Balls(real, fake, 3), rng.integers(0, 60, 60)  # repeats, and rows never drawn
    drawn = Balls(real, fake[index], 3)()
    assert balls(index) == pytest.approx(drawn, abs=1e-12)


def test_subsample_is_uniform_bounded_and_independent_of_read_order():
    ids = [f"id{i:04d}" for i in range(1000)]
    keys = subsample_keys(3, ids)
    features = np.arange(1000, dtype=np.float32)[:, None]
    smallest = features[np.argsort(keys)[:100]]  # the exact answer: the rows of the 100 smallest keys, in key order
    forward, backward, uneven = Subsample(100), Subsample(100), Subsample(100)
    for start in range(0, 1000, 64):
        forward.add(keys[start:start + 64], features[start:start + 64])
    for start in reversed(range(0, 1000, 64)):
        backward.add(keys[start:start + 64], features[start:start + 64])
    for start, stop in ((0, 7), (7, 300), (300, 310), (310, 1000)):  # blocks below, above and past the spare room
        uneven.add(keys[start:stop], features[start:stop])
    for kept in (forward, backward, uneven):
        np.testing.assert_array_equal(kept.features, smallest)
    assert 300 < forward.features.mean() < 700  # spread over the whole set, not its first rows
    forward.add(keys[:0], features[:0])  # an empty block changes nothing
    np.testing.assert_array_equal(forward.features, smallest)
    other = Subsample(100)
    other.add(subsample_keys(4, ids), features)
    assert sorted(other.features[:, 0]) != sorted(forward.features[:, 0])


def stored(folder) -> pa.Table:
    files = sorted(str(p) for p in (folder / "data").rglob(f"{DATA_FILE_PREFIX}*.parquet"))
    return pads.dataset(files, format="parquet").to_table()


def reference_folder(folder, count: int = 10, size: int = 8) -> list:
    """Real-image stand-ins: random RGB PNG files."""
    folder.mkdir()
    rng = np.random.default_rng(5)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
    return sorted(folder.glob("*.png"))


def test_two_generated_runs_against_a_reference_folder_make_the_table(
        ray_cluster, write_config, tiny_vit_folder, tmp_path, tracking, capsys):
    runs = {}
    for method in ("unguided", "jepa"):
        path = write_config(work={"class_labels": [0, 3, 7], "samples_per_label": 3})
        config = load_config(path, [f"sampling.method={method}", f"output.uri={tmp_path / method}"])
        assert run_generation(preflight_generation(config)).ok
        runs[method] = tmp_path / method
    images = reference_folder(tmp_path / "real", count=16)

    args = ["--generated", str(runs["unguided"]), "--generated", str(runs["jepa"]), "--reference", str(tmp_path / "real"),
            "--output", str(tmp_path / "eval"), "--nearest-k", "2", "--cpus-per-actor", "0.5",
            "--baseline", str(runs["unguided"]), "--tracking-uri", tracking.tracking_uri]
    assert evaluate_job.main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    table = (tmp_path / "eval" / "evaluation.md").read_text()
    assert [row["method"] for row in report["rows"]] == ["unguided", "jepa"]
    assert table.splitlines()[0].startswith("| method | samples | AvgkNN ↑ | LOF ↑ |")
    assert "| JEPA-SCORE (objective) ↓ | below ref. p10 (objective) ↑ | FD (encoder) ↓" in table.splitlines()[0]
    assert "feature space pixels-32 (raw pixels resized to 32 x 32 RGB" in table  # the default without weights files
    assert table.splitlines()[2].startswith("| unguided | 9 |") and table.splitlines()[3].startswith("| jepa | 9 |")
    assert table in printed

    # the reference is embedded and scored by the runs' own encoder (the same as `jepa-minority score`)
    scored = {row.path: row.score for row in score_images(ScoreConfig(
        paths=(str(tmp_path / "real"),), encoder=ENCODER_NAME, weights=str(tiny_vit_folder), input_size=TINY_SIZE)).rows}
    reference_scores = np.array([scored[str(p)] for p in images])
    assert report["reference"]["rows"] == len(images)
    assert report["reference"]["p10"] == pytest.approx(np.quantile(reference_scores, 0.1), abs=1e-6)

    # the prior check of the reference: its exact scores against its own leave-one-out AvgkNN in pixels-32
    real_pixels = pixel_features(images, 32)
    prior = report["prior_check"]
    rho, p_value = scipy.stats.spearmanr(reference_scores, avg_knn_within(real_pixels, 5))
    assert prior["feature_space"] == "pixels-32" and prior["images"] == len(images) and prior["k"] == 5
    assert prior["spearman"] == pytest.approx(rho, abs=1e-9)
    assert prior["verdict"] == verdict(rho, len(images), p_value)
    assert f"Prior check of the reference: {prior['verdict']}." in table
    assert (tmp_path / "eval" / "prior_check.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from guidance import load_encoder
    encoder = load_encoder(ENCODER_NAME, tiny_vit_folder, input_size=TINY_SIZE)
    with torch.no_grad():
        pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB")).copy()).permute(2, 0, 1)
                              for p in images]).float() / 255
        real = encoder(encoder.resize(pixels)).double().numpy()
    client = MlflowClient(tracking_uri=tracking.tracking_uri)
    for row, method in zip(report["rows"], ("unguided", "jepa")):
        rows = stored(runs[method])  # stored scores and embeddings, not recomputed
        scores, fake = rows.column("jepa_score").to_numpy(), np.array(rows.column("embedding").to_pylist(), np.float64)
        assert row["jepa_score"]["mean"] == pytest.approx(scores.mean(), rel=1e-12)
        assert row["jepa_score"]["rarer_than_reference_p10"] == pytest.approx(
            (scores < np.quantile(reference_scores, 0.1)).mean())
        root = scipy.linalg.sqrtm(np.cov(real, rowvar=False) @ np.cov(fake, rowvar=False)).real
        want = (((real.mean(0) - fake.mean(0)) ** 2).sum() + np.trace(np.cov(real, rowvar=False))
                + np.trace(np.cov(fake, rowvar=False)) - 2 * np.trace(root))
        assert row["embedding"]["fd"] == pytest.approx(want, rel=1e-4, abs=1e-6)
        assert row["embedding"]["precision"] == pytest.approx(
            manifold_metrics(real, fake, nearest_k=2)["precision"])
        child = client.get_run(row["evaluation_run_id"])
        assert child.data.tags["generation_run_id"] == rows.column("run_id")[0].as_py() == row["generation_run_id"]
        assert child.data.tags["mlflow.parentRunId"] == report["evaluation_run_id"]
        assert child.data.metrics["embedding_fd"] == pytest.approx(row["embedding"]["fd"])
        # rarity of every stored image against the reference's pixels, not through the JEPA-SCORE
        fake_pixels = pixel_features([io.BytesIO(r["bytes"]) for r in rows.column("image").to_pylist()], 32)
        assert row["rarity"]["feature_space"] == "pixels-32" and row["rarity"]["samples"] == 9
        assert row["rarity"]["avg_knn"] == pytest.approx(avg_knn(fake_pixels, real_pixels, 5).mean(), rel=1e-5)
        assert row["rarity"]["lof"] == pytest.approx(local_outlier_factor(fake_pixels, real_pixels, 5).mean(), rel=1e-5)
        assert child.data.metrics["rarity_avg_knn"] == pytest.approx(row["rarity"]["avg_knn"])
        assert child.data.tags["rarity_feature_space"] == "pixels-32"
    # the minority test of the guided run against the unguided one, paired by seed, in the rarity space
    unguided, jepa = report["rows"]
    pixels_of = {method: pixel_features([io.BytesIO(r["bytes"]) for r in stored(runs[method]).column("image").to_pylist()], 32)
                 for method in runs}
    seeds_of = {method: stored(runs[method]).column("seed").to_numpy() for method in runs}
    chosen = MinorityReference(real_pixels, MinorityConfig(nearest_k=2))
    want = minority_test(pixels_of["jepa"], pixels_of["unguided"], chosen, (seeds_of["jepa"], seeds_of["unguided"]), (0, 1))
    assert jepa["minority"]["verdict"] == want["verdict"] in VERDICTS and jepa["minority"]["paired"]
    for name in ("fd_minority", "fd_all", "nearest_minority_share", "precision"):
        assert jepa["minority"][name] == pytest.approx(want[name], rel=1e-4, abs=1e-6)
    assert jepa["minority"]["intervals"]["fd_minority"] == pytest.approx(want["intervals"]["fd_minority"], rel=1e-3, abs=1e-6)
    assert jepa["minority"]["baseline"]["fd_minority"] == pytest.approx(unguided["minority"]["fd_minority"])
    assert unguided["minority"]["verdict"] == "baseline" and report["minority"]["baseline"] == "unguided"
    cells = lambda line: [cell.strip() for cell in line.strip().strip("|").split("|")]
    column = cells(table.splitlines()[0]).index("minority test")
    assert [cells(line)[column] for line in table.splitlines()[2:4]] == ["baseline", jepa["minority"]["verdict"]]
    assert "Minority test against unguided (docs/method.md, 'The minority test')" in table
    child = client.get_run(jepa["evaluation_run_id"])
    assert child.data.tags["minority_verdict"] == jepa["minority"]["verdict"]
    assert child.data.metrics["minority_fd_minority"] == pytest.approx(jepa["minority"]["fd_minority"])
    parent = client.get_run(report["evaluation_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["prior_check_spearman"] == pytest.approx(rho)
    artifacts = {a.path for a in client.list_artifacts(report["evaluation_run_id"])}
    assert artifacts == {"evaluation.json", "evaluation.md", "prior_check.png"}


def pixel_features(images: list, size: int) -> np.ndarray:
    """The pixels-SIZE space by hand: RGB, Pillow's bilinear resize, flattened, in [0, 1]."""
    return np.stack([np.asarray(Image.open(image).convert("RGB").resize((size, size), Image.BILINEAR), np.float64)
                     .reshape(-1) / 255 for image in images])


def fake_run(folder, method: str, seed: int, count: int = 8, dim: int = 6, encoder: str = ENCODER_NAME,
             prompts: bool = True, input_size: int = TINY_SIZE, fallback: int = 0) -> pa.Table:
    """A completed text-to-image generation output in the real schema, with random images and features;
    its last ``fallback`` rows committed as unguided (what output.retry_unguided does)."""
    rng = np.random.default_rng(seed)
    now = datetime.now(timezone.utc)
    rows = [{
        "sample_id": f"{method}{i:03d}", "seed": i, "prompt": ["a red square", "a blue circle"][i % 2] if prompts else None,
        "class_label": None if prompts else i % 2,
        "image": {"bytes": png_bytes(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)), "path": f"{method}{i:03d}.png"},
        "width": 16, "height": 16, "jepa_score": float(rng.normal(-30, 3)), "embedding": rng.normal(size=dim).tolist(),
        "method": "unguided" if i >= count - fallback else method, "model": "sd", "encoder": encoder, "run_id": f"gen-{method}", "created_at": now,
    } for i in range(count)]
    (folder / "data").mkdir(parents=True)
    table = pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)
    pq.write_table(table, folder / "data" / f"{DATA_FILE_PREFIX}0.parquet")
    encoder_config = {"name": ENCODER_NAME, "weights": "dinov2.safetensors", "input_size": input_size}
    (folder / "_run.json").write_text(json.dumps({"status": "complete", "last_run_id": f"gen-{method}",
                                                  "config": {"encoder": encoder_config, "sampling": {"method": method}}}))
    return table


def clip_scores(model, table: pa.Table) -> np.ndarray:
    _, _, preprocess = open_clip.create_model_and_transforms("tiny-clip")
    tokenizer = open_clip.get_tokenizer("tiny-clip")
    images = torch.stack([preprocess(Image.open(io.BytesIO(r["bytes"])).convert("RGB"))
                          for r in table.column("image").to_pylist()])
    with torch.no_grad():
        a = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
        b = torch.nn.functional.normalize(model.encode_text(tokenizer(table.column("prompt").to_pylist())), dim=-1)
    return (100 * (a * b).sum(-1).clamp_min(0)).numpy()


@pytest.mark.parametrize("change, message", [
    (dict(inception_weights="missing.pth"), "Inception weights not found"),
    (dict(clip_weights="missing.pt", clip_arch="ViT-B-32"), "CLIP weights not found"),
    (dict(clip_weights="x.pt"), "needs both --clip-weights and --clip-arch"),
    (dict(reference=None, inception_weights="x.pth"), "FID / sFID compare against a reference"),
    (dict(max_samples=3, nearest_k=5), "max_samples must exceed nearest_k"),
    (dict(max_samples=6, nearest_k=2, rarity_k=6), r"max_samples must exceed nearest_k \(2\) and rarity_k \(6\)"),
    (dict(reference=None, rarity_features="pixels-8"), "rarity is measured against a reference"),
    (dict(rarity_features="pixels-0"), "unknown feature space 'pixels-0'"),
    (dict(rarity_features="pixels-8-gray"), "unknown feature space 'pixels-8-gray'"),
    (dict(rarity_features="inception"), "feature space inception needs --inception-weights"),
    (dict(rarity_features="clip"), "feature space clip needs --clip-weights"),
    (dict(baseline="b"), "--baseline b is not one of the generated runs"),
    (dict(generated=("a", "b"), baseline="b", reference=None), "the minority test measures against a reference"),
    (dict(minority_quantile=0), "minority_quantile must lie strictly between 0 and 1"),
    (dict(minority_per_class=True), "--minority-per-class chooses the minority test's reference: pass --baseline"),
])
def test_bad_settings_are_refused_before_any_work(tmp_path, change, message):
    settings = dict(generated=("a",), reference="ref") | change
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        EvaluateConfig(**settings)


def test_bad_references_and_runs_give_clear_errors(ray_cluster, tmp_path, tracking, inception_weights, capsys):
    fake_run(tmp_path / "gen", "jepa", 0)
    base = ["--generated", str(tmp_path / "gen"), "--tracking-uri", tracking.tracking_uri, "--nearest-k", "2"]

    def refused(*extra) -> str:
        assert evaluate_job.main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1].startswith("jepa-minority evaluate: ")  # the last line is ours
        return err

    assert f"reference {tmp_path / 'nowhere'} not found" in refused("--reference", str(tmp_path / "nowhere"))
    reference_folder(tmp_path / "real", count=8)  # images are embedded with the runs' encoder, whose weights are gone
    assert "encoder weights not found: dinov2.safetensors" in refused("--reference", str(tmp_path / "real"))
    (tmp_path / "empty").mkdir()
    assert "holds no Parquet files and no .png/.jpg/.jpeg images" in refused("--reference", str(tmp_path / "empty"))
    reference_folder(tmp_path / "broken", count=3)
    (tmp_path / "broken" / "img03.png").write_bytes(b"not a png")
    assert "img03.png cannot be decoded" in refused("--reference", str(tmp_path / "broken"))
    fake_run(tmp_path / "other-encoder", "x", 1, encoder="vit_base_patch14_dinov2")
    assert "was embedded by ['vit_base_patch14_dinov2'], not by the generated runs' vit_small_patch14_reg4_dinov2" \
        in refused("--reference", str(tmp_path / "other-encoder"))
    fake_run(tmp_path / "other-dim", "y", 2, dim=5)
    assert "reference embeddings have dimension 5" in refused("--reference", str(tmp_path / "other-dim"),
                                                              "--rarity-features", "encoder")
    fake_run(tmp_path / "small", "s", 5, count=6)
    assert "holds 6 rows but rarity with k = 6 needs more than k: lower --rarity-k to at most 5" in refused(
        "--reference", str(tmp_path / "small"), "--rarity-k", "6")
    assert "rarity is measured against a reference" in refused("--rarity-features", "pixels-8")
    fake_run(tmp_path / "empty-run", "e", 6, count=0)
    assert "holds fewer than 2 rows" in refused("--generated", str(tmp_path / "empty-run"),
                                                "--reference", str(tmp_path / "gen"))
    fake_run(tmp_path / "other-size", "z", 3, input_size=56)
    assert "scored at input size 56" in refused("--reference", str(tmp_path / "other-size"))
    (tmp_path / "bare").mkdir()
    pq.write_table(pa.table({"sample_id": ["a"], "jepa_score": [1.0]}), tmp_path / "bare" / "rows.parquet")
    assert "lacks the column(s) embedding, encoder" in refused("--reference", str(tmp_path / "bare"))
    (tmp_path / "unfinished").mkdir()
    assert "is not a completed generation run" in refused("--generated", str(tmp_path / "unfinished"))
    fake_run(tmp_path / "big", "big", 4, input_size=56)
    assert "scored by different encoders" in refused("--generated", str(tmp_path / "big"))
    bad = tmp_path / "bad.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1)}, bad)
    assert "does not hold Inception-v3 weights" in refused("--reference", str(tmp_path / "gen"),
                                                          "--inception-weights", str(bad))
    assert not (tmp_path / "eval").exists()


def test_rows_of_the_unguided_fallback_are_a_row_of_their_own(ray_cluster, tmp_path, tracking):
    scores = fake_run(tmp_path / "gen", "jepa", 0, count=10, fallback=3).column("jepa_score").to_numpy()
    report = run_evaluation(EvaluateConfig(generated=(str(tmp_path / "gen"),), tracking=tracking))
    rows = {row["method"]: row for row in report["rows"]}
    assert list(rows) == ["jepa", "unguided (fallback in jepa)"]
    assert rows["jepa"]["rows"] == 7 and rows["unguided (fallback in jepa)"]["rows"] == 3
    assert rows["jepa"]["jepa_score"]["mean"] == pytest.approx(scores[:7].mean())
    assert rows["unguided (fallback in jepa)"]["jepa_score"]["mean"] == pytest.approx(scores[7:].mean())
    assert rows["jepa"]["failed_in_input"] == rows["unguided (fallback in jepa)"]["failed_in_input"] == 0


def test_runs_and_reference_on_object_storage_and_rarity_without_a_reference(ray_cluster, s3, tmp_path, tracking):
    client = s3.client()
    client.create_bucket(Bucket="evaluate")
    tables = {}
    for name, seed in (("gen", 0), ("ref", 1)):
        tables[name] = fake_run(tmp_path / name, name, seed)
        for path in (tmp_path / name).rglob("*"):
            if path.is_file():
                client.upload_file(str(path), "evaluate", f"{name}/{path.relative_to(tmp_path / name)}")
    storage = StorageConfig(endpoint_url=s3.endpoint, region="us-east-1")
    report = run_evaluation(EvaluateConfig(generated=("s3://evaluate/gen",), reference="s3://evaluate/ref/data",
                                           output="s3://evaluate/eval", nearest_k=2, storage=storage, tracking=tracking))
    gen, ref = (tables[name].column("jepa_score").to_numpy() for name in ("gen", "ref"))
    row = report["rows"][0]
    assert row["method"] == "gen" and row["jepa_score"]["quantiles"]["p50"] == pytest.approx(np.median(gen))
    assert row["jepa_score"]["rarer_than_reference_p10"] == pytest.approx((gen < np.quantile(ref, 0.1)).mean())
    written = json.loads(client.get_object(Bucket="evaluate", Key="eval/evaluation.json")["Body"].read())
    assert written["rows"][0]["embedding"]["fd"] == pytest.approx(row["embedding"]["fd"])

    alone = run_evaluation(EvaluateConfig(generated=(str(tmp_path / "gen"),), tracking=tracking))
    assert set(alone["rows"][0]) == {"method", "uri", "generation_run_id", "rows", "invalid", "failed_in_input",
                                     "jepa_score", "evaluation_run_id"}
    assert alone["rows"][0]["jepa_score"]["std"] == pytest.approx(gen.std())


def rewrite(folder, column: str, values: list) -> None:
    """Replace one column of a fake run's only data file, every other column kept."""
    (path,) = (folder / "data").glob(f"{DATA_FILE_PREFIX}*.parquet")
    table = pq.read_table(path)
    index = table.schema.get_field_index(column)
    pq.write_table(table.set_column(index, table.field(column), pa.array(values, table.schema.field(column).type)), path)


def test_rarity_follows_the_images_and_ignores_the_jepa_score(ray_cluster, tmp_path, tracking):
    gen, ref = fake_run(tmp_path / "gen", "jepa", 0), fake_run(tmp_path / "ref", "ref", 1)

    def evaluate() -> dict:
        return run_evaluation(EvaluateConfig(generated=(str(tmp_path / "gen"),), reference=str(tmp_path / "ref"),
                                             nearest_k=2, rarity_features="pixels-8-grey", rarity_k=3,
                                             cpus_per_actor=0.5, tracking=tracking))["rows"][0]

    def grey(table: pa.Table) -> np.ndarray:
        return np.stack([np.asarray(Image.open(io.BytesIO(r["bytes"])).convert("L").resize((8, 8), Image.BILINEAR),
                                    np.float64).reshape(-1) / 255 for r in table.column("image").to_pylist()])

    first = evaluate()
    assert first["rarity"]["feature_space"] == "pixels-8-grey" and first["rarity"]["k"] == 3
    assert first["rarity"]["avg_knn"] == pytest.approx(avg_knn(grey(gen), grey(ref), 3).mean(), rel=1e-5)
    assert set(first["rarity"]) == {"feature_space", "k", "avg_knn", "avg_knn_quantiles", "lof", "rarity_score",
                                    "rarity_score_uncovered", "neighbours", "samples"}
    assert first["rarity"]["neighbours"] == {"search": "exact"}  # auto: 8 reference rows are searched exactly

    rewrite(tmp_path / "gen", "jepa_score", list(np.linspace(-90, -10, 8)))  # only the guidance objective changes
    second = evaluate()
    assert second["jepa_score"]["mean"] == pytest.approx(-50) != first["jepa_score"]["mean"]
    assert second["rarity"] == first["rarity"]

    images = ref.column("image").to_pylist()  # the run's images become the reference's own: rarity falls to zero
    rewrite(tmp_path / "gen", "image", images)
    third = evaluate()
    assert third["rarity"]["avg_knn"] < first["rarity"]["avg_knn"]
    assert third["rarity"]["avg_knn"] == pytest.approx(avg_knn(grey(ref), grey(ref), 3).mean(), rel=1e-5)
    assert third["rarity"]["rarity_score_uncovered"] == 0
