/* The benchmark's service: take the socket-activated listener from fd 3,
 * accept one connection, write one byte, exit.  Written in C so that its own
 * start-up (exec, dynamic linking) is a fraction of a millisecond; the
 * benchmark still measures it and subtracts it.
 *
 * With --bind HOST:PORT (proxy mode, and systemd-socket-proxyd) it binds its
 * own port instead and writes the byte to every connection until killed; with
 * --fork as well it forks once it listens and the parent exits, as a
 * Type=forking service tells systemd it is ready. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int serve_own_port(const char *hostport, int fork_when_ready) {
    char host[64];
    const char *colon = strrchr(hostport, ':');
    if (colon == NULL || (size_t)(colon - hostport) >= sizeof host)
        return 2;
    memcpy(host, hostport, (size_t)(colon - hostport));
    host[colon - hostport] = '\0';
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(colon + 1))};
    int one = 1, fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || inet_pton(AF_INET, host, &addr.sin_addr) != 1 ||
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
        bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 128) < 0)
        return 1;
    if (fork_when_ready && fork() != 0)
        _exit(0);
    for (;;) {
        int conn = accept(fd, NULL, NULL);
        if (conn < 0)
            continue;
        if (write(conn, "!", 1) != 1) {
            /* the client left: nothing to do */
        }
        close(conn);
    }
}

int main(int argc, char **argv) {
    if (argc >= 3 && strcmp(argv[1], "--bind") == 0)
        return serve_own_port(argv[2], argc >= 4 && strcmp(argv[3], "--fork") == 0);
    const char *fds = getenv("LISTEN_FDS");
    const char *pid = getenv("LISTEN_PID");
    /* The sd_listen_fds(3) contract: refuse to run without it, so a broken
     * handoff shows as a failure rather than as a fast number. */
    if (fds == NULL || strcmp(fds, "1") != 0 || pid == NULL || atol(pid) != (long)getpid())
        return 2;
    int conn;
    /* O_NONBLOCK lives on the shared open file description; cope with it. */
    while ((conn = accept(3, NULL, NULL)) < 0) {
        if (errno != EAGAIN && errno != EINTR)
            return 1;
        struct pollfd p = {.fd = 3, .events = POLLIN};
        poll(&p, 1, -1);
    }
    if (write(conn, "!", 1) != 1)
        return 1;
    close(conn);
    return 0;
}
