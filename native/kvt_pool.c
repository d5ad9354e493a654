/* Persistent pthread pool. The caller thread works too (tid 0), so a pool of n
 * threads starts n-1 workers; items are handed out by an atomic counter so
 * uneven items (long vs short requests) balance themselves.
 *
 * A run waits only for the workers that joined it, not for every worker: on
 * a serving host other processes hold some cores, and a worker the kernel has
 * not scheduled yet would otherwise stall each run for a time slice (ms). A
 * worker that wakes after the run ended finds no job and sleeps again. After
 * a job a worker spins briefly (KVT_SPIN pauses, about ten microseconds: enough to bridge the phases of one engine call, short enough not to take cores from the server between layers) before
 * it sleeps, so the back-to-back runs of one engine call (score, select,
 * attend) do not pay a wake-up each. */
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

typedef struct {
    kvt_task_fn fn;
    void *ctx;
    int64_t n_items;
    atomic_llong next;
    int active; /* workers inside this job; under the pool mutex */
} kvt_job;

struct kvt_pool {
    int n;
    pthread_t *th;
    pthread_mutex_t mu;
    pthread_cond_t go, done;
    atomic_ullong gen;
    int stop;
    kvt_job *job; /* the running job, NULL between runs; under mu */
};

typedef struct { kvt_pool *p; int tid; } worker_arg;

static void drain(kvt_job *j, int tid) {
    for (;;) {
        int64_t i = atomic_fetch_add(&j->next, 1);
        if (i >= j->n_items) break;
        j->fn(j->ctx, i, tid);
    }
}

static void *worker(void *arg) {
    worker_arg *a = arg;
    kvt_pool *p = a->p;
    int tid = a->tid;
    free(a);
    uint64_t seen = 0;
    for (;;) {
        for (int s = 0; s < KVT_SPIN && atomic_load_explicit(&p->gen, memory_order_acquire) == seen; s++)
            CPU_RELAX();
        pthread_mutex_lock(&p->mu);
        while (atomic_load(&p->gen) == seen && !p->stop) pthread_cond_wait(&p->go, &p->mu);
        if (p->stop) { pthread_mutex_unlock(&p->mu); break; }
        seen = atomic_load(&p->gen);
        kvt_job *j = p->job;
        if (!j) { pthread_mutex_unlock(&p->mu); continue; } /* woke after the run ended */
        j->active++;
        pthread_mutex_unlock(&p->mu);
        drain(j, tid);
        pthread_mutex_lock(&p->mu);
        if (--j->active == 0) pthread_cond_signal(&p->done);
        pthread_mutex_unlock(&p->mu);
    }
    return NULL;
}

kvt_pool *kvt_pool_create(int n_threads) {
    if (n_threads < 1) n_threads = 1;
    kvt_pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->th = calloc((size_t)n_threads, sizeof(pthread_t));
    if (!p->th) { free(p); return NULL; }
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->go, NULL);
    pthread_cond_init(&p->done, NULL);
    atomic_init(&p->gen, 0);
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
    p->stop = 1;
    atomic_fetch_add(&p->gen, 1);
    pthread_cond_broadcast(&p->go);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i < p->n; i++) pthread_join(p->th[i], NULL);
    pthread_cond_destroy(&p->go);
    pthread_cond_destroy(&p->done);
    pthread_mutex_destroy(&p->mu);
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
    kvt_job j = {.fn = fn, .ctx = ctx, .n_items = n_items, .active = 0};
    atomic_init(&j.next, 0);
    pthread_mutex_lock(&p->mu);
    p->job = &j;
    atomic_fetch_add_explicit(&p->gen, 1, memory_order_release);
    pthread_cond_broadcast(&p->go);
    pthread_mutex_unlock(&p->mu);
    drain(&j, 0);
    /* Every item is claimed now; wait for the workers still finishing theirs. A
     * worker joins only under the mutex while p->job is set, so after the job is
     * cleared below none can reach j (it lives on this stack). */
    pthread_mutex_lock(&p->mu);
    while (j.active > 0) pthread_cond_wait(&p->done, &p->mu);
    p->job = NULL;
    pthread_mutex_unlock(&p->mu);
}
