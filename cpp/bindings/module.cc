// softtool._core: Python bindings of the C++ decoding core. Each concern registers itself here.
#include <pybind11/pybind11.h>

#include "register.h"
#include "softtool/version.h"

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
  m.doc() = "softtool's C++ decoding core: batched prompt concatenation and greedy/beam search.";
  m.attr("__version__") = softtool::version();
  softtool_py::register_options(m);
  softtool_py::register_batch(m);
  softtool_py::register_search(m);
  softtool_py::register_slot_search(m);
}
