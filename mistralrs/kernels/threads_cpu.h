// The CPU kernels' thread team: parallel_for(n, grain, f) runs f(begin, end) over [0, n) on the calling thread and
// the team's workers (threads_cpu.cpp). One team per process; a call uses set_threads(n) threads of it, n as set
// on the calling thread (the Runner sets load's `threads` on its engine thread), else at::get_num_threads().
#pragma once

#include <ATen/ThreadLocalState.h>

#include <cstdint>

namespace mistralrs_cpu {

void set_threads(int n);  // for calls from this thread; n <= 0: follow its at::get_num_threads()
int threads();
// torch's own ops on the calling thread run on that thread alone (OpenMP count 1 for this thread only): the thread
// then never starts a libgomp pool of its own (threads_cpu.cpp says why that matters).
void torch_ops_serial();

using RangeFn = void (*)(const void* ctx, int64_t begin, int64_t end);
void parallel_run(int64_t n, int64_t grain, RangeFn fn, const void* ctx);

// Chunks of at least `grain` items are claimed dynamically, so which thread runs which chunk varies from call to
// call: f must give the same result whichever thread runs a chunk (every kernel here writes disjoint outputs).
// An exception thrown by a chunk reaches the caller once every claimed chunk has finished.
template <class F>
void parallel_for(int64_t n, int64_t grain, const F& f) {
  parallel_run(n, grain, [](const void* c, int64_t a, int64_t b) { (*static_cast<const F*>(c))(a, b); }, &f);
}

// parallel_for whose chunks call torch ops: they run under the caller's thread-local torch state (inference mode,
// grad mode, the profiler), as at::parallel_for's chunks do.
template <class F>
void parallel_for_torch(int64_t n, int64_t grain, const F& f) {
  const at::ThreadLocalState state;
  parallel_for(n, grain, [&](int64_t a, int64_t b) {
    at::ThreadLocalStateGuard guard(state);
    f(a, b);
  });
}

}  // namespace mistralrs_cpu
