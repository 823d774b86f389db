"""Made-up chat conversations for the factory's benchmarks: topics, questions and answers of
varied length, reproducible from a seed, made up locally (no download)."""

from __future__ import annotations

import random

from factory.render import Conversation

SYSTEM = "You are a patient, precise teacher."
TOPICS = ("the water cycle", "compound interest", "photosynthesis", "the French revolution", "binary search",
          "sourdough bread", "plate tectonics", "the immune system", "jazz harmony", "solar panels",
          "the Roman roads", "garbage collection", "coral reefs", "chess openings", "supply and demand",
          "black holes", "vaccines", "the printing press", "neural networks", "bicycle gears")
QUESTIONS = ("Can you explain {t} to me?", "What is the most important thing to know about {t}?",
             "I keep getting confused by {t}. Where should I start?", "Write a short note on {t} for a beginner.",
             "How would you teach {t} to a twelve-year-old?", "What are common mistakes people make about {t}?")
_FOLLOW = ("Can you give an example?", "Why does that matter?", "Could you make it shorter?",
           "How does this compare with what people believed a hundred years ago?", "And what should I read next?")
_OPEN = ("In short, {t} is about", "A good way to think about {t} is", "People often describe {t} as",
         "The core idea behind {t} is", "Historically, {t} grew out of")
_WORDS = ("energy", "balance", "pattern", "structure", "time", "cost", "evidence", "model", "change", "system",
          "process", "signal", "layer", "surface", "pressure", "memory", "rule", "exception", "scale", "limit",
          "example", "result", "measure", "question", "history", "material", "network", "growth", "risk", "choice")
_VERBS = ("shapes", "explains", "limits", "connects", "reflects", "depends on", "changes", "reveals", "drives",
          "protects", "tests", "follows")
_LINKS = ("Because of this,", "In practice,", "For example,", "On the other hand,", "Over time,", "Put simply,",
          "This is why", "As a result,", "In many cases,", "Importantly,")


def _sentence(rng: random.Random, topic: str) -> str:
    w = rng.sample(_WORDS, 4)
    body = f"the {w[0]} of {topic} {rng.choice(_VERBS)} the {w[1]} and the {w[2]}"
    if rng.random() < 0.5:
        body += f", which {rng.choice(_VERBS)} every {w[3]}"
    return f"{rng.choice(_LINKS)} {body}."


def made_up_answer(rng: random.Random, topic: str, sentences: int) -> str:
    parts = [f"{rng.choice(_OPEN).format(t=topic)} a {rng.choice(_WORDS)} and a {rng.choice(_WORDS)}."]
    for k in range(sentences):
        parts.append(_sentence(rng, topic))
        if k % 4 == 3:
            parts.append("\n\n")
    return " ".join(parts).replace(" \n\n ", "\n\n").strip()


def bench_conversations(n: int, *, seed: int = 0, start_index: int = 0) -> list[Conversation]:
    """Varied-length chat conversations made up locally (no download): one to three turns,
    answers from a couple of sentences to a few hundred words, log-uniformly."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        messages: list[dict[str, str]] = []
        if rng.random() < 0.5:
            messages.append({"role": "system", "content": SYSTEM})
        for turn in range(rng.choice((1, 1, 2, 3))):
            question = rng.choice(QUESTIONS).format(t=topic) if turn == 0 else rng.choice(_FOLLOW)
            sentences = round(2 ** rng.uniform(1.0, 5.5))  # 2 .. ~45 sentences, ~15 tokens each
            messages += [{"role": "user", "content": question},
                         {"role": "assistant", "content": made_up_answer(rng, topic, sentences)}]
        rows.append(Conversation(messages=messages, source_index=start_index + i, finish_reason="stop"))
    return rows
