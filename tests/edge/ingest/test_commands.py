"""``edge serve`` / ``edge replay`` argument handling; replay into a local pipeline end to end."""

import argparse

import pytest
from ingest_helpers import Sphere, write_series

from edge.ingest.commands import add_parsers, main
from edge.outputs.jsonl import read_jsonl


def parser():
    p = argparse.ArgumentParser(prog="edge")
    add_parsers(p.add_subparsers(dest="command", required=True))
    return p


def test_parsers():
    args = parser().parse_args(["serve", "--config", "edge.toml"])
    assert args.config == "edge.toml" and args.func.__name__ == "cmd_serve"
    args = parser().parse_args(["replay", "series/", "--rate", "25", "--to", "127.0.0.1:11112"])
    assert (args.dir, args.rate, args.to, args.associations) == ("series/", 25.0, "127.0.0.1:11112", 1)
    with pytest.raises(SystemExit):
        parser().parse_args(["replay", "series/"])  # --to or --config is required
    with pytest.raises(SystemExit):
        parser().parse_args(["replay", "series/", "--to", "h:1", "--config", "c.toml"])


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["serve", "--config", str(tmp_path / "missing.toml")]) == 1
    assert "missing.toml: no such config file" in capsys.readouterr().err
    write_series(tmp_path / "s", n_slices=1)
    assert main(["replay", str(tmp_path / "s"), "--to", "nohostport"]) == 1
    assert "--to must be HOST:PORT" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["replay", str(tmp_path / "empty"), "--to", "127.0.0.1:1"]) == 1
    assert "no DICOM files" in capsys.readouterr().err


def test_replay_with_a_config_runs_the_pipeline_locally(tmp_path, blob_model, capsys):
    series = write_series(tmp_path / "series", n_slices=8, spheres=[Sphere(8.0, -6.0, 0.0)])
    config = tmp_path / "edge.toml"
    config.write_text(f"""
[scp]
enabled = false
[model]
path = "{blob_model}"
[outputs]
sr = false
[metrics]
enabled = false
""")
    assert main(["replay", str(tmp_path / "series"), "--config", str(config), "--rate", "200"]) == 0
    out = capsys.readouterr().out
    assert "8 sent" in out and "8 stored" in out and "infer" in out
    (summary,) = read_jsonl(tmp_path / "results" / "series.jsonl")
    assert summary["n_findings"] == 1 and sorted(summary["sop_instance_uids"]) == sorted(series.sop_uids)
