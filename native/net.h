/* dwcp._net: network hot paths (the link emulator's forwarding loop, batched UDP I/O).
 *
 * The link emulator forwards IP packets between two TUN devices and applies per
 * direction, in this order: random loss (seeded, reproducible), a drop-tail
 * bottleneck queue drained at a fixed rate, then a fixed propagation delay.
 * The per-packet decision lives in dwcp_emu_admit() so it can be tested without
 * any device (sans-IO); dwcp_emu_run() is the poll loop around it. This header
 * is the cffi cdef.
 */
#include <stddef.h>
#include <stdint.h>

enum {
    DWCP_NET_ABI = 3,
    DWCP_EMU_PASS = 0,        /* admitted: deliver at *deliver_ns */
    DWCP_EMU_LOST = 1,        /* dropped by random loss */
    DWCP_EMU_QUEUE_FULL = 2,  /* dropped at the tail of a full bottleneck queue */
    DWCP_EMU_MAX_PACKET = 65535
};

/* ABI version of this module (DWCP_NET_ABI); bump when a signature changes. */
int dwcp_net_abi(void);

/* One direction of the emulated link. */
typedef struct {
    uint64_t rate_bps;     /* bottleneck rate in bits/s of IP packets; 0 = unlimited */
    uint64_t delay_ns;     /* one-way propagation delay added after the bottleneck */
    uint64_t queue_bytes;  /* drop-tail limit of the bottleneck queue (bytes waiting or in service) */
    double loss;           /* probability in [0, 1] that a packet is dropped before the queue */
    uint64_t seed;         /* seed of this direction's random loss */
} dwcp_emu_params;

/* State of one direction's loss + queue model. */
typedef struct {
    dwcp_emu_params p;
    uint64_t rng;            /* splitmix64 state */
    uint64_t loss_threshold; /* a packet is lost when the next 64-bit draw is below this */
    double busy_until_ns;    /* when the bottleneck finishes sending everything admitted */
} dwcp_emu_shaper;

/* Counters of one direction; written by the loop while it runs. */
typedef struct {
    uint64_t rx_packets;      /* read from the ingress TUN */
    uint64_t rx_bytes;
    uint64_t tx_packets;      /* written to the egress TUN */
    uint64_t tx_bytes;
    uint64_t lost;            /* random loss */
    uint64_t queue_drops;     /* bottleneck queue full (drop-tail) */
    uint64_t overflow_drops;  /* delay line full: the emulator itself is the limit */
    uint64_t write_errors;    /* the egress TUN refused the packet */
    uint64_t max_queue_bytes; /* largest bottleneck backlog seen, bytes */
    uint64_t late_ns_sum;     /* sum over delivered packets of (write time - due time) */
    uint64_t late_ns_max;
} dwcp_emu_stats;

/* Everything dwcp_emu_run() reports; may live in memory shared with another process. */
typedef struct {
    dwcp_emu_stats ab;   /* a -> b */
    dwcp_emu_stats ba;   /* b -> a */
    uint64_t cpu_ns;     /* CPU time used by the forwarding thread so far */
    uint64_t wall_ns;    /* wall time since the loop started */
    uint64_t wakeups;    /* poll returns */
    int64_t running;     /* 1 while the loop runs, 0 once it has returned */
    /* Written by the owner while the loop runs (trace-driven links): when nonzero, the
     * bottleneck rate of a -> b / b -> a from the next arriving packet on. */
    uint64_t live_rate_ab_bps;
    uint64_t live_rate_ba_bps;
} dwcp_emu_report;

/* Reset a shaper to an empty queue and the start of its seed's loss sequence. */
void dwcp_emu_shaper_init(dwcp_emu_shaper *s, const dwcp_emu_params *p);

/* Change a shaper's bottleneck rate from now on (packets already queued keep their times). */
void dwcp_emu_set_rate(dwcp_emu_shaper *s, uint64_t rate_bps);

/* Decide the fate of one packet of len bytes arriving at now_ns (non-decreasing
 * across calls). Returns DWCP_EMU_PASS and sets *deliver_ns, or a drop reason.
 * *backlog_bytes receives the queue backlog seen on arrival (before this packet). */
int dwcp_emu_admit(dwcp_emu_shaper *s, uint64_t now_ns, uint32_t len, uint64_t *deliver_ns,
                   uint64_t *backlog_bytes);

/* Forward packets between TUN fds fd_a and fd_b (both non-blocking, no packet
 * info header) until stop_fd becomes readable or hangs up (close its write end).
 * Stats go to *report while running. Returns 0 on a requested stop, -errno on
 * a fatal error (a TUN fd failed, out of memory). */
int dwcp_emu_run(int fd_a, int fd_b, int stop_fd, const dwcp_emu_params *a_to_b,
                 const dwcp_emu_params *b_to_a, dwcp_emu_report *report);

/* ---- Batched UDP I/O (recvmmsg / sendmmsg, UDP GSO) --------------------------
 * One call moves many datagrams, so Python pays one call per batch, not one per
 * datagram. Addresses are plain fields so no sockaddr crosses the cffi boundary. */

typedef struct {
    uint8_t addr[16];  /* IPv4 address in addr[0..3], or an IPv6 address */
    uint16_t port;     /* host byte order */
    uint8_t family;    /* 4 or 6 */
    uint8_t flags;     /* reserved, 0 */
    uint32_t len;      /* datagram length in bytes */
} dwcp_udp_meta;

enum {
    DWCP_UDP_MAX_BATCH = 1024,
    DWCP_UDP_GSO_MAX_SEGMENTS = 64
};

/* Read up to max (<= DWCP_UDP_MAX_BATCH) datagrams from the non-blocking UDP
 * socket fd: datagram i goes to buf + i * stride (longer ones are truncated to
 * stride, len is then the truncated length), its sender to meta[i]. Returns the
 * number read (0 when none is waiting) or -errno. */
int dwcp_udp_recv_batch(int fd, uint8_t *buf, uint32_t stride, uint32_t max, dwcp_udp_meta *meta);

/* Send n datagrams stored back to back in buf (datagram i has length meta[i].len
 * and destination meta[i]; for a connected socket give family 0). With gso set,
 * runs of datagrams to the same destination with equal lengths (the last of a
 * run may be shorter) go out as one UDP_SEGMENT send, falling back to plain
 * sends when the kernel refuses GSO. Returns the number of datagrams the kernel
 * accepted (fewer than n when its buffer is full: resend the rest later) or
 * -errno when it accepted none. */
int dwcp_udp_send_batch(int fd, const uint8_t *buf, const dwcp_udp_meta *meta, uint32_t n, int gso);
