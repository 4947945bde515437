// Binding of build_batch: reads the caller's token arrays in place and returns numpy arrays that
// own the C++ buffers (no copies either way, except where an input is not already C-contiguous
// int64).
#include "softtool/batch.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "numpy_util.h"
#include "register.h"

namespace py = pybind11;

namespace softtool_py {
namespace {

struct PyBatch {
  py::array_t<int64_t> input_ids, attention_mask, position_ids, lengths;

  py::array get(const std::string& key) const {
    if (key == "input_ids") return input_ids;
    if (key == "attention_mask") return attention_mask;
    if (key == "position_ids") return position_ids;
    if (key == "lengths") return lengths;
    throw py::key_error(key);
  }
};

std::vector<softtool::LayoutSegment> parse_layout(const py::sequence& layout) {
  std::vector<softtool::LayoutSegment> out;
  for (const py::handle& item : layout) {
    auto pair = item.cast<py::sequence>();
    if (pair.size() != 2)
      throw std::invalid_argument("build_batch: layout items must be (kind, value) pairs");
    const auto kind = pair[0].cast<std::string>();
    if (kind != "virtual" && kind != "text") {
      throw std::invalid_argument(
          "build_batch: layout kind must be \"virtual\" or \"text\", got \"" + kind + "\"");
    }
    out.push_back({kind == "virtual", pair[1].cast<int64_t>()});
  }
  return out;
}

PyBatch build_batch_py(const py::sequence& rows, const py::object& task_ids,
                       const py::sequence& layout, const softtool::BatchOptions& options) {
  std::vector<IdArray> keep_alive;
  std::vector<std::vector<softtool::TokenSpan>> spans;
  for (const py::handle& row : rows) {
    std::vector<softtool::TokenSpan> slots;
    for (const py::handle& slot : row.cast<py::sequence>()) {
      IdArray arr = IdArray::ensure(slot);
      if (!arr) {
        PyErr_Clear();
        throw std::invalid_argument(
            "build_batch: each text slot must be a 1-D array or list of int token ids");
      }
      if (arr.ndim() != 1) throw std::invalid_argument("build_batch: each text slot must be 1-D");
      slots.push_back({arr.data(), static_cast<size_t>(arr.size())});
      keep_alive.push_back(std::move(arr));
    }
    spans.push_back(std::move(slots));
  }
  std::vector<int64_t> tasks;
  if (py::isinstance<py::int_>(task_ids)) {
    tasks.assign(spans.size(), task_ids.cast<int64_t>());
  } else {
    const IdArray t =
        id_array(task_ids, 1, "build_batch: task_ids must be an int or a 1-D sequence of ints");
    tasks.assign(t.data(), t.data() + t.size());
  }
  const auto parsed = parse_layout(layout);
  softtool::Batch b;
  {
    py::gil_scoped_release release;
    b = softtool::build_batch(spans, tasks, parsed, options);
  }
  const std::vector<py::ssize_t> shape{b.batch_size, b.seq_len};
  return PyBatch{
      to_numpy(std::move(b.input_ids), shape), to_numpy(std::move(b.attention_mask), shape),
      to_numpy(std::move(b.position_ids), shape), to_numpy(std::move(b.lengths), {b.batch_size})};
}

}  // namespace

void register_batch(py::module_& m) {
  py::class_<PyBatch>(
      m, "Batch", "Model inputs built by build_batch (numpy int64; also readable as batch[key]).")
      .def_readonly("input_ids", &PyBatch::input_ids)
      .def_readonly("attention_mask", &PyBatch::attention_mask)
      .def_readonly("position_ids", &PyBatch::position_ids)
      .def_readonly("lengths", &PyBatch::lengths)
      .def("__getitem__", &PyBatch::get)
      .def("keys",
           [](const PyBatch&) {
             return py::make_tuple("input_ids", "attention_mask", "position_ids", "lengths");
           })
      .def("as_dict", [](const PyBatch& b) {
        py::dict d;
        d["input_ids"] = b.input_ids;
        d["attention_mask"] = b.attention_mask;
        d["position_ids"] = b.position_ids;
        d["lengths"] = b.lengths;
        return d;
      });
  m.def("build_batch", &build_batch_py, py::arg("rows"), py::arg("task_ids"), py::arg("layout"),
        py::arg("options"),
        "Concatenate text slots and virtual-token blocks per the layout; pad left or right.");
}

}  // namespace softtool_py
