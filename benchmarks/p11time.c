/*
 * A PKCS#11 pass-through module for benchmarks/handshake.py: it forwards
 * every call to the real module ($P11TIME_MODULE) and adds up the CPU time
 * (CLOCK_THREAD_CPUTIME_ID: user and system, of the calling thread) spent
 * inside the real module's signing functions, and inside the other calls a
 * backend makes per signature (C_GetSessionInfo, C_GetOperationState,
 * C_OpenSession, C_CloseSession).  That is the token's own cost *in situ*,
 * inside a handshake, where its code and data are cold -- more than in a
 * tight signing loop.
 *
 * p11time_read() (exported, not PKCS#11) returns the running totals; a
 * process reads them with ctypes (dlopen of the same path gives the same
 * copy of the module that the engine or provider loaded).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include <p11-kit/pkcs11.h>

#define EXPORT __attribute__((visibility("default")))

static pthread_once_t once = PTHREAD_ONCE_INIT;
static CK_RV load_rv = CKR_GENERAL_ERROR;
static CK_FUNCTION_LIST_PTR real;
static CK_FUNCTION_LIST mine;

static _Atomic long long sign_ns, other_ns;
static _Atomic long sign_calls, other_calls;

static long long thread_ns(void)
{
    struct timespec t;

    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

#define TIMED(counter, calls, call)                \
    do {                                           \
        long long start_ = thread_ns();            \
        rv = (call);                               \
        atomic_fetch_add(&counter, thread_ns() - start_); \
        atomic_fetch_add(&calls, 1);               \
    } while (0)

static CK_RV t_SignInit(CK_SESSION_HANDLE s, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k)
{
    CK_RV rv;
    TIMED(sign_ns, sign_calls, real->C_SignInit(s, m, k));
    return rv;
}

static CK_RV t_Sign(CK_SESSION_HANDLE s, CK_BYTE_PTR d, CK_ULONG n, CK_BYTE_PTR sig, CK_ULONG_PTR len)
{
    CK_RV rv;
    TIMED(sign_ns, sign_calls, real->C_Sign(s, d, n, sig, len));
    return rv;
}

static CK_RV t_SignUpdate(CK_SESSION_HANDLE s, CK_BYTE_PTR d, CK_ULONG n)
{
    CK_RV rv;
    TIMED(sign_ns, sign_calls, real->C_SignUpdate(s, d, n));
    return rv;
}

static CK_RV t_SignFinal(CK_SESSION_HANDLE s, CK_BYTE_PTR sig, CK_ULONG_PTR len)
{
    CK_RV rv;
    TIMED(sign_ns, sign_calls, real->C_SignFinal(s, sig, len));
    return rv;
}

static CK_RV t_GetSessionInfo(CK_SESSION_HANDLE s, CK_SESSION_INFO_PTR info)
{
    CK_RV rv;
    TIMED(other_ns, other_calls, real->C_GetSessionInfo(s, info));
    return rv;
}

static CK_RV t_GetOperationState(CK_SESSION_HANDLE s, CK_BYTE_PTR state, CK_ULONG_PTR len)
{
    CK_RV rv;
    TIMED(other_ns, other_calls, real->C_GetOperationState(s, state, len));
    return rv;
}

static CK_RV t_OpenSession(CK_SLOT_ID slot, CK_FLAGS flags, CK_VOID_PTR app, CK_NOTIFY notify,
                           CK_SESSION_HANDLE_PTR s)
{
    CK_RV rv;
    TIMED(other_ns, other_calls, real->C_OpenSession(slot, flags, app, notify, s));
    return rv;
}

static CK_RV t_CloseSession(CK_SESSION_HANDLE s)
{
    CK_RV rv;
    TIMED(other_ns, other_calls, real->C_CloseSession(s));
    return rv;
}

static void setup(void)
{
    const char *path = getenv("P11TIME_MODULE");
    CK_C_GetFunctionList get_list;
    void *so;

    if (path == NULL) {
        fprintf(stderr, "p11time: P11TIME_MODULE is not set\n");
        return;
    }
    so = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (so == NULL) {
        fprintf(stderr, "p11time: %s\n", dlerror());
        return;
    }
    get_list = (CK_C_GetFunctionList)dlsym(so, "C_GetFunctionList");
    if (get_list == NULL || (load_rv = get_list(&real)) != CKR_OK)
        return;
    mine = *real;
    mine.C_GetFunctionList = C_GetFunctionList;
    mine.C_SignInit = t_SignInit;
    mine.C_Sign = t_Sign;
    mine.C_SignUpdate = t_SignUpdate;
    mine.C_SignFinal = t_SignFinal;
    mine.C_GetSessionInfo = t_GetSessionInfo;
    mine.C_GetOperationState = t_GetOperationState;
    mine.C_OpenSession = t_OpenSession;
    mine.C_CloseSession = t_CloseSession;
}

EXPORT CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list)
{
    pthread_once(&once, setup);
    if (load_rv != CKR_OK)
        return load_rv;
    if (list == NULL)
        return CKR_ARGUMENTS_BAD;
    *list = &mine;
    return CKR_OK;
}

EXPORT void p11time_read(long long *sign_total_ns, long *sign_total_calls, long long *other_total_ns,
                         long *other_total_calls)
{
    *sign_total_ns = atomic_load(&sign_ns);
    *sign_total_calls = atomic_load(&sign_calls);
    *other_total_ns = atomic_load(&other_ns);
    *other_total_calls = atomic_load(&other_calls);
}
