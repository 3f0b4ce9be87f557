"""The fused backends (Triton kernels, native C++/CUDA op) against the float64 reference: values
and gradients, one test matrix for both (the ``backend`` fixture).

On a machine without CUDA, Triton runs under TRITON_INTERPRET=1 (see conftest.py), so shapes stay
small; the realistic cases use 10 classes x 128 real samples at a small channel count. Tests of one
backend's internals are in test_triton_kernels.py and test_native.py.
"""

import pytest
import torch

import atom_fast
from _data import class_labels, make_layers
from conftest import DEVICE

# (dtype, loss rtol, gradient rtol) against the float64 reference computed from the same (rounded)
# inputs. fp32 accumulates in fp32; half types also accumulate in fp32 but round the gradient to
# their format (fp16: 11 significant bits, bf16: 8).
FP32 = (torch.float32, 2e-5, 2e-5)
DTYPE_ROWS = [
    pytest.param(torch.float64, 1e-10, 1e-10, id="fp64"),
    pytest.param(*FP32, id="fp32"),
    pytest.param(torch.float16, 2e-5, 2e-3, id="fp16"),
    pytest.param(torch.bfloat16, 2e-5, 1e-2, id="bf16"),
]


@pytest.fixture(params=["triton", pytest.param("native", marks=pytest.mark.default_threads)])
def backend(request):
    """Each fused backend; the native op must be built (tests fail, never skip, when it is not). The
    native op's OpenMP loops run with torch's default thread count (conftest.py: one thread elsewhere)."""
    return request.param


def _loss(reals, syns, layout, backend, **kw):
    K, rl, sl = layout
    if rl is None:
        return atom_fast.attention_loss(reals, syns, K, backend=backend, **kw)
    return atom_fast.attention_loss(reals, syns, real_labels=rl, syn_labels=sl, backend=backend, **kw)


def _check_once(backend, shapes, K, B, IPC, ps=4.0, pc=4.0, ws=1.0, wc=1.0, dtype_tols=FP32,
                labels=False, real_grad=False, upstream=None):
    """The fused loss and gradients equal the float64 reference on the same inputs, within dtype tolerance."""
    dtype, loss_tol, grad_tol = dtype_tols
    reals, syns = make_layers(shapes, K * B, K * IPC, dtype, DEVICE)
    layout = (K, None, None)
    if labels:
        layout = (None, class_labels(K, B, True).to(DEVICE), class_labels(K, IPC, True).to(DEVICE))
    kw = dict(spatial_power=ps, channel_power=pc, spatial_weight=ws, channel_weight=wc)

    reals = [r.requires_grad_(real_grad) for r in reals]
    syns = [s.requires_grad_() for s in syns]
    loss = _loss(reals, syns, layout, backend, **kw)
    grad_out = torch.tensor(1.0 if upstream is None else upstream, device=DEVICE, dtype=loss.dtype)
    inputs = syns + (reals if real_grad else [])
    grads = torch.autograd.grad(loss, inputs, grad_out)

    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref_reals = ref_inputs[len(syns):] if real_grad else [r.detach().double() for r in reals]
    ref_loss = _loss(ref_reals, ref_inputs[:len(syns)], layout, "reference", **kw)
    ref_grads = torch.autograd.grad(ref_loss, ref_inputs, grad_out.double())

    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert ref_loss.item() > 1e-4, "degenerate case: the loss is ~0"
    torch.testing.assert_close(loss.double(), ref_loss, rtol=loss_tol, atol=0)
    for g, ref in zip(grads, ref_grads):
        assert g.dtype == dtype and g.shape == ref.shape
        assert ref.abs().max() > 0
        torch.testing.assert_close(g.double(), ref, rtol=grad_tol, atol=grad_tol * ref.abs().max().item())
    return loss, grads


# ---- realistic: 10 classes x 128 real images, IPC 1/10/50, small channel count -----------------
# The native op runs every case. Interpreted Triton spends ~25 ms per sample in the statistics kernel
# alone, so it runs the IPC 10 layout only (marked slow); what the other realistic cases add for it,
# class member loops over several full blocks and a partial one, is the test after these two.


def _native(*values):
    return pytest.param("native", *values, marks=pytest.mark.default_threads)


@pytest.mark.parametrize("backend,ipc", [_native(1), _native(10), _native(50),
                                         pytest.param("triton", 10, marks=pytest.mark.slow)])
def test_realistic_class_layout(backend, ipc):
    _check_once(backend, [(4, 8, 8)], K=10, B=128, IPC=ipc)


@pytest.mark.parametrize("backend", [_native()])
def test_realistic_with_real_grad_and_labels(backend):
    _check_once(backend, [(3, 6, 6)], K=10, B=128, IPC=10, labels=True, real_grad=True, upstream=0.37)


@pytest.mark.parametrize("labels,real_grad", [(False, False), (True, True)])
def test_class_member_blocks_at_the_default_size(backend, labels, real_grad):
    # The kernels' own block sizes (nothing monkeypatched): each real class is 2 full blocks of members
    # and a partial one, each synthetic class a full block and a partial one; the two layouts and the
    # real side's gradient of the realistic cases above.
    block = 16
    if backend == "triton":
        import atom_fast.kernels.attention as kernels

        C, H, W = ODD[0]
        vector = max(kernels._vector_block(H * W), kernels._vector_block(C))
        assert min(kernels.BLOCK_MEMBERS, kernels.CLASS_TILE_BYTES // 4 // vector) == block  # as launched
    _check_once(backend, ODD, K=2, B=2 * block + 1, IPC=block + 1, ps=2.5, pc=4, labels=labels,
                real_grad=real_grad, upstream=0.37)


# ---- odd shapes and the parameter matrix ---------------------------------------------------------

ODD = [(7, 5, 3)]  # C not a power of two, H != W


@pytest.mark.parametrize("ps,pc", [(4, 4), (1, 1), (2, 2), (8, 8), (2.5, 2.5), (1, 8), (8, 2.5), (2.5, 1),
                                   (2, 4)])
def test_powers(backend, ps, pc):
    _check_once(backend, ODD, K=3, B=4, IPC=2, ps=ps, pc=pc)


@pytest.mark.parametrize("ws,wc", [(1, 1), (0, 1), (1, 0), (0.3, 2.5)])
def test_weights(backend, ws, wc):
    _check_once(backend, ODD, K=3, B=4, IPC=2, ps=2, pc=4, ws=ws, wc=wc)


@pytest.mark.parametrize("dtype,loss_tol,grad_tol", DTYPE_ROWS)
@pytest.mark.parametrize("ps,pc", [(4, 4), (1, 8), (2.5, 2)])
def test_dtypes(backend, dtype, loss_tol, grad_tol, ps, pc):
    _check_once(backend, ODD, K=3, B=4, IPC=2, ps=ps, pc=pc, dtype_tols=(dtype, loss_tol, grad_tol))


def test_ipc1_unsorted_scattered_labels_real_grad_upstream(backend):
    _check_once(backend, ODD, K=4, B=5, IPC=1, ps=4, pc=8, labels=True, real_grad=True, upstream=-2.5)


@pytest.mark.parametrize("num_classes", [None, 2])
def test_labels_with_strides(backend, num_classes):
    # Labels that are views (a column of a matrix, an expanded scalar) must be read by value.
    K, B, IPC = 2, 3, 2
    reals, syns = make_layers(ODD, K * B, K * IPC, torch.float32, DEVICE)
    table = torch.tensor([[0, 7], [1, 7], [0, 7], [1, 7], [0, 7], [1, 7]], device=DEVICE)
    rl = table[:, 0]
    sl = torch.tensor([[1, 7], [0, 7], [0, 7], [1, 7]], device=DEVICE)[:, 0]
    assert not rl.is_contiguous() and not sl.is_contiguous()
    syn = syns[0].requires_grad_()
    grads = {}
    for name in ("reference", backend):
        loss = atom_fast.attention_loss(reals, [syn], num_classes, real_labels=rl, syn_labels=sl,
                                        backend=name)
        grads[name] = (loss, *torch.autograd.grad(loss, syn))
    for a, b in zip(grads[backend], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    one_class = torch.zeros((), dtype=torch.long, device=DEVICE)
    loss = atom_fast.attention_loss(reals, [syn], num_classes, real_labels=one_class.expand(K * B),
                                    syn_labels=one_class.expand(K * IPC), backend=backend)
    (g,) = torch.autograd.grad(loss, syn)
    assert torch.isfinite(g).all()


def test_multiple_layers(backend):
    # ConvNet-like depth 3 at small width: each block halves H and W.
    _check_once(backend, [(6, 8, 8), (6, 4, 4), (6, 2, 2)], K=3, B=4, IPC=2, ps=1, pc=8, real_grad=True)


def test_single_pixel_and_single_channel(backend):
    _check_once(backend, [(1, 3, 2), (5, 1, 1)], K=2, B=3, IPC=2, ps=2, pc=3, real_grad=True)


def test_tiny_norm_takes_the_eps_branch(backend):
    # |F| ~ 1e-5 with p = 4: ||s|| ~ 1e-19 < eps, where normalize divides by eps, not by the norm.
    K, B, IPC = 2, 3, 2
    reals, syns = make_layers([(3, 2, 2)], K * B, K * IPC, torch.float64, DEVICE)
    syns[0][0] *= 1e-5
    s = syns[0].requires_grad_()
    loss = atom_fast.attention_loss(reals, [s], K, backend=backend)
    (g,) = torch.autograd.grad(loss, s)
    s_ref = syns[0].detach().clone().requires_grad_()
    ref = atom_fast.attention_loss(reals, [s_ref], K, backend="reference")
    (g_ref,) = torch.autograd.grad(ref, s_ref)
    assert atom_fast.spatial_attention(syns[0][:1].detach(), 4).abs().max() < 1  # really below eps
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10 * g_ref.abs().max().item())


# ---- autograd behaviour ---------------------------------------------------------------------------


def test_deterministic_bitwise(backend):
    reals, syns = make_layers([(5, 4, 4), (5, 2, 2)], 12, 6, torch.float32, DEVICE)
    runs = []
    for _ in range(2):
        r = [t.detach().clone().requires_grad_() for t in reals]
        s = [t.detach().clone().requires_grad_() for t in syns]
        loss = atom_fast.attention_loss(r, s, 3, spatial_power=2.5, channel_power=8, backend=backend)
        runs.append((loss, torch.autograd.grad(loss, r + s)))
    (l0, g0), (l1, g1) = runs
    assert torch.equal(l0, l1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))


def test_no_grad_forward_only(backend):
    reals, syns = make_layers(ODD, 6, 3, torch.float32, DEVICE)
    syn = syns[0].requires_grad_()
    with torch.no_grad():
        loss = atom_fast.attention_loss(reals, [syn], 3, backend=backend)
    assert not loss.requires_grad
    ref = atom_fast.attention_loss(reals, [syn.detach()], 3, backend="reference")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy, inside the interpreter
def test_nan_and_inf_features_give_nan_loss(backend):
    for bad in (float("nan"), float("inf")):
        reals, syns = make_layers(ODD, 6, 3, torch.float32, DEVICE)
        syns[0][1, 2, 0, 0] = bad
        s = syns[0].requires_grad_()
        loss = atom_fast.attention_loss(reals, [s], 3, backend=backend)
        loss.backward()
        assert torch.isnan(loss)
        assert torch.isnan(atom_fast.attention_loss(reals, [s.detach()], 3, backend="reference"))


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.slow), _native()])
def test_float64_gradcheck_of_the_fused_backward(backend):  # Triton: 144 interpreted forward passes
    K, B, IPC = 2, 2, 1
    reals, syns = make_layers([(2, 2, 3)], K * B, K * IPC, torch.float64, DEVICE, real_relu=False)
    r, s = reals[0].requires_grad_(), syns[0].requires_grad_()
    assert torch.autograd.gradcheck(
        lambda r, s: atom_fast.attention_loss(r, s, K, spatial_power=3, channel_power=2.5,
                                              spatial_weight=0.5, backend=backend), (r, s))


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a GPU with > 4 GiB free")
def test_int64_offsets_beyond_2_31_elements(backend):
    # 2^31 + one sample of fp16 features: the last sample starts past 2^31 elements.
    C, H, W = 64, 32, 32
    n_real = (2**31) // (C * H * W) + 2
    real = torch.rand(n_real, C, H, W, device=DEVICE, dtype=torch.float16)
    syn = torch.rand(2, C, H, W, device=DEVICE, dtype=torch.float16, requires_grad=True)
    loss = atom_fast.attention_loss(real, syn, 2, backend=backend)
    ref = atom_fast.attention_loss(real, syn, 2, backend="reference")
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=0)


def test_saves_only_small_per_sample_statistics(backend):
    # Saved for backward: the features of the sides that need a gradient (never the real features
    # computed without grad, which would stay alive until backward), per-sample vectors
    # (N*(H*W + C)), norms and class differences: no full-size |F|^p temporaries.
    K, B, IPC, (C, H, W) = 3, 4, 2, (8, 4, 4)
    reals, syns = make_layers([(C, H, W)], K * B, K * IPC, torch.float32, DEVICE)
    syn = syns[0].requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = atom_fast.attention_loss(reals, [syn], K, backend=backend)
    big = [t for t in saved if t.numel() >= syn.numel()]
    assert [t.data_ptr() for t in big] == [syn.data_ptr()]
    extra = sum(t.numel() for t in saved if t.data_ptr() != syn.data_ptr())
    per_side = lambda n: n * (H * W + C + 2)  # noqa: E731
    assert extra <= per_side(K * B) + per_side(K * IPC) + 2 * K * (H * W + C) + 2 * (K + 1)
    loss.backward()
