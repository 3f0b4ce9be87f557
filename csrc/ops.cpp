// The op schemas of atom_fast (declared once here) and the Python module that loads them.
//
//   atom_fast::attention_forward(real, syn, real_offsets, syn_offsets, real_order?, syn_order?,
//                                ps, pc, ws, wc) -> (loss, real_stats, syn_stats, diffs)
//   atom_fast::attention_backward(grad_loss, features, stats, diffs, offsets, order?,
//                                 sign, ps, pc, ws, wc) -> grad_features
//   atom_fast::attention_stats(features, ps, pc, spatial, channel) -> stats
//
// One layer per call. Class layout: the samples of class k are rows order[offsets[k]:offsets[k+1]]
// (order omitted: rows offsets[k]:offsets[k+1], the equal contiguous blocks of DataDAM/DM loops).
// stats (N, H*W + C + 3): per sample [s' (H*W) | t' (C) | m | ||s'|| | ||t'||], the spatial and
// channel attention of the scaled features F[n] / m, m = max |F[n]| (so s = m^ps s', t = m^pc t';
// nothing overflows at large powers), and their norms. x_hat = x' * r, r from constants.h. diffs (K, H*W + C): D_k = mean_real_k(x_hat) - mean_syn_k(x_hat) for s then t.
// The loss is ws * sum_k ||D_k(s)||^2 + wc * sum_k ||D_k(t)||^2. attention_backward gives the
// gradient of grad_loss * loss for one side (sign +1 real, -1 synthetic) from the saved statistics.
// instance_norm_relu_pool(input, weight?, bias?, eps, pool) -> (f, pooled, mean, rstd): a ConvNet
// block's GroupNorm(C, C) + ReLU (+ 2x2 average pooling; pooled is empty when pool is false) in one
// pass, with the per-(sample, channel) mean and rstd its backward needs;
// instance_norm_relu_pool_backward(grad_f?, grad_pooled?, input, weight?, bias?, mean, rstd) ->
// (grad_input, per-row grad_weight, per-row grad_bias), one pass (norm_relu_pool_cpu.cpp; CPU only).
//   atom_fast::attention_class_sums(features, offsets, order?, ps, pc, spatial, channel)
//                                   -> (S (K, H*W), T (K, C))
//   atom_fast::attention_forward_sums(real_spatial?, real_channel?, real_counts, syn, syn_offsets,
//                                     syn_order?, ps, pc, ws, wc) -> (loss, syn_stats, diffs)
// are the two halves of the streamed class-statistics interface (docs/scale.md): the per-class
// sums of one side's normalized attention vectors (S_k = sum_{n in k} s_hat_n; a term whose flag is
// false is zeros), and the forward with the real side given as those sums and int64 counts n_k
// (D_k = S_k / n_k - mean_syn_k(s_hat), likewise T; a sums tensor may be omitted when its term's
// weight is 0). attention_backward with sign -1 is the latter's backward.
// attention_stats gives one side's stats alone; a term whose flag is false is written as zeros.
// Implementations: attention_cpu.cpp (CPU), cuda/attention_cuda.cu (CUDA, when built).
// Autograd and fake (meta) kernels are registered from Python (atom_fast/backends/native.py; the block tail's in atom_fast/distill/block_tail.py).

#include <Python.h>
#include <torch/library.h>

#include "constants.h"
#include "cpu/kernels.h"

TORCH_LIBRARY(atom_fast, m) {
  m.def(
      "attention_forward(Tensor real, Tensor syn, Tensor real_offsets, Tensor syn_offsets, "
      "Tensor? real_order, Tensor? syn_order, float spatial_power, float channel_power, "
      "float spatial_weight, float channel_weight) -> (Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "attention_backward(Tensor grad_loss, Tensor features, Tensor stats, Tensor diffs, "
      "Tensor offsets, Tensor? order, float sign, float spatial_power, float channel_power, "
      "float spatial_weight, float channel_weight) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "attention_stats(Tensor features, float spatial_power, float channel_power, bool spatial, "
      "bool channel) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "attention_class_sums(Tensor features, Tensor offsets, Tensor? order, float spatial_power, "
      "float channel_power, bool spatial, bool channel) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "attention_forward_sums(Tensor? real_spatial, Tensor? real_channel, Tensor real_counts, "
      "Tensor syn, Tensor syn_offsets, Tensor? syn_order, float spatial_power, "
      "float channel_power, float spatial_weight, float channel_weight) -> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "instance_norm_relu_pool(Tensor input, Tensor? weight, Tensor? bias, float eps, bool pool) "
      "-> (Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "instance_norm_relu_pool_backward(Tensor? grad_f, Tensor? grad_pooled, Tensor input, "
      "Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // Test hook (CPU only): |x|^p elementwise through the row kernels' non-integer power path.
  m.def("_general_power(Tensor x, float p) -> Tensor");
}

// ---- Python module: importing atom_fast._C registers the ops above --------------------------------

// A plain CPython function: a C++ exception must not leave it (it would abort the interpreter), so a
// bad ATOM_FAST_CPU_ISA becomes a RuntimeError.
static PyObject* cpu_isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(atom_fast::cpu::selected_isa());
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

static PyObject* has_cuda(PyObject*, PyObject*) {
#ifdef ATOM_FAST_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

static PyObject* constants(PyObject*, PyObject*) {
  return Py_BuildValue("{s:d,s:i,s:i}", "NORM_EPS", atom_fast::kNormEps, "MAX_UNROLLED_POWER",
                       atom_fast::kMaxUnrolledPower, "STATS_EXTRA", atom_fast::kStatsExtra);
}

static PyMethodDef methods[] = {
    {"constants", constants, METH_NOARGS,
     "The C++ side's shared numbers (csrc/constants.h): NORM_EPS, MAX_UNROLLED_POWER and "
     "STATS_EXTRA (values per stats row beyond the H*W + C attention entries)."},
    {"cpu_isa", cpu_isa, METH_NOARGS,
     "Instruction set of the CPU row kernels used now: 'avx512', 'avx2' or 'default', the best "
     "the CPU has (ATOM_FAST_CPU_ISA=default, avx2 or avx512 forces one)."},
    {"has_cuda", has_cuda, METH_NOARGS, "Whether the CUDA kernels were compiled into this build."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                 "Native atom_fast ops (registered as torch.ops.atom_fast)", -1,
                                 methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
