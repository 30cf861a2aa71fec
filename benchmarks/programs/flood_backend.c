/* The flood benchmark's service: a tiny HTTP/1.0 server that needs a fixed
 * time to start.  It sleeps --delay seconds (a service loading itself), then
 * either binds its own port (--bind HOST:PORT, for proxy mode) or takes the
 * socket-activated listener at fd 3 (--fd, for pass mode), writes the moment
 * it begins to serve (CLOCK_MONOTONIC, seconds) to --ready-file, and answers
 * every request with a fixed 200 and closes.
 *
 * Written in C, single-threaded on epoll, so that serving ten thousand
 * connections costs it a few tens of milliseconds and the benchmark measures
 * the activators rather than the service.  The same binary serves all the
 * compared set-ups.  --backlog sets its own listen() backlog in --bind mode
 * (in --fd mode the activator's backlog applies). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static const char RESPONSE[] =
    "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n"
    "Connection: close\r\n\r\nok\n";

/* Per-connection state, indexed by fd: how far into "\r\n\r\n" we are. */
static unsigned char matched[1 << 20];

static void fail(const char *what) {
    perror(what);
    exit(1);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int bind_listener(const char *hostport, int backlog) {
    char host[64];
    const char *colon = strrchr(hostport, ':');
    if (colon == NULL || (size_t)(colon - hostport) >= sizeof host)
        fail("--bind HOST:PORT");
    memcpy(host, hostport, (size_t)(colon - hostport));
    host[colon - hostport] = '\0';
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(colon + 1))};
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1)
        fail("--bind address");
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0)
        fail("socket");
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, backlog) < 0)
        fail("bind/listen");
    return fd;
}

/* Read what is there; answer once the request's blank line has arrived.
 * Returns 1 when the connection is finished (answered, or the peer left). */
static int serve(int fd) {
    char buf[4096];
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0)
            return errno == EAGAIN ? 0 : 1;
        if (n == 0)
            return 1;
        for (ssize_t i = 0; i < n; i++) {
            static const char END[] = "\r\n\r\n";
            matched[fd] = buf[i] == END[matched[fd]] ? matched[fd] + 1 : (buf[i] == '\r');
            if (matched[fd] == 4) {
                /* The answer fits in an empty socket buffer: one write. */
                if (write(fd, RESPONSE, sizeof RESPONSE - 1) < 0) {
                    /* the client is gone: nothing to do */
                }
                return 1;
            }
        }
    }
}

int main(int argc, char **argv) {
    const char *bind_to = NULL, *ready_file = NULL;
    double delay = 0;
    int use_fd = 0, backlog = 4096;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--fd") == 0)
            use_fd = 1;
        else if (strcmp(argv[i], "--bind") == 0 && i + 1 < argc)
            bind_to = argv[++i];
        else if (strcmp(argv[i], "--delay") == 0 && i + 1 < argc)
            delay = atof(argv[++i]);
        else if (strcmp(argv[i], "--ready-file") == 0 && i + 1 < argc)
            ready_file = argv[++i];
        else if (strcmp(argv[i], "--backlog") == 0 && i + 1 < argc)
            backlog = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: %s (--fd | --bind HOST:PORT) [--delay S] "
                            "[--ready-file PATH] [--backlog N]\n", argv[0]);
            return 2;
        }
    }
    if (use_fd == (bind_to != NULL))
        fail("exactly one of --fd and --bind");
    if (use_fd) {
        const char *fds = getenv("LISTEN_FDS"), *pid = getenv("LISTEN_PID");
        if (fds == NULL || strcmp(fds, "1") != 0 || pid == NULL || atol(pid) != (long)getpid())
            return 2;
    }
    struct timespec pause = {.tv_sec = (time_t)delay,
                             .tv_nsec = (long)((delay - (double)(time_t)delay) * 1e9)};
    nanosleep(&pause, NULL);
    int listener = use_fd ? 3 : bind_listener(bind_to, backlog);
    if (use_fd && fcntl(3, F_SETFL, fcntl(3, F_GETFL) | O_NONBLOCK) < 0)
        fail("fcntl");
    double ready = now();
    if (ready_file != NULL) {
        FILE *f = fopen(ready_file, "w");
        if (f == NULL)
            fail("--ready-file");
        fprintf(f, "%.6f\n", ready);
        fclose(f);
    }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = listener};
    if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, listener, &ev) < 0)
        fail("epoll");
    struct epoll_event events[256];
    for (;;) {
        int n = epoll_wait(ep, events, 256, -1);
        if (n < 0 && errno != EINTR)
            fail("epoll_wait");
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd == listener) {
                int conn;
                while ((conn = accept4(listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
                    if ((size_t)conn >= sizeof matched) {
                        close(conn);
                        continue;
                    }
                    matched[conn] = 0;
                    if (serve(conn)) {
                        close(conn);
                        continue;
                    }
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = conn};
                    if (epoll_ctl(ep, EPOLL_CTL_ADD, conn, &cev) < 0)
                        close(conn);
                }
                if (errno == EMFILE || errno == ENFILE)
                    fail("accept");
            } else if (serve(fd)) {
                close(fd);  /* also removes it from the epoll set */
            }
        }
    }
}
