"""Pure tests of the pull's decisions: reference parsing, the catalog, and which files of a repo make a model."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from mgr.registry.catalog import Catalog, UnknownModel, default_catalog
from mgr.registry.config import ConfigError, load_settings
from mgr.registry.refs import HubReference, InvalidReference, ShortReference, parse_reference
from mgr.registry.selection import (
    NoModelFiles,
    TagNotFound,
    gguf_choices,
    select_files,
    select_gguf,
    select_safetensors,
)
from mgr.registry.sources import RemoteFile

ALL = ("hf", "hf-mirror", "modelscope")


def files(*specs: str | tuple[str, int]) -> list[RemoteFile]:
    out = []
    for spec in specs:
        path, size = spec if isinstance(spec, tuple) else (spec, 100)
        out.append(RemoteFile(path, size, "0" * 64, None, f"http://x/{path}"))
    return out


def paths(selection) -> list[str]:
    return [f.path for f in selection.files]


# -- references ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "source", "repo", "tag", "revision", "name"),
    [
        ("hf.co/Qwen/Qwen2.5-0.5B-Instruct-GGUF", "hf", "Qwen/Qwen2.5-0.5B-Instruct-GGUF", None, None,
         "hf.co/Qwen/Qwen2.5-0.5B-Instruct-GGUF:latest"),
        ("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M", "hf", "bartowski/Llama-3.2-1B-Instruct-GGUF", "Q4_K_M",
         None, "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M"),
        ("huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct", "hf", "HuggingFaceTB/SmolLM2-135M-Instruct", None, None,
         "huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct:latest"),
        ("https://huggingface.co/a/b:q8_0", "hf", "a/b", "q8_0", None, "huggingface.co/a/b:q8_0"),
        ("hf-mirror.com/Qwen/Qwen2.5-0.5B-Instruct", "hf-mirror", "Qwen/Qwen2.5-0.5B-Instruct", None, None,
         "hf-mirror.com/Qwen/Qwen2.5-0.5B-Instruct:latest"),
        ("modelscope.cn/LLM-Research/Llama-3.2-1B-Instruct", "modelscope", "LLM-Research/Llama-3.2-1B-Instruct", None,
         None, "modelscope.cn/LLM-Research/Llama-3.2-1B-Instruct:latest"),
        ("ms:Qwen/Qwen2.5-0.5B-Instruct-GGUF:q4_k_m", "modelscope", "Qwen/Qwen2.5-0.5B-Instruct-GGUF", "q4_k_m", None,
         "modelscope.cn/Qwen/Qwen2.5-0.5B-Instruct-GGUF:q4_k_m"),
        ("hf.co/a/b:latest", "hf", "a/b", None, None, "hf.co/a/b:latest"),
        ("hf.co/a/b:Q4_K_M@v1.0", "hf", "a/b", "Q4_K_M", "v1.0", "hf.co/a/b:Q4_K_M"),
        ("hf.co/a/b@0123abc:Q4_K_M", "hf", "a/b", "Q4_K_M", "0123abc", "hf.co/a/b:Q4_K_M"),
        ("hf.co/a/b@refs/pr/12", "hf", "a/b", None, "refs/pr/12", "hf.co/a/b:latest"),
        ("HF.CO/a/b:SmolLM2-135M-Instruct.Q4_1.gguf", "hf", "a/b", "SmolLM2-135M-Instruct.Q4_1.gguf", None,
         "hf.co/a/b:SmolLM2-135M-Instruct.Q4_1.gguf"),
    ],
)
def test_hub_references(text: str, source: str, repo: str, tag: str | None, revision: str | None, name: str) -> None:
    ref = parse_reference(text)
    assert isinstance(ref, HubReference)
    assert (ref.source, ref.repo, ref.tag, ref.revision, ref.name) == (source, repo, tag, revision, name)


@pytest.mark.parametrize(
    ("text", "name", "family", "tag"),
    [("qwen2.5", "qwen2.5:latest", "qwen2.5", "latest"),
     ("qwen2.5:7b-q4_K_M", "qwen2.5:7b-q4_K_M", "qwen2.5", "7b-q4_K_M"),
     ("SmolLM2:135M", "SmolLM2:135M", "smollm2", "135M")],
)
def test_short_references(text: str, name: str, family: str, tag: str) -> None:
    ref = parse_reference(text)
    assert isinstance(ref, ShortReference)
    assert (ref.name, ref.family, ref.tag) == (name, family, tag)


@pytest.mark.parametrize(
    "text",
    [
        "", "   ", "hf.co/a", "hf.co/a/b/c", "hf.co/../b", "hf.co/a/..", "hf.co/a/b..c", "hf.co/a/.hidden",
        "hf.co/a/b:../../etc", "hf.co/a/b:x/y", "hf.co/a/b@../main", "hf.co/a/b@/abs", "hf.co/a/b@main//x",
        "ms:/etc/passwd", "ms:a", "example.com/a/b", "owner/repo", "qwen2.5@main", "qwen 2.5", "a\\b",
        "hf.co/a/b:", "../x", "hf.co//b", "ms:a/b:c:d", "x" * 400,
    ],
)
def test_bad_references_are_refused_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(InvalidReference) as info:
        parse_reference(text)
    assert "accepted forms" in str(info.value)
    assert info.value.status == 400


def test_owner_repo_without_host_suggests_hf() -> None:
    with pytest.raises(InvalidReference, match=r"did you mean hf\.co/owner/repo"):
        parse_reference("owner/repo")


# -- catalog ------------------------------------------------------------------------------------------------------
def test_catalog_has_popular_models_with_every_repo() -> None:
    catalog = default_catalog()
    assert len(catalog.entries) >= 15
    for name in ("qwen2.5:0.5b", "qwen2.5:1.5b", "qwen2.5:3b", "qwen2.5:7b", "qwen3:8b", "llama3.2:1b", "llama3.2:3b",
                 "llama3.1:8b", "smollm2:135m", "smollm2:360m", "smollm2:1.7b", "gemma2:2b", "gemma3:4b",
                 "phi3.5:3.8b", "phi4-mini:3.8b", "mistral:7b", "deepseek-r1:1.5b"):
        entry = catalog.entries[name]
        for fmt in ("gguf", "safetensors"):
            assert set(entry.repos[fmt]) == {"hf", "modelscope"}, (name, fmt)
            for repo in entry.repos[fmt].values():
                parse_reference(f"hf.co/{repo}")  # every repo id is well formed
        assert entry.repos["gguf"]["hf"].lower().endswith("gguf")
    assert catalog.entries["qwen2.5:0.5b"].repos["safetensors"]["hf"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert catalog.entries["llama3.2:1b"].repos["safetensors"]["modelscope"] == "LLM-Research/Llama-3.2-1B-Instruct"


def resolve(text: str, prefer: str = "gguf", sources: tuple[str, ...] = ALL):
    ref = parse_reference(text)
    assert isinstance(ref, ShortReference)
    return default_catalog().resolve(ref, prefer=prefer, sources=sources)  # type: ignore[arg-type]


def test_short_name_prefers_the_format_asked() -> None:
    gguf = resolve("qwen2.5:0.5b", "gguf")
    assert [(c.source, c.repo, c.format, c.tag) for c in gguf] == [
        ("hf", "Qwen/Qwen2.5-0.5B-Instruct-GGUF", "gguf", None),
        ("hf-mirror", "Qwen/Qwen2.5-0.5B-Instruct-GGUF", "gguf", None),
        ("modelscope", "Qwen/Qwen2.5-0.5B-Instruct-GGUF", "gguf", None),
    ]
    st = resolve("qwen2.5:0.5b", "safetensors")
    assert {c.format for c in st} == {"safetensors"} and st[0].repo == "Qwen/Qwen2.5-0.5B-Instruct"


def test_short_name_variants() -> None:
    first = resolve("qwen2.5:7b-q4_K_M", "safetensors")[0]
    assert (first.format, first.tag) == ("gguf", "q4_K_M")
    first = resolve("qwen2.5:7b-instruct-q8_0", "safetensors")[0]
    assert (first.format, first.tag) == ("gguf", "q8_0")
    assert resolve("qwen2.5:7b-safetensors", "gguf")[0].format == "safetensors"
    assert resolve("qwen2.5:7b-gguf", "safetensors")[0].format == "gguf"
    assert resolve("qwen2.5", "gguf")[0].repo == "Qwen/Qwen2.5-7B-Instruct-GGUF"  # latest = 7b
    quant_of_latest = resolve("qwen2.5:q8_0")[0]
    assert (quant_of_latest.repo, quant_of_latest.tag) == ("Qwen/Qwen2.5-7B-Instruct-GGUF", "q8_0")
    assert resolve("SmolLM2:135M")[0].repo == "bartowski/SmolLM2-135M-Instruct-GGUF"
    only_ms = resolve("llama3.2:1b", "safetensors", ("modelscope", "hf"))
    assert [(c.source, c.repo) for c in only_ms] == [("modelscope", "LLM-Research/Llama-3.2-1B-Instruct"),
                                                    ("hf", "unsloth/Llama-3.2-1B-Instruct")]


def test_unknown_short_names() -> None:
    with pytest.raises(UnknownModel, match=r"qwen2\.5:0\.5b, qwen2\.5:1\.5b"):
        resolve("qwen2.5:70b")
    with pytest.raises(UnknownModel, match="did you mean qwen3"):
        resolve("qwen4:8b")
    with pytest.raises(UnknownModel, match=r"hf.co/\{owner\}/\{repo\}"):
        resolve("zzzz")


def test_catalog_from_toml_is_checked() -> None:
    catalog = Catalog.from_toml(
        '[latest]\n"t" = "1m"\n[models."t:1m"]\ngguf = { hf = "a/b-GGUF", modelscope = "c/d-GGUF" }\n')
    ref = parse_reference("t")
    assert isinstance(ref, ShortReference)
    repos = [c.repo for c in catalog.resolve(ref, prefer="safetensors", sources=ALL)]
    assert repos == ["a/b-GGUF", "a/b-GGUF", "c/d-GGUF"]
    with pytest.raises(ValueError):
        Catalog.from_toml('[latest]\n"t" = "2m"\n')


def test_source_config_from_settings(tmp_path: Path) -> None:
    settings = load_settings(env={"HF_ENDPOINT": "http://h", "MGR_HF_ENDPOINT": "http://m/", "MGR_CONFIG": "/none",
                                  "MGR_SOURCES": "modelscope,hf", "HF_TOKEN": "t"})
    config = settings.hubs
    assert config.endpoint("hf") == "http://m" and config.order == ("modelscope", "hf")
    assert config.endpoint("hf-mirror") == "https://hf-mirror.com"
    assert config.endpoint("modelscope") == "https://modelscope.cn"
    assert config.download_headers("hf")["Authorization"] == "Bearer t"
    assert "Authorization" not in config.download_headers("hf-mirror")  # the HF token never goes to the mirror
    with pytest.raises(ConfigError, match="hf, hf-mirror, modelscope"):
        load_settings(env={"MGR_SOURCES": "hf,civitai", "MGR_CONFIG": "/none"})

    # Every hub setting of README's table, from the config file, from the environment over it, and as overrides.
    path = tmp_path / "config.toml"
    path.write_text(textwrap.dedent("""
        sources = ["hf-mirror", "modelscope"]
        hf_endpoint = "https://hf.example/"
        hf_mirror_endpoint = "https://mirror.example"
        modelscope_endpoint = "https://ms.example"
        hf_token = "file-hf"
        hf_mirror_token = "file-mirror"
        modelscope_token = "file-ms"
    """))
    from_file = load_settings(env={"MGR_CONFIG": str(path)}).hubs
    assert from_file.order == ("hf-mirror", "modelscope")
    assert [from_file.endpoint(s) for s in ALL] == ["https://hf.example", "https://mirror.example", "https://ms.example"]
    assert [from_file.token(s) for s in ALL] == ["file-hf", "file-mirror", "file-ms"]
    env = {"MGR_CONFIG": str(path), "MGR_SOURCES": "hf", "MGR_HF_MIRROR_ENDPOINT": "http://m2",
           "MGR_MODELSCOPE_ENDPOINT": "http://ms2", "MGR_HF_TOKEN": "env-hf", "HF_TOKEN": "ignored",
           "MGR_HF_MIRROR_TOKEN": "env-mirror", "MODELSCOPE_API_TOKEN": "env-ms"}
    from_env = load_settings(env=env).hubs
    assert from_env.order == ("hf",)
    assert [from_env.endpoint(s) for s in ALL] == ["https://hf.example", "http://m2", "http://ms2"]
    assert [from_env.token(s) for s in ALL] == ["env-hf", "env-mirror", "env-ms"]
    assert load_settings(env={"MGR_CONFIG": "/none", "MGR_MODELSCOPE_TOKEN": "a", "MODELSCOPE_API_TOKEN": "b"}
                         ).hubs.token("modelscope") == "a"
    overridden = load_settings({"hf_endpoint": "http://flag", "sources": "modelscope"}, env=env).hubs
    assert overridden.endpoint("hf") == "http://flag" and overridden.order == ("modelscope",)
    with pytest.raises(ConfigError, match="MGR_HF_MIRROR_ENDPOINT: expected a URL"):
        load_settings(env={"MGR_CONFIG": "/none", "MGR_HF_MIRROR_ENDPOINT": "mirror.example"})
    defaults = load_settings(env={"MGR_CONFIG": "/none"}).hubs
    assert defaults.order == ALL and defaults.tokens == {}
    assert [defaults.endpoint(s) for s in ALL] == ["https://huggingface.co", "https://hf-mirror.com",
                                                   "https://modelscope.cn"]


# -- GGUF quantization choice ------------------------------------------------------------------------------------
QUANTS = files("model-Q4_K.gguf", "model-Q4_K_M.gguf", "model-Q8_0.gguf", "model-Q4_0.gguf", "mmproj-model-Q4_K_M.gguf",
               "README.md", "model-f16.gguf")


def test_default_is_q4_k_m_and_q4_k_is_not_q4_k_m() -> None:
    # the repo's vision projector comes along with whichever quantization is picked
    assert paths(select_gguf(QUANTS, None)) == ["model-Q4_K_M.gguf", "mmproj-model-Q4_K_M.gguf"]
    assert paths(select_gguf(QUANTS, "Q4_K")) == ["model-Q4_K.gguf", "mmproj-model-Q4_K_M.gguf"]
    assert paths(select_gguf(QUANTS, "q4_k_m")) == ["model-Q4_K_M.gguf", "mmproj-model-Q4_K_M.gguf"]
    assert paths(select_gguf(QUANTS, "latest")) == ["model-Q4_K_M.gguf", "mmproj-model-Q4_K_M.gguf"]
    assert select_gguf(QUANTS, "q8_0").quant == "Q8_0"


def test_default_falls_back_in_order_then_to_smallest() -> None:
    assert paths(select_gguf(files("m-Q8_0.gguf", "m-Q5_K_M.gguf", "m-Q4_0.gguf"), None)) == ["m-Q4_0.gguf"]
    assert paths(select_gguf(files("m-Q8_0.gguf", "m-Q5_K_M.gguf"), None)) == ["m-Q5_K_M.gguf"]
    assert paths(select_gguf(files("m-Q8_0.gguf", "m-Q4_K_S.gguf", "m-Q4_0.gguf"), None)) == ["m-Q4_K_S.gguf"]
    others = files(("m-Q2_K.gguf", 50), ("m-Q6_K.gguf", 80), ("m-f16.gguf", 300))
    assert paths(select_gguf(others, None)) == ["m-Q2_K.gguf"]
    # Lower-case names (Qwen's repos) and dotted names (QuantFactory's) are read the same way.
    assert paths(select_gguf(files("qwen2.5-0.5b-instruct-q8_0.gguf", "qwen2.5-0.5b-instruct-q4_k_m.gguf"), None)) == [
        "qwen2.5-0.5b-instruct-q4_k_m.gguf"]
    assert paths(select_gguf(files("SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct.Q8_0.gguf"), "q4_1")) == [
        "SmolLM2-135M-Instruct.Q4_1.gguf"]


def test_a_full_file_name_is_a_tag() -> None:
    assert paths(select_gguf(QUANTS, "model-Q8_0.gguf")) == ["model-Q8_0.gguf", "mmproj-model-Q4_K_M.gguf"]
    assert paths(select_gguf(QUANTS, "MODEL-Q8_0")) == ["model-Q8_0.gguf", "mmproj-model-Q4_K_M.gguf"]


def test_split_files_come_together_and_the_projector_is_not_a_quantization() -> None:
    repo = files("m-Q4_K_M-00002-of-00003.gguf", "m-Q4_K_M-00001-of-00003.gguf", "m-Q4_K_M-00003-of-00003.gguf",
                 "m-Q8_0.gguf", ("mmproj-m-f16.gguf", 20), ("mmproj-m-bf16.gguf", 20), ("mmproj-m-q8_0.gguf", 10),
                 "sub/big-Q5_K_M-00001-of-00002.gguf", "sub/big-Q5_K_M-00002-of-00002.gguf")
    q4_k_m = [f"m-Q4_K_M-0000{i}-of-00003.gguf" for i in (1, 2, 3)] + ["mmproj-m-f16.gguf"]
    assert paths(select_gguf(repo, None)) == q4_k_m
    assert paths(select_gguf(repo, "m-Q4_K_M-00002-of-00003.gguf")) == q4_k_m
    assert paths(select_gguf(repo, "q5_k_m")) == [
        f"sub/big-Q5_K_M-0000{i}-of-00002.gguf" for i in (1, 2)] + ["mmproj-m-f16.gguf"]
    assert all("mmproj" not in c.name for c in gguf_choices(repo))
    with pytest.raises(TagNotFound):
        select_gguf(files("mmproj-m-f16.gguf"), None)
    with pytest.raises(NoModelFiles, match="2 of the 3 parts"):
        select_gguf(files("m-Q4_K_M-00001-of-00003.gguf", "m-Q4_K_M-00002-of-00003.gguf"), None)


def test_missing_tag_lists_the_tags_that_exist() -> None:
    with pytest.raises(TagNotFound) as info:
        select_gguf(QUANTS, "Q3_K_S", repo="hf.co/a/b")
    message = str(info.value)
    assert "Q3_K_S" in message and "hf.co/a/b" in message
    for quant in ("Q4_K", "Q4_K_M", "Q8_0", "Q4_0", "f16"):
        assert quant in message
    assert "mmproj" not in message
    with pytest.raises(TagNotFound, match="several files"):
        select_gguf(files("a/m-Q4_K_M.gguf", "b/m-Q4_K_M.gguf"), "Q4_K_M")
    with pytest.raises(TagNotFound):
        select_gguf(QUANTS, "K_M")  # only a whole '-' or '.' separated part matches


# -- safetensors choice ------------------------------------------------------------------------------------------
def test_safetensors_files() -> None:
    repo = files("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                 "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja", "model.safetensors",
                 "pytorch_model.bin", "model.pt", "onnx/model.onnx", "original/consolidated.00.pth",
                 "original/params.json", "sub/model.safetensors", "README.md", ".gitattributes", "flax_model.msgpack",
                 "model.gguf", "processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")
    chosen = paths(select_safetensors(repo))
    assert chosen == sorted(["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                             "tokenizer.model", "special_tokens_map.json", "vocab.json", "merges.txt",
                             "chat_template.jinja", "model.safetensors", "processor_config.json",
                             "preprocessor_config.json", "video_preprocessor_config.json"])


def test_sharded_safetensors_take_the_index_and_its_shards_only() -> None:
    repo = files("config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
                 "model-00002-of-00002.safetensors", "consolidated.safetensors", "params.json")
    assert paths(select_safetensors(repo)) == ["config.json", "model-00001-of-00002.safetensors",
                                               "model-00002-of-00002.safetensors", "model.safetensors.index.json"]


def test_repos_without_usable_weights() -> None:
    with pytest.raises(NoModelFiles, match="bin"):
        select_safetensors(files("config.json", "pytorch_model.bin"))
    with pytest.raises(NoModelFiles, match=r"config\.json"):
        select_safetensors(files("model.safetensors"))


def test_select_files_picks_the_format() -> None:
    both = files("config.json", "model.safetensors", "model-Q4_K_M.gguf")
    assert select_files(both, None, prefer="gguf").format == "gguf"
    assert select_files(both, None, prefer="safetensors").format == "safetensors"
    assert select_files(both, "Q4_K_M", prefer="safetensors").format == "gguf"
    assert select_files(files("config.json", "model.safetensors"), None, prefer="gguf").format == "safetensors"
    with pytest.raises(TagNotFound, match="no GGUF files"):
        select_files(files("config.json", "model.safetensors"), "Q4_K_M")
