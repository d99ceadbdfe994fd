"""Start the real Gradio app for tests: in this process (tiny model) or as `python app.py` (any model).

Also where the headless Chromium used against it is found, and its flags. scripts/check_dockerfile.py
and scripts/screenshot.py start the app with these helpers too.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")  # Debian's package
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def local_client(url: str):
    """A gradio_client Client of the app at `url` (plain HTTP on this machine). Certificates are not
    checked (no TLS is spoken): with checking on, every request builds an SSL context from the CA
    bundle, ~40 ms of CPU each, the largest share of a client's work."""
    from gradio_client import Client

    return Client(url, verbose=False, ssl_verify=False)


def fill_transcript(session, turns: int, start: int = 0) -> None:
    """Test hook: `turns` exchanges ("turn N", then the reply "ok") written straight into a ChatSession's
    transcript: the messages and the tokens each adds, as a turn would encode them, without running
    the model. The session re-encodes its cache from the transcript at its next turn (the pinned
    start and the latest window), as it does after a settings change. For tests of what a long
    conversation costs the page; what the model does with one is tested in test_chat.py."""
    chat_format = session.format
    end = [chat_format.tokenizer.eos_token_id]  # how the template closes a message (<|im_end|>)
    with session._exclusive():
        for turn in range(start, start + turns):
            text = f"turn {turn}"
            delta = chat_format.new_turn_text(session._conversation(), text, session._segment_texts)
            session._append_message({"role": "user", "content": text}, chat_format.encode(delta), delta)
            reply = chat_format.encode("ok") + end
            session._append_message({"role": "assistant", "content": "ok"}, reply, chat_format.decode(reply))
        session._stale = True


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Served(NamedTuple):
    app: object  # app.ChatApp
    url: str
    demo: object  # the gradio.Blocks


@contextmanager
def serve_in_process(**config) -> Iterator[Served]:
    """app.py built with AppConfig(**config), served on a free local port; its conversation store is
    in a temporary folder unless `data_dir` is given."""
    import app as app_module  # the repository root is on the path (tests/conftest.py, or `python -m`)

    with tempfile.TemporaryDirectory(prefix="lckv-data-") as scratch:
        chat_app, demo = app_module.create_app(app_module.AppConfig(**{"data_dir": scratch, **config}))
        port = free_port()
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        try:
            yield Served(chat_app, f"http://127.0.0.1:{port}/", demo)
        finally:
            demo.close()
            if chat_app.store is not None:
                chat_app.store.close()


def start_subprocess(env: dict[str, str], log: Path, timeout_s: float = 180) -> tuple[subprocess.Popen, str]:
    """`python app.py` started with `env` added to ours, once it answers: (process, URL). Its output goes to `log`."""
    port = free_port()
    full_env = {**os.environ, **env, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port)}
    with open(log, "ab") as out:
        process = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=full_env, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_up(url, process, timeout_s, log)
    except BaseException:
        stop_process(process)
        raise
    return process, url


@contextmanager
def serve_subprocess(env: dict[str, str], log: Path, timeout_s: float = 180) -> Iterator[str]:
    """URL of `python app.py` started with `env` added to ours; its output goes to `log`. Its
    conversation store is in a temporary folder unless `env` names LCKV_DATA_DIR."""
    with tempfile.TemporaryDirectory(prefix="lckv-data-") as scratch:
        process, url = start_subprocess({"LCKV_DATA_DIR": scratch, **env}, log, timeout_s)
        try:
            yield url
        finally:
            stop_process(process)


def wait_until_up(url: str, process: subprocess.Popen, timeout_s: float, log: Path) -> None:
    """Poll `url` until it answers 200; fail with the server's log if it exits or takes too long."""
    deadline = time.monotonic() + timeout_s
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # a local URL never goes through a proxy
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with direct.open(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the app did not answer on {url} within {timeout_s} s:\n{log.read_text()[-3000:]}")


def stop_process(process: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM, then SIGKILL if it is still there after `grace_s`."""
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
