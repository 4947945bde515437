// Each binding source registers its part of softtool._core; module.cc calls these in order.
#pragma once

#include <pybind11/pybind11.h>

namespace softtool_py {

void register_options(pybind11::module_& m);
void register_batch(pybind11::module_& m);
void register_search(pybind11::module_& m);
void register_slot_search(pybind11::module_& m);

}  // namespace softtool_py
