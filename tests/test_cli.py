import io
import subprocess
import sys
import time

import pytest

from app_support.tiny import tiny_model
from lckv_stream import limits
from lckv_stream.cli import COMMANDS, build_parser, footer, main, parse_line, run_command, stats_text
from lckv_stream.chat import CacheSettings, ChatSession, TurnEnd
from lckv_stream.sampling import SamplingSettings
from served_app import ROOT


@pytest.fixture
def chat(tokenizer):
    return ChatSession(tiny_model(vocab_size=len(tokenizer)), tokenizer, cache_settings=CacheSettings(4, 32),
                       sampling=SamplingSettings(temperature=0, max_new_tokens=5))


def test_unknown_model_path_is_a_clear_error(capsys):
    assert main(["chat", "--model", "/no/such/model"]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--window", "0", "window must be between 16 and 8192, got 0"),
    ("--window", "1", "window must be between 16 and 8192, got 1"),
    ("--sink", "65", "sink must be between 0 and 64, got 65"),
    ("--temperature", "hot", "temperature must be a number between 0 and 2, got 'hot'"),
    ("--seed", "1.5", "seed must be a whole number between 0 and 9223372036854775807, got '1.5'"),
])
def test_out_of_range_settings_are_refused_with_the_pages_limits(capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit:
        main(["chat", flag, value])
    assert exit.value.code == 2 and f"argument {flag}: {message}" in capsys.readouterr().err


def test_a_bad_flag_is_refused_before_torch_is_imported():
    """The arguments are checked first: the CLI refused a bad flag only after ~8 s of imports."""
    probe = ("import sys, runpy\n"
             "sys.argv = ['lckv_stream', 'chat', '--no-such-flag']\n"
             "try:\n    runpy.run_module('lckv_stream', run_name='__main__')\n"
             "except SystemExit as exit:\n    print(exit.code, 'torch' in sys.modules, 'transformers' in sys.modules)\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False", "False"], done.stderr
    assert "unrecognized arguments: --no-such-flag" in done.stderr and time.monotonic() - started < 30


def test_the_cli_and_the_page_share_defaults_and_limits():
    chat_flags = build_parser()._subparsers._group_actions[0].choices["chat"]
    defaults = {action.dest: action.default for action in chat_flags._actions}
    settings = SamplingSettings()
    for name in ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens"):
        assert defaults[name] == getattr(settings, name) == limits.DEFAULTS[name]
    assert (defaults["sink"], defaults["window"]) == (CacheSettings().sink, CacheSettings().window)
    assert defaults["seed"] is None


@pytest.mark.parametrize("line, parsed", [
    ("/undo", ("/undo", "")), ("  /stats  ", ("/stats", "")), ("/exit", ("/quit", "")),
    ("/foo", ("unknown", "/foo")), ("/foo bar", ("unknown", "/foo")),
    ("//foo is a path", (None, "/foo is a path")), ("/ is the root", (None, "/ is the root")),
    ("hello /undo", (None, "hello /undo")), ("", (None, "")),
])
def test_prompt_lines_are_commands_or_messages(line, parsed):
    assert parse_line(line) == parsed


def test_an_unknown_command_is_refused_with_the_list_of_commands(chat):
    out = io.StringIO()
    run_command(chat, *parse_line("/foo"), out=out)
    text = out.getvalue()
    assert text.startswith("[unknown command /foo]\n") and all(name in text for name in COMMANDS)
    assert chat.messages == []  # nothing was sent to the model


def test_stats_are_readable_lines(chat):
    end = [e for e in chat.send("hello") if isinstance(e, TurnEnd)][0]
    stats = chat.stats()
    text = stats_text(stats, end.metrics)
    lines = {line[:15].strip(): line[15:] for line in text.splitlines()}
    assert lines["conversation"] == f"1 turn, {stats.conversation_tokens:,} tokens"
    assert lines["cache holds"].startswith(f"{stats.cache.tokens_held:,} tokens (sink {stats.cache.sink} + window 32")
    assert f"the sink is 4 raised to {stats.cache.sink}" in lines["cache holds"]
    assert lines["KV cache"].startswith(f"{stats.cache.allocated_mb:.2f} MB allocated once ({stats.cache.used_mb:.2f} MB in use)")
    assert lines["seed"] == "random, one per conversation"
    assert lines["last reply"].startswith(f"{end.metrics.new_tokens} tokens ({end.metrics.stop_reason})")
    assert "SessionStats(" not in text and "CacheStats(" not in text


def test_footer_reports_what_the_engine_measured(chat):
    end = [e for e in chat.send("hello") if isinstance(e, TurnEnd)][0]
    stats = chat.stats()
    line = footer(end.metrics, stats)
    assert f"held {stats.cache.tokens_held}/{stats.conversation_tokens} tokens" in line
    assert f"cache {stats.cache.allocated_mb:.2f} MB" in line and "eager" in line


def test_a_terminal_conversation_is_stored_resumed_saved_and_loaded(tokenizer, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "model"
    tiny_model(vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    monkeypatch.setenv("LCKV_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("LCKV_STORE", raising=False)

    def chat(lines: list[str], *flags: str) -> str:
        answers = iter(lines)
        monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
        assert main(["chat", "--model", str(folder), "--temperature", "0", "--max-new-tokens", "3", *flags]) == 0
        return capsys.readouterr().out

    first = chat(["hello there", f"/save {tmp_path / 'chat.json'}", "/quit"])
    conversation_id = first.split("saved as ")[1].split()[0]
    resumed = chat(["/stats", "/quit"], "--resume", conversation_id)
    assert "resumed" in resumed and "(2 messages)" in resumed
    loaded = chat([f"/load {tmp_path / 'chat.json'}", "/quit"])
    assert "[loaded 2 messages]" in loaded
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert "could not load" in chat([f"/load {bad}", "/quit"])
    assert main(["chat", "--model", str(folder), "--resume", "no-such-id"]) == 2
    assert "no conversation" in capsys.readouterr().err
def test_no_deprecation_warning_before_the_first_reply(chat):
    """transformers warned "`past_key_values`/`cache_params` are deprecated" at the first reply (the
    model's output named its cache the old way)."""
    import logging

    from transformers.utils import logging as transformers_logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    library = transformers_logging.get_logger("transformers")
    library.warning_once.cache_clear()  # it warns once per process
    library.addHandler(handler)
    try:
        list(chat.send("hello"))
    finally:
        library.removeHandler(handler)
    assert not [record.getMessage() for record in records if "deprecated" in record.getMessage()]


def test_the_installed_command_and_package_data_point_at_what_exists():
    """pyproject.toml's `lckv-stream` entry point and the default model's package data (the check that
    `pip install .` works in a fresh venv is manual: it downloads the dependencies)."""
    import importlib
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())
    module, function = project["project"]["scripts"]["lckv-stream"].split(":")
    assert getattr(importlib.import_module(module), function) is main
    folder = root / project["tool"]["setuptools"]["package-dir"]["lckv_stream.default_model_files"]
    assert (folder / "config.json").is_file() and list(folder.glob("delta-*.safetensors"))
