"""What the stages of `kimi-trt build` share: the context, the state file, stage keys.

Kept apart from the orchestration (`kimi_trt.build`) and the stage functions
(`kimi_trt.build_stages`) so both, and the TensorRT-LLM compile, import it without
importing each other.

Resumability: every completed stage records, in `<output_dir>/.kimi-build/state.json`,
a key (a hash of exactly the inputs that stage depends on, chained through the stages
before it) and the checksum (`kimi_trt.checksum`) of each file it produced. A rerun skips a stage when its key
is unchanged and every recorded file still has its checksum; a changed config changes
the keys of the stages it affects (limits: compile and package; layout or formats:
convert onwards), and those stages are redone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from kimi_trt.checksum import ALGORITHM, hash_file
from kimi_trt.config import BuildConfig, ModelConfig, load_build_config, load_model_config
from kimi_trt.engine_dir import MANIFEST
from kimi_trt.errors import CheckpointError, ConfigError
from kimi_trt.json_files import read_json_or
from kimi_trt.mapping import Mapping
from kimi_trt.output_dirs import prepare_output_dir

STAGES = ("plan", "convert", "compile", "package")
STATE_DIR = ".kimi-build"
INPUTS_CHANGED = "its inputs changed"
ENGINE_MANIFEST = MANIFEST
# Tokenizer and chat files a Kimi-K2 checkpoint ships (copied when present).
TOKENIZER_FILES = (
    "tiktoken.model",
    "tokenizer_config.json",
    "tokenization_kimi.py",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)

Log = Callable[[str], None]


def tool_version() -> str:
    try:
        return version("kimi_trt")
    except PackageNotFoundError:  # pragma: no cover - running from a bare source tree
        return "0+unknown"


def _digest(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ---- checksums and the state file ------------------------------------------------------


class Checksums:
    """File checksums (`checksum.ALGORITHM`), each computed at most once per run (hard
    links share an entry)."""

    def __init__(self) -> None:
        self._memo: dict[tuple[int, int, int, int], str] = {}

    def digest(self, path: Path) -> str:
        st = path.stat()
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if key not in self._memo:
            self._memo[key] = hash_file(path, ALGORITHM)
        return self._memo[key]

    def record(self, root: Path, paths: list[Path]) -> dict[str, dict[str, Any]]:
        """{path relative to root: {bytes, <algorithm>: digest}} for a stage's outputs."""
        return {
            os.path.relpath(p, root): {"bytes": p.stat().st_size, ALGORITHM: self.digest(p)}
            for p in sorted(paths)
        }

    def mismatch(self, root: Path, files: dict[str, dict[str, Any]]) -> str | None:
        """First recorded file that is missing or changed, as a reason; None if all verify."""
        for rel, want in files.items():
            p = root / rel
            if not p.is_file():
                return f"{p} is missing"
            if p.stat().st_size != want["bytes"] or self.digest(p) != want.get(ALGORITHM):
                return f"{p} changed since it was written"
        return None


class BuildState:
    """`.kimi-build/state.json`: per completed stage, its key and its output checksums."""

    def __init__(self, output_dir: Path) -> None:
        self.root = output_dir
        self.path = output_dir / STATE_DIR / "state.json"
        self.stages: dict[str, dict[str, Any]] = {}
        raw = read_json_or(self.path, {})  # unreadable state: every stage is redone
        stages = raw.get("stages") if isinstance(raw, dict) else None
        self.stages = stages if isinstance(stages, dict) else {}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({"tool_version": tool_version(), "stages": self.stages}, indent=2)
        )
        os.replace(tmp, self.path)

    def complete(self, stage: str, key: str, files: dict[str, dict[str, Any]], info: dict) -> None:
        self.stages[stage] = {"key": key, "files": files, "info": info}
        self.save()

    def forget(self, stage: str) -> dict[str, Any] | None:
        entry = self.stages.pop(stage, None)
        if entry is not None:
            self.save()
        return entry


# ---- the run ----------------------------------------------------------------------------


@dataclass
class StageReport:
    stage: str
    action: str  # "ran" | "skipped" | "stopped"
    seconds: float
    detail: str


@dataclass
class BuildContext:
    """Everything the stages share: configs, paths, keys, state, checksums, the logger."""

    build: BuildConfig
    config_path: Path
    model: ModelConfig
    log: Log
    state: BuildState
    sums: Checksums = field(default_factory=Checksums)
    keys: dict[str, str] = field(default_factory=dict)
    reports: list[StageReport] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return self.build.output_dir

    @property
    def convert_dir(self) -> Path:
        return self.build.resolved_convert_dir

    @property
    def mapping(self) -> Mapping:
        return Mapping.from_parallelism(self.build.parallelism)


def _source_fingerprint(ckpt: Path) -> list[tuple[str, int, int]]:
    """Name, size and mtime of each weight file: cheap (no 1 TB read), and any rewrite of
    the checkpoint changes it, so the conversion is redone rather than trusted."""
    files = sorted(ckpt.glob("*.safetensors")) + sorted(ckpt.glob("*.index.json"))
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def _tokenizer_sources(ctx: BuildContext) -> list[Path]:
    tdir = ctx.build.resolved_tokenizer_dir
    return [tdir / name for name in TOKENIZER_FILES if (tdir / name).is_file()]


def stage_keys(build: BuildConfig, model: ModelConfig, tokenizer: list[Path]) -> dict[str, str]:
    """Each stage's key: the inputs it depends on, chained through the stages before it."""
    w = build.weights.model_dump(mode="json")
    convert = _digest(
        tool_version(),
        model.config_hash(),
        _source_fingerprint(build.checkpoint),
        build.parallelism.model_dump(mode="json"),
        w,
    )
    compile_ = _digest(
        convert,
        build.backend,
        build.gpu,
        build.kv_cache_dtype,
        build.kv_cache_free_gpu_mem_fraction,
        build.limits.model_dump(mode="json"),
        build.llm_api.model_dump(mode="json"),
    )
    tok = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in tokenizer]
    return {
        "plan": _digest(build.config_hash(), model.config_hash()),
        "convert": convert,
        "compile": compile_,
        "package": _digest(compile_, tok),
    }


def load_context(
    config_path: Path, log: Log, overrides: dict[str, Path | None] | None = None
) -> BuildContext:
    """Read the YAML and the checkpoint's config.json (one-line errors for both)."""
    build = load_build_config(config_path, overrides)
    ckpt = build.checkpoint
    if not ckpt.is_dir():
        raise CheckpointError(
            f"{config_path}: checkpoint {ckpt} does not exist (paths in the YAML are relative "
            "to the YAML's directory): download the Hugging Face checkpoint there "
            "(moonshotai/Kimi-K2-Instruct for the GPU configs), or pass --checkpoint DIR"
        )
    if not (ckpt / "config.json").is_file():
        raise CheckpointError(f"{ckpt}: no config.json (is 'checkpoint' an HF checkpoint dir?)")
    if not _source_fingerprint(ckpt):
        raise CheckpointError(f"{ckpt}: no *.safetensors files")
    model = load_model_config(ckpt)
    ctx = BuildContext(build, config_path, model, log, BuildState(build.output_dir))
    ctx.keys = stage_keys(build, model, _tokenizer_sources(ctx))
    return ctx


def copy_file(src: Path, dst: Path, link: bool) -> Path:
    """Place `src` at `dst` (hard link when asked and possible, else copy), atomically."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    if link:
        try:
            os.link(src, tmp)
        except OSError:  # another filesystem, or links not supported: copy instead
            shutil.copy2(src, tmp)
    else:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)
    return dst


def require_clean_output(build: BuildConfig) -> None:
    """Refuse an output dir that holds something other than a kimi-trt build."""
    out = build.output_dir
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / STATE_DIR).is_dir():
        raise ConfigError(
            f"output_dir {out} is not empty and was not written by kimi-trt build; "
            "choose an empty or new directory"
        )
    prepare_output_dir(out, "build output_dir")  # convert_dir: checked by the converter
