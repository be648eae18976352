// The op schemas, in one place. Kernels register themselves per backend in csrc/cpu and
// csrc/cuda; the fake (meta) implementations are registered from Python (intruder_ext/_meta.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// An importable, empty `_C` module: importing it loads this library and runs the registrations.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace intruder_ext {

bool cuda_built() {
#ifdef INTRUDER_EXT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(intruder_ext, m) {
  m.def("cuda_built() -> bool", &cuda_built);
  // values[..., j] = max_i |cos(Y[..., :, j], X[..., :, i])|, indices = the lowest arg-max.
  m.def("max_cosine(Tensor Y, Tensor X, bool absolute=True, bool normalize=True) "
        "-> (Tensor values, Tensor indices)");
  // Thin SVD of every matrix in a (..., m, n) stack, as torch.linalg.svd(A, full_matrices=False),
  // outputs contiguous.
  // max_sweeps caps cuSOLVER's Jacobi iteration (CUDA only); recomputed (...) marks the matrices
  // it did not converge on, which were recomputed with a QR-based driver (the caller warns: a
  // TORCH_WARN from an op called through torch.ops reaches stderr, not Python's warnings).
  m.def("batched_svd(Tensor A, int max_sweeps) -> (Tensor U, Tensor S, Tensor Vh, Tensor recomputed)");
}

}  // namespace intruder_ext
