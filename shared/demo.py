"""`specmill demo`: the whole system on the embedded default, as a user would run it.

It drives the `specmill` command itself (one subprocess per step), so each step is the
same command a user would type, and the demo imports nothing from factory/ or trainer/.
Each step's output reaches the terminal as it is printed. Steps whose output already exists
are skipped, so an interrupted demo resumes. A failed step stops the demo with its exit
status; its own output (above) says why.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shared.heldout import new_questions, prompt_rows, question
from shared.storage import atomic_write_bytes

log = logging.getLogger("specmill.demo")


# The capture backend of the demo's (and `bench peers`') factory job. A vLLM capture server
# beside the resample server would bind its threads to the same core on 2 CPUs (the CPU build
# reserves one for its front end); not yet measured end to end, so these keep the measured
# transformers capture.
CAPTURE_BACKEND = "transformers"


@dataclass(kw_only=True, slots=True)
class DemoConfig:
    workdir: Path
    # Training conversations resampled by the target: half task prompts from the OpenAI evals
    # wheel, half chats from chitchat-dataset. The evaluation prompts are the evals prompts
    # that follow the training ones: the kind of prompt the draft trained on, never the prompt.
    # Sized for 25 minutes on 2 CPU cores: there capture (one core, float32) and resampling
    # share the cores, and 640 conversations took the factory alone past 25 minutes.
    samples: int = 256
    max_tokens: int = 128  # per answer turn
    steps: int = 400  # training steps
    # The draft predicts only the most frequent target ids it trained on: lm_head is most of a
    # small draft's compute (the top 8,192 ids cost 0.009 acceptance length against all 23,934
    # in bench quality, and trained 2.3x faster).
    draft_vocab_size: int = 4096
    # Packed tokens per step and unroll length, sized for 2 CPU cores (a step of the
    # trainer's defaults, 4096 tokens x 7 steps, takes ~30 s there).
    token_budget: int = 1024
    ttt_steps: int = 3
    # 10x the trainer's default (sized for 8B targets and long runs): on a few hundred
    # conversations it reaches in 80 steps the accuracy 1e-4 reaches in 200 (README, bench quality).
    lr: float = 1e-3
    eval_prompts: int = 16
    k: int = 3  # speculative tokens
    # Resampled conversations the trainer holds out, so that its simulated acceptance length is
    # measured on samples it never trained on, like vLLM's on the evaluation prompts.
    val_samples: int = 16

    def __post_init__(self) -> None:
        for name in ("samples", "max_tokens", "steps", "eval_prompts", "k", "token_budget", "ttt_steps", "lr",
                     "draft_vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"demo: {name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.val_samples < self.samples:
            raise ValueError(f"demo: val_samples must be in [0, samples), got {self.val_samples} of {self.samples}")
        if self.samples < 2:
            raise ValueError(f"demo: samples must be at least 2 (half evals, half chitchat), got {self.samples}")

    @property
    def evals_samples(self) -> int:
        return self.samples // 2

    @property
    def chitchat_samples(self) -> int:
        return self.samples - self.evals_samples

    @classmethod
    def quick(cls, workdir: Path) -> DemoConfig:
        """The smallest honest run of every step (tests; a first look in a few minutes)."""
        return cls(workdir=workdir, samples=24, max_tokens=48, steps=16, eval_prompts=4, val_samples=4)


class StepFailed(RuntimeError):
    """A step's command exited non-zero; its output, already shown, says why."""


class Steps:
    """Runs `specmill` subcommands one subprocess each, logging and timing them; a step whose
    `done` path exists is skipped, so an interrupted run resumes where it stopped."""

    def __init__(self, logger: logging.Logger = log) -> None:
        self.timings: list[tuple[str, float]] = []
        self.log = logger

    def __call__(self, title: str, *args: str, done: Path | None = None,
                 env: dict[str, str] | None = None) -> str:
        """Run `specmill ARGS`, its output going to the terminal line by line as it comes;
        returns what it printed on stdout."""
        n = len(self.timings) + 1
        if done is not None and done.exists():
            self.log.info("step %d: %s (done already: %s)", n, title, done)
            self.timings.append((title + " (cached)", 0.0))
            return ""
        self.log.info("step %d: %s", n, title)
        t0 = time.monotonic()
        # Unbuffered, or a child's stdout into a pipe would arrive only when it ends.
        child_env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
        lines = []
        with subprocess.Popen([sys.executable, "-m", "shared.cli", *args], stdout=subprocess.PIPE, text=True,
                              env=child_env) as proc:
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                lines.append(line)
        if proc.returncode != 0:
            raise StepFailed(f"step {n} ({title}) failed with exit status {proc.returncode}; "
                             f"its output above says why")
        self.timings.append((title, time.monotonic() - t0))
        return "".join(lines)


def run_demo(config: DemoConfig) -> int:
    try:
        return _run_steps(config)
    except StepFailed as e:
        print(f"specmill demo: {e}", file=sys.stderr)
        return 1


def _run_steps(config: DemoConfig) -> int:
    w = config.workdir
    w.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    step = Steps()

    model = step("prepare and verify the default target (SmolLM2-135M-Instruct)",
                 "model", "prepare-default").strip().splitlines()[-1]
    evals_prompts, chitchat_prompts, eval_prompts = w / "train-evals.jsonl", w / "train-chitchat.jsonl", \
        w / "eval-prompts.jsonl"
    step(f"take {config.evals_samples} task prompts from the OpenAI evals package", "factory", "prompts",
         "--source", "evals", "--n", str(config.evals_samples), "--out", str(evals_prompts), done=evals_prompts)
    step(f"take {config.chitchat_samples} real chats from the chitchat-dataset package", "factory", "prompts",
         "--source", "chitchat", "--n", str(config.chitchat_samples), "--out", str(chitchat_prompts),
         done=chitchat_prompts)
    data, run, draft, evaluation = w / "data", w / "train", w / "draft", w / "eval"
    # The factory job goes through the REST job service, as users submit jobs: the service (data
    # root = this workdir, so data/ is inside it) hands the job to Ray and `submit --wait` follows it.
    with JobService(workdir=w, input_roots=(Path(model).parent,)) as service:
        step("factory (via the job service): resample the answers on vLLM, capture hidden states, write shards",
             "submit", "--url", service.url, "--wait", "--model", model,
             "--prompts", str(evals_prompts), str(chitchat_prompts), "--out", str(data),
             "--max-samples", str(config.samples), "--max-tokens", str(config.max_tokens),
             "--capture-backend", CAPTURE_BACKEND, env=service.client_env)
    step("verify the shards", "shards", "verify", str(data))
    step(f"train the EAGLE-3 draft ({config.steps} steps)", "train", "--data", str(data), "--target", model,
         "--out", str(run), "--steps", str(config.steps), "--val-samples", str(config.val_samples),
         "--draft-vocab-size", str(config.draft_vocab_size), "--set", f"data.token_budget={config.token_budget}",
         "--set", f"ttt.steps={config.ttt_steps}", "--lr", str(config.lr), "--set", "log_every=20")
    # The export checks itself (on by default): vLLM serves the draft on the prompts of 4 of the
    # run's held-out conversations, 32 tokens each, and the export fails if vLLM cannot load it
    # or accepts next to nothing; one server start (~40 s on 2 cores) before the evaluation's.
    step(f"export it in the EAGLE format vLLM loads, and check it in vLLM (k={config.k})", "export", str(run),
         "--format", "eagle", "--out", str(draft), "--check-k", str(config.k))
    candidates = w / "eval-candidates.jsonl"
    step(f"take {config.eval_prompts} held-out prompts: evals prompts after the {config.evals_samples} it trained on",
         "factory", "prompts", "--source", "evals", "--skip", str(config.evals_samples),
         "--n", str(2 * config.eval_prompts), "--out", str(candidates), done=candidates)
    write_held_out(candidates, (evals_prompts, chitchat_prompts), eval_prompts, config.eval_prompts)
    step(f"evaluate in vLLM: no speculation vs the draft (k={config.k}) vs n-gram", "eval", "--target", model,
         "--draft", str(draft), "--prompts", str(eval_prompts), "--out", str(evaluation), "--k", str(config.k))

    print(report(json.loads((evaluation / "eval.json").read_text()), step.timings, time.monotonic() - started, w,
                 val_samples=config.val_samples))
    return 0


def write_held_out(candidates: Path, training: Sequence[Path], out: Path, want: int) -> None:
    """The first `want` candidates whose question no training conversation asks, to `out`
    (a prompts package can hold the same question twice, a step apart)."""
    seen = {question(row) for path in training for row in prompt_rows(path)}
    kept = new_questions(prompt_rows(candidates), seen, want)
    if len(kept) < want:
        raise StepFailed(f"only {len(kept)} of the {want} evaluation prompts wanted ask a question the training "
                         f"conversations do not (lower --eval-prompts or --samples)")
    atomic_write_bytes(out, "".join(row + "\n" for row in kept).encode())


class JobService:
    """`specmill serve` on a free loopback port with a fresh token, for as long as a `with` block
    lasts; stopping it (SIGTERM) also stops the Ray cluster it started."""

    def __init__(self, *, workdir: Path, input_roots: tuple[Path, ...], start_timeout_s: float = 120.0):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        token = secrets.token_urlsafe(24)
        # The token goes through the environment: a command line is visible to every user in `ps`.
        self.client_env = {**os.environ, "SPECMILL_API_TOKEN": token}
        self._env = {**os.environ, "SPECMILL_API_TOKENS": f"demo={token}"}
        self.workdir, self.input_roots, self.start_timeout_s = workdir, input_roots, start_timeout_s
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> JobService:
        argv = [sys.executable, "-m", "shared.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--data-root", str(self.workdir), "--log-level", "warning"]
        for root in self.input_roots:
            argv += ["--input-root", str(root)]
        log_path = self.workdir / "service.log"
        with open(log_path, "ab") as out:
            self._proc = subprocess.Popen(argv, env=self._env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        log.info("job service at %s (log %s)", self.url, log_path)
        deadline = time.monotonic() + self.start_timeout_s
        while not self._healthy():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"the job service did not start; see {log_path}")
            time.sleep(0.3)
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def __exit__(self, *exc: object) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        os.killpg(self._proc.pid, signal.SIGTERM)
        try:
            self._proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()


def report(results: dict, steps: list[tuple[str, float]], seconds: float, workdir: Path, *,
           val_samples: int) -> str:
    lines = ["", "specmill demo report", ""]
    lines += [f"  {s:7.1f} s  {title}" for title, s in steps]
    lines += [f"  {seconds:7.1f} s  total", ""]
    lines.append(f"  {'way':<8} {'accept len':>10} {'tok/forward':>11} {'tok/s':>7} {'speedup':>8}")
    for name in ("none", "ngram", "eagle3"):
        w = results["ways"][name]
        al = "-" if w["acceptance_length"] is None else f"{w['acceptance_length']:.2f}"
        tpf = "-" if w["tokens_per_forward"] is None else f"{w['tokens_per_forward']:.2f}"
        lines.append(f"  {name:<8} {al:>10} {tpf:>11} {w['output_tokens_per_s']:>7.1f} {w['speedup']:>7.2f}x")
    sim = results["simulated_acceptance_length"]
    if sim["available"]:
        held_out = sim.get("simulated_acceptance_length_split") == "val"
        where = (f"on {val_samples} resampled conversations it did not train on" if held_out
                 else "on its own TRAINING samples (no held-out split), so not comparable with vLLM's")
        lines.append(f"  the trainer's simulated acceptance length for this draft, {where}: {sim['value']:.2f}")
    lines += ["", f"  artifacts in {workdir}: data/ (shards), train/ (checkpoints, curves.png), "
              "draft/ (load it in vLLM; check.json: the export's check), eval/ (eval.json, eval.png)"]
    return "\n".join(lines)
