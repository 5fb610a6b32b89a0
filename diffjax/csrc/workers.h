// The worker threads diffjax's CPU custom calls split their batch over (onednn_conv.cc, group_norm.cc,
// attention.cc). One call's chunks run at a time: chunk 0 on the calling (XLA) thread, the others on
// these workers. Waiting spins before sleeping on a condition variable, for DIFFJAX_CPU_SPIN_US
// microseconds (default kDefaultSpinUs, read at each call; diffjax/cpu_kernels.py validates it): a U-Net
// step makes calls back to back (about 90 per sampling step) with XLA's own ops of tens to hundreds of
// microseconds between them, and a futex wake-up per call cost more than the small sampling-batch
// kernels themselves (experiments/bench_worker_spin.py times the setting).
#ifndef DIFFJAX_CSRC_WORKERS_H_
#define DIFFJAX_CSRC_WORKERS_H_

#include <immintrin.h>
#include <omp.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace diffjax {

constexpr int kDefaultSpinUs = 200;

// DIFFJAX_CPU_SPIN_US as a number of microseconds in [0, 100000]; the default when unset or malformed.
inline int SpinSettingUs() {
  const char* value = std::getenv("DIFFJAX_CPU_SPIN_US");
  if (value == nullptr || *value == '\0') return kDefaultSpinUs;
  char* end = nullptr;
  const long us = std::strtol(value, &end, 10);
  return (*end != '\0' || us < 0 || us > 100000) ? kDefaultSpinUs : static_cast<int>(us);
}

class Workers {
 public:
  // Runs fn(0..n-1); returns when all chunks finished.
  void Run(int n, const std::function<void(int)>& fn) {
    if (n <= 1) {
      fn(0);
      return;
    }
    std::lock_guard<std::mutex> call(call_mutex_);  // one call's chunks at a time
    spin_us_.store(SpinSettingUs(), std::memory_order_relaxed);
    Grow(n - 1);
    auto job = std::make_shared<Job>(&fn, n);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = job;
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    fn(0);
    auto done = [&] { return job->pending.load(std::memory_order_acquire) == 0; };
    if (!SpinUntil(done)) {
      std::unique_lock<std::mutex> lock(mutex_);
      done_.wait(lock, done);
    }
  }

 private:
  // One call: chunks 1..limit-1 are taken by workers through `next`. A worker that wakes late holds
  // the job alive through its shared_ptr and finds no chunk left, so it never touches a finished call.
  struct Job {
    Job(const std::function<void(int)>* f, int n) : fn(f), limit(n), pending(n - 1) {}
    const std::function<void(int)>* fn;
    const int limit;
    std::atomic<int> next{1};
    std::atomic<int> pending;
  };

  // Spins (with pause) up to spin_us_ microseconds for `ready`; true if it became ready.
  template <typename F>
  bool SpinUntil(F ready) const {
    const auto start = std::chrono::steady_clock::now();
    const auto limit = std::chrono::microseconds(spin_us_.load(std::memory_order_relaxed));
    for (int i = 0;; ++i) {
      if (ready()) return true;
      _mm_pause();
      if ((i & 255) == 255 && std::chrono::steady_clock::now() - start > limit) return ready();
    }
  }

  void Grow(int count) {
    while (static_cast<int>(threads_.size()) < count) {
      // Started before this call's generation is published, so it takes part in this call too.
      threads_.emplace_back([this, seen = generation_.load()] { Loop(seen); });
      threads_.back().detach();
    }
  }

  void Loop(uint64_t seen) {
    omp_set_num_threads(1);  // oneDNN primitives run single-threaded on these threads
    while (true) {
      auto fresh = [&] { return generation_.load(std::memory_order_acquire) != seen; };
      if (!SpinUntil(fresh)) {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, fresh);
      }
      std::shared_ptr<Job> job;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        job = job_;
        seen = generation_.load(std::memory_order_acquire);
      }
      for (int chunk = job->next.fetch_add(1); chunk < job->limit; chunk = job->next.fetch_add(1)) {
        (*job->fn)(chunk);
        if (job->pending.fetch_sub(1, std::memory_order_acq_rel) == 1) {
          std::lock_guard<std::mutex> lock(mutex_);
          done_.notify_all();
        }
      }
    }
  }

  std::mutex call_mutex_, mutex_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> threads_;
  std::shared_ptr<Job> job_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> spin_us_{kDefaultSpinUs};
};

inline Workers& Pool() {
  static auto* pool = new Workers();
  return *pool;
}

}  // namespace diffjax

#endif  // DIFFJAX_CSRC_WORKERS_H_
