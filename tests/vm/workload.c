/*
 * Guest workload for dlsm's VM tests: writes random 4 KiB blocks across the
 * disk (each followed by fsync), reads blocks back with O_DIRECT and checks
 * them, and prints a line per second on the serial console:
 *
 *   STAT t=<ms since start> writes=<total> wbytes=<total> wlat_max_us=<worst this second> mism=<total>
 *
 * After <seconds>, it re-reads every block it wrote (O_DIRECT), prints
 * "FINAL OK blocks=<n>" or "FINAL MISMATCH ...", dumps its record as
 * "REC <block> <seq>" lines, and "DONE". Block b at sequence s holds a
 * deterministic pattern, so the host can check the disk afterwards.
 *
 * usage: workload DEVICE SECONDS
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <linux/fs.h>

#define BLK 4096

static uint64_t now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000 + t.tv_nsec / 1000;
}

/* The content of block b at sequence s (s > 0). Shared with the host. */
static void fill(uint8_t *buf, uint64_t b, uint32_t s) {
    uint64_t x = (b << 32) ^ s ^ 0x9e3779b97f4a7c15ULL;
    for (int i = 0; i < BLK; i += 8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        memcpy(buf + i, &x, 8);
    }
}

static uint64_t rng = 88172645463325252ULL;
static uint64_t next_rand(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: workload DEVICE SECONDS\n");
        return 2;
    }
    int secs = atoi(argv[2]);
    int wfd = open(argv[1], O_RDWR);
    int rfd = open(argv[1], O_RDONLY | O_DIRECT);
    if (wfd < 0 || rfd < 0) {
        perror("open");
        return 1;
    }
    uint64_t size = 0;
    if (ioctl(wfd, BLKGETSIZE64, &size) < 0) {
        perror("BLKGETSIZE64");
        return 1;
    }
    uint64_t blocks = size / BLK;
    uint32_t *seq = calloc(blocks, sizeof *seq);
    uint8_t *wbuf, *rbuf, *want;
    if (!seq || posix_memalign((void **)&wbuf, BLK, BLK) || posix_memalign((void **)&rbuf, BLK, BLK) ||
        posix_memalign((void **)&want, BLK, BLK)) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    rng ^= now_us();
    uint64_t start = now_us(), last = start, writes = 0, mism = 0, worst = 0;
    printf("WORKLOAD START blocks=%llu\n", (unsigned long long)blocks);
    fflush(stdout);
    while (now_us() - start < (uint64_t)secs * 1000000) {
        uint64_t b = next_rand() % blocks;
        uint32_t s = seq[b] + 1;
        fill(wbuf, b, s);
        uint64_t t0 = now_us();
        if (pwrite(wfd, wbuf, BLK, b * BLK) != BLK || fsync(wfd) != 0) {
            printf("WRITE ERROR block=%llu\n", (unsigned long long)b);
            fflush(stdout);
            sleep(1);
            continue;
        }
        uint64_t lat = now_us() - t0;
        if (lat > worst)
            worst = lat;
        seq[b] = s;
        writes++;
        /* Read back a random block written earlier, bypassing the cache. */
        uint64_t c = next_rand() % blocks;
        if (seq[c]) {
            if (pread(rfd, rbuf, BLK, c * BLK) != BLK) {
                printf("READ ERROR block=%llu\n", (unsigned long long)c);
            } else {
                fill(want, c, seq[c]);
                if (memcmp(rbuf, want, BLK) != 0) {
                    mism++;
                    printf("MISMATCH block=%llu seq=%u\n", (unsigned long long)c, seq[c]);
                }
            }
        }
        uint64_t n = now_us();
        if (n - last >= 1000000) {
            printf("STAT t=%llu writes=%llu wbytes=%llu wlat_max_us=%llu mism=%llu\n",
                   (unsigned long long)(n - start) / 1000, (unsigned long long)writes,
                   (unsigned long long)writes * BLK, (unsigned long long)worst, (unsigned long long)mism);
            fflush(stdout);
            last = n;
            worst = 0;
        }
    }
    uint64_t checked = 0;
    for (uint64_t b = 0; b < blocks; b++) {
        if (!seq[b])
            continue;
        fill(want, b, seq[b]);
        if (pread(rfd, rbuf, BLK, b * BLK) != BLK || memcmp(rbuf, want, BLK) != 0) {
            mism++;
            printf("MISMATCH block=%llu seq=%u (final pass)\n", (unsigned long long)b, seq[b]);
        }
        checked++;
    }
    if (mism)
        printf("FINAL MISMATCH count=%llu\n", (unsigned long long)mism);
    else
        printf("FINAL OK blocks=%llu writes=%llu\n", (unsigned long long)checked, (unsigned long long)writes);
    for (uint64_t b = 0; b < blocks; b++)
        if (seq[b])
            printf("REC %llu %u\n", (unsigned long long)b, seq[b]);
    printf("DONE\n");
    fflush(stdout);
    return mism ? 1 : 0;
}
