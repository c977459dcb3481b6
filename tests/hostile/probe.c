/* A hostile build step: run as a Dockerfile RUN step, it tries to reach what a build must never
 * reach, and prints one line per attack:
 *
 *     FARM-PROBE <attack> blocked <detail>
 *     FARM-PROBE <attack> SUCCEEDED <detail>
 *
 * Attacks, always all six, in this order:
 *   host-procs         /proc shows processes other than this step's own, or one whose environ or
 *                      cmdline holds a secret (-s), or a pid 1 that is not this step's shell
 *   loopback           a TCP connection to 127.0.0.1:PORT (-p) is accepted
 *   proc-root          a canary (-f) or host path (-r) opens through /proc/PID/root of any process
 *   chroot-escape      the classic escape (chroot into a subfolder, chdir("..") many times,
 *                      chroot(".")) changes the root, or a canary (-f) opens afterwards
 *   read-files         a host path (-r, a file or a folder) opens (after the escape attempt)
 *   write-agent-cache  a file can be created in, or one opened for writing in, a host folder (-w),
 *                      directly, after the escape attempt, or through /proc/PID/root
 *
 * Options (each may repeat, except -n and -g):
 *   -n NONCE    a label: lets the test find this process in the host's process table
 *   -s HEX      a secret, hex-encoded so that no command line holds it in the clear
 *   -f PATTERN  a canary file (absolute path; glob(3) patterns allowed)
 *   -r PATH     a host path to read (file or folder; glob(3) patterns allowed)
 *   -w DIR      a host folder to write in; a new file is named farm-probe-write-<pid>
 *   -p PORT     a TCP port on 127.0.0.1
 *   -g SECONDS  gate: wait (at most SECONDS) for SIGUSR1 before attacking; after printing, set the
 *               process name to "probe-done" and wait (at most SECONDS) for SIGUSR2 before
 *               exiting. Prints "FARM-PROBE-GATE opened|timed-out" first.
 *
 * Every attack is time-bounded; the probe exits 0 whatever it found, so the build goes on and its
 * log carries the verdicts. Plain C99 plus POSIX/Linux calls, linked statically.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define MAX_ITEMS 32
#define MAX_PIDS 8192
#define DETAIL_MAX 1500
#define SCAN_SECONDS 20

struct list {
    const char *item[MAX_ITEMS];
    int count;
};

struct secret {
    char *bytes;
    size_t size;
};

struct result {
    const char *name;
    int succeeded;
    char detail[DETAIL_MAX];
};

enum { HOST_PROCS, LOOPBACK, PROC_ROOT, CHROOT_ESCAPE, READ_FILES, WRITE_CACHE, ATTACKS };

static struct result results[ATTACKS] = {
    {"host-procs", 0, ""},     {"loopback", 0, ""},   {"proc-root", 0, ""},
    {"chroot-escape", 0, ""},  {"read-files", 0, ""}, {"write-agent-cache", 0, ""},
};

static struct secret secrets[MAX_ITEMS];
static int secret_count;
static struct list files, reads, writes, ports;
static int pids[MAX_PIDS];
static int pid_count;
static int ancestors[64];
static int ancestor_count;
static int wrote[MAX_ITEMS]; /* which -w folders were written to already */
static struct timespec started;

static void note(struct result *r, const char *format, ...) {
    size_t used = strlen(r->detail);
    va_list args;
    if (used + 1 >= sizeof r->detail)
        return;
    if (used > 0) {
        r->detail[used++] = ' ';
        r->detail[used] = '\0';
    }
    va_start(args, format);
    vsnprintf(r->detail + used, sizeof r->detail - used, format, args);
    va_end(args);
}

static double elapsed(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)(now.tv_sec - started.tv_sec) + (double)(now.tv_nsec - started.tv_nsec) / 1e9;
}

static const char *errname(int error) {
    switch (error) {
    case ENOENT: return "ENOENT";
    case EACCES: return "EACCES";
    case EPERM: return "EPERM";
    case EROFS: return "EROFS";
    case ENOTDIR: return "ENOTDIR";
    case ELOOP: return "ELOOP";
    case ECONNREFUSED: return "ECONNREFUSED";
    case ENETUNREACH: return "ENETUNREACH";
    case EHOSTUNREACH: return "EHOSTUNREACH";
    case ETIMEDOUT: return "ETIMEDOUT";
    case EADDRNOTAVAIL: return "EADDRNOTAVAIL";
    case ESRCH: return "ESRCH";
    case EEXIST: return "EEXIST";
    case ENOSPC: return "ENOSPC";
    default: return "errno";
    }
}

static int hexval(char c) {
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

static int add_secret(const char *hex) {
    size_t length = strlen(hex), i;
    struct secret *s;
    if (length == 0 || length % 2 || secret_count >= MAX_ITEMS)
        return -1;
    s = &secrets[secret_count];
    s->size = length / 2;
    s->bytes = malloc(s->size);
    if (s->bytes == NULL)
        return -1;
    for (i = 0; i < s->size; i++) {
        int high = hexval(hex[2 * i]), low = hexval(hex[2 * i + 1]);
        if (high < 0 || low < 0)
            return -1;
        s->bytes[i] = (char)(high * 16 + low);
    }
    secret_count++;
    return 0;
}

static int holds_secret(const char *data, size_t size) {
    int i;
    for (i = 0; i < secret_count; i++)
        if (secrets[i].size <= size && memmem(data, size, secrets[i].bytes, secrets[i].size) != NULL)
            return 1;
    return 0;
}

/* Read at most `limit` bytes of a file; returns the size read, or -1 with errno set. */
static ssize_t read_file(const char *path, char *buffer, size_t limit) {
    size_t total = 0;
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    while (total < limit) {
        ssize_t got = read(fd, buffer + total, limit - total);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            break;
        total += (size_t)got;
    }
    close(fd);
    return (ssize_t)total;
}

static int stat_ppid(int pid) {
    char path[64], buffer[1024], *close_paren;
    ssize_t size;
    int ppid = 0;
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    size = read_file(path, buffer, sizeof buffer - 1);
    if (size <= 0)
        return 0;
    buffer[size] = '\0';
    close_paren = strrchr(buffer, ')');
    if (close_paren == NULL || sscanf(close_paren + 1, " %*c %d", &ppid) != 1)
        return 0;
    return ppid;
}

static int is_ancestor(int pid) {
    int i;
    for (i = 0; i < ancestor_count; i++)
        if (ancestors[i] == pid)
            return 1;
    return 0;
}

/* ---- host-procs -------------------------------------------------------------------------- */

static void attack_host_procs(void) {
    static char buffer[1 << 20];
    struct result *r = &results[HOST_PROCS];
    int self = (int)getpid(), foreign = 0, hits = 0, shown = 0, pid1_ours, i;
    DIR *proc;
    struct dirent *entry;
    ssize_t size;
    char path[64], pid1[96] = "?";

    for (i = (int)getppid(); i > 0 && ancestor_count < 64; i = stat_ppid(i))
        ancestors[ancestor_count++] = i;
    proc = opendir("/proc");
    if (proc == NULL) {
        note(r, "opendir(/proc): %s", errname(errno));
        return;
    }
    while ((entry = readdir(proc)) != NULL && pid_count < MAX_PIDS) {
        int pid = atoi(entry->d_name);
        if (pid > 0)
            pids[pid_count++] = pid;
    }
    closedir(proc);
    for (i = 0; i < pid_count && elapsed() < SCAN_SECONDS; i++) {
        int pid = pids[i], found = 0;
        if (pid == self)
            continue;
        if (!is_ancestor(pid))
            foreign++;
        snprintf(path, sizeof path, "/proc/%d/environ", pid);
        size = read_file(path, buffer, sizeof buffer);
        if (size > 0 && holds_secret(buffer, (size_t)size))
            found = 1;
        snprintf(path, sizeof path, "/proc/%d/cmdline", pid);
        size = read_file(path, buffer, sizeof buffer);
        if (size > 0 && holds_secret(buffer, (size_t)size))
            found = 1;
        if (found) {
            hits++;
            if (shown++ < 4) {
                char comm[32] = "?";
                snprintf(path, sizeof path, "/proc/%d/comm", pid);
                size = read_file(path, comm, sizeof comm - 1);
                comm[size > 0 ? size : 0] = '\0';
                comm[strcspn(comm, "\n")] = '\0';
                note(r, "secret-in-pid=%d(%s)", pid, comm);
            }
        }
    }
    size = read_file("/proc/1/cmdline", buffer, sizeof pid1 - 1);
    if (size > 0) {
        ssize_t k;
        for (k = 0; k < size; k++)
            buffer[k] = (buffer[k] == '\0' || buffer[k] == '\n') ? ' ' : buffer[k];
        memcpy(pid1, buffer, (size_t)size);
        pid1[size] = '\0';
    }
    /* In a RUN step's own PID namespace, pid 1 is this step's shell (or the probe itself). */
    pid1_ours = self == 1 || getppid() == 1;
    note(r, "pids-visible=%d foreign=%d secret-hits=%d pid1-ours=%s pid1=[%s]", pid_count, foreign, hits,
         pid1_ours ? "yes" : "no", pid1);
    r->succeeded = hits > 0 || foreign > 0 || !pid1_ours;
}

/* ---- loopback ---------------------------------------------------------------------------- */

static void attack_loopback(void) {
    struct result *r = &results[LOOPBACK];
    int i;
    for (i = 0; i < ports.count; i++) {
        struct sockaddr_in address;
        struct pollfd waiting;
        int fd, error = 0;
        socklen_t length = sizeof error;
        memset(&address, 0, sizeof address);
        address.sin_family = AF_INET;
        address.sin_port = htons((unsigned short)atoi(ports.item[i]));
        address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            note(r, "%s:socket-%s", ports.item[i], errname(errno));
            continue;
        }
        if (connect(fd, (struct sockaddr *)&address, sizeof address) == 0) {
            error = 0;
        } else if (errno != EINPROGRESS) {
            error = errno;
        } else {
            waiting.fd = fd;
            waiting.events = POLLOUT;
            waiting.revents = 0;
            if (poll(&waiting, 1, 2000) <= 0)
                error = ETIMEDOUT;
            else if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &length) != 0)
                error = errno;
        }
        close(fd);
        if (error == 0) {
            r->succeeded = 1;
            note(r, "127.0.0.1:%s:connected", ports.item[i]);
        } else {
            note(r, "127.0.0.1:%s:%s", ports.item[i], errname(error));
        }
    }
    if (ports.count == 0)
        note(r, "no-ports-given");
}

/* ---- file helpers ------------------------------------------------------------------------ */

/* Can `path` (a file or a folder) be read? Returns 1 and notes it if so. */
static int try_read(struct result *r, const char *path, int quiet_failure) {
    static char buffer[1 << 16];
    struct stat info;
    if (stat(path, &info) != 0) {
        if (!quiet_failure)
            note(r, "%s:%s", path, errname(errno));
        return 0;
    }
    if (S_ISDIR(info.st_mode)) {
        DIR *folder = opendir(path);
        int entries = 0;
        if (folder == NULL) {
            if (!quiet_failure)
                note(r, "%s:opendir-%s", path, errname(errno));
            return 0;
        }
        while (readdir(folder) != NULL)
            entries++;
        closedir(folder);
        note(r, "%s:listed-%d-entries", path, entries - 2);
        return 1;
    } else {
        ssize_t size = read_file(path, buffer, sizeof buffer);
        if (size < 0) {
            if (!quiet_failure)
                note(r, "%s:%s", path, errname(errno));
            return 0;
        }
        note(r, "%s:read-%ld-bytes%s", path, (long)size,
             holds_secret(buffer, (size_t)size) ? "-holding-a-secret" : "");
        return 1;
    }
}

/* try_read on every match of a glob pattern (or the path itself when nothing matches). */
static int try_read_pattern(struct result *r, const char *pattern, int quiet_failure) {
    glob_t matches;
    size_t i;
    int any = 0;
    if (glob(pattern, GLOB_NOSORT, NULL, &matches) != 0)
        return try_read(r, pattern, quiet_failure);
    for (i = 0; i < matches.gl_pathc; i++)
        any |= try_read(r, matches.gl_pathv[i], quiet_failure);
    globfree(&matches);
    return any;
}

/* Create a file in `folder`, or open one of its files for writing (writing nothing). */
static int try_write(struct result *r, const char *folder, const char *via, int quiet_failure) {
    char path[4096];
    int fd, create_error;
    DIR *listing;
    struct dirent *entry;
    snprintf(path, sizeof path, "%s/farm-probe-write-%ld", folder, (long)getpid());
    fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd >= 0 || errno == EEXIST) {
        if (fd >= 0) {
            if (write(fd, "farm-probe\n", 11) < 0) { /* the file exists either way */
            }
            close(fd);
        }
        note(r, "created-%s%s", path, via);
        return 1;
    }
    create_error = errno;
    listing = opendir(folder);
    if (listing != NULL) {
        while ((entry = readdir(listing)) != NULL) {
            if (entry->d_name[0] == '.')
                continue;
            snprintf(path, sizeof path, "%s/%s", folder, entry->d_name);
            /* No O_TRUNC, nothing written: the cached agent stays intact. */
            fd = open(path, O_WRONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
            if (fd >= 0) {
                close(fd);
                closedir(listing);
                note(r, "opened-for-writing-%s%s", path, via);
                return 1;
            }
        }
        closedir(listing);
    }
    if (!quiet_failure)
        note(r, "%s:%s", folder, errname(create_error));
    return 0;
}

/* ---- proc-root --------------------------------------------------------------------------- */

static void attack_proc_root(void) {
    struct result *r = &results[PROC_ROOT];
    struct result *w = &results[WRITE_CACHE];
    int self = (int)getpid(), i, j, roots = 0;
    char path[4096], via[64];
    for (i = 0; i < pid_count && elapsed() < SCAN_SECONDS; i++) {
        struct stat info;
        if (pids[i] == self)
            continue;
        snprintf(path, sizeof path, "/proc/%d/root/", pids[i]);
        if (stat(path, &info) != 0)
            continue;
        roots++;
        for (j = 0; j < files.count; j++) {
            snprintf(path, sizeof path, "/proc/%d/root%s", pids[i], files.item[j]);
            r->succeeded |= try_read_pattern(r, path, 1);
        }
        for (j = 0; j < reads.count; j++) {
            snprintf(path, sizeof path, "/proc/%d/root%s", pids[i], reads.item[j]);
            r->succeeded |= try_read_pattern(r, path, 1);
        }
        for (j = 0; j < writes.count; j++) {
            if (wrote[j])
                continue;
            snprintf(path, sizeof path, "/proc/%d/root%s", pids[i], writes.item[j]);
            snprintf(via, sizeof via, "(via-/proc/%d/root)", pids[i]);
            wrote[j] = try_write(w, path, via, 1);
        }
    }
    note(r, "roots-tried=%d", roots);
}

/* ---- chroot-escape ----------------------------------------------------------------------- */

static void attack_chroot_escape(void) {
    static const char *jails[] = {"/.farm-probe-jail", "/tmp/.farm-probe-jail", "./.farm-probe-jail"};
    struct result *r = &results[CHROOT_ESCAPE];
    struct stat before, after;
    const char *jail = NULL;
    size_t k;
    int i;
    if (stat("/", &before) != 0) {
        note(r, "stat(/):%s", errname(errno));
        return;
    }
    if (chdir("/") != 0) {
        note(r, "chdir(/):%s", errname(errno));
    }
    for (k = 0; k < sizeof jails / sizeof jails[0]; k++) {
        if (mkdir(jails[k], 0700) == 0 || errno == EEXIST) {
            jail = jails[k];
            break;
        }
    }
    if (jail == NULL) {
        note(r, "mkdir-jail:%s", errname(errno));
    } else if (chroot(jail) != 0) {
        note(r, "chroot(jail):%s", errname(errno));
    } else {
        /* The working folder is outside the new root: climb as far as the kernel lets us. */
        for (i = 0; i < 256; i++)
            if (chdir("..") != 0)
                break;
        if (chroot(".") != 0)
            note(r, "chroot(.):%s", errname(errno));
    }
    if (stat("/", &after) != 0) {
        note(r, "stat(/)-after:%s", errname(errno));
        return;
    }
    if (after.st_dev != before.st_dev || after.st_ino != before.st_ino) {
        r->succeeded = 1;
        note(r, "root-changed");
    } else {
        note(r, "root-unchanged");
    }
    for (i = 0; i < files.count; i++)
        r->succeeded |= try_read_pattern(r, files.item[i], 0);
}

/* ---- read-files, write-agent-cache (from whatever root the escape attempt left) ----------- */

static void attack_read_files(void) {
    struct result *r = &results[READ_FILES];
    int i;
    for (i = 0; i < reads.count; i++)
        r->succeeded |= try_read_pattern(r, reads.item[i], 0);
    if (reads.count == 0)
        note(r, "no-paths-given");
}

static void attack_write_cache(void) {
    struct result *w = &results[WRITE_CACHE];
    int i;
    for (i = 0; i < writes.count; i++)
        if (!wrote[i])
            wrote[i] = try_write(w, writes.item[i], "", 0);
    for (i = 0; i < writes.count; i++)
        w->succeeded |= wrote[i];
    if (writes.count == 0)
        note(w, "no-folders-given");
}

/* ---- the gate ---------------------------------------------------------------------------- */

static void on_signal(int signum) {
    (void)signum; /* a handler at all: pid 1 of a PID namespace ignores signals left at SIG_DFL */
}

static int await_signal(int signum, int seconds) {
    sigset_t set;
    struct timespec deadline, now, left;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += seconds;
    sigemptyset(&set);
    sigaddset(&set, signum);
    for (;;) {
        clock_gettime(CLOCK_MONOTONIC, &now);
        left.tv_sec = deadline.tv_sec - now.tv_sec;
        left.tv_nsec = deadline.tv_nsec - now.tv_nsec;
        if (left.tv_nsec < 0) {
            left.tv_sec--;
            left.tv_nsec += 1000000000L;
        }
        if (left.tv_sec < 0)
            return 0;
        if (sigtimedwait(&set, NULL, &left) == signum)
            return 1;
        if (errno != EINTR)
            return 0;
    }
}

static void add(struct list *list, const char *item) {
    if (list->count < MAX_ITEMS)
        list->item[list->count++] = item;
}

int main(int argc, char **argv) {
    int option, gate = 0, i;
    struct sigaction action;
    sigset_t blocked;

    setvbuf(stdout, NULL, _IOLBF, 0);
    while ((option = getopt(argc, argv, "n:s:f:r:w:p:g:")) != -1) {
        switch (option) {
        case 'n': break; /* only a label in the command line */
        case 's':
            if (add_secret(optarg) != 0)
                printf("FARM-PROBE-ARGS bad secret (not hex)\n");
            break;
        case 'f': add(&files, optarg); break;
        case 'r': add(&reads, optarg); break;
        case 'w': add(&writes, optarg); break;
        case 'p': add(&ports, optarg); break;
        case 'g': gate = atoi(optarg); break;
        default: printf("FARM-PROBE-ARGS unknown option\n"); break;
        }
    }
    alarm((unsigned)(2 * gate + 120)); /* a last bound: nothing here may hang a build */

    if (gate > 0) {
        memset(&action, 0, sizeof action);
        action.sa_handler = on_signal;
        sigaction(SIGUSR1, &action, NULL);
        sigaction(SIGUSR2, &action, NULL);
        sigemptyset(&blocked);
        sigaddset(&blocked, SIGUSR1);
        sigaddset(&blocked, SIGUSR2);
        sigprocmask(SIG_BLOCK, &blocked, NULL);
        prctl(PR_SET_NAME, (unsigned long)"probe-waiting", 0, 0, 0);
        printf("FARM-PROBE-GATE %s\n", await_signal(SIGUSR1, gate) ? "opened" : "timed-out");
    }

    clock_gettime(CLOCK_MONOTONIC, &started);
    attack_host_procs();
    attack_loopback();
    attack_proc_root();
    attack_chroot_escape();
    attack_read_files();
    attack_write_cache();

    for (i = 0; i < ATTACKS; i++) {
        char *c;
        for (c = results[i].detail; *c; c++)
            if (*c < ' ' || *c > '~')
                *c = '?';
        printf("FARM-PROBE %s %s %s\n", results[i].name, results[i].succeeded ? "SUCCEEDED" : "blocked",
               results[i].detail[0] ? results[i].detail : "-");
    }
    fflush(stdout);

    if (gate > 0) {
        prctl(PR_SET_NAME, (unsigned long)"probe-done", 0, 0, 0);
        printf("FARM-PROBE-GATE %s\n", await_signal(SIGUSR2, gate) ? "released" : "release-timed-out");
    }
    return 0;
}
