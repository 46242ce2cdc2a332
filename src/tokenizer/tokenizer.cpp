#include "tokenizer/tokenizer.h"

#include <algorithm>
#include <filesystem>
#include <mutex>

#include "core/error.h"
#include "tokenizer/bpe.h"
#include "tokenizer/pretokenizer.h"
#include "tokenizer/regex.h"
#include "tokenizer/utf8.h"

namespace dsv3::tok {

namespace {

// Only normalizers that change nothing are supported: null and (nested) empty Sequences. Anything
// else would also have to be applied to "normalized" added tokens and offsets.
void check_normalizer(const Json& n, const std::string& where) {
  if (n.is_null()) return;
  check(n.is_object(), where + " must be an object or null");
  const std::string type = json_string(n, "type", where);
  check(type == "Sequence", where + ".type '" + type + "' is not supported",
        "dsv3 supports tokenizers without normalization (byte-level BPE such as DeepSeek-V3's)");
  const Json& list = json_field(n, "normalizers", where);
  check(list.is_array(), where + ".normalizers must be an array");
  for (size_t i = 0; i < list.size(); ++i)
    check_normalizer(list[i], where + ".normalizers[" + std::to_string(i) + "]");
}

void check_decoder(const Json& d, const std::string& where) {
  check(!d.is_null(), where + " is null; dsv3 needs a ByteLevel decoder",
        "byte-level BPE tokenizer.json files have \"decoder\": {\"type\": \"ByteLevel\", ...}");
  check(d.is_object(), where + " must be an object");
  const std::string type = json_string(d, "type", where);
  check(type == "ByteLevel", where + ".type '" + type + "' is not supported; dsv3 decodes ByteLevel only");
}

// The bytes a token stands for, as the ByteLevel decoder computes them: every character mapped
// back through the byte table, or, if any character is outside it, the token's own UTF-8 bytes.
std::string byte_level_decode(const std::string& token) {
  std::string out;
  out.reserve(token.size());
  for (size_t i = 0; i < token.size();) {
    const int byte = byte_level_byte(utf8_next(token, i));
    if (byte < 0) return token;
    out += static_cast<char>(byte);
  }
  return out;
}

std::optional<std::string> token_field(const Json& j, const char* key, const std::string& origin) {
  if (!j.contains(key) || j[key].is_null()) return std::nullopt;
  const Json& v = j[key];
  if (v.is_string()) return v.get<std::string>();
  check(v.is_object() && v.contains("content") && v["content"].is_string(),
        origin + ": field '" + key + "' must be a string or an object with a string \"content\", got " +
            v.dump());
  return v["content"].get<std::string>();
}

}  // namespace

// ----------------------------------------------------------------------------------------------
// tokenizer_config.json

TokenizerConfig TokenizerConfig::from_file(const std::string& path) {
  TokenizerConfig c = from_json(read_json_file(path), path);
  c.path = path;
  return c;
}

TokenizerConfig TokenizerConfig::from_json(const Json& j, const std::string& origin) {
  check(j.is_object(), origin + ": expected a JSON object");
  TokenizerConfig c;
  c.bos_token = token_field(j, "bos_token", origin);
  c.eos_token = token_field(j, "eos_token", origin);
  c.pad_token = token_field(j, "pad_token", origin);
  c.unk_token = token_field(j, "unk_token", origin);
  if (j.contains("add_bos_token") && !j["add_bos_token"].is_null())
    c.add_bos_token = json_bool(j, "add_bos_token", origin);
  if (j.contains("add_eos_token") && !j["add_eos_token"].is_null())
    c.add_eos_token = json_bool(j, "add_eos_token", origin);
  if (j.contains("chat_template") && !j["chat_template"].is_null()) {
    const Json& t = j["chat_template"];
    if (t.is_string()) {
      c.chat_template = t.get<std::string>();
    } else {
      // Newer files may list named templates: [{"name": "default", "template": "..."}, ...].
      check(t.is_array(), origin + ": field 'chat_template' must be a string or a list of {name, template}");
      for (size_t i = 0; i < t.size(); ++i) {
        const std::string where = origin + ": chat_template[" + std::to_string(i) + "]";
        if (json_string(t[i], "name", where) == "default")
          c.chat_template = json_string(t[i], "template", where);
      }
    }
  }
  return c;
}

// ----------------------------------------------------------------------------------------------
// Tokenizer

struct Tokenizer::Impl {
  std::string origin;
  BpeModel model;
  AddedVocabulary added;
  PreTokenizer pre;
  TokenizerConfig config;
  std::vector<std::string> warnings;

  // Per id: the bytes it decodes to and flags.
  enum : uint8_t { kExists = 1, kSpecial = 2, kAdded = 4 };
  std::vector<std::string> id_bytes;
  std::vector<uint8_t> id_flags;
  std::optional<int32_t> bos, eos, pad;

  // Working memory, one per concurrent encode; taken from and returned to a pool so that encode()
  // stays const and thread-safe while the word cache survives between calls.
  struct Scratch {
    PreTokenizer::Scratch pre;
    BpeScratch bpe;
    std::vector<AddedVocabulary::Piece> raw_pieces, normalized_pieces;
    std::string sanitized;
  };
  std::mutex pool_mu;
  std::vector<std::unique_ptr<Scratch>> pool;

  Impl(BpeModel m, PreTokenizer p) : model(std::move(m)), pre(std::move(p)) {}

  std::unique_ptr<Scratch> acquire() {
    {
      std::lock_guard<std::mutex> lock(pool_mu);
      if (!pool.empty()) {
        auto s = std::move(pool.back());
        pool.pop_back();
        return s;
      }
    }
    return std::make_unique<Scratch>();
  }
  void release(std::unique_ptr<Scratch> s) {
    std::lock_guard<std::mutex> lock(pool_mu);
    pool.push_back(std::move(s));
  }
};

namespace {

// Feeds pre-tokenized words to BPE.
class BpeSink : public WordSink {
 public:
  BpeSink(const BpeModel& model, BpeScratch& scratch, std::vector<int32_t>& out)
      : model_(model), scratch_(scratch), out_(out) {}
  void word(std::string_view w) override { model_.encode_word(w, scratch_, out_); }

 private:
  const BpeModel& model_;
  BpeScratch& scratch_;
  std::vector<int32_t>& out_;
};

}  // namespace

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

std::string Tokenizer::resolve_path(const std::string& file_or_dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  std::string path = file_or_dir;
  if (fs::is_directory(path, ec)) path = (fs::path(path) / "tokenizer.json").string();
  check(fs::is_regular_file(path, ec), "tokenizer file not found: " + path,
        "pass --tokenizer FILE (a tokenizer.json) or --model DIR (a folder that contains tokenizer.json); "
        "scripts/fetch_tokenizer.sh downloads DeepSeek-V3's");
  return path;
}

Tokenizer Tokenizer::from_file(const std::string& tokenizer_json) {
  namespace fs = std::filesystem;
  const std::string path = resolve_path(tokenizer_json);
  TokenizerConfig config;
  const fs::path config_path = fs::path(path).parent_path() / "tokenizer_config.json";
  std::error_code ec;
  if (fs::is_regular_file(config_path, ec)) config = TokenizerConfig::from_file(config_path.string());
  return from_json(read_json_file(path), path, std::move(config));
}

Tokenizer Tokenizer::from_json(const Json& j, const std::string& origin, TokenizerConfig config) {
  check(j.is_object(), origin + ": expected a JSON object (a tokenizer.json)");
  if (j.contains("version")) {
    const std::string version = json_string(j, "version", origin);
    check(version == "1.0", origin + ": field 'version' is '" + version + "', expected '1.0'");
  }
  check_normalizer(j.contains("normalizer") ? j["normalizer"] : Json(), origin + ": normalizer");
  PreTokenizer pre =
      PreTokenizer::from_json(j.contains("pre_tokenizer") ? j["pre_tokenizer"] : Json(), origin);
  BpeModel model = BpeModel::from_json(json_field(j, "model", origin), origin, pre.byte_level());
  check_decoder(j.contains("decoder") ? j["decoder"] : Json(), origin + ": decoder");

  auto impl = std::make_unique<Impl>(std::move(model), std::move(pre));
  impl->origin = origin;
  impl->added = AddedVocabulary::from_json(j.contains("added_tokens") ? j["added_tokens"] : Json(),
                                           impl->model, origin, &impl->warnings);
  impl->config = std::move(config);

  int32_t max_id = impl->model.max_id();
  for (const auto& t : impl->added.tokens()) max_id = std::max(max_id, t.id);
  impl->id_bytes.resize(static_cast<size_t>(max_id + 1));
  impl->id_flags.assign(static_cast<size_t>(max_id + 1), 0);
  for (int32_t id = 0; id <= impl->model.max_id(); ++id) {
    if (const std::string* t = impl->model.id_to_token(id)) {
      impl->id_bytes[id] = byte_level_decode(*t);
      impl->id_flags[id] = Impl::kExists;
    }
  }
  for (const auto& t : impl->added.tokens()) {
    impl->id_bytes[t.id] = byte_level_decode(t.content);
    impl->id_flags[t.id] = Impl::kExists | Impl::kAdded | (t.special ? Impl::kSpecial : 0);
  }

  Tokenizer tok(std::move(impl));
  Impl& im = *tok.impl_;
  const auto lookup = [&](const std::optional<std::string>& name,
                          const char* field) -> std::optional<int32_t> {
    if (!name) return std::nullopt;
    auto id = tok.token_to_id(*name);
    check(id.has_value(), im.config.path + ": " + field + " '" + *name + "' is not a token of " + origin);
    return id;
  };
  im.bos = lookup(im.config.bos_token, "bos_token");
  im.eos = lookup(im.config.eos_token, "eos_token");
  im.pad = lookup(im.config.pad_token, "pad_token");
  // Without a config, look for the usual names among the special tokens.
  const auto discover = [&](std::initializer_list<const char*> names) -> std::optional<int32_t> {
    for (const char* n : names) {
      if (auto id = im.added.by_content(n); id && tok.is_special(*id)) return id;
    }
    return std::nullopt;
  };
  if (!im.bos)
    im.bos = discover({"<｜begin▁of▁sentence｜>", "<|begin_of_text|>", "<s>", "<|startoftext|>", "<bos>"});
  if (!im.eos)
    im.eos = discover({"<｜end▁of▁sentence｜>", "<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>"});
  return tok;
}

void Tokenizer::encode(std::string_view text, std::vector<int32_t>& out, const EncodeOptions& options) const {
  Impl& im = *impl_;
  std::unique_ptr<Impl::Scratch> scratch = im.acquire();
  Impl::Scratch& s = *scratch;
  std::string_view t = text;
  if (!utf8_is_valid(text)) {
    s.sanitized = utf8_sanitize(text);
    t = s.sanitized;
  }
  BpeSink sink(im.model, s.bpe, out);
  const bool newer = has_post_unicode14_chars(t);
  if (im.added.empty() || options.added_as_text) {
    im.pre.run(t, s.pre, sink, newer);
  } else {
    // Two passes like `tokenizers`: tokens matched on raw text, then normalized tokens on the rest.
    s.raw_pieces.clear();
    im.added.split(t, /*normalized=*/false, options.special_as_text, s.pre.match, s.raw_pieces);
    for (const auto& p : s.raw_pieces) {
      if (p.id >= 0) {
        out.push_back(p.id);
        continue;
      }
      const std::string_view piece = t.substr(p.begin, p.end - p.begin);
      s.normalized_pieces.clear();
      im.added.split(piece, /*normalized=*/true, options.special_as_text, s.pre.match, s.normalized_pieces);
      for (const auto& q : s.normalized_pieces) {
        if (q.id >= 0) {
          out.push_back(q.id);
        } else {
          im.pre.run(piece.substr(q.begin, q.end - q.begin), s.pre, sink, newer);
        }
      }
    }
  }
  im.release(std::move(scratch));
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, const EncodeOptions& options) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  encode(text, out, options);
  return out;
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special) const {
  const Impl& im = *impl_;
  std::string bytes;
  for (int32_t id : ids) {
    if (id < 0 || static_cast<size_t>(id) >= im.id_flags.size() || !(im.id_flags[id] & Impl::kExists))
      continue;
    if (skip_special && (im.id_flags[id] & Impl::kSpecial)) continue;
    bytes += im.id_bytes[id];
  }
  return utf8_is_valid(bytes) ? bytes : utf8_sanitize(bytes);
}

std::string_view Tokenizer::token_bytes(int32_t id) const {
  const Impl& im = *impl_;
  if (id < 0 || static_cast<size_t>(id) >= im.id_bytes.size()) return {};
  return im.id_bytes[id];
}

std::optional<std::string> Tokenizer::id_to_token(int32_t id) const {
  if (const AddedToken* t = impl_->added.by_id(id)) return t->content;
  if (const std::string* t = impl_->model.id_to_token(id)) return *t;
  return std::nullopt;
}

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const {
  if (auto id = impl_->added.by_content(token)) return id;
  return impl_->model.token_to_id(token);
}

const std::vector<AddedToken>& Tokenizer::added_tokens() const {
  return impl_->added.tokens();
}

bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && static_cast<size_t>(id) < impl_->id_flags.size() &&
         (impl_->id_flags[id] & Impl::kSpecial);
}

bool Tokenizer::is_added(int32_t id) const {
  return id >= 0 && static_cast<size_t>(id) < impl_->id_flags.size() && (impl_->id_flags[id] & Impl::kAdded);
}

int32_t Tokenizer::vocab_size() const {
  return static_cast<int32_t>(impl_->id_flags.size());
}
std::optional<int32_t> Tokenizer::bos_id() const {
  return impl_->bos;
}
std::optional<int32_t> Tokenizer::eos_id() const {
  return impl_->eos;
}
std::optional<int32_t> Tokenizer::pad_id() const {
  return impl_->pad;
}
const TokenizerConfig& Tokenizer::config() const {
  return impl_->config;
}
const std::vector<std::string>& Tokenizer::warnings() const {
  return impl_->warnings;
}

}  // namespace dsv3::tok
