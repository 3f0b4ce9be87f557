"""Reporting bench/run.py's rows: markdown tables, the JSON and CSV files, and the PNG.

:func:`write_outputs` writes the JSON and the CSV first and draws the PNG last: a missing or broken
plotting library costs the picture (with a warning), never the measurements.
"""

import csv
import datetime
import json
import os
import warnings

from bench import step_table
from bench.loss_table import SETTINGS as LOSS_SETTINGS

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# --------------------------------------------------------------------------------------------------
# markdown
# --------------------------------------------------------------------------------------------------


def _ms(r):
    # three significant digits or more: GPU rows are fractions of a millisecond, CPU eager seconds
    digits = 1 if r["median_s"] >= 0.01 else 2 if r["median_s"] >= 0.001 else 3
    return " ".join((f"{1e3 * r['median_s']:.{digits}f}",
                     f"({1e3 * r['p20_s']:.{digits}f}-{1e3 * r['p80_s']:.{digits}f})"))


def _x(v):
    return "-" if v is None else f"{v:.2f}x"


def loss_markdown(rows, env):
    if not rows:
        return ""
    s = LOSS_SETTINGS
    head = (f"Loss on {env['device_name']}, {env['threads']} threads, torch {env['torch']}, triton "
            f"{env['triton']}, native ISA {env['native_isa']}. One attention_loss call per layer shape "
            f"(a network's loss is the sum of its layers' rows); {rows[0]['classes']} classes x "
            f"{rows[0]['real_per_class']} real per call (larger class counts are processed in chunks "
            f"of 10 classes); {s['dtype']}, ps={s['ps']:g} pc={s['pc']:g} ws={s['ws']:g} wc={s['wc']:g}; "
            "only the synthetic features require grad. GB/s: bytes that must move (fwd reads real + "
            "syn, bwd reads syn and writes its gradient) / median; 'of copy': that GB/s over the 80th "
            "percentile of the GB/s of copy_s of the real features, one timed just before each call; "
            "peak extra: fresh process, above the inputs (CPU: resident-set growth). compile = "
            "torch.compile(dynamic=False) of the reference.")
    lines = [head, "",
             "| layer (C,H,W) | used by | IPC | mode | provider | median ms (p20-p80) | GB/s | of copy "
             "| vs eager | vs compile | peak extra MB (of inputs) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = r.get("peak_extra_bytes")
        peak_s = "-" if peak is None else f"{peak / 1e6:.1f} ({100 * r['peak_extra_fraction']:.0f}%)"
        lines.append(f"| {r['C']}x{r['H']}x{r['W']} | {r['layers']} | {r['ipc']} | {r['mode']} | "
                     f"{r['provider']} | {_ms(r)} | {r['gbs']:.1f} | {100 * r['copy_fraction']:.0f}% | "
                     f"{_x(r['speedup_vs_eager'])} | {_x(r['speedup_vs_compile'])} | {peak_s} |")
    return "\n".join(lines)


def step_markdown(rows, env):
    if not rows:
        return ""
    r0 = rows[0]
    ipcs = sorted({r["ipc"] for r in rows})
    head = (f"Distillation step on {env['device_name']}, {env['threads']} threads: {r0['classes']} "
            f"classes, {r0['image']} random images, ConvNet width {r0['width']} depth {r0['depth']} "
            f"{r0['norm']}, batch_real {r0['batch_real']} (unless the row says otherwise), DSA on; "
            f"median (p20-p80) over {r0['steps']} steps after {r0['warmup']} warm-up. Peak MB: memory "
            "held between steps except the dataset + peak growth during one step (CUDA: "
            "max_memory_allocated - dataset; CPU: held tensors + resident-set growth, fresh process). "
            f"Speedup: vs {step_table.SPEEDUP_BASE}. Conv GFLOP/s: the step's convolution FLOPs "
            "(real forward, synthetic forward + input-gradient backward) / median"
            + (f", against a 2048^2 float32 matmul's {env['matmul_gflops']:.0f} GFLOP/s in the same "
               "run." if env.get("matmul_gflops") else "."))
    by = {(r["row"], r["ipc"]): r for r in rows}
    labels = [r.label for r in step_table.STEP_ROWS if any(x["row"] == r.label for x in rows)]
    cols = [f"s/step IPC {i}" for i in ipcs] + [f"speedup IPC {i}" for i in ipcs] + \
           [f"peak MB IPC {i}" for i in ipcs] + [f"conv GFLOP/s IPC {i}" for i in ipcs]
    lines = [head, "", "| method (loop) | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label in labels:
        cells = []
        for key in ("time", "speedup", "peak", "gflops"):
            for ipc in ipcs:
                cells.append(_step_cell(by.get((label, ipc)), key))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _step_cell(r, key):
    if r is None:
        return "-"
    if "error" in r:
        return "failed"
    if key == "time":
        return f"{r['median_s']:.3f} ({r['p20_s']:.3f}-{r['p80_s']:.3f})"
    if key == "speedup":
        return _x(r.get("speedup_vs_base"))
    if key == "gflops":
        return "-" if r.get("conv_gflops_per_s") is None else f"{r['conv_gflops_per_s']:.0f}"
    return "-" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 1e6:.0f}"


# --------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------


def output_paths(out, slug):
    """(json, csv, png) paths: ``out`` a .json file, or a directory (made if missing; default
    bench/results/) that receives ``<slug>-<date>.*``."""
    stem = f"{slug}-{datetime.date.today().isoformat()}"
    out = out or RESULTS
    if out.endswith(".json"):
        base = out[:-len(".json")]
    else:
        base = os.path.join(out, stem)
    os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)
    return base + ".json", base + ".csv", base + ".png"


def write_json(path, result):
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def write_csv(path, loss_rows, step_rows):
    """One CSV row per table row, ``table`` = loss or step; lists and dicts as JSON."""
    rows = [{"table": "loss", **r} for r in loss_rows] + [{"table": "step", **r} for r in step_rows]
    fields = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})


def write_outputs(paths, result):
    """Write the JSON, then the CSV, then the PNG of ``result`` (bench/run.py's JSON object);
    returns the paths written. The PNG is given up with a warning if it cannot be drawn."""
    json_path, csv_path, png_path = paths
    write_json(json_path, result)
    write_csv(csv_path, result["loss"], result["step"])
    written = [json_path, csv_path]
    env = result["environment"]
    title = f"{env['device_name']}, torch {env['torch']}, {result['mode']} run, {result['started']}"
    try:
        write_plot(png_path, result["loss"], result["step"], title)
    except ImportError as e:
        warnings.warn(f"no plot ({png_path}): matplotlib is not importable ({e}); the JSON and CSV are "
                      "written; `pip install matplotlib` for the PNG", stacklevel=2)
    except Exception as e:  # noqa: BLE001  (the measurements are saved; the picture is optional)
        warnings.warn(f"no plot ({png_path}): drawing it failed: {e!r}; the JSON and CSV are written",
                      stacklevel=2)
    else:
        written.append(png_path)
    return written


# --------------------------------------------------------------------------------------------------
# the PNG: what the tables show (speedups and peak memory), groups in IPC order 1, 10, 50
# --------------------------------------------------------------------------------------------------


def _loss_group(r):
    return f"{r['C']}x{r['H']}x{r['W']}\nIPC {r['ipc']} {r['mode']}"


def _loss_order(r):
    # larger layers first (as the table lists them), then IPC, then the mode
    return (-r["H"] * r["W"], -r["C"], r["ipc"], ("fwd", "bwd", "fwd+bwd").index(r["mode"])
            if r["mode"] in ("fwd", "bwd", "fwd+bwd") else 3)


def write_plot(path, loss_rows, step_rows, title):
    """The PNG of :func:`figure`."""
    import matplotlib.pyplot as plt

    fig = figure(loss_rows, step_rows, title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure(loss_rows, step_rows, title):
    """Speedups (top) and peak memory (bottom) of the loss table (left) and the step table (right);
    bar groups in IPC order 1, 10, 50."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss_rows = sorted((r for r in loss_rows if "median_s" in r), key=_loss_order)
    labels = [r.label for r in step_table.STEP_ROWS]
    step_rows = sorted((r for r in step_rows if "median_s" in r),
                       key=lambda r: (r["ipc"], labels.index(r["row"]) if r["row"] in labels else len(labels)))
    columns = [c for c in ("loss", "step") if {"loss": loss_rows, "step": step_rows}[c]]
    ncols = max(len(columns), 1)
    fig, axes = plt.subplots(2, ncols, figsize=(9 * ncols, 8), squeeze=False)
    for j, kind in enumerate(columns):
        top, bottom = axes[0][j], axes[1][j]
        if kind == "loss":
            _bars(top, loss_rows, group=_loss_group, series=lambda r: r["provider"],
                  value=lambda r: r.get("speedup_vs_eager"), skip=lambda r: r["provider"] == "eager",
                  fmt="%.1fx")
            top.set_ylabel("speedup vs eager reference (log)")
            top.set_yscale("log")
            top.set_title("attention loss, one layer per call")
            _bars(bottom, loss_rows, group=_loss_group, series=lambda r: r["provider"],
                  value=lambda r: _mb(r.get("peak_extra_bytes")), skip=lambda r: False,
                  fmt=lambda v: f"{v:.0f}" if v >= 100 else f"{v:.3g}")
            bottom.set_ylabel("peak extra memory, MB (log)")
            bottom.set_yscale("log")
            bottom.set_title("attention loss: peak memory above the inputs")
        else:
            group = lambda r: f"IPC {r['ipc']}"  # noqa: E731
            _bars(top, step_rows, group=group, series=lambda r: r["row"],
                  value=lambda r: r.get("speedup_vs_base"), skip=lambda r: False, fmt="%.1fx",
                  order=labels)
            top.set_ylabel(f"speedup vs {step_table.SPEEDUP_BASE}")
            top.set_title("distillation step (CIFAR-10 shapes)")
            _bars(bottom, step_rows, group=group, series=lambda r: r["row"],
                  value=lambda r: _mb(r.get("peak_bytes")), skip=lambda r: False, fmt="%.0f", order=labels)
            bottom.set_ylabel("peak memory per step, MB")
            bottom.set_title("distillation step: peak memory")
        top.axhline(1.0, color="gray", lw=0.8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def _mb(nbytes):
    return None if nbytes is None else max(nbytes / 1e6, 1e-3)  # a log axis cannot show 0


def _bars(ax, rows, group, series, value, skip, fmt, order=None):
    rows = [r for r in rows if not skip(r) and value(r) is not None]
    groups = list(dict.fromkeys(group(r) for r in rows))  # rows arrive sorted: IPC 1, 10, 50
    names = list(dict.fromkeys(series(r) for r in rows))
    if order is not None:  # a fixed legend order (the table's), whichever group a series starts in
        names.sort(key=lambda n: order.index(n) if n in order else len(order))
    width = 0.8 / max(len(names), 1)
    for j, name in enumerate(names):
        xs, ys = [], []
        for r in rows:
            if series(r) == name:
                xs.append(groups.index(group(r)) + (j - (len(names) - 1) / 2) * width)
                ys.append(value(r))
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, fmt=fmt, fontsize=7)
    ax.set_xticks(range(len(groups)), groups, fontsize=7)
    if names:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, not on them


def main(argv=None):
    """Redraw the PNG of a bench/run.py JSON file (next to it), e.g. after changing the plot."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.report", description=main.__doc__)
    p.add_argument("json", nargs="+", help="bench/run.py result files")
    for path in p.parse_args(argv).json:
        with open(path) as f:
            result = json.load(f)
        env = result["environment"]
        png = os.path.splitext(path)[0] + ".png"
        write_plot(png, result["loss"], result["step"],
                   f"{env['device_name']}, torch {env['torch']}, {result['mode']} run, {result['started']}")
        print(f"wrote {png}")


if __name__ == "__main__":
    main()
