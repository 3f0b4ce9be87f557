"""The native op (csrc/, atom_fast._C) beyond the shared value/gradient matrix of test_fused.py:
torch.library contracts (opcheck, fake kernels, torch.compile), argument checks inside the op,
determinism across thread counts, both CPU instruction sets, and the fallback when it is not built."""

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import atom_fast
from atom_fast import backends as loss_module
from atom_fast.backends import native as _native
from _data import class_labels, make_layers
from conftest import CPU_ISAS, DEVICE, use_cpu_isa
from test_fused import ODD, _check_once

ops = torch.ops.atom_fast
# the op's OpenMP loops run with torch's default thread count here (conftest.py: one thread elsewhere)
pytestmark = pytest.mark.default_threads


def test_the_extension_is_built():
    # CI builds it (scripts/install.sh); a silent pure-Python install would skip every native test.
    assert _native.AVAILABLE, f"atom_fast._C did not load: {_native.LOAD_ERROR}"
    assert _native.cpu_isa() in CPU_ISAS


def _op_args(dtype, labels=False, ws=1.0, wc=1.0, ps=4.0, pc=4.0, C=5, H=3, W=4, K=3, B=4, IPC=2):
    reals, syns = make_layers([(C, H, W)], K * B, K * IPC, dtype, DEVICE)
    layout = atom_fast.layout.class_layout(
        K * B, K * IPC, K if not labels else None,
        class_labels(K, B, True).to(DEVICE) if labels else None,
        class_labels(K, IPC, True).to(DEVICE) if labels else None, DEVICE)
    ro, so, rord, sord = _native.layout_arguments(layout, DEVICE)
    return reals[0], syns[0], ro, so, rord, sord, ps, pc, ws, wc


OPCHECK_CASES = [
    dict(dtype=torch.float32),
    dict(dtype=torch.float64, labels=True, ps=2.5, pc=8.0),
    dict(dtype=torch.float32, ws=0.0),
    dict(dtype=torch.float64, wc=0.0, ps=1.0),
    dict(dtype=torch.bfloat16, labels=True),
    dict(dtype=torch.float16, ps=3.0, pc=0.5),
]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_opcheck_forward_and_backward(case):
    real, syn, ro, so, rord, sord, ps, pc, ws, wc = _op_args(**case)
    syn.requires_grad_()
    real.requires_grad_(case["dtype"] == torch.float64)
    torch.library.opcheck(ops.attention_forward.default, (real, syn, ro, so, rord, sord, ps, pc, ws, wc))
    _, _, syn_stats, diffs = ops.attention_forward(real, syn, ro, so, rord, sord, ps, pc, ws, wc)
    grad = torch.tensor(0.7, dtype=diffs.dtype, device=DEVICE)
    torch.library.opcheck(ops.attention_backward.default,
                          (grad, syn.detach(), syn_stats, diffs, so, sord, -1.0, ps, pc, ws, wc))


def test_statistics_are_what_the_schema_says():
    real, syn, ro, so, rord, sord, *params = _op_args(torch.float64, ps=2.0, pc=3.0)
    loss, real_stats, syn_stats, diffs = ops.attention_forward(real, syn, ro, so, rord, sord, *params)
    HW, C = real.shape[2] * real.shape[3], real.shape[1]
    s = real.pow(2).sum(1).flatten(1)
    t = real.abs().pow(3).flatten(2).sum(2)
    # [s' | t' | m | ||s'|| | ||t'||]: the attention of F / m, m = max |F[n]|
    m = real.abs().flatten(1).amax(1)
    torch.testing.assert_close(real_stats[:, HW + C], m, rtol=0, atol=0)
    torch.testing.assert_close(real_stats[:, :HW] * m[:, None] ** 2, s)
    torch.testing.assert_close(real_stats[:, HW:HW + C] * m[:, None] ** 3, t)
    torch.testing.assert_close(real_stats[:, -2] * m ** 2, s.norm(dim=1))
    torch.testing.assert_close(real_stats[:, -1] * m ** 3, t.norm(dim=1))
    assert diffs.shape == (3, HW + C) and loss.shape == ()
    torch.testing.assert_close(loss, diffs.pow(2).sum())


def test_torch_compile_fullgraph():
    K, B, IPC = 3, 4, 2
    reals, syns = make_layers([(6, 4, 4), (6, 2, 2)], K * B, K * IPC, torch.float32, DEVICE)

    def step(reals, syns):
        return 100 * atom_fast.attention_loss(reals, syns, K, spatial_power=4, channel_power=8,
                                              backend="native")

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (compiled, step):
        s = [t.detach().clone().requires_grad_() for t in syns]
        loss = fn(reals, s)
        results.append((loss, *torch.autograd.grad(loss, s)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_torch_compile_dynamic_shapes():
    K = 2
    step = lambda r, s: atom_fast.attention_loss(r, s, K, backend="native")  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for n_real, hw in ((8, 4), (6, 3)):
        reals, syns = make_layers([(3, hw, hw)], n_real, 4, torch.float32, DEVICE)
        s = syns[0].requires_grad_()
        loss = compiled(reals[0], s)
        (g,) = torch.autograd.grad(loss, s)
        s2 = syns[0].detach().clone().requires_grad_()
        want = step(reals[0], s2)
        torch.testing.assert_close(loss, want)
        torch.testing.assert_close(g, torch.autograd.grad(want, s2)[0])


def test_double_backward_raises():
    reals, syns = make_layers(ODD, 6, 3, torch.float64, DEVICE)
    s = syns[0].requires_grad_()
    loss = atom_fast.attention_loss(reals, [s], 3, backend="native")
    (g,) = torch.autograd.grad(loss, s, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(g.sum(), s)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((str(func.overloadpacket), args[1].shape[0] if "backward" in str(func) else None))
        return func(*args, **(kwargs or {}))


def test_no_gradient_work_for_the_real_side():
    reals, syns = make_layers(ODD, 9, 3, torch.float32, DEVICE)
    syn = syns[0].requires_grad_()
    loss = atom_fast.attention_loss(reals, [syn], 3, backend="native")
    with _CountOps() as mode:
        loss.backward()
    backward_calls = [n for name, n in mode.calls if name == "atom_fast.attention_backward"]
    assert backward_calls == [3]  # only the synthetic batch went through the backward pass
    assert reals[0].grad is None and syn.grad is not None


def test_bitwise_equal_across_thread_counts():
    reals, syns = make_layers([(16, 8, 8)], 64, 16, torch.float32, DEVICE)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            s = syns[0].detach().clone().requires_grad_()
            loss = atom_fast.attention_loss(reals, [s], 4, spatial_power=2.5, backend="native")
            runs.append((loss, *torch.autograd.grad(loss, s)))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


@pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU instruction sets")
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("ps,pc", [(4, 4), (1, 8), (2.5, 12), (3.7, 3.7), (0.7, 5.3), (3.7, 4), (4, 3.7)])
def test_every_cpu_instruction_set(monkeypatch, isa, ps, pc):
    use_cpu_isa(monkeypatch, isa)
    for dtype_tols in ((torch.float32, 2e-5, 2e-5), (torch.float64, 1e-10, 1e-10)):
        _check_once("native", ODD, K=3, B=4, IPC=2, ps=ps, pc=pc, dtype_tols=dtype_tols)


@pytest.mark.parametrize("ps,pc", [(4, 4), (1, 8)])
def test_realistic_layer_in_float32(ps, pc):
    # The bench shape's class structure at a smaller width: 10 classes x 128 real, IPC 10.
    _check_once("native", [(32, 16, 16), (32, 8, 8)], K=10, B=128, IPC=10, ps=ps, pc=pc,
                labels=True, real_grad=True, upstream=0.3)


def test_layouts_in_memory():
    # channels_last and batch slices give the same result as contiguous features.
    reals, syns = make_layers([(6, 5, 4)], 12, 6, torch.float32, DEVICE)
    want = atom_fast.attention_loss(reals, syns, 3, backend="native")
    cl = [t.to(memory_format=torch.channels_last) for t in reals]
    assert not cl[0].is_contiguous()
    torch.testing.assert_close(atom_fast.attention_loss(cl, syns, 3, backend="native"), want)
    big = torch.cat([reals[0], reals[0]])
    torch.testing.assert_close(atom_fast.attention_loss(big[12:], syns, 3, backend="native"), want)
    # every other sample of a batch: read in place with its batch stride (no copy), same result
    wide = torch.stack([reals[0], torch.full_like(reals[0], float("nan"))], 1).flatten(0, 1)
    strided = wide[::2]
    assert strided.stride(0) == 2 * strided[0].numel()
    s = syns[0].detach().requires_grad_()
    s_wide = torch.stack([s, s], 1).flatten(0, 1)[::2]
    got = atom_fast.attention_loss(strided, s_wide, 3, backend="native")
    torch.testing.assert_close(got, want)
    (g,) = torch.autograd.grad(got, s)
    s_ref = syns[0].detach().requires_grad_()
    (g_ref,) = torch.autograd.grad(atom_fast.attention_loss(reals, s_ref, 3, backend="reference"), s_ref)
    torch.testing.assert_close(g, g_ref)


def _raises(match, op, *args):
    with pytest.raises(RuntimeError, match=match):
        op(*args)


def test_the_op_checks_its_own_arguments():
    real, syn, ro, so, rord, sord, *params = _op_args(torch.float32)
    fwd = ops.attention_forward
    _raises(r"real must be 4-D", fwd, real[0], syn, ro, so, None, None, *params)
    _raises(r"syn has \(C, H, W\)", fwd, real, syn[:, :2], ro, so, None, None, *params)
    with pytest.raises(TypeError, match=r"real_offsets must be int64, got Int"):
        fwd(real, syn, ro.int(), so, None, None, *params)
    _raises(r"real_offsets has 4 entries but syn_offsets has 3", fwd, real, syn, ro, so[:3], None, None, *params)
    _raises(r"real_offsets must start at 0 and end at N = 12", fwd, real, syn, ro + 1, so, None, None,
            *params)
    bad = ro.clone()
    bad[1], bad[2] = 9, 5
    _raises(r"real_offsets must be non-decreasing", fwd, real, syn, bad, so, None, None, *params)
    order = torch.arange(12, device=DEVICE)
    order[3] = 4
    _raises(r"real_order must be a permutation of 0..11, entry 4 is 4", fwd, real, syn, ro, so,
            order, None, *params)
    _raises(r"syn_order must have shape \(6,\)", fwd, real, syn, ro, so, None, order, *params)
    uneven = torch.tensor([0, 6, 6, 12], device=DEVICE)
    _raises(r"class 1 has synthetic samples but no real ones", fwd, real, syn, uneven, so, None, None,
            *params)
    if DEVICE.type == "cpu":
        with pytest.raises(RuntimeError, match=r"syn_offsets is on meta but real is on cpu"):
            fwd(real, syn, ro, so.to("meta"), None, None, *params)
    _raises(r"channel_power must be finite and positive", fwd, real, syn, ro, so, None, None,
            4.0, -1.0, 1.0, 1.0)
    _raises(r"spatial_weight must be finite and non-negative", fwd, real, syn, ro, so, None, None,
            4.0, 4.0, float("nan"), 1.0)
    with pytest.raises(TypeError, match=r"syn has dtype Double but real has Float"):
        fwd(real, syn.double(), ro, so, None, None, *params)
    _, _, syn_stats, diffs = fwd(real, syn, ro, so, None, None, *params)
    bwd = ops.attention_backward
    g = torch.tensor(1.0, device=DEVICE)
    _raises(r"sign must be \+1 \(real\) or -1 \(syn\)", bwd, g, syn, syn_stats, diffs, so, None, 0.5,
            *params)
    _raises(r"stats must have shape \(6, 20\)", bwd, g, syn, syn_stats[:, 1:], diffs, so, None,
            -1.0, *params)
    _raises(r"diffs must have shape \(3, 17\)", bwd, g, syn, syn_stats, diffs[:2], so, None, -1.0,
            *params)
    with pytest.raises(TypeError, match=r"grad_loss must be Float"):
        bwd(g.double(), syn, syn_stats, diffs, so, None, -1.0, *params)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU instruction sets")
def test_bad_isa_setting(monkeypatch):
    monkeypatch.setenv("ATOM_FAST_CPU_ISA", "avx10")
    reals, syns = make_layers(ODD, 6, 3, torch.float32, DEVICE)
    with pytest.raises(RuntimeError, match=r"ATOM_FAST_CPU_ISA must be 'default', 'avx2' or 'avx512'"):
        atom_fast.attention_loss(reals, syns, 3, backend="native")
    # the module function raises too (a C++ exception escaping it would abort the interpreter)
    with pytest.raises(RuntimeError, match=r"ATOM_FAST_CPU_ISA must be 'default', 'avx2' or 'avx512'"):
        _native.cpu_isa()


@pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU row prefetch")
def test_prefetch_setting_changes_no_value(monkeypatch):
    # ATOM_FAST_CPU_PREFETCH picks which rows are prefetched (a hint to the memory system): the
    # loss and its gradient are bitwise the same under every setting, at a map shorter than a page
    # (5x6) and at one of a page or more (33x32)
    for shapes in ([(8, 5, 6)], [(6, 33, 32)]):
        got = []
        for setting in ("none", "rows", "all"):
            monkeypatch.setenv("ATOM_FAST_CPU_PREFETCH", setting)
            torch.manual_seed(3)
            reals, syns = make_layers(shapes, 6, 3, torch.float32, DEVICE)
            syns = [s.requires_grad_() for s in syns]
            loss = atom_fast.attention_loss(reals, syns, 3, backend="native")
            loss.backward()
            got.append((loss.detach(), syns[0].grad))
        for other in got[1:]:
            assert torch.equal(got[0][0], other[0]) and torch.equal(got[0][1], other[1])
    monkeypatch.setenv("ATOM_FAST_CPU_PREFETCH", "some")
    reals, syns = make_layers(ODD, 6, 3, torch.float32, DEVICE)
    with pytest.raises(RuntimeError, match=r"ATOM_FAST_CPU_PREFETCH must be 'none', 'rows' or 'all'"):
        atom_fast.attention_loss(reals, syns, 3, backend="native")


def test_auto_prefers_native_on_cpu(monkeypatch):
    monkeypatch.delenv(loss_module.BACKEND_ENV, raising=False)
    assert loss_module.resolve_backend("auto", torch.device("cpu")) == "native"


def test_not_built_error_and_single_fallback_warning(monkeypatch):
    monkeypatch.setattr(_native, "AVAILABLE", False)
    monkeypatch.setattr(_native, "LOAD_ERROR", "atom_fast._C was not built")
    monkeypatch.setattr(loss_module, "_FALLBACK_WARNED", False)
    monkeypatch.delenv(loss_module.BACKEND_ENV, raising=False)
    r, s = make_layers(ODD, 6, 3, torch.float32, torch.device("cpu"))
    with pytest.raises(RuntimeError, match=r"^backend='native': the native C\+\+ op \(atom_fast._C\) "
                                           r"is not built \(atom_fast._C was not built\)"):
        atom_fast.attention_loss(r, s, 3, backend="native")
    with pytest.warns(RuntimeWarning, match="falls back to the slower reference"):
        got = atom_fast.attention_loss(r, s, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        atom_fast.attention_loss(r, s, 3)  # warned once only
    torch.testing.assert_close(got, atom_fast.attention_loss(r, s, 3, backend="reference"))
