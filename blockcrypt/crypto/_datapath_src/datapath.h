/*
 * Shared declarations of the compiled data path (blockcrypt.crypto._datapath):
 * xts.c (the Xts type: the key in locked memory, EVP per request), disk.c and
 * disk_type.c (whole NBD requests on a container file, and the Disk type) and
 * module.c (errors, thread-state pinning, module init).  See module.c for the overview.
 */
#ifndef BLOCKCRYPT_DATAPATH_H
#define BLOCKCRYPT_DATAPATH_H

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

extern PyObject *WipedError;             /* request on a wiped cipher or closed disk */
extern const EVP_CIPHER *xts_cipher;     /* AES-256-XTS, fetched once */
extern pthread_key_t scratch_key;        /* per-thread scratch buffer (disk.c) */
extern PyTypeObject XtsType, DiskType;

/* ---------------------------------------------------------------------------
 * Errors raised once the GIL is back: an errno, or a crypto failure.
 */
enum { OK = 0, FAIL_ERRNO = 1, FAIL_CRYPTO = 2, FAIL_WIPED = 3, FAIL_NOMEM = 4 };

typedef struct {
    int kind;
    int err;                 /* errno for FAIL_ERRNO */
    uint64_t tweak;          /* for FAIL_CRYPTO */
} Status;

PyObject *raise_status(const Status *st, const char *what);
PyObject *raise_oserror(int err, PyObject *msg);
void init_rwlock(pthread_rwlock_t *lock);

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

/* A request's contexts: made on first use, freed (cleansed) by crypt_done. */
typedef struct {
    const XtsObject *x;
    EVP_CIPHER_CTX *ctx[2];      /* [0] decrypt, [1] encrypt */
} Crypt;

void crypt_done(Crypt *c);
int crypt_sectors(Crypt *c, const unsigned char *src, unsigned char *dst, size_t n,
                  uint64_t sector, int encrypt, Status *st);
int decrypt_stored(Crypt *c, unsigned char *buf, size_t n, uint64_t sector, Status *st);
void scratch_destroy(void *p);

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

void do_pread(DiskObject *d, unsigned char *buf, uint64_t offset, size_t count, Status *st);
void do_write(DiskObject *d, const unsigned char *data, uint64_t offset, size_t count,
              int deallocate, Status *st);

#endif
