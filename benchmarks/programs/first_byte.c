/* The benchmark's service: take the socket-activated listener from fd 3,
 * accept one connection, write one byte, exit.  Written in C so that its own
 * start-up (exec, dynamic linking) is a fraction of a millisecond; the
 * benchmark still measures it and subtracts it. */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(void) {
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
