/* dwcp._net: see net.h. */
#define _GNU_SOURCE
#include "net.h"

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

int dwcp_net_abi(void) { return DWCP_NET_ABI; }

/* ------------------------------------------------------------------------ */
/* Loss + drop-tail queue model (sans-IO).                                   */

static uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

void dwcp_emu_shaper_init(dwcp_emu_shaper *s, const dwcp_emu_params *p) {
    memset(s, 0, sizeof *s);
    s->p = *p;
    s->rng = p->seed;
    double loss = p->loss;
    if (!(loss > 0.0)) {
        s->loss_threshold = 0;
    } else if (loss >= 1.0) {
        s->loss_threshold = UINT64_MAX;
    } else {
        /* 2^64 * loss; the largest double below 1.0 still maps below 2^64. */
        s->loss_threshold = (uint64_t)(loss * 18446744073709551616.0);
    }
    s->busy_until_ns = 0.0;
}

int dwcp_emu_admit(dwcp_emu_shaper *s, uint64_t now_ns, uint32_t len, uint64_t *deliver_ns,
                   uint64_t *backlog_bytes) {
    double now = (double)now_ns;
    double backlog = 0.0;
    if (s->p.rate_bps && s->busy_until_ns > now)
        backlog = (s->busy_until_ns - now) * (double)s->p.rate_bps / 8e9;
    *backlog_bytes = (uint64_t)(backlog + 0.5);
    /* Draw for every packet so the loss pattern depends only on the packet count. */
    if (s->loss_threshold && (s->loss_threshold == UINT64_MAX || splitmix64(&s->rng) < s->loss_threshold))
        return DWCP_EMU_LOST;
    double start = now;
    if (s->p.rate_bps) {
        if (backlog + (double)len > (double)s->p.queue_bytes) return DWCP_EMU_QUEUE_FULL;
        if (s->busy_until_ns > start) start = s->busy_until_ns;
        s->busy_until_ns = start + (double)len * 8e9 / (double)s->p.rate_bps;
        start = s->busy_until_ns;
    }
    *deliver_ns = (uint64_t)(start + 0.5) + s->p.delay_ns;
    return DWCP_EMU_PASS;
}

/* ------------------------------------------------------------------------ */
/* Delay line: a FIFO of packets with their due times (due times are         */
/* non-decreasing within a direction, so FIFO order is delivery order).      */

typedef struct {
    uint64_t due_ns;
    uint32_t off;
    uint32_t len;
} slot;

typedef struct {
    uint8_t *data;
    size_t cap;   /* bytes in data */
    slot *slots;
    size_t nslots;
    size_t head;  /* oldest slot */
    size_t count;
    size_t wpos;  /* next write offset in data */
} delay_line;

static int line_init(delay_line *d, const dwcp_emu_params *p) {
    const double max_bytes = 256.0 * 1024 * 1024;
    double bytes;
    if (p->rate_bps) {
        bytes = (double)p->queue_bytes + (double)p->rate_bps * (double)p->delay_ns / 8e9;
        bytes += 4.0 * DWCP_EMU_MAX_PACKET;
    } else {
        bytes = 64.0 * 1024 * 1024;
    }
    if (bytes > max_bytes) bytes = max_bytes;
    memset(d, 0, sizeof *d);
    d->cap = (size_t)bytes;
    d->nslots = d->cap / 48 + 1024; /* room for a line full of small (ACK-sized) packets */
    d->data = malloc(d->cap);
    d->slots = malloc(d->nslots * sizeof(slot));
    if (!d->data || !d->slots) {
        free(d->data);
        free(d->slots);
        return -ENOMEM;
    }
    return 0;
}

static void line_free(delay_line *d) {
    free(d->data);
    free(d->slots);
}

/* Room for len bytes at the tail, or NULL when full (data never wraps inside a packet). */
static uint8_t *line_reserve(delay_line *d, uint32_t len, uint32_t *off) {
    if (d->count == d->nslots || len == 0 || len > d->cap) return NULL;
    if (d->count == 0) {
        d->wpos = 0;
        *off = 0;
        return d->data;
    }
    size_t rpos = d->slots[d->head].off, w = d->wpos;
    if (w > rpos) { /* used bytes are [rpos, w) */
        if (w + len <= d->cap) *off = (uint32_t)w;
        else if (len <= rpos) *off = 0;
        else return NULL;
    } else { /* wrapped: used bytes are [rpos, end) and [0, w) */
        if (w + len <= rpos) *off = (uint32_t)w;
        else return NULL;
    }
    return d->data + *off;
}

static void line_push(delay_line *d, uint32_t off, uint32_t len, uint64_t due_ns) {
    slot *s = &d->slots[(d->head + d->count) % d->nslots];
    s->off = off;
    s->len = len;
    s->due_ns = due_ns;
    d->count++;
    d->wpos = (size_t)off + len;
}

/* ------------------------------------------------------------------------ */
/* The forwarding loop.                                                      */

static uint64_t clock_ns(clockid_t id) {
    struct timespec ts;
    clock_gettime(id, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

typedef struct {
    dwcp_emu_shaper shaper;
    delay_line line;
    dwcp_emu_stats *st;
    int in_fd, out_fd;
} direction;

/* Read up to 64 packets from in_fd into the delay line. Returns -errno on a fatal error. */
static int pump_in(direction *dir, uint64_t t0, uint8_t *scratch) {
    for (int i = 0; i < 64; i++) {
        /* Read straight into the line when it has room for a maximal packet, else into scratch. */
        uint32_t off = 0;
        uint8_t *dst = line_reserve(&dir->line, DWCP_EMU_MAX_PACKET, &off);
        uint8_t *buf = dst ? dst : scratch;
        ssize_t n = read(dir->in_fd, buf, DWCP_EMU_MAX_PACKET);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
            if (errno == EINTR) continue;
            return -errno;
        }
        if (n == 0) return 0;
        uint64_t now = clock_ns(CLOCK_MONOTONIC) - t0;
        dir->st->rx_packets++;
        dir->st->rx_bytes += (uint64_t)n;
        uint64_t due = 0, backlog = 0;
        int verdict = dwcp_emu_admit(&dir->shaper, now, (uint32_t)n, &due, &backlog);
        if (verdict == DWCP_EMU_LOST) {
            dir->st->lost++;
            continue;
        }
        if (verdict == DWCP_EMU_QUEUE_FULL) {
            dir->st->queue_drops++;
            continue;
        }
        uint64_t q = backlog + (uint64_t)n;
        if (q > dir->st->max_queue_bytes) dir->st->max_queue_bytes = q;
        if (!dst) {
            /* The line had no room for a maximal packet; maybe it has for this one. */
            dst = line_reserve(&dir->line, (uint32_t)n, &off);
            if (!dst) {
                dir->st->overflow_drops++;
                continue;
            }
            memcpy(dst, scratch, (size_t)n);
        }
        line_push(&dir->line, off, (uint32_t)n, due);
    }
    return 0;
}

/* Write every packet due by now to out_fd. */
static void pump_out(direction *dir, uint64_t now) {
    delay_line *d = &dir->line;
    while (d->count) {
        slot *s = &d->slots[d->head];
        if (s->due_ns > now) break;
        ssize_t n = write(dir->out_fd, d->data + s->off, s->len);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            dir->st->write_errors++;
        } else {
            uint64_t late = now - s->due_ns;
            dir->st->tx_packets++;
            dir->st->tx_bytes += s->len;
            dir->st->late_ns_sum += late;
            if (late > dir->st->late_ns_max) dir->st->late_ns_max = late;
        }
        d->head = (d->head + 1) % d->nslots;
        d->count--;
    }
}

int dwcp_emu_run(int fd_a, int fd_b, int stop_fd, const dwcp_emu_params *a_to_b,
                 const dwcp_emu_params *b_to_a, dwcp_emu_report *report) {
    direction dirs[2];
    memset(dirs, 0, sizeof dirs);
    memset(report, 0, sizeof *report);
    int rc = 0;
    uint8_t *scratch = malloc(DWCP_EMU_MAX_PACKET);
    if (!scratch) return -ENOMEM;
    if (line_init(&dirs[0].line, a_to_b) < 0) {
        free(scratch);
        return -ENOMEM;
    }
    if (line_init(&dirs[1].line, b_to_a) < 0) {
        line_free(&dirs[0].line);
        free(scratch);
        return -ENOMEM;
    }
    dwcp_emu_shaper_init(&dirs[0].shaper, a_to_b);
    dwcp_emu_shaper_init(&dirs[1].shaper, b_to_a);
    dirs[0].st = &report->ab;
    dirs[0].in_fd = fd_a;
    dirs[0].out_fd = fd_b;
    dirs[1].st = &report->ba;
    dirs[1].in_fd = fd_b;
    dirs[1].out_fd = fd_a;
    /* Wake up when a packet is due, not up to 50 us later (the default timer slack). */
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
    report->running = 1;

    uint64_t t0 = clock_ns(CLOCK_MONOTONIC);
    uint64_t cpu0 = clock_ns(CLOCK_THREAD_CPUTIME_ID);
    uint64_t next_cpu_sample = 0;
    struct pollfd pfd[3] = {
        {.fd = fd_a, .events = POLLIN},
        {.fd = fd_b, .events = POLLIN},
        {.fd = stop_fd, .events = POLLIN},
    };
    for (;;) {
        uint64_t now = clock_ns(CLOCK_MONOTONIC) - t0;
        pump_out(&dirs[0], now);
        pump_out(&dirs[1], now);
        report->wall_ns = now;
        if (now >= next_cpu_sample) {
            report->cpu_ns = clock_ns(CLOCK_THREAD_CPUTIME_ID) - cpu0;
            next_cpu_sample = now + 10000000ULL;
        }
        uint64_t wait = 100000000ULL; /* re-check the stop fd at least every 100 ms */
        for (int i = 0; i < 2; i++) {
            delay_line *d = &dirs[i].line;
            if (d->count) {
                uint64_t due = d->slots[d->head].due_ns;
                uint64_t w = due > now ? due - now : 0;
                if (w < wait) wait = w;
            }
        }
        struct timespec ts = {.tv_sec = (time_t)(wait / 1000000000ULL),
                              .tv_nsec = (long)(wait % 1000000000ULL)};
        int n = ppoll(pfd, 3, &ts, NULL);
        if (n < 0) {
            if (errno == EINTR) continue;
            rc = -errno;
            break;
        }
        report->wakeups++;
        if (n == 0) continue;
        if (pfd[2].revents) break;
        for (int i = 0; i < 2; i++) {
            short ev = pfd[i].revents;
            if (ev & (POLLERR | POLLNVAL)) {
                rc = -EIO;
                goto out;
            }
            if (ev & POLLIN) {
                int r = pump_in(&dirs[i], t0, scratch);
                if (r < 0) {
                    rc = r;
                    goto out;
                }
            }
        }
    }
out:
    report->wall_ns = clock_ns(CLOCK_MONOTONIC) - t0;
    report->cpu_ns = clock_ns(CLOCK_THREAD_CPUTIME_ID) - cpu0;
    report->running = 0;
    line_free(&dirs[0].line);
    line_free(&dirs[1].line);
    free(scratch);
    return rc;
}
