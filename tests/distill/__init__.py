"""Tests of the distillation driver (atom_fast/distill/), one file per module where a module has its
own tests (test_session.py: session.py, ...), plus the commands end to end (test_cli*.py).

A package, so that a file here may share its name with one in tests/ (pytest imports these as
``distill.test_*``); tests/ stays on sys.path, so ``_data`` and ``_procs`` import as before."""
