"""Resampling: the target regenerates every answer, turn by turn, on vLLM servers.

`ResampleStage` is the pipeline stage: `await stage(prompts) -> outcomes`, one outcome per
prompt, each a rendered row (token ids + loss mask) or a reason to quarantine the row. A
later user turn is conditioned on the target's own earlier answers: each turn's prompt is
the stored sequence so far, sent as token ids to `/v1/completions` with
`"return_token_ids": true`, and the completion's ids are appended as they came back (see
`factory.answers`). Nothing the model produced is ever re-tokenized.

Determinism: each sample draws its temperature from its id, and each request carries a
`seed` derived from the sample id and the turn, so a sample retried after a crash or a
server restart asks for the same answer. (vLLM's seeded sampling is per request, but a
request's logits can still move in the last bits with the batch it shares a forward pass
with; see the README.)

Failures: a 4xx answer (prompt too long, say) is the row's fault and quarantines it; a 5xx
or a transport error is the server's, and the request is retried with exponential
backoff on whichever server is up. A server this job owns (`VllmServerActor`) that stops
answering is checked and restarted by its actor, and the requests that were in flight on it
are sent again: never lost.

`keep_original_answers` jobs use the same stage without servers: rows are rendered from
the data set's own answers by `factory.render.Renderer`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factory.answers import AnswerRenderer, TokenChat
from factory.inputs import (InputError, MediaPaths, SourceRow, has_media, normalize, resample_turns,
                            to_renderer_messages)
from factory.job import JobConfig, SamplingConfig, ServersConfig
from factory.render import Conversation, RenderConfig, RenderedRow, RenderError, Renderer, RenderStatus, conversation_id
from factory.rows import JobFailure, is_row_failure, row_reason
from factory.targets import Frontend
from factory.vllm_server import VllmServer, VllmServerConfig, spawn_reaper

log = logging.getLogger("specmill.factory.resample")


class ResampleError(JobFailure):
    """The servers could not answer a request after every retry; the job stops (and resumes later)."""


class RowRejected(Exception):
    """The server refused the request as malformed (4xx): the row's fault, not the server's."""


@dataclass(kw_only=True, slots=True)
class Prompt:
    """One normalised source row on its way through the pipeline."""

    sample_id: str
    source_index: int  # position in the whole input
    file: str
    row: int
    messages: list[dict[str, Any]]  # OpenAI form


def read_prompt(src: SourceRow, job: JobConfig, media: MediaPaths) -> Prompt | str:
    """One input row as the prompt the job runs, or the reason to quarantine it at read.
    (Duplicates are the caller's to find: that needs the rows before.)"""
    try:
        if src.error is not None:
            raise InputError(src.error)
        messages = normalize(src.data, job.input, media)
        sample_id = conversation_id(messages, **job.sampling.generation_settings())
    except (InputError, TypeError) as e:  # TypeError: a value JSON cannot hold (Parquet binary)
        return str(e)
    except Exception as e:  # the row boundary (factory.rows): what one row raises quarantines that row
        if not is_row_failure(e):
            raise
        return row_reason(e, "read")
    return Prompt(sample_id=sample_id, source_index=src.index, file=src.file, row=src.row, messages=messages)


@dataclass(kw_only=True, slots=True)
class Outcome:
    """What became of one prompt: a row to capture, or a reason to quarantine it."""

    sample_id: str
    row: RenderedRow | None = None
    stage: str = "resample"  # where a quarantine decision was made
    reason: str | None = None
    generated_tokens: int = 0
    finish_reasons: tuple[str, ...] = ()


# --------------------------------------------------------------------------- servers


@dataclass(kw_only=True, slots=True)
class _Server:
    """A server as the client sees it: its URL, its slots, and (if the job owns it) the actor
    that can check and restart it."""

    url: str
    slots: asyncio.Semaphore
    actor: Any = None  # VllmServerActor handle
    down: bool = False  # its actor is checking or restarting it
    recovering: asyncio.Task | None = None
    in_flight: int = 0
    cool_until: float = 0.0  # after a failure, others are preferred until then
    failures: int = 0  # in a row


class ServerPool:
    """Picks the least loaded server that is up; marks a failing one down and (when the job
    owns it) has its actor check and restart it, while requests go to the others or wait."""

    def __init__(self, urls: Sequence[str], actors: Sequence[Any], config: ServersConfig):
        self.config = config
        self.servers = [_Server(url=u, slots=asyncio.Semaphore(config.concurrency), actor=a)
                        for u, a in zip(urls, list(actors) + [None] * (len(urls) - len(actors)))]
        self._changed = asyncio.Event()

    async def acquire(self) -> _Server:
        while True:
            up = [s for s in self.servers if not s.down and not s.slots.locked()]
            if up:
                now = time.monotonic()
                # Least loaded among those that have not just failed; else the one cooling off longest.
                server = min(up, key=lambda s: (s.cool_until > now, s.cool_until if s.cool_until > now else 0,
                                                s.in_flight))
                await server.slots.acquire()
                server.in_flight += 1
                return server
            self._changed.clear()
            await self._changed.wait()

    def release(self, server: _Server) -> None:
        server.in_flight -= 1
        server.slots.release()
        self._changed.set()

    def succeeded(self, server: _Server) -> None:
        server.failures, server.cool_until = 0, 0.0

    def failed(self, server: _Server, error: str) -> None:
        """A transport error or 5xx on `server`: others are preferred for a while (doubling with
        each failure in a row), and an owned server is checked (and restarted)."""
        server.failures += 1
        cool = min(self.config.backoff_s * 2 ** (server.failures - 1), self.config.max_backoff_s)
        server.cool_until = time.monotonic() + cool
        if server.actor is None or server.recovering is not None:
            return
        log.warning("server %s failed (%s); asking its actor to check it", server.url, error)
        server.down = True
        server.recovering = asyncio.ensure_future(self._recover(server))

    async def _recover(self, server: _Server) -> None:
        try:
            server.url = await server.actor.endpoint.remote(check=True)
            log.info("server is up again at %s", server.url)
        finally:
            server.down = False
            server.recovering = None
            self._changed.set()


# --------------------------------------------------------------------------- the stage


class ResampleStage:
    """Pipeline stage: `await stage(prompts) -> outcomes` (one per prompt, same order).

    Holds the target's tokenizer and chat template (`Frontend`, no weights), the async HTTP
    client and the server pool; `urls` empty means keep-original-answers mode. `media`: which
    files the rows' media paths may name (default: the user's own, as `factory run` reads them)."""

    def __init__(self, *, frontend: Frontend, render: RenderConfig, sampling: SamplingConfig,
                 servers: ServersConfig, urls: Sequence[str] = (), actors: Sequence[Any] = (),
                 model_name: str | None = None, media: MediaPaths = MediaPaths()):
        self.frontend = frontend
        self.render_config = render
        self.sampling = sampling
        self.servers_config = servers
        self.renderer = Renderer(frontend, render)
        self.answers = AnswerRenderer(frontend, render)
        self._urls, self._actors = list(urls), list(actors)
        self.model_name = model_name
        self.media = media  # which files the rows' media paths may name
        self._pool: ServerPool | None = None
        self._client = None
        if not sampling.keep_original_answers and not urls:
            raise ValueError("resampling needs at least one server URL (or sampling.keep_original_answers)")

    async def __call__(self, prompts: Sequence[Prompt]) -> list[Outcome]:
        if self.sampling.keep_original_answers:
            return [self.original(p) for p in prompts]
        await self._ensure_client()  # the servers' model name: the job's business, outside the row boundary
        return list(await asyncio.gather(*(self.resample(p) for p in prompts)))

    # -- keep the data set's answers

    def original(self, prompt: Prompt) -> Outcome:
        """The row rendered with its own answers, or a reason to quarantine it."""
        try:
            return self._original(prompt)
        except Exception as e:  # the row boundary (factory.rows): what one row raises quarantines that row
            if not is_row_failure(e):
                raise
            return Outcome(sample_id=prompt.sample_id, stage="render", reason=row_reason(e, "render"))

    def _original(self, prompt: Prompt) -> Outcome:
        try:
            messages = to_renderer_messages(prompt.messages, self.media)
        except InputError as e:
            return Outcome(sample_id=prompt.sample_id, stage="render", reason=str(e))
        conv = Conversation(messages=messages, source_index=prompt.source_index, sample_id=prompt.sample_id)
        result = self.renderer([conv])[0]
        if result.status in (RenderStatus.OK, RenderStatus.TRUNCATED):
            return Outcome(sample_id=prompt.sample_id, row=result.row, stage="render")
        reason = result.reason or {RenderStatus.DROPPED_TOO_LONG: "longer than render.max_length (overlong = drop)",
                                   RenderStatus.DROPPED_NO_LOSS: "no answer token left after truncation"}[result.status]
        return Outcome(sample_id=prompt.sample_id, stage="render", reason=reason)

    # -- resample

    async def resample(self, prompt: Prompt) -> Outcome:
        """The row with the target's own answers, or a reason to quarantine it; raises
        ResampleError when the servers stay down (the job's failure, not the row's)."""
        try:
            return await self._resample(prompt)
        except Exception as e:  # the row boundary (factory.rows): what one row raises quarantines that row
            if not is_row_failure(e):
                raise
            return Outcome(sample_id=prompt.sample_id, stage="resample", reason=row_reason(e, "resample"))

    async def _resample(self, prompt: Prompt) -> Outcome:
        sid = prompt.sample_id
        if has_media(prompt.messages):
            return Outcome(sample_id=sid, reason="resampling chats with images or audio is not supported yet; "
                                                 "set sampling.keep_original_answers = true to keep their answers")
        try:
            groups = resample_turns(prompt.messages)
        except InputError as e:
            return Outcome(sample_id=sid, reason=str(e))
        temperature = self.sampling.temperature_for(sid)
        chat = TokenChat()
        limit = self.render_config.max_length
        try:
            for turn, turns in enumerate(groups):
                ids = self.answers.prompt(chat, turns)
                room = limit - len(ids)
                if room <= 0:
                    break  # no room left to answer: the row is cut at max_length below
                completion = await self._complete(ids, max_tokens=min(self.sampling.max_tokens, room),
                                                  temperature=temperature, seed=self.sampling.request_seed(sid, turn))
                self.answers.answer(chat, completion["token_ids"], completion["finish_reason"])
            else:
                self.answers.finish(chat)
        except RenderError as e:
            return Outcome(sample_id=sid, stage="render", reason=e.reason,
                           generated_tokens=chat.generated_tokens, finish_reasons=tuple(chat.finish_reasons))
        except RowRejected as e:
            return Outcome(sample_id=sid, reason=f"the server refused turn {len(chat.finish_reasons)}: {e}",
                           generated_tokens=chat.generated_tokens, finish_reasons=tuple(chat.finish_reasons))
        return self._finish_row(prompt, chat, temperature)

    def _finish_row(self, prompt: Prompt, chat: TokenChat, temperature: float) -> Outcome:
        import torch

        sid, reasons = prompt.sample_id, tuple(chat.finish_reasons)
        common = dict(sample_id=sid, generated_tokens=chat.generated_tokens, finish_reasons=reasons)
        if not self.sampling.keep_truncated and "length" in reasons:
            turn = reasons.index("length")
            return Outcome(stage="resample", reason=f"answer {turn} hit max_tokens (sampling.keep_truncated = false)",
                           **common)
        ids, mask = chat.input_ids, chat.loss_mask
        truncated = len(ids) > self.render_config.max_length or len(reasons) < len(resample_turns(prompt.messages))
        if len(ids) > self.render_config.max_length:
            if self.render_config.overlong == "drop":
                return Outcome(stage="render", reason="longer than render.max_length (overlong = drop)", **common)
            ids, mask = ids[:self.render_config.max_length], mask[:self.render_config.max_length]
        if not any(mask):
            return Outcome(stage="render", reason="no answer token within render.max_length", **common)
        row = RenderedRow(sample_id=sid, source_index=prompt.source_index,
                          input_ids=torch.tensor(ids, dtype=torch.long), loss_mask=torch.tensor(mask, dtype=torch.uint8),
                          temperature=temperature, finish_reason=reasons[-1] if reasons else None, truncated=truncated)
        return Outcome(row=row, stage="resample", **common)

    # -- HTTP

    async def _complete(self, prompt_ids: list[int], *, max_tokens: int, temperature: float, seed: int) -> dict[str, Any]:
        import httpx

        pool = await self._ensure_client()
        cfg = self.servers_config
        payload = {"model": self.model_name, "prompt": prompt_ids, "max_tokens": max_tokens,
                   "temperature": temperature, "top_p": self.sampling.top_p, "seed": seed,
                   "return_token_ids": True, "skip_special_tokens": False}
        backoff, error = cfg.backoff_s, "no attempt made"
        for attempt in range(1, cfg.max_attempts + 1):
            server = await pool.acquire()
            try:
                response = await self._client.post(f"{server.url}/v1/completions", json=payload)
            # Every httpx error (transport, a body that cannot be decoded, ...) is the server's: retried
            # here, then the job's failure, never taken for the row's by the row boundary.
            except httpx.HTTPError as e:
                error = f"{type(e).__name__}: {e}"
                pool.failed(server, error)
            else:
                if response.status_code == 200 and (completion := _completion(response)) is not None:
                    pool.succeeded(server)
                    return completion
                message = _error_message(response)
                if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
                    raise RowRejected(f"HTTP {response.status_code}: {message}")
                error = f"HTTP {response.status_code}: {message}"
                if response.status_code >= 500 or response.status_code == 200:  # 200: not a completion
                    pool.failed(server, error)
            finally:
                pool.release(server)
            log.info("request failed on %s (attempt %d/%d): %s; retrying in %.1f s",
                     server.url, attempt, cfg.max_attempts, error, backoff)
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, cfg.max_backoff_s)
        raise ResampleError(f"no server answered after {cfg.max_attempts} attempts; last error: {error}")

    async def _ensure_client(self) -> ServerPool:
        if self._client is None:
            import httpx

            cfg = self.servers_config
            slots = cfg.concurrency * len(self._urls)
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(cfg.request_timeout_s, connect=10.0),
                limits=httpx.Limits(max_connections=slots, max_keepalive_connections=slots))
            self._pool = ServerPool(self._urls, self._actors, cfg)
            if self.model_name is None:
                self.model_name = await served_model_name(self._client, self._urls)
        return self._pool

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


async def served_model_name(client: Any, urls: Sequence[str]) -> str:
    """The one model the servers serve, from the first that answers `/v1/models`."""
    import httpx

    errors = []
    for url in urls:
        try:
            response = await client.get(f"{url}/v1/models")
            response.raise_for_status()
        except httpx.HTTPError as e:
            errors.append(f"{url}: {e}")
            continue
        models = response.json()["data"]
        if len(models) != 1:
            raise ValueError(f"{url} serves {len(models)} models ({[m['id'] for m in models]}); "
                             f"set servers.model_name")
        return models[0]["id"]
    raise ResampleError(f"no server answered /v1/models to tell the model name: {'; '.join(errors)}")


def _completion(response: Any) -> dict[str, Any] | None:
    """{"token_ids", "finish_reason"} of a completion answer; None if the body is not one."""
    try:
        choice = response.json()["choices"][0]
        return {"token_ids": list(choice["token_ids"]), "finish_reason": choice["finish_reason"]}
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def _error_message(response: Any) -> str:
    try:
        return str(response.json()["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return response.text[:300]


# --------------------------------------------------------------------------- owned servers


class VllmServerActor:
    """One vLLM OpenAI server owned by the job, run from a Ray actor (one per replica) so that
    on a cluster it lands on a node with the resources it asks for.

    `endpoint(check=True)` probes the server and restarts it if it died or stopped
    answering. If the actor's own process is killed, a small reaper process kills the
    server's process group, so a restarted actor never finds an orphan holding the cores."""

    def __init__(self, config: VllmServerConfig):
        self.config = config
        self.server: VllmServer | None = None
        self._reaper: subprocess.Popen | None = None
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        self.server = VllmServer(self.config)
        self.server.start()
        self._reaper = spawn_reaper(self.server_pid())

    def server_pid(self) -> int:
        """The API server's pid (= its process group): what a test kills to simulate a crash."""
        return self.server.pid

    def endpoint(self, check: bool = False) -> str:
        if check and not self._healthy():
            log.warning("vLLM server at %s is not answering; restarting it", self.server.base_url)
            self.stop()
            self.config.port = None  # a fresh port: the old one may linger in TIME_WAIT
            self._start()
            self.restarts += 1
        return self.server.base_url

    def restart_count(self) -> int:
        return self.restarts

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self._reaper is not None:
            self._reaper.kill()
            self._reaper.wait()
            self._reaper = None

    def _healthy(self, probes: int = 3) -> bool:
        import httpx

        for _ in range(probes):
            try:
                if httpx.get(f"{self.server.base_url}/health", timeout=10.0).status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(1.0)
        return False


def server_config(model: Path, servers: ServersConfig, render: RenderConfig, log_dir: Path | None) -> VllmServerConfig:
    """The VllmServerConfig every owned replica starts with."""
    args = list(servers.vllm_args)
    if not any(a == "--max-model-len" or a.startswith("--max-model-len=") for a in args):
        args += ["--max-model-len", str(render.max_length)]  # nothing longer is kept
    return VllmServerConfig(model=model, extra_args=tuple(args), env=dict(servers.env),
                            served_model_name=servers.model_name, startup_timeout_s=servers.startup_timeout_s,
                            log_path=None if log_dir is None else log_dir / f"vllm-{os.getpid()}-{time.time_ns()}.log")

