#include "server/metrics.h"

#include <sstream>

namespace dsv3::server {

void Histogram::observe(double v) {
  std::lock_guard<std::mutex> lock(mu_);
  size_t i = 0;
  while (i < bounds_.size() && v > bounds_[i]) ++i;
  ++counts_[i];
  sum_ += v;
  ++count_;
}

std::string Histogram::render(const std::string& name, const std::string& help) const {
  std::lock_guard<std::mutex> lock(mu_);
  std::ostringstream s;
  s << "# HELP " << name << " " << help << "\n# TYPE " << name << " histogram\n";
  uint64_t cumulative = 0;
  for (size_t i = 0; i < bounds_.size(); ++i) {
    cumulative += counts_[i];
    s << name << "_bucket{le=\"" << bounds_[i] << "\"} " << cumulative << "\n";
  }
  s << name << "_bucket{le=\"+Inf\"} " << count_ << "\n" << name << "_sum " << sum_ << "\n" << name << "_count " << count_ << "\n";
  return s.str();
}

void Metrics::count_request(const std::string& endpoint, int status) {
  std::lock_guard<std::mutex> lock(mu_);
  ++requests_[{endpoint, status}];
}

std::string Metrics::render() const {
  std::ostringstream s;
  s << "# HELP dsv3_requests_total HTTP requests by endpoint and status.\n# TYPE dsv3_requests_total counter\n";
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [key, n] : requests_)
      s << "dsv3_requests_total{endpoint=\"" << key.first << "\",status=\"" << key.second << "\"} " << n << "\n";
  }
  auto counter = [&](const char* name, const char* help, uint64_t v) {
    s << "# HELP " << name << " " << help << "\n# TYPE " << name << " counter\n" << name << " " << v << "\n";
  };
  auto gauge = [&](const char* name, const char* help, int64_t v) {
    s << "# HELP " << name << " " << help << "\n# TYPE " << name << " gauge\n" << name << " " << v << "\n";
  };
  counter("dsv3_prompt_tokens_total", "Prompt tokens processed.", prompt_tokens);
  counter("dsv3_completion_tokens_total", "Tokens generated.", completion_tokens);
  counter("dsv3_prompt_cache_hit_tokens_total", "Prompt tokens served from the cache.", cache_hit_tokens);
  const uint64_t p = prompt_tokens;
  s << "# HELP dsv3_prompt_cache_hit_rate Fraction of prompt tokens served from the cache.\n"
       "# TYPE dsv3_prompt_cache_hit_rate gauge\ndsv3_prompt_cache_hit_rate "
    << (p ? static_cast<double>(cache_hit_tokens) / static_cast<double>(p) : 0.0) << "\n";
  gauge("dsv3_queue_depth", "Requests waiting for the engine.", queue_depth);
  gauge("dsv3_batch_size", "Sequences the engine is running now.", running);
  s << time_to_first_token.render("dsv3_time_to_first_token_seconds", "Time from arrival to the first token.");
  s << time_per_output_token.render("dsv3_time_per_output_token_seconds", "Time between generated tokens.");
  return s.str();
}

}  // namespace dsv3::server
