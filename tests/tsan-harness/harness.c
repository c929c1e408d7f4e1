/*
 * Runner for the Criterion-compatible stand-in of TSan builds (see
 * criterion/criterion.h for why it exists and what it supports).
 *
 * Tests register themselves from constructors; main() sorts them like
 * Criterion (suite, then name) and runs each one in a forked child, so every
 * test starts from a clean process exactly as under Criterion. The parent
 * stays single-threaded (fork is safe under TSan) and waits for the child
 * with the test's timeout (the test's .timeout, else its suite's, else
 * --timeout; 0 = none), then kills it with SIGKILL.
 *
 * The child reports assertion failures and skips through a shared anonymous
 * mapping; the parent classifies the child's end:
 *   assertion/expectation failed      -> [FAIL] suite::name: (t s)    failing
 *   exit status != expected (e.g. 66, a sanitizer report with
 *   halt_on_error=1 or at exit)      -> [FAIL] suite::name: (t s)    crashing
 *   killed by a signal (not .signal)  -> [FAIL] suite::name: CRASH!   crashing
 *   timeout                           -> [FAIL] suite::name: Timed out. (t s)  crashing
 * Crashing tests count as failing too, as in Criterion's synthesis line:
 *   [====] Synthesis: Tested: N | Passing: P | Failing: F | Crashing: C
 * Exit status: 0 if every test passed (or was skipped), 1 otherwise.
 *
 * Options: --filter=PATTERN (fnmatch on "suite/name", as Criterion),
 * --timeout=SECONDS (default for tests without one), -l/--list,
 * -f/--fail-fast, -h/--help. Other Criterion flags (-j1, --verbose, -S,
 * --ascii, ...) are accepted and ignored.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "criterion/criterion.h"

#include <errno.h>
#include <fnmatch.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif

enum phase { PH_NONE, PH_SETUP, PH_TEST, PH_TEARDOWN, PH_DONE };

/* Written by the child (any thread), read by the parent after waitpid. */
struct shared {
    int phase;
    int asserts_failed;
    int expects_failed;
    int skipped;
    char skip_msg[512];
};

static struct crh_test *tests;
static struct crh_suite *suites;
static struct shared *shm;
static const struct crh_test *current; /* child: the test being run */
static const struct crh_suite *current_suite;
static pthread_t test_thread; /* child: thread running the body */
static int in_teardown;

void crh_register_test(struct crh_test *t)
{
    t->next = tests;
    tests = t;
}

void crh_register_suite(struct crh_suite *s)
{
    s->next = suites;
    suites = s;
}

static const struct crh_suite *find_suite(const char *name)
{
    for (const struct crh_suite *s = suites; s; s = s->next)
        if (strcmp(s->name, name) == 0)
            return s;
    return NULL;
}

/* ------------------------------------------------------------ output */

/* Whole lines in one write(2), so that threads and the parent do not
 * interleave inside a line. */
static void emit(const char *buf, size_t len)
{
    while (len) {
        ssize_t n = write(STDERR_FILENO, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        buf += n;
        len -= (size_t)n;
    }
}

__attribute__((format(printf, 1, 2))) static void out(const char *fmt, ...)
{
    char buf[4096];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    emit(buf, (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1);
}

/* "[----] " before every line of msg. */
static void out_prefixed(const char *tag, const char *msg)
{
    char buf[8192];
    size_t len = 0;
    const char *p = msg;
    do {
        const char *nl = strchr(p, '\n');
        size_t l = nl ? (size_t)(nl - p) : strlen(p);
        int n = snprintf(buf + len, sizeof buf - len, "%s%.*s\n", tag, (int)l, p);
        if (n < 0 || (size_t)n >= sizeof buf - len) {
            len = sizeof buf - 1;
            break;
        }
        len += (size_t)n;
        p = nl ? nl + 1 : NULL;
    } while (p && *p);
    emit(buf, len);
}

static void report_failure(const char *file, unsigned line, const char *defmsg, const char *fmt,
                           va_list ap)
{
    /* fmt is "x" followed by the user's format: use the default message
     * when the user gave none. */
    char user[4096];
    const char *msg = defmsg;
    if (fmt && fmt[0] && fmt[1]) {
        vsnprintf(user, sizeof user, fmt + 1, ap);
        msg = user;
    }
    char head[1024];
    snprintf(head, sizeof head, "[----] %s:%u: Assertion Failed\n[----]   \n", file, line);
    char body[8192];
    size_t hl = strlen(head);
    memcpy(body, head, hl + 1);
    /* indent every message line like Criterion */
    const char *p = msg;
    size_t len = hl;
    do {
        const char *nl = strchr(p, '\n');
        size_t l = nl ? (size_t)(nl - p) : strlen(p);
        int n = snprintf(body + len, sizeof body - len, "[----]   %.*s\n", (int)l, p);
        if (n < 0 || (size_t)n >= sizeof body - len) {
            len = sizeof body - 1;
            break;
        }
        len += (size_t)n;
        p = nl ? nl + 1 : NULL;
    } while (p && *p);
    int n = snprintf(body + len, sizeof body - len, "[----]   \n");
    if (n > 0 && (size_t)n < sizeof body - len)
        len += (size_t)n;
    emit(body, len);
}

/* ------------------------------------------------- child-side API */

static void run_fini(void)
{
    if (in_teardown)
        return;
    in_teardown = 1;
    __atomic_store_n(&shm->phase, PH_TEARDOWN, __ATOMIC_SEQ_CST);
    if (current && current->opts.fini)
        current->opts.fini();
    if (current_suite && current_suite->opts.fini)
        current_suite->opts.fini();
}

void crh_assert_abort(const char *file, unsigned line, const char *defmsg, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    report_failure(file, line, defmsg, fmt, ap);
    va_end(ap);
    if (shm)
        __atomic_fetch_add(&shm->asserts_failed, 1, __ATOMIC_SEQ_CST);
    /* Criterion aborts the test and still runs its teardown; do so when
     * the assertion failed on the test's own thread. From another thread
     * the process just ends (the test's threads would be left running). */
    if (current && pthread_equal(pthread_self(), test_thread))
        run_fini();
    fflush(NULL);
    _exit(1);
}

void crh_expect_failed(const char *file, unsigned line, const char *defmsg, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    report_failure(file, line, defmsg, fmt, ap);
    va_end(ap);
    if (shm)
        __atomic_fetch_add(&shm->expects_failed, 1, __ATOMIC_SEQ_CST);
}

void crh_skip(const char *fmt, ...)
{
    if (shm) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(shm->skip_msg, sizeof shm->skip_msg, fmt, ap);
        va_end(ap);
        __atomic_store_n(&shm->skipped, 1, __ATOMIC_SEQ_CST);
    }
    if (current && pthread_equal(pthread_self(), test_thread))
        run_fini();
    fflush(NULL);
    _exit(0);
}

void cr_log(enum criterion_severity severity, const char *msg, ...)
{
    static const char *const tags[] = {"[----] ", "[WARN] ", "[ERR ] "};
    char buf[4096];
    va_list ap;
    va_start(ap, msg);
    vsnprintf(buf, sizeof buf, msg, ap);
    va_end(ap);
    out_prefixed(tags[(unsigned)severity <= CR_LOG_ERROR ? severity : CR_LOG_INFO], buf);
}

/* ------------------------------------------------------------ runner */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int cmp_tests(const void *a, const void *b)
{
    const struct crh_test *x = *(const struct crh_test *const *)a;
    const struct crh_test *y = *(const struct crh_test *const *)b;
    int c = strcmp(x->suite, y->suite);
    return c ? c : strcmp(x->name, y->name);
}

/* Test option, else suite option. */
static double eff_timeout(const struct crh_test *t, const struct crh_suite *s, double deflt)
{
    if (t->opts.timeout > 0)
        return t->opts.timeout;
    if (s && s->opts.timeout > 0)
        return s->opts.timeout;
    return deflt;
}

static __attribute__((noreturn)) void child_main(const struct crh_test *t,
                                                 const struct crh_suite *s, const sigset_t *mask)
{
    sigprocmask(SIG_SETMASK, mask, NULL);
    signal(SIGCHLD, SIG_DFL);
#ifdef __linux__
    prctl(PR_SET_PDEATHSIG, SIGKILL); /* do not outlive a killed runner */
#endif
    current = t;
    current_suite = s;
    test_thread = pthread_self();

    __atomic_store_n(&shm->phase, PH_SETUP, __ATOMIC_SEQ_CST);
    if (s && s->opts.init)
        s->opts.init();
    if (t->opts.init)
        t->opts.init();
    __atomic_store_n(&shm->phase, PH_TEST, __ATOMIC_SEQ_CST);
    t->fn();
    run_fini();
    __atomic_store_n(&shm->phase, PH_DONE, __ATOMIC_SEQ_CST);
    fflush(NULL);
    exit(0); /* a normal exit: sanitizers' at-exit checks run and set the status */
}

static void on_sigchld(int sig)
{
    (void)sig;
}

enum outcome { OUT_PASS, OUT_FAIL, OUT_CRASH, OUT_SKIP };

static enum outcome run_one(const struct crh_test *t, double deflt_timeout)
{
    const struct crh_suite *s = find_suite(t->suite);
    double timeout = eff_timeout(t, s, deflt_timeout);
    int exp_signal = t->opts.signal ? t->opts.signal : (s ? s->opts.signal : 0);
    int exp_code = t->opts.exit_code ? t->opts.exit_code : (s ? s->opts.exit_code : 0);

    if (t->opts.disabled || (s && s->opts.disabled)) {
        out("[SKIP] %s::%s: Test is disabled\n", t->suite, t->name);
        return OUT_SKIP;
    }

    memset(shm, 0, sizeof *shm);
    out("[RUN ] %s::%s\n", t->suite, t->name);
    fflush(NULL);

    sigset_t chld, old;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_BLOCK, &chld, &old);

    double start = now_s();
    pid_t pid = fork();
    if (pid < 0) {
        out("[----] %s::%s: fork: %s\n", t->suite, t->name, strerror(errno));
        sigprocmask(SIG_SETMASK, &old, NULL);
        return OUT_CRASH;
    }
    if (pid == 0)
        child_main(t, s, &old);

    int st = 0, timed_out = 0;
    for (;;) {
        pid_t r = waitpid(pid, &st, WNOHANG);
        if (r == pid)
            break;
        if (r < 0 && errno != EINTR) {
            out("[----] waitpid: %s\n", strerror(errno));
            break;
        }
        double left = timeout > 0 ? start + timeout - now_s() : 1.0;
        if (left <= 0) {
            kill(pid, SIGKILL);
            while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
                ;
            timed_out = 1;
            break;
        }
        struct timespec ts = {(time_t)left, (long)((left - (double)(time_t)left) * 1e9)};
        sigtimedwait(&chld, NULL, &ts);
    }
    sigprocmask(SIG_SETMASK, &old, NULL);
    double el = now_s() - start;

    int phase = shm->phase;
    const char *where = phase == PH_SETUP ? "setup" : phase == PH_TEARDOWN ? "teardown" : NULL;
    if (timed_out) {
        out("[FAIL] %s::%s: Timed out. (%3.2fs)\n", t->suite, t->name, el);
        return OUT_CRASH;
    }
    if (shm->skipped) {
        out("[SKIP] %s::%s: %s\n", t->suite, t->name,
            shm->skip_msg[0] ? shm->skip_msg : "Test was skipped");
        return OUT_SKIP;
    }
    if (WIFSIGNALED(st)) {
        int sig = WTERMSIG(st);
        if (sig == exp_signal && !shm->asserts_failed && !shm->expects_failed) {
            out("[PASS] %s::%s: (%3.2fs)\n", t->suite, t->name, el);
            return OUT_PASS;
        }
        if (where)
            out("[----] Warning! The test `%s::%s` crashed during its %s.\n", t->suite, t->name,
                where);
        out("[----] %s:%u: Unexpected signal caught below this line! (%s, signal %d)\n", t->file,
            t->line, strsignal(sig), sig);
        out("[FAIL] %s::%s: CRASH!\n", t->suite, t->name);
        return OUT_CRASH;
    }
    int code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    if (shm->asserts_failed || shm->expects_failed) {
        out("[FAIL] %s::%s: (%3.2fs)\n", t->suite, t->name, el);
        return OUT_FAIL;
    }
    if (exp_signal) {
        out("[----] %s::%s: expected signal %d (%s), exited with status %d\n", t->suite, t->name,
            exp_signal, strsignal(exp_signal), code);
        out("[FAIL] %s::%s: (%3.2fs)\n", t->suite, t->name, el);
        return OUT_FAIL;
    }
    if (code != exp_code) {
        if (where)
            out("[----] Warning! The test `%s::%s` exited during its %s.\n", t->suite, t->name,
                where);
        out("[----] %s::%s: exited with status %d, expected %d%s\n", t->suite, t->name, code,
            exp_code, code == 66 ? " (66: a sanitizer report, see above)" : "");
        out("[FAIL] %s::%s: (%3.2fs)\n", t->suite, t->name, el);
        return OUT_CRASH;
    }
    out("[PASS] %s::%s: (%3.2fs)\n", t->suite, t->name, el);
    return OUT_PASS;
}

static void usage(const char *argv0)
{
    out("usage: %s [--filter=PATTERN] [--timeout=SECONDS] [-l|--list] [-f|--fail-fast]\n"
        "  Criterion-compatible runner of TSan builds (tests/tsan-harness); other\n"
        "  Criterion options (-jN, --verbose, ...) are accepted and ignored.\n",
        argv0);
}

/* "--name=value" or "--name value" (also "-j N"): the value, else NULL. */
static const char *opt_value(int argc, char **argv, int *i, const char *name)
{
    size_t n = strlen(name);
    if (strncmp(argv[*i], name, n) != 0)
        return NULL;
    if (argv[*i][n] == '=')
        return argv[*i] + n + 1;
    if (argv[*i][n] == '\0' && *i + 1 < argc)
        return argv[++*i];
    return NULL;
}

int main(int argc, char **argv)
{
    const char *filter = NULL;
    double deflt_timeout = 0;
    int list = 0, fail_fast = 0;
    const char *v;
    for (int i = 1; i < argc; i++) {
        if ((v = opt_value(argc, argv, &i, "--filter")))
            filter = v;
        else if ((v = opt_value(argc, argv, &i, "--timeout")))
            deflt_timeout = strtod(v, NULL);
        else if (strcmp(argv[i], "-l") == 0 || strcmp(argv[i], "--list") == 0)
            list = 1;
        else if (strcmp(argv[i], "-f") == 0 || strcmp(argv[i], "--fail-fast") == 0)
            fail_fast = 1;
        else if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            usage(argv[0]);
            return 0;
        } else if (strcmp(argv[i], "-j") == 0 || strcmp(argv[i], "--jobs") == 0 ||
                   strcmp(argv[i], "-O") == 0 || strcmp(argv[i], "--output") == 0 ||
                   strcmp(argv[i], "--pattern") == 0) {
            i++; /* ignored, with its value */
        }
        /* anything else: an ignored Criterion option */
    }

    size_t n = 0;
    for (struct crh_test *t = tests; t; t = t->next)
        n++;
    struct crh_test **all = calloc(n ? n : 1, sizeof *all);
    if (!all)
        return 2;
    n = 0;
    for (struct crh_test *t = tests; t; t = t->next)
        all[n++] = t;
    qsort(all, n, sizeof *all, cmp_tests);

    if (list) {
        for (size_t i = 0; i < n; i++)
            out("%s::%s\n", all[i]->suite, all[i]->name);
        free(all);
        return 0;
    }

    shm = mmap(NULL, sizeof *shm, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (shm == MAP_FAILED) {
        out("[ERR ] mmap: %s\n", strerror(errno));
        return 2;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigchld;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGCHLD, &sa, NULL);

    unsigned long tested = 0, passing = 0, failing = 0, crashing = 0;
    for (size_t i = 0; i < n; i++) {
        const struct crh_test *t = all[i];
        if (filter) {
            char id[512];
            snprintf(id, sizeof id, "%s/%s", t->suite, t->name);
            if (fnmatch(filter, id, 0) != 0)
                continue;
        }
        enum outcome o = run_one(t, deflt_timeout);
        if (o == OUT_SKIP)
            continue;
        tested++;
        if (o == OUT_PASS)
            passing++;
        else
            failing++;
        if (o == OUT_CRASH)
            crashing++;
        if (o != OUT_PASS && fail_fast)
            break;
    }
    out("[====] Synthesis: Tested: %lu | Passing: %lu | Failing: %lu | Crashing: %lu \n", tested,
        passing, failing, crashing);
    free(all);
    munmap(shm, sizeof *shm);
    return failing ? 1 : 0;
}
