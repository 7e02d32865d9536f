/* nbd_io: a small libnbd load generator for bench/tls.sh, because fio's nbd
 * engine cannot pass TLS certificates (libnbd refuses the tls-certificates
 * URI parameter unless the program allows local files, and fio does not).
 *
 * Usage: nbd_io URI read|write|randread|randwrite BLOCK DEPTH SECONDS
 * Prints "IOPS MB/s" (MB = 10^6 bytes). Requests are kept DEPTH deep with
 * libnbd's asynchronous API on one connection; random offsets are aligned to
 * BLOCK and uniform over the export; sequential ones wrap at its end.
 */
#include <libnbd.h>

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(struct nbd_handle* h, const char* what) {
  fprintf(stderr, "nbd_io: %s: %s\n", what, h ? nbd_get_error() : "bad arguments");
  exit(1);
}

int main(int argc, char** argv) {
  if (argc != 6) die(NULL, "usage");
  const char* mode = argv[2];
  const uint64_t block = strtoull(argv[3], NULL, 0);
  const int depth = atoi(argv[4]);
  const double seconds = atof(argv[5]);
  const int write = strstr(mode, "write") != NULL, random = strncmp(mode, "rand", 4) == 0;
  if (block == 0 || depth <= 0 || depth > 256 || seconds <= 0) die(NULL, "usage");

  struct nbd_handle* h = nbd_create();
  if (!h) die(h, "nbd_create");
  nbd_set_uri_allow_local_file(h, true); /* tls-certificates=DIR, tls-psk-file=FILE */
  if (nbd_connect_uri(h, argv[1]) == -1) die(h, "connect");
  const int64_t size = nbd_get_size(h);
  if (size < (int64_t)block) die(h, "export size");
  const uint64_t blocks = (uint64_t)size / block;

  char* buf = malloc(block * (size_t)depth);
  if (!buf) die(h, "malloc");
  memset(buf, 0xa5, block * (size_t)depth);
  int64_t cookies[256] = {0};
  uint64_t next = 0, done = 0, rng = 0x9e3779b97f4a7c15ull;
  const double start = now(), end = start + seconds;
  double t = start;
  for (;;) {
    for (int i = 0; i < depth; ++i) {
      if (cookies[i] > 0 && nbd_aio_command_completed(h, (uint64_t)cookies[i]) == 0) continue;
      if (cookies[i] > 0) ++done;
      cookies[i] = 0;
      if (t >= end) continue;
      uint64_t b;
      if (random) {
        rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17; /* xorshift64 */
        b = rng % blocks;
      } else {
        b = next++ % blocks;
      }
      char* p = buf + block * (size_t)i;
      cookies[i] = write ? nbd_aio_pwrite(h, p, block, b * block, NBD_NULL_COMPLETION, 0)
                         : nbd_aio_pread(h, p, block, b * block, NBD_NULL_COMPLETION, 0);
      if (cookies[i] == -1) die(h, "submit");
    }
    if (t >= end && nbd_aio_in_flight(h) == 0) break;
    if (nbd_poll(h, -1) == -1) die(h, "poll");
    t = now();
  }
  /* Completions are retired on the next pass, so count the last ones. */
  for (int i = 0; i < depth; ++i)
    if (cookies[i] > 0 && nbd_aio_command_completed(h, (uint64_t)cookies[i]) == 1) ++done;
  const double elapsed = now() - start;
  printf("%.0f %.1f\n", (double)done / elapsed, (double)done * (double)block / elapsed / 1e6);
  nbd_shutdown(h, 0);
  nbd_close(h);
  free(buf);
  return 0;
}
