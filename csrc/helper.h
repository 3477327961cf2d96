/* cdefs: the project's own small C helpers (csrc/helper.c). */
static const int MTLS_HAS_ENGINE;
static const int MTLS_HAS_PROVIDER;

/* Interpreter checks */
void *mtls_symbol_in(const char *, const char *);
void *mtls_own_symbol(const char *);
const char *mtls_library_of(void *);
int mtls_readable(const void *, size_t);
SSL_CTX *mtls_ctx_candidate(uintptr_t, size_t);

/* PIN prompts: OpenSSL's default UI refuses PKCS#11 PIN prompts */
int mtls_guard_pin_prompts(void);

/* PKCS#11: a second function list from a loaded module (isolation check) */
void *mtls_module_function_list(const char *);

/* Engine backend (stubs returning NULL/0 when OpenSSL has no ENGINE API) */
ENGINE *mtls_engine_open(const char *, const char *, const char *, int);
EVP_PKEY *mtls_engine_load_private_key(ENGINE *, const char *, int, const char *, const char *, int);
int mtls_p11_slots(int *, int *, int *, int *);
void mtls_engine_close(ENGINE *);

/* Who still uses a backend instance: keys counted per instance */
struct mtls_users;
struct mtls_users *mtls_users_new(void);
int mtls_users_count(struct mtls_users *);
void mtls_users_free(struct mtls_users *);
int mtls_pkey_track(EVP_PKEY *, struct mtls_users *);
int mtls_dl_keep(const char *);
char *dlerror(void);
int mtls_engine_listed(const char *);

/* Provider backend (stubs returning 0/NULL before OpenSSL 3) */
int mtls_apply_config(OSSL_LIB_CTX *, const char *, long *);
EVP_PKEY *mtls_store_load_private_key(OSSL_LIB_CTX *, const char *, const char *, int, int, int *);
int mtls_provider_loaded(OSSL_LIB_CTX *, const char *);
OSSL_LIB_CTX *mtls_libctx_new(void);
int mtls_provider_wake(OSSL_LIB_CTX *);
int mtls_provider_describe(const char *, char *, size_t, char *, size_t, char *, size_t);

/* check: the OpenSSL the extension was compiled with */
unsigned long mtls_built_openssl_number(void);

/* check: one signature through the loaded key */
int mtls_test_sign(EVP_PKEY *, const char *, int, const unsigned char *, size_t, unsigned char *, size_t *);

/* peer checks (server: reasons, rules; both: CRLs) */
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
extern "Python+C" int mtls_py_peer_rule(long, const unsigned char *, size_t);
extern "Python+C" int mtls_py_present(long, const char *);
extern "Python+C" void mtls_py_rejected(long, int, int, struct mtls_peer_record *, const char *);
extern "Python+C" int mtls_py_recover(long);
int mtls_install_peer_hooks(SSL_CTX *, long, int);
int mtls_verify_callback_installed(SSL_CTX *);
int mtls_hooks_state(SSL_CTX *);
int mtls_set_crls(SSL_CTX *, const unsigned char **, const size_t *, int);
void mtls_no_resumption(SSL_CTX *);
int mtls_set_client_ca_names(SSL_CTX *, int);
long mtls_session_cache_mode(SSL_CTX *);

/* a card key that may go away (p11-kit server restarted, card pulled) */
struct mtls_card;
struct mtls_card *mtls_card_new(long);
int mtls_attach_card(SSL_CTX *, struct mtls_card *);
int mtls_card_set_key(struct mtls_card *, EVP_PKEY *);
unsigned long mtls_card_state(struct mtls_card *, int, unsigned long *);
EVP_PKEY *mtls_card_key(struct mtls_card *);
unsigned long mtls_card_take_failure(struct mtls_card *);
unsigned long mtls_card_generation(struct mtls_card *);
