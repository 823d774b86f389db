"""Benchmarks of the shard format.

shards.py  `specmill shards bench`: storage layouts against this machine's own limits
"""
