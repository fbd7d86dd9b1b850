/*
 * One whole NBD request on a container file, run without the GIL (the Python
 * side, the Disk type, is disk_type.c): pread(2)/pwrite(2), XTS (xts.c), the
 * zero-sector rule, the partial-sector read-modify-write and the striped sector
 * locks.
 */
#include "datapath.h"

static const unsigned char zero_chunk[CHUNK_BYTES];
pthread_key_t scratch_key;

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

void
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
        if (r == 0) {                        /* cannot happen on a regular file */
            st->kind = FAIL_ERRNO;
            st->err = EIO;
            return -1;
        }
        done += (size_t)r;
    }
    return 0;
}

/* Store zero bytes over [pos, pos+n) of the file (allocated, not a hole). */
static int
write_zero_bytes(DiskObject *d, int64_t pos, size_t n, Status *st)
{
    for (size_t off = 0; off < n; off += CHUNK_BYTES) {
        size_t k = n - off < CHUNK_BYTES ? n - off : CHUNK_BYTES;
        if (pwrite_full(d->fd, zero_chunk, k, pos + (int64_t)off, st))
            return -1;
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

void
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
    return write_zero_bytes(d, pos, len, st);
}

/* Write `data`, or zeros when data is NULL (deallocate: punch whole sectors, or the
 * whole range on an unencrypted disk).  Encrypted: under the sector locks. */
void
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
            write_zero_bytes(d, d->base + (int64_t)offset, count, st);
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
