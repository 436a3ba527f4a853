"""``dae-cf``: one command for every step of the method, each verb a call into the step's own module.

    dae-cf VERB [options]          dae-cf VERB --help: the step's own options
    dae-cf --help                  the verbs, one line each

Each verb runs the same function as its older forms, which stay as aliases with identical flags:
``dae-cf pipeline ...`` is ``python -m harness.pipeline ...``, ``dae-cf heads ...`` is ``python jobs/fit_heads.py
...``, and so on (the table below names each target). A user's mistake ends with one ``error:`` line and exit
status 2 (``harness.cli.run_main``); ``--debug`` anywhere keeps the traceback.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from harness import __version__
from harness.cli import EXIT_USER_ERROR, run_main

PROG = "dae-cf"
TAGLINE = "Counterfactual explanations with a Diffusion Autoencoder: every step of the method, one command."


@dataclass(frozen=True)
class Verb:
    """One verb: its line in ``dae-cf --help`` and the ``main(argv)`` it runs (``module:function``, imported only
    when the verb runs, so ``dae-cf --help`` loads neither Ray nor MLflow nor any step's module)."""

    summary: str
    target: str | None  # None: no step of its own; ``summary`` says where the work happens
    adapt: Callable[[list[str]], list[str]] | None = None  # argv as the target's own command line wants it


def _serve_argv(argv: list[str]) -> list[str]:
    # harness.ops.serving has one subcommand, `build`; `dae-cf serve --model ...` means it (naming it is allowed too).
    return argv if argv[:1] == ["build"] else ["build", *argv]


REGISTRY_COMMANDS = ("promote", "tag", "show")


def _promote_argv(argv: list[str]) -> list[str]:
    # `dae-cf promote --name N --version V` is the registry's `promote`; `dae-cf promote tag|show ...` reaches its
    # other subcommands. The registry's --tracking-uri may stand first, as in `python -m harness.ops.registry`.
    head = 2 if argv[:1] == ["--tracking-uri"] else 1 if argv[:1] and argv[0].startswith("--tracking-uri=") else 0
    if argv[head:head + 1] and argv[head] in REGISTRY_COMMANDS:
        return argv
    return [*argv[:head], "promote", *argv[head:]]


VERBS: dict[str, Verb] = {
    "prepare": Verb("shards from a data source (MedMNIST, VerSe, SPIDER, BraTS, MIMIC-CXR, folders + label table)",
                    "harness.data.prepare.__main__:main"),
    "train": Verb("train the DAE in one process (several: accelerate launch harness/train_dae.py, same flags)",
                  "harness.train_dae:main"),
    "encode": Verb("encode shards into a latents table (z_sem, optional x_T)", "harness.encode:main"),
    "heads": Verb("fit and evaluate linear heads on any latents table (heads.json, tables, figures)",
                  "harness.ops.fit_heads_job:main"),
    "sweep": Verb("Ray Tune sweep of linear heads: selection on val, test once, MLflow child runs",
                  "harness.ops.sweep_job:main"),
    "baseline": Verb("DenseNet121 from scratch on the same shards, tuned with Ray Tune",
                     "harness.ops.baseline_job:main"),
    "compare": Verb("per task, DAE + linear head vs the baseline: metrics, labels used, compute",
                    "harness.ops.compare_job:main"),
    "findings": Verb("one job file for every finding: head sweep, floors, DenseNet121 baseline, comparison",
                     "harness.ops.findings_job:main"),
    "serve": Verb("build the served explainer (MLflow pyfunc) of one task; serve it: mlflow models serve -m OUT",
                  "harness.ops.serving:main", _serve_argv),
    "promote": Verb("make a registered DAE version champion unless a benchmark metric is worse (also: promote "
                    "tag|show)", "harness.ops.registry:main", _promote_argv),
    "report": Verb("not a step of its own: `pipeline` writes the report, at <eval.out_dir>/report/index.html",
                   None),
    "pipeline": Verb("the whole method on one job file: train -> encode -> heads -> counterfactuals -> report",
                     "harness.pipeline:main"),
}


def overview() -> str:
    """The text of ``dae-cf --help``."""
    width = max(map(len, VERBS))
    lines = [f"usage: {PROG} VERB [options]   ({PROG} VERB --help: that step's options)", "",
             TAGLINE, "", "verbs:"]
    lines += [f"  {name:<{width}}  {verb.summary}" for name, verb in VERBS.items()]
    lines += ["", "options:", "  -h, --help  this list", "  --version   the harness's version",
              "  --debug     keep the traceback of a user's mistake (any verb)"]
    return "\n".join(lines)


def _load(target: str) -> Callable[[list[str]], Any]:
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


@contextmanager
def _program_name(name: str):
    # argparse names the program after sys.argv[0]; the steps' usage lines should read `dae-cf heads ...`, the
    # command the user typed, not `dae-cf ...` or the module's file name.
    saved = sys.argv[0] if sys.argv else None
    if sys.argv:
        sys.argv[0] = name
    else:
        sys.argv.append(name)
    try:
        yield
    finally:
        if saved is None:
            sys.argv.pop(0)
        else:
            sys.argv[0] = saved


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USER_ERROR


def dispatch(argv: list[str]) -> Any:
    """Run ``argv[0]``'s step with the rest of ``argv``; returns what the step's ``main`` returns."""
    if not argv:
        return _error(f"no verb given: {PROG} VERB [options], VERB one of {', '.join(VERBS)} ({PROG} --help)")
    name, rest = argv[0], argv[1:]
    if name in ("-h", "--help"):
        print(overview())
        return 0
    if name == "--version":
        print(f"{PROG} {__version__}")
        return 0
    verb = VERBS.get(name)
    if verb is None:
        close = difflib.get_close_matches(name, VERBS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return _error(f"unknown verb {name!r}{hint} (one of {', '.join(VERBS)})")
    if verb.target is None:
        if rest[:1] in (["-h"], ["--help"]):
            print(f"usage: {PROG} {name}\n\n{verb.summary}; heads, sweep and compare write reports of their own")
            return 0
        return _error(f"{PROG} {name}: {verb.summary}")
    step_argv = verb.adapt(rest) if verb.adapt else rest
    # When the verb is also the step's own subcommand (`dae-cf promote` runs the registry's `promote`), argparse
    # adds that name after the program's: name the program `dae-cf` so that usage reads `dae-cf promote`, once.
    inserted_as_subcommand = step_argv.count(name) > rest.count(name)
    with _program_name(PROG if inserted_as_subcommand else f"{PROG} {name}"):
        return _load(verb.target)(step_argv)


def main(argv: list[str] | None = None) -> int:
    """The ``dae-cf`` console script; returns the exit status (0 done, 2 a user's mistake)."""
    return run_main(dispatch, argv)


if __name__ == "__main__":
    sys.exit(main())
