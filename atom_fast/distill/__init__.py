"""The distillation driver: data, networks, augmentation, the loop, evaluation, the run's files and
the CLI.

It computes its losses through the public loss API (``atom_fast.attention_loss``, ``mmd_loss``,
``class_statistics``). Below that API it uses two things: ``atom_fast.backends.resolve_backend``, which
checks before any data loads that ``--backend`` can run on the device, and the native op of the
ConvNet's block tail (norm, ReLU and pooling in one pass on CPU; ``block_tail.py``, used by ``networks.py``). From the rest of
the package it takes ``atom_fast.environment`` (what results.json records about the machine) and
``atom_fast.allocator`` (glibc tuning for CPU runs). Run it with ``python -m atom_fast.distill
--help`` (or the ``atom-fast`` console script).
"""
