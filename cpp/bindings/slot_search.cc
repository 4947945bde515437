// Binding of SlotSearch. step()/step_topk() release the GIL like the other searches; submit()
// takes the core SearchOptions or anything with to_core() (softtool.search.SearchOptions).
#include "softtool/slot_search.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <utility>

#include "numpy_util.h"
#include "register.h"

namespace py = pybind11;

namespace softtool_py {
namespace {
using softtool::FinishedItem;
using softtool::Hypothesis;
using softtool::SearchOptions;
using softtool::SlotAssignment;
using softtool::SlotSearch;
using softtool::SlotStepResult;

struct PySlotStepResult {
  py::array_t<int64_t> next_tokens;
  py::array finished;
};

PySlotStepResult wrap(SlotStepResult&& r) {
  const py::ssize_t n = static_cast<py::ssize_t>(r.next_tokens.size());
  return PySlotStepResult{to_numpy(std::move(r.next_tokens), {n}),
                          bool_array(std::move(r.finished))};
}

std::optional<SearchOptions> item_options(const py::object& options) {
  if (options.is_none()) return std::nullopt;
  if (py::isinstance<SearchOptions>(options)) return options.cast<SearchOptions>();
  if (py::hasattr(options, "to_core")) return options.attr("to_core")().cast<SearchOptions>();
  throw py::type_error("submit: options must be a SearchOptions or None, got " +
                       py::repr(options.get_type()).cast<std::string>());
}

int64_t submit(SlotSearch& s, const py::handle& prompt, const py::object& options) {
  const IdArray ids =
      id_array(prompt, 1, "submit: prompt_ids must be a 1-D array or list of int token ids");
  const std::optional<SearchOptions> o = item_options(options);
  return s.submit(std::vector<int64_t>(ids.data(), ids.data() + ids.size()), o ? &*o : nullptr);
}

PySlotStepResult step(SlotSearch& s, const FloatArray& logits, const py::handle& slots) {
  const IdArray ids = id_array(slots, 1, "step: slots must be a 1-D int array");
  if (logits.ndim() != 2 || logits.shape(0) != ids.shape(0)) {
    throw std::invalid_argument("step: logits must be float32 [len(slots), vocab]");
  }
  SlotStepResult r;
  {
    py::gil_scoped_release release;
    r = s.step(logits.data(), ids.data(), ids.shape(0), logits.shape(1));
  }
  return wrap(std::move(r));
}

PySlotStepResult step_topk(SlotSearch& s, const FloatArray& values, const IdArray& indices,
                           const py::handle& slots) {
  const IdArray ids = id_array(slots, 1, "step_topk: slots must be a 1-D int array");
  if (values.ndim() != 2 || indices.ndim() != 2 || values.shape(0) != indices.shape(0) ||
      values.shape(1) != indices.shape(1) || values.shape(0) != ids.shape(0)) {
    throw std::invalid_argument("step_topk: values and indices must both be [len(slots), k]");
  }
  SlotStepResult r;
  {
    py::gil_scoped_release release;
    r = s.step_topk(values.data(), indices.data(), ids.data(), ids.shape(0), values.shape(1));
  }
  return wrap(std::move(r));
}

}  // namespace

void register_slot_search(py::module_& m) {
  py::class_<PySlotStepResult>(m, "SlotStepResult", "What one SlotSearch step decided, per slot.")
      .def_readonly("next_tokens", &PySlotStepResult::next_tokens)
      .def_readonly("finished", &PySlotStepResult::finished);

  py::class_<SlotSearch>(m, "SlotSearch",
                         "Greedy search / sampling over a fixed number of slots (continuous "
                         "batching); see softtool.search.make_slot_search.")
      .def(py::init<const SearchOptions&, int64_t>(), py::arg("options"), py::arg("num_slots"))
      .def("submit", &submit, py::arg("prompt_ids"), py::arg("options") = py::none(),
           "Queue an item; returns its id (0, 1, ... in submission order).")
      .def(
          "admit",
          [](SlotSearch& s) {
            py::list out;
            for (const SlotAssignment& a : s.admit()) out.append(py::make_tuple(a.slot, a.item_id));
            return out;
          },
          "Move queued items into free slots; returns the new (slot, item_id) pairs.")
      .def("step", &step, py::arg("logits"), py::arg("slots"))
      .def("step_topk", &step_topk, py::arg("values"), py::arg("indices"), py::arg("slots"))
      .def("cancel", &SlotSearch::cancel, py::arg("item_id"),
           "End an item now (keeping its tokens); False when it had already ended.")
      .def(
          "take_finished",
          [](SlotSearch& s) {
            py::list out;
            for (FinishedItem& f : s.take_finished()) {
              out.append(py::make_tuple(f.item_id, py::cast(std::move(f.hypothesis))));
            }
            return out;
          },
          "The (item_id, Hypothesis) pairs of the items that ended since the last call.")
      .def("is_done", &SlotSearch::is_done)
      .def("num_pending", &SlotSearch::num_pending)
      .def("num_active", &SlotSearch::num_active)
      .def("num_slots", &SlotSearch::num_slots)
      .def("active_slots",
           [](const SlotSearch& s) {
             std::vector<int64_t> slots = s.active_slots();
             const py::ssize_t n = static_cast<py::ssize_t>(slots.size());
             return to_numpy(std::move(slots), {n});
           })
      .def("slot_item", &SlotSearch::slot_item, py::arg("slot"))
      .def_property_readonly("options", &SlotSearch::options);
}

}  // namespace softtool_py
