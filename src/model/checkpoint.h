// A checkpoint directory: config.json plus one model.safetensors or shards listed in
// model.safetensors.index.json. Shards are opened lazily, so tensors that are never asked for (the MTP
// layer, unless requested) are never read. Every lookup checks dtype and shape and reports the expected
// and actual values with the file and tensor names.
#pragma once

#include <initializer_list>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "model/safetensors.h"

namespace dsv3 {

// Where weights come from: a checkpoint on disk, or (for the random-checkpoint generator) a recorder
// that lists the tensors a config implies. One loader walks the model for both.
class TensorSource {
 public:
  virtual ~TensorSource() = default;
  virtual const std::string& dir() const = 0;
  virtual bool contains(const std::string& name) const = 0;
  // The tensor `name`, checked against `shape` (-1 matches any size) and the allowed dtypes.
  virtual TensorView get(const std::string& name, std::initializer_list<DType> dtypes,
                         const std::vector<int64_t>& shape) = 0;
};

class Checkpoint : public TensorSource {
 public:
  explicit Checkpoint(const std::string& dir);

  const std::string& dir() const override { return dir_; }
  bool contains(const std::string& name) const override;
  TensorView get(const std::string& name, std::initializer_list<DType> dtypes,
                 const std::vector<int64_t>& shape) override;
  // Every tensor name in the checkpoint (from the index, or the single file's header).
  std::vector<std::string> names() const;
  // Pulls every opened file into memory (see MappedFile::prefault).
  void prefault() const;

 private:
  const SafetensorsFile& file_for(const std::string& name);
  std::string dir_;
  std::map<std::string, std::string> weight_map_;  // tensor name -> file name (relative to dir_)
  std::map<std::string, std::unique_ptr<SafetensorsFile>> files_;
  std::vector<std::unique_ptr<uint8_t[]>> aligned_copies_;  // tensors whose bytes were misaligned in the file
};

}  // namespace dsv3
