/* Relaxed atomic helpers for counters shared between the asyncio thread and the relay
 * workers (_relay_c.pyx). Relaxed ordering is enough: the values only steer load
 * balancing; every hand-off of real data goes through a mutex. */
#ifndef SOCKS6FAST_RELAY_ATOMIC_H
#define SOCKS6FAST_RELAY_ATOMIC_H

static inline int s6_load(int *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void s6_add(int *p, int v) { (void)__atomic_add_fetch(p, v, __ATOMIC_RELAXED); }
/* 64-bit twins for byte counts (pipe capacity in use, bytes copied without a pipe). */
static inline long long s6_load64(long long *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void s6_add64(long long *p, long long v) { (void)__atomic_add_fetch(p, v, __ATOMIC_RELAXED); }
/* Reference counts (token buckets shared by pairs and their Python owner): the new value. */
static inline int s6_add_fetch(int *p, int v) { return __atomic_add_fetch(p, v, __ATOMIC_ACQ_REL); }
static inline void s6_store(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
/* A counter with one writer (a worker's bytes relayed): a plain add, stored atomically so the
 * asyncio thread reads a whole value; no locked instruction per splice (issue 14 metrics). */
static inline void s6_bump64(long long *p, long long v) {
    __atomic_store_n(p, __atomic_load_n(p, __ATOMIC_RELAXED) + v, __ATOMIC_RELAXED);
}

#endif
