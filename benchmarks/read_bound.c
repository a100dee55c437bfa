/* What a compiled reader could reach on this host: random whole-row reads of kdjax
 * row-sharded arrays (one preadv of row + stored crc32c, one crc32c check per row and
 * array, fresh output buffers per step), against the page-cache sequential-read ceiling
 * measured the way benchmarks/loader.py measures it (4 MiB reads into one reused,
 * huge-page-backed buffer). Shards must be written in row order (kdjax's writers do),
 * one row per inner chunk.
 *
 *   L=$(python -c "import google_crc32c,os,glob;print(glob.glob(os.path.dirname(
 *       google_crc32c.__file__)+'.libs')[0])")
 *   gcc -O2 -o /tmp/read_bound benchmarks/read_bound.c -L$L -l:$(ls $L) -Wl,-rpath,$L -lpthread
 *   python -c "import sys; sys.path.insert(0, 'benchmarks'); import loader; from pathlib \
 *       import Path; loader.build_stores(Path('/tmp/rb'), 4096, 1024, 16, 151936, 256)"
 *   /tmp/read_bound 4096 256 32 THREADS /tmp/rb/teacher/arrays/ids/c:65536:/0/0 \
 *       /tmp/rb/teacher/arrays/counts/c:16384:/0/0 /tmp/rb/tokens/arrays/records/c:7168:/0
 *
 * Arguments: rows shard_rows batch threads, then per array DIR:ROW_BYTES:SUFFIX (shard
 * file s is DIR/s SUFFIX). crc32c is google-crc32c's C library (hardware CRC32C).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

uint32_t crc32c_value(const uint8_t *data, size_t n);

enum { MAX_ARRAYS = 8, MAX_SHARDS = 4096, STEPS = 2000 };
static int fds[MAX_ARRAYS][MAX_SHARDS];
static long row_bytes[MAX_ARRAYS];
static int n_arrays, n_shards, shard_rows, n_rows, batch, n_threads;

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static void *reader(void *arg) {
  unsigned seed = (unsigned)(uintptr_t)arg;
  long bad = 0;
  for (int step = 0; step < STEPS / n_threads; step++) {
    for (int a = 0; a < n_arrays; a++) {
      uint8_t *out = malloc(row_bytes[a] * batch);
      for (int i = 0; i < batch; i++) {
        int r = rand_r(&seed) % n_rows;
        uint8_t *dst = out + (long)i * row_bytes[a];
        uint32_t stored;
        struct iovec iov[2] = {{dst, row_bytes[a]}, {&stored, 4}};
        long off = (long)(r % shard_rows) * (row_bytes[a] + 4);
        if (preadv(fds[a][r / shard_rows], iov, 2, off) != row_bytes[a] + 4) bad++;
        if (crc32c_value(dst, row_bytes[a]) != stored) bad++;
      }
      free(out);
    }
  }
  return (void *)bad;
}

int main(int argc, char **argv) {
  if (argc < 6) {
    fprintf(stderr, "usage: %s rows shard_rows batch threads DIR:ROW_BYTES:SUFFIX...\n", argv[0]);
    return 2;
  }
  n_rows = atoi(argv[1]), shard_rows = atoi(argv[2]), batch = atoi(argv[3]);
  n_threads = atoi(argv[4]), n_arrays = argc - 5;
  n_shards = (n_rows + shard_rows - 1) / shard_rows;
  if (n_arrays > MAX_ARRAYS || n_shards > MAX_SHARDS || n_threads < 1) return 2;
  double total = 0, row_total = 0;
  for (int a = 0; a < n_arrays; a++) {
    char dir[512], suffix[64], path[640];
    if (sscanf(argv[5 + a], "%511[^:]:%ld:%63s", dir, &row_bytes[a], suffix) != 3) return 2;
    row_total += row_bytes[a];
    for (int s = 0; s < n_shards; s++) {
      snprintf(path, sizeof path, "%s/%d%s", dir, s, suffix);
      struct stat st;
      if ((fds[a][s] = open(path, O_RDONLY)) < 0 || fstat(fds[a][s], &st)) {
        perror(path);
        return 1;
      }
      total += st.st_size;
    }
  }
  char *buf;
  if (posix_memalign((void **)&buf, 2 << 20, 4 << 20)) return 1;
  madvise(buf, 4 << 20, MADV_HUGEPAGE);
  memset(buf, 1, 4 << 20);
  double best = 1e9;
  for (int rep = 0; rep < 8; rep++) {
    double t0 = now();
    for (int a = 0; a < n_arrays; a++)
      for (int s = 0; s < n_shards; s++) {
        long off = 0, n;
        while ((n = pread(fds[a][s], buf, 4 << 20, off)) > 0) off += n;
      }
    double d = now() - t0;
    if (d < best) best = d;
  }
  double ceiling = total / best;
  pthread_t tid[64];
  double t0 = now();
  for (int t = 0; t < n_threads && t < 64; t++)
    pthread_create(&tid[t], 0, reader, (void *)(uintptr_t)(t + 1));
  long bad = 0;
  for (int t = 0; t < n_threads && t < 64; t++) {
    void *r;
    pthread_join(tid[t], &r);
    bad += (long)r;
  }
  double wall = now() - t0;
  double rows = (double)(STEPS / n_threads) * n_threads * batch;
  printf("ceiling %.0f MB/s; %d thread(s): %.0f rows/s, %.0f MB/s of row data, ratio %.2f; "
         "bad reads %ld\n", ceiling / 1e6, n_threads, rows / wall, rows * row_total / wall / 1e6,
         rows * row_total / wall / ceiling, bad);
  return bad != 0;
}
