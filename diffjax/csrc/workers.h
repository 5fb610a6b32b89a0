// The worker threads diffjax's CPU custom calls split their batch over (onednn_conv.cc, group_norm.cc,
// attention.cc). One call's chunks run at a time: chunk 0 on the calling (XLA) thread, the others on
// these workers. Waiting spins for a few tens of microseconds before sleeping on a condition variable:
// a U-Net step makes calls back to back (about 60 per sampling step), and a futex wake-up per call cost
// more than the small sampling-batch kernels themselves.
#ifndef DIFFJAX_CSRC_WORKERS_H_
#define DIFFJAX_CSRC_WORKERS_H_

#include <immintrin.h>
#include <omp.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace diffjax {

class Workers {
 public:
  // Runs fn(0..n-1); returns when all chunks finished.
  void Run(int n, const std::function<void(int)>& fn) {
    if (n <= 1) {
      fn(0);
      return;
    }
    std::lock_guard<std::mutex> call(call_mutex_);  // one call's chunks at a time
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

  // Spins (with pause) up to ~50 microseconds for `ready`; true if it became ready.
  template <typename F>
  static bool SpinUntil(F ready) {
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0;; ++i) {
      if (ready()) return true;
      _mm_pause();
      if ((i & 255) == 255 && std::chrono::steady_clock::now() - start > std::chrono::microseconds(50)) return ready();
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
};

inline Workers& Pool() {
  static auto* pool = new Workers();
  return *pool;
}

}  // namespace diffjax

#endif  // DIFFJAX_CSRC_WORKERS_H_
