#include "model/checkpoint.h"

#include <sys/stat.h>

#include <cstring>

#include "core/error.h"
#include "core/json.h"

namespace dsv3 {

namespace {

bool file_exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string dims_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += shape[i] < 0 ? std::string("*") : std::to_string(shape[i]);
  }
  return s + "]";
}

}  // namespace

Checkpoint::Checkpoint(const std::string& dir) : dir_(dir) {
  struct stat st {};
  check(::stat(dir.c_str(), &st) == 0 && S_ISDIR(st.st_mode), "model directory " + dir + " does not exist",
        "pass --model DIR with a Hugging Face checkpoint directory (config.json + *.safetensors)");
  const std::string index_path = dir + "/model.safetensors.index.json";
  const std::string single_path = dir + "/model.safetensors";
  if (file_exists(index_path)) {
    Json index = read_json_file(index_path);
    const Json& map = json_field(index, "weight_map", index_path);
    check(map.is_object(), index_path + ": weight_map must be an object");
    for (auto it = map.begin(); it != map.end(); ++it) {
      check(it.value().is_string(), index_path + ": weight_map entry '" + it.key() + "' must be a file name");
      const std::string file = it.value().get<std::string>();
      check(!file.empty() && file.find('/') == std::string::npos && file != "..",
            index_path + ": weight_map entry '" + it.key() + "' names an invalid file '" + file + "'");
      weight_map_[it.key()] = file;
    }
    check(!weight_map_.empty(), index_path + ": weight_map is empty");
  } else if (file_exists(single_path)) {
    auto f = std::make_unique<SafetensorsFile>(single_path);
    for (const auto& name : f->names()) weight_map_[name] = "model.safetensors";
    files_["model.safetensors"] = std::move(f);
  } else {
    throw Error("no model.safetensors or model.safetensors.index.json in " + dir,
                "the directory must hold the checkpoint's safetensors files next to config.json");
  }
}

bool Checkpoint::contains(const std::string& name) const { return weight_map_.count(name) != 0; }

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  for (const auto& kv : weight_map_) out.push_back(kv.first);
  return out;
}

void Checkpoint::prefault() const {
  for (const auto& [name, file] : files_)
    if (file) file->prefault();
}

const SafetensorsFile& Checkpoint::file_for(const std::string& name) {
  auto it = weight_map_.find(name);
  check(it != weight_map_.end(), dir_ + ": missing tensor '" + name + "'",
        "the checkpoint is incomplete or is not a DeepSeek-V2/V3 checkpoint matching its config.json");
  auto& slot = files_[it->second];
  if (!slot) slot = std::make_unique<SafetensorsFile>(dir_ + "/" + it->second);
  check(slot->contains(name), slot->path() + ": tensor '" + name +
                                  "' is listed in model.safetensors.index.json but not present in the file",
        "the shard is incomplete or the index is stale; download the checkpoint again");
  return *slot;
}

TensorView Checkpoint::get(const std::string& name, std::initializer_list<DType> dtypes,
                           const std::vector<int64_t>& shape) {
  TensorView t = file_for(name).get(name);
  bool dtype_ok = false;
  std::string allowed;
  for (DType d : dtypes) {
    dtype_ok |= t.dtype == d;
    allowed += (allowed.empty() ? "" : " or ") + std::string(dtype_name(d));
  }
  check(dtype_ok, t.file + ": tensor '" + name + "' has dtype " + dtype_name(t.dtype) + ", expected " + allowed);
  bool shape_ok = t.shape.size() == shape.size();
  for (size_t i = 0; shape_ok && i < shape.size(); ++i) shape_ok = shape[i] < 0 || shape[i] == t.shape[i];
  check(shape_ok, t.file + ": tensor '" + name + "' has shape " + t.shape_str() + ", expected " + dims_str(shape),
        "config.json does not match the weights; check that they come from the same checkpoint");
  // Kernels read elements through typed pointers; a file whose header length is not padded can leave
  // data misaligned, so such a tensor is copied once into aligned memory.
  const size_t align = dtype_size(t.dtype);
  if (align > 1 && reinterpret_cast<uintptr_t>(t.data) % align != 0) {
    auto copy = std::make_unique<uint8_t[]>(t.nbytes);
    std::memcpy(copy.get(), t.data, t.nbytes);
    t.data = copy.get();
    aligned_copies_.push_back(std::move(copy));
  }
  return t;
}

}  // namespace dsv3
