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
  counter("dsv3_prompt_tokens_total", "Prompt tokens processed.", prompt_tokens);
  counter("dsv3_completion_tokens_total", "Tokens generated.", completion_tokens);
  counter("dsv3_prompt_cache_hit_tokens_total", "Prompt tokens served from the cache.", cache_hit_tokens);
  const uint64_t p = prompt_tokens;
  s << "# HELP dsv3_prompt_cache_hit_rate Fraction of prompt tokens served from the cache.\n"
       "# TYPE dsv3_prompt_cache_hit_rate gauge\ndsv3_prompt_cache_hit_rate "
    << (p ? static_cast<double>(cache_hit_tokens) / static_cast<double>(p) : 0.0) << "\n";
  s << time_to_first_token.render("dsv3_time_to_first_token_seconds", "Time from arrival to the first token.");
  s << time_per_output_token.render("dsv3_time_per_output_token_seconds", "Time between generated tokens.");
  return s.str();
}

std::string render_scheduler_stats(const SchedulerStats& st) {
  std::ostringstream s;
  auto metric = [&](const char* type, const char* name, const char* help, int64_t v) {
    s << "# HELP " << name << " " << help << "\n# TYPE " << name << " " << type << "\n" << name << " " << v << "\n";
  };
  metric("gauge", "dsv3_queue_depth", "Sequences waiting for the engine.", st.waiting);
  metric("gauge", "dsv3_running_sequences", "Sequences admitted to the batch.", st.running);
  metric("gauge", "dsv3_batch_size", "Sequences in the engine's last step.", st.last_batch_sequences);
  metric("gauge", "dsv3_batch_tokens", "Tokens in the engine's last step (decode and prefill chunks).", st.last_batch_tokens);
  metric("counter", "dsv3_engine_steps_total", "Engine steps (batched forward passes).", st.steps);
  metric("gauge", "dsv3_cache_blocks_total", "64-token blocks in the latent-cache pool.", st.blocks_total);
  metric("gauge", "dsv3_cache_blocks_used", "Blocks held by running sequences or the prefix cache.", st.blocks_used);
  metric("gauge", "dsv3_cache_blocks_cached", "Blocks held only by the prefix cache (reclaimable).", st.blocks_cached);
  metric("counter", "dsv3_prefix_hit_tokens_total", "Prompt tokens served from cached blocks.", st.prefix_hit_tokens);
  metric("counter", "dsv3_preemptions_total", "Sequences preempted (recomputed later) for lack of blocks.", st.preemptions);
  metric("counter", "dsv3_sequences_completed_total", "Sequences the engine finished.", st.completed);
  if (st.disk_enabled) {
    metric("counter", "dsv3_disk_cache_reads_total", "Blocks read from the disk tier.", st.disk_reads);
    metric("counter", "dsv3_disk_cache_writes_total", "Blocks written to the disk tier.", st.disk_writes);
    metric("counter", "dsv3_disk_cache_hits_total", "Prefix-cache hits served from disk.", st.disk_hits);
    metric("counter", "dsv3_disk_cache_corrupt_dropped_total", "Corrupt or truncated cache files dropped.", st.disk_corrupt_dropped);
    metric("gauge", "dsv3_disk_cache_bytes", "Bytes in the disk tier.", st.disk_bytes);
  }
  return s.str();
}

}  // namespace dsv3::server
