/* Persistent pthread pool. The caller thread works too (tid 0), so a pool of n
 * threads starts n-1 workers; items are handed out by an atomic counter so
 * uneven items (long vs short requests) balance themselves.
 *
 * One atomic word says everything about the current run: its generation, whether
 * it is open to joiners, and how many workers are inside it. A worker joins with
 * a compare-and-swap that succeeds only while the run is open, and leaves with a
 * decrement; the caller, once every item is claimed, spins until the count is
 * zero and closes the run with a second compare-and-swap. No mutex is taken on
 * the way in or out, and the caller never sleeps on a condition variable: with a
 * few dozen small items per phase, those wake-ups used to cost more than the
 * work (a fixed cost per phase, four phases per layer).
 *
 * A run waits only for the workers that joined it, not for every worker: on a
 * serving host other processes hold some cores, and a worker the kernel has not
 * scheduled yet would otherwise stall each run for a time slice (ms). A worker
 * that arrives after the run closed finds it closed and waits for the next one.
 * After a job a worker spins briefly (KVT_SPIN pauses, about ten microseconds:
 * enough to bridge the phases of one engine call, short enough not to take cores
 * from the server between layers), then sleeps on a condition variable that a
 * run signals only when someone sleeps. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include "kvt_internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

#define KVT_SPIN 256

/* state = gen << 32 | OPEN | active */
#define ST_OPEN (1ull << 31)
#define ST_ACTIVE 0x7fffffffull
#define ST_GEN(s) ((s) >> 32)

struct kvt_pool {
    int n;
    pthread_t *th;
    _Atomic unsigned long long state;
    /* the current run, written by the caller before it opens the run */
    kvt_task_fn fn;
    void *ctx;
    int64_t n_items;
    atomic_llong next;
    unsigned long long gen;    /* the caller's count of runs; under run_mu */
    pthread_mutex_t run_mu;    /* one run at a time */
    pthread_mutex_t mu;        /* sleeping workers */
    pthread_cond_t go;
    atomic_int sleepers, stop;
};

typedef struct { kvt_pool *p; int tid; } worker_arg;

static void drain(kvt_pool *p, int tid) {
    for (;;) {
        int64_t i = atomic_fetch_add(&p->next, 1);
        if (i >= p->n_items) break;
        p->fn(p->ctx, i, tid);
    }
}

/* Join the open run of a generation other than `seen`: 1 and *seen updated when
 * joined (the caller then drains and leaves), 0 when there is none to join. */
static int try_join(kvt_pool *p, unsigned long long *seen) {
    unsigned long long s = atomic_load(&p->state);
    while (ST_GEN(s) != *seen) {
        if (!(s & ST_OPEN)) { *seen = ST_GEN(s); return 0; } /* closed before this worker came */
        if (atomic_compare_exchange_weak(&p->state, &s, s + 1)) { *seen = ST_GEN(s); return 1; }
    }
    return 0;
}

static void *worker(void *arg) {
    worker_arg *a = arg;
    kvt_pool *p = a->p;
    int tid = a->tid;
    free(a);
    unsigned long long seen = 0;
    while (!atomic_load(&p->stop)) {
        int joined = 0;
        for (int s = 0; s < KVT_SPIN && !(joined = try_join(p, &seen)); s++) CPU_RELAX();
        if (!joined) {
            pthread_mutex_lock(&p->mu);
            /* Count as a sleeper, then look again: a run published before the count
             * signals no one, and one published after it broadcasts under mu, which
             * this thread holds until it waits. */
            atomic_fetch_add(&p->sleepers, 1);
            while (!atomic_load(&p->stop) && !(joined = try_join(p, &seen))) pthread_cond_wait(&p->go, &p->mu);
            atomic_fetch_sub(&p->sleepers, 1);
            pthread_mutex_unlock(&p->mu);
        }
        if (joined) {
            drain(p, tid);
            atomic_fetch_sub(&p->state, 1);
        }
    }
    return NULL;
}

kvt_pool *kvt_pool_create(int n_threads) {
    if (n_threads < 1) n_threads = 1;
    kvt_pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->th = calloc((size_t)n_threads, sizeof(pthread_t));
    if (!p->th) { free(p); return NULL; }
    pthread_mutex_init(&p->run_mu, NULL);
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->go, NULL);
    atomic_init(&p->state, 0);
    atomic_init(&p->next, 0);
    atomic_init(&p->sleepers, 0);
    atomic_init(&p->stop, 0);
    p->n = 1;
    for (int i = 1; i < n_threads; i++) {
        worker_arg *a = malloc(sizeof *a);
        if (!a) break;
        a->p = p;
        a->tid = i;
        if (pthread_create(&p->th[i], NULL, worker, a) != 0) { free(a); break; }
        p->n++;
    }
    return p;
}

void kvt_pool_destroy(kvt_pool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->stop, 1);
    pthread_cond_broadcast(&p->go);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i < p->n; i++) pthread_join(p->th[i], NULL);
    pthread_cond_destroy(&p->go);
    pthread_mutex_destroy(&p->mu);
    pthread_mutex_destroy(&p->run_mu);
    free(p->th);
    free(p);
}

int kvt_pool_size(const kvt_pool *p) { return p->n; }

void kvt_pool_run(kvt_pool *p, int64_t n_items, kvt_task_fn fn, void *ctx) {
    if (n_items <= 0) return;
    if (p->n == 1 || n_items == 1) {
        for (int64_t i = 0; i < n_items; i++) fn(ctx, i, 0);
        return;
    }
    pthread_mutex_lock(&p->run_mu);
    p->fn = fn;
    p->ctx = ctx;
    p->n_items = n_items;
    atomic_store(&p->next, 0);
    const unsigned long long gen = ++p->gen & 0xffffffffull;
    atomic_store(&p->state, gen << 32 | ST_OPEN); /* publishes the run (sequentially consistent) */
    if (atomic_load(&p->sleepers) > 0) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->go);
        pthread_mutex_unlock(&p->mu);
    }
    drain(p, 0);
    /* Every item is claimed; wait for the workers inside, then close the run so
     * that no late worker joins it (they would read the next run's fields). */
    unsigned long long s = atomic_load(&p->state);
    for (;;) {
        if ((s & ST_ACTIVE) == 0) {
            if (atomic_compare_exchange_weak(&p->state, &s, gen << 32)) break;
        } else {
            CPU_RELAX();
            s = atomic_load(&p->state);
        }
    }
    pthread_mutex_unlock(&p->run_mu);
}
