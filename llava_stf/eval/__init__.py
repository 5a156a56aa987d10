"""Evaluation on LLaVA-1.5's nine benchmarks. Importing this package imports nothing heavy.

- ``engine``: the only code that runs the model on benchmark questions (sharding, resume, pre-flight, merge,
  provenance checks); it generates through ``llava_stf.generation.Generator``.
- ``answers``: append-only part files per shard, the deterministic merge into the upstream answers file, and the
  provenance record beside it (``llava_stf.provenance``: checkpoint and question-file digests, generation settings).
- ``benchmarks``: one small declarative module per benchmark and the ``BENCHMARKS`` registry; ``vqa`` takes any
  LLaVA question file (``synthetic``, the demo's, is a thin use of it).
- ``scoring``: LLaVA's official scoring rules as pure functions (no file I/O, no model).
- ``results``: ``results.json`` per model and the paper-style table; ``xlsx``: the MMBench upload writer.
- ``__main__``: ``python -m llava_stf.eval`` (see ``--help``).
"""
