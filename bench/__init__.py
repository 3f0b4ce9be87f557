"""atom-fast's benchmarks, as a package (``python -m bench.run``; ``python bench/run.py`` works too).

    run.py          the command line: plan -> run -> report
    plan.py         what runs: the jobs of a full / --quick / --tiny run and the time budget
    measure.py      device sync, time quantiles, peak memory, copy bandwidth, the run's conditions
    loss_table.py   the loss table: one attention_loss call per provider and mode (also a command)
    step_table.py   the step table: its rows (label + DistillConfig fields + launcher), one child each
    report.py       markdown, JSON, CSV, then the PNG

bench imports atom_fast; atom_fast never imports bench.
"""
