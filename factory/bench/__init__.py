"""Benchmarks of the factory (`specmill bench capture`, `bench service`, `bench factory`).

conversations.py  made-up chats the capture and factory benchmarks share (no download)
capture.py        hidden-state capture against a plain forward pass (transformers, vLLM)
service.py        the job service's latency against /healthz
factory.py        the resampler against a plain load generator, and each stage of a job
cli.py            `COMMANDS`: their `specmill bench` subcommands
"""
