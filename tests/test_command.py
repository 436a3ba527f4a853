"""``dae-cf``: every verb listed and reaching its step's own command line; mistakes are one line and exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness.command import VERBS, _promote_argv, _serve_argv, main

# The verbs the README and the issue name, in order: a verb dropped or renamed must fail here.
EXPECTED_VERBS = ["prepare", "train", "encode", "heads", "sweep", "baseline", "compare", "findings", "serve", "promote",
                  "report", "pipeline"]

# verb -> (the start of its usage line, options only that step's parser has)
STEP_HELP = {
    "prepare": ("usage: dae-cf prepare [-h]", ["medmnist", "mimic-cxr"]),  # the verb typed, not the module
    "train": ("usage: dae-cf train", ["--resume", "--overwrite"]),
    "encode": ("usage: dae-cf encode", ["--shards", "--x-T", "--invert-steps"]),
    "heads": ("usage: dae-cf heads", ["--latents", "--split"]),
    "sweep": ("usage: dae-cf sweep", ["--latents", "--num-cpus", "--tracking-uri"]),
    "baseline": ("usage: dae-cf baseline", ["--shards", "--task", "--num-cpus"]),
    "compare": ("usage: dae-cf compare", ["--heads", "--baseline"]),
    "findings": ("usage: dae-cf findings", ["--config", "--skip-baseline", "--overwrite"]),
    "serve": ("usage: dae-cf serve build", ["--heads", "--task", "--register"]),
    "promote": ("usage: dae-cf promote [-h]", ["--name", "--version"]),  # the verb named once
    "pipeline": ("usage: dae-cf pipeline", ["--config"]),
}


def test_help_lists_every_verb_with_one_line(capsys):
    assert list(VERBS) == EXPECTED_VERBS
    assert main(["--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = [line.split()[0] for line in lines if line.startswith("  ") and line.split()[0] in VERBS]
    assert listed == EXPECTED_VERBS  # each verb exactly once, in order
    for verb in EXPECTED_VERBS:
        line = next(line for line in lines if line.split()[:1] == [verb])
        assert len(line.split()) > 3, line  # a description, not just the name


@pytest.mark.parametrize("verb", list(STEP_HELP))
def test_each_verb_shows_its_steps_own_help(verb, capsys):
    argv0 = sys.argv[0]
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    usage, options = STEP_HELP[verb]
    assert out.startswith(usage), out[:200]
    for option in options:
        assert option in out, (verb, option)
    assert sys.argv[0] == argv0  # the program name lent to argparse is given back


@pytest.mark.parametrize("argv, usage", [
    (["promote", "tag", "--help"], "usage: dae-cf promote tag [-h]"),
    (["promote", "--name", "promote", "--help"], "usage: dae-cf promote [-h]"),  # a value named like the verb
    (["prepare", "medmnist", "--help"], "usage: dae-cf prepare medmnist [-h]"),
])
def test_subcommand_usage_names_the_command_typed(argv, usage, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert capsys.readouterr().out.startswith(usage)


def test_prepare_run_as_a_module_names_the_module(tmp_path):
    result = subprocess.run([sys.executable, "-m", "harness.data.prepare", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage: python -m harness.data.prepare [-h]")


def test_report_says_where_the_report_comes_from(capsys):
    assert main(["report", "--help"]) == 0
    assert "pipeline" in capsys.readouterr().out
    assert main(["report", "--config", "jobs/phantoms_demo.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: dae-cf report: not a step of its own") and "\n" not in err


def test_a_mistake_is_one_line_and_exit_2_and_writes_nothing(tmp_path, capsys):
    missing, out = tmp_path / "missing.npz", tmp_path / "x"
    assert main(["heads", "--latents", str(missing), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: latents file not found: {missing}"
    assert not out.exists()


@pytest.mark.parametrize("argv, fragment", [
    (["hedas"], "unknown verb 'hedas'; did you mean 'heads'?"),
    ([], "no verb given"),
    (["--debug"], "no verb given"),  # --debug alone is no verb either
])
def test_unknown_or_missing_verbs(argv, fragment, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and fragment in err and "\n" not in err


def test_debug_keeps_the_steps_traceback(tmp_path):
    with pytest.raises(FileNotFoundError, match="latents file not found"):
        main(["heads", "--latents", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "x"), "--debug"])


def test_serve_and_promote_reach_their_modules_subcommands():
    assert _serve_argv(["--model", "m"]) == ["build", "--model", "m"]
    assert _serve_argv(["build", "--model", "m"]) == ["build", "--model", "m"]
    assert _promote_argv(["--name", "n", "--version", "3"]) == ["promote", "--name", "n", "--version", "3"]
    assert _promote_argv(["show", "--name", "n"]) == ["show", "--name", "n"]
    assert _promote_argv(["--tracking-uri", "u", "tag", "--name", "n"]) == ["--tracking-uri", "u", "tag", "--name", "n"]
    assert _promote_argv(["--tracking-uri=u", "--name", "n"]) == ["--tracking-uri=u", "promote", "--name", "n"]
    # a registry subcommand's name as a value is not a subcommand
    assert _promote_argv(["--name", "show", "--version", "1"]) == ["promote", "--name", "show", "--version", "1"]


def test_the_installed_script(tmp_path):
    script = Path(sys.executable).with_name("dae-cf")
    assert script.is_file(), f"{script} is missing: pip install -e . declares it (setup.cfg console_scripts)"
    listed = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and all(f"  {verb} " in listed.stdout for verb in EXPECTED_VERBS), listed.stdout
    mistake = subprocess.run([str(script), "heads", "--latents", "missing.npz", "--out", "x"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert mistake.returncode == 2, mistake.stderr
    assert mistake.stderr.strip() == "error: latents file not found: missing.npz"
    assert not (tmp_path / "x").exists()
