/* Raw O_DIRECT random-read probe in C, the yardstick for real/loader.py (no Python, no GIL).
 *
 *   oprobe SIZE_BYTES DEPTH TOTAL_READS SEED FILE...
 *
 * DEPTH pthreads each issue pread() of SIZE_BYTES at random SIZE-aligned offsets of a random FILE
 * (4 KiB-aligned buffers) until TOTAL_READS reads are done; prints aggregate GB/s on one line. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static int nfiles, *fds;
static off_t *fsizes;
static size_t size;
static long total_reads;
static long next_read = 0;
static unsigned long long seed;

static uint64_t splitmix(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static void *worker(void *arg) {
    uint64_t s = seed * 1000003ULL + (uint64_t)(uintptr_t)arg;
    void *buf;
    if (posix_memalign(&buf, 4096, size)) { perror("posix_memalign"); exit(2); }
    for (;;) {
        long i = __atomic_fetch_add(&next_read, 1, __ATOMIC_RELAXED);
        if (i >= total_reads) break;
        int f = (int)(splitmix(&s) % (uint64_t)nfiles);
        off_t slots = fsizes[f] / (off_t)size;
        off_t off = (off_t)(splitmix(&s) % (uint64_t)slots) * (off_t)size;
        size_t got = 0;
        while (got < size) {
            ssize_t r = pread(fds[f], (char *)buf + got, size - got, off + (off_t)got);
            if (r <= 0) { perror("pread"); exit(3); }
            got += (size_t)r;
        }
    }
    free(buf);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 6) { fprintf(stderr, "usage: oprobe SIZE DEPTH TOTAL_READS SEED FILE...\n"); return 1; }
    size = (size_t)atol(argv[1]);
    int depth = atoi(argv[2]);
    total_reads = atol(argv[3]);
    seed = strtoull(argv[4], NULL, 10);
    nfiles = argc - 5;
    fds = calloc(nfiles, sizeof(int));
    fsizes = calloc(nfiles, sizeof(off_t));
    for (int i = 0; i < nfiles; i++) {
        fds[i] = open(argv[5 + i], O_RDONLY | O_DIRECT);
        if (fds[i] < 0) { perror(argv[5 + i]); return 1; }
        struct stat st;
        fstat(fds[i], &st);
        fsizes[i] = st.st_size;
    }
    pthread_t *th = calloc(depth, sizeof(pthread_t));
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long k = 0; k < depth; k++) pthread_create(&th[k], NULL, worker, (void *)(uintptr_t)k);
    for (int k = 0; k < depth; k++) pthread_join(th[k], NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double secs = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    printf("%.6f\n", (double)total_reads * (double)size / secs / 1e9);
    return 0;
}
