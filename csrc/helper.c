/* mtls_engine's hand-written C: what cffi alone cannot express safely. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dlfcn.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include <openssl/opensslv.h>
#include <openssl/ssl.h>
#include <openssl/ui.h>

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

/* ---- PIN prompts ----------------------------------------------------- */

/* A UI that never supplies a PIN.  mtls_engine logs in itself (once,
   after checking the token's PIN counters); if a backend ever decides it
   needs a PIN anyway, it must fail instead of prompting on a terminal or
   trying a PIN of its own. */
static int mtls_ui_refuse(UI *ui, UI_STRING *uis)
{
    (void)ui;
    (void)uis;
    return 0;
}

static UI_METHOD *mtls_refusing_ui(void)
{
    static UI_METHOD *method = NULL;
    if (method == NULL) {
        UI_METHOD *m = UI_create_method("mtls_engine: no PIN prompts");
        if (m == NULL)
            return NULL;
        UI_method_set_reader(m, mtls_ui_refuse);
        method = m;
    }
    return method;
}

/* ---- engine backend ------------------------------------------------- */

#ifdef MTLS_WITH_ENGINE

/* Load libp11's engine from `so_path` as a private instance (not added to
   OpenSSL's global engine list, so it cannot clash with an engine that an
   openssl.cnf loaded) and point it at the PKCS#11 module.  Returns a
   functional reference, or NULL with the reason on the error queue. */
static ENGINE *mtls_engine_open(const char *so_path, const char *module_path)
{
    ENGINE *e = ENGINE_by_id("dynamic");
    if (e == NULL)
        return NULL;
    if (!ENGINE_ctrl_cmd_string(e, "SO_PATH", so_path, 0)
        || !ENGINE_ctrl_cmd_string(e, "ID", "pkcs11", 0)
        || !ENGINE_ctrl_cmd_string(e, "LIST_ADD", "0", 0)
        || !ENGINE_ctrl_cmd_string(e, "LOAD", NULL, 0)
        || !ENGINE_ctrl_cmd_string(e, "MODULE_PATH", module_path, 0)
        || !ENGINE_init(e)) {
        ENGINE_free(e);
        return NULL;
    }
    ENGINE_free(e); /* drop the structural reference; keep the functional one */
    return e;
}

static EVP_PKEY *mtls_engine_load_private_key(ENGINE *e, const char *uri)
{
    return ENGINE_load_private_key(e, uri, mtls_refusing_ui(), NULL);
}

static void mtls_engine_close(ENGINE *e)
{
    if (e != NULL)
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

static ENGINE *mtls_engine_open(const char *so_path, const char *module_path)
{
    (void)so_path;
    (void)module_path;
    return NULL;
}

static EVP_PKEY *mtls_engine_load_private_key(ENGINE *e, const char *uri)
{
    (void)e;
    (void)uri;
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
   section) to the default library context, where CPython's SSL_CTXs live.
   Returns 1 on success; on a syntax error *error_line is set. */
static int mtls_apply_config(const char *text, long *error_line)
{
    BIO *bio = BIO_new_mem_buf(text, -1);
    CONF *conf = NCONF_new_ex(NULL, NULL);
    int ok = 0;
    *error_line = 0;
    if (bio != NULL && conf != NULL && NCONF_load_bio(conf, bio, error_line) > 0)
        ok = CONF_modules_load(conf, NULL, 0) > 0;
    NCONF_free(conf);
    BIO_free(bio);
    return ok;
}

/* Make sure the providers a plain OpenSSL would use (the configured ones,
   or the built-in default) are active before another provider is added:
   OpenSSL only falls back to "default" while no provider has been loaded. */
static void mtls_activate_fallbacks(void)
{
    EVP_MD *md = EVP_MD_fetch(NULL, "SHA256", NULL);
    EVP_MD_free(md);
    ERR_clear_error();
}

/* Load every private key the URI names through OSSL_STORE (the provider's
   "pkcs11" scheme).  Returns the key when exactly one was found; *count
   says how many there were.  Never prompts for a PIN. */
static EVP_PKEY *mtls_store_load_private_key(const char *uri, int *count)
{
    OSSL_STORE_CTX *store;
    EVP_PKEY *found = NULL;
    int rounds = 0;
    *count = 0;
    store = OSSL_STORE_open_ex(uri, NULL, NULL, mtls_refusing_ui(), NULL, NULL, NULL, NULL);
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
    if (*count > 1) {
        EVP_PKEY_free(found);
        return NULL;
    }
    return found;
}

/* 1 when a provider with this name has been loaded and activated. */
static int mtls_provider_loaded(const char *name)
{
    return OSSL_PROVIDER_available(NULL, name);
}

#else

static int mtls_apply_config(const char *text, long *error_line)
{
    (void)text;
    *error_line = 0;
    return 0;
}

static void mtls_activate_fallbacks(void) {}

static EVP_PKEY *mtls_store_load_private_key(const char *uri, int *count)
{
    (void)uri;
    *count = 0;
    return NULL;
}

static int mtls_provider_loaded(const char *name)
{
    (void)name;
    return 0;
}

#endif

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
