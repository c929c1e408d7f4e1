/*
 * Criterion-compatible stand-in used ONLY by TSan builds (-DZEV_SANITIZE=thread).
 *
 * Criterion 2.4 cannot start under ThreadSanitizer ("Could not initialize
 * inheritable arena", Snaipe/Criterion#274), so tests/CMakeLists.txt compiles
 * the test programs of a TSan build against this header and links
 * tests/tsan-harness/harness.c (the runner: one forked child per test, with
 * the test's .timeout) instead of libcriterion. The tests themselves are
 * unchanged: this header provides the subset of Criterion's API they use,
 * with Criterion's semantics:
 *   Test(suite, name, .timeout/.init/.fini/.signal/.exit_code/.disabled/...)
 *   TestSuite(suite, <same options, defaults for its tests>)
 *   cr_assert*, cr_expect* (plain, _not, _fail, _eq/_neq/_lt/_leq/_gt/_geq,
 *   _null/_not_null, _str_*, _wcs_*, _arr_eq/_arr_neq, _float_eq/_neq),
 *   each with an optional printf-like message; cr_skip_test; cr_log*.
 * cr_assert* ends the test (from any thread); cr_expect* marks it failed and
 * goes on. Not provided: ParameterizedTest, Theory, the new C++-style
 * cr_assert(eq(...)) API, the _cmp array asserts.
 */
#ifndef CRH_CRITERION_H
#define CRH_CRITERION_H
/* Like the real <criterion/criterion.h>, live in a system header: warnings
 * in the expansion of assertion macros (e.g. -Wsign-compare on
 * cr_assert_eq(int, size_t)) are not reported, exactly as with Criterion. */
#pragma GCC system_header

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <wchar.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------- types */

/* Same field names as Criterion's struct criterion_test_extra_data, so the
 * designated initializers of Test(...)/TestSuite(...) compile unchanged. */
struct crh_opts {
    int crh_sentinel_;
    void (*init)(void);
    void (*fini)(void);
    int signal;
    int exit_code;
    bool disabled;
    const char *description;
    double timeout;
    void *data;
};

struct crh_suite {
    const char *name;
    struct crh_opts opts;
    struct crh_suite *next;
};

struct crh_test {
    const char *suite;
    const char *name;
    const char *file;
    unsigned line;
    void (*fn)(void);
    struct crh_opts opts;
    struct crh_test *next;
};

enum criterion_severity { CR_LOG_INFO, CR_LOG_WARNING, CR_LOG_ERROR };

void crh_register_test(struct crh_test *t);
void crh_register_suite(struct crh_suite *s);
__attribute__((noreturn, format(printf, 4, 5))) void
crh_assert_abort(const char *file, unsigned line, const char *defmsg, const char *fmt, ...);
__attribute__((format(printf, 4, 5))) void
crh_expect_failed(const char *file, unsigned line, const char *defmsg, const char *fmt, ...);
__attribute__((noreturn, format(printf, 1, 2))) void crh_skip(const char *fmt, ...);
__attribute__((format(printf, 2, 3))) void cr_log(enum criterion_severity severity, const char *msg,
                                                  ...);

/* ------------------------------------------------------ preprocessor */

#define CRH_ID(...) __VA_ARGS__
#define CRH_CAT(a, b) CRH_CAT_(a, b)
#define CRH_CAT_(a, b) a##b
#define CRH_STR(x) CRH_STR_(x)
#define CRH_STR_(x) #x

/* CRH_HEAD(a, ...) -> a; CRH_TAIL(a) -> (nothing); CRH_TAIL(a, b...) -> b...
 * Standard C only (no ##__VA_ARGS__, no variadic macro called without its
 * variadic part): the argument count (up to 64) selects the expansion. */
#define CRH_ARGN_(_1, _2, _3, _4, _5, _6, _7, _8, _9, _10, _11, _12, _13, _14, _15, _16, _17, _18, \
                  _19, _20, _21, _22, _23, _24, _25, _26, _27, _28, _29, _30, _31, _32, _33, _34,  \
                  _35, _36, _37, _38, _39, _40, _41, _42, _43, _44, _45, _46, _47, _48, _49, _50,  \
                  _51, _52, _53, _54, _55, _56, _57, _58, _59, _60, _61, _62, _63, _64, N, ...)    \
    N
#define CRH_MANY_(...)                                                                             \
    CRH_ARGN_(__VA_ARGS__, crhM, crhM, crhM, crhM, crhM, crhM, crhM, crhM, crhM, crhM, crhM, crhM, \
              crhM, crhM, crhM, crhM, crhM, crhM, crhM, crhM, crhM, crhM, crhM, crhM, crhM, crhM,  \
              crhM, crhM, crhM, crhM, crhM, crhM, crhM, crhM, crhM, crhM, crhM, crhM, crhM, crhM,  \
              crhM, crhM, crhM, crhM, crhM, crhM, crhM, crhM, crhM, crhM, crhM, crhM, crhM, crhM,  \
              crhM, crhM, crhM, crhM, crhM, crhM, crhM, crhM, crhM, crh1, crh_dummy_)
#define CRH_HEAD(...) CRH_HEAD_(__VA_ARGS__, crh_dummy_)
#define CRH_HEAD_(x, ...) x
#define CRH_TAIL(...) CRH_CAT(CRH_TAIL_, CRH_MANY_(__VA_ARGS__))(__VA_ARGS__)
#define CRH_TAIL_crh1(x)
#define CRH_TAIL_crhM(x, ...) __VA_ARGS__
#define CRH_ARG2(...) CRH_HEAD(CRH_TAIL(__VA_ARGS__))
#define CRH_ARG3(...) CRH_HEAD(CRH_TAIL(CRH_TAIL(__VA_ARGS__)))
#define CRH_REST2(...) CRH_TAIL(CRH_TAIL(__VA_ARGS__))
#define CRH_REST3(...) CRH_TAIL(CRH_TAIL(CRH_TAIL(__VA_ARGS__)))

/* ------------------------------------------------------------- tests */

/* Test(suite, name [, .option = value]...) { body } */
#define Test(...) CRH_TEST_(__VA_ARGS__, )
#define CRH_TEST_(Suite_, Name_, ...)                                                              \
    static void Suite_##_##Name_##_impl(void);                                                     \
    static struct crh_test crh_test_##Suite_##_##Name_ = {                                         \
        .suite = #Suite_,                                                                          \
        .name = #Name_,                                                                            \
        .file = __FILE__,                                                                          \
        .line = __LINE__,                                                                          \
        .fn = Suite_##_##Name_##_impl,                                                             \
        .opts = {.crh_sentinel_ = 0, __VA_ARGS__},                                                 \
    };                                                                                             \
    __attribute__((constructor)) static void crh_reg_##Suite_##_##Name_(void)                      \
    {                                                                                              \
        crh_register_test(&crh_test_##Suite_##_##Name_);                                           \
    }                                                                                              \
    static void Suite_##_##Name_##_impl(void)

/* TestSuite(suite [, .option = value]...); -- defaults for the suite's tests */
#define TestSuite(...) CRH_SUITE_(__VA_ARGS__, )
#define CRH_SUITE_(Suite_, ...)                                                                    \
    static struct crh_suite crh_suite_##Suite_ = {                                                 \
        .name = #Suite_,                                                                           \
        .opts = {.crh_sentinel_ = 0, __VA_ARGS__},                                                 \
    };                                                                                             \
    __attribute__((constructor)) static void crh_sreg_##Suite_(void)                               \
    {                                                                                              \
        crh_register_suite(&crh_suite_##Suite_);                                                   \
    }                                                                                              \
    extern int crh_swallow_semicolon_

/* -------------------------------------------------------- assertions */

/* fmtargs is a parenthesised, possibly empty "format", args... list; the
 * "x" prefix keeps it a literal even when empty (as Criterion does). */
#define CRH_CHECK_(fail, cond, defmsg, fmtargs)                                                    \
    do {                                                                                           \
        if (!(cond))                                                                               \
            fail(__FILE__, __LINE__, defmsg, "x" CRH_ID fmtargs);                                  \
    } while (0)

#define CRH_EXPR_(fail, ...)                                                                       \
    CRH_CHECK_(fail, CRH_HEAD(__VA_ARGS__),                                                        \
               "The expression " CRH_STR(CRH_HEAD(__VA_ARGS__)) " is false.",                      \
               (CRH_TAIL(__VA_ARGS__)))
#define CRH_NOT_(fail, ...)                                                                        \
    CRH_CHECK_(fail, !(CRH_HEAD(__VA_ARGS__)),                                                     \
               "The expression !(" CRH_STR(CRH_HEAD(__VA_ARGS__)) ") is false.",                   \
               (CRH_TAIL(__VA_ARGS__)))
#define CRH_OP_(fail, op, ...)                                                                     \
    CRH_CHECK_(fail, (CRH_HEAD(__VA_ARGS__))op(CRH_ARG2(__VA_ARGS__)),                             \
               "The expression (" CRH_STR(CRH_HEAD(__VA_ARGS__)) ") " #op " (" CRH_STR(            \
                   CRH_ARG2(__VA_ARGS__)) ") is false.",                                           \
               (CRH_REST2(__VA_ARGS__)))
#define CRH_NULL_(fail, op, what, ...)                                                             \
    CRH_CHECK_(fail, (CRH_HEAD(__VA_ARGS__))op NULL,                                               \
               CRH_STR(CRH_HEAD(__VA_ARGS__)) " is " what ".", (CRH_TAIL(__VA_ARGS__)))
#define CRH_STROP_(fail, cmp, op, ...)                                                             \
    CRH_CHECK_(fail, cmp((CRH_HEAD(__VA_ARGS__)), (CRH_ARG2(__VA_ARGS__))) op 0,                   \
               "The expression " #cmp "(" CRH_STR(CRH_HEAD(__VA_ARGS__)) ", " CRH_STR(             \
                   CRH_ARG2(__VA_ARGS__)) ") " #op " 0 is false.",                                 \
               (CRH_REST2(__VA_ARGS__)))
#define CRH_EMPTY_(fail, op, zero, ...)                                                            \
    CRH_CHECK_(fail, (CRH_HEAD(__VA_ARGS__))[0] op zero,                                           \
               "The expression (" CRH_STR(CRH_HEAD(__VA_ARGS__)) ")[0] " #op " " #zero             \
                                                                 " is false.",                     \
               (CRH_TAIL(__VA_ARGS__)))
#define CRH_MEM_(fail, op, ...)                                                                    \
    CRH_CHECK_(fail,                                                                               \
               memcmp((CRH_HEAD(__VA_ARGS__)), (CRH_ARG2(__VA_ARGS__)), (CRH_ARG3(__VA_ARGS__)))   \
                   op 0,                                                                           \
               "The expression memcmp(" CRH_STR(CRH_HEAD(__VA_ARGS__)) ", " CRH_STR(CRH_ARG2(      \
                   __VA_ARGS__)) ", " CRH_STR(CRH_ARG3(__VA_ARGS__)) ") " #op " 0 is false.",      \
               (CRH_REST3(__VA_ARGS__)))
#define CRH_FLOAT_EQ_(a, b, eps) ((b) - (a) <= (eps) && (a) - (b) <= (eps))
#define CRH_FLOAT_NEQ_(a, b, eps) ((b) - (a) > (eps) || (a) - (b) > (eps))
#define CRH_FLOAT_(fail, test, ...)                                                                \
    CRH_CHECK_(fail, test(CRH_HEAD(__VA_ARGS__), CRH_ARG2(__VA_ARGS__), CRH_ARG3(__VA_ARGS__)),    \
               "The expression " #test "(" CRH_STR(CRH_HEAD(__VA_ARGS__)) ", " CRH_STR(            \
                   CRH_ARG2(__VA_ARGS__)) ", " CRH_STR(CRH_ARG3(__VA_ARGS__)) ") is false.",       \
               (CRH_REST3(__VA_ARGS__)))

#define CRH_FAILMSG_ "The conditions for this assertion were not met."

#define cr_assert(...) CRH_EXPR_(crh_assert_abort, __VA_ARGS__)
#define cr_expect(...) CRH_EXPR_(crh_expect_failed, __VA_ARGS__)
#define cr_assert_not(...) CRH_NOT_(crh_assert_abort, __VA_ARGS__)
#define cr_expect_not(...) CRH_NOT_(crh_expect_failed, __VA_ARGS__)
#define cr_assert_fail(...) crh_assert_abort(__FILE__, __LINE__, CRH_FAILMSG_, "x" __VA_ARGS__)
#define cr_expect_fail(...) crh_expect_failed(__FILE__, __LINE__, CRH_FAILMSG_, "x" __VA_ARGS__)
#define cr_skip_test(...) crh_skip("" __VA_ARGS__)

#define cr_assert_eq(...) CRH_OP_(crh_assert_abort, ==, __VA_ARGS__)
#define cr_expect_eq(...) CRH_OP_(crh_expect_failed, ==, __VA_ARGS__)
#define cr_assert_neq(...) CRH_OP_(crh_assert_abort, !=, __VA_ARGS__)
#define cr_expect_neq(...) CRH_OP_(crh_expect_failed, !=, __VA_ARGS__)
#define cr_assert_lt(...) CRH_OP_(crh_assert_abort, <, __VA_ARGS__)
#define cr_expect_lt(...) CRH_OP_(crh_expect_failed, <, __VA_ARGS__)
#define cr_assert_leq(...) CRH_OP_(crh_assert_abort, <=, __VA_ARGS__)
#define cr_expect_leq(...) CRH_OP_(crh_expect_failed, <=, __VA_ARGS__)
#define cr_assert_gt(...) CRH_OP_(crh_assert_abort, >, __VA_ARGS__)
#define cr_expect_gt(...) CRH_OP_(crh_expect_failed, >, __VA_ARGS__)
#define cr_assert_geq(...) CRH_OP_(crh_assert_abort, >=, __VA_ARGS__)
#define cr_expect_geq(...) CRH_OP_(crh_expect_failed, >=, __VA_ARGS__)

#define cr_assert_null(...) CRH_NULL_(crh_assert_abort, ==, "not null", __VA_ARGS__)
#define cr_expect_null(...) CRH_NULL_(crh_expect_failed, ==, "not null", __VA_ARGS__)
#define cr_assert_not_null(...) CRH_NULL_(crh_assert_abort, !=, "null", __VA_ARGS__)
#define cr_expect_not_null(...) CRH_NULL_(crh_expect_failed, !=, "null", __VA_ARGS__)

#define cr_assert_str_eq(...) CRH_STROP_(crh_assert_abort, strcmp, ==, __VA_ARGS__)
#define cr_expect_str_eq(...) CRH_STROP_(crh_expect_failed, strcmp, ==, __VA_ARGS__)
#define cr_assert_str_neq(...) CRH_STROP_(crh_assert_abort, strcmp, !=, __VA_ARGS__)
#define cr_expect_str_neq(...) CRH_STROP_(crh_expect_failed, strcmp, !=, __VA_ARGS__)
#define cr_assert_str_lt(...) CRH_STROP_(crh_assert_abort, strcmp, <, __VA_ARGS__)
#define cr_expect_str_lt(...) CRH_STROP_(crh_expect_failed, strcmp, <, __VA_ARGS__)
#define cr_assert_str_leq(...) CRH_STROP_(crh_assert_abort, strcmp, <=, __VA_ARGS__)
#define cr_expect_str_leq(...) CRH_STROP_(crh_expect_failed, strcmp, <=, __VA_ARGS__)
#define cr_assert_str_gt(...) CRH_STROP_(crh_assert_abort, strcmp, >, __VA_ARGS__)
#define cr_expect_str_gt(...) CRH_STROP_(crh_expect_failed, strcmp, >, __VA_ARGS__)
#define cr_assert_str_geq(...) CRH_STROP_(crh_assert_abort, strcmp, >=, __VA_ARGS__)
#define cr_expect_str_geq(...) CRH_STROP_(crh_expect_failed, strcmp, >=, __VA_ARGS__)
#define cr_assert_str_empty(...) CRH_EMPTY_(crh_assert_abort, ==, '\0', __VA_ARGS__)
#define cr_expect_str_empty(...) CRH_EMPTY_(crh_expect_failed, ==, '\0', __VA_ARGS__)
#define cr_assert_str_not_empty(...) CRH_EMPTY_(crh_assert_abort, !=, '\0', __VA_ARGS__)
#define cr_expect_str_not_empty(...) CRH_EMPTY_(crh_expect_failed, !=, '\0', __VA_ARGS__)

#define cr_assert_wcs_eq(...) CRH_STROP_(crh_assert_abort, wcscmp, ==, __VA_ARGS__)
#define cr_expect_wcs_eq(...) CRH_STROP_(crh_expect_failed, wcscmp, ==, __VA_ARGS__)
#define cr_assert_wcs_neq(...) CRH_STROP_(crh_assert_abort, wcscmp, !=, __VA_ARGS__)
#define cr_expect_wcs_neq(...) CRH_STROP_(crh_expect_failed, wcscmp, !=, __VA_ARGS__)
#define cr_assert_wcs_lt(...) CRH_STROP_(crh_assert_abort, wcscmp, <, __VA_ARGS__)
#define cr_expect_wcs_lt(...) CRH_STROP_(crh_expect_failed, wcscmp, <, __VA_ARGS__)
#define cr_assert_wcs_leq(...) CRH_STROP_(crh_assert_abort, wcscmp, <=, __VA_ARGS__)
#define cr_expect_wcs_leq(...) CRH_STROP_(crh_expect_failed, wcscmp, <=, __VA_ARGS__)
#define cr_assert_wcs_gt(...) CRH_STROP_(crh_assert_abort, wcscmp, >, __VA_ARGS__)
#define cr_expect_wcs_gt(...) CRH_STROP_(crh_expect_failed, wcscmp, >, __VA_ARGS__)
#define cr_assert_wcs_geq(...) CRH_STROP_(crh_assert_abort, wcscmp, >=, __VA_ARGS__)
#define cr_expect_wcs_geq(...) CRH_STROP_(crh_expect_failed, wcscmp, >=, __VA_ARGS__)
#define cr_assert_wcs_empty(...) CRH_EMPTY_(crh_assert_abort, ==, L'\0', __VA_ARGS__)
#define cr_expect_wcs_empty(...) CRH_EMPTY_(crh_expect_failed, ==, L'\0', __VA_ARGS__)
#define cr_assert_wcs_not_empty(...) CRH_EMPTY_(crh_assert_abort, !=, L'\0', __VA_ARGS__)
#define cr_expect_wcs_not_empty(...) CRH_EMPTY_(crh_expect_failed, !=, L'\0', __VA_ARGS__)

#define cr_assert_arr_eq(...) CRH_MEM_(crh_assert_abort, ==, __VA_ARGS__)
#define cr_expect_arr_eq(...) CRH_MEM_(crh_expect_failed, ==, __VA_ARGS__)
#define cr_assert_arr_neq(...) CRH_MEM_(crh_assert_abort, !=, __VA_ARGS__)
#define cr_expect_arr_neq(...) CRH_MEM_(crh_expect_failed, !=, __VA_ARGS__)

#define cr_assert_float_eq(...) CRH_FLOAT_(crh_assert_abort, CRH_FLOAT_EQ_, __VA_ARGS__)
#define cr_expect_float_eq(...) CRH_FLOAT_(crh_expect_failed, CRH_FLOAT_EQ_, __VA_ARGS__)
#define cr_assert_float_neq(...) CRH_FLOAT_(crh_assert_abort, CRH_FLOAT_NEQ_, __VA_ARGS__)
#define cr_expect_float_neq(...) CRH_FLOAT_(crh_expect_failed, CRH_FLOAT_NEQ_, __VA_ARGS__)

/* ----------------------------------------------------------- logging */

#define cr_log_info(...) cr_log(CR_LOG_INFO, __VA_ARGS__)
#define cr_log_warn(...) cr_log(CR_LOG_WARNING, __VA_ARGS__)
#define cr_log_error(...) cr_log(CR_LOG_ERROR, __VA_ARGS__)

#ifdef __cplusplus
}
#endif
#endif
