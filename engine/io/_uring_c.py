"""C source of the io_uring ring: raw syscalls, no liburing, compiled by cffi on first use (uring_build.py).

Why C and not Python over ctypes/cffi-ABI: the SQ/CQ ring protocol needs acquire/release ordering on
the shared head and tail words, which Python cannot express (it only happens to work on x86's strong
memory model); and a whole batch runs here with the GIL released, so the model computes on the other
core while requests are submitted, reaped and (in staging mode) copied.
"""

CDEF = """
typedef struct mer_ring mer_ring;
mer_ring *mer_ring_new(unsigned entries, unsigned flags, int *err);
void mer_ring_free(mer_ring *r);
int mer_ring_inflight(mer_ring *r);
unsigned mer_ring_entries(mer_ring *r);
int mer_ring_register_buffers(mer_ring *r, char **bufs, uint64_t len, unsigned n);
int mer_ring_read(mer_ring *r, unsigned n, const int32_t *fds, const uint64_t *offs, char **dests,
                  const uint32_t *lens, int32_t *res, uint64_t *lat_ns, uint32_t *depth, unsigned qd,
                  char **staging, unsigned n_staging);
#define MER_SETUP_COOP_TASKRUN ...
"""

SOURCE = r"""
#include <errno.h>
#include <linux/io_uring.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifndef IORING_SETUP_COOP_TASKRUN
#define IORING_SETUP_COOP_TASKRUN (1U << 8)
#endif
#define MER_SETUP_COOP_TASKRUN IORING_SETUP_COOP_TASKRUN

typedef struct mer_ring {
    int fd;
    unsigned sq_entries, cq_entries;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    void *sq_ptr, *cq_ptr;
    size_t sq_sz, cq_sz, sqes_sz;
    int inflight;          /* read by other threads for telemetry */
} mer_ring;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int sys_enter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags) {
    return (int)syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, NULL, 0);
}

void mer_ring_free(mer_ring *r) {
    if (!r) return;
    if (r->sqes && r->sqes != MAP_FAILED) munmap(r->sqes, r->sqes_sz);
    if (r->cq_ptr && r->cq_ptr != MAP_FAILED && r->cq_ptr != r->sq_ptr) munmap(r->cq_ptr, r->cq_sz);
    if (r->sq_ptr && r->sq_ptr != MAP_FAILED) munmap(r->sq_ptr, r->sq_sz);
    if (r->fd >= 0) close(r->fd);
    free(r);
}

mer_ring *mer_ring_new(unsigned entries, unsigned flags, int *err) {
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    p.flags = flags;
    int fd = (int)syscall(__NR_io_uring_setup, entries, &p);
    if (fd < 0) { *err = errno; return NULL; }
    mer_ring *r = calloc(1, sizeof *r);
    if (!r) { close(fd); *err = ENOMEM; return NULL; }
    r->fd = fd;
    r->sq_sz = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    r->cq_sz = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    int single = (p.features & IORING_FEAT_SINGLE_MMAP) != 0;
    if (single) {
        if (r->cq_sz > r->sq_sz) r->sq_sz = r->cq_sz;
        r->cq_sz = r->sq_sz;
    }
    r->sq_ptr = mmap(0, r->sq_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
    if (r->sq_ptr == MAP_FAILED) goto fail;
    if (single) {
        r->cq_ptr = r->sq_ptr;
    } else {
        r->cq_ptr = mmap(0, r->cq_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                         IORING_OFF_CQ_RING);
        if (r->cq_ptr == MAP_FAILED) goto fail;
    }
    r->sqes_sz = p.sq_entries * sizeof(struct io_uring_sqe);
    r->sqes = mmap(0, r->sqes_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
    if (r->sqes == MAP_FAILED) goto fail;
    char *sq = r->sq_ptr, *cq = r->cq_ptr;
    r->sq_head = (unsigned *)(sq + p.sq_off.head);
    r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)(sq + p.sq_off.array);
    r->cq_head = (unsigned *)(cq + p.cq_off.head);
    r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    r->sq_entries = p.sq_entries;
    r->cq_entries = p.cq_entries;
    return r;
fail:
    *err = errno;
    mer_ring_free(r);
    return NULL;
}

int mer_ring_inflight(mer_ring *r) { return __atomic_load_n(&r->inflight, __ATOMIC_RELAXED); }
unsigned mer_ring_entries(mer_ring *r) { return r->sq_entries; }

int mer_ring_register_buffers(mer_ring *r, char **bufs, uint64_t len, unsigned n) {
    struct iovec *iov = calloc(n, sizeof *iov);
    if (!iov) return -ENOMEM;
    for (unsigned i = 0; i < n; i++) { iov[i].iov_base = bufs[i]; iov[i].iov_len = len; }
    int ret = (int)syscall(__NR_io_uring_register, r->fd, IORING_REGISTER_BUFFERS, iov, n);
    free(iov);
    return ret < 0 ? -errno : 0;
}

/* Reap every completion that is ready. */
static unsigned reap(mer_ring *r, int32_t *res, uint64_t *lat_ns, char **dests, char **staging,
                     unsigned *slot_of, unsigned *free_slots, unsigned *nfree) {
    unsigned head = *r->cq_head, got = 0;
    unsigned tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
    uint64_t t = now_ns();
    while (head != tail) {
        struct io_uring_cqe *c = &r->cqes[head & *r->cq_mask];
        uint64_t i = c->user_data;
        res[i] = c->res;
        lat_ns[i] = t - lat_ns[i];
        if (staging) {
            if (c->res > 0) memcpy(dests[i], staging[slot_of[i]], (size_t)c->res);
            free_slots[(*nfree)++] = slot_of[i];
        }
        head++;
        got++;
    }
    __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
    __atomic_fetch_sub(&r->inflight, (int)got, __ATOMIC_RELAXED);
    return got;
}

/* Read n requests with at most qd in flight.  res[i] gets the byte count or -errno, lat_ns[i] the time
   from submission to completion, depth[i] the queue depth when request i went out.  With staging
   buffers (registered, n_staging of them) each read lands in a free one (READ_FIXED) and is copied
   to dests[i]; otherwise it lands in dests[i] directly.  Returns 0, or -errno when the ring itself
   failed (every request still in flight has completed by then: the caller may free its buffers). */
int mer_ring_read(mer_ring *r, unsigned n, const int32_t *fds, const uint64_t *offs, char **dests,
                  const uint32_t *lens, int32_t *res, uint64_t *lat_ns, uint32_t *depth, unsigned qd,
                  char **staging, unsigned n_staging) {
    unsigned next = 0, done = 0, pending = 0, nfree = 0;
    unsigned *slot_of = NULL, *free_slots = NULL;
    int fatal = 0;
    if (qd < 1) qd = 1;
    if (qd > r->sq_entries) qd = r->sq_entries;
    if (n_staging == 0) staging = NULL;
    if (staging) {
        if (qd > n_staging) qd = n_staging;
        slot_of = calloc(n ? n : 1, sizeof *slot_of);
        free_slots = calloc(n_staging, sizeof *free_slots);
        if (!slot_of || !free_slots) { free(slot_of); free(free_slots); return -ENOMEM; }
        for (unsigned s = 0; s < n_staging; s++) free_slots[nfree++] = s;
    }
    while (done < n) {
        int inflight = __atomic_load_n(&r->inflight, __ATOMIC_RELAXED);
        while (!fatal && next < n && (unsigned)inflight + pending < qd) {
            unsigned tail = *r->sq_tail;
            unsigned head = __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
            if (tail - head >= r->sq_entries) break;
            unsigned idx = tail & *r->sq_mask;
            struct io_uring_sqe *sqe = &r->sqes[idx];
            memset(sqe, 0, sizeof *sqe);
            sqe->fd = fds[next];
            sqe->off = offs[next];
            sqe->len = lens[next];
            sqe->user_data = next;
            if (staging) {
                unsigned s = free_slots[--nfree];
                slot_of[next] = s;
                sqe->opcode = IORING_OP_READ_FIXED;
                sqe->addr = (uint64_t)(uintptr_t)staging[s];
                sqe->buf_index = (uint16_t)s;
            } else {
                sqe->opcode = IORING_OP_READ;
                sqe->addr = (uint64_t)(uintptr_t)dests[next];
            }
            r->sq_array[idx] = idx;
            __atomic_store_n(r->sq_tail, tail + 1, __ATOMIC_RELEASE);
            lat_ns[next] = now_ns();
            depth[next] = (unsigned)inflight + pending + 1;
            pending++;
            next++;
        }
        inflight = __atomic_load_n(&r->inflight, __ATOMIC_RELAXED);
        unsigned wait = (inflight > 0 || pending > 0) ? 1 : 0;
        /* Counted in flight before the call that submits them and waits: counted after it, a lone
           request (one bundle) was never seen in flight by the telemetry polling from another thread. */
        __atomic_fetch_add(&r->inflight, (int)pending, __ATOMIC_RELAXED);
        int ret = sys_enter(r->fd, pending, wait, IORING_ENTER_GETEVENTS);
        if (ret < 0) __atomic_fetch_sub(&r->inflight, (int)pending, __ATOMIC_RELAXED);   /* none went out */
        if (ret < 0) {
            int e = errno;
            if (e == EINTR || e == EAGAIN || e == EBUSY) {
                reap(r, res, lat_ns, dests, staging, slot_of, free_slots, &nfree);
                continue;
            }
            /* The ring is broken: fail what never went out, wait for what did. */
            fatal = -e;
            for (unsigned i = next - pending; i < n; i++) { res[i] = -e; done++; }
            next = n;
            pending = 0;
            while (__atomic_load_n(&r->inflight, __ATOMIC_RELAXED) > 0) {
                if (sys_enter(r->fd, 0, 1, IORING_ENTER_GETEVENTS) < 0 && errno != EINTR) break;
                done += reap(r, res, lat_ns, dests, staging, slot_of, free_slots, &nfree);
            }
            break;
        }
        if ((unsigned)ret > pending) ret = (int)pending;
        __atomic_fetch_sub(&r->inflight, (int)pending - ret, __ATOMIC_RELAXED);   /* left in the queue */
        pending -= (unsigned)ret;
        done += reap(r, res, lat_ns, dests, staging, slot_of, free_slots, &nfree);
    }
    free(slot_of);
    free(free_slots);
    return fatal;
}
"""
