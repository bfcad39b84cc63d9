/* twopath_nofp: leakgen's twopath in C, built without frame pointers
 * (-O2 -fomit-frame-pointer, Debian's default), through libc's syscall():
 * hold() keeps N "user" keys (kmalloc-512 in user_preparse), busy() makes
 * RATIO transient ones per held key (an empty description is refused after
 * preparse). Protocol as leakgen's: READY <pid>, a line on stdin,
 * invalidate, RELEASED <pid>, EOF. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <errno.h>
#include <sys/syscall.h>

#define KEY_SPEC_PROCESS_KEYRING (-2)
#define KEYCTL_INVALIDATE 21

static char payload[400];

__attribute__((noinline)) static long hold(int i) {
    char desc[64];
    snprintf(desc, sizeof desc, "leaktrace-c-%d-%d", (int)getpid(), i);
    return syscall(SYS_add_key, "user", desc, payload, sizeof payload, KEY_SPEC_PROCESS_KEYRING);
}

__attribute__((noinline)) static int busy(void) {
    long r = syscall(SYS_add_key, "user", "", payload, sizeof payload, KEY_SPEC_PROCESS_KEYRING);
    return r == -1 && errno == EINVAL ? 0 : -1;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: twopath_nofp N RATIO\n");
        return 2;
    }
    int n = atoi(argv[1]), ratio = atoi(argv[2]);
    long *ids = calloc(n, sizeof *ids);
    memset(payload, 'C', sizeof payload);
    for (int i = 0; i < n; i++) {
        for (int j = 0; j < ratio; j++)
            if (busy()) { perror("add_key with an empty description"); return 1; }
        if ((ids[i] = hold(i)) < 0) { perror("add_key"); return 1; }
    }
    printf("READY %d\n", (int)getpid());
    fflush(stdout);
    char line[64];
    if (!fgets(line, sizeof line, stdin)) line[0] = 0;
    for (int i = 0; i < n; i++) syscall(SYS_keyctl, KEYCTL_INVALIDATE, ids[i], 0, 0, 0);
    printf("RELEASED %d\n", (int)getpid());
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) line[0] = 0;
    return 0;
}
