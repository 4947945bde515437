// Hands C++ vectors to numpy without copying: the array's base is a capsule owning the vector.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <utility>
#include <vector>

namespace softtool_py {

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
