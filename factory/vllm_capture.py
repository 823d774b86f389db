"""Hidden-state capture through vLLM: the fast path for text targets.

A vLLM server runs the target with the `extract_hidden_states` speculative method, which
writes the residual streams of the requested layers into a KV-cache group, and with
`factory.vllm_connector.SpecmillHiddenStatesConnector`, which saves them per request to a
safetensors file when the request finishes. Each rendered row is sent as token ids with
`max_tokens: 1`, so the server only prefills it; the response names the file
(`kv_transfer_params.hidden_states_path`: `hidden_states [T, n_ids, H]`, `token_ids [T]`),
which is read and deleted at once. Many requests are in flight together (a bounded async
client), so the server batches them as it batches any prefill.

Layer ids (see `factory.targets`): the server is asked for the sorted distinct ids of the
three aux layers plus L. vLLM's id i is the residual entering decoder layer i, the same
tensor as `HFTarget`'s hooks keep, and id L is the residual before the final norm: our
`pre_norm` last hidden state. So both backends produce the same `Sample`s (within bf16
rounding; `tests/factory/test_vllm_capture.py` measures it).

Prefix caching stays on: the hidden states live in KV-cache blocks, so a prompt whose
prefix is cached gets that prefix's states from the cached blocks (computed from the same
tokens), and the file still holds every one of the prompt's T tokens (tested).

Failures: a row the server refuses (4xx) comes back as that row's `RowFailure`; a server
that stops answering is restarted by the stage that started it (`VllmCaptureStage` given a
`TargetConfig`, as a factory job's capture actor is), and the rows it lost are sent again. A
server is killed with the process that started it (`factory.vllm_server.spawn_reaper`).

Text targets only: multimodal targets capture through `factory.capture.CaptureStage`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from shared.hardware import resolve_model_dtype
from shared.manifest import DatasetHeader
from shared.shards import Sample

from factory.capture import check_storage_fields
from factory.render import RenderedRow
from factory.rows import JobFailure, RowFailure
from factory.targets import (EncodedMedia, Frontend, TargetConfig, TargetError, TargetMetadata, read_json, spec_for,
                             target_fingerprints)
from factory.vllm_server import VllmServer, VllmServerConfig, spawn_reaper
from shared.vllm_launch import is_healthy

if TYPE_CHECKING:
    import httpx
    import torch

log = logging.getLogger("specmill.factory.vllm_capture")

CONNECTOR_MODULE = "factory.vllm_connector"
# == factory.vllm_connector.CONNECTOR_NAME, not imported from there: that module imports vllm.
CONNECTOR_CLASS = "SpecmillHiddenStatesConnector"
# The repository root, put on the server's PYTHONPATH so it can import the connector from a checkout.
_REPO_ROOT = Path(__file__).resolve().parents[1]


class VllmCaptureError(JobFailure):
    """A capture request failed for the server's reasons; the message names the row and, if the
    server died, its log tail."""


class VllmServerDown(VllmCaptureError):
    """The server did not answer at all (connection refused or reset): it may have died."""


class VllmRowRejected(ValueError):
    """The server refused one row's request (4xx): the row's fault, not the server's."""


@dataclass(kw_only=True, slots=True)
class VllmCaptureConfig:
    aux_layer_ids: tuple[int, int, int] | None = None  # None: the target's default (2, L//2, L-3)
    dtype: str = "bfloat16"  # how hidden states are stored (the server computes in TargetConfig.dtype)
    max_concurrency: int = 32  # requests in flight; the server batches them
    max_length: int = 4096  # the longest row in tokens (RenderConfig.max_length); sets --max-model-len
    kv_cache_gib: int = 2  # VLLM_CPU_KVCACHE_SPACE on the CPU build (GPU builds size their cache themselves)
    enforce_eager: bool = True  # starts in ~40 s instead of ~100 s on CPU, for ~10% less throughput
    prefix_caching: bool = True
    # Where the server writes one file per in-flight request (read and deleted at once);
    # None: a new directory in /dev/shm (memory) if there is one, else in the system temp dir.
    storage_dir: Path | None = None
    extra_args: tuple[str, ...] = ()  # more vLLM server flags, e.g. ("--max-num-batched-tokens", "8192")
    env: Mapping[str, str] = field(default_factory=dict)  # more server environment, on top of the above
    startup_timeout_s: float = 300.0
    request_timeout_s: float = 600.0
    log_dir: Path | None = None  # where server logs go (one file per start); None: the system temp dir

    def __post_init__(self) -> None:
        self.aux_layer_ids = check_storage_fields(self.dtype, self.aux_layer_ids)
        for name in ("max_concurrency", "max_length", "kv_cache_gib"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.storage_dir is not None:
            self.storage_dir = Path(self.storage_dir).expanduser()
        if self.log_dir is not None:
            self.log_dir = Path(self.log_dir).expanduser()
        self.extra_args = tuple(str(a) for a in self.extra_args)
        self.env = dict(self.env)
        if any(not isinstance(v, str) for v in self.env.values()):
            raise ValueError(f"env values must be strings, got {self.env}")
        owned = ("--speculative-config", "--kv-transfer-config", "--dtype", "--max-model-len",
                 "--enforce-eager", "--enable-prefix-caching", "--no-enable-prefix-caching")
        clash = [a for a in self.extra_args if a.split("=")[0] in owned]
        if clash:
            raise ValueError(f"extra_args must not set {clash}: VllmCaptureConfig/TargetConfig fields set them")
        if self.startup_timeout_s <= 0 or self.request_timeout_s <= 0:
            raise ValueError("startup_timeout_s and request_timeout_s must be positive")


class VllmTarget(TargetMetadata):
    """A text target run by a vLLM server that captures hidden states (the `Target` protocol).

    Loads only the frontend and config.json here; `start()` (or `with`) starts the server,
    which captures the three aux ids of `capture_config` plus the final norm's input."""

    def __init__(self, config: TargetConfig, capture_config: VllmCaptureConfig):
        raw = read_json(config.model / "config.json")
        self.config, self.capture_config = config, capture_config
        self.spec = spec_for(raw.get("model_type", ""), family=config.family)
        if self.spec.media:
            raise TargetError(f"{config.model}: vLLM capture takes text targets only, and {self.spec.family} "
                              f"takes {', '.join(m.kind for m in self.spec.media)}; capture it with "
                              f"factory.capture.CaptureStage")
        text = raw[self.spec.text_config] if self.spec.text_config else raw
        self.frontend = Frontend.load(config, self.spec)
        self.name = config.name
        self.hidden_size = int(text["hidden_size"])
        self.num_layers = int(text["num_hidden_layers"])
        self.vocab_size = int(text["vocab_size"])
        self._fingerprints = target_fingerprints(config.model, self.frontend.chat_template)
        self.aux_layer_ids = self.check_aux_layer_ids(capture_config.aux_layer_ids)
        # What the server returns, in this order: vLLM collects the ids while walking the
        # layers, so sorted and each once; then where each aux id and L sit in it.
        self.server_layer_ids = tuple(sorted({*self.aux_layer_ids, self.num_layers}))
        self._slot = {i: k for k, i in enumerate(self.server_layer_ids)}
        self._server: VllmServer | None = None
        self._reaper: subprocess.Popen | None = None
        self._storage: Path | None = None
        self._own_storage = False
        self.restarts = 0

    # -- the Target protocol (metadata)

    def position_ids(self, input_ids: torch.Tensor, media: Sequence[EncodedMedia],
                     spans: Sequence[tuple[str, int, int]]) -> None:
        return None  # text targets: positions 0..T-1, which vLLM assigns itself

    def forward_capture(self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                        media: dict[str, torch.Tensor], layer_ids: Sequence[int]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """A right-padded batch, as `HFTarget` takes it: aux [B, T, 3, H], last [B, T, H] (pads are 0).

        For `CaptureStage` compatibility; `VllmCaptureStage` sends rows without padding them."""
        import torch

        missing = [i for i in layer_ids if i not in self._slot]
        if media or missing:
            raise TargetError(f"this vLLM server captures layer ids {self.server_layer_ids} of text rows; asked for "
                              f"{tuple(layer_ids)}{' with media' if media else ''}")
        lengths = attention_mask.sum(dim=1).tolist()
        states = self.capture([input_ids[k, :n] for k, n in enumerate(lengths)])
        b, t = input_ids.shape
        aux = torch.zeros((b, t, len(layer_ids), self.hidden_size), dtype=states[0].dtype)
        last = torch.zeros((b, t, self.hidden_size), dtype=states[0].dtype)
        for k, (n, hs) in enumerate(zip(lengths, states)):
            aux[k, :n], last[k, :n] = self.split(hs, layer_ids)
        return aux, last

    # -- the server

    def __enter__(self) -> VllmTarget:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        if self._server is not None:
            raise VllmCaptureError("start() called twice; stop() the running server first")
        cc = self.capture_config
        self._own_storage = cc.storage_dir is None
        self._storage = Path(tempfile.mkdtemp(prefix="specmill-hs-", dir=_memory_dir())) if self._own_storage \
            else cc.storage_dir
        self._storage.mkdir(parents=True, exist_ok=True)
        self._server = VllmServer(self.server_config())
        try:
            self._server.start()
        except BaseException:
            self._server = None
            self._drop_storage()
            raise
        # Dies with this process: a killed capture actor leaves no server holding the cores.
        self._reaper = spawn_reaper(self._server.pid, remove=self._storage if self._own_storage else None)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop()
        if self._reaper is not None:
            self._reaper.kill()
            self._reaper.wait()
            self._reaper = None
        self._drop_storage()

    def healthy(self) -> bool:
        """Whether the server answers `/health` (three tries, a second apart)."""
        for attempt in range(3):
            if self._server is not None and is_healthy(self._server.base_url):
                return True
            if attempt < 2:
                time.sleep(1.0)
        return False

    def restart(self) -> None:
        """Stop the server (whatever is left of it) and start a new one, on a new port."""
        log.warning("the vLLM capture server is not answering; restarting it (log of the old one: %s)",
                    self._server.log_path if self._server is not None else None)
        self.stop()
        self.start()
        self.restarts += 1

    def server_config(self) -> VllmServerConfig:
        """The capturing server: the plain server's flags plus the capture method and its connector."""
        assert self._storage is not None, "start() makes the storage directory"
        spec = {"method": "extract_hidden_states", "num_speculative_tokens": 1,  # vLLM allows only 1 here
                "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": list(self.server_layer_ids)}}}
        kv = {"kv_connector": CONNECTOR_CLASS, "kv_role": "kv_producer", "kv_connector_module_path": CONNECTOR_MODULE,
              "kv_connector_extra_config": {"shared_storage_path": str(self._storage)}}
        plain = self.plain_server_config()
        path = os.pathsep.join(p for p in (str(_REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
        # The CPU build reserves one more core whenever a KV connector is configured (meant for
        # NIXL transfers); on 2 cores that leaves none reserved, so the OpenMP compute threads
        # fight the spinning scheduler process and prefill runs ~2x slower (measured). Our
        # connector needs no core of its own: keep the plain server's layout.
        reserved = os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
        env = {**plain.env, "PYTHONPATH": path, "VLLM_CPU_NUM_OF_RESERVED_CPU": reserved}
        return dataclasses.replace(plain, env=env, extra_args=(
            *plain.extra_args, "--speculative-config", json.dumps(spec), "--kv-transfer-config", json.dumps(kv)))

    def plain_server_config(self) -> VllmServerConfig:
        """The same model and engine flags without capture: what plain prefill costs (for benchmarks)."""
        cc = self.capture_config
        args = ["--dtype", resolve_model_dtype(self.config.dtype, self.config.device), "--max-model-len", str(cc.max_length + 1),  # + the one generated token
                "--enable-prefix-caching" if cc.prefix_caching else "--no-enable-prefix-caching"]
        if cc.enforce_eager:
            args.append("--enforce-eager")
        log_path = None if cc.log_dir is None else cc.log_dir / f"vllm-capture-{os.getpid()}-{time.time_ns()}.log"
        return VllmServerConfig(model=self.config.model, served_model_name=self.name, log_path=log_path,
                                extra_args=(*args, *cc.extra_args), startup_timeout_s=cc.startup_timeout_s,
                                env={"VLLM_CPU_KVCACHE_SPACE": str(cc.kv_cache_gib), **cc.env})

    @property
    def server(self) -> VllmServer:
        if self._server is None:
            raise VllmCaptureError("the vLLM server is not running: use `with VllmTarget(...)` or call start()")
        return self._server

    # -- capture

    def capture(self, sequences: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per sequence of token ids [T], the server's hidden states [T, n_ids, H] in
        `server_layer_ids` order and the model's dtype. Not from inside a running event loop
        (await `acapture` there)."""
        return asyncio.run(self.acapture(sequences))

    async def acapture(self, sequences: Sequence[torch.Tensor], labels: Sequence[str] | None = None
                       ) -> list[torch.Tensor]:
        labels = labels or [f"sequence {k}" for k in range(len(sequences))]
        too_long = [(label, len(s)) for label, s in zip(labels, sequences) if len(s) > self.capture_config.max_length]
        if too_long:
            raise ValueError(f"{too_long[0][0]} has {too_long[0][1]} tokens, more than max_length="
                             f"{self.capture_config.max_length} the server was started for ({len(too_long)} such rows)")
        results = await self.acapture_each(sequences, labels)
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            raise failed
        return results

    async def acapture_each(self, sequences: Sequence[torch.Tensor], labels: Sequence[str]
                            ) -> list[torch.Tensor | Exception]:
        """`acapture`, with each sequence's error in its place instead of raised. Every request
        ends before this returns, so no file a request made is left behind unread."""
        import httpx

        gate = asyncio.Semaphore(self.capture_config.max_concurrency)
        limits = httpx.Limits(max_connections=self.capture_config.max_concurrency)
        async with httpx.AsyncClient(base_url=self.server.base_url, limits=limits,
                                     timeout=self.capture_config.request_timeout_s) as client:

            async def one(ids: torch.Tensor, label: str) -> torch.Tensor:
                async with gate:
                    return await self._capture_one(client, ids, label)

            return list(await asyncio.gather(*(one(s, label) for s, label in zip(sequences, labels)),
                                             return_exceptions=True))

    def split(self, hidden_states: torch.Tensor, layer_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, n_ids, H] from the server -> aux [T, len(layer_ids), H] and pre-norm last [T, H].

        Both are new tensors (a sample must not keep the whole file's tensor alive through a
        view); index_select, because strided bf16 copies are ~20x slower on CPU."""
        import torch

        aux = hidden_states.index_select(1, torch.tensor([self._slot[i] for i in layer_ids]))
        last = hidden_states.index_select(1, torch.tensor([self._slot[self.num_layers]]))[:, 0]
        return aux, last

    async def _capture_one(self, client: httpx.AsyncClient, ids: torch.Tensor, label: str) -> torch.Tensor:
        import httpx

        body = {"model": self.server.model_name, "prompt": [int(t) for t in ids], "max_tokens": 1, "temperature": 0.0}
        try:
            response = await client.post("/v1/completions", json=body)
        except httpx.TransportError as e:
            raise VllmServerDown(f"{label}: no answer from the vLLM server ({e!r}); its log {self.server.log_path} "
                                 f"ends with:\n{self.server.log_tail()}") from e
        if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
            raise VllmRowRejected(f"the vLLM capture server refused the row: HTTP {response.status_code}: "
                                  f"{response.text[:300]}")
        if response.status_code != 200:
            raise VllmCaptureError(f"{label}: the vLLM server answered {response.status_code}: {response.text[:500]}")
        params = response.json().get("kv_transfer_params") or {}
        path = params.get("hidden_states_path")
        if not path:
            raise VllmCaptureError(f"{label}: the response has no kv_transfer_params.hidden_states_path; the server "
                                   f"was not started with the hidden-states connector ({params!r})")
        data = await asyncio.to_thread(_take_file, Path(path))
        states, got_ids = data["hidden_states"], data["token_ids"]
        expected = (len(ids), len(self.server_layer_ids), self.hidden_size)
        if tuple(states.shape) != expected or not got_ids.equal(ids.to(got_ids.dtype)):
            raise VllmCaptureError(f"{label}: the server returned hidden states {tuple(states.shape)} for "
                                   f"{len(got_ids)} tokens, expected {expected} for the {len(ids)} tokens sent")
        return states

    def _drop_storage(self) -> None:
        if self._own_storage and self._storage is not None:
            shutil.rmtree(self._storage, ignore_errors=True)
        self._storage = None


def _take_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a hidden-states file once its writer is done (it holds the `.lock` file exclusively
    until then), then delete it and its lock."""
    from safetensors.torch import load_file

    lock = Path(f"{path}.lock")
    try:
        with open(lock) as f:
            fcntl.flock(f, fcntl.LOCK_SH)  # sleeps until the writer thread closes its LOCK_EX
            data = load_file(path)
    finally:
        path.unlink(missing_ok=True)
        lock.unlink(missing_ok=True)
    return data


def _memory_dir() -> str | None:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


class VllmCaptureStage:
    """Pipeline stage: `__call__(rendered rows) -> samples`, in the rows' order, like `CaptureStage`.

    Given a `TargetConfig` it starts (and on `close()` stops) its own server, and restarts it
    when it stops answering; given a running `VllmTarget` it uses that one. Use it as a context
    manager or call `close()`."""

    def __init__(self, target: VllmTarget | TargetConfig, config: VllmCaptureConfig):
        import torch

        self.config = config
        self._owns_target = isinstance(target, TargetConfig)
        self.target = VllmTarget(target, config) if isinstance(target, TargetConfig) else target
        self.header: DatasetHeader = self.target.header(aux_layer_ids=config.aux_layer_ids, dtype=config.dtype)
        self.layer_ids = self.header.aux_layer_ids
        if self.target.aux_layer_ids != self.layer_ids:
            raise ValueError(f"aux_layer_ids {self.layer_ids} differ from the {self.target.aux_layer_ids} the target's "
                             f"server captures")
        self._dtype = getattr(torch, config.dtype)
        self.max_restarts = 3  # server restarts one batch may wait for before the job stops
        self._restarting = asyncio.Lock()
        if self._owns_target:
            self.target.start()

    def __enter__(self) -> VllmCaptureStage:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._owns_target:
            self.target.stop()

    def __call__(self, rows: Sequence[RenderedRow]) -> list[Sample | RowFailure]:
        """A sample per row, or the row's failure (the server refused it), in the rows' order.
        Not from inside a running event loop (await `acall` there)."""
        return asyncio.run(self.acall(rows))

    async def acall(self, rows: Sequence[RenderedRow]) -> list[Sample | RowFailure]:
        captured = await self._capture(rows)
        return [c if isinstance(c, RowFailure) else self._sample(row, c) for row, c in zip(rows, captured)]

    def hidden_states(self, rows: Sequence[RenderedRow]) -> list[tuple[torch.Tensor, torch.Tensor, None]]:
        """Per row, in the model's dtype before the storage cast: aux [T, 3, H], pre-norm last [T, H], None
        (the same shape of answer as `CaptureStage.hidden_states`)."""
        captured = asyncio.run(self._capture(rows))
        refused = next((c for c in captured if isinstance(c, RowFailure)), None)
        if refused is not None:
            raise VllmRowRejected(f"{refused.sample_id}: {refused.reason}")
        return [(*self.target.split(states, self.layer_ids), None) for states in captured]

    async def _capture(self, rows: Sequence[RenderedRow]) -> list[torch.Tensor | RowFailure]:
        """Per row its states [T, n_ids, H] or its failure. Rows lost with a server that stopped
        answering go again once the server is back (this stage restarts a server it started)."""
        bad = [r for r in rows if r.media]
        if bad:
            raise ValueError(f"row {bad[0].source_index} carries media; vLLM capture takes text rows only")
        out: list[torch.Tensor | RowFailure | None] = [None] * len(rows)
        todo = list(range(len(rows)))
        for attempt in range(self.max_restarts + 1):
            async with self._restarting:  # a restart under way: wait for the new server
                generation = self.target.restarts
            labels = [f"row {rows[i].source_index} ({rows[i].sample_id})" for i in todo]
            results = await self.target.acapture_each([rows[i].input_ids for i in todo], labels)
            lost: list[tuple[int, VllmServerDown]] = []
            for i, result in zip(todo, results):
                if isinstance(result, VllmRowRejected):
                    out[i] = RowFailure(sample_id=rows[i].sample_id, stage="capture", reason=str(result))
                elif isinstance(result, VllmServerDown):
                    lost.append((i, result))
                elif isinstance(result, BaseException):
                    raise result
                else:
                    out[i] = result
            if not lost:
                return out
            if not self._owns_target or attempt == self.max_restarts:
                raise lost[0][1]
            log.warning("%d capture requests got no answer from the vLLM server; checking it", len(lost))
            await self._recover(generation)
            todo = [i for i, _ in lost]
        raise AssertionError("unreachable")

    async def _recover(self, generation: int) -> None:
        """Restart the server unless another batch already did (or it answers again)."""
        async with self._restarting:
            if self.target.restarts != generation or await asyncio.to_thread(self.target.healthy):
                return
            await asyncio.to_thread(self.target.restart)

    def _sample(self, row: RenderedRow, states: torch.Tensor) -> Sample:
        aux, last = self.target.split(states, self.layer_ids)
        return Sample(sample_id=row.sample_id, source_index=row.source_index, input_ids=row.input_ids,
                      loss_mask=row.loss_mask, aux_hidden_states=aux.to(self._dtype),
                      last_hidden_state=last.to(self._dtype), position_ids=None,
                      modality_spans=list(row.modality_spans), temperature=row.temperature,
                      finish_reason=row.finish_reason)
