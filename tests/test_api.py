"""Public API: argument checks (every bad input docs/loss.md lists), backend choice, dtypes, the module."""

import pytest
import torch

import atom_fast
from atom_fast.backends import BACKEND_ENV, resolve_backend
from _data import make_layers
from conftest import DEVICE


def _batch(K=3, B=4, IPC=2, C=5, H=4, W=3, dtype=torch.float32, device="cpu"):
    reals, syns = make_layers([(C, H, W)], K * B, K * IPC, dtype, device)
    return reals[0], syns[0]


def _raises(exc, match, *args, **kwargs):
    with pytest.raises(exc, match=match):
        atom_fast.attention_loss(*args, backend="reference", **kwargs)


# ---- bad input ------------------------------------------------------------------------------------


def test_wrong_ndim():
    r, s = _batch()
    _raises(ValueError, r"^real must be 4-D", r[0], s, 3)
    _raises(ValueError, r"^syn must be 4-D", r, s.flatten(2), 3)
    _raises(ValueError, r"^syn\[1\] must be 4-D", [r, r], [s, s[0]], 3)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_chw_differ_between_real_and_syn(dim):
    r, s = _batch()
    s = s.narrow(dim, 0, s.shape[dim] - 1)
    _raises(ValueError, r"^syn has \(C, H, W\)", r, s, 3)


def test_n_not_divisible_by_num_classes():
    r, s = _batch(K=3, B=4, IPC=2)
    _raises(ValueError, r"^real has 11 samples, not divisible by num_classes=3", r[:11], s, 3)
    _raises(ValueError, r"^syn has 5 samples, not divisible by num_classes=3", r, s[:5], 3)


def test_num_classes_missing_or_wrong_type():
    r, s = _batch()
    _raises(ValueError, r"^num_classes is required", r, s)
    _raises(TypeError, r"^num_classes must be an int", r, s, 3.0)
    _raises(TypeError, r"^num_classes must be an int", r, s, True)
    _raises(ValueError, r"^num_classes must be at least 1", r, s, 0)


def _labels(K=3, B=4, IPC=2):
    return torch.arange(K).repeat_interleave(B), torch.arange(K).repeat_interleave(IPC)


def test_labels_out_of_range():
    r, s = _batch()
    rl, sl = _labels()
    _raises(ValueError, r"^real_labels holds -1", r, s, real_labels=rl - 1, syn_labels=sl)
    _raises(ValueError, r"^syn_labels holds 3, out of range for num_classes=3", r, s, 3,
            real_labels=rl, syn_labels=sl + 1)


def test_labels_wrong_length_dtype_or_type():
    r, s = _batch()
    rl, sl = _labels()
    _raises(ValueError, r"^real_labels must have shape \(12,\)", r, s, real_labels=rl[:-1], syn_labels=sl)
    _raises(ValueError, r"^syn_labels must have shape \(6,\)", r, s, real_labels=rl, syn_labels=sl[None])
    _raises(TypeError, r"^syn_labels must be int64", r, s, real_labels=rl, syn_labels=sl.int())
    _raises(TypeError, r"^real_labels must be int64", r, s, real_labels=rl.float(), syn_labels=sl)
    _raises(TypeError, r"^real_labels must be a torch.Tensor", r, s, real_labels=rl.tolist(),
            syn_labels=sl)
    _raises(ValueError, r"^syn_labels is missing", r, s, real_labels=rl)
    _raises(ValueError, r"^real_labels is missing", r, s, 3, syn_labels=sl)


def test_class_present_on_one_side_only():
    r, s = _batch()
    rl, sl = _labels()
    _raises(ValueError, r"^syn_labels has no sample of class 2", r, s, real_labels=rl,
            syn_labels=sl.clamp(max=1))
    _raises(ValueError, r"^real_labels has no sample of class 0", r, s, real_labels=rl.clamp(min=1),
            syn_labels=sl)


@pytest.mark.parametrize("name", ["spatial_power", "channel_power"])
@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), -float("inf")])
def test_non_finite_or_non_positive_powers(name, value):
    r, s = _batch()
    _raises(ValueError, rf"^{name} must be finite and positive", r, s, 3, **{name: value})


@pytest.mark.parametrize("name", ["spatial_power", "channel_weight"])
@pytest.mark.parametrize("value", ["4", None, True, torch.tensor(4.0)])
def test_powers_and_weights_must_be_numbers(name, value):
    r, s = _batch()
    _raises(TypeError, rf"^{name} must be a real number", r, s, 3, **{name: value})


@pytest.mark.parametrize("name", ["spatial_weight", "channel_weight"])
@pytest.mark.parametrize("value", [-0.5, float("nan"), float("inf")])
def test_bad_weights(name, value):
    r, s = _batch()
    _raises(ValueError, rf"^{name} must be finite and non-negative", r, s, 3, **{name: value})


def test_devices_differ():
    r, s = _batch()
    _raises(ValueError, r"^syn is on meta but real is on cpu", r, s.to("meta"), 3)
    rl, sl = _labels()
    _raises(ValueError, r"^syn_labels is on meta", r, s, real_labels=rl, syn_labels=sl.to("meta"))


def test_empty_feature_dimensions():
    r, s = _batch()
    _raises(ValueError, r"^real has an empty \(C, H, W\) = \(5, 0, 3\)", r[:, :, :0], s[:, :, :0], 3)


def test_layer_counts_differ_or_empty():
    r, s = _batch()
    _raises(ValueError, r"^real has 2 layers but syn has 1", [r, r], [s], 3)
    _raises(ValueError, r"^real has 1 layers but syn has 2", r, (s, s), 3)
    _raises(ValueError, r"^real is an empty sequence", [], [], 3)
    _raises(ValueError, r"^syn\[1\] has 3 samples but layer 0 has 6", [r, r], [s, s[:3]], 3)
    _raises(ValueError, r"^real has no samples", r[:0], s, 3)


def test_wrong_types_and_dtypes():
    r, s = _batch()
    _raises(TypeError, r"^real must be a torch.Tensor or a sequence", r.numpy(), s, 3)
    _raises(TypeError, r"^syn\[0\] must be a torch.Tensor", [r], [s.numpy()], 3)
    _raises(TypeError, r"^real must be float32, float16, bfloat16 or float64, got torch.int64", r.long(),
            s.long(), 3)
    _raises(TypeError, r"^syn must be float32, float16, bfloat16 or float64, got torch.float8_e4m3fn",
            r, s.to(torch.float8_e4m3fn), 3)
    _raises(TypeError, r"^real must be a dense \(strided\) tensor", r.to_sparse(), s, 3)
    _raises(TypeError, r"^syn has dtype torch.float64 but real has torch.float32", r, s.double(), 3)


def test_bad_backend_and_environment(monkeypatch):
    r, s = _batch()
    with pytest.raises(ValueError, match=r"^backend must be one of"):
        atom_fast.attention_loss(r, s, 3, backend="cuda")
    with pytest.raises(TypeError, match=r"^backend must be a str"):
        atom_fast.attention_loss(r, s, 3, backend=None)
    monkeypatch.setenv(BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match=rf"^environment variable {BACKEND_ENV} must be one of"):
        atom_fast.attention_loss(r, s, 3)


def test_mmd_and_attention_vector_checks():
    e = torch.randn(6, 8)
    with pytest.raises(ValueError, match=r"^syn_emb has per-sample shape"):
        atom_fast.mmd_loss(e, torch.randn(3, 7), 3)
    with pytest.raises(ValueError, match=r"^real_emb must be \(N, ...\)"):
        atom_fast.mmd_loss(e[0], e, 3)
    with pytest.raises(TypeError, match=r"^syn_emb must be a torch.Tensor"):
        atom_fast.mmd_loss(e, [1.0], 3)
    with pytest.raises(ValueError, match=r"^real_emb has 6 samples, not divisible by num_classes=4"):
        atom_fast.mmd_loss(e, e, 4)
    with pytest.raises(TypeError, match=r"^syn_emb has dtype torch.float64"):
        atom_fast.mmd_loss(e, e.double(), 3)
    with pytest.raises(ValueError, match=r"^F must be 4-D"):
        atom_fast.spatial_attention(e)
    with pytest.raises(TypeError, match=r"^F must be a torch.Tensor"):
        atom_fast.channel_attention(e.numpy())
    with pytest.raises(ValueError, match=r"^p must be finite and positive"):
        atom_fast.channel_attention(torch.randn(2, 3, 4, 4), -2)


def test_module_checks_arguments_when_built():
    with pytest.raises(ValueError, match=r"^channel_power"):
        atom_fast.AttentionLoss(10, channel_power=0)
    with pytest.raises(ValueError, match=r"^backend must be one of"):
        atom_fast.AttentionLoss(10, backend="gpu")
    with pytest.raises(TypeError, match=r"^num_classes must be an int"):
        atom_fast.AttentionLoss("10")


# ---- behaviour ------------------------------------------------------------------------------------


def test_nan_and_inf_features_give_nan_loss():
    for bad in (float("nan"), float("inf")):
        r, s = _batch()
        r[0, 0, 0, 0] = bad
        assert torch.isnan(atom_fast.attention_loss(r, s, 3, backend="reference"))


@pytest.mark.parametrize("dtype,expected", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                            (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_output_dtype(dtype, expected):
    r, s = _batch(dtype=dtype)
    s.requires_grad_()
    loss = atom_fast.attention_loss(r, s, 3, backend="reference")
    assert loss.dtype == expected and loss.ndim == 0
    loss.backward()
    assert s.grad.dtype == dtype
    assert atom_fast.mmd_loss(r.flatten(1), s.flatten(1), 3).dtype == expected


def test_auto_backend_choice(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend("auto", torch.device("cpu")) == "native"  # built by the install
    monkeypatch.setenv(BACKEND_ENV, "reference")
    assert resolve_backend("auto", torch.device("cpu")) == "reference"
    monkeypatch.setenv(BACKEND_ENV, "reference")
    assert resolve_backend("auto", torch.device("cuda")) == "reference"
    # an explicit backend wins over the environment
    assert resolve_backend("reference", torch.device("cpu")) == "reference"


def test_environment_variable_selects_the_fused_backend(monkeypatch):
    r, s = _batch(device=DEVICE)
    s.requires_grad_()
    monkeypatch.setenv(BACKEND_ENV, "triton")
    fused = atom_fast.attention_loss(r, s, 3)
    assert type(fused.grad_fn).__name__ == "FusedAttentionLossBackward"
    monkeypatch.delenv(BACKEND_ENV)
    ref = atom_fast.attention_loss(r, s, 3)
    assert type(ref.grad_fn).__name__ != "FusedAttentionLossBackward"
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=0)


def test_module_matches_function():
    r, s = _batch()
    module = atom_fast.AttentionLoss(3, spatial_power=2, channel_power=8, channel_weight=0.5,
                                     backend="reference")
    assert "channel_power=8.0" in repr(module)
    expected = atom_fast.attention_loss(r, s, 3, spatial_power=2, channel_power=8, channel_weight=0.5)
    torch.testing.assert_close(module(r, s), expected, rtol=0, atol=0)
    rl, sl = _labels()
    labelled = atom_fast.AttentionLoss(spatial_power=2, channel_power=8, channel_weight=0.5)
    torch.testing.assert_close(labelled(r, s, rl, sl), expected, rtol=1e-6, atol=0)


def test_both_weights_zero_gives_zero_loss_and_zero_gradients():
    r, s = _batch(device=DEVICE)
    s.requires_grad_()
    for backend in ("reference", "triton"):
        loss = atom_fast.attention_loss(r, s, 3, spatial_weight=0, channel_weight=0, backend=backend)
        assert loss.item() == 0.0 and loss.dtype == torch.float32
        (grad,) = torch.autograd.grad(loss, s)
        assert torch.equal(grad, torch.zeros_like(s))


def test_spec_keyword_names():
    r, s = _batch()
    e_r, e_s = r.flatten(1), s.flatten(1)
    atom_fast.mmd_loss(real_emb=e_r, syn_emb=e_s, num_classes=3)
    atom_fast.spatial_attention(F=r, p=2)
    atom_fast.channel_attention(F=r, p=2)
    atom_fast.attention_loss(real=r, syn=s, num_classes=3, spatial_power=2, channel_power=8,
                             spatial_weight=1, channel_weight=1, backend="reference")


def test_labels_without_num_classes_are_renumbered():
    r, s = _batch(K=2, B=3, IPC=2)
    rl, sl = torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, 0, 1, 1])
    big = 10**13  # a sparse class id must not size any buffer
    compact = atom_fast.attention_loss(r, s, real_labels=rl, syn_labels=sl, backend="reference")
    sparse = atom_fast.attention_loss(r, s, real_labels=rl * big, syn_labels=sl * big, backend="reference")
    torch.testing.assert_close(sparse, compact, rtol=0, atol=0)
    torch.testing.assert_close(compact, atom_fast.attention_loss(r, s, 2, backend="reference"),
                               rtol=1e-6, atol=0)


def test_triton_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    import atom_fast.backends
    monkeypatch.setattr(atom_fast.backends, "triton_interpreted", lambda: False)
    with pytest.raises(RuntimeError, match=r"^backend='triton' runs on CUDA tensors, got cpu"):
        resolve_backend("triton", torch.device("cpu"))


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_a_huge_num_classes_with_labels_costs_what_the_present_classes_cost(backend):
    """num_classes only bounds the labels' range: the work follows the classes that occur (a K of
    10**9 once made the native op allocate K-sized buffers and get killed)."""
    r, s = _batch(K=3, B=4, IPC=2)
    rl = torch.arange(3).repeat_interleave(4) * 7 + 5          # classes 5, 12, 19
    sl = torch.arange(3).repeat_interleave(2) * 7 + 5
    want = atom_fast.attention_loss(r, s, real_labels=rl, syn_labels=sl, backend=backend)
    got = atom_fast.attention_loss(r, s, 10 ** 9, real_labels=rl, syn_labels=sl, backend=backend)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(atom_fast.mmd_loss(r, s, 10 ** 9, real_labels=rl, syn_labels=sl),
                               atom_fast.mmd_loss(r, s, real_labels=rl, syn_labels=sl))
