"""Replay the Dockerfile without Docker, then check that the app it builds answers offline on its port.

    python -m scripts.check_dockerfile [--dockerfile Dockerfile] [--keep]    (from the repository root)

The build context is a copy of the repository's tracked files in a temp dir; container paths (literal
absolute paths in ENV/WORKDIR/COPY) live under <tmp>/root. FROM picks this machine's Python (same
major.minor as the image tag); RUN runs with `sh -c` in the WORKDIR with only the Dockerfile's ENV
(plus this machine's pip/TLS settings and LCKV_CPU_FAST); USER is noted; `useradd` is skipped (it
would change this machine). Then CMD starts with the final ENV, all outbound HTTP sent to a dead local
proxy, and one chat turn goes through its API.

Local differences, printed when used: PIP_NO_CACHE_DIR is dropped and PIP_CACHE_DIR points at this
machine's pip cache (speed, same packages); the app listens on 127.0.0.1 and a free port instead of
0.0.0.0:<EXPOSE> (nothing listens beyond loopback here).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.served_app import free_port, stop_process, wait_until_up

ROOT = Path(__file__).resolve().parent.parent

# Creating users and installing system packages need root and change the machine (this one has g++).
SKIPPED_PROGRAMS = ("useradd", "apt-get")
# LCKV_CPU_FAST too: the test suite turns the CPU fast path off (it compiles for minutes on two
# cores; tests/test_cpu_fast.py tests it), and a replay run from the suite keeps that choice.
PASSED_THROUGH = re.compile(r"^(PIP_.*|SSL_CERT_.*|REQUESTS_CA_BUNDLE|CURL_CA_BUNDLE|LANG|LCKV_CPU_FAST)$")
DEAD_PROXY = "http://127.0.0.1:9"  # the discard port: nothing answers, so any outbound HTTP fails
START_TIMEOUT_S = 240


@dataclass
class Instruction:
    name: str
    args: str


@dataclass
class Build:
    """The replay's state: where the container's / lives, the ENV so far, the WORKDIR, notes."""

    root: Path
    context: Path
    env: dict[str, str]
    workdir: Path
    notes: list[str] = field(default_factory=list)
    exposed: int | None = None
    cmd: list[str] | None = None
    base_python: str = ""

    def container_path(self, path: str) -> Path:
        return self.root / path.lstrip("/")


def parse(text: str) -> list[Instruction]:
    """Instructions in order; continuation lines joined, comments and blank lines dropped."""
    logical, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1].rstrip() + " "
            continue
        logical.append(current + stripped)
        current = ""
    instructions = []
    for line in logical:
        name, _, args = line.partition(" ")
        instructions.append(Instruction(name.upper(), args.strip()))
    return instructions


def expand(value: str, env: dict[str, str]) -> str:
    """Docker's $VAR / ${VAR} substitution (unset variables become empty)."""
    return re.sub(r"\$(?:\{(\w+)\}|(\w+))", lambda m: env.get(m.group(1) or m.group(2), ""), value)


def env_pairs(args: str) -> list[tuple[str, str]]:
    """`ENV k=v k2="v 2"` or the legacy `ENV k v`."""
    words = shlex.split(args, posix=True)
    if words and "=" not in words[0]:
        return [(words[0], " ".join(words[1:]))]
    return [tuple(word.split("=", 1)) for word in words]


def resolve(build: Build, raw: str) -> str:
    """A literal absolute path is a container path (mapped under root); anything else is expanded."""
    if raw.startswith("/"):
        return str(build.container_path(expand(raw, build.env)))
    return expand(raw, build.env)


def run_step(build: Build, step: Instruction) -> None:
    handler = HANDLERS.get(step.name)
    if handler is None:
        raise SystemExit(f"unsupported instruction {step.name}: teach scripts/check_dockerfile.py about it")
    handler(build, step.args)


def do_from(build: Build, args: str) -> None:
    match = re.match(r"python:(\d+\.\d+)", args)
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if not match or match.group(1) != here:
        raise SystemExit(f"FROM {args}: this check runs Python {here}; use a python:{here} image or run it there")
    build.notes.append(f"FROM {args}: using {build.base_python}")


def do_env(build: Build, args: str) -> None:
    values = {key: resolve(build, value) for key, value in env_pairs(args)}  # all see the ENV before this line
    build.env.update(values)


def do_workdir(build: Build, args: str) -> None:
    build.workdir = Path(resolve(build, args))
    build.workdir.mkdir(parents=True, exist_ok=True)


def do_copy(build: Build, args: str) -> None:
    words = [word for word in shlex.split(args) if not word.startswith("--")]  # --chown: ownership only
    *sources, destination = words
    target = Path(resolve(build, destination)) if destination.startswith("/") else build.workdir / destination
    into_dir = destination.endswith("/") or destination in (".", "./") or len(sources) > 1
    for source in sources:
        origin = build.context / source
        if origin.is_dir():
            shutil.copytree(origin, target, dirs_exist_ok=True)
        elif into_dir:
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, target / origin.name)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, target)


def do_run(build: Build, args: str) -> None:
    command = json.loads(args) if args.startswith("[") else ["sh", "-c", args]
    program = command[2].split()[0] if command[0] == "sh" else command[0]
    if program in SKIPPED_PROGRAMS:
        build.notes.append(f"RUN {args}: skipped ({program} would change this machine)")
        return
    print(f"--> RUN {args}", flush=True)
    started = time.monotonic()
    subprocess.run(command, cwd=build.workdir, env=local_env(build), check=True)
    print(f"    ({time.monotonic() - started:.0f} s)", flush=True)


def do_user(build: Build, args: str) -> None:
    build.notes.append(f"USER {args}: this replay runs as {os.environ.get('USER', 'the current user')}")


def do_expose(build: Build, args: str) -> None:
    build.exposed = int(args.split("/")[0])


def do_cmd(build: Build, args: str) -> None:
    build.cmd = json.loads(args)


HANDLERS = {
    "FROM": do_from, "ENV": do_env, "WORKDIR": do_workdir, "COPY": do_copy, "RUN": do_run,
    "USER": do_user, "EXPOSE": do_expose, "CMD": do_cmd,
}


def copy_context(destination: Path) -> None:
    """The tracked files of the working tree: what a Space's git repository holds."""
    names = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True
    ).stdout.decode().split("\0")
    for name in filter(None, names):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def base_env() -> dict[str, str]:
    """A fresh environment: this Python first on PATH, plus this machine's pip and TLS settings."""
    python_bin = Path(getattr(sys, "_base_executable", sys.executable)).parent
    env = {key: value for key, value in os.environ.items() if PASSED_THROUGH.match(key)}
    env["PATH"] = f"{python_bin}:/usr/local/bin:/usr/bin:/bin"
    return env


def local_env(build: Build) -> dict[str, str]:
    """The ENV so far, less PIP_NO_CACHE_DIR and with this machine's pip cache: same packages, faster."""
    env = {key: value for key, value in build.env.items() if key != "PIP_NO_CACHE_DIR"}
    env["PIP_CACHE_DIR"] = os.environ.get("PIP_CACHE_DIR") or str(Path.home() / ".cache" / "pip")
    return env


def check_app(build: Build, log: Path) -> None:
    """Start CMD offline and wait until it answers, then send one message through its API."""
    if build.cmd is None or build.exposed is None:
        raise SystemExit("the Dockerfile needs CMD and EXPOSE")
    if build.env.get("GRADIO_SERVER_PORT") != str(build.exposed):
        raise SystemExit(f"GRADIO_SERVER_PORT={build.env.get('GRADIO_SERVER_PORT')} but EXPOSE {build.exposed}")
    port = free_port()
    env = dict(local_env(build), GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port),
               HTTP_PROXY=DEAD_PROXY, HTTPS_PROXY=DEAD_PROXY, ALL_PROXY=DEAD_PROXY, NO_PROXY="127.0.0.1,localhost")
    env.update({key.lower(): value for key, value in env.items() if key.endswith("_PROXY")})
    build.notes.append(f"CMD listens on 127.0.0.1:{port} (container: 0.0.0.0:{build.exposed}); outbound HTTP blocked")
    url = f"http://127.0.0.1:{port}/"
    print(f"--> CMD {build.cmd} on {url}", flush=True)
    with open(log, "wb") as out:
        app = subprocess.Popen(build.cmd, cwd=build.workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_up(url, app, START_TIMEOUT_S, log)
        status = one_turn(url)
        if not status.startswith("Done:"):
            raise SystemExit(f"the app answered, but the chat turn did not finish: {status}")
        print(f"    the app answers on its port; one turn: {status}", flush=True)
    except (RuntimeError, TimeoutError) as error:  # it exited, or never answered: the message has its log
        raise SystemExit(str(error)) from None
    finally:
        stop_process(app)


def one_turn(url: str) -> str:
    from gradio_client import Client

    client = Client(url, verbose=False)
    client.predict("Hello!", "", 4, 256, None, api_name="/send")  # message, system prompt, sink, window, seed
    return client.submit(4, 0.7, 0.9, api_name="/respond").result(timeout=120)[1]  # (chat, status, ...)


def replay(dockerfile: Path, workspace: Path) -> Build:
    context = workspace / "context"
    context.mkdir()
    copy_context(context)
    build = Build(root=workspace / "root", context=context, env=base_env(), workdir=workspace / "root",
                  base_python=str(Path(getattr(sys, "_base_executable", sys.executable))))
    build.workdir.mkdir()
    for step in parse(dockerfile.read_text()):
        run_step(build, step)
    if "PIP_NO_CACHE_DIR" in build.env:
        build.notes.append("PIP_NO_CACHE_DIR dropped, so pip may reuse this machine's cache")
    check_app(build, workspace / "app.log")
    return build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dockerfile", type=Path, default=ROOT / "Dockerfile")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (printed) for inspection")
    args = parser.parse_args(argv)
    workspace = Path(tempfile.mkdtemp(prefix="check-dockerfile-"))
    started = time.monotonic()
    try:
        build = replay(args.dockerfile, workspace)
    finally:
        if args.keep:
            print(f"kept {workspace}")
        else:
            shutil.rmtree(workspace, ignore_errors=True)
    for note in build.notes:
        print(f"note: {note}")
    print(f"Dockerfile OK ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
