// Tokenizer throughput, single thread: encode, decode and streaming decode of ~10 MB of mixed text
// (prose, code, many scripts, emoji, chat markup), printed as a table of MB/s.
//
//   python3 tools/make_tokenizer_goldens.py --bench-corpus /tmp/corpus.jsonl     # the same text that
//   dsv3_tokenizer_bench --corpus /tmp/corpus.jsonl [--tokenizer FILE] [--runs 3] # tokenizers is timed on
//
// Without --corpus the golden strings are repeated up to --mb megabytes.
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/json.h"
#include "tokenizer/stream.h"
#include "tokenizer/tokenizer.h"

namespace {

using Clock = std::chrono::steady_clock;
using dsv3::tok::Tokenizer;

std::vector<std::string> read_corpus(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  dsv3::check(bool(in), "cannot open " + path, "make it with tools/make_tokenizer_goldens.py --bench-corpus");
  std::vector<std::string> docs;
  std::string line;
  while (std::getline(in, line)) {
    if (!line.empty()) docs.push_back(dsv3::json_string(dsv3::parse_json(line, path), "text", path));
  }
  return docs;
}

std::vector<std::string> golden_corpus(const std::string& root, double mb) {
  FILE* f = popen(("gzip -dc '" + root + "/tests/tokenizer/goldens/deepseek_v3_ids.jsonl.gz'").c_str(), "r");
  dsv3::check(f != nullptr, "cannot read the golden strings");
  std::string data;
  char buf[1 << 16];
  for (size_t n; (n = std::fread(buf, 1, sizeof buf, f)) > 0;) data.append(buf, n);
  pclose(f);
  std::vector<std::string> texts;
  for (size_t start = 0, end; start < data.size(); start = end + 1) {
    end = data.find('\n', start);
    if (end == std::string::npos) end = data.size();
    const dsv3::Json j = dsv3::parse_json(std::string_view(data).substr(start, end - start), "goldens");
    if (j.contains("text")) texts.push_back(j["text"].get<std::string>());
  }
  std::vector<std::string> docs;
  size_t bytes = 0;
  for (size_t k = 0; bytes < mb * 1e6 && !texts.empty(); ++k) {
    docs.push_back(texts[k % texts.size()]);
    bytes += docs.back().size();
  }
  return docs;
}

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  std::string root = DSV3_SOURCE_DIR_FOR_BENCH;
  std::string tokenizer_path = root + "/.cache/tokenizer/tokenizer.json", corpus;
  int runs = 3;
  double mb = 10;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--tokenizer")
      tokenizer_path = value;
    else if (flag == "--corpus")
      corpus = value;
    else if (flag == "--runs")
      runs = std::max(1, std::stoi(value));
    else if (flag == "--mb")
      mb = std::stod(value);
    else {
      std::fprintf(stderr, "usage: %s [--tokenizer FILE] [--corpus JSONL] [--runs N] [--mb MB]\n", argv[0]);
      return 2;
    }
  }
  try {
    auto t0 = Clock::now();
    const Tokenizer tok = Tokenizer::from_file(tokenizer_path);
    const double load_s = seconds_since(t0);
    const std::vector<std::string> docs = corpus.empty() ? golden_corpus(root, mb) : read_corpus(corpus);
    size_t bytes = 0;
    for (const auto& d : docs) bytes += d.size();

    // Encode: the first run starts with empty word caches; later runs reuse them, as a server does.
    std::vector<std::vector<int32_t>> ids(docs.size());
    double first_s = 0, best_s = 1e30;
    size_t n_ids = 0;
    for (int r = 0; r < runs; ++r) {
      t0 = Clock::now();
      n_ids = 0;
      for (size_t k = 0; k < docs.size(); ++k) {
        ids[k].clear();
        tok.encode(docs[k], ids[k]);
        n_ids += ids[k].size();
      }
      const double s = seconds_since(t0);
      if (r == 0) first_s = s;
      best_s = std::min(best_s, s);
    }

    double decode_s = 1e30, stream_s = 1e30;
    for (int r = 0; r < runs; ++r) {
      t0 = Clock::now();
      size_t out = 0;
      for (const auto& v : ids) out += tok.decode(v).size();
      decode_s = std::min(decode_s, seconds_since(t0));
      dsv3::check(out == bytes, "decode(encode(corpus)) changed the size");
      t0 = Clock::now();
      out = 0;
      for (const auto& v : ids) {
        dsv3::tok::StreamDecoder dec(tok, {.skip_special = false});
        for (int32_t id : v) out += dec.push(id).size();
        out += dec.finish().size();
      }
      stream_s = std::min(stream_s, seconds_since(t0));
      dsv3::check(out == bytes, "streaming decode changed the size");
    }

    const double mbytes = double(bytes) / 1e6;
    std::printf("tokenizer %s (loaded in %.2f s)\n", tokenizer_path.c_str(), load_s);
    std::printf("corpus %s: %zu documents, %zu bytes, %zu ids (%.2f bytes/id)\n",
                corpus.empty() ? "(golden strings)" : corpus.c_str(), docs.size(), bytes, n_ids,
                double(bytes) / double(n_ids));
    std::printf("\n| operation (1 thread)            |     MB/s |  M ids/s |\n");
    std::printf("|---------------------------------|---------:|---------:|\n");
    const auto row = [&](const char* name, double s) {
      std::printf("| %-31s | %8.2f | %8.2f |\n", name, mbytes / s, double(n_ids) / s / 1e6);
    };
    row("encode, first run (cold cache)", first_s);
    row("encode, best of runs", best_s);
    row("decode", decode_s);
    row("streaming decode (id by id)", stream_s);
    std::printf("\nRESULT dsv3_encode_MBps=%.2f cold_MBps=%.2f docs=%zu bytes=%zu ids=%zu\n", mbytes / best_s,
                mbytes / first_s, docs.size(), bytes, n_ids);
  } catch (const dsv3::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    if (!e.hint().empty()) std::fprintf(stderr, "hint: %s\n", e.hint().c_str());
    return 1;
  }
  return 0;
}
