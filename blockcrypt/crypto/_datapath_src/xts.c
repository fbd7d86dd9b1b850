/*
 * The Xts type: AES-256-XTS (dm-crypt aes-xts-plain64) over whole sectors
 * through libcrypto's documented EVP API.  The key lives in a page of its own
 * (mlock, MADV_DONTDUMP, MADV_WIPEONFORK), cleansed by wipe(); every request
 * keys its own EVP_CIPHER_CTX from it and frees it (cleansed) before returning.
 */
#include "datapath.h"

static void
xts_free_key(XtsObject *self)
{
    if (self->key != NULL) {
        OPENSSL_cleanse(self->key, KEY_BYTES);
        if (self->locked)
            munlock(self->key, self->map_bytes);
        munmap(self->key, self->map_bytes);
        self->key = NULL;
    }
    self->wiped = 1;
}

static int
Xts_init(XtsObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"key", "sector_size", NULL};
    Py_buffer key;
    unsigned sector_size;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*I", kwlist, &key, &sector_size))
        return -1;
    if (self->key != NULL || self->map_bytes) {
        PyBuffer_Release(&key);
        PyErr_SetString(PyExc_TypeError, "Xts objects cannot be re-initialised");
        return -1;
    }
    if (key.len != KEY_BYTES) {
        PyBuffer_Release(&key);
        PyErr_Format(PyExc_ValueError, "an AES-256-XTS key is %d bytes, got %zd",
                     KEY_BYTES, key.len);
        return -1;
    }
    if (CRYPTO_memcmp(key.buf, (const unsigned char *)key.buf + 32, 32) == 0) {
        PyBuffer_Release(&key);
        PyErr_SetString(PyExc_ValueError, "the two halves of the XTS key are equal");
        return -1;
    }
    if (sector_size != 512 && sector_size != 4096) {
        PyBuffer_Release(&key);
        PyErr_Format(PyExc_ValueError, "XTS sector size %u is not supported", sector_size);
        return -1;
    }
    long page = sysconf(_SC_PAGESIZE);
    size_t map_bytes = page > 0 ? (size_t)page : 4096;
    void *mem = mmap(NULL, map_bytes, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
        PyBuffer_Release(&key);
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    /* Before the key is copied in: never swapped, never in a core dump, zero in a
     * forked child.  mlock may be refused (RLIMIT_MEMLOCK): reported by .locked. */
    self->locked = mlock(mem, map_bytes) == 0;
    self->dontdump = madvise(mem, map_bytes, MADV_DONTDUMP) == 0;
    (void)madvise(mem, map_bytes, MADV_WIPEONFORK);
    memcpy(mem, key.buf, KEY_BYTES);
    PyBuffer_Release(&key);
    self->key = mem;
    self->map_bytes = map_bytes;
    self->sector_size = sector_size;
    self->tweak_step = sector_size / IV_SECTOR_BYTES;
    self->wiped = 0;
    return 0;
}

static PyObject *
Xts_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    XtsObject *self = (XtsObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->key = NULL;
    self->map_bytes = 0;
    self->wiped = 1;
    init_rwlock(&self->lock);
    return (PyObject *)self;
}

static void
Xts_dealloc(XtsObject *self)
{
    xts_free_key(self);
    pthread_rwlock_destroy(&self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* A keyed context for one direction, made for one request (NULL on failure). */
static EVP_CIPHER_CTX *
ctx_new(const XtsObject *x, int encrypt)
{
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL)
        return NULL;
    if (EVP_CipherInit_ex(ctx, xts_cipher, NULL, x->key, NULL, encrypt) != 1) {
        EVP_CIPHER_CTX_free(ctx);
        ERR_clear_error();
        return NULL;
    }
    EVP_CIPHER_CTX_set_padding(ctx, 0);
    return ctx;
}


void
crypt_done(Crypt *c)
{
    for (int i = 0; i < 2; i++) {
        if (c->ctx[i] != NULL) {
            EVP_CIPHER_CTX_free(c->ctx[i]);      /* cleanses the key schedules */
            c->ctx[i] = NULL;
        }
    }
}

/* One XTS data unit: a new IV (tweak) on the keyed context, then one update. */
static int
crypt_unit(EVP_CIPHER_CTX *ctx, const unsigned char iv[16], const unsigned char *src,
           unsigned char *dst, size_t len)
{
    int outl = 0;
    if (EVP_CipherInit_ex(ctx, NULL, NULL, NULL, iv, -1) != 1
            || EVP_CipherUpdate(ctx, dst, &outl, src, (int)len) != 1 || outl != (int)len)
        return -1;
    return 0;
}

/* XTS over n whole sectors from src to dst (may be equal), first sector `sector`. */
int
crypt_sectors(Crypt *c, const unsigned char *src, unsigned char *dst, size_t n,
              uint64_t sector, int encrypt, Status *st)
{
    const XtsObject *x = c->x;
    EVP_CIPHER_CTX *ctx = c->ctx[encrypt];
    if (ctx == NULL) {
        ctx = c->ctx[encrypt] = ctx_new(x, encrypt);
        if (ctx == NULL) {
            st->kind = FAIL_CRYPTO;
            st->tweak = sector * x->tweak_step;
            return -1;
        }
    }
    unsigned ss = x->sector_size;
    unsigned char iv[16];
    memset(iv, 0, sizeof iv);
    uint64_t tweak = sector * x->tweak_step;
    for (size_t off = 0; off < n; off += ss, tweak += x->tweak_step) {
        for (int b = 0; b < 8; b++)
            iv[b] = (unsigned char)(tweak >> (8 * b));     /* plain64: little-endian */
        if (crypt_unit(ctx, iv, src + off, dst + off, ss)) {
            st->kind = FAIL_CRYPTO;
            st->tweak = tweak;
            return -1;
        }
    }
    return 0;
}

static int
is_zero(const unsigned char *p, size_t n)
{
    uint64_t w;
    memcpy(&w, p, 8);
    if (w)                                   /* ciphertext: almost always decided here */
        return 0;
    for (size_t i = 8; i < n; i += 8) {
        memcpy(&w, p + i, 8);
        if (w)
            return 0;
    }
    return 1;
}

/* Decrypt stored sectors in place; all-zero stored sectors stay zeros. */
int
decrypt_stored(Crypt *c, unsigned char *buf, size_t n, uint64_t sector, Status *st)
{
    unsigned ss = c->x->sector_size;
    size_t run = 0;                          /* start of the current non-zero run */
    size_t off;
    for (off = 0; off < n; off += ss) {
        if (is_zero(buf + off, ss)) {
            if (off > run && crypt_sectors(c, buf + run, buf + run, off - run,
                                           sector + run / ss, 0, st))
                return -1;
            run = off + ss;
        }
    }
    if (n > run)
        return crypt_sectors(c, buf + run, buf + run, n - run, sector + run / ss, 0, st);
    return 0;
}

static PyObject *
Xts_crypt(XtsObject *self, PyObject *args)
{
    PyObject *src_obj, *dst_obj, *sector_obj;
    int encrypt;
    if (!PyArg_ParseTuple(args, "OOO!p", &src_obj, &dst_obj, &PyLong_Type, &sector_obj,
                          &encrypt))
        return NULL;
    unsigned long long sector = PyLong_AsUnsignedLongLong(sector_obj);   /* checked */
    if (sector == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    Py_buffer dst, src;
    if (PyObject_GetBuffer(dst_obj, &dst, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    if (src_obj == dst_obj) {
        src = dst;
    } else if (PyObject_GetBuffer(src_obj, &src, PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&dst);
        return NULL;
    }
    PyObject *result = NULL;
    const char *s = src.buf, *d = dst.buf;
    if (src.len != dst.len) {
        PyErr_Format(PyExc_ValueError, "destination is %zd bytes, source %zd",
                     dst.len, src.len);
    } else if (src.len % self->sector_size) {
        PyErr_Format(PyExc_ValueError, "buffer of %zd bytes is not a multiple of the "
                     "%u-byte sector size", src.len, self->sector_size);
    } else if (s != d && s < d + dst.len && d < s + src.len) {
        PyErr_SetString(PyExc_ValueError, "source and destination overlap without being "
                        "the same buffer");
    } else if (src.len && (sector > UINT64_MAX / self->tweak_step
                           || (uint64_t)(src.len / self->sector_size - 1) >
                              UINT64_MAX / self->tweak_step - sector)) {
        PyErr_SetString(PyExc_ValueError, "sector beyond the 64-bit plain64 tweak range");
    } else {
        Status st = {OK, 0, 0};
        Py_BEGIN_ALLOW_THREADS
        pthread_rwlock_rdlock(&self->lock);
        if (self->wiped) {
            st.kind = FAIL_WIPED;
        } else if (src.len) {
            Crypt c = {self, {NULL, NULL}};
            crypt_sectors(&c, src.buf, dst.buf, (size_t)src.len, sector, encrypt, &st);
            crypt_done(&c);
        }
        pthread_rwlock_unlock(&self->lock);
        Py_END_ALLOW_THREADS
        result = raise_status(&st, "the XTS cipher has been wiped");
    }
    if (src_obj != dst_obj)
        PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

static PyObject *
Xts_crypt_unit(XtsObject *self, PyObject *args)
{
    Py_buffer iv, src;
    int encrypt;
    if (!PyArg_ParseTuple(args, "y*y*p", &iv, &src, &encrypt))
        return NULL;
    PyObject *out = NULL;
    if (iv.len != 16 || src.len < 16 || src.len > (1 << 24)) {
        PyErr_SetString(PyExc_ValueError, "crypt_unit needs a 16-byte tweak and 16 bytes to "
                        "16 MiB of data");
    } else if ((out = PyBytes_FromStringAndSize(NULL, src.len)) != NULL) {
        Status st = {OK, 0, 0};
        unsigned char *dst = (unsigned char *)PyBytes_AS_STRING(out);
        Py_BEGIN_ALLOW_THREADS
        pthread_rwlock_rdlock(&self->lock);
        if (self->wiped) {
            st.kind = FAIL_WIPED;
        } else {
            EVP_CIPHER_CTX *ctx = ctx_new(self, encrypt);
            if (ctx == NULL || crypt_unit(ctx, iv.buf, src.buf, dst, (size_t)src.len))
                st.kind = FAIL_CRYPTO;
            EVP_CIPHER_CTX_free(ctx);
        }
        pthread_rwlock_unlock(&self->lock);
        Py_END_ALLOW_THREADS
        if (st.kind != OK) {
            Py_CLEAR(out);
            raise_status(&st, "the XTS cipher has been wiped");
        }
    }
    PyBuffer_Release(&iv);
    PyBuffer_Release(&src);
    return out;
}

static PyObject *
Xts_wipe(XtsObject *self, PyObject *Py_UNUSED(ignored))
{
    Py_BEGIN_ALLOW_THREADS               /* waits for running requests */
    pthread_rwlock_wrlock(&self->lock);
    xts_free_key(self);
    pthread_rwlock_unlock(&self->lock);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *
Xts_get_key_address(XtsObject *self, void *closure)
{
    if (self->key == NULL)
        Py_RETURN_NONE;
    return PyLong_FromVoidPtr(self->key);
}

static PyObject *
Xts_get_bool(XtsObject *self, void *closure)
{
    int v = closure == (void *)0 ? self->locked : closure == (void *)1 ? self->dontdump
                                                                        : self->wiped;
    return PyBool_FromLong(v);
}

static PyObject *
Xts_get_sector_size(XtsObject *self, void *closure)
{
    return PyLong_FromUnsignedLong(self->sector_size);
}

static PyMethodDef Xts_methods[] = {
    {"crypt", (PyCFunction)Xts_crypt, METH_VARARGS,
     "crypt(src, dst, sector_index, encrypt): XTS over whole sectors, GIL released;\n"
     "dst may be src."},
    {"crypt_unit", (PyCFunction)Xts_crypt_unit, METH_VARARGS,
     "crypt_unit(tweak16, data, encrypt) -> bytes: one XTS data unit of any length\n"
     ">= 16 bytes with an arbitrary 16-byte tweak, through the same EVP calls as\n"
     "crypt() (for known-answer tests whose units are not sectors)."},
    {"wipe", (PyCFunction)Xts_wipe, METH_NOARGS,
     "Cleanse and unmap the key (waits for running requests); later requests raise "
     "WipedError."},
    {NULL}
};

static PyGetSetDef Xts_getset[] = {
    {"key_address", (getter)Xts_get_key_address, NULL,
     "address of the locked key page (None once wiped), for memory tests", NULL},
    {"locked", (getter)Xts_get_bool, NULL, "whether the key page is mlock'ed", (void *)0},
    {"dontdump", (getter)Xts_get_bool, NULL, "whether the key page is MADV_DONTDUMP",
     (void *)1},
    {"wiped", (getter)Xts_get_bool, NULL, "whether wipe() ran", (void *)2},
    {"sector_size", (getter)Xts_get_sector_size, NULL, "512 or 4096", NULL},
    {NULL}
};

PyTypeObject XtsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "blockcrypt.crypto._datapath.Xts",
    .tp_basicsize = sizeof(XtsObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Xts(key, sector_size): AES-256-XTS (aes-xts-plain64), key in locked memory.",
    .tp_new = Xts_new,
    .tp_init = (initproc)Xts_init,
    .tp_dealloc = (destructor)Xts_dealloc,
    .tp_methods = Xts_methods,
    .tp_getset = Xts_getset,
};
