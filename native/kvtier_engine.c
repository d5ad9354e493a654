/* Engine entry points: errors, ISA selection, handles, plan and the
 * score -> select -> attend pipeline. Kernels live in kvt_kernels.c, the store
 * in kvt_store.c, the pool in kvt_pool.c; the selection code in kvt_select.c. */
#define _POSIX_C_SOURCE 200809L /* pthread_rwlock_t */
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "kvt_engine_internal.h"

#ifndef KVT_VERSION
#define KVT_VERSION "unknown"
#endif
#ifndef KVT_BUILD_HASH
#define KVT_BUILD_HASH "unknown"
#endif

static _Thread_local char t_err[512];

int32_t kvt_err(int32_t code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t_err, sizeof t_err, fmt, ap);
    va_end(ap);
    return code;
}

const char *kvt_last_error(void) { return t_err; }
const char *kvt_version(void) { return KVT_VERSION; }
const char *kvt_build_hash(void) { return KVT_BUILD_HASH; }

static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static int32_t g_init_rc;
static char g_init_msg[256];

static void init_once(void) {
    const char *want = getenv("KVTIER_ISA");
    if (want && *want) {
        const kvt_kernels *k = kvt_kernels_for(want);
        if (!k) {
            g_init_rc = kvt_isa_name_known(want) ? KVT_ERR_UNSUPPORTED : KVT_ERR_VALUE;
            snprintf(g_init_msg, sizeof g_init_msg,
                     "KVTIER_ISA: expected generic, avx2, avx512, avx512bw or amx supported by this CPU, got '%s'%s",
                     want, kvt_isa_name_known(want) ? " (not supported by this CPU)" : "");
            return;
        }
        kvt_k = k;
        return;
    }
    const kvt_kernels *k = kvt_kernels_for("amx");
    if (!k) k = kvt_kernels_for("avx512");
    if (!k) k = kvt_kernels_for("avx2");
    if (k) kvt_k = k;
}

int32_t kvt_ensure_init(void) {
    pthread_once(&g_once, init_once);
    if (g_init_rc) return kvt_err(g_init_rc, "%s", g_init_msg);
    return KVT_OK;
}

int32_t kvt_init(void) { return kvt_ensure_init(); }

const char *kvt_active_isa(void) {
    pthread_once(&g_once, init_once);
    return kvt_k->name;
}

int32_t kvt_isa_supported(const char *name) { return kvt_kernels_for(name) != NULL; }

/* The kernel table is process-wide: every call that runs kernels holds this lock
 * shared for its whole length, and kvt_set_isa takes it exclusively or refuses, so
 * a run never mixes two variants (the q16 path checks for a kernel once, then calls
 * it many times). The default rwlock prefers readers, so a reader may take it again
 * (kvt_serve holds it, and so do the runs it makes). */
static pthread_rwlock_t g_isa_lock = PTHREAD_RWLOCK_INITIALIZER;

void kvt_isa_hold(void) { pthread_rwlock_rdlock(&g_isa_lock); }
void kvt_isa_drop(void) { pthread_rwlock_unlock(&g_isa_lock); }

/* Switch variants within one process (tests, benchmarks); refused while any call runs kernels. */
int32_t kvt_set_isa(const char *name) {
    pthread_once(&g_once, init_once);
    if (!kvt_isa_name_known(name))
        return kvt_err(KVT_ERR_VALUE, "kvt_set_isa: expected generic, avx2, avx512, avx512bw or amx, got '%s'",
                       name ? name : "(null)");
    const kvt_kernels *k = kvt_kernels_for(name);
    if (!k) return kvt_err(KVT_ERR_UNSUPPORTED, "kvt_set_isa: '%s' is not supported by this CPU", name);
    if (pthread_rwlock_trywrlock(&g_isa_lock) != 0)
        return kvt_err(KVT_ERR_STATE, "kvt_set_isa: a run, serve loop or stream read is in flight on another "
                       "thread; switch to '%s' between runs", name);
    kvt_k = k;
    pthread_rwlock_unlock(&g_isa_lock);
    return KVT_OK;
}

/* ------------------------------------------------------------------ engines */
#define MAX_ENGINES 256
static kvt_engine *g_engines[MAX_ENGINES];
/* Handles are slot + 1 + MAX_ENGINES * (the slot's use count, wrapped): a handle kept after
 * its engine was destroyed does not name the next engine in that slot. */
static int32_t g_engine_uses[MAX_ENGINES];

/* the engine of handle h (NULL if not open); under g_eng_mu */
static kvt_engine *engine_at(int32_t h) {
    if (h < 1) return NULL;
    kvt_engine *e = g_engines[(h - 1) % MAX_ENGINES];
    return e && e->handle == h ? e : NULL;
}
static pthread_mutex_t g_eng_mu = PTHREAD_MUTEX_INITIALIZER;

kvt_engine *kvt_engine_acquire(int32_t h, int run) {
    kvt_engine *e = NULL;
    pthread_mutex_lock(&g_eng_mu);
    e = engine_at(h);
    if (e) {
        e->calls++;
        e->runs += run;
    }
    pthread_mutex_unlock(&g_eng_mu);
    if (!e) kvt_err(KVT_ERR_HANDLE, "engine handle %d is not open", (int)h);
    return e;
}

void kvt_engine_release(kvt_engine *e, int run) {
    pthread_mutex_lock(&g_eng_mu);
    e->calls--;
    e->runs -= run;
    pthread_mutex_unlock(&g_eng_mu);
}

int32_t kvt_engine_check_idle(kvt_engine *e, const char *fn) {
    pthread_mutex_lock(&g_eng_mu);
    const int runs = e->runs, serving = e->serving;
    pthread_mutex_unlock(&g_eng_mu);
    if (serving)
        return kvt_err(KVT_ERR_STATE, "%s: the engine is serving (kvt_serve); stop the loop first", fn);
    if (runs)
        return kvt_err(KVT_ERR_STATE, "%s: %d run(s) over the current plan are in flight on other threads; "
                       "plan again once they return", fn, runs);
    return KVT_OK;
}

int32_t kvt_engine_serving(kvt_engine *e, int on) {
    pthread_mutex_lock(&g_eng_mu);
    const int was = e->serving;
    if (on && !was) e->serving = 1;
    if (!on) e->serving = 0;
    pthread_mutex_unlock(&g_eng_mu);
    if (on && was) return kvt_err(KVT_ERR_STATE, "kvt_serve: the engine is already serving; one loop at a time");
    return KVT_OK;
}

int32_t kvt_engine_create(int32_t n_threads, int32_t *handle) {
    int32_t rc = kvt_ensure_init();
    if (rc) return rc;
    if (!handle) return kvt_err(KVT_ERR_VALUE, "kvt_engine_create: expected a handle pointer, got NULL");
    if (n_threads < 0 || n_threads > 4096)
        return kvt_err(KVT_ERR_VALUE, "kvt_engine_create: expected n_threads in [0, 4096], got %d", n_threads);
    if (n_threads == 0) {
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = c > 0 ? (int32_t)c : 1;
    }
    kvt_engine *e = calloc(1, sizeof *e);
    if (!e) return kvt_err(KVT_ERR_NOMEM, "kvt_engine_create: out of memory");
    e->pool = kvt_pool_create(n_threads);
    if (!e->pool) { free(e); return kvt_err(KVT_ERR_NOMEM, "kvt_engine_create: cannot start threads"); }
    pthread_mutex_init(&e->mu, NULL);
    pthread_mutex_lock(&g_eng_mu);
    int slot = -1;
    for (int i = 0; i < MAX_ENGINES; i++)
        if (!g_engines[i]) {
            slot = i;
            g_engine_uses[i] = (g_engine_uses[i] + 1) % (INT32_MAX / MAX_ENGINES);
            e->handle = g_engine_uses[i] * MAX_ENGINES + i + 1;
            g_engines[i] = e;
            break;
        }
    pthread_mutex_unlock(&g_eng_mu);
    if (slot < 0) {
        kvt_pool_destroy(e->pool);
        free(e);
        return kvt_err(KVT_ERR_NOMEM, "kvt_engine_create: all %d engine handles are in use", MAX_ENGINES);
    }
    *handle = e->handle;
    return KVT_OK;
}

int32_t kvt_engine_destroy(int32_t h) {
    pthread_mutex_lock(&g_eng_mu);
    kvt_engine *e = engine_at(h);
    const int serving = e ? e->serving : 0, calls = e ? e->calls : 0;
    if (e && !serving && !calls) g_engines[(h - 1) % MAX_ENGINES] = NULL;
    pthread_mutex_unlock(&g_eng_mu);
    if (!e) return kvt_err(KVT_ERR_HANDLE, "engine handle %d is not open", (int)h);
    if (serving)
        return kvt_err(KVT_ERR_STATE, "kvt_engine_destroy: engine %d is serving (kvt_serve); stop the loop first",
                       (int)h);
    if (calls)
        return kvt_err(KVT_ERR_STATE, "kvt_engine_destroy: %d call(s) on engine %d are in flight on other threads",
                       calls, (int)h);
    /* out of the table with no call holding it: nothing else can reach it now */
    kvt_plan_free(&e->plan);
    kvt_pool_destroy(e->pool);
    pthread_mutex_destroy(&e->mu);
    free(e);
    return KVT_OK;
}

int32_t kvt_engine_threads(int32_t h) {
    kvt_engine *e = kvt_engine_acquire(h, 0);
    if (!e) return -KVT_ERR_HANDLE;
    const int32_t n = kvt_pool_size(e->pool);
    kvt_engine_release(e, 0);
    return n;
}

int32_t kvt_plan_max_tokens(int32_t h) {
    kvt_engine *e = kvt_engine_acquire(h, 0);
    if (!e) return -KVT_ERR_HANDLE;
    pthread_mutex_lock(&e->mu);
    const int32_t n = e->plan.valid ? e->plan.n_max : 0;
    pthread_mutex_unlock(&e->mu);
    kvt_engine_release(e, 0);
    return n;
}

/* -------------------------------------------------------------- stream read */
typedef struct {
    const uint8_t *buf;
    int64_t nbytes, chunk;
    atomic_ullong sum;
} stream_ctx;

static void stream_task(void *c, int64_t item, int tid) {
    (void)tid;
    stream_ctx *s = c;
    int64_t a = item * s->chunk, n = s->chunk;
    if (a + n > s->nbytes) n = s->nbytes - a;
    atomic_fetch_add(&s->sum, kvt_k->sum_bytes(s->buf + a, n));
}

int32_t kvt_stream_read(int32_t h, const void *buf, int64_t nbytes, uint64_t *checksum) {
    if (nbytes < 0 || (nbytes > 0 && !buf))
        return kvt_err(KVT_ERR_VALUE, "kvt_stream_read: expected a buffer and nbytes >= 0, got %p, %lld",
                       buf, (long long)nbytes);
    kvt_engine *e = kvt_engine_acquire(h, 0);
    if (!e) return KVT_ERR_HANDLE;
    stream_ctx s = {.buf = buf, .nbytes = nbytes};
    atomic_init(&s.sum, 0);
    int64_t parts = (int64_t)kvt_pool_size(e->pool) * 8;
    s.chunk = ((nbytes + parts - 1) / parts + 4095) & ~(int64_t)4095;
    if (s.chunk == 0) s.chunk = 4096;
    kvt_isa_hold();
    pthread_mutex_lock(&e->mu);
    kvt_pool_run(e->pool, (nbytes + s.chunk - 1) / s.chunk, stream_task, &s);
    pthread_mutex_unlock(&e->mu);
    kvt_isa_drop();
    kvt_engine_release(e, 0);
    if (checksum) *checksum = atomic_load(&s.sum);
    return KVT_OK;
}
