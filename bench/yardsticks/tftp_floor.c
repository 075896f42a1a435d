/* A yardstick, not a server: tftp_floor.py's loop in C, for bench/tftp.py --floor.
 *
 *     cc -O2 -o tftp_floor_c tftp_floor.c && ./tftp_floor_c PORT FILE [PROCESSES]
 *
 * The same loop as tftp_floor.py (one epoll, per ACK one recv and one sendmsg from memory; no timers, no
 * checks beyond a duplicate ACK, no windowsize), with no interpreter: what a single event loop costs when the
 * language costs nothing. Serves FILE's bytes to any read request, on 127.0.0.1:PORT only. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

struct transfer {
    int blksize;
    long blocks, sent; /* blocks in all; the last block sent (0: the OACK) */
};

static struct transfer *transfers[65536]; /* by socket fd */
static const char *data;
static long size;

static void send_block(int fd, long block, int blksize)
{
    long offset = (block - 1) * blksize;
    long length = size - offset < blksize ? size - offset : blksize;
    unsigned char header[4] = {0, 3, (block >> 8) & 0xff, block & 0xff};
    struct iovec iov[2] = {{header, 4}, {(char *)data + offset, length}};
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = 2};
    sendmsg(fd, &msg, 0);
}

static void start(int epoll, struct sockaddr_in *local, const char *request, ssize_t length,
                  struct sockaddr_in *peer)
{
    /* opcode, file name, mode, then option name/value pairs: only blksize matters here */
    int blksize = 512, asked = 0;
    const char *p = request + 2, *end = request + length;
    p += strlen(p) + 1;
    p += strlen(p) + 1;
    while (p < end) {
        const char *name = p;
        p += strlen(p) + 1;
        if (p >= end)
            break;
        if (!strcasecmp(name, "blksize")) {
            blksize = atoi(p);
            asked = 1;
        }
        p += strlen(p) + 1;
    }
    if (blksize < 8 || blksize > 65464)
        return;
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    struct sockaddr_in me = *local;
    me.sin_port = 0;
    if (fd < 0 || fd >= 65536 || bind(fd, (void *)&me, sizeof me) || connect(fd, (void *)peer, sizeof *peer)) {
        if (fd >= 0)
            close(fd);
        return;
    }
    struct transfer *t = malloc(sizeof *t);
    t->blksize = blksize;
    t->blocks = size / blksize + 1;
    t->sent = asked ? 0 : 1;
    transfers[fd] = t;
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
    epoll_ctl(epoll, EPOLL_CTL_ADD, fd, &ev);
    if (asked) {
        char oack[32];
        int n = snprintf(oack, sizeof oack, "%c%cblksize%c%d", 0, 6, 0, blksize) + 1;
        send(fd, oack, n, 0);
    } else {
        send_block(fd, 1, blksize);
    }
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s PORT FILE [PROCESSES]\n", argv[0]);
        return 2;
    }
    int processes = argc > 3 ? atoi(argv[3]) : 1;
    int file = open(argv[2], O_RDONLY);
    struct stat st;
    if (file < 0 || fstat(file, &st)) {
        perror(argv[2]);
        return 1;
    }
    size = st.st_size;
    data = mmap(NULL, size ? size : 1, PROT_READ, MAP_PRIVATE | MAP_POPULATE, file, 0);
    for (int i = 1; i < processes; i++)
        if (fork() == 0)
            break;
    int one = 1, listener = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    setsockopt(listener, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    struct sockaddr_in local = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    local.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(listener, (void *)&local, sizeof local)) {
        perror("bind");
        return 1;
    }
    int epoll = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = listener}, ready[64];
    epoll_ctl(epoll, EPOLL_CTL_ADD, listener, &ev);
    char buf[2048];
    for (;;) {
        int n = epoll_wait(epoll, ready, 64, -1);
        for (int i = 0; i < n; i++) {
            int fd = ready[i].data.fd;
            if (fd == listener) {
                struct sockaddr_in peer;
                socklen_t peer_length = sizeof peer;
                ssize_t got = recvfrom(listener, buf, sizeof buf - 1, 0, (void *)&peer, &peer_length);
                if (got >= 4 && buf[1] == 1) {
                    buf[got] = 0;
                    start(epoll, &local, buf, got, &peer);
                }
                continue;
            }
            struct transfer *t = transfers[fd];
            if (recv(fd, buf, sizeof buf, 0) < 4)
                continue;
            unsigned acked = ((unsigned char)buf[2] << 8) | (unsigned char)buf[3];
            if (acked != (t->sent & 0xffff))
                continue; /* a duplicate ACK */
            long block = ++t->sent;
            if (block > t->blocks) {
                epoll_ctl(epoll, EPOLL_CTL_DEL, fd, NULL);
                close(fd);
                free(t);
                transfers[fd] = NULL;
                continue;
            }
            send_block(fd, block, t->blksize);
        }
    }
}
