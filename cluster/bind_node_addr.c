/* LD_PRELOAD shim for the local cluster's node processes (cluster/local.py builds and loads it).
 *
 * Ray 2.60's C++ gRPC servers (GCS, raylet node and object managers, every core worker) listen on the
 * wildcard address and have no option to choose another; so do the dashboard's and agents' metrics
 * servers. Its dashboard agent and client server also add a second listener on 127.0.0.1. On a shared
 * machine that makes every node reachable from the network, and nodes on different loopback addresses
 * clash on 127.0.0.1. This shim moves a TCP/UDP bind() to the wildcard address or to 127.0.0.1 onto the
 * node's own address, DEEPSPIKE_NODE_ADDR (an IPv4 address; IPv6 sockets get its IPv4-mapped form).
 * A 127.0.0.1 listener that duplicates one the process already has on the node's address gets an
 * unused port there instead of failing: nothing connects to it, and 127.0.0.1 stays free.
 *
 * One client does connect to 127.0.0.1: the GCS and every raylet reach their node's metrics agent at
 * 127.0.0.1:DEEPSPIKE_METRICS_AGENT_PORT (hard-coded in Ray), and would log "Failed to establish connection
 * to the metrics exporter agent" for ever. connect() to exactly that address goes to the node's instead.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

static int is_mapped(const struct in6_addr *a, in_addr_t v4) {
    static const unsigned char prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    return memcmp(a->s6_addr, prefix, 12) == 0 && memcmp(a->s6_addr + 12, &v4, 4) == 0;
}

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static bind_fn real_bind;
    if (!real_bind) real_bind = (bind_fn)dlsym(RTLD_NEXT, "bind");
    const char *node = getenv("DEEPSPIKE_NODE_ADDR");
    struct in_addr ip;
    if (!node || !addr || inet_pton(AF_INET, node, &ip) != 1) return real_bind(fd, addr, len);
    in_addr_t loopback1 = htonl(INADDR_LOOPBACK);

    if (addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        struct sockaddr_in a;
        memcpy(&a, addr, sizeof a);
        int was_loopback1 = a.sin_addr.s_addr == loopback1;
        if (a.sin_addr.s_addr != htonl(INADDR_ANY) && !was_loopback1) return real_bind(fd, addr, len);
        a.sin_addr = ip;
        int rc = real_bind(fd, (struct sockaddr *)&a, sizeof a);
        if (rc != 0 && errno == EADDRINUSE && was_loopback1 && a.sin_port != 0) {
            a.sin_port = 0;
            rc = real_bind(fd, (struct sockaddr *)&a, sizeof a);
        }
        return rc;
    }
    if (addr->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 a;
        memcpy(&a, addr, sizeof a);
        int was_loopback1 = is_mapped(&a.sin6_addr, loopback1) || IN6_IS_ADDR_LOOPBACK(&a.sin6_addr);
        if (!IN6_IS_ADDR_UNSPECIFIED(&a.sin6_addr) && !was_loopback1) return real_bind(fd, addr, len);
        /* An IPv6-only socket cannot take an IPv4 address; clear the option so it can. */
        int off = 0;
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof off);
        memset(&a.sin6_addr, 0, sizeof a.sin6_addr);
        a.sin6_addr.s6_addr[10] = a.sin6_addr.s6_addr[11] = 0xff;
        memcpy(a.sin6_addr.s6_addr + 12, &ip, 4);
        int rc = real_bind(fd, (struct sockaddr *)&a, sizeof a);
        if (rc != 0 && errno == EADDRINUSE && was_loopback1 && a.sin6_port != 0) {
            a.sin6_port = 0;
            rc = real_bind(fd, (struct sockaddr *)&a, sizeof a);
        }
        return rc;
    }
    return real_bind(fd, addr, len);
}

typedef int (*connect_fn)(int, const struct sockaddr *, socklen_t);

int connect(int fd, const struct sockaddr *addr, socklen_t len) {
    static connect_fn real_connect;
    if (!real_connect) real_connect = (connect_fn)dlsym(RTLD_NEXT, "connect");
    const char *node = getenv("DEEPSPIKE_NODE_ADDR"), *agent = getenv("DEEPSPIKE_METRICS_AGENT_PORT");
    struct in_addr ip;
    if (!node || !agent || !addr || inet_pton(AF_INET, node, &ip) != 1) return real_connect(fd, addr, len);
    in_port_t port = htons((in_port_t)atoi(agent));
    in_addr_t loopback1 = htonl(INADDR_LOOPBACK);
    if (addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        struct sockaddr_in a;
        memcpy(&a, addr, sizeof a);
        if (a.sin_addr.s_addr == loopback1 && a.sin_port == port) {
            a.sin_addr = ip;
            return real_connect(fd, (struct sockaddr *)&a, sizeof a);
        }
    } else if (addr->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 a;
        memcpy(&a, addr, sizeof a);
        if (is_mapped(&a.sin6_addr, loopback1) && a.sin6_port == port) {
            memcpy(a.sin6_addr.s6_addr + 12, &ip, 4);
            return real_connect(fd, (struct sockaddr *)&a, sizeof a);
        }
    }
    return real_connect(fd, addr, len);
}
