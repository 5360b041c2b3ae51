/* The loader's hot loop in C (real/loader.py, ReadPool): claim reads of one batch from a shared
 * counter and pread each into place, without the Python interpreter lock.
 *
 * Each of the pool's threads calls drain() once per batch through ctypes, which releases the GIL
 * for the whole call, so a batch of hundreds of reads costs each thread one GIL round trip instead
 * of one per read, and the engine's own thread is not starved while the reads are in flight.
 * Results are recorded, not handled: result[i] = bytes read or -errno; the Python side completes
 * short reads and raises on errors (its rules, one place). Built on first use by real/loader.py with
 * the system C compiler (into a per-user cache folder); without one the loader uses its Python loop.
 * A batch in progress cannot be interrupted by Ctrl-C; it ends when its reads do. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <unistd.h>

/* counters[0]: next read to claim; counters[1]: reads finished. Returns 1 if this call finished
 * the batch's last read (that thread then completes the batch), else 0. */
int flashlab_drain(int64_t n, const int64_t *fd, const int64_t *addr, const int64_t *off,
                   const int64_t *len, int64_t *result, int64_t *counters) {
    int last = 0;
    for (;;) {
        int64_t i = __atomic_fetch_add(&counters[0], 1, __ATOMIC_RELAXED);
        if (i >= n)
            return last;
        ssize_t r;
        do {
            r = pread((int)fd[i], (void *)(intptr_t)addr[i], (size_t)len[i], (off_t)off[i]);
        } while (r < 0 && errno == EINTR);
        result[i] = r < 0 ? -(int64_t)errno : (int64_t)r;
        if (__atomic_add_fetch(&counters[1], 1, __ATOMIC_ACQ_REL) == n)
            last = 1;
    }
}

/* ---- a pool of native reader threads (ReadPool(threads="native")) --------------------------------
 * The Python pool wakes its reader threads through a Python condition: each batch costs every thread a
 * GIL round trip before its first read, which starves the engine's thread and ramps the queue depth up
 * slowly. These pthreads wait on a pthread condition and run drain() directly; Python submits a batch
 * with one call and waits with one call (ctypes releases the GIL while it blocks). */
#include <pthread.h>
#include <stdlib.h>
#include <time.h>

typedef struct flashlab_job {
    int64_t n;
    const int64_t *fd, *addr, *off, *len;
    int64_t *result;
    int64_t counters[2];
    int done;                 /* the last read finished (guarded by the pool's mutex) */
    int refs;                 /* pool threads inside drain() for this job (guarded) */
    double t_done;            /* CLOCK_MONOTONIC seconds when the last read finished: Python's perf_counter */
    int32_t *flag;            /* optional: set to flag_value when the last read finished (a GPU may poll it) */
    int32_t flag_value;
    struct flashlab_job *next;
} flashlab_job;

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t work, fin;
    flashlab_job *head, *tail; /* jobs with reads left to claim, oldest first */
    int closed, nthreads;
    pthread_t *threads;
} flashlab_pool;

static double monotonic_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void *pool_worker(void *arg) {
    flashlab_pool *p = (flashlab_pool *)arg;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->head && !p->closed)
            pthread_cond_wait(&p->work, &p->mu);
        if (!p->head)             /* closed and nothing left to read */
            break;
        flashlab_job *j = p->head;
        j->refs++;                /* j cannot be freed while this thread reads for it */
        pthread_mutex_unlock(&p->mu);
        int last = flashlab_drain(j->n, j->fd, j->addr, j->off, j->len, j->result, j->counters);
        double t = last ? monotonic_seconds() : 0.0;
        pthread_mutex_lock(&p->mu);
        if (p->head == j) {       /* no reads left to claim: the next job's reads start now */
            p->head = j->next;
            if (!p->head)
                p->tail = NULL;
        }
        j->refs--;
        if (last) {
            j->t_done = t;
            if (j->flag)          /* every read returned (its bytes are in place, or its error recorded) */
                __atomic_store_n(j->flag, j->flag_value, __ATOMIC_RELEASE);
            j->done = 1;
        }
        if (j->done && j->refs == 0)
            pthread_cond_broadcast(&p->fin);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

/* nthreads reader threads; NULL if none could be started. */
void *flashlab_pool_new(int nthreads) {
    flashlab_pool *p = (flashlab_pool *)calloc(1, sizeof *p);
    if (!p || nthreads < 1)
        return (free(p), NULL);
    p->threads = (pthread_t *)calloc((size_t)nthreads, sizeof(pthread_t));
    if (!p->threads)
        return (free(p), NULL);
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->work, NULL);
    pthread_cond_init(&p->fin, NULL);
    for (int i = 0; i < nthreads; i++) {
        if (pthread_create(&p->threads[i], NULL, pool_worker, p) != 0)
            break;
        p->nthreads++;
    }
    if (p->nthreads == 0) {
        free(p->threads);
        free(p);
        return NULL;
    }
    return p;
}

int flashlab_pool_threads(void *pool) { return ((flashlab_pool *)pool)->nthreads; }

/* Queue one batch (the arrays must stay alive until flashlab_pool_wait returns); returns the job.
 * flag (may be NULL): *flag = flag_value once every read of the batch has returned. */
void *flashlab_pool_submit_flag(void *pool, int64_t n, const int64_t *fd, const int64_t *addr,
                                const int64_t *off, const int64_t *len, int64_t *result, int32_t *flag,
                                int32_t flag_value) {
    flashlab_pool *p = (flashlab_pool *)pool;
    flashlab_job *j = (flashlab_job *)calloc(1, sizeof *j);
    if (!j)
        return NULL;
    j->n = n; j->fd = fd; j->addr = addr; j->off = off; j->len = len; j->result = result;
    j->flag = flag; j->flag_value = flag_value;
    pthread_mutex_lock(&p->mu);
    if (n <= 0) {
        j->t_done = monotonic_seconds();
        if (flag)
            __atomic_store_n(flag, flag_value, __ATOMIC_RELEASE);
        j->done = 1;
    } else {
        if (p->tail)
            p->tail->next = j;
        else
            p->head = j;
        p->tail = j;
    }
    pthread_mutex_unlock(&p->mu);
    if (n > 0)                    /* after the unlock: woken threads do not queue on the mutex we hold */
        pthread_cond_broadcast(&p->work);
    return j;
}

/* Block until every read of the job finished (results in result[]); frees the job; returns the
 * CLOCK_MONOTONIC time at which its last read finished. */
double flashlab_pool_wait(void *pool, void *job) {
    flashlab_pool *p = (flashlab_pool *)pool;
    flashlab_job *j = (flashlab_job *)job;
    pthread_mutex_lock(&p->mu);
    while (!(j->done && j->refs == 0))
        pthread_cond_wait(&p->fin, &p->mu);
    pthread_mutex_unlock(&p->mu);
    double t = j->t_done;
    free(j);
    return t;
}

/* Finish the queued reads, stop and join the threads, free the pool. */
void flashlab_pool_close(void *pool) {
    flashlab_pool *p = (flashlab_pool *)pool;
    pthread_mutex_lock(&p->mu);
    p->closed = 1;
    pthread_cond_broadcast(&p->work);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->nthreads; i++)
        pthread_join(p->threads[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->work);
    pthread_cond_destroy(&p->fin);
    free(p->threads);
    free(p);
}
