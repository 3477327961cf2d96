/* mtls_engine's hand-written C: what cffi alone cannot express safely. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <openssl/opensslv.h>
#include <openssl/ssl.h>
#include <openssl/ui.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>

/* MTLS_ENGINE_DISABLE_ENGINE (a build flag) compiles the extension as if
   OpenSSL had no ENGINE API, to prove that guard on any OpenSSL. */
#if !defined(OPENSSL_NO_ENGINE) && OPENSSL_VERSION_MAJOR < 4 && !defined(MTLS_ENGINE_DISABLE_ENGINE)
#define MTLS_WITH_ENGINE 1
#include <openssl/engine.h> /* deprecated in 3.0, still the libp11 way */
static const int MTLS_HAS_ENGINE = 1;
#else
static const int MTLS_HAS_ENGINE = 0;
typedef struct engine_st ENGINE;
#endif

#if OPENSSL_VERSION_MAJOR >= 3
#include <openssl/conf.h>
#include <openssl/core_names.h>
#include <openssl/params.h>
#include <openssl/provider.h>
#include <openssl/store.h>
static const int MTLS_HAS_PROVIDER = 1;
#else
static const int MTLS_HAS_PROVIDER = 0;
#endif

/* ---- which OpenSSL is this? ------------------------------------------ */

/* Address of `sym` as resolved from the shared object `path` (which must
   already be loaded: RTLD_NOLOAD) and its dependencies; path NULL means the
   main program.  NULL when the object is not loaded or lacks the symbol
   (for example an _ssl module with OpenSSL linked in statically and its
   symbols hidden). */
static void *mtls_symbol_in(const char *path, const char *sym)
{
    void *handle = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    void *addr;
    if (handle == NULL)
        return NULL;
    addr = dlsym(handle, sym);
    dlclose(handle);
    return addr;
}

/* Address of one of the OpenSSL functions this extension was linked with. */
static void *mtls_own_symbol(const char *sym)
{
    if (strcmp(sym, "SSL_CTX_new") == 0)
        return (void *)&SSL_CTX_new;
    if (strcmp(sym, "OpenSSL_version_num") == 0)
        return (void *)&OpenSSL_version_num;
    return NULL;
}

/* File name of the shared object holding `addr`, or NULL. */
static const char *mtls_library_of(void *addr)
{
    Dl_info info;
    if (addr == NULL || dladdr(addr, &info) == 0)
        return NULL;
    return info.dli_fname;
}

/* 1 when the n bytes at p can be read, 0 when reading them would fault.
   process_vm_readv on our own pid reports EFAULT instead of crashing. */
static int mtls_readable(const void *p, size_t n)
{
    char buf[4096];
    struct iovec local, remote;
    size_t done = 0;
    if (p == NULL)
        return 0;
    while (done < n) {
        size_t chunk = n - done < sizeof(buf) ? n - done : sizeof(buf);
        ssize_t got;
        local.iov_base = buf;
        local.iov_len = chunk;
        remote.iov_base = (char *)p + done;
        remote.iov_len = chunk;
        got = process_vm_readv(getpid(), &local, 1, &remote, 1, 0);
        if (got < 0 && (errno == ENOSYS || errno == EPERM)) {
            /* Cannot probe here: fall back to a pipe, whose write also
               fails with EFAULT on unreadable memory. */
            int fds[2];
            ssize_t w;
            if (pipe(fds) != 0)
                return 0;
            w = write(fds[1], (const char *)p + done, chunk);
            close(fds[0]);
            close(fds[1]);
            if (w != (ssize_t)chunk)
                return 0;
            got = w;
        }
        if (got != (ssize_t)chunk)
            return 0;
        done += chunk;
    }
    return 1;
}

/* The one assumption about CPython's layout.  In every CPython 3.x _ssl.c,
 *
 *     typedef struct { PyObject_HEAD  SSL_CTX *ctx; ... } PySSLContext;
 *
 * so the SSL_CTX pointer is the first field after the object header, whose
 * size the caller passes (object.__basicsize__: it grows in debug/trace-refs
 * and free-threaded builds).  This only *reads* a candidate: the caller
 * must validate it (readable, and state read through it agrees with state
 * read and changed through the Python API) before using it for anything. */
static SSL_CTX *mtls_ctx_candidate(uintptr_t object_address, size_t header_size)
{
    SSL_CTX *const *slot = (SSL_CTX *const *)(object_address + header_size);
    if (object_address == 0 || ((uintptr_t)slot % sizeof(void *)) != 0)
        return NULL;
    if (!mtls_readable(slot, sizeof(*slot)))
        return NULL;
    return *slot;
}

/* ---- one lock for making shared state on first use -------------------

   The hooks of a context, the CRL set of a store and the default UI are
   each looked up and, when missing, made and stored: two threads doing
   that at once (cffi calls run without the GIL) would both make one, and
   the settings written to the loser are lost.  Held only for that; never
   while calling OpenSSL code that could call back into mtls_engine. */
static CRYPTO_RWLOCK *mtls_setup_lock = NULL;
static CRYPTO_ONCE mtls_setup_once = CRYPTO_ONCE_STATIC_INIT;

static void mtls_setup_make(void)
{
    mtls_setup_lock = CRYPTO_THREAD_lock_new();
}

static int mtls_setup_begin(void)
{
    return CRYPTO_THREAD_run_once(&mtls_setup_once, mtls_setup_make) && mtls_setup_lock != NULL
           && CRYPTO_THREAD_write_lock(mtls_setup_lock);
}

static void mtls_setup_end(void)
{
    CRYPTO_THREAD_unlock(mtls_setup_lock);
}

/* ---- PKCS#11 modules ------------------------------------------------ */

/* A second function list from the module at `path`, which must already be
   loaded.  Most modules hand every caller the same one; p11-kit-client.so
   hands each caller an instance of its own (its own connection, sessions
   and login), which is how mtls_engine tells the two apart.  NULL when the
   module cannot say. */
static void *mtls_module_function_list(const char *path)
{
    void *handle = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    CK_RV (*get)(CK_FUNCTION_LIST_PTR_PTR);
    CK_FUNCTION_LIST_PTR list = NULL;
    if (handle == NULL)
        return NULL;
    *(void **)&get = dlsym(handle, "C_GetFunctionList");
    if (get == NULL || get(&list) != CKR_OK)
        list = NULL;
    dlclose(handle);
    return list;
}

/* ---- PIN prompts ----------------------------------------------------- */

/* What a backend may be told when it asks for a PIN: a PIN that
   mtls_engine's own C_Login on the same token has just accepted, or none.
   Some modules keep the login per C_GetFunctionList caller instead of per
   process (p11-kit-client.so: each caller has its own connection to the
   p11-kit server, served by its own process), so the engine or provider
   finds its own connection logged out and asks.  It gets that verified PIN
   at most once per key load, and nothing otherwise: never a prompt on a
   terminal, never a PIN of its own. */
struct mtls_pin_offer {
    const char *pin; /* NULL: nothing to offer */
    int len;
    int offered;
};

static int mtls_ui_read(UI *ui, UI_STRING *uis)
{
    struct mtls_pin_offer *offer = UI_get0_user_data(ui);
    switch (UI_get_string_type(uis)) {
    case UIT_PROMPT:
    case UIT_VERIFY:
        if (offer == NULL || offer->pin == NULL || offer->offered)
            return 0;
        offer->offered = 1;
        return UI_set_result_ex(ui, uis, offer->pin, offer->len) == 0 ? 1 : 0;
    default:
        return 1; /* information and error texts: nothing to answer */
    }
}

static UI_METHOD *mtls_pin_ui_method = NULL;
static CRYPTO_ONCE mtls_pin_ui_once = CRYPTO_ONCE_STATIC_INIT;

static void mtls_pin_ui_make(void)
{
    UI_METHOD *m = UI_create_method("mtls_engine: verified PIN only");
    if (m != NULL)
        UI_method_set_reader(m, mtls_ui_read);
    mtls_pin_ui_method = m;
}

static UI_METHOD *mtls_pin_ui(void)
{
    if (!CRYPTO_THREAD_run_once(&mtls_pin_ui_once, mtls_pin_ui_make))
        return NULL;
    return mtls_pin_ui_method;
}

/* OpenSSL's default UI, with PIN prompts taken out.  pkcs11-provider asks
   for a PIN through the default UI whenever it finds a token logged out
   (after a fork re-initialised the module, after a token came back) and
   would then try whatever was typed: behind mtls_engine's lockout guard,
   or hanging a server on a terminal nobody watches.  Every prompt that
   asks for a "PIN" fails instead, with a reason on the error queue; every
   other prompt (a PEM pass phrase, say) goes to the UI that was the
   default before, unchanged. */
static const UI_METHOD *mtls_ui_previous = NULL;

/* How deep this thread is inside the UI the guard delegates to.  A UI that
   replaced the default after mtls_engine and wraps the one it found (this
   guard) becomes mtls_ui_previous at the next backend load; it then calls
   the guard, which would call it again, until the stack overflows.  Called
   back from inside the UI it delegated to, the guard ends the chain with
   OpenSSL's own UI instead. */
static __thread int mtls_guard_depth = 0;

static const UI_METHOD *mtls_guard_next(void)
{
    const UI_METHOD *next = __atomic_load_n(&mtls_ui_previous, __ATOMIC_ACQUIRE);
    return mtls_guard_depth > 0 || next == NULL ? UI_OpenSSL() : next;
}

#define MTLS_PIN_PROMPT_REFUSED \
    "mtls_engine: a PKCS#11 backend asked for a PIN on its own (the token's login was lost); " \
    "refused: mtls_engine logs in itself, once"

static int mtls_is_pin_prompt(UI_STRING *uis)
{
    const char *text = UI_get0_output_string(uis);
    enum UI_string_types type = UI_get_string_type(uis);
    return (type == UIT_PROMPT || type == UIT_VERIFY) && text != NULL && strstr(text, "PIN") != NULL;
}

static int mtls_guard_open(UI *ui)
{
    int (*f)(UI *) = UI_method_get_opener(mtls_guard_next());
    int r;
    if (f == NULL)
        return 1;
    mtls_guard_depth++;
    r = f(ui);
    mtls_guard_depth--;
    return r;
}

static int mtls_guard_write(UI *ui, UI_STRING *uis)
{
    int (*f)(UI *, UI_STRING *) = UI_method_get_writer(mtls_guard_next());
    int r;
    if (mtls_is_pin_prompt(uis) || f == NULL)
        return 1; /* a PIN prompt: say nothing, the reader refuses */
    mtls_guard_depth++;
    r = f(ui, uis);
    mtls_guard_depth--;
    return r;
}

static int mtls_guard_flush(UI *ui)
{
    int (*f)(UI *) = UI_method_get_flusher(mtls_guard_next());
    int r;
    if (f == NULL)
        return 1;
    mtls_guard_depth++;
    r = f(ui);
    mtls_guard_depth--;
    return r;
}

static int mtls_guard_read(UI *ui, UI_STRING *uis)
{
    int (*f)(UI *, UI_STRING *) = UI_method_get_reader(mtls_guard_next());
    int r;
    if (mtls_is_pin_prompt(uis)) {
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
        ERR_raise_data(ERR_LIB_USER, ERR_R_OPERATION_FAIL, "%s", MTLS_PIN_PROMPT_REFUSED);
#else
        ERR_put_error(ERR_LIB_USER, 0, ERR_R_OPERATION_FAIL, __FILE__, __LINE__);
        ERR_add_error_data(1, MTLS_PIN_PROMPT_REFUSED);
#endif
        return 0;
    }
    if (f == NULL)
        return 1;
    mtls_guard_depth++;
    r = f(ui, uis);
    mtls_guard_depth--;
    return r;
}

static int mtls_guard_close(UI *ui)
{
    int (*f)(UI *) = UI_method_get_closer(mtls_guard_next());
    int r;
    if (f == NULL)
        return 1;
    mtls_guard_depth++;
    r = f(ui);
    mtls_guard_depth--;
    return r;
}

static UI_METHOD *mtls_guard_method = NULL;
static CRYPTO_ONCE mtls_guard_once = CRYPTO_ONCE_STATIC_INIT;

static void mtls_guard_make(void)
{
    UI_METHOD *m = UI_create_method("mtls_engine: no PKCS#11 PIN prompts");
    if (m == NULL)
        return;
    UI_method_set_opener(m, mtls_guard_open);
    UI_method_set_writer(m, mtls_guard_write);
    UI_method_set_flusher(m, mtls_guard_flush);
    UI_method_set_reader(m, mtls_guard_read);
    UI_method_set_closer(m, mtls_guard_close);
    mtls_guard_method = m;
}

/* Makes the guard OpenSSL's default UI again, if another UI took its place
   since (that one becomes the guard's "previous": it may wrap the guard,
   see mtls_guard_depth).  1 on success. */
static int mtls_guard_pin_prompts(void)
{
    const UI_METHOD *current;
    if (!CRYPTO_THREAD_run_once(&mtls_guard_once, mtls_guard_make) || mtls_guard_method == NULL)
        return 0;
    if (!mtls_setup_begin())
        return 0;
    current = UI_get_default_method();
    if (current != mtls_guard_method) {
        __atomic_store_n(&mtls_ui_previous, current != NULL ? current : UI_OpenSSL(), __ATOMIC_RELEASE);
        UI_set_default_method(mtls_guard_method);
    }
    mtls_setup_end();
    return 1;
}

/* ---- who still uses a backend instance ------------------------------

   Every reconnection loads the key through a new engine or provider
   instance; the old one may be freed only once no key it made is left
   (connections in flight hold their own reference to the key, and libp11's
   keys point into their engine's state without holding the ENGINE).  So
   each key is tagged (EVP_PKEY ex_data) with its instance's counter of
   live keys: +1 when tagged or duplicated, -1 when freed, whichever thread
   drops the last reference.  mtls_engine frees a retired instance whose
   counter is 0, at a point of its own choosing (never from a free
   callback: that may run anywhere, at exit too).  EVP_PKEY has ex_data
   from OpenSSL 3.0 on; before that keys are not counted and retired
   instances stay loaded. */

struct mtls_users {
    int count;
};

static struct mtls_users *mtls_users_new(void)
{
    return OPENSSL_zalloc(sizeof(struct mtls_users));
}

static int mtls_users_count(struct mtls_users *u)
{
    return __atomic_load_n(&u->count, __ATOMIC_ACQUIRE);
}

/* Only with a count of 0 and no way left to tag a key with it. */
static void mtls_users_free(struct mtls_users *u)
{
    OPENSSL_free(u);
}

#if OPENSSL_VERSION_MAJOR >= 3
static CRYPTO_ONCE mtls_pkey_once = CRYPTO_ONCE_STATIC_INIT;
static int mtls_pkey_idx = -1;

static void mtls_pkey_users_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl, void *argp)
{
    (void)parent, (void)ad, (void)idx, (void)argl, (void)argp;
    if (ptr != NULL)
        __atomic_sub_fetch(&((struct mtls_users *)ptr)->count, 1, __ATOMIC_ACQ_REL);
}

static int mtls_pkey_users_dup(CRYPTO_EX_DATA *to, const CRYPTO_EX_DATA *from, void **from_d, int idx, long argl,
                               void *argp)
{
    (void)to, (void)from, (void)idx, (void)argl, (void)argp;
    if (from_d != NULL && *from_d != NULL) /* the copy is a key of the same instance */
        __atomic_add_fetch(&((struct mtls_users *)*from_d)->count, 1, __ATOMIC_ACQ_REL);
    return 1;
}

static void mtls_make_pkey_index(void)
{
    mtls_pkey_idx = EVP_PKEY_get_ex_new_index(0, NULL, NULL, mtls_pkey_users_dup, mtls_pkey_users_free);
}

/* Count `pkey` as a user of `u` until it is freed.  1 when counted (or
   already counted for `u`), 0 when keys cannot be counted here. */
static int mtls_pkey_track(EVP_PKEY *pkey, struct mtls_users *u)
{
    void *had;
    if (!CRYPTO_THREAD_run_once(&mtls_pkey_once, mtls_make_pkey_index) || mtls_pkey_idx < 0)
        return 0;
    had = EVP_PKEY_get_ex_data(pkey, mtls_pkey_idx);
    if (had == u)
        return 1;
    if (had != NULL)
        return 0; /* another instance's key: never moved */
    __atomic_add_fetch(&u->count, 1, __ATOMIC_ACQ_REL);
    if (!EVP_PKEY_set_ex_data(pkey, mtls_pkey_idx, u)) {
        __atomic_sub_fetch(&u->count, 1, __ATOMIC_ACQ_REL);
        return 0;
    }
    return 1;
}
#else
static int mtls_pkey_track(EVP_PKEY *pkey, struct mtls_users *u)
{
    (void)pkey, (void)u;
    return 0;
}
#endif

/* Keep the shared object `path` loaded for the life of the process (an
   engine library: see _EngineBackend).  1 on success. */
static int mtls_dl_keep(const char *path)
{
    return dlopen(path, RTLD_NOW | RTLD_LOCAL) != NULL;
}

/* ---- engine backend ------------------------------------------------- */

#ifdef MTLS_WITH_ENGINE

/* ---- the engine's PKCS#11 module, seen through one changed entry ------

   libp11 keeps a pool of sessions per slot; pkcs11_get_session() takes one
   before every signature.  libp11 0.4.13 (Debian 13) first drops pooled
   sessions that C_GetSessionInfo calls invalid, then opens a new one, and
   when C_OpenSession fails with anything but CKR_TOKEN_NOT_RECOGNIZED (or
   CKR_SESSION_COUNT) it waits on a condition variable that only a session
   handed back to the pool signals.  With the token gone (a p11-kit server
   stopped: CKR_DEVICE_ERROR; a card pulled: CKR_TOKEN_NOT_PRESENT) no
   session ever comes back: the signing thread, and every later one, waits
   for ever inside OpenSSL (measured; fixed upstream after 0.4.13,
   OpenSC/libp11 pull request 579).  libp11 0.4.12 never re-checks pooled
   sessions, so a lost token fails its C_Sign instead and the wait is not
   reached there.

   So libp11 does not load the PKCS#11 module itself: its MODULE_PATH is
   this extension, whose C_GetFunctionList (below) loads the real module,
   asks it for its function list (as libp11 would have: p11-kit-client.so
   gives every caller its own connection) and hands libp11 a copy in which
   C_OpenSession differs: a failure other than CKR_SESSION_COUNT goes
   on OpenSSL's error queue with the module's own code ("PKCS#11
   C_OpenSession::CKR_DEVICE_ERROR") and reaches libp11 as
   CKR_TOKEN_NOT_RECOGNIZED, the one failure libp11 0.4.13 gives up on
   (later versions give up on any; 0.4.12 waits on any, but opens sessions
   only while its pool is empty, never to replace one).  C_CloseSession,
   C_Finalize and, on a shared module, C_CloseAllSessions differ too, for
   the instance's teardown (see mtls_p11_wrap); every other entry is the
   module's own: nothing is added per signature.

   Which module to load, and for which engine, are thread-locals set
   around the engine calls that may load it (ENGINE_init,
   ENGINE_load_private_key): libp11 calls C_GetFunctionList on the
   calling thread. */

#define MTLS_P11_WRAPS 64    /* engine instances alive at once (retired ones are freed) */
#define MTLS_P11_SESSIONS 64 /* sessions followed per instance of a shared module */

/* A wrapper slot: one per live engine instance, taken when its libp11
   asks for the function list, given back when the ENGINE is freed (after
   libp11 has finalised; see mtls_engine_ex_free), then reused.

   A module whose C_GetFunctionList hands every caller the same list
   (SoftHSM2, OpenSC: "shared") has one state per process, which
   mtls_engine's own connection and every other engine instance use too.
   A retired instance that libp11 finishes calls C_CloseAllSessions (in
   pkcs11_slot_unref) and C_Finalize (in PKCS11_CTX_unload): on a shared
   module that would close everyone's sessions, log the token out and
   finalise the module under the current instance.  So on a shared module
   the slot follows the sessions its instance opened and closes only
   those; C_Finalize closes them too and goes no further.  A module that
   gives each caller its own instance ("isolated": p11-kit-client.so, one
   connection each) gets both calls as they are: they end only that
   instance's connection.  Such an instance, once finalised, is kept with
   its slot and serves the next engine instance for the same module (which
   initialises it again): p11-kit-client.so frees a caller's state only
   when it is unloaded, so a new one per reconnection would add up. */
struct mtls_p11_wrap {
    CK_FUNCTION_LIST list; /* what libp11 calls */
    CK_RV (*open_session)(CK_SLOT_ID, CK_FLAGS, CK_VOID_PTR, CK_NOTIFY, CK_SESSION_HANDLE_PTR);
    CK_RV (*close_session)(CK_SESSION_HANDLE);
    CK_RV (*close_all_sessions)(CK_SLOT_ID);
    CK_RV (*finalize)(CK_VOID_PTR);
    int used;
    int shared;
    int finalized; /* an isolated instance its engine finalised */
    int spare;     /* not used, and finalised: serves the next instance for `target` */
    char *target;  /* module path of an isolated instance */
    int nsessions;
    struct {
        CK_SLOT_ID slot;
        CK_SESSION_HANDLE handle;
        pid_t pid; /* a forked child re-initialises the module: its parent's handles are not its own */
    } sessions[MTLS_P11_SESSIONS];
};
static struct mtls_p11_wrap mtls_p11_wraps[MTLS_P11_WRAPS];
static pthread_mutex_t mtls_p11_lock = PTHREAD_MUTEX_INITIALIZER; /* slots and their session lists */
static int mtls_p11_in_use = 0;    /* slots taken now */
static int mtls_p11_handed = 0;    /* changed lists handed out so far */
static int mtls_p11_unwrapped = 0; /* engine instances that got the module's own list (all slots taken) */
static int mtls_p11_recycled = 0;  /* engine instances that got a finalised isolated instance again */
static int mtls_engines_alive = 0; /* engine instances mtls_engine opened and OpenSSL has not freed */
static __thread const char *mtls_p11_target = NULL;
static __thread ENGINE *mtls_p11_engine = NULL;
static __thread int mtls_p11_isolated = 0;

/* ENGINE ex_data: 0 not ours; 1 ours, no slot; k + 2 ours, slot k. */
static CRYPTO_ONCE mtls_engine_once = CRYPTO_ONCE_STATIC_INIT;
static int mtls_engine_idx = -1;

/* OpenSSL error library "PKCS#11 C_OpenSession", its reasons the CKR_
   names (the reason code is the CK_RV). */
static int mtls_p11_err_lib = 0;
static ERR_STRING_DATA mtls_p11_err_lib_name[] = {
    {0, "PKCS#11 C_OpenSession"}, /* its code is set once the library number is known */
    {0, NULL},
};
static ERR_STRING_DATA mtls_p11_err_strings[] = {
    {ERR_PACK(0, 0, CKR_GENERAL_ERROR), "CKR_GENERAL_ERROR"},
    {ERR_PACK(0, 0, CKR_FUNCTION_FAILED), "CKR_FUNCTION_FAILED"},
    {ERR_PACK(0, 0, CKR_HOST_MEMORY), "CKR_HOST_MEMORY"},
    {ERR_PACK(0, 0, CKR_SLOT_ID_INVALID), "CKR_SLOT_ID_INVALID"},
    {ERR_PACK(0, 0, CKR_DEVICE_ERROR), "CKR_DEVICE_ERROR"},
    {ERR_PACK(0, 0, CKR_DEVICE_MEMORY), "CKR_DEVICE_MEMORY"},
    {ERR_PACK(0, 0, CKR_DEVICE_REMOVED), "CKR_DEVICE_REMOVED"},
    {ERR_PACK(0, 0, CKR_SESSION_PARALLEL_NOT_SUPPORTED), "CKR_SESSION_PARALLEL_NOT_SUPPORTED"},
    {ERR_PACK(0, 0, CKR_SESSION_READ_WRITE_SO_EXISTS), "CKR_SESSION_READ_WRITE_SO_EXISTS"},
    {ERR_PACK(0, 0, CKR_TOKEN_NOT_PRESENT), "CKR_TOKEN_NOT_PRESENT"},
    {ERR_PACK(0, 0, CKR_TOKEN_NOT_RECOGNIZED), "CKR_TOKEN_NOT_RECOGNIZED"},
    {ERR_PACK(0, 0, CKR_TOKEN_WRITE_PROTECTED), "CKR_TOKEN_WRITE_PROTECTED"},
    {ERR_PACK(0, 0, CKR_CRYPTOKI_NOT_INITIALIZED), "CKR_CRYPTOKI_NOT_INITIALIZED"},
    {ERR_PACK(0, 0, CKR_ARGUMENTS_BAD), "CKR_ARGUMENTS_BAD"},
    {0, NULL},
};
#define MTLS_P11_VENDOR_REASON 0xFFFF /* a CK_RV too large for a reason code */

static void mtls_p11_raise(CK_RV rv)
{
    int reason = rv < MTLS_P11_VENDOR_REASON ? (int)rv : MTLS_P11_VENDOR_REASON;
    if (__atomic_load_n(&mtls_p11_err_lib, __ATOMIC_ACQUIRE) == 0)
        return; /* set before any wrapper is handed out */
#if OPENSSL_VERSION_MAJOR >= 3
    ERR_raise(mtls_p11_err_lib, reason);
#else
    ERR_put_error(mtls_p11_err_lib, 0, reason, __FILE__, __LINE__);
#endif
}

/* Forget the sessions of slot `w` on `slot` (all of them when `all`),
   copying the handles this process opened to `out`; returns how many.
   Lock held. */
static int mtls_p11_take_sessions(struct mtls_p11_wrap *w, CK_SLOT_ID slot, int all, CK_SESSION_HANDLE *out)
{
    int i, kept = 0, taken = 0;
    pid_t pid = getpid();
    for (i = 0; i < w->nsessions; i++) {
        if (all || w->sessions[i].slot == slot) {
            if (w->sessions[i].pid == pid)
                out[taken++] = w->sessions[i].handle;
        } else {
            w->sessions[kept++] = w->sessions[i];
        }
    }
    w->nsessions = kept;
    return taken;
}

static void mtls_p11_close_taken(struct mtls_p11_wrap *w, CK_SLOT_ID slot, int all)
{
    CK_SESSION_HANDLE handles[MTLS_P11_SESSIONS];
    int i, n;
    pthread_mutex_lock(&mtls_p11_lock);
    n = mtls_p11_take_sessions(w, slot, all, handles);
    pthread_mutex_unlock(&mtls_p11_lock);
    for (i = 0; i < n; i++) /* outside the lock: these are calls into the module */
        w->close_session(handles[i]);
}

static CK_RV mtls_p11_open_session(int i, CK_SLOT_ID slot, CK_FLAGS flags, CK_VOID_PTR app, CK_NOTIFY notify,
                                   CK_SESSION_HANDLE_PTR session)
{
    struct mtls_p11_wrap *w = &mtls_p11_wraps[i];
    CK_RV rv = w->open_session(slot, flags, app, notify, session);
    if (rv == CKR_OK) {
        if (w->shared) {
            pthread_mutex_lock(&mtls_p11_lock);
            if (w->nsessions < MTLS_P11_SESSIONS) { /* beyond: left open at teardown, never someone else's */
                w->sessions[w->nsessions].slot = slot;
                w->sessions[w->nsessions].handle = *session;
                w->sessions[w->nsessions].pid = getpid();
                w->nsessions++;
            }
            pthread_mutex_unlock(&mtls_p11_lock);
        }
        return rv;
    }
    if (rv == CKR_SESSION_COUNT)
        return rv;
    mtls_p11_raise(rv);
    return CKR_TOKEN_NOT_RECOGNIZED;
}

static CK_RV mtls_p11_close_session(int i, CK_SESSION_HANDLE session)
{
    struct mtls_p11_wrap *w = &mtls_p11_wraps[i];
    int k;
    if (w->shared) {
        pthread_mutex_lock(&mtls_p11_lock);
        for (k = 0; k < w->nsessions; k++) {
            if (w->sessions[k].handle == session) {
                w->sessions[k] = w->sessions[--w->nsessions];
                break;
            }
        }
        pthread_mutex_unlock(&mtls_p11_lock);
    }
    return w->close_session(session);
}

/* Shared module only (an isolated one gets the module's own entry). */
static CK_RV mtls_p11_close_all_sessions(int i, CK_SLOT_ID slot)
{
    mtls_p11_close_taken(&mtls_p11_wraps[i], slot, 0);
    return CKR_OK;
}

/* A shared module stays initialised for its other users; an isolated
   instance is finalised (and then kept for reuse, see mtls_p11_release). */
static CK_RV mtls_p11_finalize(int i, CK_VOID_PTR reserved)
{
    struct mtls_p11_wrap *w = &mtls_p11_wraps[i];
    CK_RV rv;
    if (w->shared) {
        mtls_p11_close_taken(w, 0, 1);
        return CKR_OK;
    }
    rv = w->finalize(reserved);
    if (rv == CKR_OK) {
        pthread_mutex_lock(&mtls_p11_lock);
        w->finalized = 1;
        pthread_mutex_unlock(&mtls_p11_lock);
    }
    return rv;
}

#define MTLS_P11_FNS(r, c)                                                                                      \
    static CK_RV mtls_p11_open_##r##_##c(CK_SLOT_ID s, CK_FLAGS f, CK_VOID_PTR a, CK_NOTIFY n,                  \
                                         CK_SESSION_HANDLE_PTR h)                                              \
    {                                                                                                           \
        return mtls_p11_open_session((r) * 8 + (c), s, f, a, n, h);                                             \
    }                                                                                                           \
    static CK_RV mtls_p11_close_##r##_##c(CK_SESSION_HANDLE h)                                                 \
    {                                                                                                           \
        return mtls_p11_close_session((r) * 8 + (c), h);                                                        \
    }                                                                                                           \
    static CK_RV mtls_p11_close_all_##r##_##c(CK_SLOT_ID s)                                                    \
    {                                                                                                           \
        return mtls_p11_close_all_sessions((r) * 8 + (c), s);                                                   \
    }                                                                                                           \
    static CK_RV mtls_p11_finalize_##r##_##c(CK_VOID_PTR p)                                                    \
    {                                                                                                           \
        return mtls_p11_finalize((r) * 8 + (c), p);                                                             \
    }
#define MTLS_P11_FNS8(r)                                                                                        \
    MTLS_P11_FNS(r, 0) MTLS_P11_FNS(r, 1) MTLS_P11_FNS(r, 2) MTLS_P11_FNS(r, 3)                                 \
    MTLS_P11_FNS(r, 4) MTLS_P11_FNS(r, 5) MTLS_P11_FNS(r, 6) MTLS_P11_FNS(r, 7)
MTLS_P11_FNS8(0) MTLS_P11_FNS8(1) MTLS_P11_FNS8(2) MTLS_P11_FNS8(3)
MTLS_P11_FNS8(4) MTLS_P11_FNS8(5) MTLS_P11_FNS8(6) MTLS_P11_FNS8(7)
#define MTLS_P11_ROW(f, r)                                                                                      \
    mtls_p11_##f##_##r##_0, mtls_p11_##f##_##r##_1, mtls_p11_##f##_##r##_2, mtls_p11_##f##_##r##_3,             \
    mtls_p11_##f##_##r##_4, mtls_p11_##f##_##r##_5, mtls_p11_##f##_##r##_6, mtls_p11_##f##_##r##_7
#define MTLS_P11_TABLE(f)                                                                                       \
    {MTLS_P11_ROW(f, 0), MTLS_P11_ROW(f, 1), MTLS_P11_ROW(f, 2), MTLS_P11_ROW(f, 3),                            \
     MTLS_P11_ROW(f, 4), MTLS_P11_ROW(f, 5), MTLS_P11_ROW(f, 6), MTLS_P11_ROW(f, 7)}
/* slot i's entries are mtls_p11_opens[i], ... */
static CK_RV (*const mtls_p11_opens[MTLS_P11_WRAPS])(CK_SLOT_ID, CK_FLAGS, CK_VOID_PTR, CK_NOTIFY,
                                                      CK_SESSION_HANDLE_PTR) = MTLS_P11_TABLE(open);
static CK_RV (*const mtls_p11_closes[MTLS_P11_WRAPS])(CK_SESSION_HANDLE) = MTLS_P11_TABLE(close);
static CK_RV (*const mtls_p11_close_alls[MTLS_P11_WRAPS])(CK_SLOT_ID) = MTLS_P11_TABLE(close_all);
static CK_RV (*const mtls_p11_finalizes[MTLS_P11_WRAPS])(CK_VOID_PTR) = MTLS_P11_TABLE(finalize);

/* Give slot i back (its engine is gone): nothing calls its entries now. */
static void mtls_p11_release(int i)
{
    if (i < 0 || i >= MTLS_P11_WRAPS)
        return;
    pthread_mutex_lock(&mtls_p11_lock);
    if (mtls_p11_wraps[i].used) {
        struct mtls_p11_wrap *w = &mtls_p11_wraps[i];
        w->used = 0;
        w->nsessions = 0;
        w->spare = !w->shared && w->finalized && w->target != NULL;
        mtls_p11_in_use--;
    }
    pthread_mutex_unlock(&mtls_p11_lock);
}

/* Called for every ENGINE that OpenSSL frees, after its destroy function
   (libp11 finished with its module before that). */
static void mtls_engine_ex_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl, void *argp)
{
    intptr_t mark = (intptr_t)ptr;
    (void)parent, (void)ad, (void)idx, (void)argl, (void)argp;
    if (mark == 0)
        return;
    if (mark >= 2)
        mtls_p11_release((int)(mark - 2));
    __atomic_sub_fetch(&mtls_engines_alive, 1, __ATOMIC_ACQ_REL);
}

static void mtls_p11_lock_all(void)
{
    pthread_mutex_lock(&mtls_p11_lock);
}

static void mtls_p11_unlock_all(void)
{
    pthread_mutex_unlock(&mtls_p11_lock);
}

static void mtls_make_engine_index(void)
{
    mtls_engine_idx = ENGINE_get_ex_new_index(0, NULL, NULL, NULL, mtls_engine_ex_free);
    /* A fork while another thread holds the slot lock must not leave the
       child's copy locked. */
    pthread_atfork(mtls_p11_lock_all, mtls_p11_unlock_all, mtls_p11_unlock_all);
}

/* Called by libp11 (dlsym on this extension), on the thread of an engine
   call that set mtls_p11_target and mtls_p11_engine.  With every slot
   taken (64 engine instances alive) the module's own list is handed out,
   and counted (mtls_p11_slots): libp11 0.4.13 would then wait for ever
   on a lost token. */
/* Slot i for an engine instance (lock held). */
static void mtls_p11_take(int i)
{
    struct mtls_p11_wrap *w = &mtls_p11_wraps[i];
    w->used = 1;
    w->spare = 0;
    w->finalized = 0;
    w->nsessions = 0;
    mtls_p11_in_use++;
    mtls_p11_handed++;
}

__attribute__((visibility("default"))) CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR out)
{
    const char *target = mtls_p11_target;
    ENGINE *e = mtls_p11_engine;
    int isolated = mtls_p11_isolated;
    void *handle;
    CK_RV (*get)(CK_FUNCTION_LIST_PTR_PTR);
    CK_FUNCTION_LIST_PTR real = NULL;
    struct mtls_p11_wrap *w;
    intptr_t mark;
    char *copy = NULL;
    CK_RV rv;
    int i;
    if (out == NULL)
        return CKR_ARGUMENTS_BAD;
    if (target == NULL || e == NULL || mtls_engine_idx < 0)
        return CKR_GENERAL_ERROR; /* not called for an engine mtls_engine opened */
    if (__atomic_load_n(&mtls_p11_err_lib, __ATOMIC_ACQUIRE) == 0) {
        int lib = ERR_get_next_error_library();
        mtls_p11_err_lib_name[0].error = ERR_PACK(lib, 0, 0);
        ERR_load_strings(lib, mtls_p11_err_lib_name);
        ERR_load_strings(lib, mtls_p11_err_strings);
        __atomic_store_n(&mtls_p11_err_lib, lib, __ATOMIC_RELEASE);
    }
    /* A second call for the same engine: libp11 unloaded the list it got
       first (its module failed to initialise). */
    mark = (intptr_t)ENGINE_get_ex_data(e, mtls_engine_idx);
    if (mark >= 2) {
        mtls_p11_release((int)(mark - 2));
        ENGINE_set_ex_data(e, mtls_engine_idx, (void *)(intptr_t)1);
    }
    pthread_mutex_lock(&mtls_p11_lock);
    for (i = 0; isolated && i < MTLS_P11_WRAPS; i++) {
        w = &mtls_p11_wraps[i];
        if (!w->used && w->spare && strcmp(w->target, target) == 0) {
            mtls_p11_take(i);
            mtls_p11_recycled++;
            pthread_mutex_unlock(&mtls_p11_lock);
            goto handed;
        }
    }
    pthread_mutex_unlock(&mtls_p11_lock);
    handle = dlopen(target, RTLD_NOW | RTLD_LOCAL); /* kept open: libp11 holds its functions */
    if (handle == NULL)
        return CKR_GENERAL_ERROR;
    *(void **)&get = dlsym(handle, "C_GetFunctionList");
    if (get == NULL)
        return CKR_GENERAL_ERROR;
    rv = get(&real);
    if (rv != CKR_OK || real == NULL)
        return rv != CKR_OK ? rv : CKR_GENERAL_ERROR;
    if (real->C_OpenSession == NULL || real->C_CloseSession == NULL || real->C_CloseAllSessions == NULL
        || real->C_Finalize == NULL) {
        *out = real;
        return CKR_OK;
    }
    if (isolated && (copy = OPENSSL_strdup(target)) == NULL)
        return CKR_HOST_MEMORY;
    pthread_mutex_lock(&mtls_p11_lock);
    for (i = 0; i < MTLS_P11_WRAPS && (mtls_p11_wraps[i].used || mtls_p11_wraps[i].spare); i++)
        ;
    if (i == MTLS_P11_WRAPS) { /* else a spare instance of another module gives way */
        for (i = 0; i < MTLS_P11_WRAPS && mtls_p11_wraps[i].used; i++)
            ;
    }
    if (i == MTLS_P11_WRAPS) {
        mtls_p11_unwrapped++;
        pthread_mutex_unlock(&mtls_p11_lock);
        OPENSSL_free(copy);
        *out = real;
        return CKR_OK;
    }
    w = &mtls_p11_wraps[i];
    mtls_p11_take(i);
    OPENSSL_free(w->target);
    w->target = copy;
    w->shared = !isolated;
    w->open_session = real->C_OpenSession;
    w->close_session = real->C_CloseSession;
    w->close_all_sessions = real->C_CloseAllSessions;
    w->finalize = real->C_Finalize;
    w->list = *real;
    if (w->list.version.major > 2) { /* only the 2.x entries were copied */
        w->list.version.major = 2;
        w->list.version.minor = 40;
    }
    w->list.C_OpenSession = mtls_p11_opens[i];
    w->list.C_CloseSession = mtls_p11_closes[i];
    w->list.C_Finalize = mtls_p11_finalizes[i];
    if (w->shared)
        w->list.C_CloseAllSessions = mtls_p11_close_alls[i];
    pthread_mutex_unlock(&mtls_p11_lock);
handed:
    if (!ENGINE_set_ex_data(e, mtls_engine_idx, (void *)(intptr_t)(i + 2))) {
        mtls_p11_release(i);
        return CKR_HOST_MEMORY;
    }
    *out = &mtls_p11_wraps[i].list;
    return CKR_OK;
}

/* libp11 0.4.20 and later also look up C_GetInterface in the module they
   load (for PKCS#11 3.2's C_DecapsulateKey only) and keep what it returns
   for the engine's lifetime, never finalised.  The lookup goes through this
   extension's handle, so without a C_GetInterface here it finds
   libp11-kit.so.0's (a dependency of this extension): p11-kit's proxy
   module, which loads every module p11-kit is configured with and makes a
   new proxy state per call, about 48 KB per engine instance that only
   process exit frees (measured with libp11 0.4.21 and p11-kit 0.26).  The
   engine signs through the list C_GetFunctionList hands out; it is given
   no 3.x interface.  Defined under another C name: some pkcs11.h headers
   declare C_GetInterface with their CK_INTERFACE type, others not at all. */
__attribute__((visibility("default"))) CK_RV mtls_p11_get_interface(CK_UTF8CHAR_PTR name, CK_VERSION_PTR version,
                                                                    void **out, CK_FLAGS flags) __asm__("C_GetInterface");
CK_RV mtls_p11_get_interface(CK_UTF8CHAR_PTR name, CK_VERSION_PTR version, void **out, CK_FLAGS flags)
{
    (void)name, (void)version, (void)flags;
    if (out != NULL)
        *out = NULL;
    return CKR_FUNCTION_NOT_SUPPORTED;
}

/* The same for the list of interfaces: none but the 2.x function list. */
__attribute__((visibility("default"))) CK_RV mtls_p11_get_interface_list(void *list, CK_ULONG_PTR count)
    __asm__("C_GetInterfaceList");
CK_RV mtls_p11_get_interface_list(void *list, CK_ULONG_PTR count)
{
    (void)list;
    if (count != NULL)
        *count = 0;
    return CKR_FUNCTION_NOT_SUPPORTED;
}

/* Wrapper slots: taken now, changed lists handed out so far, module's own
   lists handed out because every slot was taken, and isolated instances
   handed out again (for tests).  Returns the engine instances alive. */
static int mtls_p11_slots(int *in_use, int *handed, int *unwrapped, int *recycled)
{
    pthread_mutex_lock(&mtls_p11_lock);
    *in_use = mtls_p11_in_use;
    *handed = mtls_p11_handed;
    *unwrapped = mtls_p11_unwrapped;
    *recycled = mtls_p11_recycled;
    pthread_mutex_unlock(&mtls_p11_lock);
    return __atomic_load_n(&mtls_engines_alive, __ATOMIC_ACQUIRE);
}

/* Load libp11's engine from `so_path` as a private instance (not added to
   OpenSSL's global engine list, so it cannot clash with an engine that an
   openssl.cnf loaded) and point it at the PKCS#11 module `module_path`,
   through `self_path` (this extension, see above); `isolated`: the module
   gives each caller an instance of its own (see mtls_p11_wrap).  Returns a
   functional reference, or NULL with the reason on the error queue. */
static ENGINE *mtls_engine_open(const char *so_path, const char *self_path, const char *module_path, int isolated)
{
    int ok;
    ENGINE *e;
    if (!CRYPTO_THREAD_run_once(&mtls_engine_once, mtls_make_engine_index) || mtls_engine_idx < 0)
        return NULL;
    e = ENGINE_by_id("dynamic");
    if (e == NULL)
        return NULL;
    if (!ENGINE_set_ex_data(e, mtls_engine_idx, (void *)(intptr_t)1)) {
        ENGINE_free(e);
        return NULL;
    }
    __atomic_add_fetch(&mtls_engines_alive, 1, __ATOMIC_ACQ_REL);
    mtls_p11_target = module_path;
    mtls_p11_engine = e;
    mtls_p11_isolated = isolated;
    ok = ENGINE_ctrl_cmd_string(e, "SO_PATH", so_path, 0)
        && ENGINE_ctrl_cmd_string(e, "ID", "pkcs11", 0)
        && ENGINE_ctrl_cmd_string(e, "LIST_ADD", "0", 0)
        && ENGINE_ctrl_cmd_string(e, "LOAD", NULL, 0)
        && ENGINE_ctrl_cmd_string(e, "MODULE_PATH", self_path, 0)
        && ENGINE_init(e);
    mtls_p11_target = NULL;
    mtls_p11_engine = NULL;
    if (!ok) {
        ENGINE_free(e);
        return NULL;
    }
    ENGINE_free(e); /* drop the structural reference; keep the functional one */
    return e;
}

/* libp11 keeps a reference to every EVP_PKEY it hands out (its key
   object's cache, dropped only when the engine finishes), and that key
   holds a functional reference to the engine (EVP_PKEY_set1_engine, for
   libp11's EVP_PKEY_METHODs): the engine could never finish, and the key's
   last reference would never come.  So mtls_engine hands out a key of its
   own around the same RSA / EC_KEY, with the same engine for its methods
   (exactly what ENGINE_load_private_key built), and takes the engine off
   libp11's cached key.  When the last reference to the key handed out
   goes, nobody uses the engine but mtls_engine.  Another key type is
   handed out as libp11 made it (and its engine is never freed). */
static EVP_PKEY *mtls_engine_own_key(ENGINE *e, EVP_PKEY *made)
{
    EVP_PKEY *own;
    int ok = 0;
    if (made == NULL)
        return NULL;
    own = EVP_PKEY_new();
    if (own == NULL)
        return made;
    switch (EVP_PKEY_base_id(made)) {
    case EVP_PKEY_RSA:
        ok = EVP_PKEY_set1_RSA(own, (RSA *)EVP_PKEY_get0_RSA(made));
        break;
    case EVP_PKEY_EC:
        ok = EVP_PKEY_set1_EC_KEY(own, (EC_KEY *)EVP_PKEY_get0_EC_KEY(made));
        break;
    default:
        break;
    }
    if (!ok || !EVP_PKEY_set1_engine(own, e)) {
        EVP_PKEY_free(own);
        ERR_clear_error();
        return made;
    }
    EVP_PKEY_set1_engine(made, NULL);
    EVP_PKEY_free(made); /* libp11's cache keeps its own reference */
    return own;
}

static EVP_PKEY *mtls_engine_load_private_key(ENGINE *e, const char *module_path, int isolated, const char *uri,
                                              const char *pin, int pin_len)
{
    struct mtls_pin_offer offer = {pin, pin_len, 0};
    EVP_PKEY *pkey;
    mtls_p11_target = module_path; /* libp11 loads its module at its first key */
    mtls_p11_engine = e;
    mtls_p11_isolated = isolated;
    pkey = ENGINE_load_private_key(e, uri, mtls_pin_ui(), &offer);
    mtls_p11_target = NULL;
    mtls_p11_engine = NULL;
    return mtls_engine_own_key(e, pkey);
}

/* Free an engine instance mtls_engine opened, once no key it made is left
   (mtls_users): libp11 closes its sessions and finalises its module (see
   mtls_p11_wrap), OpenSSL frees the ENGINE, and its wrapper slot is free
   again.  Its engine library stays loaded for the next instance: libp11
   keeps its EVP_PKEY_METHODs in statics of the library, which OpenSSL
   would free with the ENGINE (and free again with the library's next
   ENGINE), so they are detached from this one first. */
static void mtls_engine_close(ENGINE *e)
{
    if (e == NULL)
        return;
    ENGINE_set_pkey_meths(e, NULL);
    ENGINE_finish(e);
}

/* 1 when an engine with this id is already in OpenSSL's engine list (put
   there by an openssl.cnf).  Walks the list; never loads anything. */
static int mtls_engine_listed(const char *id)
{
    ENGINE *e = ENGINE_get_first();
    while (e != NULL) {
        const char *eid = ENGINE_get_id(e);
        if (eid != NULL && strcmp(eid, id) == 0) {
            ENGINE_free(e);
            return 1;
        }
        e = ENGINE_get_next(e); /* frees the previous reference */
    }
    return 0;
}

#else

static ENGINE *mtls_engine_open(const char *so_path, const char *self_path, const char *module_path, int isolated)
{
    (void)so_path, (void)self_path, (void)module_path, (void)isolated;
    return NULL;
}

static int mtls_p11_slots(int *in_use, int *handed, int *unwrapped, int *recycled)
{
    *in_use = *handed = *unwrapped = *recycled = 0;
    return 0;
}

static EVP_PKEY *mtls_engine_load_private_key(ENGINE *e, const char *module_path, int isolated, const char *uri,
                                              const char *pin, int pin_len)
{
    (void)e, (void)module_path, (void)isolated, (void)uri, (void)pin, (void)pin_len;
    return NULL;
}

static void mtls_engine_close(ENGINE *e)
{
    (void)e;
}

static int mtls_engine_listed(const char *id)
{
    (void)id;
    return 0;
}

#endif

/* ---- provider backend ----------------------------------------------- */

#if OPENSSL_VERSION_MAJOR >= 3

/* Apply an OpenSSL configuration text (mtls_engine passes only a providers
   section) to a library context: NULL is the default one, where CPython's
   SSL_CTXs live.  Returns 1 on success; on a syntax error *error_line is
   set. */
static int mtls_apply_config(OSSL_LIB_CTX *libctx, const char *text, long *error_line)
{
    BIO *bio = BIO_new_mem_buf(text, -1);
    CONF *conf = NCONF_new_ex(libctx, NULL);
    int ok = 0;
    *error_line = 0;
    if (bio != NULL && conf != NULL && NCONF_load_bio(conf, bio, error_line) > 0)
        ok = CONF_modules_load(conf, NULL, 0) > 0;
    NCONF_free(conf);
    BIO_free(bio);
    return ok;
}

/* Load every private key the URI names through OSSL_STORE (the provider's
   "pkcs11" scheme).  Returns the key when exactly one was found; *count
   says how many there were.  Never prompts for a PIN: the provider may
   only be offered `pin`, verified by mtls_engine's own login (see
   mtls_pin_offer).  `libctx`: where the provider instance lives (NULL:
   the default library context).  `first`: take the first key even when
   there are more (they can only be session copies of it; see
   _ProviderBackend). */
static EVP_PKEY *mtls_store_load_private_key(OSSL_LIB_CTX *libctx, const char *uri, const char *pin, int pin_len,
                                             int first, int *count)
{
    struct mtls_pin_offer offer = {pin, pin_len, 0};
    OSSL_STORE_CTX *store;
    EVP_PKEY *found = NULL;
    int rounds = 0;
    *count = 0;
    store = OSSL_STORE_open_ex(uri, libctx, NULL, mtls_pin_ui(), &offer, NULL, NULL, NULL);
    if (store == NULL)
        return NULL;
    OSSL_STORE_expect(store, OSSL_STORE_INFO_PKEY);
    /* The bound keeps a store that neither ends nor fails from hanging us. */
    while (!OSSL_STORE_eof(store) && rounds++ < 10000) {
        OSSL_STORE_INFO *info = OSSL_STORE_load(store);
        if (info == NULL) {
            if (OSSL_STORE_error(store))
                break;
            continue;
        }
        if (OSSL_STORE_INFO_get_type(info) == OSSL_STORE_INFO_PKEY) {
            EVP_PKEY *pkey = OSSL_STORE_INFO_get1_PKEY(info);
            if (pkey != NULL) {
                (*count)++;
                if (found == NULL)
                    found = pkey;
                else
                    EVP_PKEY_free(pkey);
            }
        }
        OSSL_STORE_INFO_free(info);
    }
    OSSL_STORE_close(store);
    if (*count > 1 && !first) {
        EVP_PKEY_free(found);
        return NULL;
    }
    return found;
}

/* 1 when a provider with this name has been loaded and activated. */
static int mtls_provider_loaded(OSSL_LIB_CTX *libctx, const char *name)
{
    return OSSL_PROVIDER_available(libctx, name);
}

/* A library context of its own, for each pkcs11-provider instance (see
   _ProviderBackend). */
static OSSL_LIB_CTX *mtls_libctx_new(void)
{
    return OSSL_LIB_CTX_new();
}


/* Opens and closes a store on the "pkcs11:" scheme: any call into
   pkcs11-provider runs its pending work first, and in a forked child that
   is re-initialising the PKCS#11 module (C_Finalize, C_Initialize), which
   logs every session out.  Doing it here, before mtls_engine logs in
   again, keeps that from happening later under a handshake.  Touches no
   key and needs no login.  1 when the store opened. */
static int mtls_provider_wake(OSSL_LIB_CTX *libctx)
{
    OSSL_STORE_CTX *store = OSSL_STORE_open_ex("pkcs11:", libctx, NULL, mtls_pin_ui(), NULL, NULL, NULL, NULL);
    if (store == NULL)
        return 0;
    OSSL_STORE_close(store);
    return 1;
}

static void mtls_copy_param(const char *value, char *out, size_t size)
{
    if (size == 0)
        return;
    out[0] = '\0';
    if (value != NULL) {
        strncpy(out, value, size - 1);
        out[size - 1] = '\0';
    }
}

/* What the provider in the shared object `path` says about itself
   (OSSL_PROVIDER_get_params "name", "version", "buildinfo"), asked in a
   library context of its own that is freed again, so the default one
   (CPython's) is untouched.  Nothing configures it there: pkcs11-provider
   (and libp11's provider) load no PKCS#11 module until they are used.
   Returns 1 when it loaded (a value it does not give stays ""), 0 when it
   did not (OpenSSL's errors are in the queue). */
static int mtls_provider_describe(const char *path, char *name, size_t name_size, char *version,
                                  size_t version_size, char *buildinfo, size_t buildinfo_size)
{
    OSSL_LIB_CTX *libctx = OSSL_LIB_CTX_new();
    OSSL_PROVIDER *prov;
    const char *values[3] = {NULL, NULL, NULL};
    OSSL_PARAM params[4];
    mtls_copy_param(NULL, name, name_size);
    mtls_copy_param(NULL, version, version_size);
    mtls_copy_param(NULL, buildinfo, buildinfo_size);
    if (libctx == NULL)
        return 0;
    prov = OSSL_PROVIDER_load(libctx, path);
    if (prov == NULL) {
        OSSL_LIB_CTX_free(libctx);
        return 0;
    }
    params[0] = OSSL_PARAM_construct_utf8_ptr(OSSL_PROV_PARAM_NAME, (char **)&values[0], 0);
    params[1] = OSSL_PARAM_construct_utf8_ptr(OSSL_PROV_PARAM_VERSION, (char **)&values[1], 0);
    params[2] = OSSL_PARAM_construct_utf8_ptr(OSSL_PROV_PARAM_BUILDINFO, (char **)&values[2], 0);
    params[3] = OSSL_PARAM_construct_end();
    if (OSSL_PROVIDER_get_params(prov, params)) {
        /* Copied before unloading: the strings belong to the provider. */
        if (OSSL_PARAM_modified(&params[0]))
            mtls_copy_param(values[0], name, name_size);
        if (OSSL_PARAM_modified(&params[1]))
            mtls_copy_param(values[1], version, version_size);
        if (OSSL_PARAM_modified(&params[2]))
            mtls_copy_param(values[2], buildinfo, buildinfo_size);
    }
    ERR_clear_error(); /* a provider without get_params is no failure */
    OSSL_PROVIDER_unload(prov);
    OSSL_LIB_CTX_free(libctx);
    return 1;
}

#else

typedef struct ossl_lib_ctx_st OSSL_LIB_CTX;

static int mtls_apply_config(OSSL_LIB_CTX *libctx, const char *text, long *error_line)
{
    (void)libctx;
    (void)text;
    *error_line = 0;
    return 0;
}

static EVP_PKEY *mtls_store_load_private_key(OSSL_LIB_CTX *libctx, const char *uri, const char *pin, int pin_len,
                                             int first, int *count)
{
    (void)libctx;
    (void)first;
    (void)uri;
    (void)pin;
    (void)pin_len;
    *count = 0;
    return NULL;
}

static int mtls_provider_loaded(OSSL_LIB_CTX *libctx, const char *name)
{
    (void)libctx;
    (void)name;
    return 0;
}

static int mtls_provider_wake(OSSL_LIB_CTX *libctx)
{
    (void)libctx;
    return 0;
}

static int mtls_provider_describe(const char *path, char *name, size_t name_size, char *version,
                                  size_t version_size, char *buildinfo, size_t buildinfo_size)
{
    (void)path, (void)name, (void)name_size, (void)version, (void)version_size;
    (void)buildinfo, (void)buildinfo_size;
    return 0;
}

static OSSL_LIB_CTX *mtls_libctx_new(void)
{
    return NULL;
}

#endif

/* The OpenSSL whose headers this extension was compiled with (the one it
   runs with is OpenSSL_version_num()). */
static unsigned long mtls_built_openssl_number(void)
{
    return (unsigned long)OPENSSL_VERSION_NUMBER;
}

/* ---- a test signature through the card key (for `check`) -------------- */

/* Sign `tbs` with `pkey` the way a TLS CertificateVerify would: digest
   `mdname` and, for RSA, PSS (salt = digest length) when `pss`, else
   PKCS#1 v1.5.  The signature is made wherever the key lives: by the
   engine or provider, on the card.  1 on success, with *siglen set. */
static int mtls_test_sign(EVP_PKEY *pkey, const char *mdname, int pss, const unsigned char *tbs,
                          size_t tbslen, unsigned char *sig, size_t *siglen)
{
    const EVP_MD *md = EVP_get_digestbyname(mdname);
    EVP_MD_CTX *mctx = EVP_MD_CTX_new();
    EVP_PKEY_CTX *pctx = NULL;
    int ok = 0;
    if (md == NULL || mctx == NULL)
        goto done;
    if (EVP_DigestSignInit(mctx, &pctx, md, NULL, pkey) != 1)
        goto done;
    if (EVP_PKEY_get_id(pkey) == EVP_PKEY_RSA) {
        if (EVP_PKEY_CTX_set_rsa_padding(pctx, pss ? RSA_PKCS1_PSS_PADDING : RSA_PKCS1_PADDING) <= 0)
            goto done;
        if (pss && EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, RSA_PSS_SALTLEN_DIGEST) <= 0)
            goto done;
    }
    ok = EVP_DigestSign(mctx, sig, siglen, tbs, tbslen) == 1;
done:
    EVP_MD_CTX_free(mctx);
    return ok;
}

/* ---- peer checks: why a client was refused, access rules, CRLs -------- */

/* What the verify callback learnt about one connection's peer: the first
   verification error (code, depth, that certificate) and the leaf.  Kept in
   the SSL's ex_data, read by the info callback when the server sends its
   fatal alert, and by Python (mtls_py_rejected). */
struct mtls_peer_record {
    int verify_error;
    int depth;
    int rule_done;
    int alerted;
    int handshake_done;
    char subject[512];
    char issuer[512];
    char serial[96];
    char leaf_subject[512];
    char leaf_issuer[512];
    char leaf_serial[96];
};

/* A card key as its contexts' callbacks see it: whether its last
   signature failed (the token was lost) and, after mtls_engine reached the
   token again, the key to sign with from then on.  One per card key loaded,
   shared by every context it was attached to; never freed (a context may
   outlive the Python objects that made it). */
struct mtls_card {
    CRYPTO_RWLOCK *lock;
    long id;                /* Python's key for it (mtls_py_recover) */
    int lost;               /* a signature failed: reconnect before the next one */
    unsigned long failures; /* handshakes the card failed (its signature, or reconnecting) */
    unsigned long err;      /* the first OpenSSL error code of the last failed signature */
    unsigned long generation; /* keys set after reconnections so far */
    EVP_PKEY *pkey;         /* the key after a reconnection; NULL: the context's own */
};

/* The card that failed the handshake this thread is running, and its
   generation then: a handshake runs in the thread that calls
   SSL_do_handshake, and its failure returns to that caller before this
   thread runs anything else.  So a handshake that succeeds costs Python
   nothing: only a failed one asks (mtls_card_take_failure) whether its
   card was why.  Reset when a handshake starts, so a failure nobody asked
   about (a post-handshake signature) is not blamed on a later handshake. */
static __thread struct mtls_card *mtls_failed_card;
static __thread unsigned long mtls_failed_generation;

/* With the card's lock held: it failed this thread's handshake. */
static void mtls_card_failed_here(struct mtls_card *card)
{
    card->failures++;
    mtls_failed_card = card;
    mtls_failed_generation = card->generation;
}

/* Per SSL_CTX: the Python-side id of its hooks, and what was there before. */
struct mtls_ctx_hooks {
    long id;
    int flags;  /* MTLS_HOOK_* */
    int peer;   /* the peer checks (verify and refusal callbacks) are installed */
    struct mtls_card *card;
    int ca_names; /* server: MTLS_CA_NAMES_* */
    int ca_count; /* certificates in the trust store when the context's CA names were taken */
};
#define MTLS_HOOK_RULE 1  /* call mtls_py_peer_rule on the verified leaf */
#define MTLS_HOOK_SCOPE 2 /* client: present the certificate only where mtls_py_present says */
#define MTLS_CA_NAMES_STORE 1 /* name the trust store's CAs to clients */
#define MTLS_CA_NAMES_NONE 2  /* name no CA */

/* Per X509_STORE: the CRLs mtls_engine serves (replaced as a whole on reload). */
struct mtls_crlset {
    CRYPTO_RWLOCK *lock;
    STACK_OF(X509_CRL) *crls;
};

/* TLS 1.2 renegotiation off on every context mtls_engine hooks, either
   way: a renegotiation is a second handshake on the same connection, and
   on a card-key context a second card signature each time the peer (or,
   for a client, the server) asks.  The access rule and server pins run on
   every chain the peer sends anyway (mtls_app_verify); a user who needs
   renegotiation clears the option through ctx.options. */
static void mtls_no_renegotiation(SSL_CTX *ctx)
{
#ifdef SSL_OP_NO_RENEGOTIATION
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION);
#else
    (void)ctx;
#endif
}

static int mtls_ssl_idx = -1, mtls_ctx_idx = -1, mtls_store_idx = -1;
static CRYPTO_ONCE mtls_idx_once = CRYPTO_ONCE_STATIC_INIT;

static void mtls_free_plain(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl, void *argp)
{
    (void)parent; (void)ad; (void)idx; (void)argl; (void)argp;
    OPENSSL_free(ptr);
}

static void mtls_free_crlset(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl, void *argp)
{
    struct mtls_crlset *set = ptr;
    (void)parent; (void)ad; (void)idx; (void)argl; (void)argp;
    if (set == NULL)
        return;
    sk_X509_CRL_pop_free(set->crls, X509_CRL_free);
    CRYPTO_THREAD_lock_free(set->lock);
    OPENSSL_free(set);
}

static void mtls_make_indexes(void)
{
    mtls_ssl_idx = SSL_get_ex_new_index(0, NULL, NULL, NULL, mtls_free_plain);
    mtls_ctx_idx = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, mtls_free_plain);
    mtls_store_idx = X509_STORE_get_ex_new_index(0, NULL, NULL, NULL, mtls_free_crlset);
}

static int mtls_indexes(void)
{
    return CRYPTO_THREAD_run_once(&mtls_idx_once, mtls_make_indexes) && mtls_ssl_idx >= 0 && mtls_ctx_idx >= 0
           && mtls_store_idx >= 0;
}

static void mtls_name(const X509_NAME *name, char *out, size_t size)
{
    BIO *bio = BIO_new(BIO_s_mem());
    int n = 0;
    out[0] = '\0';
    if (bio == NULL)
        return;
    if (name != NULL && X509_NAME_print_ex(bio, name, 0, XN_FLAG_RFC2253) >= 0)
        n = BIO_read(bio, out, (int)size - 1);
    out[n > 0 ? n : 0] = '\0';
    BIO_free(bio);
}

static void mtls_serial(X509 *cert, char *out, size_t size)
{
    BIGNUM *bn = ASN1_INTEGER_to_BN(X509_get0_serialNumber(cert), NULL);
    char *hex = bn != NULL ? BN_bn2hex(bn) : NULL;
    out[0] = '\0';
    if (hex != NULL)
        snprintf(out, size, "%s", hex);
    OPENSSL_free(hex);
    BN_free(bn);
}

static void mtls_describe(X509 *cert, char *subject, char *issuer, char *serial)
{
    if (cert == NULL)
        return;
    mtls_name(X509_get_subject_name(cert), subject, 512);
    mtls_name(X509_get_issuer_name(cert), issuer, 512);
    mtls_serial(cert, serial, 96);
}

/* Python, called back (cffi extern "Python+C"; the GIL is taken there). */
int mtls_py_peer_rule(long, const unsigned char *, size_t);
int mtls_py_present(long, const char *);
void mtls_py_rejected(long, int, int, struct mtls_peer_record *, const char *);
int mtls_py_recover(long);

static int mtls_verify_cb(int ok, X509_STORE_CTX *st)
{
    SSL *ssl = X509_STORE_CTX_get_ex_data(st, SSL_get_ex_data_X509_STORE_CTX_idx());
    struct mtls_ctx_hooks *hooks = ssl != NULL ? SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), mtls_ctx_idx) : NULL;
    struct mtls_peer_record *rec;
    X509 *cert = X509_STORE_CTX_get_current_cert(st);
    int depth = X509_STORE_CTX_get_error_depth(st);

    int (*previous)(int, X509_STORE_CTX *);
    if (hooks == NULL)
        return ok;
    /* The callback CPython (or anyone) set with SSL_CTX_set_verify, if any,
       still runs first. */
    previous = SSL_get_verify_callback(ssl);
    if (previous != NULL && previous != mtls_verify_cb)
        ok = previous(ok, st);
    rec = SSL_get_ex_data(ssl, mtls_ssl_idx);
    if (rec == NULL) {
        rec = OPENSSL_zalloc(sizeof(*rec));
        if (rec == NULL || !SSL_set_ex_data(ssl, mtls_ssl_idx, rec)) {
            OPENSSL_free(rec);
            return 0; /* fail closed */
        }
    }
    if (!ok) {
        if (rec->verify_error == 0) {
            STACK_OF(X509) *chain = X509_STORE_CTX_get0_chain(st);
            rec->verify_error = X509_STORE_CTX_get_error(st);
            rec->depth = depth;
            mtls_describe(cert, rec->subject, rec->issuer, rec->serial);
            /* the client's own certificate, whatever level failed */
            if (chain != NULL && sk_X509_num(chain) > 0)
                mtls_describe(sk_X509_value(chain, 0), rec->leaf_subject, rec->leaf_issuer, rec->leaf_serial);
        }
        return 0;
    }
    if (depth == 0 && !rec->rule_done) {
        rec->rule_done = 1;
        mtls_describe(cert, rec->leaf_subject, rec->leaf_issuer, rec->leaf_serial);
        if (__atomic_load_n(&hooks->flags, __ATOMIC_ACQUIRE) & MTLS_HOOK_RULE) {
            unsigned char *der = NULL;
            int len = i2d_X509(cert, &der);
            int allowed = len > 0 && mtls_py_peer_rule(hooks->id, der, (size_t)len);
            OPENSSL_free(der);
            if (!allowed) {
                X509_STORE_CTX_set_error(st, X509_V_ERR_APPLICATION_VERIFICATION);
                rec->verify_error = X509_V_ERR_APPLICATION_VERIFICATION;
                rec->depth = 0;
                mtls_describe(cert, rec->subject, rec->issuer, rec->serial);
                return 0;
            }
        }
    }
    return ok;
}

/* The server is about to send a fatal alert: that is a refusal.  Tell
   Python once per connection, with what the verify callback saw. */
/* This side is about to send a fatal alert while making the handshake
   signature (a client's CertificateVerify; a server's CertificateVerify in
   TLS 1.3, ServerKeyExchange in TLS 1.2): the card failed to sign.  Mark
   it lost, so the next handshake reconnects to the token first. */
static void mtls_card_check_alert(const SSL *ssl, struct mtls_card *card, int where, int ret)
{
    OSSL_HANDSHAKE_STATE st;
    if (card == NULL || (where & SSL_CB_WRITE_ALERT) != SSL_CB_WRITE_ALERT || (ret >> 8) != SSL3_AL_FATAL)
        return;
    st = SSL_get_state(ssl);
    if (st != TLS_ST_CW_CERT_VRFY && st != TLS_ST_SW_CERT_VRFY && st != TLS_ST_SW_KEY_EXCH)
        return;
    if (!CRYPTO_THREAD_write_lock(card->lock))
        return;
    card->lost = 1;
    mtls_card_failed_here(card);
    card->err = ERR_peek_error();
    CRYPTO_THREAD_unlock(card->lock);
}

static void mtls_info_cb(const SSL *ssl, int where, int ret)
{
    struct mtls_ctx_hooks *hooks;
    struct mtls_peer_record *rec, empty;
    unsigned long err;
    int ssl_reason = 0, fd;
    char peer[INET6_ADDRSTRLEN + 16] = "";

    hooks = SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), mtls_ctx_idx);
    if (hooks == NULL)
        return;
    if (where & SSL_CB_HANDSHAKE_START)
        mtls_failed_card = NULL;
    mtls_card_check_alert(ssl, __atomic_load_n(&hooks->card, __ATOMIC_ACQUIRE), where, ret);
    if (!SSL_is_server((SSL *)ssl) || !hooks->peer)
        return;
    rec = SSL_get_ex_data(ssl, mtls_ssl_idx);
    if (where & SSL_CB_HANDSHAKE_DONE) {
        if (rec == NULL && (rec = OPENSSL_zalloc(sizeof(*rec))) != NULL
            && !SSL_set_ex_data((SSL *)ssl, mtls_ssl_idx, rec)) {
            OPENSSL_free(rec);
            rec = NULL;
        }
        if (rec != NULL)
            rec->handshake_done = 1;
        return;
    }
    if (!(where & SSL_CB_ALERT) || !(where & SSL_CB_WRITE) || (ret >> 8) != SSL3_AL_FATAL)
        return;
    /* A refusal happens during a handshake that got past the ClientHello:
       not after it (a served client hanging up without close_notify makes
       OpenSSL 3 send decode_error), not before it (a port check, plain
       HTTP on the TLS port). */
    if (SSL_get_state(ssl) == TLS_ST_BEFORE)
        return;
    if (rec == NULL) {
        memset(&empty, 0, sizeof(empty));
        rec = &empty;
    } else if (rec->alerted || rec->handshake_done) {
        return;
    }
    rec->alerted = 1;
    err = ERR_peek_last_error();
    if (ERR_GET_LIB(err) == ERR_LIB_SSL)
        ssl_reason = ERR_GET_REASON(err);
    fd = SSL_get_fd(ssl);
    if (fd >= 0) {
        struct sockaddr_storage sa;
        socklen_t salen = sizeof(sa);
        char host[INET6_ADDRSTRLEN] = "";
        if (getpeername(fd, (struct sockaddr *)&sa, &salen) == 0) {
            if (sa.ss_family == AF_INET) {
                struct sockaddr_in *in = (struct sockaddr_in *)&sa;
                inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host));
                snprintf(peer, sizeof(peer), "%s:%u", host, (unsigned)ntohs(in->sin_port));
            } else if (sa.ss_family == AF_INET6) {
                struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&sa;
                inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host));
                snprintf(peer, sizeof(peer), "[%s]:%u", host, (unsigned)ntohs(in6->sin6_port));
            }
        }
    }
    mtls_py_rejected(hooks->id, ret & 0xff, ssl_reason, rec, peer);
}

static int mtls_app_verify(X509_STORE_CTX *st, void *arg)
{
    SSL *ssl = X509_STORE_CTX_get_ex_data(st, SSL_get_ex_data_X509_STORE_CTX_idx());
    struct mtls_peer_record *rec = ssl != NULL ? SSL_get_ex_data(ssl, mtls_ssl_idx) : NULL;
    (void)arg;
    /* One call per chain the peer sends: the first handshake, and again on
       a renegotiation (when a context allows one) or a TLS 1.3
       post-handshake authentication.  The rule runs on each. */
    if (rec != NULL)
        rec->rule_done = 0;
    X509_STORE_CTX_set_verify_cb(st, mtls_verify_cb);
    return X509_verify_cert(st);
}

/* The card's part of the certificate callback (both sides, just before
   this connection's certificate and key are used).  After a failed
   signature, ask Python to reach the token again (re-open, log in, find
   the key by its URI) before this handshake signs anything; after a
   reconnection, sign with the new key.  0 fails the handshake. */
static EVP_PKEY *mtls_card_key(struct mtls_card *card);

static int mtls_card_cert(SSL *ssl, struct mtls_card *card)
{
    EVP_PKEY *pkey;
    int lost, ok = 1;
    if (!CRYPTO_THREAD_read_lock(card->lock))
        return 0;
    lost = card->lost;
    CRYPTO_THREAD_unlock(card->lock);
    if (lost && !mtls_py_recover(card->id)) {
        if (CRYPTO_THREAD_write_lock(card->lock)) {
            mtls_card_failed_here(card);
            CRYPTO_THREAD_unlock(card->lock);
        }
        return 0;
    }
    /* SSL_use_PrivateKey may call into the provider: not under the lock. */
    pkey = mtls_card_key(card);
    if (pkey != NULL) {
        ok = SSL_use_PrivateKey(ssl, pkey);
        EVP_PKEY_free(pkey);
    }
    return ok;
}

/* ---- the client CA names a server sends --------------------------------- */

static int mtls_cert_cb(SSL *ssl, void *arg);
static struct mtls_ctx_hooks *mtls_hooks_of(SSL_CTX *ctx);

/* How many certificates `store` holds; -1 when it cannot be locked. */
static int mtls_store_count(X509_STORE *store)
{
    STACK_OF(X509_OBJECT) *objs;
    int i, n = 0;
    if (!X509_STORE_lock(store))
        return -1;
    objs = X509_STORE_get0_objects(store);
    for (i = 0; i < sk_X509_OBJECT_num(objs); i++)
        n += X509_OBJECT_get0_X509(sk_X509_OBJECT_value(objs, i)) != NULL;
    X509_STORE_unlock(store);
    return n;
}

/* The subject names of the certificates in `store`, each once (NULL when
   out of memory); *count: how many certificates it holds. */
static STACK_OF(X509_NAME) *mtls_store_names(X509_STORE *store, int *count)
{
    STACK_OF(X509_NAME) *names = sk_X509_NAME_new_null();
    STACK_OF(X509_OBJECT) *objs;
    int i, j, n = 0, ok = 1;
    if (names == NULL)
        return NULL;
    if (!X509_STORE_lock(store)) {
        sk_X509_NAME_free(names);
        return NULL;
    }
    objs = X509_STORE_get0_objects(store);
    for (i = 0; ok && i < sk_X509_OBJECT_num(objs); i++) {
        X509 *cert = X509_OBJECT_get0_X509(sk_X509_OBJECT_value(objs, i));
        const X509_NAME *subject;
        X509_NAME *copy;
        if (cert == NULL) /* a CRL */
            continue;
        n++;
        subject = X509_get_subject_name(cert);
        for (j = 0; j < sk_X509_NAME_num(names); j++)
            if (X509_NAME_cmp(sk_X509_NAME_value(names, j), subject) == 0)
                break;
        if (j < sk_X509_NAME_num(names)) /* a re-issued CA: one name is enough */
            continue;
        copy = X509_NAME_dup(subject);
        ok = copy != NULL && sk_X509_NAME_push(names, copy) > 0;
        if (!ok)
            X509_NAME_free(copy);
    }
    X509_STORE_unlock(store);
    if (!ok) {
        sk_X509_NAME_pop_free(names, X509_NAME_free);
        return NULL;
    }
    *count = n;
    return names;
}

/* Server: tell clients which CAs' certificates it accepts (the subject
   names of the CAs in its trust store: CertificateRequest in TLS 1.2, its
   certificate_authorities extension in TLS 1.3), or (send 0) name none.
   Call before the context serves: OpenSSL copies the list into each new
   connection without a lock.  1 on success. */
static int mtls_set_client_ca_names(SSL_CTX *ctx, int send)
{
    struct mtls_ctx_hooks *hooks;
    STACK_OF(X509_NAME) *names;
    int count = 0;
    if (!mtls_setup_begin())
        return 0;
    hooks = mtls_hooks_of(ctx);
    names = hooks == NULL ? NULL
            : send        ? mtls_store_names(SSL_CTX_get_cert_store(ctx), &count)
                          : sk_X509_NAME_new_null();
    if (names == NULL) {
        mtls_setup_end();
        return 0;
    }
    SSL_CTX_set_client_CA_list(ctx, names); /* the context owns `names` from here */
    /* A server with an empty client CA list sends the general CA list
       instead (empty unless set): clear it, so "none" means none. */
    SSL_CTX_set0_CA_list(ctx, NULL);
    hooks->ca_names = send ? MTLS_CA_NAMES_STORE : MTLS_CA_NAMES_NONE;
    hooks->ca_count = count;
    if (send)
        SSL_CTX_set_cert_cb(ctx, mtls_cert_cb, NULL);
    mtls_setup_end();
    return 1;
}

/* CAs loaded into the context after its names were taken (a user's
   load_verify_locations): name them too, on this connection -- the
   context's own list cannot be replaced while other threads copy it.
   Costs one count of the store per handshake otherwise.  1 on success. */
static int mtls_refresh_ca_names(SSL *ssl, const struct mtls_ctx_hooks *hooks)
{
    X509_STORE *store = SSL_CTX_get_cert_store(SSL_get_SSL_CTX(ssl));
    STACK_OF(X509_NAME) *names;
    int count;
    if (mtls_store_count(store) == hooks->ca_count)
        return 1;
    names = mtls_store_names(store, &count);
    if (names == NULL)
        return 0;
    SSL_set_client_CA_list(ssl, names); /* owned by the connection */
    return 1;
}

/* Client side, when the server asks for a certificate: keep the card's
   certificate and key on this connection only if the server's name (SNI,
   else the name or address being verified) is one the user listed;
   otherwise clear them, so the client answers with no certificate and the
   card signs nothing for that server.  Then the card's own part. */
static int mtls_cert_cb(SSL *ssl, void *arg)
{
    struct mtls_ctx_hooks *hooks = SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), mtls_ctx_idx);
    struct mtls_card *card;
    const char *host;
    char *ip = NULL;
    int present;
    (void)arg;
    if (hooks == NULL)
        return 1;
    if (!SSL_is_server(ssl) && (__atomic_load_n(&hooks->flags, __ATOMIC_ACQUIRE) & MTLS_HOOK_SCOPE)) {
        host = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
        if (host == NULL)
            host = X509_VERIFY_PARAM_get0_host(SSL_get0_param(ssl), 0);
        if (host == NULL)
            host = ip = X509_VERIFY_PARAM_get1_ip_asc(SSL_get0_param(ssl));
        present = host != NULL && mtls_py_present(hooks->id, host);
        OPENSSL_free(ip);
        if (!present) {
            SSL_certs_clear(ssl);
            return 1;
        }
    }
    if (SSL_is_server(ssl) && hooks->ca_names == MTLS_CA_NAMES_STORE && !mtls_refresh_ca_names(ssl, hooks))
        return 0;
    card = __atomic_load_n(&hooks->card, __ATOMIC_ACQUIRE);
    return card != NULL ? mtls_card_cert(ssl, card) : 1;
}

/* The hooks of a context, made on first use (then renegotiation is
   turned off, see mtls_no_renegotiation).  The caller holds the setup
   lock.  NULL on failure. */
static struct mtls_ctx_hooks *mtls_hooks_of(SSL_CTX *ctx)
{
    struct mtls_ctx_hooks *hooks;
    if (!mtls_indexes())
        return NULL;
    hooks = SSL_CTX_get_ex_data(ctx, mtls_ctx_idx);
    if (hooks == NULL) {
        hooks = OPENSSL_zalloc(sizeof(*hooks));
        if (hooks == NULL)
            return NULL;
        if (!SSL_CTX_set_ex_data(ctx, mtls_ctx_idx, hooks)) {
            OPENSSL_free(hooks);
            return NULL;
        }
        mtls_no_renegotiation(ctx);
    }
    return hooks;
}

/* Install the hooks on a context (once) and set what they do.  1 on success. */
static int mtls_install_peer_hooks(SSL_CTX *ctx, long id, int flags)
{
    struct mtls_ctx_hooks *hooks;
    if (!mtls_setup_begin())
        return 0;
    hooks = mtls_hooks_of(ctx);
    if (hooks == NULL) {
        mtls_setup_end();
        return 0;
    }
    if (!hooks->peer) {
        /* Not SSL_CTX_set_verify: CPython 3.13 resets that callback whenever
           verify_mode is set, which would silently drop the access rule and
           the reasons.  The chain-verification callback is never touched by
           CPython; it runs X509_verify_cert with our per-certificate
           callback on top of whatever verify callback the SSL has. */
        SSL_CTX_set_cert_verify_callback(ctx, mtls_app_verify, NULL);
        SSL_CTX_set_info_callback(ctx, mtls_info_cb);
        hooks->peer = 1;
    }
    hooks->id = id;
    __atomic_store_n(&hooks->flags, flags, __ATOMIC_RELEASE);
    if (flags & MTLS_HOOK_SCOPE)
        SSL_CTX_set_cert_cb(ctx, mtls_cert_cb, NULL);
    mtls_setup_end();
    return 1;
}

/* What the hooks of a context do now: MTLS_HOOK_* flags, | 4 when a card
   is attached; -1 when the context has no hooks (for tests). */
static int mtls_hooks_state(SSL_CTX *ctx)
{
    struct mtls_ctx_hooks *hooks = mtls_indexes() ? SSL_CTX_get_ex_data(ctx, mtls_ctx_idx) : NULL;
    if (hooks == NULL)
        return -1;
    return __atomic_load_n(&hooks->flags, __ATOMIC_ACQUIRE)
           | (__atomic_load_n(&hooks->card, __ATOMIC_ACQUIRE) != NULL ? 4 : 0);
}

/* ---- a card key that may go away ---------------------------------------- */

static struct mtls_card *mtls_card_new(long id)
{
    struct mtls_card *card = OPENSSL_zalloc(sizeof(*card));
    if (card == NULL)
        return NULL;
    card->lock = CRYPTO_THREAD_lock_new();
    if (card->lock == NULL) {
        OPENSSL_free(card);
        return NULL;
    }
    card->id = id;
    return card;
}

/* Watch `card` on this context: its failed signatures, reconnections
   before the next handshake, and the key it signs with after one.  1 on
   success. */
static int mtls_attach_card(SSL_CTX *ctx, struct mtls_card *card)
{
    struct mtls_ctx_hooks *hooks;
    if (!mtls_setup_begin())
        return 0;
    hooks = mtls_hooks_of(ctx);
    if (hooks != NULL) {
        __atomic_store_n(&hooks->card, card, __ATOMIC_RELEASE);
        SSL_CTX_set_info_callback(ctx, mtls_info_cb);
        SSL_CTX_set_cert_cb(ctx, mtls_cert_cb, NULL);
    }
    mtls_setup_end();
    return hooks != NULL;
}

/* Sign with `pkey` from the next handshake on, and forget the loss.  1 on
   success. */
static int mtls_card_set_key(struct mtls_card *card, EVP_PKEY *pkey)
{
    EVP_PKEY *old;
    if (!EVP_PKEY_up_ref(pkey))
        return 0;
    if (!CRYPTO_THREAD_write_lock(card->lock)) {
        EVP_PKEY_free(pkey);
        return 0;
    }
    old = card->pkey;
    card->pkey = pkey;
    card->lost = 0;
    card->generation++;
    CRYPTO_THREAD_unlock(card->lock);
    /* Connections that already took the old key hold their own reference. */
    EVP_PKEY_free(old);
    return 1;
}

/* lost: 1 = the card failed to sign, 0 = working; -1 = keep as it is.
   Returns the card's state: lost | failures << 1, and its last error in
   *err. */
static unsigned long mtls_card_state(struct mtls_card *card, int lost, unsigned long *err)
{
    unsigned long state = 0;
    if (!CRYPTO_THREAD_write_lock(card->lock))
        return 0;
    if (lost >= 0)
        card->lost = lost;
    state = (unsigned long)(card->lost != 0) | (card->failures << 1);
    if (err != NULL)
        *err = card->err;
    CRYPTO_THREAD_unlock(card->lock);
    return state;
}

/* After a handshake on this thread failed: 0 when `card` was not why,
   else 1 + the card's generation (reconnections) when it failed it.
   Forgets that failure either way. */
static unsigned long mtls_card_take_failure(struct mtls_card *card)
{
    unsigned long answer = mtls_failed_card == card && card != NULL ? mtls_failed_generation + 1 : 0;
    mtls_failed_card = NULL;
    return answer;
}

/* How many times the card's key was replaced after a reconnection. */
static unsigned long mtls_card_generation(struct mtls_card *card)
{
    unsigned long generation = 0;
    if (!CRYPTO_THREAD_read_lock(card->lock))
        return 0;
    generation = card->generation;
    CRYPTO_THREAD_unlock(card->lock);
    return generation;
}

/* The key the card signs with now (a new reference), or NULL when it is
   still the context's own. */
static EVP_PKEY *mtls_card_key(struct mtls_card *card)
{
    EVP_PKEY *pkey = NULL;
    if (!CRYPTO_THREAD_read_lock(card->lock))
        return NULL;
    if (card->pkey != NULL && EVP_PKEY_up_ref(card->pkey))
        pkey = card->pkey;
    CRYPTO_THREAD_unlock(card->lock);
    return pkey;
}

static int mtls_verify_callback_installed(SSL_CTX *ctx)
{
    struct mtls_ctx_hooks *hooks = mtls_indexes() ? SSL_CTX_get_ex_data(ctx, mtls_ctx_idx) : NULL;
    return hooks != NULL && hooks->peer;
}

#if OPENSSL_VERSION_NUMBER >= 0x30000000L
static STACK_OF(X509_CRL) *mtls_lookup_crls(const X509_STORE_CTX *ctx, const X509_NAME *name)
#else
static STACK_OF(X509_CRL) *mtls_lookup_crls(X509_STORE_CTX *ctx, X509_NAME *name)
#endif
{
    struct mtls_crlset *set = X509_STORE_get_ex_data(X509_STORE_CTX_get0_store(ctx), mtls_store_idx);
    STACK_OF(X509_CRL) *out = X509_STORE_CTX_get1_crls(ctx, name); /* the store's own, if any */
    int i;
    if (set == NULL)
        return out;
    if (out == NULL && (out = sk_X509_CRL_new_null()) == NULL)
        return NULL;
    if (!CRYPTO_THREAD_read_lock(set->lock))
        return out;
    for (i = 0; i < sk_X509_CRL_num(set->crls); i++) {
        X509_CRL *crl = sk_X509_CRL_value(set->crls, i);
        if (X509_NAME_cmp(X509_CRL_get_issuer(crl), name) == 0 && X509_CRL_up_ref(crl)) {
            if (!sk_X509_CRL_push(out, crl))
                X509_CRL_free(crl);
        }
    }
    CRYPTO_THREAD_unlock(set->lock);
    return out;
}

/* Replace the CRLs this context checks against with `n` DER CRLs, at once
   and for every later verification (connections in progress keep what
   they looked up).  1 on success. */
static int mtls_set_crls(SSL_CTX *ctx, const unsigned char **ders, const size_t *lens, int n)
{
    X509_STORE *store = SSL_CTX_get_cert_store(ctx);
    struct mtls_crlset *set;
    STACK_OF(X509_CRL) *fresh, *old;
    int i;
    if (store == NULL || !mtls_indexes())
        return 0;
    fresh = sk_X509_CRL_new_null();
    if (fresh == NULL)
        return 0;
    for (i = 0; i < n; i++) {
        const unsigned char *p = ders[i];
        X509_CRL *crl = d2i_X509_CRL(NULL, &p, (long)lens[i]);
        if (crl == NULL || !sk_X509_CRL_push(fresh, crl)) {
            X509_CRL_free(crl);
            sk_X509_CRL_pop_free(fresh, X509_CRL_free);
            return 0;
        }
    }
    if (!mtls_setup_begin()) {
        sk_X509_CRL_pop_free(fresh, X509_CRL_free);
        return 0;
    }
    set = X509_STORE_get_ex_data(store, mtls_store_idx);
    if (set == NULL) {
        set = OPENSSL_zalloc(sizeof(*set));
        if (set == NULL || (set->lock = CRYPTO_THREAD_lock_new()) == NULL
            || !X509_STORE_set_ex_data(store, mtls_store_idx, set)) {
            if (set != NULL)
                CRYPTO_THREAD_lock_free(set->lock);
            OPENSSL_free(set);
            mtls_setup_end();
            sk_X509_CRL_pop_free(fresh, X509_CRL_free);
            return 0;
        }
        X509_STORE_set_lookup_crls(store, mtls_lookup_crls);
    }
    mtls_setup_end();
    if (!CRYPTO_THREAD_write_lock(set->lock)) {
        sk_X509_CRL_pop_free(fresh, X509_CRL_free);
        return 0;
    }
    old = set->crls;
    set->crls = fresh;
    CRYPTO_THREAD_unlock(set->lock);
    sk_X509_CRL_pop_free(old, X509_CRL_free);
    return 1;
}

/* Every connection is verified in full: no session cache, no tickets, so a
   CRL loaded now applies to the very next connection of every client. */
static void mtls_no_resumption(SSL_CTX *ctx)
{
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
#if OPENSSL_VERSION_NUMBER >= 0x10101000L
    SSL_CTX_set_num_tickets(ctx, 0);
#endif
}

static long mtls_session_cache_mode(SSL_CTX *ctx)
{
    return SSL_CTX_get_session_cache_mode(ctx);
}
