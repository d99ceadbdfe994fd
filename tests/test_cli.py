from app_support.tiny import tiny_model
from lckv_stream.cli import footer, main
from lckv_stream.chat import CacheSettings, ChatSession, TurnEnd
from lckv_stream.sampling import SamplingSettings


def test_unknown_model_path_is_a_clear_error(capsys):
    assert main(["chat", "--model", "/no/such/model"]) == 2
    assert "not found" in capsys.readouterr().err


def test_out_of_range_setting_is_a_clear_error(capsys):
    assert main(["chat", "--window", "0"]) == 2
    assert "window" in capsys.readouterr().err


def test_footer_reports_what_the_engine_measured(tokenizer):
    chat = ChatSession(tiny_model(vocab_size=len(tokenizer)), tokenizer, cache_settings=CacheSettings(4, 32),
                       sampling=SamplingSettings(temperature=0, max_new_tokens=5))
    end = [e for e in chat.send("hello") if isinstance(e, TurnEnd)][0]
    stats = chat.stats()
    line = footer(end.metrics, stats)
    assert f"held {stats.cache.tokens_held}/{stats.conversation_tokens} tokens" in line
    assert f"cache {stats.cache.allocated_mb:.2f} MB" in line and "eager" in line


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
