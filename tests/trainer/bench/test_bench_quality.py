"""`specmill bench quality`: held-out prompts never overlap the training ones, the steps run in
order with the training length taken from the data set, and the goals are judged right."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.bench import quality
from shared.cli import build_parser, main
from trainer.bench.quality import QualityConfig, format_report, run_quality, summarize


def test_prompts_skip_gives_the_prompts_after_a_training_set(tmp_path):
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    assert main(["factory", "prompts", "--source", "chitchat", "--n", "20", "--out", str(train)]) == 0
    assert main(["factory", "prompts", "--source", "chitchat", "--skip", "20", "--n", "5", "--out", str(held)]) == 0
    both = tmp_path / "both.jsonl"
    assert main(["factory", "prompts", "--source", "chitchat", "--n", "25", "--out", str(both)]) == 0
    rows = lambda p: p.read_text().splitlines()  # noqa: E731
    assert len(rows(held)) == 5
    assert rows(train) + rows(held) == rows(both)  # the next five, none of the training twenty
    assert main(["factory", "prompts", "--source", "chitchat", "--skip", "-1", "--n", "5",
                 "--out", str(held)]) == 2


def chat(source: str, i: int) -> dict:
    """Prompt i of a fake package; chitchat repeats itself (every chat whose index ends in 3 is
    chat i - 1 again), and a later chat asks a training chat's question (index 6 asks what 2 asks)."""
    if source == "chitchat" and i % 10 == 3:
        i -= 1
    question = f"{source}-{2 if source == 'chitchat' and i == 6 else i}"
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": f"a{i}"}]}


class FakeSteps:
    """Stands in for the `specmill` subprocesses: records each command and writes what it would."""

    def __init__(self, logger=None, tokens_per_sample: int = 100):
        self.timings: list[tuple[str, float]] = []
        self.commands: list[list[str]] = []
        self.tokens_per_sample = tokens_per_sample
        self._parser = build_parser()

    def run(self, *words: str) -> list:
        """The parsed flags of each command starting with `words` (e.g. "train"), in order."""
        return [self._parser.parse_args(c) for c in self.commands if tuple(c[:len(words)]) == words]

    def __call__(self, title: str, *args: str, done: Path | None = None, env=None) -> str:
        if done is not None and done.exists():
            self.timings.append((title + " (cached)", 0.0))
            return ""
        self.commands.append(list(args))
        self._parser.parse_args(list(args))  # a command `specmill` takes (argparse exits on one it does not)
        self.timings.append((title, 1.0))
        opt = lambda name: args[args.index(name) + 1]  # noqa: E731
        if args[:2] == ("model", "prepare-default"):
            return "/models/smollm2\n"
        if args[:2] == ("factory", "prompts"):
            skip, n = int(opt("--skip")), int(opt("--n"))
            Path(opt("--out")).write_text("".join(json.dumps(chat(opt("--source"), i)) + "\n"
                                                  for i in range(skip, skip + n)))
        elif args[:2] == ("factory", "run"):
            out = Path(opt("--out"))
            out.mkdir(exist_ok=True)
            rows = sum(len(Path(p).read_text().splitlines()) for p in args[args.index("--prompts") + 1:args.index("--out")])
            (out / "manifest.json").write_text(json.dumps({
                "complete": True, "shards": [{"rows": 10, "tokens": 10 * self.tokens_per_sample}],
                "info": {"report": {"input_rows": rows, "loss_tokens": 400, "quarantined": rows - 10}}}))
        elif args[0] == "export":
            Path(opt("--out")).mkdir(parents=True)
            (Path(opt("--out")) / "config.json").write_text("{}")
        elif args[0] == "eval":
            out = Path(opt("--out"))
            out.mkdir(parents=True)
            seen = opt("--prompts").endswith("seen.jsonl")  # the draft does better on what it trained on
            (out / "eval.json").write_text(json.dumps(fake_eval(eagle_al=1.9 if seen else 2.2, eagle_tpf=2.1,
                                                                ngram_tpf=1.2)))
        return ""


def fake_eval(*, eagle_al, eagle_tpf, ngram_tpf) -> dict:
    way = lambda al, tpf, pos: {"acceptance_length": al, "tokens_per_forward": tpf,  # noqa: E731
                                "acceptance_per_position": pos, "output_tokens_per_s": 50.0, "speedup": 1.0}
    return {"num_prompts": 4, "simulated_acceptance_length": {"available": False},
            "ways": {"none": way(None, 1.0, []), "ngram": way(1.3, ngram_tpf, [0.2, 0.1, 0.0]),
                     "eagle3": way(eagle_al, eagle_tpf, [0.6, 0.4, 0.2])}}


def test_run_quality_trains_on_the_training_prompts_and_evaluates_on_the_held_out_ones(tmp_path, monkeypatch,
                                                                                        capsys):
    fake = FakeSteps()
    monkeypatch.setattr(quality, "Steps", lambda logger: fake)
    config = QualityConfig(workdir=tmp_path, samples=10, heldout=4, epochs=3, token_budget=256, lr=5e-4)
    results = run_quality(config)

    question = lambda line: json.loads(line)["messages"][0]["content"]  # noqa: E731
    train = [question(x) for f in ("train-evals.jsonl", "train-chitchat.jsonl")
             for x in (tmp_path / f).read_text().splitlines()]
    # 5 evals + chitchat grown from 5 to 6 rows, so that 10 are distinct (chitchat-3 repeats chitchat-2)
    assert train == [f"evals-{i}" for i in range(5)] + ["chitchat-0", "chitchat-1", "chitchat-2", "chitchat-2",
                                                          "chitchat-4", "chitchat-5"]
    held = [question(x) for x in (tmp_path / "heldout.jsonl").read_text().splitlines()]
    # the prompts after the training ones, less repeats of training questions (chat 6 asks chat 2's)
    assert held == ["evals-5", "evals-6", "chitchat-7", "chitchat-8"]

    [run] = fake.run("factory", "run")
    assert [str(p) for p in run.prompts] == [str(tmp_path / "train-evals.jsonl"), str(tmp_path / "train-chitchat.jsonl")]
    [train] = fake.run("train")
    assert train.steps == -(-3 * 1000 // 256)  # ceil(epochs x tokens / budget)
    assert getattr(train, "optim.lr") == 5e-4
    assert getattr(train, "draft.draft_vocab_size") is None  # the trainer's default
    held_eval, seen_eval = fake.run("eval")
    assert held_eval.prompts == tmp_path / "heldout.jsonl"
    # The same evaluation on training prompts: the first of each package, distinct questions
    # (64 asked for, 10 there: 5 evals, and chitchat's first 6 rows less the repeat).
    assert seen_eval.prompts == tmp_path / "seen.jsonl"
    seen = [question(x) for x in (tmp_path / "seen.jsonl").read_text().splitlines()]
    assert seen == [f"evals-{i}" for i in range(5)] + ["chitchat-0", "chitchat-1", "chitchat-2", "chitchat-4",
                                                         "chitchat-5"]
    assert results["seen"]["ways"]["eagle3"]["acceptance_length"] == 1.9

    assert results["goals"]["acceptance_length"] == {"value": 2.2, "goal": 2.0, "met": True}
    assert results["goals"]["tokens_per_forward_vs_ngram"]["value"] == pytest.approx(2.1 / 1.2)
    assert json.loads((tmp_path / "quality.json").read_text())["data"]["tokens"] == 1000
    assert results["ways"]["eagle3"]["acceptance_length"] == 2.2  # held out, against 1.9 on training prompts
    report = format_report(results)
    assert report in capsys.readouterr().out  # the report printed is the one returned
    assert "1.900" in report and "2.200" in report  # it sets the training prompts' AL beside the held-out one

    # Run again: the export and evaluation exist, so they are not made again (the prompts are
    # rewritten, identically; the factory and the trainer find their work done and return).
    fake.commands.clear()
    run_quality(config)
    assert [c[:2] for c in fake.commands if c[:2] != ["factory", "prompts"]] == [
        ["model", "prepare-default"], ["factory", "run"], ["shards", "verify"], ["train", "--data"]]
    assert held == [question(x) for x in (tmp_path / "heldout.jsonl").read_text().splitlines()]

    # Other training settings: a fresh draft and evaluation beside the first, on the same data.
    fake.commands.clear()
    run_quality(QualityConfig(workdir=tmp_path, samples=10, heldout=4, epochs=8, token_budget=256, lr=5e-4))
    assert [c[0] for c in fake.commands if c[0] in ("train", "export", "eval")] == ["train", "export", "eval", "eval"]
    assert len(list(tmp_path.glob("*/quality.json"))) == 2

    # A smaller draft vocab: passed to the trainer, a run of its own.
    fake.commands.clear()
    run_quality(QualityConfig(workdir=tmp_path, samples=10, heldout=4, epochs=3, token_budget=256, lr=5e-4,
                              draft_vocab_size=8000))
    [train] = fake.run("train")
    assert getattr(train, "draft.draft_vocab_size") == 8000
    assert len(list(tmp_path.glob("*-v8000/quality.json"))) == 1

    # More conversations asked for: the factory job is given the grown prompt files.
    fake.commands.clear()
    run_quality(QualityConfig(workdir=tmp_path, samples=12, heldout=4, epochs=3, token_budget=256, lr=5e-4))
    [run] = fake.run("factory", "run")
    rows = sum(len(p.read_text().splitlines()) for p in run.prompts)
    assert rows == 13  # 6 evals + 7 chitchat (one repeat)


def test_sharegpt_questions_join_the_training_plan_and_the_held_out_prompts_stay_the_same(tmp_path, monkeypatch):
    fake = FakeSteps()
    monkeypatch.setattr(quality, "Steps", lambda logger: fake)
    settings = dict(workdir=tmp_path, samples=10, heldout=4, epochs=3, token_budget=256, seen=0)
    run_quality(QualityConfig(**settings))
    held = (tmp_path / "heldout.jsonl").read_text()

    fake.commands.clear()
    results = run_quality(QualityConfig(**settings, sharegpt=3, steps=7))
    [run] = fake.run("factory", "run")
    assert run.prompts == [tmp_path / f"train-{s}.jsonl" for s in ("evals", "chitchat", "sharegpt")]
    question = lambda line: json.loads(line)["messages"][0]["content"]  # noqa: E731
    assert [question(x) for x in (tmp_path / "train-sharegpt.jsonl").read_text().splitlines()] == [
        "sharegpt-0", "sharegpt-1", "sharegpt-2"]
    assert (tmp_path / "heldout.jsonl").read_text() == held, "judged on the same prompts as without them"
    [train] = fake.run("train")
    assert train.steps == 7, "--steps wins over --epochs"
    assert train.out.parent.name.startswith("s7-") and train.out.parent.name.endswith("-sg3")
    assert results["data"]["conversations"] == 13 and results["data"]["sharegpt"] == 3


def test_a_warm_start_trains_beside_the_cold_run_and_is_named_by_the_inits_weights(tmp_path, monkeypatch, capsys):
    fake = FakeSteps()
    monkeypatch.setattr(quality, "Steps", lambda logger: fake)
    settings = dict(workdir=tmp_path / "w", samples=10, heldout=4, epochs=3, token_budget=256)
    run_quality(QualityConfig(**settings))
    init = tmp_path / "init"
    init.mkdir()
    (init / "model.safetensors").write_bytes(b"weights one")
    fake.commands.clear()
    results = run_quality(QualityConfig(**settings, init=init))
    [train] = fake.run("train")
    assert getattr(train, "draft.init") == init
    assert [c[0] for c in fake.commands if c[0] in ("train", "export", "eval")] == ["train", "export", "eval", "eval"]
    assert results["config"]["init"] == str(init) and f"started from {init}" in capsys.readouterr().out
    (init / "model.safetensors").write_bytes(b"weights two")  # another init: a third draft, not the second's
    fake.commands.clear()
    run_quality(QualityConfig(**settings, init=init))
    assert [c[0] for c in fake.commands if c[0] in ("export", "eval")] == ["export", "eval", "eval"]
    assert len(list((tmp_path / "w").glob("*/quality.json"))) == 3
    with pytest.raises(ValueError, match="--init .* is not an exported draft"):
        QualityConfig(**settings, init=tmp_path / "nothing")


def test_too_few_new_held_out_questions_is_an_error_naming_the_setting(tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "Steps", FakeSteps)
    # Every prompt asks the same question, answered differently: distinct conversations, no new question.
    monkeypatch.setitem(globals(), "chat", lambda source, i: {"messages": [
        {"role": "user", "content": "the same question every time"}, {"role": "assistant", "content": f"{source}{i}"}]})
    with pytest.raises(ValueError, match="lower --heldout"):
        run_quality(QualityConfig(workdir=tmp_path, samples=10, heldout=4))


@pytest.mark.parametrize("eagle_al, eagle_tpf, ngram_tpf, met", [
    (2.0, 2.6, 2.0, (True, True)),      # 2.6 / 2.0 = 1.3 exactly: the goals are >=
    (1.9, 1.9, 1.2, (False, True)),
    (2.4, 2.3, 1.9, (True, False)),
    (None, 1.0, 1.0, (False, False)),   # no drafts at all
])
def test_goals_are_judged_against_the_n_gram_of_the_same_run(tmp_path, eagle_al, eagle_tpf, ngram_tpf, met):
    manifest = {"shards": [{"rows": 2, "tokens": 50}], "info": {"report": {}}}
    r = summarize(QualityConfig(workdir=tmp_path), manifest, fake_eval(eagle_al=eagle_al, eagle_tpf=eagle_tpf,
                                                                     ngram_tpf=ngram_tpf), 3, [("x", 1.0)], 2.0)
    assert (r["goals"]["acceptance_length"]["met"], r["goals"]["tokens_per_forward_vs_ngram"]["met"]) == met
    text = format_report(r)
    assert text.count("NOT met") == met.count(False)


def test_training_on_some_temperatures_passes_the_filter_and_counts_only_their_tokens(tmp_path, monkeypatch):
    fake = FakeSteps()
    monkeypatch.setattr(quality, "Steps", lambda logger: fake)
    counted = []
    monkeypatch.setattr(quality, "trained_tokens", lambda data, manifest, temps: counted.append(temps) or 600)
    run_quality(QualityConfig(workdir=tmp_path, samples=10, heldout=4, epochs=2, token_budget=256,
                              train_temperatures=[0]))
    [train] = fake.run("train")
    assert getattr(train, "data.temperatures") == [0.0]
    assert train.steps == 5  # ceil(2 x 600 / 256)
    assert counted == [(0.0,)]
    assert len(list(tmp_path.glob("*-t0/quality.json"))) == 1  # a run of its own


def test_trained_tokens_are_those_of_the_samples_at_the_chosen_temperatures(tmp_path):
    from shared.shards import Dataset
    from shared.synth import SynthConfig, write_synthetic

    data = tmp_path / "data"
    write_synthetic(data, SynthConfig(samples=30, hidden_size=16, vocab=100, num_layers=4, mean_tokens=20,
                                      max_tokens=40))
    ds, manifest = Dataset(data), json.loads((data / "manifest.json").read_text())
    lengths, temps = ds.lengths(), ds.temperatures()
    assert quality.trained_tokens(data, manifest, None) == quality.manifest_tokens(manifest) == lengths.sum()
    assert quality.trained_tokens(data, manifest, (0.0,)) == lengths[temps == 0].sum()
    assert quality.trained_tokens(data, manifest, (0.7, 1.0)) == lengths[temps != 0].sum()
    assert 0 < lengths[temps == 0].sum() < lengths.sum()


@pytest.mark.parametrize("field, value", [("samples", 1), ("heldout", 0), ("epochs", 0.0), ("lr", -1.0),
                                          ("precision", "fp8"), ("seen", 1), ("seen", -2),
                                          ("draft_vocab_size", 0), ("train_temperatures", [-1.0]),
                                          ("train_temperatures", []), ("sharegpt", -1), ("steps", 0)])
def test_bad_settings_are_refused_naming_the_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        QualityConfig(workdir=tmp_path, **{field: value})
