"""The distillation driver: data, networks, augmentation, the loop, evaluation and the CLI.

It sits on the public loss API (``atom_fast.attention_loss`` / ``mmd_loss``) and never reaches into
a backend. Run it with ``python -m atom_fast.distill --help`` (or the ``atom-fast`` console script).
"""
