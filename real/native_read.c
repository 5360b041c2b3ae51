/* The loader's hot loop in C (real/loader.py, ReadPool): claim reads of one batch from a shared
 * counter and pread each into place, without the Python interpreter lock.
 *
 * Each of the pool's threads calls drain() once per batch through ctypes, which releases the GIL
 * for the whole call, so a batch of hundreds of reads costs each thread one GIL round trip instead
 * of one per read, and the engine's own thread is not starved while the reads are in flight.
 * Results are recorded, not handled: result[i] = bytes read or -errno; the Python side completes
 * short reads and raises on errors (its rules, one place). Built at import by real/loader.py with
 * the system C compiler; without one the loader uses its pure-Python loop. */
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
