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
 * Layout rules (docs/FORMAT.md): sector i of the disk is at file offset
 * data_offset + i * sector_size; its XTS tweak is i * (sector_size / 512) as a
 * 64-bit little-endian integer, zero-padded to 16 bytes (plain64); a 4096-byte
 * sector is one XTS data unit.  A stored sector of all zero bytes reads as
 * plaintext zeros (holes).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>

#define KEY_BYTES 64
#define IV_SECTOR_BYTES 512
#define MAX_SECTOR_BYTES 4096
/* Encrypted writes go through a per-thread scratch buffer of this size. */
#define CHUNK_BYTES (256 * 1024)
/* Sector locks: GROUP consecutive sectors share a group; group g uses stripe g % STRIPES. */
#define LOCK_GROUP 16
#define LOCK_STRIPES 64

#ifndef MADV_DONTDUMP
#define MADV_DONTDUMP 16
#endif
#ifndef MADV_WIPEONFORK
#define MADV_WIPEONFORK 18
#endif
#ifndef FALLOC_FL_KEEP_SIZE
#define FALLOC_FL_KEEP_SIZE 0x01
#endif
#ifndef FALLOC_FL_PUNCH_HOLE
#define FALLOC_FL_PUNCH_HOLE 0x02
#endif

static PyObject *WipedError;             /* request on a wiped cipher or closed disk */
static const EVP_CIPHER *xts_cipher;     /* AES-256-XTS, fetched once */
static pthread_key_t scratch_key;
static const unsigned char zero_chunk[CHUNK_BYTES];

/* ---------------------------------------------------------------------------
 * Errors raised once the GIL is back: an errno, or a crypto failure.
 */
enum { OK = 0, FAIL_ERRNO = 1, FAIL_CRYPTO = 2, FAIL_WIPED = 3, FAIL_NOMEM = 4 };

typedef struct {
    int kind;
    int err;                 /* errno for FAIL_ERRNO */
    uint64_t tweak;          /* for FAIL_CRYPTO */
} Status;

static PyObject *
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

static PyObject *
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

/* ---------------------------------------------------------------------------
 * Xts: the key in locked memory, contexts per request.
 */
typedef struct {
    PyObject_HEAD
    unsigned char *key;          /* KEY_BYTES at the start of a private mapping */
    size_t map_bytes;
    int locked;                  /* mlock succeeded */
    int dontdump;                /* madvise(MADV_DONTDUMP) succeeded */
    unsigned sector_size;
    unsigned tweak_step;
    int wiped;
    pthread_rwlock_t lock;       /* requests hold it shared; wipe() exclusive */
} XtsObject;

static PyTypeObject XtsType;

static void
init_rwlock(pthread_rwlock_t *lock)
{
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
    /* wipe()/close() must not starve behind a stream of requests */
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(lock, &attr);
    pthread_rwlockattr_destroy(&attr);
}

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

/* A request's contexts: made on first use, freed (cleansed) by crypt_done. */
typedef struct {
    const XtsObject *x;
    EVP_CIPHER_CTX *ctx[2];      /* [0] decrypt, [1] encrypt */
} Crypt;

static void
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
static int
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
static int
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
    } else if (src.len && (uint64_t)(src.len / self->sector_size - 1) >
               (UINT64_MAX / self->tweak_step) - sector) {
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

static PyTypeObject XtsType = {
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

/* ---------------------------------------------------------------------------
 * Disk: whole requests on a container file.
 */
typedef struct {
    PyObject_HEAD
    int fd;                      /* our own dup of the volume's descriptor */
    int64_t base;                /* file offset of sector 0 */
    int64_t size;                /* bytes in the data area */
    unsigned ss;
    int read_only;
    XtsObject *xts;              /* NULL: unencrypted */
    PyObject *name;              /* for messages */
    int closed;
    pthread_rwlock_t lock;       /* requests shared, close() exclusive */
    pthread_mutex_t stripes[LOCK_STRIPES];
} DiskObject;

static PyTypeObject DiskType;

static unsigned char *
thread_scratch(void)
{
    unsigned char *p = pthread_getspecific(scratch_key);
    if (p == NULL) {
        /* Anonymous mapping: only the pages a request touches use memory. */
        void *m = mmap(NULL, CHUNK_BYTES, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED)
            return NULL;
        if (pthread_setspecific(scratch_key, m) != 0) {
            munmap(m, CHUNK_BYTES);
            return NULL;
        }
        p = m;
    }
    return p;
}

static void
scratch_destroy(void *p)
{
    munmap(p, CHUNK_BYTES);
}

static int
pread_full(int fd, unsigned char *buf, size_t n, int64_t off, Status *st)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = pread(fd, buf + got, n - got, (off_t)(off + (int64_t)got));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            st->kind = FAIL_ERRNO;
            st->err = errno;
            return -1;
        }
        if (r == 0) {                        /* past the end of a short file: zeros */
            memset(buf + got, 0, n - got);
            return 0;
        }
        got += (size_t)r;
    }
    return 0;
}

static int
pwrite_full(int fd, const unsigned char *buf, size_t n, int64_t off, Status *st)
{
    size_t done = 0;
    while (done < n) {
        ssize_t r = pwrite(fd, buf + done, n - done, (off_t)(off + (int64_t)done));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            st->kind = FAIL_ERRNO;
            st->err = errno;
            return -1;
        }
        done += (size_t)r;
    }
    return 0;
}

/* Take the stripes of sectors [first, end) in ascending order; returns the held mask. */
typedef struct { uint64_t mask; } Held;

static Held
lock_range(DiskObject *d, uint64_t first, uint64_t end)
{
    Held h = {0};
    uint64_t g0 = first / LOCK_GROUP, g1 = (end - 1) / LOCK_GROUP;
    if (g1 - g0 + 1 >= LOCK_STRIPES) {
        h.mask = ~(uint64_t)0;
    } else {
        for (uint64_t g = g0; g <= g1; g++)
            h.mask |= (uint64_t)1 << (g % LOCK_STRIPES);
    }
    for (int i = 0; i < LOCK_STRIPES; i++)
        if (h.mask >> i & 1)
            pthread_mutex_lock(&d->stripes[i]);
    return h;
}

static void
unlock_range(DiskObject *d, Held h)
{
    for (int i = LOCK_STRIPES - 1; i >= 0; i--)
        if (h.mask >> i & 1)
            pthread_mutex_unlock(&d->stripes[i]);
}

/* Read whole sectors at `sector` into buf and decrypt them (zero-sector rule). */
static int
read_sectors(DiskObject *d, Crypt *c, unsigned char *buf, size_t n, uint64_t sector,
             Status *st)
{
    if (pread_full(d->fd, buf, n, d->base + (int64_t)(sector * d->ss), st))
        return -1;
    return c != NULL ? decrypt_stored(c, buf, n, sector, st) : 0;
}

/* Encrypt whole sectors from plain (NULL: zeros) and write them, through the scratch. */
static int
write_sectors(DiskObject *d, Crypt *c, const unsigned char *plain, size_t n,
              uint64_t sector, Status *st)
{
    int64_t pos = d->base + (int64_t)(sector * d->ss);
    if (c == NULL) {
        if (plain != NULL)
            return pwrite_full(d->fd, plain, n, pos, st);
        for (size_t off = 0; off < n; off += CHUNK_BYTES) {
            size_t k = n - off < CHUNK_BYTES ? n - off : CHUNK_BYTES;
            if (pwrite_full(d->fd, zero_chunk, k, pos + (int64_t)off, st))
                return -1;
        }
        return 0;
    }
    unsigned char *scratch = thread_scratch();
    if (scratch == NULL) {
        st->kind = FAIL_NOMEM;
        return -1;
    }
    for (size_t off = 0; off < n; off += CHUNK_BYTES) {
        size_t k = n - off < CHUNK_BYTES ? n - off : CHUNK_BYTES;
        const unsigned char *src = plain != NULL ? plain + off : zero_chunk;
        if (crypt_sectors(c, src, scratch, k, sector + off / d->ss, 1, st)
                || pwrite_full(d->fd, scratch, k, pos + (int64_t)off, st))
            return -1;
    }
    return 0;
}

/* Read-modify-write part of one sector: data (NULL: zeros) at `within`. */
static int
modify_sector(DiskObject *d, Crypt *c, uint64_t sector, size_t within,
              const unsigned char *data, size_t len, Status *st)
{
    unsigned char sec[MAX_SECTOR_BYTES];
    int rc = read_sectors(d, c, sec, d->ss, sector, st);
    if (rc == 0) {
        if (data != NULL)
            memcpy(sec + within, data, len);
        else
            memset(sec + within, 0, len);
        rc = write_sectors(d, c, sec, d->ss, sector, st);
    }
    OPENSSL_cleanse(sec, sizeof sec);       /* plaintext of the disk */
    return rc;
}

/* Split [offset, offset+count) into head partial / whole sectors / tail partial. */
typedef struct {
    uint64_t first, end;         /* sectors touched: [first, end) */
    size_t head_len, tail_len;   /* bytes in partial head / tail sectors (0: none) */
    size_t head_within;
    uint64_t whole_first;        /* first whole sector */
    size_t whole_bytes;
} Pieces;

static Pieces
split(unsigned ss, uint64_t offset, uint64_t count)
{
    Pieces p;
    p.first = offset / ss;
    p.end = (offset + count + ss - 1) / ss;
    p.head_within = (size_t)(offset % ss);
    p.head_len = 0;
    if (p.head_within || count < ss) {
        uint64_t room = ss - p.head_within;
        p.head_len = (size_t)(count < room ? count : room);
    }
    uint64_t rest = count - p.head_len;
    p.whole_first = (offset + p.head_len) / ss;
    p.whole_bytes = (size_t)(rest / ss * ss);
    p.tail_len = (size_t)(rest - p.whole_bytes);
    return p;
}

static PyObject *
disk_check(DiskObject *self, long long offset, Py_ssize_t count, int write)
{
    if (write && self->read_only)
        return raise_oserror(EROFS, PyUnicode_FromFormat("disk %U is served read-only",
                                                         self->name));
    if (offset < 0 || count < 0 || (int64_t)count > self->size - offset)
        return raise_oserror(EINVAL, PyUnicode_FromFormat(
            "request of %zd bytes at offset %lld is outside the %lld-byte disk",
            count, offset, (long long)self->size));
    Py_RETURN_NONE;
}

/* An offset or count from Python: out of the 64-bit range reads as -1 (refused by
 * disk_check as outside the disk, EINVAL); not an int: TypeError. */
static int
as_int64(PyObject *obj, long long *out)
{
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (v == -1 && PyErr_Occurred())
        return -1;
    *out = overflow ? -1 : v;
    return 0;
}

/* Enter a request: shared lock, closed check.  Called without the GIL. */
static int
disk_enter(DiskObject *d, Status *st)
{
    pthread_rwlock_rdlock(&d->lock);
    if (d->closed) {
        pthread_rwlock_unlock(&d->lock);
        st->kind = FAIL_WIPED;
        return -1;
    }
    if (d->xts != NULL) {
        pthread_rwlock_rdlock(&d->xts->lock);
        if (d->xts->wiped) {
            pthread_rwlock_unlock(&d->xts->lock);
            pthread_rwlock_unlock(&d->lock);
            st->kind = FAIL_WIPED;
            return -1;
        }
    }
    return 0;
}

static void
disk_leave(DiskObject *d)
{
    if (d->xts != NULL)
        pthread_rwlock_unlock(&d->xts->lock);
    pthread_rwlock_unlock(&d->lock);
}

static void
do_pread(DiskObject *d, unsigned char *buf, uint64_t offset, size_t count, Status *st)
{
    if (disk_enter(d, st))
        return;
    if (d->xts == NULL) {
        pread_full(d->fd, buf, count, d->base + (int64_t)offset, st);
        disk_leave(d);
        return;
    }
    Crypt c = {d->xts, {NULL, NULL}};
    unsigned ss = d->ss;
    if (offset % ss == 0 && count % ss == 0) {         /* whole sectors: the common case */
        read_sectors(d, &c, buf, count, offset / ss, st);
    } else {
        Pieces p = split(ss, offset, count);
        unsigned char sec[MAX_SECTOR_BYTES];
        size_t pos = 0;
        if (p.head_len) {
            if (read_sectors(d, &c, sec, ss, p.first, st) == 0)
                memcpy(buf, sec + p.head_within, p.head_len);
            pos = p.head_len;
        }
        if (st->kind == OK && p.whole_bytes)
            read_sectors(d, &c, buf + pos, p.whole_bytes, p.whole_first, st);
        pos += p.whole_bytes;
        if (st->kind == OK && p.tail_len) {
            if (read_sectors(d, &c, sec, ss, p.whole_first + p.whole_bytes / ss, st) == 0)
                memcpy(buf + pos, sec, p.tail_len);
        }
        OPENSSL_cleanse(sec, sizeof sec);
    }
    crypt_done(&c);
    disk_leave(d);
}

/* Deallocate [offset, offset+len) of the data area; zeros where the file system
 * cannot punch holes (a stored zero sector reads as zeros either way). */
static int
punch(DiskObject *d, uint64_t offset, size_t len, Status *st)
{
    int64_t pos = d->base + (int64_t)offset;
    if (fallocate(d->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)pos,
                  (off_t)len) == 0)
        return 0;
    if (errno != EOPNOTSUPP && errno != ENOSYS) {
        st->kind = FAIL_ERRNO;
        st->err = errno;
        return -1;
    }
    for (size_t off = 0; off < len; off += CHUNK_BYTES) {
        size_t k = len - off < CHUNK_BYTES ? len - off : CHUNK_BYTES;
        if (pwrite_full(d->fd, zero_chunk, k, pos + (int64_t)off, st))
            return -1;
    }
    return 0;
}

/* Write `data`, or zeros when data is NULL (deallocate: punch whole sectors, or the
 * whole range on an unencrypted disk).  Encrypted: under the sector locks. */
static void
do_write(DiskObject *d, const unsigned char *data, uint64_t offset, size_t count,
         int deallocate, Status *st)
{
    if (disk_enter(d, st))
        return;
    if (d->xts == NULL) {                    /* unencrypted: no read-modify-write, no locks */
        if (data != NULL)
            pwrite_full(d->fd, data, count, d->base + (int64_t)offset, st);
        else if (deallocate)
            punch(d, offset, count, st);
        else
            for (size_t off = 0; off < count && st->kind == OK; off += CHUNK_BYTES)
                pwrite_full(d->fd, zero_chunk, count - off < CHUNK_BYTES ? count - off
                            : CHUNK_BYTES, d->base + (int64_t)(offset + off), st);
        disk_leave(d);
        return;
    }
    unsigned ss = d->ss;
    Crypt c = {d->xts, {NULL, NULL}};
    Pieces p = split(ss, offset, count);
    Held held = lock_range(d, p.first, p.end);
    size_t pos = 0;
    if (p.head_len) {
        modify_sector(d, &c, p.first, p.head_within, data, p.head_len, st);
        pos = p.head_len;
    }
    if (st->kind == OK && p.whole_bytes) {
        if (data != NULL)
            write_sectors(d, &c, data + pos, p.whole_bytes, p.whole_first, st);
        else if (deallocate)                 /* zero-sector rule: holes read as zeros */
            punch(d, p.whole_first * ss, p.whole_bytes, st);
        else
            write_sectors(d, &c, NULL, p.whole_bytes, p.whole_first, st);
    }
    pos += p.whole_bytes;
    if (st->kind == OK && p.tail_len)
        modify_sector(d, &c, p.whole_first + p.whole_bytes / ss, 0,
                      data != NULL ? data + pos : NULL, p.tail_len, st);
    unlock_range(d, held);
    crypt_done(&c);
    disk_leave(d);
}

static PyObject *
Disk_pread(DiskObject *self, PyObject *args)
{
    Py_buffer buf;
    PyObject *offset_obj;
    long long offset;
    if (!PyArg_ParseTuple(args, "w*O", &buf, &offset_obj))
        return NULL;
    if (as_int64(offset_obj, &offset) < 0) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    PyObject *ok = disk_check(self, offset, buf.len, 0);
    if (ok == NULL) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    Py_DECREF(ok);
    Status st = {OK, 0, 0};
    if (buf.len) {
        Py_BEGIN_ALLOW_THREADS
        do_pread(self, buf.buf, (uint64_t)offset, (size_t)buf.len, &st);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&buf);
    return raise_status(&st, "the disk has been closed");
}

static PyObject *
Disk_pwrite(DiskObject *self, PyObject *args)
{
    Py_buffer buf;
    PyObject *offset_obj;
    long long offset;
    if (!PyArg_ParseTuple(args, "y*O", &buf, &offset_obj))
        return NULL;
    if (as_int64(offset_obj, &offset) < 0) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    PyObject *ok = disk_check(self, offset, buf.len, 1);
    if (ok == NULL) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    Py_DECREF(ok);
    Status st = {OK, 0, 0};
    if (buf.len) {
        Py_BEGIN_ALLOW_THREADS
        do_write(self, buf.buf, (uint64_t)offset, (size_t)buf.len, 0, &st);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&buf);
    return raise_status(&st, "the disk has been closed");
}

static PyObject *
Disk_zero(DiskObject *self, PyObject *args)
{
    PyObject *offset_obj, *count_obj;
    long long offset, count;
    int deallocate;
    if (!PyArg_ParseTuple(args, "OOp", &offset_obj, &count_obj, &deallocate)
            || as_int64(offset_obj, &offset) < 0 || as_int64(count_obj, &count) < 0)
        return NULL;
    if (count > PY_SSIZE_T_MAX)
        count = -1;                          /* refused as outside the disk */
    PyObject *ok = disk_check(self, offset, (Py_ssize_t)count, 1);
    if (ok == NULL)
        return NULL;
    Py_DECREF(ok);
    Status st = {OK, 0, 0};
    if (count) {
        Py_BEGIN_ALLOW_THREADS
        do_write(self, NULL, (uint64_t)offset, (size_t)count, deallocate, &st);
        Py_END_ALLOW_THREADS
    }
    return raise_status(&st, "the disk has been closed");
}

static PyObject *
Disk_close(DiskObject *self, PyObject *Py_UNUSED(ignored))
{
    int fd = -1;
    Py_BEGIN_ALLOW_THREADS                  /* waits for running requests */
    pthread_rwlock_wrlock(&self->lock);
    if (!self->closed) {
        self->closed = 1;
        fd = self->fd;
        self->fd = -1;
    }
    pthread_rwlock_unlock(&self->lock);
    Py_END_ALLOW_THREADS
    if (fd >= 0)
        close(fd);
    Py_RETURN_NONE;
}

static PyObject *
Disk_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    DiskObject *self = (DiskObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->fd = -1;
    self->closed = 1;
    self->xts = NULL;
    self->name = NULL;
    init_rwlock(&self->lock);
    for (int i = 0; i < LOCK_STRIPES; i++)
        pthread_mutex_init(&self->stripes[i], NULL);
    return (PyObject *)self;
}

static int
Disk_init(DiskObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "data_offset", "size_bytes", "sector_size", "read_only",
                             "xts", "name", NULL};
    int fd, read_only;
    long long base, size;
    unsigned ss;
    PyObject *xts, *name;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iLLIpOU", kwlist, &fd, &base, &size, &ss,
                                     &read_only, &xts, &name))
        return -1;
    if (self->fd >= 0 || self->name != NULL) {
        PyErr_SetString(PyExc_TypeError, "Disk objects cannot be re-initialised");
        return -1;
    }
    if (ss != 512 && ss != 4096) {
        PyErr_Format(PyExc_ValueError, "sector size %u is not supported", ss);
        return -1;
    }
    if (base < 0 || size < 0 || size % ss || size > INT64_MAX - base) {
        PyErr_SetString(PyExc_ValueError, "bad data area");
        return -1;
    }
    if (xts != Py_None) {
        if (!PyObject_TypeCheck(xts, &XtsType)) {
            PyErr_SetString(PyExc_TypeError, "xts must be an Xts or None");
            return -1;
        }
        if (((XtsObject *)xts)->sector_size != ss) {
            PyErr_SetString(PyExc_ValueError, "the cipher's sector size is not the disk's");
            return -1;
        }
    }
    int own = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (own < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->fd = own;
    self->base = base;
    self->size = size;
    self->ss = ss;
    self->read_only = read_only;
    if (xts != Py_None) {
        Py_INCREF(xts);
        self->xts = (XtsObject *)xts;
    }
    Py_INCREF(name);
    self->name = name;
    self->closed = 0;
    return 0;
}

static void
Disk_dealloc(DiskObject *self)
{
    if (self->fd >= 0)
        close(self->fd);
    Py_XDECREF(self->xts);
    Py_XDECREF(self->name);
    pthread_rwlock_destroy(&self->lock);
    for (int i = 0; i < LOCK_STRIPES; i++)
        pthread_mutex_destroy(&self->stripes[i]);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Disk_methods[] = {
    {"pread", (PyCFunction)Disk_pread, METH_VARARGS,
     "pread(buf, offset): fill the writable buf with the plaintext at offset."},
    {"pwrite", (PyCFunction)Disk_pwrite, METH_VARARGS,
     "pwrite(buf, offset): write buf at offset (read-modify-write of partial sectors)."},
    {"zero", (PyCFunction)Disk_zero, METH_VARARGS,
     "zero(offset, count, deallocate): make the range read as zeros."},
    {"close", (PyCFunction)Disk_close, METH_NOARGS,
     "Wait for running requests, then close the descriptor (idempotent)."},
    {NULL}
};

static PyTypeObject DiskType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "blockcrypt.crypto._datapath.Disk",
    .tp_basicsize = sizeof(DiskObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Disk(fd, data_offset, size_bytes, sector_size, read_only, xts, name):\n"
              "whole NBD requests on a container file, GIL released.",
    .tp_new = Disk_new,
    .tp_init = (initproc)Disk_init,
    .tp_dealloc = (destructor)Disk_dealloc,
    .tp_methods = Disk_methods,
};

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
