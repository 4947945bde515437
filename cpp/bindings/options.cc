// Bindings of the option structs. The Python dataclasses in softtool.search mirror them and
// convert; the string/bool-valued fields (padding_side, early_stopping) are mapped here.
#include "softtool/options.h"

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "register.h"

namespace py = pybind11;

namespace softtool_py {
using softtool::BatchOptions;
using softtool::EarlyStopping;
using softtool::PaddingSide;
using softtool::SearchOptions;

namespace {
py::object early_stopping_to_py(EarlyStopping e) {
  if (e == EarlyStopping::kNever) return py::str("never");
  return py::bool_(e == EarlyStopping::kTrue);
}

EarlyStopping early_stopping_from_py(const py::object& v) {
  if (py::isinstance<py::bool_>(v))
    return v.cast<bool>() ? EarlyStopping::kTrue : EarlyStopping::kHeuristic;
  if (py::isinstance<py::str>(v) && v.cast<std::string>() == "never") return EarlyStopping::kNever;
  throw std::invalid_argument(
      "SearchOptions.early_stopping must be True, False or \"never\", got " +
      py::repr(v).cast<std::string>());
}
// An int or anything with __index__ (numpy/torch integers), never a float or a string.
int64_t id_from_py(const py::handle& x, const std::function<py::type_error()>& bad) {
  PyObject* index = PyIndex_Check(x.ptr()) ? PyNumber_Index(x.ptr()) : nullptr;
  if (index == nullptr) {
    PyErr_Clear();
    throw bad();
  }
  try {
    return py::reinterpret_steal<py::int_>(index).cast<int64_t>();
  } catch (const py::cast_error&) {  // beyond int64
    throw bad();
  }
}

// An iterable of ids (list, tuple, numpy array, torch tensor); nullopt when `v` has no __iter__
// (an int) or is a string.
std::optional<std::vector<int64_t>> id_list_from_py(const py::handle& v,
                                                    const std::function<py::type_error()>& bad) {
  if (py::isinstance<py::str>(v) || py::isinstance<py::bytes>(v) || !py::hasattr(v, "__iter__")) {
    return std::nullopt;
  }
  std::vector<int64_t> ids;
  try {
    for (const py::handle& x : v) ids.push_back(id_from_py(x, bad));
  } catch (const py::error_already_set&) {  // not iterable after all (a 0-d tensor)
    throw bad();
  }
  return ids;
}

// One id or an iterable of ids.
std::vector<int64_t> eos_ids_from_py(const py::object& v) {
  const auto bad = [&] {
    return py::type_error("SearchOptions.eos_token_ids must be an int or a sequence of ints, got " +
                          py::repr(v).cast<std::string>());
  };
  if (py::isinstance<py::int_>(v)) return {id_from_py(v, bad)};
  if (auto ids = id_list_from_py(v, bad)) return *ids;
  return {id_from_py(v, bad)};  // a numpy integer scalar
}

// An iterable of id sequences ([[5, 7], [9]], tuples, arrays, a 2-D array); a flat list of ints
// is refused rather than read as one-token choices.
std::vector<std::vector<int64_t>> choices_from_py(const py::object& v) {
  const auto bad = [&] {
    return py::type_error(
        "SearchOptions.choices must be a sequence of token-id sequences (e.g. [[5, 7], [9]]), "
        "got " +
        py::repr(v).cast<std::string>());
  };
  if (py::isinstance<py::str>(v) || py::isinstance<py::bytes>(v) || !py::hasattr(v, "__iter__")) {
    throw bad();
  }
  std::vector<std::vector<int64_t>> choices;
  try {
    for (const py::handle& c : v) {
      std::optional<std::vector<int64_t>> ids = id_list_from_py(c, bad);
      if (!ids) throw bad();  // an int where a sequence belongs
      choices.push_back(std::move(*ids));
    }
  } catch (const py::error_already_set&) {  // not iterable after all (a 0-d tensor)
    throw bad();
  }
  return choices;
}
}  // namespace

void register_options(py::module_& m) {
  py::class_<BatchOptions>(m, "BatchOptions",
                           "How build_batch lays out and pads a batch (core struct).")
      .def(py::init<>())
      .def_readwrite("vocab_size", &BatchOptions::vocab_size)
      .def_readwrite("num_virtual_tokens", &BatchOptions::num_virtual_tokens)
      .def_property(
          "padding_side",
          [](const BatchOptions& o) {
            return o.padding_side == PaddingSide::kLeft ? "left" : "right";
          },
          [](BatchOptions& o, const std::string& side) {
            if (side != "left" && side != "right") {
              throw std::invalid_argument(
                  "BatchOptions.padding_side must be \"left\" or \"right\", got \"" + side + "\"");
            }
            o.padding_side = side == "left" ? PaddingSide::kLeft : PaddingSide::kRight;
          })
      .def_readwrite("pad_id", &BatchOptions::pad_id)
      .def_readwrite("num_tasks", &BatchOptions::num_tasks)
      .def("validate", &BatchOptions::validate);

  py::class_<SearchOptions>(m, "SearchOptions",
                            "Search settings (core struct; see softtool.search.SearchOptions).")
      .def(py::init<>())
      .def_readwrite("max_new_tokens", &SearchOptions::max_new_tokens)
      .def_readwrite("min_new_tokens", &SearchOptions::min_new_tokens)
      .def_property(
          "eos_token_ids", [](const SearchOptions& o) { return o.eos_token_ids; },
          [](SearchOptions& o, const py::object& v) { o.eos_token_ids = eos_ids_from_py(v); })
      .def_readwrite("pad_token_id", &SearchOptions::pad_token_id)
      .def_readwrite("num_beams", &SearchOptions::num_beams)
      .def_readwrite("length_penalty", &SearchOptions::length_penalty)
      .def_property(
          "early_stopping",
          [](const SearchOptions& o) { return early_stopping_to_py(o.early_stopping); },
          [](SearchOptions& o, const py::object& v) {
            o.early_stopping = early_stopping_from_py(v);
          })
      .def_readwrite("repetition_penalty", &SearchOptions::repetition_penalty)
      .def_readwrite("no_repeat_ngram_size", &SearchOptions::no_repeat_ngram_size)
      .def_readwrite("num_return_sequences", &SearchOptions::num_return_sequences)
      .def_readwrite("do_sample", &SearchOptions::do_sample)
      .def_readwrite("temperature", &SearchOptions::temperature)
      .def_readwrite("top_k", &SearchOptions::top_k)
      .def_readwrite("top_p", &SearchOptions::top_p)
      .def_readwrite("seed", &SearchOptions::seed)
      .def_readwrite("num_threads", &SearchOptions::num_threads)
      .def_property(
          "choices", [](const SearchOptions& o) { return o.choices; },
          [](SearchOptions& o, const py::object& v) { o.choices = choices_from_py(v); })
      .def("validate", &SearchOptions::validate);
}

}  // namespace softtool_py
