// The one Python module megaglot._C: each source file registers its own functions here.
#include <torch/extension.h>

void register_dataset_helpers(pybind11::module& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megaglot compiled kernels and dataset helpers";
  register_dataset_helpers(m);
}
