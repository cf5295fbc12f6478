/*
 * In-guest disk benchmark for dlsm's VM benchmarks: O_DIRECT I/O on a block
 * device from N threads (each thread one request in flight, so N is the
 * queue depth), for a fixed time per row. Prints one line per row:
 *
 *   BENCH <row> iops=<n> mibs=<MiB/s> lat_us=<mean> cpu_busy=<guest CPU %>
 *
 * and "BENCH ceiling ..." first: the same 4 KiB random-read loop against
 * guest memory (no device), which is what the guest's CPU alone allows
 * under TCG. usage: diskbench DEVICE SECONDS
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <linux/fs.h>

static uint64_t now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000 + t.tv_nsec / 1000;
}

/* user+system+irq jiffies and total jiffies from /proc/stat */
static void cpu(uint64_t *busy, uint64_t *total) {
    FILE *f = fopen("/proc/stat", "r");
    unsigned long long v[8] = {0};
    if (f) {
        if (fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], &v[7]) != 8) {}
        fclose(f);
    }
    *total = v[0] + v[1] + v[2] + v[3] + v[4] + v[5] + v[6] + v[7];
    *busy = *total - v[3] - v[4];
}

struct job {
    int fd;          /* -1: memory (the CPU ceiling) */
    uint8_t *mem;
    uint64_t span;   /* bytes addressable */
    size_t bs;
    int write, seq;
    uint64_t deadline;
    uint64_t ops, lat;
    unsigned seed;
    uint64_t seqpos;
};

static void *run(void *arg) {
    struct job *j = arg;
    uint8_t *buf;
    if (posix_memalign((void **)&buf, 4096, j->bs)) return NULL;
    memset(buf, 0x5a ^ (uint8_t)j->seed, j->bs);
    uint64_t blocks = j->span / j->bs;
    while (now_us() < j->deadline) {
        uint64_t off;
        if (j->seq) { off = (j->seqpos % blocks) * j->bs; j->seqpos++; }
        else off = ((uint64_t)rand_r(&j->seed) * 7919 + rand_r(&j->seed)) % blocks * j->bs;
        uint64_t t0 = now_us();
        ssize_t n;
        if (j->fd < 0) { memcpy(buf, j->mem + off, j->bs); n = j->bs; }
        else if (j->write) n = pwrite(j->fd, buf, j->bs, off);
        else n = pread(j->fd, buf, j->bs, off);
        if (n != (ssize_t)j->bs) { printf("BENCH ERROR at %llu\n", (unsigned long long)off); break; }
        j->lat += now_us() - t0;
        j->ops++;
    }
    free(buf);
    return NULL;
}

static void row(const char *name, int fd, uint8_t *mem, uint64_t span, size_t bs, int write, int seq, int depth, int secs) {
    struct job jobs[64];
    pthread_t th[64];
    uint64_t b0, t0, b1, t1;
    cpu(&b0, &t0);
    uint64_t start = now_us();
    for (int i = 0; i < depth; i++) {
        jobs[i] = (struct job){fd, mem, span, bs, write, seq, start + (uint64_t)secs * 1000000, 0, 0, (unsigned)(i * 2654435761u + 1), (uint64_t)i * (span / bs / depth)};
        pthread_create(&th[i], NULL, run, &jobs[i]);
    }
    uint64_t ops = 0, lat = 0;
    for (int i = 0; i < depth; i++) { pthread_join(th[i], NULL); ops += jobs[i].ops; lat += jobs[i].lat; }
    double el = (now_us() - start) / 1e6;
    cpu(&b1, &t1);
    printf("BENCH %s iops=%.0f mibs=%.1f lat_us=%.1f cpu_busy=%.0f\n", name, ops / el, ops * (double)bs / el / 1048576.0,
           ops ? (double)lat / ops : 0.0, t1 > t0 ? 100.0 * (b1 - b0) / (t1 - t0) : 0.0);
    fflush(stdout);
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: diskbench DEVICE SECONDS\n"); return 2; }
    int secs = atoi(argv[2]);
    int fd = open(argv[1], O_RDWR | O_DIRECT);
    if (fd < 0) { perror("open"); return 1; }
    uint64_t size = 0;
    if (ioctl(fd, BLKGETSIZE64, &size) != 0) { perror("BLKGETSIZE64"); return 1; }
    uint64_t span = size > (256ull << 20) ? (256ull << 20) : size;
    uint8_t *mem = malloc(32 << 20);
    memset(mem, 1, 32 << 20);
    row("ceiling-4k-qd1", -1, mem, 32 << 20, 4096, 0, 0, 1, secs);
    row("randread-4k-qd1", fd, NULL, span, 4096, 0, 0, 1, secs);
    row("randwrite-4k-qd1", fd, NULL, span, 4096, 1, 0, 1, secs);
    row("randread-4k-qd32", fd, NULL, span, 4096, 0, 0, 32, secs);
    row("randwrite-4k-qd32", fd, NULL, span, 4096, 1, 0, 32, secs);
    row("seqread-1m-qd8", fd, NULL, span, 1 << 20, 0, 1, 8, secs);
    row("seqwrite-1m-qd8", fd, NULL, span, 1 << 20, 1, 1, 8, secs);
    printf("BENCH DONE\n");
    return 0;
}
