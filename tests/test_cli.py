"""The console script: every subcommand's --help is complete; config files feed the flags."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import cli
from jobs._common import apply_config

ROOT = Path(__file__).parents[1]


def _subparsers():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_every_listed_command_is_shipped_and_documented():
    subs = _subparsers()
    assert set(subs) == set(cli.COMMANDS), "a job module listed in jobs.cli is missing"
    for name, p in subs.items():
        undocumented = [a.dest for a in p._actions if not a.help and a.dest != "help"]
        assert not undocumented, f"{name}: flags without help: {undocumented}"
        assert any(a.dest == "config" for a in p._actions), name


def test_help_runs_for_every_subcommand(capsys):
    # One real console-script process (imports, entry point); every subcommand in-process,
    # since each extra interpreter costs seconds of imports and tests nothing more.
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "infer", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--config" in out.stdout and "usage:" in out.stdout
    for name in cli.COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            cli.main([name, "--help"])
        assert exit_.value.code == 0, name
        printed = capsys.readouterr().out
        assert "--config" in printed and "usage:" in printed, name


def test_config_file_yaml_and_toml_with_flag_override(tmp_path):
    p = argparse.ArgumentParser()
    p.add_argument("--input", required=True)
    p.add_argument("--input-size", type=int, default=320)
    p.add_argument("--model", choices=["u2net", "u2netp"], default="u2net")
    p.add_argument("--mask-png", action="store_true")
    (tmp_path / "c.yaml").write_text("input: s3://b/x\ninput-size: 160\nmodel: u2netp\nmask_png: true\n")
    argv = ["--config", str(tmp_path / "c.yaml"), "--input-size", "96"]
    p.add_argument("--config")
    apply_config(p, argv)
    args = p.parse_args(argv)
    assert (args.input, args.input_size, args.model, args.mask_png) == ("s3://b/x", 96, "u2netp", True)

    (tmp_path / "c.toml").write_text('input = "a"\ninput_size = 128\n')
    apply_config(p, ["--config", str(tmp_path / "c.toml")])
    assert p.parse_args(["--config", str(tmp_path / "c.toml")]).input_size == 128


def test_config_file_errors(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("inptu: x\n")
    with pytest.raises(SystemExit):
        cli.main(["infer", "--config", str(tmp_path / "bad.yaml")])
    assert "unknown option 'inptu'" in capsys.readouterr().err
    assert cli.main(["infer", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
