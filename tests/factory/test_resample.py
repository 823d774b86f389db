"""Resampling: answers kept as the target's token ids, turn by turn, against a real vLLM server;
retries, refusals, and a server killed mid-run."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from factory.answers import AnswerRenderer, TokenChat
from factory.default_model import DefaultModelConfig, prepare_default
from factory.job import SamplingConfig, ServersConfig
from factory.render import Conversation, RenderConfig, RenderError, Renderer
from factory.resample import Prompt, ResampleError, ResampleStage, VllmServerActor, server_config
from factory.targets import Frontend, TargetConfig

from poison_rows import lone_surrogate_line

MAX_MODEL_LEN = 1024


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    """The default model from the user's cache (prepared with the transformers check only if missing)."""
    return prepare_default(DefaultModelConfig(engine_check=False))


@pytest.fixture(scope="module")
def frontend(smollm_dir: Path) -> Frontend:
    return Frontend.load(TargetConfig(model=smollm_dir))


def masked_runs(row) -> list[list[int]]:
    runs, current = [], []
    for token, m in zip(row.input_ids.tolist(), row.loss_mask.tolist()):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def token_chat(frontend: Frontend, turns: list[tuple[list[dict], list[int], str]]) -> TokenChat:
    answers = AnswerRenderer(frontend, RenderConfig())
    chat = TokenChat()
    for before, ids, finish in turns:
        answers.prompt(chat, before)
        answers.answer(chat, ids, finish)
    answers.finish(chat)
    return chat


# --------------------------------------------------------------------------- token-id answers (no server)


def test_token_answers_build_the_same_row_as_rendering_their_text(frontend):
    tok = frontend.tokenizer
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    a1, a2 = "Four, of course.", "Six!\nAnything else?"
    chat = token_chat(frontend, [
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
         tok(a1, add_special_tokens=False)["input_ids"] + [eot], "stop"),
        ([{"role": "user", "content": "3+3?"}], tok(a2, add_special_tokens=False)["input_ids"] + [eot], "stop"),
    ])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": a1}, {"role": "user", "content": "3+3?"},
                {"role": "assistant", "content": a2}]
    row = Renderer(frontend, RenderConfig()).render(Conversation(messages=messages, source_index=0)).row
    assert chat.input_ids == row.input_ids.tolist()
    assert chat.loss_mask == row.loss_mask.tolist()
    assert chat.finish_reasons == ["stop", "stop"]


def test_answer_ids_are_kept_exactly_as_generated_even_when_text_would_tokenize_otherwise(frontend):
    tok = frontend.tokenizer
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    spelled = [tok.convert_tokens_to_ids(c) for c in "Hello"] + [eot]  # not how "Hello" tokenizes
    assert tok("Hello", add_special_tokens=False)["input_ids"] != spelled[:-1]
    chat = token_chat(frontend, [([{"role": "user", "content": "Hi"}], spelled, "stop")])
    runs = [list(r) for r in _runs(chat.input_ids, chat.loss_mask)]
    assert runs == [spelled]
    assert tok.decode(chat.input_ids).endswith("<|im_start|>assistant\nHello<|im_end|>\n")


def test_an_answer_cut_at_max_tokens_learns_no_end_of_turn_token(frontend):
    tok = frontend.tokenizer
    cut = tok("A long story about", add_special_tokens=False)["input_ids"]
    chat = token_chat(frontend, [([{"role": "user", "content": "Tell me"}], cut, "length"),
                                 ([{"role": "user", "content": "Go on"}], cut, "length")])
    assert list(map(list, _runs(chat.input_ids, chat.loss_mask))) == [cut, cut]
    text = tok.decode(chat.input_ids)
    # The template still closes each turn, but the model never produced that token.
    assert text.count("A long story about<|im_end|>") == 2


def test_a_template_that_rewrites_earlier_answers_is_rejected(frontend):
    trimming = frontend.chat_template.replace("message['content']", "message['content'] | trim")
    quirky = dataclasses.replace(frontend, chat_template=trimming)
    answers = AnswerRenderer(quirky, RenderConfig())
    chat = TokenChat()
    answers.prompt(chat, [{"role": "user", "content": "Hi"}])
    answers.answer(chat, frontend.tokenizer("Hello ", add_special_tokens=False)["input_ids"], "length")
    with pytest.raises(RenderError, match="changed the earlier turns"):
        answers.prompt(chat, [{"role": "user", "content": "Again"}])


def _runs(ids, mask):
    run = []
    for t, m in zip(ids, mask):
        if m:
            run.append(t)
        elif run:
            yield run
            run = []
    if run:
        yield run


def test_temperature_draws_and_request_seeds_are_fixed_by_the_sample_id():
    sampling = SamplingConfig(temperatures=(0.0, 1.0), temperature_weights=(3.0, 1.0), seed=7)
    draws = [sampling.temperature_for(f"id{i}") for i in range(2000)]
    assert draws == [sampling.temperature_for(f"id{i}") for i in range(2000)]
    assert 0.70 < draws.count(0.0) / len(draws) < 0.80
    assert sampling.request_seed("a", 0) == sampling.request_seed("a", 0) != sampling.request_seed("a", 1)
    assert SamplingConfig(seed=8).request_seed("a", 0) != SamplingConfig(seed=7).request_seed("a", 0)


# --------------------------------------------------------------------------- against a real server


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def server(ray_local, smollm_dir, tmp_path_factory):
    """One vLLM server for the module, owned by a Ray actor (the last test kills it)."""
    servers = ServersConfig(env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    config = server_config(smollm_dir, servers, RenderConfig(max_length=MAX_MODEL_LEN),
                           tmp_path_factory.mktemp("vllm-logs"))
    actor = ray_local.remote(VllmServerActor).options(num_cpus=1, max_concurrency=4).remote(config)
    url = ray_local.get(actor.endpoint.remote())
    yield actor, url
    ray_local.get(actor.stop.remote())
    ray_local.kill(actor)


def stage(frontend, urls, *, actors=(), max_tokens=24, temperatures=(0.0,), keep_truncated=True,
          max_length=MAX_MODEL_LEN, **servers) -> ResampleStage:
    return ResampleStage(frontend=frontend, render=RenderConfig(max_length=max_length),
                         sampling=SamplingConfig(max_tokens=max_tokens, temperatures=temperatures,
                                                 keep_truncated=keep_truncated),
                         servers=ServersConfig(**{"backoff_s": 0.2, **servers}), urls=urls, actors=actors)


def prompts(n: int, *, turns: int = 2, ask: str = "name a colour and a number.") -> list[Prompt]:
    out = []
    for i in range(n):
        messages = []
        for t in range(turns):
            messages += [{"role": "user", "content": f"Question {i}.{t}: {ask}"},
                         {"role": "assistant", "content": "(original answer, replaced)"}]
        out.append(Prompt(sample_id=f"sample-{i}", source_index=i, file="mem", row=i, messages=messages))
    return out


def run(coro):
    return asyncio.run(coro)


async def _call_and_close(s: ResampleStage, batch):
    try:
        return await s(batch)
    finally:
        await s.aclose()


def test_a_row_the_tokenizer_refuses_is_quarantined_and_the_rest_of_its_batch_is_rendered(frontend):
    keep = ResampleStage(frontend=frontend, render=RenderConfig(), sampling=SamplingConfig(keep_original_answers=True),
                         servers=ServersConfig())
    batch = prompts(3, turns=1)
    batch[1].messages = json.loads(lone_surrogate_line())["messages"]
    outcomes = run(keep(batch))
    assert outcomes[0].row is not None and outcomes[2].row is not None
    assert outcomes[1].row is None and outcomes[1].stage == "render"
    assert outcomes[1].reason.startswith("the render stage raised TypeError")


def test_a_server_that_stays_down_stops_the_job_instead_of_quarantining_its_rows(frontend):
    down = stage(frontend, ["http://127.0.0.1:9"], max_attempts=2, backoff_s=0.01)  # nothing listens there
    down.model_name = "any"
    with pytest.raises(ResampleError, match="no server answered after 2 attempts"):
        run(_call_and_close(down, prompts(2, turns=1)))


def test_a_server_answering_200_without_a_completion_is_the_servers_failure_not_the_rows(frontend):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        broken = stage(frontend, [f"http://127.0.0.1:{httpd.server_address[1]}"], max_attempts=2, backoff_s=0.01)
        broken.model_name = "any"
        with pytest.raises(ResampleError, match="no server answered after 2 attempts; last error: HTTP 200"):
            run(_call_and_close(broken, prompts(1, turns=1)))
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.slow
def test_each_turn_is_conditioned_on_the_stored_ids_of_the_earlier_answers(frontend, server):
    _, url = server
    outcomes = run(_call_and_close(stage(frontend, [url]), prompts(4)))
    eot = frontend.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for outcome in outcomes:
        assert outcome.reason is None and outcome.row is not None
        row = outcome.row
        runs = masked_runs(row)
        assert len(runs) == 2 and outcome.generated_tokens == sum(map(len, runs))
        for run_ids, finish in zip(runs, outcome.finish_reasons):
            assert (run_ids[-1] == eot) == (finish == "stop")
        # Send the stored sequence up to the second answer: greedy gives that answer back.
        ids, mask = row.input_ids.tolist(), row.loss_mask.tolist()
        start = max(i for i in range(1, len(ids)) if mask[i] and not mask[i - 1])
        response = httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": str(frontend_model(url)), "prompt": ids[:start], "max_tokens": len(runs[1]),
            "temperature": 0.0, "return_token_ids": True}).json()
        assert response["choices"][0]["token_ids"] == runs[1]
        assert "original answer" not in frontend.tokenizer.decode(ids)


def frontend_model(url: str) -> str:
    return httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]


@pytest.mark.slow
def test_truncated_answers_are_quarantined_when_the_job_says_so(frontend, server):
    _, url = server
    kept, dropped = (run(_call_and_close(stage(frontend, [url], max_tokens=3, keep_truncated=k), prompts(2)))
                     for k in (True, False))
    assert all(o.row is not None and o.row.finish_reason == "length" for o in kept)
    assert all(o.row is None and "hit max_tokens" in o.reason for o in dropped)


@pytest.mark.slow
def test_a_prompt_the_server_refuses_quarantines_the_row_with_its_message(frontend, server):
    _, url = server
    long = Prompt(sample_id="long", source_index=0, file="mem", row=0,
                  messages=[{"role": "user", "content": "word " * 1500}])
    outcome = run(_call_and_close(stage(frontend, [url], max_length=4096), [long]))[0]
    assert outcome.row is None and "the server refused turn 0: HTTP 400" in outcome.reason
    assert "maximum context length" in outcome.reason


@pytest.mark.slow
def test_failed_requests_are_retried_on_another_server_and_after_5xx(frontend, server, smollm_dir):
    _, url = server
    dead = "http://127.0.0.1:9"  # nothing listens: every request there is a transport error
    with _flaky_proxy(url, failures=3) as flaky:
        outcomes = run(_call_and_close(stage(frontend, [dead, flaky.url], max_tokens=8), prompts(3, turns=1)))
        assert flaky.failed == 3
    assert all(o.row is not None for o in outcomes)
    with _flaky_proxy(url, failures=100) as always:
        with pytest.raises(Exception, match="no server answered after 3 attempts; last error: HTTP 503"):
            run(_call_and_close(stage(frontend, [always.url], max_attempts=3), prompts(1, turns=1)))


@pytest.mark.slow
def test_a_killed_server_is_restarted_and_its_in_flight_samples_are_retried(frontend, server, ray_local):
    """Runs last in this module: it kills the module's server (its actor starts a new one)."""
    actor, url = server
    # Long answers (64 tokens each, 12 x 2 turns), so the server is mid-answer when it is killed.
    batch = prompts(12, ask="write a long story about a colour and a number.")

    async def killed_mid_run():
        s = stage(frontend, [url], actors=[actor], max_attempts=4, max_tokens=64)
        task = asyncio.ensure_future(_call_and_close(s, batch))
        # Kill once the server says it is generating: a fixed delay raced the batch on a faster machine.
        while await asyncio.to_thread(_requests_running, url) == 0:
            assert not task.done(), "the batch finished before the server could be killed; make it longer"
            await asyncio.sleep(0.05)
        assert not task.done(), "the batch finished before the server could be killed; make it longer"
        os.killpg(await actor.server_pid.remote(), signal.SIGKILL)
        return await task

    started = time.monotonic()
    outcomes = run(killed_mid_run())
    assert ray_local.get(actor.restart_count.remote()) == 1
    assert [o.sample_id for o in outcomes] == [p.sample_id for p in batch]
    assert all(o.row is not None and len(o.finish_reasons) == 2 for o in outcomes)
    # Not asserted: that the retried answers equal an uninterrupted run's. Even greedy answers
    # can differ in a token or two, because a request's logits move in the last bits with the
    # batch it shares a forward pass with (measured here: 1 of 12 rows, bf16 on CPU).
    print(f"server killed and restarted; batch finished in {time.monotonic() - started:.0f} s")


def _requests_running(url: str) -> int:
    """vLLM's own gauge of the requests it is generating for now (its /metrics)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("vllm:num_requests_running"))


class _flaky_proxy:
    """A real HTTP server in front of vLLM that answers 503 to its first `failures` requests."""

    def __init__(self, upstream: str, failures: int):
        self.upstream, self.remaining, self.failed = upstream, failures, 0
        lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with lock:
                    fail = proxy.remaining > 0
                    if fail:
                        proxy.remaining -= 1
                        proxy.failed += 1
                if fail:
                    status, data = 503, json.dumps({"error": {"message": "overloaded, try later"}}).encode()
                else:
                    r = httpx.post(proxy.upstream + self.path, content=body, timeout=120,
                                   headers={"content-type": "application/json"})
                    status, data = r.status_code, r.content
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                r = httpx.get(proxy.upstream + self.path, timeout=30)
                self.send_response(r.status_code)
                self.send_header("content-length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
