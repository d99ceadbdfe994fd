"""scripts/check_dockerfile.py: its parser on small inputs, and a full replay of the real Dockerfile."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import check_dockerfile as check

ROOT = Path(__file__).resolve().parent.parent


def test_parse_joins_continuations_and_drops_comments():
    steps = check.parse("# comment\nFROM python:3.11-slim\n\nENV A=1 \\\n    B=2\nRUN echo hi\n")
    assert [(s.name, s.args) for s in steps] == [("FROM", "python:3.11-slim"), ("ENV", "A=1 B=2"), ("RUN", "echo hi")]


def test_env_values_see_the_env_before_their_line_and_literal_paths_are_mapped(tmp_path):
    build = check.Build(root=tmp_path / "root", context=tmp_path, env={"PATH": "/bin"}, workdir=tmp_path)
    check.do_env(build, "HOME=/home/user")
    check.do_env(build, 'PATH=$HOME/venv/bin:$PATH CACHE=${HOME}/.cache NAME="two words" HOME=/elsewhere')
    home = str(tmp_path / "root" / "home" / "user")
    assert build.env["PATH"] == f"{home}/venv/bin:/bin" and build.env["CACHE"] == f"{home}/.cache"
    assert build.env["NAME"] == "two words" and build.env["HOME"] == str(tmp_path / "root" / "elsewhere")


def test_copy_and_workdir_follow_docker(tmp_path):
    context = tmp_path / "context"
    (context / "pkg").mkdir(parents=True)
    (context / "requirements.txt").write_text("x\n")
    (context / "pkg" / "a.py").write_text("a\n")
    build = check.Build(root=tmp_path / "root", context=context, env={"HOME": str(tmp_path / "h")}, workdir=tmp_path)
    check.do_workdir(build, "$HOME/app")
    check.do_copy(build, "--chown=user requirements.txt .")
    check.do_copy(build, "--chown=user . .")
    assert (tmp_path / "h" / "app" / "requirements.txt").read_text() == "x\n"
    assert (tmp_path / "h" / "app" / "pkg" / "a.py").read_text() == "a\n"


def test_unknown_instructions_and_other_pythons_are_refused(tmp_path):
    build = check.Build(root=tmp_path, context=tmp_path, env={}, workdir=tmp_path)
    with pytest.raises(SystemExit, match="unsupported instruction HEALTHCHECK"):
        check.run_step(build, check.Instruction("HEALTHCHECK", "CMD true"))
    with pytest.raises(SystemExit, match="this check runs Python"):
        check.do_from(build, "python:2.7-slim")


def test_the_image_installs_the_cpu_build_of_torch_at_the_pinned_version_first():
    """PyPI's default torch for Linux pulls about 3 GB of CUDA libraries into a cpu-basic Space."""
    runs = [step.args for step in check.parse((ROOT / "Dockerfile").read_text()) if step.name == "RUN"]
    torch_step = next(i for i, args in enumerate(runs) if "download.pytorch.org/whl/cpu" in args)
    requirements_step = next(i for i, args in enumerate(runs) if "-r requirements.txt" in args)
    assert torch_step < requirements_step and "grep '^torch==' requirements.txt" in runs[torch_step]
    pins = [line for line in (ROOT / "requirements.txt").read_text().splitlines() if line.startswith("torch==")]
    assert len(pins) == 1


@pytest.mark.skipif(os.environ.get("LCKV_LONG_RUN") != "1",
                    reason="about 3 minutes (a fresh venv, the base model, the app): run with LCKV_LONG_RUN=1")
def test_the_dockerfile_builds_and_the_app_answers_offline_on_its_port():
    """Minutes: a fresh venv with requirements.txt, the base model fetched, the app started offline."""
    result = subprocess.run(
        [sys.executable, "-m", "scripts.check_dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=1200
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "the app answers on its port; one turn: Done:" in result.stdout
