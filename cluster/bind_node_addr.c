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
 * Only Ray's processes are changed (is_ray_process): LD_PRELOAD is inherited by everything a node starts,
 * job processes included, and the others keep the binds they ask for.
 * A DEEPSPIKE_NODE_ADDR that is set but is not an IPv4 address fails closed: the binds the shim would move
 * fail with EADDRNOTAVAIL (reported once on stderr) instead of listening on every interface. Unset, the shim
 * is not configured for the process and changes nothing.
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
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

static int is_mapped(const struct in6_addr *a, in_addr_t v4) {
    static const unsigned char prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    return memcmp(a->s6_addr, prefix, 12) == 0 && memcmp(a->s6_addr + 12, &v4, 4) == 0;
}

/* Whether this is a Ray process, the only kind the shim is for: Ray's C++ daemons (raylet, gcs_server) or a
   process that has loaded Ray's core library (_raylet.so: `ray start`, the dashboard and its agents, core
   workers, drivers, actors). LD_PRELOAD reaches every process a node starts, a job's shell, tools and
   other servers included; in those the shim changes nothing, so their binds do what they ask (a client's
   bind to 0.0.0.0:0 keeps a normal source address, a fixed port in use fails). Once a process is Ray's
   it stays Ray's; until then /proc/self/maps is read at each bind (binds are rare). */
static int is_ray_process(void) {
    static int ray;
    if (ray) return 1;
    char exe[4096];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n > 0) {
        exe[n] = 0;
        const char *base = strrchr(exe, '/');
        base = base ? base + 1 : exe;
        if (strcmp(base, "raylet") == 0 || strcmp(base, "gcs_server") == 0) return ray = 1;
    }
    FILE *maps = fopen("/proc/self/maps", "re");
    if (!maps) return 0;
    char line[4096];
    while (!ray && fgets(line, sizeof line, maps))
        if (strstr(line, "/ray/_raylet.")) ray = 1;
    fclose(maps);
    return ray;
}

/* Whether the shim moves a bind to this address: the wildcard or 127.0.0.1, over IPv4 or IPv6. */
static int movable(const struct sockaddr *addr, socklen_t len) {
    in_addr_t loopback1 = htonl(INADDR_LOOPBACK);
    if (addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        in_addr_t a = ((const struct sockaddr_in *)addr)->sin_addr.s_addr;
        return a == htonl(INADDR_ANY) || a == loopback1;
    }
    if (addr->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        const struct in6_addr *a = &((const struct sockaddr_in6 *)addr)->sin6_addr;
        return IN6_IS_ADDR_UNSPECIFIED(a) || IN6_IS_ADDR_LOOPBACK(a) || is_mapped(a, loopback1);
    }
    return 0;
}

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static bind_fn real_bind;
    if (!real_bind) real_bind = (bind_fn)dlsym(RTLD_NEXT, "bind");
    const char *node = getenv("DEEPSPIKE_NODE_ADDR");
    struct in_addr ip;
    if (!node || !addr || !movable(addr, len) || !is_ray_process()) return real_bind(fd, addr, len);
    if (inet_pton(AF_INET, node, &ip) != 1) {
        /* Fail closed: a node address that does not parse must not leave a listener on every interface. */
        static int warned;
        if (!warned) {
            warned = 1;
            fprintf(stderr, "bind_node_addr: DEEPSPIKE_NODE_ADDR=\"%s\" is not an IPv4 address; refusing binds to "
                            "the wildcard address and 127.0.0.1 (EADDRNOTAVAIL)\n", node);
        }
        errno = EADDRNOTAVAIL;
        return -1;
    }
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
