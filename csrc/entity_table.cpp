// Open-addressing hash table from int64 entity ids to int32 slots (linear probing, splitmix64 hash).
//
// Slots are dense and assigned in insertion order, so slot i indexes row i of the memory bank's
// tensors and `ids()[i]` is the entity stored there. The table grows (doubling, rehash) when the
// load factor would exceed 1/2; it never overwrites an entry. Batched calls release the GIL.
// Not safe for concurrent mutation from several threads.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int64_t kEmpty = -1;  // valid ids are >= 0, so -1 marks a free bucket
constexpr int64_t kPrefetch = 16;  // lookups prefetched ahead of the probe

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

using IdArray = py::array_t<int64_t, py::array::c_style>;

class EntityTable {
 public:
  explicit EntityTable(int64_t capacity) {
    if (capacity < 0) throw std::invalid_argument("EntityTable: capacity must be >= 0");
    size_t buckets = 16;
    while (buckets < 2 * static_cast<size_t>(capacity)) buckets <<= 1;
    keys_.assign(buckets, kEmpty);
    values_.assign(buckets, -1);
  }

  int64_t size() const { return static_cast<int64_t>(ids_.size()); }
  int64_t num_buckets() const { return static_cast<int64_t>(keys_.size()); }

  py::array_t<int32_t> insert(const IdArray& ids) {
    auto [in, n] = checked(ids);
    py::array_t<int32_t> out(n);
    int32_t* slots = out.mutable_data();
    {
      py::gil_scoped_release release;
      for (int64_t i = 0; i < n; ++i) slots[i] = find_or_insert(in[i]);
    }
    return out;
  }

  py::array_t<int32_t> lookup(const IdArray& ids) const {
    auto [in, n] = checked(ids);
    py::array_t<int32_t> out(n);
    int32_t* slots = out.mutable_data();
    {
      py::gil_scoped_release release;
      const uint64_t mask = keys_.size() - 1;
      const int64_t* keys = keys_.data();
      const int32_t* values = values_.data();
      // Each probe is a likely cache miss in a large table: prefetch the buckets of the id
      // kPrefetch positions ahead so that many misses are in flight at once.
      for (int64_t i = 0; i < n; ++i) {
        if (i + kPrefetch < n) {
          const uint64_t ahead = splitmix64(static_cast<uint64_t>(in[i + kPrefetch])) & mask;
          __builtin_prefetch(keys + ahead);
          __builtin_prefetch(values + ahead);
        }
        const int64_t key = in[i];
        uint64_t b = splitmix64(static_cast<uint64_t>(key)) & mask;
        int32_t slot = -1;
        while (keys[b] != kEmpty) {
          if (keys[b] == key) { slot = values[b]; break; }
          b = (b + 1) & mask;
        }
        slots[i] = slot;
      }
    }
    return out;
  }

  // Inserts absent ids and adds one to the count of every occurrence.
  void count(const IdArray& ids) {
    auto [in, n] = checked(ids);
    py::gil_scoped_release release;
    for (int64_t i = 0; i < n; ++i) counts_[find_or_insert(in[i])] += 1;
  }

  // (ids [n] int64, counts [n] int64), both in slot order.
  py::tuple to_arrays() const {
    py::array_t<int64_t> ids(size()), counts(size());
    std::copy(ids_.begin(), ids_.end(), ids.mutable_data());
    std::copy(counts_.begin(), counts_.end(), counts.mutable_data());
    return py::make_tuple(ids, counts);
  }

  static EntityTable from_arrays(const IdArray& ids, const IdArray& counts) {
    if (ids.ndim() != 1 || counts.ndim() != 1 || ids.shape(0) != counts.shape(0))
      throw std::invalid_argument("EntityTable.from_arrays: ids and counts must be 1-D arrays of equal length");
    EntityTable table(ids.shape(0));
    auto [in, n] = table.checked(ids);
    const int64_t* c = counts.data();
    for (int64_t i = 0; i < n; ++i) {
      if (table.find_or_insert(in[i]) != i)
        throw std::invalid_argument("EntityTable.from_arrays: duplicate id " + std::to_string(in[i]));
      table.counts_[i] = c[i];
    }
    return table;
  }

 private:
  std::pair<const int64_t*, int64_t> checked(const IdArray& ids) const {
    if (ids.ndim() != 1)
      throw std::invalid_argument("EntityTable: ids must be a 1-D int64 array, got ndim=" + std::to_string(ids.ndim()));
    const int64_t* p = ids.data();
    const int64_t n = ids.shape(0);
    for (int64_t i = 0; i < n; ++i)
      if (p[i] < 0)
        throw std::invalid_argument("EntityTable: ids must be >= 0, got " + std::to_string(p[i]) + " at index " + std::to_string(i));
    return {p, n};
  }

  int32_t find_or_insert(int64_t key) {
    uint64_t mask = keys_.size() - 1;
    uint64_t b = splitmix64(static_cast<uint64_t>(key)) & mask;
    while (keys_[b] != kEmpty) {
      if (keys_[b] == key) return values_[b];
      b = (b + 1) & mask;
    }
    if (ids_.size() >= static_cast<size_t>(INT32_MAX))
      throw std::overflow_error("EntityTable: more than 2^31 - 1 entities");
    if (2 * (ids_.size() + 1) > keys_.size()) {  // keep the load factor <= 1/2
      grow();
      return find_or_insert(key);
    }
    const int32_t slot = static_cast<int32_t>(ids_.size());
    keys_[b] = key;
    values_[b] = slot;
    ids_.push_back(key);
    counts_.push_back(0);
    return slot;
  }

  void grow() {
    std::vector<int64_t> keys(keys_.size() * 2, kEmpty);
    std::vector<int32_t> values(keys.size(), -1);
    const uint64_t mask = keys.size() - 1;
    for (size_t slot = 0; slot < ids_.size(); ++slot) {
      uint64_t b = splitmix64(static_cast<uint64_t>(ids_[slot])) & mask;
      while (keys[b] != kEmpty) b = (b + 1) & mask;
      keys[b] = ids_[slot];
      values[b] = static_cast<int32_t>(slot);
    }
    keys_.swap(keys);
    values_.swap(values);
  }

  std::vector<int64_t> keys_;    // bucket -> id (kEmpty if free)
  std::vector<int32_t> values_;  // bucket -> slot
  std::vector<int64_t> ids_;     // slot -> id
  std::vector<int64_t> counts_;  // slot -> count
};

}  // namespace

void bind_entity_table(py::module_& m) {
  py::class_<EntityTable>(m, "EntityTable")
      .def(py::init<int64_t>(), py::arg("capacity") = 0)
      .def("insert", &EntityTable::insert, py::arg("ids"), "Insert ids (int64 >= 0); returns the int32 slot of every id.")
      .def("lookup", &EntityTable::lookup, py::arg("ids"), "int32 slots of ids, -1 where absent.")
      .def("count", &EntityTable::count, py::arg("ids"), "Insert absent ids and count every occurrence.")
      .def("to_arrays", &EntityTable::to_arrays, "(ids, counts), int64 arrays in slot order.")
      .def_static("from_arrays", &EntityTable::from_arrays, py::arg("ids"), py::arg("counts"))
      .def_property_readonly("num_buckets", &EntityTable::num_buckets)
      .def("__len__", &EntityTable::size);
}
