/*
 * The Disk type: the Python side of disk.c.  Each method checks its arguments
 * with the GIL held, then runs the whole request in disk.c with the GIL
 * released, and raises what it reports once the GIL is back.
 */
#include "datapath.h"

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

PyTypeObject DiskType = {
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
