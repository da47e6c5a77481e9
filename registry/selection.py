"""Choose which files of a repo make the model.

GGUF repos hold one model in many quantizations; the tag picks one (case-insensitive). The quantization is the
last `-` or `.` separated part of the file name before `.gguf` (and before `-00001-of-00003` for split files),
so `Q4_K` never matches `Q4_K_M`. A full file name is a tag too. Split files come as a group. A vision
model's projector (`mmproj*.gguf`) comes along with whichever quantization is picked: the F16 one where there
are several, else the smallest. Without a tag: Q4_K_M, else the first of Q4_K_S, Q4_0, Q5_K_M, Q8_0, else
the smallest.

Safetensors repos: the weights (`*.safetensors`, only the shards an index names when there is one), config,
generation config, tokenizer files and chat template, from the repo's top folder. Never `.bin`, `.pt`, `.onnx`,
`original/` or other formats: the engines load safetensors and these would only cost disk.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from .capabilities import is_projector
from .catalog import Format
from .errors import PullError
from .sources import RemoteFile

DEFAULT_QUANTS = ("Q4_K_M", "Q4_K_S", "Q4_0", "Q5_K_M", "Q8_0")
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})$", re.IGNORECASE)
_SAFETENSORS_EXTRAS = re.compile(
    r"^(config\.json|generation_config\.json|tokenizer(_config)?\.json|tokenizer\.model|special_tokens_map\.json"
    r"|added_tokens\.json|vocab\.(json|txt)|merges\.txt|chat_template\.(jinja|json)"
    r"|(pre|video_pre)?processor_config\.json)$"
)
_INDEX = re.compile(r"^(.+)\.safetensors\.index\.json$")


class TagNotFound(PullError, LookupError):
    status = 404


class NoModelFiles(PullError, ValueError):
    status = 422


@dataclasses.dataclass(frozen=True)
class GgufChoice:
    """One quantization: a single file, or the parts of a split file."""

    quant: str  # as in the file name: "Q4_K_M", "q4_k_m", "f16"
    files: tuple[RemoteFile, ...]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def name(self) -> str:
        return self.files[0].path


@dataclasses.dataclass(frozen=True)
class Selection:
    format: Format
    files: tuple[RemoteFile, ...]
    quant: str | None  # GGUF: the quantization picked


def _basename(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _stem(path: str) -> tuple[str, str | None]:
    """`dir/model-Q4_K_M-00001-of-00002.gguf` -> (`model-Q4_K_M`, `dir/model-Q4_K_M-*-of-00002`)."""
    name = _basename(path)
    stem = name[: -len(".gguf")]
    split = _SPLIT.search(stem)
    if split is None:
        return stem, None
    base = stem[: split.start()]
    return base, f"{path[: len(path) - len(name)]}{base}-*-of-{split.group(2)}"


def _quant_of(stem: str) -> str:
    return re.split(r"[-.]", stem)[-1]


def gguf_choices(files: Sequence[RemoteFile]) -> list[GgufChoice]:
    """Every quantization a repo offers, split parts grouped, mmproj files left out; sorted by path."""
    singles: list[GgufChoice] = []
    groups: dict[str, list[RemoteFile]] = {}
    for f in files:
        if not f.path.lower().endswith(".gguf") or is_projector(f.path):
            continue
        stem, group = _stem(f.path)
        if group is None:
            singles.append(GgufChoice(_quant_of(stem), (f,)))
        else:
            groups.setdefault(group, []).append(f)
    for parts in groups.values():
        parts.sort(key=lambda f: f.path)
        singles.append(GgufChoice(_quant_of(_stem(parts[0].path)[0]), tuple(parts)))
    return sorted(singles, key=lambda c: c.name)


def _matches(choice: GgufChoice, tag: str) -> bool:
    tag = tag.lower()
    names = {p for f in choice.files for p in (f.path.lower(), _basename(f.path).lower())}
    if tag in names or f"{tag}.gguf" in names:
        return True  # a full file name (any part of a split file names the whole group)
    stem = _stem(choice.files[0].path)[0].lower()
    return stem == tag or (stem.endswith(tag) and stem[-len(tag) - 1] in "-.")


def select_gguf(files: Sequence[RemoteFile], tag: str | None, *, repo: str = "the repo") -> Selection:
    choices = gguf_choices(files)
    if not choices:
        raise TagNotFound(f"{repo} has no GGUF files" + (f" for tag {tag!r}" if tag else ""))
    if tag and tag.lower() != "latest":
        found = [c for c in choices if _matches(c, tag)]
        if len(found) > 1:
            # Several files end in the same quantization (e.g. in two folders): the file name settles it.
            raise TagNotFound(
                f"tag {tag!r} matches several files in {repo}: {', '.join(c.name for c in found)}; "
                "use the full file name as the tag"
            )
        if not found:
            tags = sorted({c.quant for c in choices}, key=str.lower)
            raise TagNotFound(f"tag {tag!r} not found in {repo}; it has {', '.join(tags)}")
        choice = found[0]
    else:
        by_quant: dict[str, list[GgufChoice]] = {}
        for c in choices:
            by_quant.setdefault(c.quant.upper(), []).append(c)
        preferred = next((by_quant[q] for q in DEFAULT_QUANTS if q in by_quant), None)
        # Where one quantization sits in two places, the smaller (single) one wins; then the smallest overall.
        choice = min(preferred or choices, key=lambda c: (c.size, c.name))
    expected = _SPLIT.search(_basename(choice.files[0].path)[: -len(".gguf")])
    if expected and len(choice.files) != int(expected.group(2)):
        raise NoModelFiles(f"{repo} lists {len(choice.files)} of the {int(expected.group(2))} parts of {choice.name}")
    projector = select_projector(files)
    return Selection("gguf", choice.files + ((projector,) if projector else ()), choice.quant)


def select_projector(files: Sequence[RemoteFile]) -> RemoteFile | None:
    projectors = [f for f in files if is_projector(f.path)]
    if not projectors:
        return None
    f16 = [f for f in projectors if re.search(r"(?<!b)f16", _basename(f.path).lower())]
    return min(f16 or projectors, key=lambda f: (f.size, f.path))


def select_safetensors(files: Sequence[RemoteFile], *, repo: str = "the repo") -> Selection:
    top = [f for f in files if "/" not in f.path]
    weights = [f for f in top if f.path.endswith(".safetensors")]
    indexes = [f for f in top if _INDEX.match(f.path)]
    if indexes:
        # The index names the shards (model-00001-of-00004.safetensors); other safetensors in the folder, such as
        # Mistral's consolidated.safetensors, are the same weights in another layout.
        index = min(indexes, key=lambda f: f.path)
        prefix = _INDEX.match(index.path).group(1)  # type: ignore[union-attr]
        shard = re.compile(rf"^{re.escape(prefix)}-\d+-of-\d+\.safetensors$")
        weights = [f for f in weights if shard.match(f.path)] + [index]
    elif len(weights) > 1:
        weights = [f for f in weights if not f.path.startswith("consolidated")] or weights
    if not any(f.path.endswith(".safetensors") for f in weights):
        extensions = {f.path.rsplit(".", 1)[-1] for f in files if "." in f.path}
        others = sorted(extensions - {"json", "md", "txt", "gitattributes"})
        raise NoModelFiles(
            f"{repo} has no safetensors or GGUF weights (it holds {', '.join(others) or 'no weight files'}); "
            "mgr loads only those: pick a repo that has them"
        )
    extras = [f for f in top if _SAFETENSORS_EXTRAS.match(f.path)]
    if not any(f.path == "config.json" for f in extras):
        raise NoModelFiles(f"{repo} has safetensors but no config.json, which vLLM needs to load them")
    return Selection("safetensors", tuple(sorted(weights + extras, key=lambda f: f.path)), None)


def select_files(files: Sequence[RemoteFile], tag: str | None, *, prefer: Format = "gguf",
                 format: Format | None = None, repo: str = "the repo") -> Selection:
    """The files of one model. A repo with both formats gives `format`, else `prefer`; a tag means GGUF."""
    has_gguf = any(f.path.lower().endswith(".gguf") for f in files)
    has_st = any(f.path.endswith(".safetensors") for f in files)
    if format is None:
        if tag and tag.lower() != "latest":
            format = "gguf"
        elif has_gguf and has_st:
            format = prefer
        else:
            format = "gguf" if has_gguf else "safetensors"
    if format == "gguf":
        if not has_gguf and tag:
            raise TagNotFound(f"{repo} has no GGUF files, so tag {tag!r} picks nothing; pull it without a tag")
        return select_gguf(files, tag, repo=repo)
    return select_safetensors(files, repo=repo)
