/* Preloaded (before libasan) into the Python processes of ci/sanitize.sh:
   AddressSanitizer refuses dlopen(..., RTLD_DEEPBIND) ("incompatible with
   sanitizer runtime") and aborts, and pkcs11-provider loads its PKCS#11
   module with that flag.  Dropping the flag changes only which definition
   wins when the module and the process both define a symbol; none of the
   modules the suite loads depends on that. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>

void *dlopen(const char *file, int mode)
{
    static void *(*next)(const char *, int) = NULL;
    if (next == NULL)
        next = (void *(*)(const char *, int))dlsym(RTLD_NEXT, "dlopen");
    if (next == NULL)
        return NULL;
    return next(file, mode & ~RTLD_DEEPBIND);
}
