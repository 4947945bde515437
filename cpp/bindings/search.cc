// Bindings of the searches. step()/step_topk() release the GIL: the work is pure C++ on numpy
// buffers.
#include "softtool/search.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "numpy_util.h"
#include "register.h"

namespace py = pybind11;

namespace softtool_py {
namespace {
using softtool::BeamSearch;
using softtool::GreedySearch;
using softtool::Hypothesis;
using softtool::SearchOptions;
using softtool::SearchStrategy;
using softtool::StepResult;

struct PyStepResult {
  py::array_t<int64_t> next_tokens, beam_indices;
  py::array finished;
};

PyStepResult wrap(StepResult&& r) {
  const py::ssize_t n = static_cast<py::ssize_t>(r.next_tokens.size());
  return PyStepResult{to_numpy(std::move(r.next_tokens), {n}),
                      to_numpy(std::move(r.beam_indices), {n}), bool_array(std::move(r.finished))};
}

void start(SearchStrategy& s, const py::sequence& prompts,
           const std::vector<int64_t>& left_padding) {
  std::vector<std::vector<int64_t>> ids;
  for (const py::handle& p : prompts) {
    const IdArray arr =
        id_array(p, 1, "start: each prompt must be a 1-D array or list of int token ids");
    ids.emplace_back(arr.data(), arr.data() + arr.size());
  }
  s.start(ids, left_padding);
}

PyStepResult step(SearchStrategy& s, const FloatArray& logits) {
  if (logits.ndim() != 2)
    throw std::invalid_argument("step: logits must be float32 [num_rows, vocab]");
  const float* data = logits.data();
  const int64_t rows = logits.shape(0);
  const int64_t vocab = logits.shape(1);
  StepResult r;
  {
    py::gil_scoped_release release;
    r = s.step(data, rows, vocab);
  }
  return wrap(std::move(r));
}

PyStepResult step_topk(SearchStrategy& s, const FloatArray& values, const IdArray& indices) {
  if (values.ndim() != 2 || indices.ndim() != 2 || values.shape(0) != indices.shape(0) ||
      values.shape(1) != indices.shape(1)) {
    throw std::invalid_argument("step_topk: values and indices must both be [num_rows, k]");
  }
  const float* v = values.data();
  const int64_t* ix = indices.data();
  const int64_t rows = values.shape(0);
  const int64_t k = values.shape(1);
  StepResult r;
  {
    py::gil_scoped_release release;
    r = s.step_topk(v, ix, rows, k);
  }
  return wrap(std::move(r));
}

}  // namespace

void register_search(py::module_& m) {
  py::class_<Hypothesis>(m, "Hypothesis",
                         "A finished sequence: new tokens (EOS excluded) and its score.")
      .def_property_readonly("tokens",
                             [](const Hypothesis& h) {
                               std::vector<int64_t> copy = h.tokens;
                               const py::ssize_t n = static_cast<py::ssize_t>(copy.size());
                               return to_numpy(std::move(copy), {n});
                             })
      .def_readonly("score", &Hypothesis::score)
      .def("__repr__", [](const Hypothesis& h) {
        return "Hypothesis(len=" + std::to_string(h.tokens.size()) +
               ", score=" + std::to_string(h.score) + ")";
      });

  py::class_<PyStepResult>(m, "StepResult", "What one search step decided, per row.")
      .def_readonly("next_tokens", &PyStepResult::next_tokens)
      .def_readonly("beam_indices", &PyStepResult::beam_indices)
      .def_readonly("finished", &PyStepResult::finished);

  py::class_<SearchStrategy>(m, "SearchStrategy",
                             "Step-wise search; see softtool.search for the protocol.")
      .def("start", &start, py::arg("prompt_ids"), py::arg("left_padding") = std::vector<int64_t>{})
      .def("step", &step, py::arg("logits"))
      .def("step_topk", &step_topk, py::arg("values"), py::arg("indices"))
      .def("is_done", &SearchStrategy::is_done)
      .def("finalize", &SearchStrategy::finalize)
      .def_property_readonly("num_rows", &SearchStrategy::num_rows)
      .def_property_readonly("batch_size", &SearchStrategy::batch_size);
  py::class_<GreedySearch, SearchStrategy>(m, "GreedySearch").def(py::init<const SearchOptions&>());
  py::class_<BeamSearch, SearchStrategy>(m, "BeamSearch").def(py::init<const SearchOptions&>());
  m.def("make_search", &softtool::make_search, py::arg("options"),
        "GreedySearch when num_beams == 1 (greedy or sampling), else BeamSearch.");
}

}  // namespace softtool_py
