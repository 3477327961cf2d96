/*
 * mtls_engine test shim: a PKCS#11 module that forwards every call to a real
 * module (SoftHSM2 in the tests) and changes a few, to simulate what SoftHSM2
 * cannot: a PIN retry counter that persists across processes like a card's,
 * the CKF_USER_PIN_COUNT_LOW / FINAL_TRY / LOCKED flags, a pinpad reader
 * (CKF_PROTECTED_AUTHENTICATION_PATH), a slow card and a client signing with
 * a key other than its certificate's.  It also keeps a log of the calls it
 * wraps, never containing a PIN.
 *
 * Configuration (environment, read once, on the first C_GetFunctionList):
 *   MTLS_SHIM_MODULE           real module to forward to (required)
 *   MTLS_SHIM_TOKEN_FLAGS      comma list of count_low, final_try, locked, pinpad
 *   MTLS_SHIM_MAX_TRIES=N      simulated retry counter, with
 *   MTLS_SHIM_STATE=FILE       the failure count (missing file: 0)
 *   MTLS_SHIM_PINPAD_PIN_FILE  the PIN "typed on the reader" of a pinpad token
 *   MTLS_SHIM_SIGN_DELAY_MS    sleep before each C_Sign / C_SignFinal
 *   MTLS_SHIM_SIGN_WITH=LABEL  C_SignInit signs with the private key labelled
 *                              LABEL on the session's token, whatever key the
 *                              caller named (whose public parts, and so its
 *                              certificate, the caller still believes in)
 *   MTLS_SHIM_LOG=FILE         one line per wrapped call: "NAME rv=0x%08lX pid=N ..."
 *   MTLS_SHIM_INIT_FAULT=hang|crash  C_Initialize never returns / aborts the process
 *   MTLS_SHIM_IDENTITY=LIBMAN|LIBDESC|TOKMAN|TOKMODEL  what C_GetInfo says
 *                              the library's manufacturer and description
 *                              are, and C_GetTokenInfo every token's
 *                              manufacturer and model (an empty field: the
 *                              real module's): a smart card, an HSM, ...
 *   MTLS_SHIM_TOKEN_ERROR=LABEL:RV  C_GetTokenInfo of the token labelled LABEL
 *                              fails with RV (hex), e.g. 0xE1 for
 *                              CKR_TOKEN_NOT_RECOGNIZED: a card the module
 *                              has no driver for
 *
 * The flags and the counter apply to every token of the real module (tests
 * give the shim a token store of its own).  The PIN-state flags the shim
 * reports come from its configuration only, never from the real module.  Only C_GetFunctionList is
 * exported; everything not wrapped here goes straight to the real module.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <time.h>
#include <unistd.h>

#include <p11-kit/pkcs11.h>

#define EXPORT __attribute__((visibility("default")))
#define USER_PIN(t) ((t) == CKU_USER || (t) == CKU_CONTEXT_SPECIFIC)
#define PIN_STATE_FLAGS (CKF_USER_PIN_COUNT_LOW | CKF_USER_PIN_FINAL_TRY | CKF_USER_PIN_LOCKED)

static pthread_once_t once = PTHREAD_ONCE_INIT;
static CK_RV load_rv = CKR_GENERAL_ERROR;   /* result of setup() */
static CK_FUNCTION_LIST_PTR real;           /* the real module's list */
static CK_FUNCTION_LIST shim;               /* what callers get */

static CK_FLAGS static_flags;               /* from MTLS_SHIM_TOKEN_FLAGS */
static unsigned long max_tries;             /* 0: no retry counter */
static const char *state_path;
static char lock_path[PATH_MAX];
static const char *pinpad_pin_path;
static long sign_delay_ms;
static const char *sign_with;               /* label of the key that really signs */
static int log_fd = -1;
static char identity[4][33];               /* MTLS_SHIM_IDENTITY, "" : keep */
static char error_label[33];                /* MTLS_SHIM_TOKEN_ERROR: padded label */
static CK_RV error_rv;
/* Serialises logins in this process (as a card does); flock() on
 * lock_path serialises them across processes sharing the state file. */
static pthread_mutex_t login_mutex = PTHREAD_MUTEX_INITIALIZER;

/* ---- log: whole lines, one write() each on an O_APPEND descriptor ------ */

static void log_call(const char *name, CK_RV rv, const char *fmt, ...)
{
    char line[256];
    int n;
    va_list ap;

    if (log_fd < 0)
        return;
    n = snprintf(line, sizeof line, "%s rv=0x%08lX pid=%ld", name, (unsigned long)rv, (long)getpid());
    if (fmt != NULL && n < (int)sizeof line - 2) {
        line[n++] = ' ';
        va_start(ap, fmt);
        n += vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
        va_end(ap);
    }
    if (n > (int)sizeof line - 2)
        n = (int)sizeof line - 2;
    line[n++] = '\n';
    if (write(log_fd, line, (size_t)n) < 0) {
        /* nothing sensible to do: the log is a test aid */
    }
}

/* ---- the simulated retry counter ---------------------------------------- */

static unsigned long read_failures(void)
{
    char buf[32] = {0};
    int fd = open(state_path, O_RDONLY | O_CLOEXEC);
    ssize_t n;

    if (fd < 0)
        return 0;                           /* no file yet: no failures */
    n = read(fd, buf, sizeof buf - 1);
    close(fd);
    return n > 0 ? strtoul(buf, NULL, 10) : 0;
}

static void write_failures(unsigned long failures)
{
    char tmp[PATH_MAX + 32], buf[32];
    int fd, n = snprintf(buf, sizeof buf, "%lu\n", failures);

    /* Write a private temporary file, then rename it over the state file:
     * a reader sees the old count or the new one, never half of it. */
    snprintf(tmp, sizeof tmp, "%s.%ld.tmp", state_path, (long)getpid());
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0 || write(fd, buf, (size_t)n) != n || fsync(fd) != 0) {
        fprintf(stderr, "p11shim: cannot write %s: %s\n", tmp, strerror(errno));
        if (fd >= 0)
            close(fd);
        unlink(tmp);
        return;
    }
    close(fd);
    if (rename(tmp, state_path) != 0) {
        fprintf(stderr, "p11shim: cannot replace %s: %s\n", state_path, strerror(errno));
        unlink(tmp);
    }
}

/* The PIN-state flags a card with `failures` wrong tries in a row shows. */
static CK_FLAGS counter_flags(unsigned long failures)
{
    CK_FLAGS f = 0;

    if (max_tries == 0)
        return 0;
    if (failures >= 1)
        f |= CKF_USER_PIN_COUNT_LOW;
    if (failures == max_tries - 1)
        f |= CKF_USER_PIN_FINAL_TRY;
    if (failures >= max_tries)
        f |= CKF_USER_PIN_LOCKED;
    return f;
}

/* ---- configuration ------------------------------------------------------- */

static int parse_flags(const char *spec)
{
    static const struct { const char *name; CK_FLAGS flag; } names[] = {
        {"count_low", CKF_USER_PIN_COUNT_LOW},
        {"final_try", CKF_USER_PIN_FINAL_TRY},
        {"locked", CKF_USER_PIN_LOCKED},
        {"pinpad", CKF_PROTECTED_AUTHENTICATION_PATH},
    };
    const char *p = spec;

    while (*p) {
        size_t len = strcspn(p, ","), i;

        for (i = 0; i < sizeof names / sizeof names[0]; i++)
            if (len && strlen(names[i].name) == len && strncmp(p, names[i].name, len) == 0)
                break;
        if (len && i == sizeof names / sizeof names[0]) {
            fprintf(stderr, "p11shim: unknown flag '%.*s' in MTLS_SHIM_TOKEN_FLAGS\n", (int)len, p);
            return -1;
        }
        if (len)
            static_flags |= names[i].flag;
        p += len + (p[len] == ',');
    }
    return 0;
}

static CK_RV setup_config(void)
{
    const char *v;
    char *end;

    if ((v = getenv("MTLS_SHIM_TOKEN_FLAGS")) != NULL && parse_flags(v) != 0)
        return CKR_GENERAL_ERROR;
    if ((v = getenv("MTLS_SHIM_MAX_TRIES")) != NULL && *v) {
        max_tries = strtoul(v, &end, 10);
        state_path = getenv("MTLS_SHIM_STATE");
        if (*end || max_tries == 0 || state_path == NULL || !*state_path
            || strlen(state_path) + 6 > sizeof lock_path) {
            fprintf(stderr, "p11shim: MTLS_SHIM_MAX_TRIES needs a positive number and MTLS_SHIM_STATE a file\n");
            return CKR_GENERAL_ERROR;
        }
        snprintf(lock_path, sizeof lock_path, "%s.lock", state_path);
    }
    pinpad_pin_path = getenv("MTLS_SHIM_PINPAD_PIN_FILE");
    if ((v = getenv("MTLS_SHIM_SIGN_DELAY_MS")) != NULL && *v) {
        sign_delay_ms = strtol(v, &end, 10);
        if (*end || sign_delay_ms < 0) {
            fprintf(stderr, "p11shim: MTLS_SHIM_SIGN_DELAY_MS must be a number of milliseconds\n");
            return CKR_GENERAL_ERROR;
        }
    }
    if ((v = getenv("MTLS_SHIM_SIGN_WITH")) != NULL && *v)
        sign_with = v;
    if ((v = getenv("MTLS_SHIM_IDENTITY")) != NULL && *v) {
        for (int i = 0; i < 4; i++) {
            const char *bar = strchr(v, '|');
            size_t len = bar ? (size_t)(bar - v) : strlen(v);
            if (len > (i == 3 ? 16 : 32) || (i < 3 && bar == NULL) || (i == 3 && bar != NULL)) {
                fprintf(stderr, "p11shim: MTLS_SHIM_IDENTITY must be LIBMAN|LIBDESC|TOKMAN|TOKMODEL (32/32/32/16)\n");
                return CKR_GENERAL_ERROR;
            }
            memcpy(identity[i], v, len);
            identity[i][len] = 0;
            v = bar ? bar + 1 : v + len;
        }
    }
    if ((v = getenv("MTLS_SHIM_TOKEN_ERROR")) != NULL && *v) {
        const char *colon = strrchr(v, ':');
        char *end = NULL;
        size_t len = colon ? (size_t)(colon - v) : 0;
        if (colon == NULL || len == 0 || len > 32 || (error_rv = strtoul(colon + 1, &end, 16)) == 0 || *end) {
            fprintf(stderr, "p11shim: MTLS_SHIM_TOKEN_ERROR must be LABEL:RV (RV in hex, not 0)\n");
            return CKR_GENERAL_ERROR;
        }
        memset(error_label, ' ', 32);
        memcpy(error_label, v, len);
    }
    if ((v = getenv("MTLS_SHIM_LOG")) != NULL && *v) {
        log_fd = open(v, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
        if (log_fd < 0) {
            fprintf(stderr, "p11shim: cannot open MTLS_SHIM_LOG %s: %s\n", v, strerror(errno));
            return CKR_GENERAL_ERROR;
        }
    }
    return CKR_OK;
}

static void install_wrappers(void);

static void setup(void)
{
    const char *path = getenv("MTLS_SHIM_MODULE");
    CK_C_GetFunctionList get_list;
    CK_FUNCTION_LIST_PTR list = NULL;
    void *handle;
    CK_RV rv;

    if (path == NULL || !*path) {
        fprintf(stderr, "p11shim: MTLS_SHIM_MODULE is not set (the real PKCS#11 module to forward to)\n");
        return;
    }
    if (setup_config() != CKR_OK)
        return;
    handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (handle == NULL) {
        fprintf(stderr, "p11shim: cannot load MTLS_SHIM_MODULE %s: %s\n", path, dlerror());
        return;
    }
    get_list = (CK_C_GetFunctionList)dlsym(handle, "C_GetFunctionList");
    if (get_list == NULL || get_list == C_GetFunctionList) {
        fprintf(stderr, "p11shim: %s is not a PKCS#11 module (or is this shim)\n", path);
        return;
    }
    rv = get_list(&list);
    if (rv != CKR_OK || list == NULL) {
        fprintf(stderr, "p11shim: C_GetFunctionList of %s failed (0x%08lX)\n", path, (unsigned long)rv);
        return;
    }
    real = list;
    /* This struct has the 2.40 layout (what C_GetFunctionList returns); a
     * list claiming 3.x would invite callers to read past its end. */
    shim = *real;
    if (shim.version.major > 2) {
        shim.version.major = 2;
        shim.version.minor = 40;
    }
    install_wrappers();
    load_rv = CKR_OK;
}

EXPORT CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR out)
{
    pthread_once(&once, setup);
    if (load_rv != CKR_OK)
        return load_rv;
    if (out == NULL)
        return CKR_ARGUMENTS_BAD;
    *out = &shim;
    return CKR_OK;
}

/* ---- wrapped functions --------------------------------------------------- */

/* A padded PKCS#11 text field set to ``text`` unless it is empty. */
static void set_field(CK_UTF8CHAR *field, size_t size, const char *text)
{
    if (*text == 0)
        return;
    memset(field, ' ', size);
    memcpy(field, text, strlen(text));
}

static CK_RV shim_GetInfo(CK_INFO_PTR info)
{
    CK_RV rv = real->C_GetInfo(info);

    if (rv == CKR_OK) {
        set_field(info->manufacturerID, sizeof(info->manufacturerID), identity[0]);
        set_field(info->libraryDescription, sizeof(info->libraryDescription), identity[1]);
    }
    return rv;
}

static CK_RV shim_Initialize(CK_VOID_PTR args)
{
    CK_RV rv;

    const char *fault = getenv("MTLS_SHIM_INIT_FAULT");

    /* A module that never returns from, or crashes in, C_Initialize. */
    if (fault != NULL && strcmp(fault, "hang") == 0)
        for (;;)
            pause();
    if (fault != NULL && strcmp(fault, "crash") == 0)
        abort();
    pthread_once(&once, setup);
    if (load_rv != CKR_OK)
        return load_rv;
    rv = real->C_Initialize(args);
    log_call("C_Initialize", rv, NULL);
    return rv;
}

static CK_RV shim_Finalize(CK_VOID_PTR reserved)
{
    CK_RV rv = real->C_Finalize(reserved);
    log_call("C_Finalize", rv, NULL);
    return rv;
}

static CK_RV shim_GetTokenInfo(CK_SLOT_ID slot, CK_TOKEN_INFO_PTR info)
{
    CK_RV rv = real->C_GetTokenInfo(slot, info);

    if (rv == CKR_OK && error_rv != 0 && memcmp(info->label, error_label, 32) == 0) {
        memset(info, 0, sizeof(*info));
        rv = error_rv;
    } else if (rv == CKR_OK) {
        set_field(info->manufacturerID, sizeof(info->manufacturerID), identity[2]);
        set_field(info->model, sizeof(info->model), identity[3]);
        /* The shim owns the PIN-state flags: SoftHSM2 sets COUNT_LOW by
         * itself after a failed login and keeps it in the token until the
         * next good one, which would leak from test to test. */
        info->flags &= ~PIN_STATE_FLAGS;
        info->flags |= static_flags | (max_tries ? counter_flags(read_failures()) : 0);
    }
    log_call("C_GetTokenInfo", rv, "slot=%lu flags=0x%08lX", (unsigned long)slot,
             rv == CKR_OK ? (unsigned long)info->flags : 0UL);
    return rv;
}

static CK_RV shim_OpenSession(CK_SLOT_ID slot, CK_FLAGS flags, CK_VOID_PTR app, CK_NOTIFY notify,
                              CK_SESSION_HANDLE_PTR session)
{
    CK_RV rv = real->C_OpenSession(slot, flags, app, notify, session);
    log_call("C_OpenSession", rv, "slot=%lu", (unsigned long)slot);
    return rv;
}

static CK_RV shim_CloseSession(CK_SESSION_HANDLE session)
{
    CK_RV rv = real->C_CloseSession(session);
    log_call("C_CloseSession", rv, NULL);
    return rv;
}

static CK_RV shim_CloseAllSessions(CK_SLOT_ID slot)
{
    CK_RV rv = real->C_CloseAllSessions(slot);
    log_call("C_CloseAllSessions", rv, "slot=%lu", (unsigned long)slot);
    return rv;
}

/* The pinpad reader: the PIN the user "types", from MTLS_SHIM_PINPAD_PIN_FILE. */
static CK_RV read_pinpad_pin(unsigned char *buf, size_t size, CK_ULONG *len)
{
    int fd = pinpad_pin_path ? open(pinpad_pin_path, O_RDONLY | O_CLOEXEC) : -1;
    ssize_t n;

    if (fd < 0) {
        fprintf(stderr, "p11shim: pinpad: no PIN entered (MTLS_SHIM_PINPAD_PIN_FILE unset or unreadable)\n");
        return CKR_FUNCTION_CANCELED;       /* what a reader reports on cancel */
    }
    n = read(fd, buf, size);
    close(fd);
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r'))
        n--;
    if (n <= 0)
        return CKR_FUNCTION_CANCELED;
    *len = (CK_ULONG)n;
    return CKR_OK;
}

static CK_RV shim_Login(CK_SESSION_HANDLE session, CK_USER_TYPE type, CK_UTF8CHAR_PTR pin, CK_ULONG len)
{
    const int user = USER_PIN(type), pinpad = (static_flags & CKF_PROTECTED_AUTHENTICATION_PATH) != 0;
    const int counted = user && max_tries;
    unsigned char typed[256];
    unsigned long failures = 0;
    int lock_fd = -1, forwarded = 0, from_reader = 0;
    CK_RV rv;

    if (counted) {
        pthread_mutex_lock(&login_mutex);
        lock_fd = open(lock_path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
        if (lock_fd >= 0)
            flock(lock_fd, LOCK_EX);
        failures = read_failures();
    }
    if (user && ((static_flags & CKF_USER_PIN_LOCKED) || (counted && failures >= max_tries))) {
        rv = CKR_PIN_LOCKED;                /* a locked card refuses without checking */
    } else if (user && pinpad && pin == NULL) {
        rv = read_pinpad_pin(typed, sizeof typed, &len);
        if (rv == CKR_OK) {
            from_reader = forwarded = 1;
            rv = real->C_Login(session, type, typed, len);
        }
        explicit_bzero(typed, sizeof typed);
    } else {
        forwarded = 1;
        rv = real->C_Login(session, type, pin, len);
    }
    if (counted) {
        if (forwarded && rv == CKR_PIN_INCORRECT)
            write_failures(failures + 1);
        else if (rv == CKR_OK && failures != 0)
            write_failures(0);
        if (lock_fd >= 0)
            close(lock_fd);                 /* releases the flock */
        pthread_mutex_unlock(&login_mutex);
    }
    /* Never the PIN: only whether the application passed one. */
    log_call("C_Login", rv, "user=%lu pin=%s%s forwarded=%s", (unsigned long)type, pin ? "given" : "null",
             !pinpad ? "" : from_reader ? " pinpad=entered" : " pinpad=bypassed", forwarded ? "yes" : "no");
    return rv;
}

static CK_RV shim_Logout(CK_SESSION_HANDLE session)
{
    CK_RV rv = real->C_Logout(session);
    log_call("C_Logout", rv, NULL);
    return rv;
}

static CK_RV shim_FindObjectsInit(CK_SESSION_HANDLE session, CK_ATTRIBUTE_PTR templ, CK_ULONG count)
{
    CK_RV rv = real->C_FindObjectsInit(session, templ, count);
    log_call("C_FindObjectsInit", rv, "attrs=%lu", (unsigned long)count);
    return rv;
}

/* The private key labelled sign_with, looked up on the caller's session at
 * each C_SignInit: no state shared between threads, and the session (logged
 * in, or C_SignInit would fail anyway) sees the token's private objects.
 * Exactly one key must match. */
static CK_RV find_sign_with(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE *key, CK_ULONG *found)
{
    CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
    CK_ATTRIBUTE templ[] = {
        {CKA_CLASS, &cls, sizeof cls},
        {CKA_LABEL, (void *)sign_with, strlen(sign_with)},
    };
    CK_OBJECT_HANDLE handles[2];
    CK_RV rv = real->C_FindObjectsInit(session, templ, 2);

    *found = 0;
    if (rv != CKR_OK)
        return rv;
    rv = real->C_FindObjects(session, handles, 2, found);
    real->C_FindObjectsFinal(session);
    if (rv != CKR_OK)
        return rv;
    if (*found != 1)
        return CKR_KEY_HANDLE_INVALID;
    *key = handles[0];
    return CKR_OK;
}

static CK_RV shim_SignInit(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mech, CK_OBJECT_HANDLE key)
{
    const unsigned long m = mech ? (unsigned long)mech->mechanism : 0UL;
    CK_ULONG found = 0;
    CK_RV rv;

    if (sign_with == NULL) {
        rv = real->C_SignInit(session, mech, key);
        log_call("C_SignInit", rv, "mech=0x%08lX", m);
        return rv;
    }
    rv = find_sign_with(session, &key, &found);
    if (rv != CKR_OK) {
        fprintf(stderr, "p11shim: MTLS_SHIM_SIGN_WITH: %lu private keys labelled '%s' (rv=0x%08lX)\n",
                (unsigned long)found, sign_with, (unsigned long)rv);
        log_call("C_SignInit", rv, "mech=0x%08lX swapped=no sign_with=%s found=%lu", m, sign_with,
                 (unsigned long)found);
        return rv;
    }
    rv = real->C_SignInit(session, mech, key);
    log_call("C_SignInit", rv, "mech=0x%08lX swapped=yes sign_with=%s", m, sign_with);
    return rv;
}

/* The slow card: sleep in the calling thread only (no lock held), so
 * concurrent signatures overlap as they would on several cards.  The log
 * gets a card_busy and a card_done line around the wait, naming the thread
 * (pthread_self, which is Python's threading.get_ident()): a test can then
 * tell which thread the card held, and what else the process logged
 * meanwhile. */
static void card_delay(void)
{
    struct timespec t = {sign_delay_ms / 1000, (sign_delay_ms % 1000) * 1000000L};

    log_call("card_busy", CKR_OK, "thread=%lu", (unsigned long)pthread_self());
    while (nanosleep(&t, &t) != 0 && errno == EINTR)
        ;
    log_call("card_done", CKR_OK, "thread=%lu", (unsigned long)pthread_self());
}

static CK_RV shim_Sign(CK_SESSION_HANDLE session, CK_BYTE_PTR data, CK_ULONG data_len, CK_BYTE_PTR sig,
                       CK_ULONG_PTR sig_len)
{
    CK_RV rv;

    if (sig != NULL && sign_delay_ms > 0)   /* not for the size query */
        card_delay();
    rv = real->C_Sign(session, data, data_len, sig, sig_len);
    log_call("C_Sign", rv, sig ? "len=%lu" : "len=%lu query", (unsigned long)data_len);
    return rv;
}

static CK_RV shim_SignUpdate(CK_SESSION_HANDLE session, CK_BYTE_PTR part, CK_ULONG part_len)
{
    CK_RV rv = real->C_SignUpdate(session, part, part_len);
    log_call("C_SignUpdate", rv, "len=%lu", (unsigned long)part_len);
    return rv;
}

static CK_RV shim_SignFinal(CK_SESSION_HANDLE session, CK_BYTE_PTR sig, CK_ULONG_PTR sig_len)
{
    CK_RV rv;

    if (sig != NULL && sign_delay_ms > 0)
        card_delay();
    rv = real->C_SignFinal(session, sig, sig_len);
    log_call("C_SignFinal", rv, sig ? NULL : "query");
    return rv;
}

static void install_wrappers(void)
{
    shim.C_Initialize = shim_Initialize;
    shim.C_Finalize = shim_Finalize;
    shim.C_GetInfo = shim_GetInfo;
    shim.C_GetFunctionList = C_GetFunctionList;
    shim.C_GetTokenInfo = shim_GetTokenInfo;
    shim.C_OpenSession = shim_OpenSession;
    shim.C_CloseSession = shim_CloseSession;
    shim.C_CloseAllSessions = shim_CloseAllSessions;
    shim.C_Login = shim_Login;
    shim.C_Logout = shim_Logout;
    shim.C_FindObjectsInit = shim_FindObjectsInit;
    shim.C_SignInit = shim_SignInit;
    shim.C_Sign = shim_Sign;
    shim.C_SignUpdate = shim_SignUpdate;
    shim.C_SignFinal = shim_SignFinal;
}
