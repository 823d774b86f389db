"""Benchmarks of the trainer and of the drafts it trains (`specmill bench train`, `bench quality`,
`bench peers`).

train.py    the training loop against its pure compute on the same batches
quality.py  the draft's acceptance length against n-gram on held-out prompts, end to end
peers/      specmill's drafts next to those of its peers' trainers, trained on the same shards
cli.py      `COMMANDS`: their `specmill bench` subcommands

quality and peers run the whole system, the factory included, but only through the
`specmill` command, one subprocess per step; in-process they import `shared` and `trainer`,
so the rule that `trainer` never imports `factory` holds here too.
"""
