/*
 * blockcrypt.crypto._datapath: the compiled data path.
 *
 * Two types:
 *
 *   Xts(key, sector_size)   AES-256-XTS in dm-crypt's aes-xts-plain64 layout over
 *                           whole sectors, through libcrypto's documented EVP API.
 *                           The 64-byte key (K1 || K2) lives in a page of its own,
 *                           mlock'ed, MADV_DONTDUMP and MADV_WIPEONFORK, wiped with
 *                           OPENSSL_cleanse by wipe().
 *   Disk(fd, data_offset, size_bytes, sector_size, read_only, xts, name)
 *                           one whole NBD request per call (pread, pwrite, zero) on
 *                           a container file: pread(2)/pwrite(2), XTS, the
 *                           zero-sector rule, the partial-sector read-modify-write
 *                           and the striped sector locks, all with the GIL
 *                           released from start to end.  xts=None: unencrypted.
 *
 * Key schedules: each request makes its own EVP_CIPHER_CTX (keyed from the locked
 * page) and frees it before returning; EVP_CIPHER_CTX_free cleanses the provider's
 * context, so between requests the only copy of the key is the locked page.
 *
 * Plus the thread-state pinning the nbdkit plugin uses (documented C API only).
 *
 * Sources: xts.c (Xts), disk.c (a request, without the GIL), disk_type.c (the
 * Disk type), this file (errors, thread states, init), datapath.h (what they
 * share).
 *
 * Layout rules (docs/FORMAT.md): sector i of the disk is at file offset
 * data_offset + i * sector_size; its XTS tweak is i * (sector_size / 512) as a
 * 64-bit little-endian integer, zero-padded to 16 bytes (plain64); a 4096-byte
 * sector is one XTS data unit.  A stored sector of all zero bytes reads as
 * plaintext zeros (holes).
 */
#include "datapath.h"

PyObject *WipedError;
const EVP_CIPHER *xts_cipher;

PyObject *
raise_status(const Status *st, const char *what)
{
    switch (st->kind) {
    case FAIL_ERRNO:
        errno = st->err;
        return PyErr_SetFromErrno(PyExc_OSError);
    case FAIL_CRYPTO:
        ERR_clear_error();
        PyErr_Format(PyExc_RuntimeError, "OpenSSL XTS failed on tweak %llu",
                     (unsigned long long)st->tweak);
        return NULL;
    case FAIL_WIPED:
        PyErr_Format(WipedError, "%s", what);
        return NULL;
    case FAIL_NOMEM:
        return PyErr_NoMemory();
    }
    Py_RETURN_NONE;
}

PyObject *
raise_oserror(int err, PyObject *msg)
{
    if (msg == NULL)
        return NULL;
    PyObject *args = Py_BuildValue("(iN)", err, msg);
    if (args != NULL) {
        PyErr_SetObject(PyExc_OSError, args);
        Py_DECREF(args);
    }
    return NULL;
}

void
init_rwlock(pthread_rwlock_t *lock)
{
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
    /* wipe()/close() must not starve behind a stream of requests */
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(lock, &attr);
    pthread_rwlockattr_destroy(&attr);
}

/* ---------------------------------------------------------------------------
 * Thread-state pinning for the nbdkit plugin (documented C API).
 */
static PyObject *
pin_thread_state(PyObject *mod, PyObject *Py_UNUSED(ignored))
{
    /* One PyGILState_Ensure of our own, never released by nbdkit: the calling
     * thread's state then survives nbdkit's PyGILState_Release. */
    PyThreadState *ts = PyThreadState_Get();
    PyGILState_STATE was = PyGILState_Ensure();
    if (was != PyGILState_LOCKED) {
        PyGILState_Release(was);
        PyErr_SetString(PyExc_RuntimeError, "PyGILState_Ensure: the GIL was not held");
        return NULL;
    }
    return PyLong_FromVoidPtr(ts);
}

static PyObject *
release_thread_state(PyObject *mod, PyObject *arg)
{
    PyThreadState *ts = PyLong_AsVoidPtr(arg);
    if (ts == NULL && PyErr_Occurred())
        return NULL;
    if (ts == PyThreadState_Get()) {
        PyGILState_Release(PyGILState_LOCKED);   /* only counts down; keeps the GIL */
        Py_RETURN_FALSE;
    }
    PyThreadState_Clear(ts);                     /* its thread has exited */
    PyThreadState_Delete(ts);
    Py_RETURN_TRUE;
}

static PyObject *
live_thread_states(PyObject *mod, PyObject *Py_UNUSED(ignored))
{
    long n = 0;
    for (PyThreadState *ts = PyInterpreterState_ThreadHead(PyInterpreterState_Get());
         ts != NULL; ts = PyThreadState_Next(ts))
        n++;
    return PyLong_FromLong(n);
}

static PyMethodDef module_methods[] = {
    {"pin_thread_state", pin_thread_state, METH_NOARGS,
     "Keep the calling thread's Python thread state alive (PyGILState_Ensure without a\n"
     "release); returns it as an int for release_thread_state."},
    {"release_thread_state", release_thread_state, METH_O,
     "Drop a pinned state: PyGILState_Release if it is the caller's, else\n"
     "PyThreadState_Clear + PyThreadState_Delete (its thread must have exited)."},
    {"live_thread_states", live_thread_states, METH_NOARGS,
     "How many thread states the interpreter has."},
    {NULL}
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "blockcrypt.crypto._datapath",
    .m_doc = "The compiled data path: AES-256-XTS (EVP) and whole NBD requests on a file.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__datapath(void)
{
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
    /* Fetched once: EVP_aes_256_xts() would be fetched again on every keying. */
    if (xts_cipher == NULL)
        xts_cipher = EVP_CIPHER_fetch(NULL, "AES-256-XTS", NULL);
#else
    xts_cipher = EVP_aes_256_xts();
#endif
    if (xts_cipher == NULL) {
        ERR_clear_error();
        PyErr_SetString(PyExc_ImportError, "libcrypto has no AES-256-XTS");
        return NULL;
    }
    static int key_made = 0;
    if (!key_made) {
        if (pthread_key_create(&scratch_key, scratch_destroy) != 0) {
            PyErr_SetString(PyExc_ImportError, "pthread_key_create failed");
            return NULL;
        }
        key_made = 1;
    }
    if (PyType_Ready(&XtsType) < 0 || PyType_Ready(&DiskType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL)
        return NULL;
    WipedError = PyErr_NewExceptionWithDoc(
        "blockcrypt.crypto._datapath.WipedError",
        "A request on a wiped cipher or a closed disk.", PyExc_RuntimeError, NULL);
    if (WipedError == NULL
            || PyModule_AddObjectRef(m, "WipedError", WipedError) < 0
            || PyModule_AddObjectRef(m, "Xts", (PyObject *)&XtsType) < 0
            || PyModule_AddObjectRef(m, "Disk", (PyObject *)&DiskType) < 0
            || PyModule_AddIntConstant(m, "CHUNK_BYTES", CHUNK_BYTES) < 0
            || PyModule_AddIntConstant(m, "LOCK_GROUP", LOCK_GROUP) < 0
            || PyModule_AddIntConstant(m, "LOCK_STRIPES", LOCK_STRIPES) < 0
            || PyModule_AddStringConstant(m, "OPENSSL_VERSION",
                                          OpenSSL_version(OPENSSL_VERSION)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
