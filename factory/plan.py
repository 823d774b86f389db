"""A factory job's disk plan: how big its finished data set will be, and whether it fits.

    input rows -> samples (rows not quarantined at read or render) -> tokens -> bytes

Tokens come from rendering each row with the target's tokenizer and chat template, by the
job's own code, without the weights:

- `keep_original_answers`: the rows rendered with their own answers, as the job renders
  them (`ResampleStage.original`): the count is exact (a row the forward pass fails on
  later only makes the data set smaller).
- resampling: an upper bound. The prompt side of each row (the turns before each answer and
  the template's scaffolding, rendered with empty answers by `factory.answers`, as the job
  builds the sequence) plus `sampling.max_tokens` for every answer, each row cut at
  `render.max_length`. Real answers are usually shorter; the bound is what the disk must
  hold at worst, so it is the number to refuse a job on.

Bytes come from the shard format (`shared.shards.shard_size`: per token, per sample, per
shard), plus the manifest (its token counts), the quarantine files and the job's own small
files. `factory run` and the service's workers refuse a job whose plan needs more than the
free space where it goes (`output.ignore_free_space` runs it anyway); a resumed job needs
only what its listed shards do not already hold.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from factory.answers import AnswerRenderer, TokenChat
from factory.inputs import InputError, MediaPaths, SourceRow, count_rows, has_media, read_rows, resample_turns
from factory.job import JobConfig, JobConfigError
from factory.render import RenderError
from factory.resample import Prompt, ResampleStage, read_prompt
from factory.rows import QuarantineRecord, is_row_failure
from factory.targets import TargetFromConfig
from shared.manifest import ManifestError, load_manifest
from shared.shards import ShardSize, shard_size

# Files whose size the data set does not set: job.json, progress.json, the manifest's header,
# info and report, and the temporary copies their atomic replaces make for a moment.
FIXED_FILE_BYTES = 64 << 10
SHARD_ENTRY_BYTES = 256  # one shard's entry in manifest.json (file, rows, tokens, bytes, sha256), indented


@dataclass(kw_only=True, slots=True)
class DiskPlan:
    output: Path  # output.dir
    volume: Path  # the nearest existing directory at or above it: its file system takes the data set
    target: str
    hidden_size: int
    dtype: str
    rows: int  # input rows the job covers
    samples: int  # rows that become samples; the others are quarantined at read or render
    tokens: int  # in those samples: exact (keep_original_answers) or an upper bound (resampling)
    exact: bool
    prompt_tokens: int  # resampling: the prompt side of `tokens`
    answers: int  # resampling: answer turns, each counted at max_tokens
    at_max_length: int  # resampling: rows the template would not render with empty answers, counted at max_length
    max_tokens: int
    max_length: int
    size: ShardSize
    shards: int
    data_bytes: int  # the shards
    other_bytes: int  # the manifest, quarantine files, the job's small files
    committed_bytes: int  # in shards already listed (a resumed job)
    free_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.data_bytes + self.other_bytes

    @property
    def needed_bytes(self) -> int:
        """What is still to be written."""
        return max(0, self.total_bytes - self.committed_bytes)

    @property
    def fits(self) -> bool:
        return self.needed_bytes <= self.free_bytes

    def lines(self) -> list[str]:
        """The plan as `specmill factory plan` prints it."""
        if self.exact:
            tokens = f"{self.tokens:,} (exact: the rows rendered with their own answers)"
        else:
            tokens = (f"at most {self.tokens:,} (an upper bound): prompt side {self.prompt_tokens:,} + "
                      f"{self.answers:,} answers x max_tokens {self.max_tokens:,}, each row cut at "
                      f"render.max_length {self.max_length:,}")
            if self.at_max_length:
                tokens += f"; {self.at_max_length:,} rows the template would not render with empty answers " \
                          f"counted at max_length"
        columns = " + ".join(f"{name} {n:,}" for name, n in self.size.columns)
        verdict = (f"fits: {_human(self.needed_bytes)} to write, {_human(self.free_bytes)} free" if self.fits else
                   f"DOES NOT FIT: {_human(self.needed_bytes)} to write, {_human(self.free_bytes)} free")
        return [
            f"disk plan for {self.output} ({self.target}: hidden size {self.hidden_size:,}, {self.dtype})",
            f"rows             {self.rows:,} input rows: {self.samples:,} samples, "
            f"{self.rows - self.samples:,} quarantined at read or render",
            f"tokens           {tokens}",
            f"bytes per token  {self.size.per_token:,} = {columns}",
            f"bytes per sample at most {self.size.per_sample:,} besides its tokens; {self.size.per_shard:,} per "
            f"shard, {self.shards:,} shards at most",
            f"data set         at most {self.total_bytes:,} bytes "
            f"({_human(self.total_bytes)}): shards {self.data_bytes:,} + manifest, quarantine and job files "
            f"{self.other_bytes:,}",
            f"already written  {self.committed_bytes:,} bytes in listed shards",
            f"free space       {self.free_bytes:,} bytes ({_human(self.free_bytes)}) on the file system of "
            f"{self.volume}",
            verdict,
        ]

    def refusal(self) -> str:
        bound = "exactly" if self.exact else "at most"
        return (f"the job's data set does not fit in {self.output}: it needs {self.needed_bytes:,} bytes "
                f"({_human(self.needed_bytes)}) to write ({bound} {self.tokens:,} tokens x {self.size.per_token:,} "
                f"bytes per token in {self.samples:,} samples, plus manifest and job files, less "
                f"{self.committed_bytes:,} already written) but the file system of {self.volume} has "
                f"{self.free_bytes:,} bytes ({_human(self.free_bytes)}) free. Free space, lower input.max_samples"
                f"{'' if self.exact else ' or sampling.max_tokens'}, write elsewhere, or run it anyway with "
                f"--ignore-free-space (output.ignore_free_space = true); `specmill factory plan` shows the plan")


def plan_job(job: JobConfig, *, media: MediaPaths, show_progress: bool = False) -> DiskPlan:
    """The job's disk plan (see the module docstring). Loads the target's tokenizer and chat
    template, not its weights; reads and renders every input row once."""
    target = TargetFromConfig(job.capture.target_config(job.model))
    try:
        header = target.header(aux_layer_ids=job.capture.aux_layer_ids, dtype=job.capture.storage_dtype)
    except ValueError as e:
        raise JobConfigError(f"capture: {e}") from None
    size = shard_size(header, position_ids=target.spec.mrope)
    count = _count(job, media, target, show_progress)
    out = job.output
    data = size.bytes(tokens=count.tokens, samples=count.samples, shards=0)
    # Every commit (each commit_every samples or quarantined rows, and at the end) closes the
    # open shard, and so does reaching shard_bytes; commits on commit_interval_s are not counted.
    shards = min(count.samples, math.ceil((count.samples + count.quarantined) / out.commit_every) + 1
                 + data // out.shard_bytes)
    data += shards * size.per_shard
    distinct_ids = min(target.vocab_size, count.tokens)
    manifest = distinct_ids * len(f'  "{target.vocab_size - 1}": {count.tokens},\n') + shards * SHARD_ENTRY_BYTES
    other = 2 * manifest + count.quarantine_bytes + FIXED_FILE_BYTES  # 2 x: old and new during a replace
    volume = _existing_ancestor(out.dir)
    return DiskPlan(output=out.dir, volume=volume, target=target.name, hidden_size=header.hidden_size,
                    dtype=header.dtype, rows=count.rows, samples=count.samples, tokens=count.tokens,
                    exact=job.sampling.keep_original_answers, prompt_tokens=count.prompt_tokens,
                    answers=count.answers, at_max_length=count.at_max_length, max_tokens=job.sampling.max_tokens,
                    max_length=job.render.max_length, size=size, shards=shards, data_bytes=data, other_bytes=other,
                    committed_bytes=_committed_bytes(out.dir), free_bytes=shutil.disk_usage(volume).free)


# --------------------------------------------------------------------------- counting


@dataclass(kw_only=True, slots=True)
class _Count:
    rows: int = 0
    samples: int = 0
    tokens: int = 0
    prompt_tokens: int = 0
    answers: int = 0
    at_max_length: int = 0
    quarantined: int = 0
    quarantine_bytes: int = 0  # their records' lines in the quarantine files

    def quarantine(self, src: SourceRow, stage: str, reason: str | None, sample_id: str | None = None) -> None:
        self.quarantined += 1
        self.quarantine_bytes += len(QuarantineRecord(file=src.file, row=src.row, index=src.index, stage=stage,
                                                      reason=reason, sample_id=sample_id).line())


def _count(job: JobConfig, media: MediaPaths, target: TargetFromConfig, show_progress: bool) -> _Count:
    """Rows, samples and tokens, each row read and rendered as the job will."""
    from tqdm import tqdm

    count = _Count()
    keep = ResampleStage(frontend=target.frontend, render=job.render, sampling=job.sampling, servers=job.servers,
                         media=media) if job.sampling.keep_original_answers else None
    answers = AnswerRenderer(target.frontend, job.render)
    limit, seen = job.render.max_length, set()
    rows = tqdm(read_rows(job.input), total=count_rows(job.input), desc="plan", unit="row",
                disable=not show_progress, dynamic_ncols=True)
    for src in rows:
        count.rows += 1
        prompt = read_prompt(src, job, media)
        if isinstance(prompt, str):
            count.quarantine(src, "read", prompt)
            continue
        if prompt.sample_id in seen:
            count.quarantine(src, "read", f"duplicate of {src.file}:{src.row} (same chat, same settings)",
                             prompt.sample_id)
            continue
        seen.add(prompt.sample_id)
        if keep is not None:
            outcome = keep.original(prompt)
            if outcome.row is None:
                count.quarantine(src, outcome.stage, outcome.reason, prompt.sample_id)
                continue
            count.samples += 1
            count.tokens += outcome.row.num_tokens
            continue
        bound = _prompt_side(prompt, answers, limit)
        if bound is None:
            count.quarantine(src, "resample", "not resampled: media, or no user turn", prompt.sample_id)
            continue
        prompt_side, answered = bound
        count.samples += 1
        if prompt_side is None:  # the template refused empty answers: the row can be no longer than this
            count.at_max_length += 1
            count.tokens += limit
            continue
        count.prompt_tokens += prompt_side
        count.answers += answered
        count.tokens += min(limit, prompt_side + answered * job.sampling.max_tokens)
    rows.close()
    return count


def _prompt_side(prompt: Prompt, answers: AnswerRenderer, limit: int) -> tuple[int | None, int] | None:
    """(prompt-side tokens, answer turns) of a row the job resamples, built as the job builds
    it (`ResampleStage._resample`) with every answer empty; (None, 0) when the template refuses
    that; None for a row the job quarantines before asking for an answer."""
    if has_media(prompt.messages):
        return None  # resampling chats with media is not supported: the job quarantines them
    try:
        groups = resample_turns(prompt.messages)
        chat, answered = TokenChat(), 0
        for turns in groups:
            if len(answers.prompt(chat, turns)) >= limit:
                break  # no room left to answer: the job cuts the row at max_length
            answers.answer(chat, [], "length")
            answered += 1
        else:
            answers.finish(chat)
    except InputError:
        return None
    except RenderError:
        return None, 0
    except Exception as e:  # the row boundary (factory.rows), as in the job
        if not is_row_failure(e):
            raise
        return None
    return len(chat.input_ids), answered


# --------------------------------------------------------------------------- the disk


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _committed_bytes(directory: Path) -> int:
    """Bytes of the shards a resumed job's manifest already lists."""
    try:
        return sum(s.bytes for s in load_manifest(directory).shards)
    except ManifestError:
        return 0


def _human(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
