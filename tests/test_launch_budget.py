"""The launch budget (bench/launch_budget.py) holds: the ATen ops a loss call and a fused step
dispatch stay at or below what docs/benchmarks.md reports, so an added per-call op shows here."""

import torch

from bench import launch_budget


def test_loss_paths_stay_within_their_op_counts():
    rows = {(r["backend"], r["path"]): r["ops_per_layer"]
            for r in launch_budget.loss_counts(["native"])}
    assert rows["native", "features"] <= 4
    assert rows["native", "statistics"] <= 6
    assert rows["native", "from-sums"] <= 4.5
    assert rows["native", "statistics+from-sums"] <= 10.5


def test_triton_loss_paths_stay_within_their_op_counts():
    # a launcher counts once; its own allocations are torch.empty (no kernel)
    rows = {(r["backend"], r["path"]): (r["ops_per_layer"], r["by_op"])
            for r in launch_budget.loss_counts(["triton"])}
    assert rows["triton", "features"][0] <= 7.5
    assert rows["triton", "statistics"][0] <= 7
    assert rows["triton", "from-sums"][0] <= 7.5
    assert rows["triton", "statistics+from-sums"][0] <= 14.5
    # no scalar fills per call: the loss scalars are made once and reused
    assert all("fill_" not in by_op for _, by_op in rows.values()), rows


def test_a_fused_step_with_the_triton_backend_on_meta():
    (row,) = launch_budget.step_counts([("fused K=10 IPC 1", 10, 1, "fused")], "meta", "triton")
    assert "error" not in row and row["backend"] == "triton" and row["ops"] <= 395, row


def test_a_fused_step_stays_within_its_op_count():
    (row,) = launch_budget.step_counts([("fused K=10 IPC 1", 10, 1, "fused")], "meta")
    # on meta: a read of device memory would have raised (the row would hold the error)
    assert "error" not in row and row["ops"] <= 387, row
    assert row["real_chunks"] == 1 and row["device_ops"] < row["ops"] - row["views"], row


def test_the_counter_counts():
    counter = launch_budget.OpCounter()
    with counter:
        torch.ones(3).add(1).sum()
        torch.ones(2, 3, device="meta").view(3, 2).mul(2)
    assert counter.ops == {"ones": 2, "add": 1, "sum": 1, "view": 1, "mul": 1}
    assert counter.total == 6 and counter.views == 1
    assert counter.device_work == {"ones": 1, "mul": 1}
