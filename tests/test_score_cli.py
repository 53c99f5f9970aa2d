"""jepa-minority score: the user's own image files ranked by world-prior rarity."""

from __future__ import annotations

import csv
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from guidance import jepa_score, topk_log_volume
from jobs import cli
from pipeline.images import read_image
from tests.conftest import ENCODER_NAME, TINY_SIZE


@pytest.fixture
def image_folder(tmp_path):
    """Five images of different sizes and formats, one in a subfolder."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    (folder / "more").mkdir(parents=True)
    ramp = np.linspace(0, 255, 42, dtype=np.uint8)
    Image.fromarray(np.stack([np.tile(ramp, (42, 1))] * 3, -1)).save(folder / "ramp.png")
    Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(folder / "noise.png")
    Image.fromarray(np.full((56, 40, 3), 128, np.uint8)).save(folder / "flat.jpg")
    Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8)).save(folder / "more" / "gray.png")
    Image.fromarray(rng.integers(0, 256, (28, 28, 4), dtype=np.uint8)).save(folder / "more" / "rgba.png")
    (folder / "notes.txt").write_text("not an image: skipped inside folders")
    return folder


def direct_scores(encoder, folder):
    paths = sorted(p for p in folder.rglob("*") if p.suffix in (".png", ".jpg"))
    images = torch.stack([encoder.resize(read_image(p)[None])[0] for p in paths])
    return {str(p): s for p, s in zip(paths, jepa_score(encoder, images).tolist())}


def test_exact_scores_are_ranked_rarest_first_and_written_to_csv(image_folder, tiny_vit_folder, tiny_encoder,
                                                               tmp_path, capsys):
    output = tmp_path / "out" / "scores.csv"
    code = cli.main(["score", str(image_folder), "--encoder", ENCODER_NAME, "--weights", str(tiny_vit_folder),
                     "--input-size", str(TINY_SIZE), "--batch-size", "2", "--output", str(output)])
    assert code == 0
    with output.open() as handle:
        rows = list(csv.DictReader(handle))
    want = direct_scores(tiny_encoder, image_folder)
    assert [row["path"] for row in rows] == sorted(want, key=want.get)
    for row in rows:
        # fp32: the final LayerNorm's null direction leaves one singular value at rounding level
        assert float(row["score"]) == pytest.approx(want[row["path"]], abs=0.01)
        assert row["method"] == "exact"
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["rank", "score", "path"]
    assert [line.split()[2] for line in printed[1:]] == [row["path"] for row in rows]
    assert not list(output.parent.glob(".*partial"))


def test_topk_scores_to_parquet_do_not_depend_on_batch_size(image_folder, tiny_vit_folder, tiny_encoder, tmp_path):
    tables = []
    for batch_size in (1, 3):
        output = tmp_path / f"scores{batch_size}.parquet"
        cli.main(["score", str(image_folder), "--weights", str(tiny_vit_folder), "--input-size", str(TINY_SIZE),
                  "--method", "topk", "--k", "5", "--power-iters", "1", "--seed", "3",
                  "--batch-size", str(batch_size), "--output", str(output)])
        tables.append(pq.read_table(output).to_pylist())
    assert [r["path"] for r in tables[0]] == [r["path"] for r in tables[1]]
    for one, three in zip(*tables):
        assert one["score"] == pytest.approx(three["score"], rel=1e-5) and one["method"] == "topk"
    first = tables[0][0]
    image = tiny_encoder.resize(read_image(first["path"])[None])
    want = topk_log_volume(tiny_encoder, image, k=5, power_iters=1, generator=[torch.Generator().manual_seed(3)])
    assert first["score"] == pytest.approx(want.item(), rel=1e-5)


def test_console_script_runs(image_folder, tiny_vit_folder):
    script = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "score", str(image_folder / "noise.png"), "--weights",
         str(tiny_vit_folder), "--input-size", str(TINY_SIZE)],
        capture_output=True, text=True, timeout=300,
    )
    assert script.returncode == 0, script.stderr
    assert script.stdout.splitlines()[1].split()[2].endswith("noise.png")


@dataclass(frozen=True)
class Done:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run_score(capsys):
    """`jepa-minority score ARGS` in this process (test_console_script_runs runs the real console script)."""

    def run(args: list[str]) -> Done:
        code = cli.main(["score", *args])
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err
        return Done(code, captured.out, captured.err)

    return run


def test_undecodable_and_oversized_files_are_skipped_and_counted(tmp_path, tiny_vit_folder, run_score):
    good, broken, large = tmp_path / "good.png", tmp_path / "broken.png", tmp_path / "large.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good)
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(large)
    done = run_score([str(tmp_path), "--weights", str(tiny_vit_folder), "--input-size", str(TINY_SIZE),
                      "--max-pixels", "100"])
    assert done.returncode == 0, done.stderr
    assert [line.split()[2] for line in done.stdout.splitlines()[1:]] == [str(good)]
    errors = done.stderr.strip().splitlines()
    assert any(line.startswith(f"jepa-minority score: skipped {broken}: cannot decode image") for line in errors)
    assert any(f"skipped {large}: image {large} is 20 x 20 pixels, over the limit of 100" in line for line in errors)
    assert errors[-1].startswith("jepa-minority score: scored 1, skipped 2 ")


def test_nothing_scorable_exits_2_in_one_line(tmp_path, tiny_vit_folder, run_score):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    done = run_score([str(tmp_path), "--weights", str(tiny_vit_folder), "--input-size", str(TINY_SIZE)])
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("jepa-minority score: none of the 1 files could be scored")


@pytest.mark.parametrize("args,message", [
    (["missing.png", "--weights", "random"], "jepa-minority score: no such image file or folder: missing.png"),
    (["{tmp}/notes.txt", "--weights", "random"], "is not an image file"),
    (["{tmp}", "--weights", "random"], "jepa-minority score: folder {tmp} holds no"),
    (["{tmp}/a.png"], "jepa-minority score: no encoder weights given: pass --weights WEIGHTS"),
    (["{tmp}/a.png", "--weights", "{tmp}/notes.txt"], "jepa-minority score: encoder weights {tmp}/notes.txt: "),
])
def test_bad_paths_and_weights_are_one_line_exit_2(tmp_path, args, message, run_score):
    (tmp_path / "notes.txt").write_text("x")
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / "a.png")
    folder = tmp_path / "empty"
    folder.mkdir()
    tmp = {"{tmp}/a.png": str(images / "a.png"), "{tmp}": str(folder)}
    args = [tmp.get(a, a.format(tmp=tmp_path)) for a in args]
    done = run_score(args)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert message.format(tmp=folder if "holds no" in message else tmp_path) in line


@pytest.mark.parametrize("flags,message", [
    (["--output", "scores.json"], "output must end in .csv or .parquet"),
    (["--method", "topk", "--k", "0"], "k must be an integer >= 1"),
    (["--batch-size", "0"], "batch_size must be >= 1"),
])
def test_bad_flags_exit_2_with_the_reason(image_folder, flags, message, capsys):
    assert cli.main(["score", str(image_folder), "--weights", "random", *flags]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("where,message", [
    ("file.txt/scores.csv", "output {tmp}/file.txt/scores.csv: {tmp}/file.txt is a file, not a folder: choose a "
                            "folder for the output"),
    ("folder.csv", "output {tmp}/folder.csv is a folder: give a file name ending in .csv or .parquet"),
])
def test_an_unwritable_output_is_refused_before_any_image_is_scored(image_folder, tiny_vit_folder, tmp_path, capsys,
                                                                    where, message):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "folder.csv").mkdir()
    assert cli.main(["score", str(image_folder), "--weights", str(tiny_vit_folder), "--encoder", ENCODER_NAME,
                     "--input-size", str(TINY_SIZE), "--output", str(tmp_path / where)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"jepa-minority score: {message.format(tmp=tmp_path)}"
    assert captured.out == ""  # no table: nothing was scored
