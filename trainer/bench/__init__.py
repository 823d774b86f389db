"""Benchmarks of the trainer that need more than one module (`specmill bench peers`)."""
