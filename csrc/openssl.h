/* cdefs: the libssl/libcrypto subset mtls_engine calls (OpenSSL >= 3.0). */
typedef ... SSL_CTX;
typedef ... X509;
typedef ... ASN1_TIME;
typedef ... EVP_PKEY;
typedef ... BIO;
typedef ... ENGINE;
typedef ... UI_METHOD;
typedef ... OSSL_PROVIDER;
typedef ... OSSL_LIB_CTX;

#define OPENSSL_VERSION ...
#define OPENSSL_ENGINES_DIR ...
#define OPENSSL_MODULES_DIR ...
#define TLS1_2_VERSION ...
#define TLS1_3_VERSION ...
#define SSL_VERIFY_NONE ...
#define SSL_VERIFY_PEER ...
#define SSL_VERIFY_FAIL_IF_NO_PEER_CERT ...

unsigned long OpenSSL_version_num(void);
const char *OpenSSL_version(int);
const char *OPENSSL_info(int);
#define OPENSSL_INFO_ENGINES_DIR ...
#define OPENSSL_INFO_MODULES_DIR ...

unsigned long ERR_get_error(void);
unsigned long ERR_peek_error(void);
unsigned long ERR_get_error_all(const char **, int *, const char **, const char **, int *);
void ERR_clear_error(void);
void ERR_error_string_n(unsigned long, char *, size_t);
const char *ERR_lib_error_string(unsigned long);
const char *ERR_reason_error_string(unsigned long);
int ERR_GET_LIB(unsigned long);
int ERR_GET_REASON(unsigned long);
unsigned long ERR_PACK(int, int, int);
#define ERR_LIB_SSL ...

uint64_t SSL_CTX_get_options(const SSL_CTX *);
int SSL_CTX_get_verify_mode(const SSL_CTX *);
long SSL_CTX_get_min_proto_version(SSL_CTX *);
long SSL_CTX_get_max_proto_version(SSL_CTX *);
int SSL_CTX_set_max_proto_version(SSL_CTX *, int);
int SSL_CTX_use_certificate(SSL_CTX *, X509 *);
int SSL_CTX_use_PrivateKey(SSL_CTX *, EVP_PKEY *);
int SSL_CTX_check_private_key(const SSL_CTX *);
long SSL_CTX_add1_chain_cert(SSL_CTX *, X509 *);
int SSL_CTX_set1_client_sigalgs_list(SSL_CTX *, const char *);

X509 *d2i_X509(X509 **, const unsigned char **, long);
void X509_free(X509 *);
int X509_check_private_key(const X509 *, const EVP_PKEY *);
const ASN1_TIME *X509_get0_notAfter(const X509 *);
int ASN1_TIME_compare(const ASN1_TIME *, const ASN1_TIME *);
void EVP_PKEY_free(EVP_PKEY *);
EVP_PKEY *d2i_PUBKEY(EVP_PKEY **, const unsigned char **, long);
int EVP_PKEY_get_id(const EVP_PKEY *);
int EVP_PKEY_get_bits(const EVP_PKEY *);
#define EVP_PKEY_RSA ...
#define EVP_PKEY_EC ...


#define OSSL_STORE_INFO_PKEY ...
int OSSL_PROVIDER_available(OSSL_LIB_CTX *, const char *);
int SSL_CTX_set1_sigalgs_list(SSL_CTX *, const char *);
const char *X509_verify_cert_error_string(long);
