/* Helpers for tests/test_races.py, compiled by it: a UI method that wraps
   the default UI it found (as some libraries do when they install theirs),
   and threads that enter two of mtls_engine's C functions at the same
   moment, without the GIL between them. */
#include <pthread.h>
#include <stdint.h>

#include <openssl/ui.h>

/* ---- a foreign UI around the default one -------------------------------- */

#define WRAP_LIMIT 64 /* far deeper than an honest chain of UIs: a loop */

static const UI_METHOD *wrapped = NULL;
static UI_METHOD *foreign = NULL;
static __thread int depth = 0;
static int deepest = 0;

/* 1 when this call may go on to the wrapped UI; records the depth. */
static int enter(void)
{
    depth++;
    if (depth > deepest)
        deepest = depth;
    return depth <= WRAP_LIMIT;
}

static int f_open(UI *ui)
{
    int (*f)(UI *) = UI_method_get_opener(wrapped);
    int r = enter() ? (f != NULL ? f(ui) : 1) : 0;
    depth--;
    return r;
}

static int f_write(UI *ui, UI_STRING *uis)
{
    int (*f)(UI *, UI_STRING *) = UI_method_get_writer(wrapped);
    int r = enter() ? (f != NULL ? f(ui, uis) : 1) : 0;
    depth--;
    return r;
}

static int f_flush(UI *ui)
{
    int (*f)(UI *) = UI_method_get_flusher(wrapped);
    int r = enter() ? (f != NULL ? f(ui) : 1) : 0;
    depth--;
    return r;
}

static int f_read(UI *ui, UI_STRING *uis)
{
    int (*f)(UI *, UI_STRING *) = UI_method_get_reader(wrapped);
    int r = enter() ? (f != NULL ? f(ui, uis) : 1) : 0;
    depth--;
    return r;
}

static int f_close(UI *ui)
{
    int (*f)(UI *) = UI_method_get_closer(wrapped);
    int r = enter() ? (f != NULL ? f(ui) : 1) : 0;
    depth--;
    return r;
}

/* Make the foreign UI OpenSSL's default, wrapping the current default. */
int foreign_ui_install(void)
{
    wrapped = UI_get_default_method();
    foreign = UI_create_method("a foreign library's UI");
    if (wrapped == NULL || foreign == NULL)
        return 0;
    UI_method_set_opener(foreign, f_open);
    UI_method_set_writer(foreign, f_write);
    UI_method_set_flusher(foreign, f_flush);
    UI_method_set_reader(foreign, f_read);
    UI_method_set_closer(foreign, f_close);
    UI_set_default_method(foreign);
    return 1;
}

/* How many foreign UI calls were ever nested on one thread. */
int foreign_ui_deepest(void)
{
    return deepest;
}

/* One prompt through the default UI, that asks for no PIN: `text` as an
   information line, then (when `answer` is given) a visible prompt
   "Pass phrase:" whose answer is copied to `answer`.  UI_process's result. */
int foreign_ui_prompt(const char *text, char *answer, int answer_size)
{
    UI *ui = UI_new();
    int r;
    if (ui == NULL)
        return -2;
    UI_add_info_string(ui, text);
    if (answer != NULL)
        UI_add_input_string(ui, "Pass phrase:", UI_INPUT_FLAG_ECHO, answer, 0, answer_size - 1);
    r = UI_process(ui);
    UI_free(ui);
    return r;
}

/* ---- two threads, one context --------------------------------------------- */

struct race {
    void *ctx;
    void *card;
    int (*install)(void *, long, int);
    int (*attach)(void *, void *);
    int ready;
    int failed;
};

static void line_up(struct race *r)
{
    __atomic_add_fetch(&r->ready, 1, __ATOMIC_ACQ_REL);
    while (__atomic_load_n(&r->ready, __ATOMIC_ACQUIRE) < 2)
        ;
}

static void *run_install(void *arg)
{
    struct race *r = arg;
    line_up(r);
    if (!r->install(r->ctx, 1, 1))
        __atomic_add_fetch(&r->failed, 1, __ATOMIC_ACQ_REL);
    return NULL;
}

static void *run_attach(void *arg)
{
    struct race *r = arg;
    line_up(r);
    if (!r->attach(r->ctx, r->card))
        __atomic_add_fetch(&r->failed, 1, __ATOMIC_ACQ_REL);
    return NULL;
}

/* For each of the n contexts: one thread installs the peer hooks (access
   rule flag) while another attaches `card`, both let go at once.  Returns
   how many calls failed, or -1 when a thread could not start. */
int race_hooks(void **ctxs, int n, void *install, void *attach, void *card)
{
    int i, failed = 0;
    for (i = 0; i < n; i++) {
        struct race r = {ctxs[i], card, (int (*)(void *, long, int))(uintptr_t)install,
                         (int (*)(void *, void *))(uintptr_t)attach, 0, 0};
        pthread_t a, b;
        if (pthread_create(&a, NULL, run_install, &r) != 0)
            return -1;
        if (pthread_create(&b, NULL, run_attach, &r) != 0) {
            __atomic_add_fetch(&r.ready, 1, __ATOMIC_ACQ_REL);
            pthread_join(a, NULL);
            return -1;
        }
        pthread_join(a, NULL);
        pthread_join(b, NULL);
        failed += r.failed;
    }
    return failed;
}
