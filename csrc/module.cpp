// The compiled extension trelm_fast._C: one bind_* function per C++ component in csrc/.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void bind_entity_table(py::module_& m);

PYBIND11_MODULE(_C, m) {
  m.doc() = "trelm-fast C++ components (pybind11)";
  bind_entity_table(m);
}
