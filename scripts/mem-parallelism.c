// How many cache misses this machine overlaps: a pointer chase over a buffer of 64-byte lines in a
// random cycle, on transparent huge pages (as the worker's tables are), timed as ns per load with 1
// chain (the latency of one miss) and with K independent chains in lockstep (K misses in flight).
// BENCHMARKS.md (lb-core, session 18) quotes it for the warm-up's prefetches.
//
//   gcc -O2 -o /tmp/mem-parallelism scripts/mem-parallelism.c && /tmp/mem-parallelism 64
//
// The argument is the buffer in MiB (64: the size of a 1 M-entry conntrack table).
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec*1e9+t.tv_nsec;}
int main(int argc,char**argv){
  size_t mb = argc>1? atoi(argv[1]) : 64;
  size_t bytes = mb<<20, n = bytes/64;
  char *buf = mmap(0, bytes, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0);
  madvise(buf, bytes, MADV_HUGEPAGE);
  memset(buf, 0, bytes);
  uint32_t *perm = malloc(n*sizeof *perm);
  for (size_t i=0;i<n;i++) perm[i]=i;
  srand(1);
  for (size_t i=n-1;i>0;i--){size_t j=((size_t)rand()*RAND_MAX+rand())%(i+1);uint32_t t=perm[i];perm[i]=perm[j];perm[j]=t;}
  for (size_t i=0;i<n;i++) *(char**)(buf+64*(size_t)perm[i]) = buf+64*(size_t)perm[(i+1)%n];
  int ks[]={1,2,4,8,12,16,24,32,48};
  for (int ki=0; ki<9; ki++){
    int k=ks[ki]; char *p[64];
    for (int c=0;c<k;c++) p[c]=buf+64*(size_t)perm[(n/k)*c];
    size_t steps = 4000000/k;
    double best=1e18;
    for (int rep=0;rep<5;rep++){
      double t0=now();
      for (size_t s=0;s<steps;s++) for (int c=0;c<k;c++) p[c]=*(char**)p[c];
      double t=(now()-t0)/(steps*(double)k);
      if (t<best) best=t;
    }
    uintptr_t x=0; for(int c=0;c<k;c++) x^=(uintptr_t)p[c];
    printf("%zu MiB chains %2d: %6.2f ns per load (%zu)\n", mb, k, best, (size_t)(x&1));
  }
  return 0;
}
