/* dwcp._net: see net.h. */
#define _GNU_SOURCE
#include "net.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
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

void dwcp_emu_set_rate(dwcp_emu_shaper *s, uint64_t rate_bps) { s->p.rate_bps = rate_bps; }

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
    const uint64_t *live_rate; /* in the shared report: nonzero = the owner's new rate */
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
        uint64_t live = __atomic_load_n(dir->live_rate, __ATOMIC_RELAXED);
        if (live && live != dir->shaper.p.rate_bps) dwcp_emu_set_rate(&dir->shaper, live);
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
    dirs[0].live_rate = &report->live_rate_ab_bps;
    dirs[1].live_rate = &report->live_rate_ba_bps;
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

/* ------------------------------------------------------------------------ */
/* Batched UDP I/O.                                                          */

#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif

static void meta_from_sockaddr(dwcp_udp_meta *m, const struct sockaddr_storage *ss) {
    memset(m->addr, 0, sizeof m->addr);
    m->flags = 0;
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        memcpy(m->addr, &a->sin_addr, 4);
        m->port = ntohs(a->sin_port);
        m->family = 4;
    } else if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        memcpy(m->addr, &a->sin6_addr, 16);
        m->port = ntohs(a->sin6_port);
        m->family = 6;
    } else {
        m->port = 0;
        m->family = 0;
    }
}

static socklen_t sockaddr_from_meta(struct sockaddr_storage *ss, const dwcp_udp_meta *m) {
    memset(ss, 0, sizeof *ss);
    if (m->family == 4) {
        struct sockaddr_in *a = (struct sockaddr_in *)ss;
        a->sin_family = AF_INET;
        a->sin_port = htons(m->port);
        memcpy(&a->sin_addr, m->addr, 4);
        return sizeof *a;
    }
    if (m->family == 6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons(m->port);
        memcpy(&a->sin6_addr, m->addr, 16);
        return sizeof *a;
    }
    return 0;
}

int dwcp_udp_recv_batch(int fd, uint8_t *buf, uint32_t stride, uint32_t max, dwcp_udp_meta *meta) {
    if (max > DWCP_UDP_MAX_BATCH) max = DWCP_UDP_MAX_BATCH;
    if (max == 0 || stride == 0) return 0;
    struct mmsghdr *msgs = calloc(max, sizeof *msgs);
    struct iovec *iov = calloc(max, sizeof *iov);
    struct sockaddr_storage *addrs = calloc(max, sizeof *addrs);
    int rc;
    if (!msgs || !iov || !addrs) {
        rc = -ENOMEM;
        goto out;
    }
    for (uint32_t i = 0; i < max; i++) {
        iov[i].iov_base = buf + (size_t)i * stride;
        iov[i].iov_len = stride;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_name = &addrs[i];
        msgs[i].msg_hdr.msg_namelen = sizeof addrs[i];
    }
    do {
        rc = recvmmsg(fd, msgs, max, MSG_DONTWAIT, NULL);
    } while (rc < 0 && errno == EINTR);
    if (rc < 0) {
        rc = (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -errno;
        goto out;
    }
    for (int i = 0; i < rc; i++) {
        meta_from_sockaddr(&meta[i], &addrs[i]);
        uint32_t len = msgs[i].msg_len;
        meta[i].len = len > stride ? stride : len;
    }
out:
    free(msgs);
    free(iov);
    free(addrs);
    return rc;
}

static int same_dest(const dwcp_udp_meta *a, const dwcp_udp_meta *b) {
    return a->family == b->family && a->port == b->port && memcmp(a->addr, b->addr, 16) == 0;
}

/* Length of the GSO run starting at meta[i]: same destination, equal sizes, last may be shorter. */
static uint32_t gso_run(const dwcp_udp_meta *meta, uint32_t i, uint32_t n) {
    uint32_t seg = meta[i].len, k = 1;
    size_t total = seg;
    while (i + k < n && k < DWCP_UDP_GSO_MAX_SEGMENTS && same_dest(&meta[i], &meta[i + k]) &&
           meta[i + k].len <= seg && total + meta[i + k].len <= 65000) {
        total += meta[i + k].len;
        k++;
        if (meta[i + k - 1].len < seg) break; /* a short segment ends the run */
    }
    return k;
}

int dwcp_udp_send_batch(int fd, const uint8_t *buf, const dwcp_udp_meta *meta, uint32_t n, int gso) {
    if (n == 0) return 0;
    if (n > DWCP_UDP_MAX_BATCH) n = DWCP_UDP_MAX_BATCH;
    struct mmsghdr *msgs = calloc(n, sizeof *msgs);
    struct iovec *iov = calloc(n, sizeof *iov);
    struct sockaddr_storage *addrs = calloc(n, sizeof *addrs);
    uint32_t *count = calloc(n, sizeof *count); /* datagrams carried by message j */
    char(*cmsgbuf)[CMSG_SPACE(sizeof(uint16_t))] = calloc(n, sizeof *cmsgbuf);
    size_t *offs = calloc((size_t)n + 1, sizeof *offs);
    int rc = 0;
    if (!msgs || !iov || !addrs || !count || !cmsgbuf || !offs) {
        rc = -ENOMEM;
        goto out;
    }
    for (uint32_t i = 0; i < n; i++) offs[i + 1] = offs[i] + meta[i].len;
    uint32_t done = 0;
    while (done < n) {
        /* Build messages for datagrams [done, n). */
        uint32_t nmsg = 0;
        for (uint32_t i = done; i < n;) {
            uint32_t k = gso ? gso_run(meta, i, n) : 1;
            struct msghdr *h = &msgs[nmsg].msg_hdr;
            memset(h, 0, sizeof *h);
            iov[nmsg].iov_base = (void *)(buf + offs[i]);
            iov[nmsg].iov_len = offs[i + k] - offs[i];
            h->msg_iov = &iov[nmsg];
            h->msg_iovlen = 1;
            socklen_t alen = sockaddr_from_meta(&addrs[nmsg], &meta[i]);
            if (alen) {
                h->msg_name = &addrs[nmsg];
                h->msg_namelen = alen;
            }
            if (k > 1) {
                h->msg_control = cmsgbuf[nmsg];
                h->msg_controllen = sizeof cmsgbuf[nmsg];
                struct cmsghdr *c = CMSG_FIRSTHDR(h);
                c->cmsg_level = SOL_UDP;
                c->cmsg_type = UDP_SEGMENT;
                c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
                uint16_t seg = (uint16_t)meta[i].len;
                memcpy(CMSG_DATA(c), &seg, sizeof seg);
            }
            count[nmsg] = k;
            nmsg++;
            i += k;
        }
        int sent;
        do {
            sent = sendmmsg(fd, msgs, nmsg, MSG_DONTWAIT);
        } while (sent < 0 && errno == EINTR);
        if (sent < 0) {
            int e = errno;
            if (gso && (e == EIO || e == EINVAL || e == EOPNOTSUPP || e == ENOPROTOOPT) &&
                count[0] > 1) {
                gso = 0; /* this socket or device cannot segment: plain sends */
                continue;
            }
            if (done == 0) rc = -e;
            break;
        }
        for (int j = 0; j < sent; j++) done += count[j];
        if ((uint32_t)sent < nmsg) break; /* socket buffer full */
    }
    if (rc == 0) rc = (int)done;
out:
    free(msgs);
    free(iov);
    free(addrs);
    free(count);
    free(cmsgbuf);
    free(offs);
    return rc;
}
