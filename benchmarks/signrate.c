/*
 * How fast one key signs, with nothing else in the way: the limits the
 * handshake benchmark (benchmarks/handshake.py) compares against.
 *
 *   signrate p11  MODULE TOKEN KEYLABEL ALG THREADS SECONDS   PIN in $MTLS_BENCH_PIN
 *   signrate soft KEYFILE ALG THREADS SECONDS
 *
 * ALG: ecdsa (a SHA-256 digest, CKM_ECDSA) or rsa-pss (a SHA-256 digest,
 * CKM_RSA_PKCS_PSS with MGF1-SHA256 and a 32-byte salt): what libp11's
 * engine asks a token for in a TLS handshake.
 *
 * p11: C_SignInit + C_Sign through the PKCS#11 module, the key found once,
 * one session per thread (opened before the clock starts).
 * soft: the same signature in software with the key in a PEM file, through
 * the libcrypto this program links (the system's, as CPython's ssl), made the
 * way libssl makes a handshake signature: a fresh EVP_MD_CTX,
 * EVP_DigestSignInit_ex and EVP_DigestSign over 130 bytes each time.
 *
 * Prints one JSON line: signatures, wall seconds, process CPU seconds.
 * The PIN is read from the environment, never from the argument list.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <p11-kit/pkcs11.h>

#define MAX_THREADS 64

static double now(clockid_t clock)
{
    struct timespec t;

    clock_gettime(clock, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void die(const char *what, unsigned long code)
{
    fprintf(stderr, "signrate: %s (0x%08lX)\n", what, code);
    exit(1);
}

/* ---- shared timing ------------------------------------------------------- */

static pthread_barrier_t start_line;
static double deadline;                 /* CLOCK_MONOTONIC */
static int rsa_pss;
static unsigned char digest[32] = "0123456789abcdef0123456789abcdef";
static unsigned char message[130];      /* a TLS 1.3 CertificateVerify input is ~130 bytes */

struct worker {
    pthread_t thread;
    long signatures;
    /* p11 */
    CK_SESSION_HANDLE session;
    /* soft */
    EVP_PKEY *pkey;
};

/* ---- PKCS#11 ----------------------------------------------------------------- */

static CK_FUNCTION_LIST_PTR p11;
static CK_OBJECT_HANDLE p11_key;

static void *p11_worker(void *arg)
{
    struct worker *w = arg;
    CK_RSA_PKCS_PSS_PARAMS pss = {CKM_SHA256, CKG_MGF1_SHA256, 32};
    CK_MECHANISM mech = {CKM_ECDSA, NULL, 0};
    unsigned char sig[512];
    CK_ULONG len;
    CK_RV rv;

    if (rsa_pss) {
        mech.mechanism = CKM_RSA_PKCS_PSS;
        mech.pParameter = &pss;
        mech.ulParameterLen = sizeof pss;
    }
    pthread_barrier_wait(&start_line);
    while (now(CLOCK_MONOTONIC) < deadline) {
        rv = p11->C_SignInit(w->session, &mech, p11_key);
        if (rv != CKR_OK)
            die("C_SignInit failed", rv);
        len = sizeof sig;
        rv = p11->C_Sign(w->session, digest, sizeof digest, sig, &len);
        if (rv != CKR_OK)
            die("C_Sign failed", rv);
        w->signatures++;
    }
    return NULL;
}

static CK_SLOT_ID find_slot(const char *label)
{
    CK_SLOT_ID slots[64];
    CK_ULONG n = 64, i;
    CK_TOKEN_INFO info;
    size_t len = strlen(label);

    if (p11->C_GetSlotList(CK_TRUE, slots, &n) != CKR_OK)
        die("C_GetSlotList failed", 0);
    for (i = 0; i < n; i++) {
        if (p11->C_GetTokenInfo(slots[i], &info) != CKR_OK)
            continue;
        if (len <= 32 && memcmp(info.label, label, len) == 0 &&
            (len == 32 || info.label[len] == ' '))
            return slots[i];
    }
    die("no token with that label", 0);
    return 0;
}

static void p11_setup(const char *module, const char *token, const char *key_label, struct worker *w, int threads)
{
    CK_C_GetFunctionList get_list;
    CK_C_INITIALIZE_ARGS init = {0};
    CK_SESSION_HANDLE session;
    CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof cls},
        {CKA_LABEL, (void *)key_label, strlen(key_label)},
    };
    CK_ULONG found = 0;
    CK_SLOT_ID slot;
    const char *pin = getenv("MTLS_BENCH_PIN");
    void *so = dlopen(module, RTLD_NOW | RTLD_LOCAL);
    CK_RV rv;
    int i;

    if (so == NULL) {
        fprintf(stderr, "signrate: %s\n", dlerror());
        exit(1);
    }
    get_list = (CK_C_GetFunctionList)dlsym(so, "C_GetFunctionList");
    if (get_list == NULL || get_list(&p11) != CKR_OK)
        die("no C_GetFunctionList", 0);
    init.flags = CKF_OS_LOCKING_OK;
    rv = p11->C_Initialize(&init);
    if (rv != CKR_OK)
        die("C_Initialize failed", rv);
    slot = find_slot(token);
    rv = p11->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &session);
    if (rv != CKR_OK)
        die("C_OpenSession failed", rv);
    if (pin == NULL)
        die("MTLS_BENCH_PIN is not set", 0);
    rv = p11->C_Login(session, CKU_USER, (unsigned char *)pin, strlen(pin));
    if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN)
        die("C_Login failed", rv);
    rv = p11->C_FindObjectsInit(session, tmpl, 2);
    if (rv == CKR_OK)
        rv = p11->C_FindObjects(session, &p11_key, 1, &found);
    p11->C_FindObjectsFinal(session);
    if (rv != CKR_OK || found != 1)
        die("private key not found", rv);
    for (i = 0; i < threads; i++) {
        rv = p11->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &w[i].session);
        if (rv != CKR_OK)
            die("C_OpenSession failed", rv);
    }
}

/* ---- software ---------------------------------------------------------------- */

static void *soft_worker(void *arg)
{
    struct worker *w = arg;
    unsigned char sig[512];
    size_t len;
    EVP_MD_CTX *md;
    EVP_PKEY_CTX *pctx;

    pthread_barrier_wait(&start_line);
    while (now(CLOCK_MONOTONIC) < deadline) {
        md = EVP_MD_CTX_new();
        if (md == NULL || !EVP_DigestSignInit_ex(md, &pctx, "SHA256", NULL, NULL, w->pkey, NULL))
            die("EVP_DigestSignInit_ex failed", ERR_get_error());
        if (rsa_pss && (EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING) <= 0 ||
                        EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, RSA_PSS_SALTLEN_DIGEST) <= 0))
            die("cannot set RSA-PSS", ERR_get_error());
        len = sizeof sig;
        if (!EVP_DigestSign(md, sig, &len, message, sizeof message))
            die("EVP_DigestSign failed", ERR_get_error());
        EVP_MD_CTX_free(md);
        w->signatures++;
    }
    return NULL;
}

static void soft_setup(const char *keyfile, struct worker *w, int threads)
{
    FILE *f = fopen(keyfile, "r");
    EVP_PKEY *pkey;
    int i;

    if (f == NULL)
        die("cannot open the key file", 0);
    pkey = PEM_read_PrivateKey(f, NULL, NULL, NULL);
    fclose(f);
    if (pkey == NULL)
        die("cannot read the key file", ERR_get_error());
    for (i = 0; i < threads; i++)
        w[i].pkey = pkey;
}

/* ---- main ---------------------------------------------------------------- */

int main(int argc, char **argv)
{
    static struct worker w[MAX_THREADS];
    void *(*body)(void *);
    const char *alg;
    int threads, i;
    double seconds, wall0, cpu0, wall1, cpu1;
    long total = 0;

    if (argc == 8 && strcmp(argv[1], "p11") == 0) {
        alg = argv[5];
        threads = atoi(argv[6]);
        seconds = atof(argv[7]);
    } else if (argc == 6 && strcmp(argv[1], "soft") == 0) {
        alg = argv[3];
        threads = atoi(argv[4]);
        seconds = atof(argv[5]);
    } else {
        fprintf(stderr, "usage: signrate p11 MODULE TOKEN KEYLABEL ALG THREADS SECONDS\n"
                        "       signrate soft KEYFILE ALG THREADS SECONDS\n");
        return 2;
    }
    if (threads < 1 || threads > MAX_THREADS || seconds <= 0)
        die("bad THREADS or SECONDS", 0);
    if (strcmp(alg, "rsa-pss") == 0)
        rsa_pss = 1;
    else if (strcmp(alg, "ecdsa") != 0)
        die("ALG must be ecdsa or rsa-pss", 0);
    memset(message, 0x5a, sizeof message);
    if (argv[1][0] == 'p') {
        p11_setup(argv[2], argv[3], argv[4], w, threads);
        body = p11_worker;
    } else {
        soft_setup(argv[2], w, threads);
        body = soft_worker;
    }
    pthread_barrier_init(&start_line, NULL, (unsigned)threads + 1);
    for (i = 0; i < threads; i++)
        pthread_create(&w[i].thread, NULL, body, &w[i]);
    wall0 = now(CLOCK_MONOTONIC);
    deadline = wall0 + seconds;
    cpu0 = now(CLOCK_PROCESS_CPUTIME_ID);
    pthread_barrier_wait(&start_line);
    for (i = 0; i < threads; i++) {
        pthread_join(w[i].thread, NULL);
        total += w[i].signatures;
    }
    wall1 = now(CLOCK_MONOTONIC);
    cpu1 = now(CLOCK_PROCESS_CPUTIME_ID);
    printf("{\"signatures\": %ld, \"wall\": %.6f, \"cpu\": %.6f, \"threads\": %d}\n", total, wall1 - wall0,
           cpu1 - cpu0, threads);
    return 0;
}
