#include "pool.h"

#include <pthread.h>
#include <sched.h>

namespace kt {

static void pin_to(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

Pool::Pool(int nthreads, bool pin) : nthreads_(nthreads < 1 ? 1 : nthreads), pin_(pin) {
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
        stop_ = true;
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

void Pool::run_tasks(int thread) {
    for (;;) {
        int t = next_.fetch_add(1, std::memory_order_relaxed);
        if (t >= ntasks_) break;
        (*fn_)(t, thread);
    }
}

void Pool::worker_loop(int id) {
    if (pin_) pin_to(cpus_[id % cpus_.size()]);
    uint64_t seen = 0;
    for (;;) {
        {
            std::unique_lock<std::mutex> l(mu_);
            work_cv_.wait(l, [&] { return stop_ || generation_ != seen; });
            if (stop_) return;
            seen = generation_;
        }
        run_tasks(id);
        {
            std::lock_guard<std::mutex> l(mu_);
            if (--pending_workers_ == 0) done_cv_.notify_one();
        }
    }
}

void Pool::parallel_for(int ntasks, const std::function<void(int, int)>& fn) {
    if (ntasks <= 0) return;
    if (nthreads_ == 1 || ntasks == 1) {
        for (int t = 0; t < ntasks; ++t) fn(t, 0);
        return;
    }
    {
        std::lock_guard<std::mutex> l(mu_);
        fn_ = &fn;
        ntasks_ = ntasks;
        next_.store(0, std::memory_order_relaxed);
        pending_workers_ = nthreads_ - 1;
        ++generation_;
    }
    work_cv_.notify_all();
    run_tasks(0);
    std::unique_lock<std::mutex> l(mu_);
    done_cv_.wait(l, [&] { return pending_workers_ == 0; });
    fn_ = nullptr;
}

void Pool::controller_loop() {
    if (pin_) pin_to(cpus_[0]);
    for (;;) {
        std::function<void()> job;
        {
            std::unique_lock<std::mutex> l(job_mu_);
            job_cv_.wait(l, [&] { return has_job_; });
            has_job_ = false;
            if (!job_) {
                std::lock_guard<std::mutex> s(mu_);
                if (stop_) return;
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
        job_cv_.notify_all();
    }
}

void Pool::submit(std::function<void()> job) {
    std::unique_lock<std::mutex> l(job_mu_);
    job_cv_.wait(l, [&] { return job_done_; });  // one job in flight
    job_ = std::move(job);
    job_done_ = false;
    has_job_ = true;
    job_error_ = nullptr;
    l.unlock();
    job_cv_.notify_all();
}

void Pool::sync() {
    std::unique_lock<std::mutex> l(job_mu_);
    job_cv_.wait(l, [&] { return job_done_; });
    if (job_error_) {
        auto e = job_error_;
        job_error_ = nullptr;
        std::rethrow_exception(e);
    }
}

bool Pool::busy() {
    std::lock_guard<std::mutex> l(job_mu_);
    return !job_done_;
}

}  // namespace kt
