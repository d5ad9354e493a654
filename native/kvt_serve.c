/* The pipelined decode step: the engine serves jobs that the GPU feeds.
 *
 * On the CUDA path the thread that queues a decode step's GPU work must not
 * wait for the engine at every layer: each wait puts its kernel launches
 * (hundreds of microseconds per layer) in series with the engine. Instead the
 * GPU stream copies a layer's query into a page-locked slot and stores
 * q_ready[slot] = seq; this loop, on its own thread, sees the flag, runs the
 * layer and stores far_ready[slot] = seq; the stream waits for that value
 * before it copies the result back and merges. The flags live in page-locked
 * host memory, written and waited on by the stream's memory operations.
 *
 * A job whose run fails still gets its far_ready, with out = 0 and lse = -inf
 * (the window alone), so the stream never waits forever; the first error is
 * what kvt_serve returns once the loop ends.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include "kvt_engine_internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

/* Spin this many pauses (a few hundred microseconds) before napping: the gap
 * between two layers' jobs is the GPU's share of a layer, usually shorter. */
#define SERVE_SPIN 100000

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

enum { JOB_READY = 1, JOB_NONE = 0, JOB_TIMEOUT = -1 };

/* Wait for job j's query. JOB_NONE once stop says fewer than j + 1 jobs come. */
static int wait_job(const kvt_serve_desc *d, int slot, int32_t seq, int64_t j) {
    double stopped_at = 0.0;
    for (long spin = 0;; spin++) {
        if (__atomic_load_n(&d->q_ready[slot], __ATOMIC_ACQUIRE) == seq) return JOB_READY;
        int32_t stop = __atomic_load_n(d->stop, __ATOMIC_ACQUIRE);
        if (stop > 0) {
            if (j >= stop - 1) return JOB_NONE;
            double t = now_s();
            if (stopped_at == 0.0)
                stopped_at = t;
            else if (t - stopped_at > 1e-3 * d->timeout_ms)
                return JOB_TIMEOUT;
        }
        if (spin < SERVE_SPIN) {
            CPU_RELAX();
        } else {
            struct timespec nap = {0, 20000};
            nanosleep(&nap, NULL);
        }
    }
}

static int32_t serve_held(kvt_engine *e, const kvt_serve_desc *d);

/* The loop holds the engine (kvt_engine_destroy and kvt_plan are refused until it
 * returns; a second loop too) and the ISA lock; its jobs run on the held engine. */
int32_t kvt_serve(int32_t eh, const kvt_serve_desc *d) {
    if (!d || !d->layer || !d->q || !d->far || !d->q_ready || !d->far_ready || !d->stop || !d->done ||
        !d->engine_seconds)
        return kvt_err(KVT_ERR_VALUE, "kvt_serve: expected a descriptor with every buffer set, got NULL");
    if (d->n_slots <= 0 || d->timeout_ms <= 0)
        return kvt_err(KVT_ERR_VALUE, "kvt_serve: expected n_slots > 0 and timeout_ms > 0, got %d and %d",
                       d->n_slots, d->timeout_ms);
    kvt_engine *e = kvt_engine_acquire(eh, 0);
    if (!e) return KVT_ERR_HANDLE;
    int32_t rc = kvt_engine_serving(e, 1);
    if (rc == KVT_OK) {
        kvt_isa_hold();
        rc = serve_held(e, d);
        kvt_isa_drop();
        kvt_engine_serving(e, 0);
    }
    kvt_engine_release(e, 0);
    return rc;
}

static int32_t serve_held(kvt_engine *e, const kvt_serve_desc *d) {
    pthread_mutex_lock(&e->mu);
    const int valid = e->plan.valid;
    const int32_t B = valid ? e->plan.B : 0, Hq = valid ? e->plan.Hq : 0, D = valid ? e->plan.D : 0;
    pthread_mutex_unlock(&e->mu);
    const int64_t rows = (int64_t)B * Hq, dim = D;
    if (!valid) return kvt_err(KVT_ERR_STATE, "kvt_serve: expected a plan (call kvt_plan first)");
    if (d->q_stride < rows * dim || d->far_stride < rows * (dim + 1))
        return kvt_err(KVT_ERR_VALUE,
                       "kvt_serve: expected q_stride >= %lld and far_stride >= %lld for the planned batch, "
                       "got %lld and %lld", (long long)(rows * dim), (long long)(rows * (dim + 1)),
                       (long long)d->q_stride, (long long)d->far_stride);

    int32_t first_rc = KVT_OK;
    char first_msg[512] = "";
    for (int64_t j = 0;; j++) {
        int slot = (int)(j % d->n_slots);
        int32_t seq = (int32_t)(d->first_seq + j);
        int w = wait_job(d, slot, seq, j);
        if (w == JOB_NONE) break;
        if (w == JOB_TIMEOUT) {
            if (first_rc == KVT_OK) {
                first_rc = KVT_ERR_TIMEOUT;
                snprintf(first_msg, sizeof first_msg,
                         "kvt_serve: job %lld (slot %d) never received its query: the step was stopped after "
                         "%d jobs and %d ms passed", (long long)j, slot, *d->stop - 1, d->timeout_ms);
            }
            break;
        }
        float *out = d->far + slot * d->far_stride;
        float *lse = out + rows * dim;
        double t0 = now_s();
        int32_t rc = kvt_run_held(e, d->layer[slot], B, Hq, D, d->q + slot * d->q_stride, out, lse, NULL, NULL, 0);
        *d->engine_seconds += now_s() - t0;
        if (rc != KVT_OK) {
            if (first_rc == KVT_OK) {
                first_rc = rc;
                snprintf(first_msg, sizeof first_msg, "%s", kvt_last_error());
            }
            memset(out, 0, (size_t)(rows * dim) * sizeof(float));
            for (int64_t i = 0; i < rows; i++) lse[i] = -INFINITY;
        }
        __atomic_store_n(&d->far_ready[slot], seq, __ATOMIC_RELEASE);
        __atomic_store_n(d->done, j + 1, __ATOMIC_RELEASE);
    }
    if (first_rc != KVT_OK) return kvt_err(first_rc, "%s", first_msg);
    return KVT_OK;
}
