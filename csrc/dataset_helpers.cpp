// Dataset index helpers. The GPT sample index walks every token of an epoch once; in Python that
// is minutes for 10^10 tokens, here it is a tight loop over memory-mapped arrays.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <type_traits>
#include <vector>

namespace py = pybind11;

// sample_idx[i] = (position in doc_idx, token offset in that document) where sample i starts;
// sample i spans up to sample i+1 plus one token (seq_length + 1 tokens for input and label).
py::array_t<int64_t> build_sample_idx(py::array_t<int32_t, py::array::c_style | py::array::forcecast> sizes,
                                      py::array_t<int64_t, py::array::c_style | py::array::forcecast> doc_idx,
                                      int64_t seq_length, int64_t num_samples) {
  if (seq_length <= 0) throw std::invalid_argument("build_sample_idx: seq_length must be positive");
  if (num_samples < 0) throw std::invalid_argument("build_sample_idx: num_samples must be >= 0");
  auto sizes_v = sizes.unchecked<1>();
  auto doc_v = doc_idx.unchecked<1>();
  const int64_t num_docs_in_index = doc_v.shape(0);
  const int64_t num_sizes = sizes_v.shape(0);

  py::array_t<int64_t> result({num_samples + 1, static_cast<int64_t>(2)});
  auto out = result.mutable_unchecked<2>();
  {
    py::gil_scoped_release release;
    int64_t doc_idx_index = 0;
    int64_t doc_offset = 0;
    out(0, 0) = 0;
    out(0, 1) = 0;
    for (int64_t sample = 1; sample <= num_samples; ++sample) {
      int64_t remaining = seq_length + 1;
      while (remaining != 0) {
        if (doc_idx_index >= num_docs_in_index) {
          py::gil_scoped_acquire acquire;
          throw std::out_of_range("build_sample_idx: documents exhausted at sample " + std::to_string(sample) +
                                  "; num_samples needs more epochs of documents");
        }
        const int64_t doc_id = doc_v(doc_idx_index);
        if (doc_id < 0 || doc_id >= num_sizes) {
          py::gil_scoped_acquire acquire;
          throw std::out_of_range("build_sample_idx: document id " + std::to_string(doc_id) + " out of range");
        }
        const int64_t doc_length = static_cast<int64_t>(sizes_v(doc_id)) - doc_offset;
        remaining -= doc_length;
        if (remaining <= 0) {
          // The sample ends inside this document; the next starts on its last token (the label overlap).
          doc_offset += remaining + doc_length - 1;
          remaining = 0;
        } else {
          ++doc_idx_index;
          doc_offset = 0;
        }
      }
      out(sample, 0) = doc_idx_index;
      out(sample, 1) = doc_offset;
    }
  }
  return result;
}

// Deterministic greedy blend (Megatron's rule): sample i comes from the dataset whose share so far
// lags its weight the most, so every prefix of the blend is within one sample of the target mix.
// Returns (dataset index int16[size], index of the sample within that dataset int64[size]).
py::tuple build_blending_indices(py::array_t<double, py::array::c_style | py::array::forcecast> weights,
                                 int64_t size) {
  if (size < 0) throw std::invalid_argument("build_blending_indices: size must be >= 0");
  auto w = weights.unchecked<1>();
  const int64_t num_datasets = w.shape(0);
  if (num_datasets <= 0 || num_datasets > 32767)
    throw std::invalid_argument("build_blending_indices: need 1..32767 datasets, got " + std::to_string(num_datasets));
  py::array_t<int16_t> dataset_index(size);
  py::array_t<int64_t> dataset_sample_index(size);
  auto di = dataset_index.mutable_unchecked<1>();
  auto dsi = dataset_sample_index.mutable_unchecked<1>();
  std::vector<double> weight(num_datasets);
  for (int64_t d = 0; d < num_datasets; ++d) weight[d] = w(d);
  {
    py::gil_scoped_release release;
    std::vector<int64_t> current(num_datasets, 0);
    for (int64_t i = 0; i < size; ++i) {
      const double position = i > 1 ? static_cast<double>(i) : 1.0;
      int64_t best = 0;
      double best_error = weight[0] * position - static_cast<double>(current[0]);
      for (int64_t d = 1; d < num_datasets; ++d) {
        const double error = weight[d] * position - static_cast<double>(current[d]);
        if (error > best_error) {
          best_error = error;
          best = d;
        }
      }
      di(i) = static_cast<int16_t>(best);
      dsi(i) = current[best];
      ++current[best];
    }
  }
  return py::make_tuple(dataset_index, dataset_sample_index);
}

// Largest element of a token array (the .bin of an indexed dataset, memory-mapped): the trainer's
// check that every id is below the model's vocabulary. One pass, split over threads with the GIL
// released, so a 10^10-token file is read at page-cache speed once and its result cached.
template <typename T>
T max_of_range(const T* data, int64_t begin, int64_t end) {
  T best = data[begin];
  for (int64_t i = begin + 1; i < end; ++i) {
    const T value = data[i];
    if (value > best || value != value) best = value;  // a float NaN sticks, as in numpy's max
  }
  return best;
}

template <typename T>
T parallel_max(const T* data, int64_t n, int64_t threads) {
  if (threads <= 0) {  // automatic: up to 16 threads, none with under ~4M elements (it would cost more than it saves)
    const int64_t min_chunk = int64_t(1) << 22;
    threads = std::min<int64_t>(std::max<unsigned>(std::thread::hardware_concurrency(), 1u), 16);
    threads = std::min<int64_t>(threads, (n + min_chunk - 1) / min_chunk);
  }
  threads = std::max<int64_t>(1, std::min<int64_t>({threads, n, int64_t(256)}));
  const int64_t chunk = (n + threads - 1) / threads;
  threads = (n + chunk - 1) / chunk;  // every range non-empty
  if (threads == 1) return max_of_range(data, 0, n);
  std::vector<T> partial(threads);
  std::vector<std::thread> workers;
  for (int64_t t = 0; t < threads; ++t) {
    const int64_t begin = t * chunk, end = std::min(n, begin + chunk);
    try {
      workers.emplace_back([&partial, data, t, begin, end] { partial[t] = max_of_range(data, begin, end); });
    } catch (const std::system_error&) {  // no thread to be had: this one does the range itself
      partial[t] = max_of_range(data, begin, end);
    }
  }
  for (auto& worker : workers) worker.join();
  return max_of_range(partial.data(), 0, threads);
}

template <typename T>
bool try_max(const py::array& tokens, int64_t threads, py::object& out) {
  if (!py::isinstance<py::array_t<T>>(tokens)) return false;
  const T* data = static_cast<const T*>(tokens.data());
  const int64_t n = tokens.shape(0);
  T best;
  {
    py::gil_scoped_release release;
    best = parallel_max(data, n, threads);
  }
  if (std::is_floating_point<T>::value)
    out = py::float_(static_cast<double>(best));
  else
    out = py::int_(static_cast<int64_t>(best));
  return true;
}

// Returns an int (a float for float arrays), or None for an empty array. Never copies: the array
// must be 1-D, contiguous and native-endian, as a numpy memmap of a .bin is.
py::object max_token_id(const py::array& tokens, int64_t threads) {
  if (tokens.ndim() != 1) throw std::invalid_argument("max_token_id: expected a 1-D token array");
  if (tokens.shape(0) == 0) return py::none();
  if (tokens.strides(0) != tokens.itemsize())
    throw std::invalid_argument("max_token_id: the token array must be contiguous");
  py::object out;
  if (try_max<uint8_t>(tokens, threads, out) || try_max<int8_t>(tokens, threads, out) ||
      try_max<int16_t>(tokens, threads, out) || try_max<uint16_t>(tokens, threads, out) ||
      try_max<int32_t>(tokens, threads, out) || try_max<int64_t>(tokens, threads, out) ||
      try_max<float>(tokens, threads, out) || try_max<double>(tokens, threads, out))
    return out;
  throw std::invalid_argument("max_token_id: unsupported dtype " + std::string(py::str(tokens.dtype())) +
                              " (expected a native-endian MMIDIDX dtype)");
}

void register_dataset_helpers(py::module& m) {
  m.def("build_sample_idx", &build_sample_idx, py::arg("sizes"), py::arg("doc_idx"), py::arg("seq_length"),
        py::arg("num_samples"),
        "Start (doc_idx position, offset) of each GPT sample of seq_length+1 tokens; shape [num_samples+1, 2].");
  m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"),
        "Greedy deterministic blend: (dataset index int16[size], sample index within it int64[size]).");
  m.def("max_token_id", &max_token_id, py::arg("tokens"), py::arg("threads") = 0,
        "Largest element of a 1-D token array (None if empty), in threads with the GIL released; "
        "threads=0 picks up to 16 by size, more than 0 uses that many.");
}
