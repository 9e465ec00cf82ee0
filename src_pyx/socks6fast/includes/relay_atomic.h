/* Relaxed atomic helpers for counters shared between the asyncio thread and the relay
 * workers (_relay_c.pyx). Relaxed ordering is enough: the values only steer load
 * balancing; every hand-off of real data goes through a mutex. */
#ifndef SOCKS6FAST_RELAY_ATOMIC_H
#define SOCKS6FAST_RELAY_ATOMIC_H

static inline int s6_load(int *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void s6_add(int *p, int v) { (void)__atomic_add_fetch(p, v, __ATOMIC_RELAXED); }

#endif
