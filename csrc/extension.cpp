// The one Python module megaglot._C: each source file registers its own functions here.
#include <torch/extension.h>

void register_dataset_helpers(pybind11::module& m);
void register_softmax(pybind11::module& m);
void register_rotary(pybind11::module& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megaglot compiled kernels and dataset helpers";
  register_dataset_helpers(m);
  register_softmax(m);
  register_rotary(m);
#ifdef MEGAGLOT_WITH_CUDA
  m.def("with_cuda", [] { return true; }, "whether the CUDA kernels were compiled in");
#else
  m.def("with_cuda", [] { return false; }, "whether the CUDA kernels were compiled in");
#endif
}
