"""A submitted job spec -> the resolved job tables the worker runs, or every problem with it.

The spec is the same job as `specmill factory run` takes: the TOML tables as JSON under
`job`, and the flat keys of its flags on top (`model`, `prompts`, `out`, `max_samples`,
`max_tokens`, ...), which override the tables key by key. On top of what `factory/job.py`
checks, the service enforces:

- confinement: every path resolves (symlinks included) inside the configured roots: inputs
  (model, prompts) inside data_root or an input root, the output strictly inside data_root
  and outside the service's own state directory. Relative paths are relative to data_root.
  The media files rows name are confined the same way when the worker reads them
  (`media_paths`), where a refused path and a missing one get the same reason.
- bounds: `max_samples` is required (if so configured) and capped, `max_tokens` capped.
- free space: not at submit (a job may wait in the queue while the disk fills or empties);
  the worker refuses a job whose disk plan exceeds the free space right before it runs, as
  `factory run` does, and the job fails with the numbers in `error`
  (`ignore_free_space` runs it anyway).
- service-owned keys: the Ray address and local-Ray sizing are the service's; the keys that
  start processes with arbitrary flags or environment, or call arbitrary hosts, only when
  the service allows them.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factory.inputs import MediaPaths
from factory.job import JobConfigError, load_job
from factory.service.settings import ServiceSettings

# Flat spec keys (as the flags of `factory run`) -> job keys.
FLAT_KEYS = {"model": "model", "prompts": "input.paths", "out": "output.dir", "max_samples": "input.max_samples",
             "max_tokens": "sampling.max_tokens", "temperatures": "sampling.temperatures",
             "keep_original_answers": "sampling.keep_original_answers",
             "ignore_free_space": "output.ignore_free_space", "capture_backend": "capture.backend"}
SERVICE_KEYS = ("ray.address", "ray.num_cpus", "ray.object_store_mb")
SERVER_OVERRIDE_KEYS = ("servers.urls", "servers.env", "servers.vllm_args", "capture.vllm_args", "capture.vllm_env")


@dataclass(kw_only=True, slots=True)
class FieldError:
    loc: tuple[str, ...]  # as FastAPI reports them: ("body", "out") or ("body", "job", "input", "paths")
    msg: str

    def to_json(self) -> dict[str, Any]:
        return {"loc": list(self.loc), "msg": self.msg, "type": "value_error"}


class SpecError(ValueError):
    def __init__(self, errors: list[FieldError]):
        self.errors = errors
        super().__init__("; ".join(f"{'.'.join(e.loc[1:])}: {e.msg}" for e in errors))


@dataclass(kw_only=True, slots=True)
class ResolvedSpec:
    tables: dict[str, Any]  # the job tables with absolute, confined paths; loads with factory.job
    out_dir: Path


def resolve_spec(job: dict[str, Any] | None, flat: dict[str, Any], settings: ServiceSettings,
                 job_id: str) -> ResolvedSpec:
    """Validate and resolve a spec; raises SpecError naming every bad field."""
    errors: list[FieldError] = []
    tables = copy.deepcopy(job) if job else {}
    where: dict[str, tuple[str, ...]] = {}  # job key -> where the client gave it
    for dotted in _leaves(tables):
        where[dotted] = ("body", "job", *dotted.split("."))
    for name, dotted in FLAT_KEYS.items():
        if (value := flat.get(name)) is None:
            continue
        if name == "prompts" and isinstance(value, str):
            value = [value]
        _put(tables, dotted, value)
        where[dotted] = ("body", name)
    forbidden = SERVICE_KEYS + (() if settings.allow_server_overrides else SERVER_OVERRIDE_KEYS)
    for dotted in forbidden:
        if dotted in where:
            errors.append(FieldError(loc=where[dotted], msg=f"{dotted} is set by the service; leave it out"))
    out = _get(tables, "output.dir") or str(settings.data_root / "out" / job_id)
    _put(tables, "output.dir", out)
    where.setdefault("output.dir", ("body", "out"))
    errors += _confine_paths(tables, where, settings)
    errors += _check_bounds(tables, where, settings)
    if not errors:
        try:
            config = load_job(None, flatten(tables))
        except JobConfigError as e:
            errors.append(FieldError(loc=("body", "job"), msg=str(e)))
        except OSError as e:  # a path the file system refuses (checked above; this is the backstop)
            errors.append(FieldError(loc=("body", "job"), msg=f"a path cannot be used: {e.strerror or e}"))
        except (TypeError, ValueError, AttributeError) as e:  # a value of a type no key takes
            errors.append(FieldError(loc=("body", "job"), msg=f"not a job factory/job.py can load: {e}"))
    if errors:
        raise SpecError(errors)
    return ResolvedSpec(tables=tables, out_dir=config.output.dir)


def check_confined(tables: dict[str, Any], settings: ServiceSettings) -> None:
    """The worker's check right before it runs: a path swapped for a symlink since submit is refused."""
    errors = _confine_paths(copy.deepcopy(tables), {}, settings)
    if errors:
        raise SpecError(errors)


def media_paths(settings: ServiceSettings) -> MediaPaths:
    """The files a service job's rows may name as media: inside data_root or an input root, as
    its inputs; relative paths from data_root; `~` never expanded."""
    return MediaPaths.confined((settings.data_root, *settings.input_roots), base=settings.data_root)


def _confine_paths(tables: dict[str, Any], where: dict[str, tuple[str, ...]],
                   settings: ServiceSettings) -> list[FieldError]:
    errors: list[FieldError] = []
    inputs = (settings.data_root, *settings.input_roots)

    def loc(dotted: str) -> tuple[str, ...]:
        return where.get(dotted, ("body", "job", *dotted.split(".")))

    model = _get(tables, "model")
    if model is None:
        errors.append(FieldError(loc=("body", "model"), msg="required: the target model directory"))
    elif (resolved := _resolve(model, settings, loc("model"), errors)) is not None:
        if _inside(resolved, inputs, errors, loc("model"), "model"):
            _put(tables, "model", str(resolved))
    paths = _get(tables, "input.paths")
    if paths is None:
        errors.append(FieldError(loc=("body", "prompts"), msg="required: JSONL/Parquet files or directories"))
    elif not isinstance(paths, list) or not paths:
        errors.append(FieldError(loc=loc("input.paths"), msg="must be a non-empty list of paths"))
    else:
        kept = []
        for i, p in enumerate(paths):
            at = (*loc("input.paths"), str(i))
            if (resolved := _resolve(p, settings, at, errors)) is not None and _inside(resolved, inputs, errors, at,
                                                                                         "prompts"):
                if not resolved.exists():
                    errors.append(FieldError(loc=at, msg=f"{p} does not exist"))
                kept.append(str(resolved))
        _put(tables, "input.paths", kept)
    out = _get(tables, "output.dir")
    if (resolved := _resolve(out, settings, loc("output.dir"), errors)) is not None:
        if resolved == settings.data_root or not resolved.is_relative_to(settings.data_root):
            errors.append(FieldError(loc=loc("output.dir"), msg=f"out must be a directory inside the data root "
                                                               f"{settings.data_root}, got {out}"))
        elif resolved.is_relative_to(settings.state_dir):
            errors.append(FieldError(loc=loc("output.dir"), msg=f"out must not be inside the service's state "
                                                               f"directory {settings.state_dir}"))
        else:
            _put(tables, "output.dir", str(resolved))
    return errors


def _resolve(value: Any, settings: ServiceSettings, at: tuple[str, ...], errors: list[FieldError]) -> Path | None:
    if not isinstance(value, str) or not value or "\x00" in value:
        errors.append(FieldError(loc=at, msg=f"must be a non-empty path string, got {value!r}"))
        return None
    # No ~ expansion: the service's home directory is not the client's.
    path = Path(value)
    try:
        resolved = (path if path.is_absolute() else settings.data_root / path).resolve()
        # Ask the file system once, here: a name it cannot hold (too long, ...) is the client's
        # error, and later exists()/is_file() calls would raise it as a 500.
        os.stat(resolved)
    except FileNotFoundError:
        return resolved  # may be made later (the output directory); inputs are checked for existence
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
        errors.append(FieldError(loc=at, msg=f"cannot use {value!r}: {getattr(e, 'strerror', None) or e}"))
        return None
    return resolved


def _inside(path: Path, roots: tuple[Path, ...], errors: list[FieldError], at: tuple[str, ...], what: str) -> bool:
    if any(path.is_relative_to(root) for root in roots):
        return True
    errors.append(FieldError(loc=at, msg=f"{what} resolves to {path}, outside the allowed roots "
                                         f"({', '.join(map(str, roots))})"))
    return False


def _check_bounds(tables: dict[str, Any], where: dict[str, tuple[str, ...]],
                  settings: ServiceSettings) -> list[FieldError]:
    errors = []
    max_samples = _get(tables, "input.max_samples")
    at = where.get("input.max_samples", ("body", "max_samples"))
    if max_samples is None:
        if settings.require_max_samples:
            errors.append(FieldError(loc=at, msg="required: this service runs only bounded jobs; set max_samples"))
    elif isinstance(max_samples, int) and settings.max_samples_limit is not None \
            and max_samples > settings.max_samples_limit:
        errors.append(FieldError(loc=at, msg=f"at most {settings.max_samples_limit}, got {max_samples}"))
    max_tokens = _get(tables, "sampling.max_tokens")
    if isinstance(max_tokens, int) and settings.max_tokens_limit is not None and max_tokens > settings.max_tokens_limit:
        errors.append(FieldError(loc=where.get("sampling.max_tokens", ("body", "max_tokens")),
                                 msg=f"at most {settings.max_tokens_limit}, got {max_tokens}"))
    return errors


# --------------------------------------------------------------------------- nested tables


def _leaves(table: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in table.items():
        if isinstance(v, dict) and v and k not in ("env", "vllm_env", "chat_template_kwargs"):
            out += _leaves(v, f"{prefix}{k}.")
        else:
            out.append(prefix + str(k))
    return out


def flatten(table: dict[str, Any]) -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: the overrides `load_job` takes (dict-valued keys kept whole)."""
    return {dotted: _get(table, dotted) for dotted in _leaves(table)}


def _get(table: dict[str, Any], dotted: str) -> Any:
    node: Any = table
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _put(table: dict[str, Any], dotted: str, value: Any) -> None:
    *sections, key = dotted.split(".")
    node = table
    for s in sections:
        if not isinstance(node.get(s), dict):
            node[s] = {}
        node = node[s]
    node[key] = value


