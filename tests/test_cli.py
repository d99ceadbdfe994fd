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
