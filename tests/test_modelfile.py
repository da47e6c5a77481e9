"""Ollama's Modelfile: the parser (registry/modelfile.py) on real Modelfile shapes, its errors with line numbers,
the text /api/show prints (parameters, the regenerated Modelfile, which parses back to the same settings), and
the store's derived models (shared blobs, settings over the base's, manifests from before these fields)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fakehub import import_file, tiny_gguf

from mgr.cli.create import ADAPTER_FILES
from mgr.registry.modelfile import (
    ModelfileError,
    check_parameters,
    check_template,
    parse_modelfile,
    quote,
    render_modelfile,
    render_parameters,
)
from mgr.registry.store import Customization, Manifest, Store

FULL = '''# a comment, then instructions in any case
from smollm2:latest
PARAMETER temperature 0.2
parameter num_ctx 4096
PARAMETER stop "<|im_end|>"
PARAMETER stop User:
Parameter seed 42
PARAMETER use_mmap false
PARAMETER mirostat 1
TEMPLATE """{% for message in messages %}<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
SYSTEM You are a terse assistant. Answer in one line.

MESSAGE user Is Paris in France?
MESSAGE assistant "Yes."
LICENSE """MIT License
Copyright (c) "someone"
"""
LICENSE Apache-2.0
ADAPTER ./lora.gguf
'''


def test_a_full_modelfile_parses_as_ollama_reads_it() -> None:
    parsed = parse_modelfile(FULL)
    assert parsed.sources == ["smollm2:latest"]
    assert parsed.parameters == {"temperature": 0.2, "num_ctx": 4096, "stop": ["<|im_end|>", "User:"], "seed": 42,
                                 "use_mmap": False}  # mirostat is deprecated: dropped, as Ollama drops it
    assert parsed.template == ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                               "{{ message['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
                               "<|im_start|>assistant\n{% endif %}")
    assert parsed.system == "You are a terse assistant. Answer in one line."
    assert parsed.messages == [{"role": "user", "content": "Is Paris in France?"},
                               {"role": "assistant", "content": "Yes."}]
    assert parsed.licenses == ['MIT License\nCopyright (c) "someone"\n', "Apache-2.0"]
    assert parsed.adapters == ["./lora.gguf"]


def test_a_byte_order_mark_and_windows_line_ends_are_read() -> None:
    parsed = parse_modelfile("\ufeffFROM ./model.gguf\r\nSYSTEM \"\"\"one\r\ntwo\"\"\"\r\n")
    assert parsed.sources == ["./model.gguf"] and parsed.system == "one\ntwo"


@pytest.mark.parametrize(("text", "line", "words"), [
    ("FROM x\nFROMM y\n", 2, "unknown instruction 'FROMM'"),
    ("FROM x\n\nPARAMETER temperature hot\n", 3, "invalid float value 'hot'"),
    ("FROM x\nPARAMETER num_ctx 4k\n", 2, "invalid int value '4k'"),
    ("FROM x\nPARAMETER use_mmap maybe\n", 2, "invalid bool value 'maybe'"),
    ("FROM x\nPARAMETER colour blue\n", 2, "unknown parameter 'colour'"),
    ("FROM x\nPARAMETER temperature\n", 2, "PARAMETER needs a name and a value"),
    ("FROM x\nMESSAGE robot hi\n", 2, "message role must be one of system, user, assistant"),
    ("FROM x\nSYSTEM\n", 2, "SYSTEM needs a value"),
    ("FROM x\nTEMPLATE \"\"\"{{ x }}\nno end\n", 2, 'quoted with """ that starts here is never closed'),
    ("FROM x\nSYSTEM \"open\n", 2, 'quoted with " that starts here is never closed'),
    ("FROM x\nRENDERER qwen3\n", 2, "RENDERER is not supported"),
    ("FROM x\n= y\n", 2, "'=' is not an instruction"),
])
def test_a_bad_line_is_an_error_that_names_it(text: str, line: int, words: str) -> None:
    with pytest.raises(ModelfileError) as caught:
        parse_modelfile(text)
    assert caught.value.line == line and str(caught.value).startswith(f"line {line}: ")
    assert words in str(caught.value)
    assert caught.value.status == 400


def test_a_modelfile_without_from_is_an_error() -> None:
    with pytest.raises(ModelfileError, match="no FROM line"):
        parse_modelfile("# nothing but\nSYSTEM hello\n")


def test_parameters_print_as_ollama_prints_them() -> None:
    text = render_parameters({"temperature": 0.7, "num_ctx": 4096, "stop": ["<|im_end|>", 'say "hi"'],
                              "top_p": 1.0, "use_mmap": True})
    assert text.splitlines() == [
        "num_ctx                        4096",
        'stop                           "<|im_end|>"',
        'stop                           "say \\"hi\\""',
        "temperature                    0.7",
        "top_p                          1",
        "use_mmap                       true",
    ]


def test_api_parameters_are_typed_and_checked() -> None:
    assert check_parameters({"temperature": 1, "num_predict": 8.0, "stop": "x", "mirostat": 2, "seed": "7"}) == {
        "temperature": 1.0, "num_predict": 8, "stop": ["x"], "seed": 7}
    for bad, words in (({"num_predict": 1.5}, "whole number"), ({"colour": 1}, "unknown parameter"),
                       ({"stop": [1]}, "list of strings"), ({"use_mmap": "yes"}, "true or false"), ([1], "object")):
        with pytest.raises(ModelfileError, match=words):
            check_parameters(bad)


def test_a_template_with_a_jinja_syntax_error_is_refused() -> None:
    check_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ModelfileError, match="template error: .*line 1"):
        check_template("{% for m in messages %}{{ m['content'] }}")


def test_the_regenerated_modelfile_parses_back_to_the_same_settings() -> None:
    parsed = parse_modelfile(FULL)
    text = render_modelfile("smol:latest", "/store/blobs/sha256-abc", ["/store/blobs/sha256-def"],
                            parsed.template or "", parsed.system or "", parsed.parameters, parsed.messages,
                            parsed.licenses)
    assert text.startswith('# Modelfile generated by "mgr show"\n')
    assert "\nFROM /store/blobs/sha256-abc\nADAPTER /store/blobs/sha256-def\nTEMPLATE \"{% for" in text
    again = parse_modelfile(text)
    assert again.sources == ["/store/blobs/sha256-abc"] and again.adapters == ["/store/blobs/sha256-def"]
    assert (again.template, again.system, again.parameters, again.messages, again.licenses) == (
        parsed.template, parsed.system, parsed.parameters, parsed.messages, parsed.licenses)


def test_values_are_quoted_only_where_a_bare_one_would_change() -> None:
    assert quote("plain words") == "plain words"
    assert quote(" padded") == '" padded"'
    assert quote("two\nlines") == '"two\nlines"'
    assert quote('two\n"quoted" lines') == '"""two\n"quoted" lines"""'
    assert quote('"starts with a quote') == '""""starts with a quote"""'
    starts = '"starts with a quote'
    assert parse_modelfile(f"FROM x\nSYSTEM {quote(starts)}\n").system == starts


# the store --------------------------------------------------------------------------------------------------
def _base(tmp_path: Path) -> tuple[Store, Manifest]:
    store = Store(tmp_path / "models")
    gguf = tmp_path / "base.gguf"
    gguf.write_bytes(tiny_gguf("base", seed=1))
    return store, store.create("base", {"base.gguf": import_file(store, gguf)}, {"type": "upload"})


def test_a_derived_model_names_the_same_blobs_and_outlives_its_base(tmp_path: Path) -> None:
    store, base = _base(tmp_path)
    blobs = sorted(store.blobs_dir.iterdir())
    derived = store.derive("derived", "base", Customization(system="Be brief.", parameters={"temperature": 0.1}))
    assert sorted(store.blobs_dir.iterdir()) == blobs  # nothing copied
    assert derived.files == base.files and derived.source["from"] == "base:latest"
    assert derived.digest != base.digest  # its own ID, as in Ollama; a copy shares its base's
    assert store.copy("derived", "again").digest == derived.digest
    store.delete("base")
    assert sorted(store.blobs_dir.iterdir()) == blobs  # the derived model still names them
    assert store.model_path(store.get("derived")).is_file()
    store.delete("derived")
    store.delete("again")
    assert list(store.blobs_dir.iterdir()) == []


def test_a_derived_model_layers_its_settings_over_its_base_as_ollama_does(tmp_path: Path) -> None:
    store, _ = _base(tmp_path)
    store.derive("one", "base", Customization(
        system="first", template="{{ messages[0]['content'] }}", parameters={"temperature": 0.1, "top_k": 5},
        messages=({"role": "user", "content": "hi"},), license=("MIT",)))
    two = store.derive("two", "one", Customization(parameters={"temperature": 0.9}, license=("Apache-2.0",)))
    assert two.system == "first" and two.chat_template == "{{ messages[0]['content'] }}"
    assert dict(two.parameters) == {"temperature": 0.9, "top_k": 5}  # merged, the new value winning
    assert two.messages == ({"role": "user", "content": "hi"},) and two.license == ("MIT", "Apache-2.0")
    three = store.derive("three", "two", Customization(system="second", messages=({"role": "user", "content": "yo"},)))
    assert three.system == "second" and three.messages == ({"role": "user", "content": "yo"},)
    assert store.get("three") == three  # written and read back whole


def test_a_manifest_from_before_these_fields_still_reads(tmp_path: Path) -> None:
    store, base = _base(tmp_path)
    path = next(store.manifests_dir.glob("*.json"))
    old = {k: v for k, v in json.loads(path.read_text()).items()
           if k not in ("system", "chat_template", "parameters", "messages", "license", "adapters")}
    path.write_text(json.dumps(old))
    again = store.get("base")
    assert again.system == "" and dict(again.parameters) == {} and again.adapters == ()
    assert again.digest == base.digest  # the ID of a model without settings did not change


def test_a_model_file_that_is_an_adapter_is_refused(tmp_path: Path) -> None:
    store, base = _base(tmp_path)
    import gguf
    import numpy as np

    adapter = tmp_path / "lora.gguf"
    writer = gguf.GGUFWriter(str(adapter), "llama")
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((2, 16), dtype=np.float32))
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file,
                  writer.close):
        write()
    digest = import_file(store, adapter)
    with pytest.raises(Exception, match="is a LoRA adapter, not a model"):
        store.create("bad", {"lora.gguf": digest}, {})
    with pytest.raises(Exception, match="is not a GGUF LoRA adapter"):
        store.derive("bad", "base", Customization(adapters={"base.gguf": base.files[0].digest}))


def test_a_safetensors_model_takes_a_peft_adapter_folder(tmp_path: Path) -> None:
    from standin.models import write_tiny_safetensors_model

    store = Store(tmp_path / "models")
    folder = write_tiny_safetensors_model(tmp_path / "st")
    store.create("st", {p.name: import_file(store, p) for p in folder.iterdir()}, {"type": "upload"})
    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text('{"r": 8, "peft_type": "LORA"}')
    (peft / "adapter_model.safetensors").write_bytes(b"\x08" + bytes(7) + b"{}      ")
    adapters = {p.name: import_file(store, p) for p in peft.iterdir()}
    derived = store.derive("st-lora", "st", Customization(adapters=adapters))
    path = store.adapter_path(derived)
    assert path is not None and sorted(p.name for p in path.iterdir()) == sorted(adapters)
    assert (path / "adapter_config.json").read_text() == (peft / "adapter_config.json").read_text()
    with pytest.raises(Exception, match="PEFT LoRA adapter folder"):
        store.derive("bad", "st", Customization(adapters={"adapter_config.json": adapters["adapter_config.json"]}))
    store.delete("st")
    store.delete("st-lora")
    assert list(store.blobs_dir.iterdir()) == [] and list(store.links_dir.iterdir()) == []


# the CLI's side: what a Modelfile becomes before anything is sent ---------------------------------------------
def test_the_cli_reads_from_and_adapter_paths_beside_the_modelfile(tmp_path: Path) -> None:
    from mgr.cli.create import CreateError, modelfile_request

    (tmp_path / "m.gguf").write_bytes(tiny_gguf("m"))
    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text("{}")
    (peft / "adapter_model.safetensors").write_bytes(b"x")
    request, files, adapters = modelfile_request(parse_modelfile(
        "FROM m.gguf\nADAPTER ./peft\nSYSTEM hi\nPARAMETER stop a\nPARAMETER stop b\nLICENSE MIT\n"), tmp_path)
    assert files == {"m.gguf": tmp_path / "m.gguf"} and sorted(adapters) == sorted(ADAPTER_FILES)
    assert request == {"system": "hi", "parameters": {"stop": ["a", "b"]}, "license": ["MIT"]}
    request, files, adapters = modelfile_request(parse_modelfile("FROM hf.co/owner/repo:Q4_K_M\n"), tmp_path)
    assert request == {"from": "hf.co/owner/repo:Q4_K_M"} and files == {} and adapters == {}
    for text, words in (("FROM ./gone.gguf\n", "gone.gguf does not exist"),
                        ("FROM smollm2\nADAPTER ./m.gguf\nADAPTER ./peft\n", "one ADAPTER"),
                        ("FROM smollm2\nADAPTER ./nothing\n", "ADAPTER .*nothing does not exist"),
                        ("FROM smollm2\nADAPTER .\n", "a folder without adapter_config.json")):
        with pytest.raises(CreateError, match=words):
            modelfile_request(parse_modelfile(text), tmp_path)


def test_mgr_create_without_a_modelfile_or_a_source_says_what_to_give(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from mgr.cli.main import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MGR_HOST", "127.0.0.1:9")  # nothing listens: only local checks can run
    monkeypatch.setenv("MGR_CONFIG", str(tmp_path / "absent.toml"))
    assert main(["create", "x"]) == 1
    assert "Modelfile does not exist: give a Modelfile with -f, or a model file with --from" in capsys.readouterr().err
    (tmp_path / "Modelfile").write_text("FROM x\nPARAMETER temperature warm\n")
    assert main(["create", "x"]) == 1  # ./Modelfile by default, as Ollama
    assert "Modelfile, line 2: invalid float value 'warm'" in capsys.readouterr().err
    assert main(["create", "x", "-f", "Modelfile", "--from", "m.gguf"]) == 1
    assert "not both" in capsys.readouterr().err
    (tmp_path / "fake.gguf").write_text("GGUF but not really")
    assert main(["create", "x", "-f", "fake.gguf"]) == 1  # -f with a GGUF: the file itself, as before Modelfiles
    assert "could not connect to mgr" in capsys.readouterr().err
