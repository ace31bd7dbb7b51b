#include "pool.h"

#include <immintrin.h>
#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <stdexcept>

namespace kt {

static void pin_to(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

// Spin until pred() or `us` microseconds passed; true if pred() held.
template <class Pred> static bool spin_until(Pred pred, int us) {
    if (us <= 0) return pred();
    auto end = std::chrono::steady_clock::now() + std::chrono::microseconds(us);
    for (int i = 0;; ++i) {
        if (pred()) return true;
        _mm_pause();
        if ((i & 63) == 63 && std::chrono::steady_clock::now() > end) return pred();
    }
}

Pool::Pool(int nthreads, bool pin, int spin_us) : nthreads_(nthreads < 1 ? 1 : nthreads), pin_(pin) {
    if (spin_us < 0) {
        const char* env = std::getenv("KT_CPU_SPIN_US");
        spin_us = env ? std::atoi(env) : 50;
    }
    spin_us_ = spin_us;
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) == 0)
        for (int c = 0; c < CPU_SETSIZE; ++c)
            if (CPU_ISSET(c, &set)) cpus_.push_back(c);
    if (cpus_.empty()) pin_ = false;
    controller_ = std::thread([this] { controller_loop(); });
    for (int i = 1; i < nthreads_; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
}

Pool::~Pool() {
    try { sync(); } catch (...) {}
    {
        std::lock_guard<std::mutex> l(mu_);
        stop_.store(true);
    }
    work_cv_.notify_all();
    {
        std::lock_guard<std::mutex> l(job_mu_);
        has_job_ = true;  // wakes the controller, which sees stop_
    }
    job_cv_.notify_all();
    for (auto& t : workers_) t.join();
    controller_.join();
}

// ticket_: generation (20 bits, compared for equality only) | task count (22 bits) | next index (22 bits).
constexpr int kIdxBits = 22;
constexpr uint64_t kIdxMask = (uint64_t(1) << kIdxBits) - 1;
constexpr uint64_t kGenMask = (uint64_t(1) << (64 - 2 * kIdxBits)) - 1;
static inline uint64_t pack_ticket(uint64_t gen, int n) {
    return ((gen & kGenMask) << (2 * kIdxBits)) | (uint64_t(n) << kIdxBits);
}

void Pool::run_tasks(uint64_t gen, int thread) {
    for (;;) {
        uint64_t v = ticket_.load(std::memory_order_acquire);
        if ((v >> (2 * kIdxBits)) != (gen & kGenMask)) return;  // a newer phase started: this one is over
        const int n = int((v >> kIdxBits) & kIdxMask);
        const int idx = int(v & kIdxMask);
        if (idx >= n) return;
        // Guided claims: a share of what is left (large first, single tasks at the end), so a phase of many small
        // tasks (a decode step's expert row chunks) costs a few atomic operations per thread, not two per task:
        // with 16 threads on one cache line, per-task claims serialised a good part of the phase.
        const int take = std::max(1, (n - idx) / (2 * nthreads_));
        if (!ticket_.compare_exchange_weak(v, v + uint64_t(take), std::memory_order_acq_rel)) continue;
        // claimed tasks [idx, idx + take) of phase gen: the phase cannot end before done_ counts them, so fn_ is its fn
        for (int i = idx; i < idx + take; ++i) (*fn_)(i, thread);
        if (done_.fetch_add(take, std::memory_order_acq_rel) + take == n) {
            std::lock_guard<std::mutex> l(mu_);  // the controller checks under the lock: no lost wake-up
            done_cv_.notify_one();
        }
    }
}

void Pool::worker_loop(int id) {
    if (pin_) pin_to(cpus_[id % cpus_.size()]);
    uint64_t seen = 0;
    for (;;) {
        auto ready = [&] { return stop_.load(std::memory_order_relaxed) ||
                                  generation_.load(std::memory_order_acquire) != seen; };
        if (!spin_until(ready, idle_spin_us())) {
            std::unique_lock<std::mutex> l(mu_);
            work_cv_.wait(l, ready);
        }
        if (stop_.load()) return;
        seen = generation_.load(std::memory_order_acquire);
        run_tasks(seen, id);
    }
}

void Pool::parallel_for(int ntasks, const std::function<void(int, int)>& fn) {
    if (ntasks <= 0) return;
    if (nthreads_ == 1 || ntasks == 1) {
        for (int t = 0; t < ntasks; ++t) fn(t, 0);
        return;
    }
    if (uint64_t(ntasks) > kIdxMask) throw std::length_error("kt_cpu_amx: too many tasks in one parallel phase");
    phases_.fetch_add(1, std::memory_order_relaxed);
    const uint64_t gen = generation_.load(std::memory_order_relaxed) + 1;
    fn_ = &fn;
    done_.store(0, std::memory_order_relaxed);
    ticket_.store(pack_ticket(gen, ntasks), std::memory_order_release);
    generation_.store(gen, std::memory_order_release);
    {
        std::lock_guard<std::mutex> l(mu_);  // a worker between its check and its wait holds this lock
    }
    work_cv_.notify_all();
    run_tasks(gen, 0);
    auto done = [&] { return done_.load(std::memory_order_acquire) == ntasks; };
    if (done()) return;
    const auto t0 = std::chrono::steady_clock::now();
    if (!spin_until(done, spin_us_)) {
        std::unique_lock<std::mutex> l(mu_);
        done_cv_.wait(l, done);
    }
    wait_ns_.fetch_add(uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count()),
                       std::memory_order_relaxed);
}

void Pool::controller_loop() {
    if (pin_) pin_to(cpus_[0]);
    for (;;) {
        std::function<void()> job;
        spin_until([&] { return has_job_.load(std::memory_order_acquire); }, spin_us_);
        {
            std::unique_lock<std::mutex> l(job_mu_);
            job_cv_.wait(l, [&] { return has_job_.load(); });
            has_job_ = false;
            if (!job_) {
                if (stop_.load()) return;
                continue;
            }
            job = std::move(job_);
            job_ = nullptr;
        }
        std::exception_ptr err;
        try { job(); } catch (...) { err = std::current_exception(); }
        {
            std::lock_guard<std::mutex> l(job_mu_);
            job_error_ = err;
            job_done_ = true;
        }
        slot_cv_.notify_all();
    }
}

void Pool::submit(std::function<void()> job) {
    std::unique_lock<std::mutex> l(job_mu_);
    slot_cv_.wait(l, [&] { return job_done_.load(); });  // one job in flight
    job_ = std::move(job);
    job_done_ = false;
    has_job_ = true;
    job_error_ = nullptr;
    l.unlock();
    job_cv_.notify_all();
}

void Pool::sync() {
    spin_until([&] { return job_done_.load(std::memory_order_acquire); }, spin_us_);
    std::unique_lock<std::mutex> l(job_mu_);
    slot_cv_.wait(l, [&] { return job_done_.load(); });
    if (job_error_) {
        auto e = job_error_;
        job_error_ = nullptr;
        std::rethrow_exception(e);
    }
}

void Pool::run(const std::function<void()>& job) {
    {
        std::unique_lock<std::mutex> l(job_mu_);
        slot_cv_.wait(l, [&] { return job_done_.load(); });  // the job slot: one job in flight
        job_done_ = false;
    }
    struct Release {
        Pool* p;
        ~Release() {
            {
                std::lock_guard<std::mutex> l(p->job_mu_);
                p->job_done_ = true;
            }
            p->slot_cv_.notify_all();
        }
    } release{this};
    job();
}

void Pool::set_linger(int us) {
    // only run() jobs linger: their caller is the pool's thread 0 and nothing else needs the cores; beside a
    // submitted job (on the controller) the submitting thread, driving a GPU, does
    if (std::this_thread::get_id() == controller_.get_id()) us = -1;
    linger_us_.store(us, std::memory_order_relaxed);
}

bool Pool::busy() {
    std::lock_guard<std::mutex> l(job_mu_);
    return !job_done_.load();
}

}  // namespace kt
