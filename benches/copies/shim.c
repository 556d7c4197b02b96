// Counts the large memory copies of a process: every memcpy/memmove of 64 bytes or more,
// by calling address and size, written to $COPIES_OUT when the process exits (one line per
// caller and size: object, offset in it, size, count). Loaded with LD_PRELOAD by
// benches/copies.sh; not part of any build.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

typedef void *(*copy_fn)(void *, const void *, size_t);

#define SLOTS 65536
static struct {
    uintptr_t caller;
    size_t size;
    unsigned long count;
} table[SLOTS];
static unsigned long small;
static char busy;
static __thread int inside;
static int resolving;

static void record(uintptr_t caller, size_t size) {
    if (inside) return;
    inside = 1;
    if (size < 64) {
        __atomic_add_fetch(&small, 1, __ATOMIC_RELAXED);
    } else {
        // A spin lock: the table is shared by every thread (a server task, a resolver).
        while (__atomic_test_and_set(&busy, __ATOMIC_ACQUIRE)) {
        }
        size_t h = ((caller * 0x9E3779B97F4A7C15ull) ^ size) % SLOTS;
        for (size_t i = 0; i < SLOTS; i++) {
            size_t j = (h + i) % SLOTS;
            if (table[j].count == 0) {
                table[j].caller = caller;
                table[j].size = size;
            }
            if (table[j].caller == caller && table[j].size == size) {
                table[j].count++;
                break;
            }
        }
        __atomic_clear(&busy, __ATOMIC_RELEASE);
    }
    inside = 0;
}

// dlsym may copy memory itself: byte by byte while it runs.
static void *plain_copy(void *d, const void *s, size_t n) {
    unsigned char *dd = d;
    const unsigned char *ss = s;
    if (dd < ss) {
        for (size_t i = 0; i < n; i++) dd[i] = ss[i];
    } else {
        for (size_t i = n; i > 0; i--) dd[i - 1] = ss[i - 1];
    }
    return d;
}

static copy_fn next(const char *name) {
    resolving = 1;
    copy_fn f = (copy_fn)dlsym(RTLD_NEXT, name);
    resolving = 0;
    return f;
}

// One body for both: counts the copy, then makes it with the C library's own function.
static void *counted(copy_fn *real, const char *name, uintptr_t caller, void *d, const void *s,
                     size_t n) {
    if (resolving) return plain_copy(d, s, n);
    if (!*real) *real = next(name);
    record(caller, n);
    return (*real)(d, s, n);
}

void *memcpy(void *d, const void *s, size_t n) {
    static copy_fn real;
    return counted(&real, "memcpy", (uintptr_t)__builtin_return_address(0), d, s, n);
}

void *memmove(void *d, const void *s, size_t n) {
    static copy_fn real;
    return counted(&real, "memmove", (uintptr_t)__builtin_return_address(0), d, s, n);
}

__attribute__((destructor)) static void dump(void) {
    const char *path = getenv("COPIES_OUT");
    if (!path) return;
    FILE *f = fopen(path, "w");
    if (!f) return;
    fprintf(f, "small - %lu\n", small);
    for (size_t i = 0; i < SLOTS; i++) {
        if (!table[i].count) continue;
        Dl_info info;
        if (dladdr((void *)table[i].caller, &info) && info.dli_fname) {
            fprintf(f, "%s %lx %zu %lu\n", info.dli_fname,
                    (unsigned long)(table[i].caller - (uintptr_t)info.dli_fbase), table[i].size,
                    table[i].count);
        }
    }
    fclose(f);
}
