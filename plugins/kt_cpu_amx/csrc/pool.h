// A persistent pool of pinned worker threads with one controller thread that runs submitted jobs.
// A job (a closure) runs on the controller; inside it, parallel_for spreads tasks over the workers and the
// controller itself. submit() returns at once; sync() waits for the job and rethrows its error.
// run() is the blocking form: the calling thread itself runs the job as thread 0, so a synchronous call
// (a decode step's linear) costs no hand-off to the controller and no third thread on the cores.
// Between phases, workers spin for spin_us microseconds (KT_CPU_SPIN_US, default 50) before sleeping on a
// condition variable: a decode step runs several short phases back to back, and a futex wake-up per phase
// would cost as much as the phase itself. A job may ask for a longer spin after it (set_linger): a decode
// step's kernel calls come every few hundred microseconds, between Python code that needs one core, and
// workers that went to sleep would join the next call late (the caller does their share meanwhile).
#pragma once
#include <atomic>
#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace kt {

class Pool {
public:
    Pool(int nthreads, bool pin, int spin_us = -1);
    ~Pool();
    int size() const { return nthreads_; }

    // From inside a job: fn(task, thread) for task in [0, ntasks), thread in [0, size()).
    void parallel_for(int ntasks, const std::function<void(int, int)>& fn);

    void submit(std::function<void()> job);
    void sync();
    // Run job on the calling thread (after any submitted job finished); its error propagates.
    void run(const std::function<void()>& job);
    bool busy();
    // Spin this long (microseconds) after the current job before sleeping; reset to spin_us by the next job
    // that does not ask again. Ignored inside submitted jobs (only run() jobs linger).
    void set_linger(int us);
    int spin_us() const { return spin_us_; }
    // Nanoseconds the thread calling parallel_for spent waiting for the other threads' tasks (after finishing what it
    // could claim), summed over all calls: the barrier cost a decode profile reports as waiting.
    uint64_t wait_ns() const { return wait_ns_.load(std::memory_order_relaxed); }
    // Parallel phases dispatched to the workers (calls of parallel_for with more than one task), summed: the
    // barriers a decode profile counts per step.
    uint64_t phases() const { return phases_.load(std::memory_order_relaxed); }

private:
    void worker_loop(int id);
    void controller_loop();
    // Claim and run tasks of generation gen until none is left (or a newer generation started).
    void run_tasks(uint64_t gen, int thread);

    int nthreads_;
    std::vector<int> cpus_;
    bool pin_;
    std::vector<std::thread> workers_;
    std::thread controller_;

    std::mutex mu_;
    std::condition_variable work_cv_, done_cv_;
    // A phase: generation_ says a new one started; ticket_ packs (generation, task count, next task index)
    // (pack_ticket), claimed by compare-exchange, so a worker that wakes late (descheduled on a busy machine)
    // finds the phase over and never holds it up: the controller waits for tasks done, not for workers. The
    // count sits in the same word as the index: a worker still in the previous phase must not read the next
    // phase's count beside its own index (it would claim a task twice and done_ would pass the count).
    // Each on its own cache line: workers claim through ticket_ while finished ones count in done_.
    alignas(64) std::atomic<uint64_t> generation_{0};
    alignas(64) std::atomic<uint64_t> ticket_{0};
    alignas(64) std::atomic<int> done_{0};
    const std::function<void(int, int)>* fn_ = nullptr;
    std::atomic<bool> stop_{false};
    int spin_us_ = 50;
    std::atomic<uint64_t> wait_ns_{0}, phases_{0};
    std::atomic<int> linger_us_{-1};  // < 0: spin_us_
    int idle_spin_us() const { int l = linger_us_.load(std::memory_order_relaxed); return l < 0 ? spin_us_ : l; }

    std::mutex job_mu_;
    // job_cv_: the controller waits for a job (has_job_); slot_cv_: callers wait for the job slot (job_done_).
    // Two variables, so that a blocking call's end (run) wakes no controller that has nothing to do.
    std::condition_variable job_cv_, slot_cv_;
    std::function<void()> job_;
    std::atomic<bool> has_job_{false}, job_done_{true};  // written under job_mu_, also read by spinners
    std::exception_ptr job_error_;
};

}  // namespace kt
