"""Unit tests of the CLI's pure parts: formatting, `show`'s layout, option parsing, create's local checks, and the
"daemon not running" path. The end-to-end behaviour against a real daemon is tested elsewhere."""

from __future__ import annotations

import hashlib
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mgr.cli.chat import parse_option
from mgr.cli.create import CreateError, model_files, sha256_file
from mgr.cli.format import (
    PS_HEADERS,
    go_duration,
    human_size,
    list_row,
    parse_time,
    ps_name,
    ps_processor,
    ps_row,
    ps_until,
    relative_time,
    stats,
    table,
)
from mgr.cli.main import keep_alive_seconds, main
from mgr.cli.show import format_files, format_show, human_count

NOW = datetime(2025, 1, 15, 12, 0, 0, tzinfo=UTC)


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (999, "999 B"),
        (1000, "1 KB"),
        (98_000_000, "98 MB"),
        (98_765_432, "98 MB"),
        (1_234_567_890, "1.2 GB"),
        (2_000_000_000, "2 GB"),
        (15_600_000_000, "15 GB"),
        (3_500_000_000_000, "3.5 TB"),
    ],
)
def test_human_size_uses_decimal_units_like_ollama(size: int, text: str) -> None:
    assert human_size(size) == text


@pytest.mark.parametrize(
    ("delta", "past", "future"),
    [
        (timedelta(seconds=0.5), "Less than a second ago", "Less than a second from now"),
        (timedelta(seconds=1), "1 second ago", "1 second from now"),
        (timedelta(seconds=42), "42 seconds ago", "42 seconds from now"),
        (timedelta(seconds=75), "About a minute ago", "About a minute from now"),
        (timedelta(minutes=2, seconds=5), "2 minutes ago", "2 minutes from now"),
        (timedelta(minutes=61), "About an hour ago", "About an hour from now"),
        (timedelta(hours=5), "5 hours ago", "5 hours from now"),
        (timedelta(days=3), "3 days ago", "3 days from now"),
        (timedelta(days=21), "3 weeks ago", "3 weeks from now"),
        (timedelta(days=90), "3 months ago", "3 months from now"),
        (timedelta(days=800), "2 years ago", "2 years from now"),
    ],
)
def test_relative_time_in_both_directions(delta: timedelta, past: str, future: str) -> None:
    assert relative_time(NOW - delta, NOW) == past
    assert relative_time(NOW + delta, NOW) == future


def test_parse_time_accepts_go_nanoseconds_and_offsets() -> None:
    assert parse_time("2025-01-15T12:00:00.123456789Z") == NOW.replace(microsecond=123456)
    assert parse_time("2025-01-15T14:00:00+02:00") == NOW
    assert parse_time(None) is None
    assert parse_time("not a time") is None


def ps_entry(**fields: object) -> dict[str, object]:
    entry: dict[str, object] = {
        "name": "smollm2:latest",
        "model": "smollm2:latest",
        "size": 98_000_000,
        "size_vram": 0,
        "digest": "0123456789abcdef" * 4,
        "expires_at": iso(NOW + timedelta(minutes=4, seconds=30)),
        "loaded_at": iso(NOW - timedelta(minutes=2)),
        "backend": "llama.cpp",
        "state": "ready",
        "gpus": [],
        "num_parallel": 4,
        "context_length": 4096,
        "active": 1,
        "queued": 2,
    }
    entry.update(fields)
    return entry


def test_ps_processor_column() -> None:
    assert ps_processor(ps_entry(gpus=[])) == "CPU"
    assert ps_processor(ps_entry(gpus=[0])) == "GPU 0"
    assert ps_processor(ps_entry(gpus=[0, 1])) == "GPU 0,1"


def test_ps_until_column() -> None:
    assert ps_until(ps_entry(), NOW) == "4 minutes from now"
    assert ps_until(ps_entry(expires_at=None), NOW) == "Forever"
    assert ps_until(ps_entry(expires_at="2318-01-01T00:00:00Z"), NOW) == "Forever"  # keep_alive -1, as Ollama shows it
    assert ps_until(ps_entry(state="unloading"), NOW) == "Stopping..."


def test_ps_name_shows_a_state_other_than_ready() -> None:
    assert ps_name(ps_entry()) == "smollm2:latest"
    assert ps_name(ps_entry(state="loading")) == "smollm2:latest (loading)"


def test_ps_row_has_every_column() -> None:
    row = ps_row(ps_entry(backend="vllm", gpus=[1]), NOW)
    assert row == [
        "smollm2:latest", "0123456789ab", "98 MB", "GPU 1", "4096", "vllm", "1/4+2", "4 minutes from now",
    ]  # fmt: skip


def test_ps_fits_100_columns_with_a_context_column() -> None:
    lines = table(PS_HEADERS, [ps_row(ps_entry(gpus=[], queued=0), NOW)]).splitlines()
    assert "CONTEXT" in lines[0].split() and "4096" in lines[1].split()
    assert max(len(line) for line in lines) <= 100


def test_table_pads_columns_three_spaces_apart() -> None:
    tag = {"name": "a:latest", "digest": "f" * 64, "size": 1_200_000_000, "modified_at": iso(NOW - timedelta(days=3))}
    text = table(("NAME", "ID", "SIZE", "MODIFIED"), [list_row(tag, NOW)])
    assert text.splitlines() == [
        "NAME       ID             SIZE     MODIFIED",
        "a:latest   ffffffffffff   1.2 GB   3 days ago",
    ]


def test_parse_option_reads_json_values_and_keeps_other_text() -> None:
    assert parse_option("temperature=0.2") == ("temperature", 0.2)
    assert parse_option("seed=42") == ("seed", 42)
    assert parse_option('stop=["\\n"]') == ("stop", ["\n"])
    assert parse_option("penalize_newline=true") == ("penalize_newline", True)
    assert parse_option("mode=fast") == ("mode", "fast")
    assert parse_option("url=a=b") == ("url", "a=b")
    with pytest.raises(ValueError):
        parse_option("temperature")
    with pytest.raises(ValueError):
        parse_option("=1")


def test_keep_alive_becomes_seconds() -> None:
    assert keep_alive_seconds("5m") == 300
    assert keep_alive_seconds("-1") == -1
    assert keep_alive_seconds("0") == 0
    assert keep_alive_seconds(None) is None


def test_verbose_stats_match_ollama_layout() -> None:
    assert go_duration(1_234_567_891) == "1.234567891s"
    assert go_duration(12_500_000) == "12.5ms"
    assert go_duration(123_000_000_000) == "2m3s"
    lines = stats({"total_duration": 2_000_000_000, "eval_count": 100, "eval_duration": 4_000_000_000}).splitlines()
    assert lines == [
        "total duration:       2s",
        "eval count:           100 token(s)",
        "eval duration:        4s",
        "eval rate:            25.00 tokens/s",
    ]


# -- show -----------------------------------------------------------------------------------------------------

SHOW_ANSWER = {
    "template": "{{ .Prompt }}",
    "capabilities": ["completion", "tools"],
    "modified_at": "2025-01-15T12:00:00Z",
    "details": {
        "format": "gguf", "family": "llama", "families": ["llama"], "parameter_size": "135M",
        "quantization_level": "Q4_K_M",
    },
    "model_info": {
        "general.architecture": "llama", "general.parameter_count": 134_515_008, "llama.context_length": 8192,
        "llama.block_count": 30, "llama.embedding_length": 576,
    },
    "files": [
        {"path": "SmolLM2-135M-Instruct-Q4_K_M.gguf", "digest": "sha256:" + "ab" * 32, "size": 105_000_000},
        {"path": "tokenizer.json", "digest": "sha256:" + "cd" * 32, "size": 512},
    ],
    "source": {
        "hub": "hf", "endpoint": "https://huggingface.co", "repo": "bartowski/SmolLM2-135M-Instruct-GGUF",
        "revision": "main", "commit": "0123456789abcdef0123456789abcdef01234567",
    },
}  # fmt: skip


def test_show_lays_out_sections_like_ollama() -> None:
    assert format_show(SHOW_ANSWER).splitlines() == [
        "  Model",
        "    architecture        llama",
        "    parameters          135M",
        "    quantization        Q4_K_M",
        "    context length      8192",
        "    embedding length    576",
        "    format              gguf",
        "",
        "  Capabilities",
        "    completion",
        "    tools",
        "",
        "  Source",
        "    hub                 hf",
        "    repo                bartowski/SmolLM2-135M-Instruct-GGUF",
        "    revision            main",
        "    commit              0123456789abcdef0123456789abcdef01234567",
        "",
        "  Files",
        "    SmolLM2-135M-Instruct-Q4_K_M.gguf   105 MB   abababababab",
        "    tokenizer.json                      512 B    cdcdcdcdcdcd",
    ]


def test_show_files_alone() -> None:
    assert format_files(SHOW_ANSWER).splitlines() == [
        "SmolLM2-135M-Instruct-Q4_K_M.gguf   105 MB   abababababab",
        "tokenizer.json                      512 B    cdcdcdcdcdcd",
    ]


def test_show_leaves_out_what_is_missing() -> None:
    # A created model: no hub, no quantization, no parameter_size (the count from model_info stands in).
    answer = {
        "details": {"format": "safetensors"},
        "model_info": {"general.architecture": "qwen2", "general.parameter_count": 8_030_261_248},
        "source": {"type": "upload"},
    }
    assert format_show(answer).splitlines() == [
        "  Model",
        "    architecture        qwen2",
        "    parameters          8.0B",
        "    format              safetensors",
        "",
        "  Source",
        "    type                upload",
    ]
    assert format_show({}) == ""
    assert [human_count(n) for n in (512, 135_000, 494_032_768, 1_711_376_384)] == ["512", "135K", "494M", "1.7B"]


# -- create: the checks made before talking to the daemon ---------------------------------------------------


def test_create_refuses_a_file_without_the_gguf_magic(tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(CreateError, match="is not a GGUF file"):
        model_files(fake)


def test_create_accepts_a_gguf_file(tmp_path: Path) -> None:
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 16)
    assert model_files(gguf) == {"tiny.gguf": gguf}
    # 1 MiB reads must give the same digest as hashing the whole file at once
    assert sha256_file(gguf) == hashlib.sha256(gguf.read_bytes()).hexdigest()


def test_create_refuses_a_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CreateError, match="does not exist"):
        model_files(tmp_path / "nowhere")


def test_create_refuses_a_folder_without_safetensors_or_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x00")
    with pytest.raises(CreateError, match=r"no \*\.safetensors"):
        model_files(tmp_path)
    (tmp_path / "config.json").unlink()
    (tmp_path / "model.safetensors").write_bytes(b"\x00")
    with pytest.raises(CreateError, match=r"no config\.json"):
        model_files(tmp_path)


def test_create_selects_only_the_files_a_runner_needs(tmp_path: Path) -> None:
    wanted = [
        "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
        "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
        # a vision model's processors: vLLM failed to load a Qwen2-VL without them
        "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
    ]  # fmt: skip
    for name in [*wanted, "pytorch_model.bin", "README.md", ".gitattributes"]:
        (tmp_path / name).write_text("x")
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "consolidated.safetensors").write_text("x")
    (tmp_path / "original" / "config.json").write_text("x")
    files = model_files(tmp_path)
    assert sorted(files) == sorted(wanted)
    assert all(files[name] == tmp_path / name for name in wanted)


# -- the command itself --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_list_without_a_daemon_says_how_to_start_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    port = free_port()
    monkeypatch.setenv("MGR_HOST", f"127.0.0.1:{port}")
    monkeypatch.setenv("MGR_CONFIG", str(tmp_path / "absent.toml"))  # no user config file can interfere
    assert main(["list"]) == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == (
        f"Error: could not connect to mgr at http://127.0.0.1:{port}. "
        "Start it with `mgr serve --detach` (or `sudo systemctl start mgr` for the service)."
    )
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_create_checks_the_file_before_contacting_the_daemon(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("MGR_HOST", f"127.0.0.1:{free_port()}")  # nothing listens: only local checks can run
    monkeypatch.setenv("MGR_CONFIG", str(tmp_path / "absent.toml"))
    fake = tmp_path / "fake.gguf"
    fake.write_text("hello")
    assert main(["create", "x", "--from", str(fake)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"Error: {fake} is not a GGUF file (it does not start with the GGUF magic bytes)"
    )


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("serve", "create", "pull", "show", "list", "cp", "rm", "run", "ps", "stop"):
        assert f"    {command}" in out


# -- the terminal: wrap, reading a message, settings errors ---------------------------------------------------


def test_word_wrap_breaks_between_words_only() -> None:
    import io

    from mgr.cli.terminal import WordWrapper

    out = io.StringIO()
    wrapper = WordWrapper(out, 12)
    for piece in ["The qu", "ick brown fox jum", "ps over the lazy dog.\nA ", "supercalifragilistic word"]:
        wrapper.write(piece)
    wrapper.finish()
    lines = out.getvalue().split("\n")
    assert lines == ["The quick", "brown fox", "jumps over", "the lazy", "dog.", "A", "supercalifragilistic", "word"]
    unwrapped = io.StringIO()
    plain = WordWrapper(unwrapped, 0)
    plain.write("no wrap at all here")
    plain.finish()
    assert unwrapped.getvalue() == "no wrap at all here" and plain.column == len("no wrap at all here")


def test_read_message_keeps_a_paste_and_a_block_together() -> None:
    from mgr.cli.terminal import PASTE_END, PASTE_START, read_message

    def reader(lines: list[str]):  # type: ignore[no-untyped-def]
        feed = iter(lines)
        return lambda prompt: next(feed, None)

    # readline's bracketed paste: one line with newlines in it
    assert read_message(read=reader(["first\nsecond"])) == ("first\nsecond", True)
    # without readline: the paste's markers around lines
    assert read_message(read=reader([PASTE_START + "a", "b", "c" + PASTE_END])) == ("a\nb\nc", True)
    assert read_message(read=reader(['"""x', "y", 'z"""'])) == ("x\ny\nz", True)
    assert read_message(read=reader(["/bye"])) == ("/bye", False)
    assert read_message(read=reader([])) is None


def test_set_parameter_refuses_unknown_names_and_types_values() -> None:
    from mgr.cli.chat import parameter, parse_think

    assert parameter("temperature", ["0.2"]) == 0.2 and parameter("num_ctx", ["4096"]) == 4096
    assert parameter("stop", ['"<|end|>"', "END"]) == ["<|end|>", "END"]
    with pytest.raises(ValueError, match="unknown parameter 'nonsense'"):
        parameter("nonsense", ["1"])
    with pytest.raises(ValueError, match="invalid int"):
        parameter("num_ctx", ["big"])
    assert parse_think("true") is True and parse_think("false") is False and parse_think("HIGH") == "high"
    with pytest.raises(ValueError):
        parse_think("very")


def test_a_bad_setting_is_named_by_its_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("MGR_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.setenv("MGR_KEEP_ALIVE", "soon")
    assert main(["list"]) == 1
    assert capsys.readouterr().err.strip() == (
        "Error: MGR_KEEP_ALIVE: expected a duration such as 5m, 1h or 300, got 'soon'")
    monkeypatch.delenv("MGR_KEEP_ALIVE")
    monkeypatch.delenv("MGR_HOST", raising=False)
    monkeypatch.setenv("OLLAMA_HOST", "127.0.0.1:notaport")
    assert main(["list"]) == 1
    assert capsys.readouterr().err.startswith("Error: OLLAMA_HOST (used since MGR_HOST is not set)")


def test_run_flags_parse_anywhere() -> None:
    from mgr.cli.main import build_parser, parse

    args = parse(build_parser(), ["run", "--verbose", "m", "hello", "--think", "there", "--keepalive", "1m",
                                  "--nowordwrap", "--format", "json"])
    assert args.name == "m" and args.prompt == ["hello", "there"] and args.verbose and args.think is True
    assert args.keep_alive == "1m" and args.nowordwrap and args.format == "json" and args.command == "run"
    level = parse(build_parser(), ["run", "m", "--think=high", "--hidethinking"])
    assert level.think == "high" and level.hidethinking and level.prompt == []
