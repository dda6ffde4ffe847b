// The CPU kernels' thread team (threads_cpu.h): workers that spin a bounded time between jobs, then sleep.
//
// Why not at::parallel_for (OpenMP), which these kernels used until it was measured: libgomp keeps one thread pool
// per thread that starts a parallel region. The engine runs its forward on its own Python thread, so a process has
// two pools as soon as the main thread ran one parallel torch op (loading does), and libgomp then counts more
// managed threads than CPUs and cuts its workers' spin from ~300k iterations to 100 (gomp_throttled_spin_count_var,
// libgomp/env.c): every region wakes its workers from a futex. Measured on SmolLM2's 576 x 1536 Q4_1 matrix, M = 1,
// 2-core EPYC: 27 us from the thread that made the first pool, 62 us from a second thread (48 us at 1 thread,
// either thread); OMP_WAIT_POLICY cannot lift the throttle. A decode token runs ~300 such regions.
//
// This team belongs to the process, not to a thread, and knows nothing of OpenMP's count of threads:
//  - a job is published by bumping `job_`; workers spin on it for MISTRALRS_SPIN_US (default 1000 us: longer than
//    the Python between two kernels of a decode step, shorter than a step) and then sleep on a condition variable,
//    so a busy engine pays ~1 us per parallel_for and an idle one burns no CPU;
//  - chunks are claimed from one atomic cursor, tagged with the job's id: a worker that is slow to wake (a loaded
//    machine) finds the job done and takes nothing, and the caller waits only for workers that did claim a chunk;
//  - on a loaded machine (another process on a core) a waiting caller and an idle worker yield their core after a
//    few microseconds of spinning: a worker descheduled inside its chunk gets a core back sooner. Measured on
//    SmolLM2 Q4_1, 2 threads, with a `while True` process beside: 43-51 tok/s without the yields, 67-87 with them
//    (quiet: unchanged, 105-137 in this noisy VM's runs);
//  - one job at a time: a call that finds the team busy (another thread's job, or parallel_for inside a chunk) runs
//    its loop on its own thread. Results do not depend on that: the kernels' chunks write disjoint outputs.
#include "threads_cpu.h"

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <utility>

namespace mistralrs_cpu {
namespace {

// cursor_ = id (24 bits) | chunks (20 bits) | next chunk (20 bits)
constexpr int kChunkBits = 20;
constexpr uint64_t kChunkMask = (uint64_t(1) << kChunkBits) - 1;
constexpr int64_t kMaxChunks = int64_t(kChunkMask);
constexpr int kChunksPerThread = 4;     // dynamic balance: a thread that falls behind takes fewer chunks
constexpr int kSpinsBeforeYield = 256;  // ~5 us of pause: a worker on its own core finishes its chunk sooner

int64_t spin_us() {
  const char* env = std::getenv("MISTRALRS_SPIN_US");
  return env ? std::max<int64_t>(0, std::atoll(env)) : 1000;
}

class Team {
 public:
  void run(int64_t n, int64_t grain, RangeFn fn, const void* ctx, int threads) {
    std::unique_lock<std::mutex> submit(submit_, std::try_to_lock);
    const int64_t chunks = std::min<int64_t>({(n + grain - 1) / grain, int64_t(threads) * kChunksPerThread,
                                              kMaxChunks});
    if (!submit.owns_lock() || chunks <= 1) return fn(ctx, 0, n);
    grow(threads - 1);
    fn_ = fn, ctx_ = ctx, n_ = n, chunk_ = (n + chunks - 1) / chunks;
    active_.store(threads - 1, std::memory_order_relaxed);
    const uint64_t id = (job_.load(std::memory_order_relaxed) + 1) & 0xffffff;
    cursor_.store((id << (2 * kChunkBits)) | (uint64_t(chunks) << kChunkBits), std::memory_order_release);
    job_.store(id, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(sleep_);
      wake_.notify_all();
    }
    claim(id);
    // A worker still in a chunk may have lost its core to another process: after a short spin, offer ours.
    for (int spins = 0; busy_.load(std::memory_order_acquire) > 0; ++spins) {
      if (spins < kSpinsBeforeYield) _mm_pause();
      else std::this_thread::yield();
    }
    if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  }

 private:
  // Runs chunks of job `id` until none is left (or the cursor has moved on to another job).
  void claim(uint64_t id) {
    uint64_t c = cursor_.load(std::memory_order_acquire);
    for (;;) {
      const uint64_t next = c & kChunkMask, chunks = (c >> kChunkBits) & kChunkMask;
      if ((c >> (2 * kChunkBits)) != id || next >= chunks) return;
      if (!cursor_.compare_exchange_weak(c, c + 1, std::memory_order_acq_rel)) continue;
      const int64_t begin = int64_t(next) * chunk_;
      try {
        if (begin < n_) fn_(ctx_, begin, std::min(n_, begin + chunk_));
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_lock_);
        if (!error_) error_ = std::current_exception();
      }
      c = cursor_.load(std::memory_order_acquire);
    }
  }

  void grow(int workers) {
    while (spawned_ < workers) {
      std::thread([this, index = spawned_] { work(index); }).detach();  // the team lives as long as the process
      ++spawned_;
    }
  }

  void work(int index) {
    pthread_setname_np(pthread_self(), "mistralrs-cpu");  // as top, perf and py-spy show it
    torch_ops_serial();  // a chunk that calls a torch op (at::mm on its tile) must not start an OpenMP team
    const auto budget = std::chrono::microseconds(spin_us());
    uint64_t seen = job_.load(std::memory_order_acquire);
    for (;;) {
      const auto start = std::chrono::steady_clock::now();
      uint64_t id;
      for (int spins = 0; (id = job_.load(std::memory_order_acquire)) == seen; ++spins) {
        _mm_pause();
        if ((spins & 255) != 255) continue;
        std::this_thread::yield();  // between jobs a runnable thread of the machine goes first (a loaded core)
        if (std::chrono::steady_clock::now() - start > budget) {
          std::unique_lock<std::mutex> lock(sleep_);
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          wake_.wait(lock, [&] { return job_.load(std::memory_order_seq_cst) != seen; });
          sleepers_.fetch_sub(1, std::memory_order_relaxed);
        }
      }
      seen = id;
      if (index >= active_.load(std::memory_order_relaxed)) continue;
      busy_.fetch_add(1, std::memory_order_seq_cst);  // before claiming: the caller then waits for this chunk
      claim(id);
      busy_.fetch_sub(1, std::memory_order_release);
    }
  }

  std::mutex submit_;
  int spawned_ = 0;
  RangeFn fn_ = nullptr;
  const void* ctx_ = nullptr;
  int64_t n_ = 0, chunk_ = 1;
  std::atomic<int> active_{0}, busy_{0}, sleepers_{0};
  std::atomic<uint64_t> job_{0}, cursor_{0};
  std::mutex sleep_;
  std::condition_variable wake_;
  std::mutex error_lock_;
  std::exception_ptr error_;  // the job's first exception
};

// Never destroyed: its detached workers may still be waiting when static destructors run at exit. A forked child
// has none of the parent's threads, so it starts a team of its own.
Team* team = new Team;
const int atfork = pthread_atfork(nullptr, nullptr, [] { team = new Team; });

thread_local int team_threads = 0;  // set_threads of this thread

}  // namespace

void set_threads(int n) { team_threads = std::max(n, 0); }

int threads() {
  return team_threads > 0 ? team_threads : at::get_num_threads();
}

void torch_ops_serial() {
  at::get_num_threads();  // ATen sets a thread's OpenMP count once, at its first parallel op: let it happen now
  omp_set_num_threads(1);
}

void parallel_run(int64_t n, int64_t grain, RangeFn fn, const void* ctx) {
  if (n <= 0) return;
  const int t = threads();
  if (t <= 1 || n <= grain) return fn(ctx, 0, n);
  team->run(n, std::max<int64_t>(grain, 1), fn, ctx, t);
}

}  // namespace mistralrs_cpu
