"""`specmill bench peers`: one shard data set, the drafts of specmill and of its peers'
trainers (vllm-project/speculators, sgl-project/SpecForge) trained on it, one acceptance table.

convert.py  specmill shards -> each peer's offline format (and back, for the tests)
venvs.py    a virtual environment per peer, beside the project's Python, never inside it
shims/      what each peer needs to run on a CPU, loaded only in that peer's process
run.py      the bench: data via the factory, train and export each draft, `specmill eval` each
"""
