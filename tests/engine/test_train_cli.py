"""End to end through the CLI on a tiny synthetic catalogue: train, reload, eval, compare."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from engine.inference import load_model
from whymatch.cli import main


@pytest.fixture()
def trained(tmp_path, groups_folder):
    out = tmp_path / "model"
    env = {"WHYMATCH_DATA_DIR": str(tmp_path / "data")}
    result = CliRunner().invoke(main, ["train", "--data", str(groups_folder), "--form", "groups", "--out", str(out),
                                       "--input-size", "96", "--epochs", "2", "--json"], env=env)
    assert result.exit_code == 0, result.output
    return out, groups_folder, env


def test_train_saves_a_loadable_checkpoint(trained):
    out, folder, _ = trained
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "history.json"}
    assert not (out / "resume.pt").exists()
    model = load_model(out)
    config = json.loads((out / "config.json").read_text())
    assert config["input_size"] == 96 and "command" in config["provenance"]
    assert 0.0 < model.threshold < 1.0
    # Duplicate groups also place the catalogue-wide duplicate threshold, on every inner-validation pair.
    assert 0.0 < model.config.duplicate_threshold <= 1.0
    emb = model.embed(sorted(folder.rglob("*.jpg"))[:3])
    assert emb.shape == (3, 256)


def test_eval_json_has_the_documented_keys(trained):
    out, folder, env = trained
    result = CliRunner().invoke(main, ["eval", "--data", str(folder), "--form", "groups", "--model", str(out), "--json"], env=env)
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    assert {"recall@1", "recall@5", "map", "pair_auc"} <= set(metrics)
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("recall@1", "recall@5", "map", "pair_auc"))


def test_compare_writes_figure_and_json(trained, tmp_path):
    out, folder, env = trained
    a, b = sorted(folder.rglob("*.jpg"))[:2]
    figure = tmp_path / "fig.png"
    result = CliRunner().invoke(main, ["compare", str(a), str(b), "--model", str(out), "--out", str(figure), "--json"], env=env)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["decision"] in {"match", "no match"}
    assert len(payload["factual_a"]) == 3 and figure.stat().st_size > 10_000


def test_compare_reports_a_broken_image_clearly(trained, tmp_path):
    out, folder, env = trained
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    result = CliRunner().invoke(main, ["compare", str(broken), str(next(folder.rglob("*.jpg"))), "--model", str(out)], env=env)
    assert result.exit_code != 0
    assert "broken.jpg" in result.output or "image" in result.output.lower()


def test_eval_leaves_out_and_reports_a_broken_file(trained):
    out, folder, env = trained
    (folder / "room" / "city_9_0.jpg").write_bytes(b"not a photo")
    result = CliRunner().invoke(main, ["eval", "--data", str(folder), "--form", "groups", "--model", str(out), "--json"], env=env)
    assert result.exit_code == 0, result.output
    assert "skipped" in result.stderr and "city_9_0.jpg" in result.stderr
    metrics = json.loads(result.stdout)
    assert isinstance(metrics["n_queries"], int) and metrics["n_queries"] == 12


@pytest.mark.parametrize("args, code, message", [
    (["--data", "{empty}"], 1, "no images"),
    (["--data", "{folder}", "--groups-csv", "{bad_csv}"], 1, "path,group"),
    (["--data", "{folder}", "--holdout", "1.5"], 2, "--holdout"),
])
def test_bad_eval_input_is_a_one_line_error(trained, tmp_path, args, code, message):
    out, folder, env = trained
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.csv").write_text("file,listing\nroom/city_1_0.jpg,x\n")
    values = {"empty": tmp_path / "empty", "folder": folder, "bad_csv": tmp_path / "bad.csv"}
    result = CliRunner().invoke(main, ["eval", *[a.format(**values) for a in args], "--model", str(out)], env=env)
    assert result.exit_code == code, result.output
    assert message in result.output and "Traceback" not in result.output
