// Bindings of the option structs. The Python dataclasses in softtool.search mirror them and
// convert; the string/bool-valued fields (padding_side, early_stopping) are mapped here.
#include "softtool/options.h"

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "numpy_util.h"

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
      .def_readwrite("eos_token_ids", &SearchOptions::eos_token_ids)
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
      .def("validate", &SearchOptions::validate);
}

}  // namespace softtool_py
