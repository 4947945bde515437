// numpy in the bindings: the array types they take, and C++ vectors handed to numpy without
// copying (the array's base is a capsule owning the vector).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <utility>
#include <vector>

namespace softtool_py {

// C-contiguous arrays; another dtype or layout (or a list) is converted on the way in.
using FloatArray = pybind11::array_t<float, pybind11::array::c_style | pybind11::array::forcecast>;
using IdArray = pybind11::array_t<int64_t, pybind11::array::c_style | pybind11::array::forcecast>;

// obj as an int64 array of `ndim` dimensions; std::invalid_argument(message) when it is not one.
inline IdArray id_array(const pybind11::handle& obj, int ndim, const char* message) {
  IdArray arr = IdArray::ensure(obj);
  if (!arr || arr.ndim() != ndim) {
    PyErr_Clear();
    throw std::invalid_argument(message);
  }
  return arr;
}

template <typename T>
pybind11::array_t<T> to_numpy(std::vector<T>&& values, std::vector<pybind11::ssize_t> shape) {
  auto* owned = new std::vector<T>(std::move(values));
  pybind11::capsule owner(owned, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return pybind11::array_t<T>(std::move(shape), owned->data(), owner);
}

// uint8 flags as a numpy bool array (same bytes, no copy).
inline pybind11::array bool_array(std::vector<uint8_t>&& values) {
  auto* owned = new std::vector<uint8_t>(std::move(values));
  pybind11::capsule owner(owned, [](void* p) { delete static_cast<std::vector<uint8_t>*>(p); });
  const pybind11::ssize_t n = static_cast<pybind11::ssize_t>(owned->size());
  return pybind11::array(pybind11::dtype("bool"), {n}, {static_cast<pybind11::ssize_t>(1)},
                         owned->data(), owner);
}

}  // namespace softtool_py
