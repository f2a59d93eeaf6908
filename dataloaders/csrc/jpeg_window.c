/* deepspike_jpeg.decode_window: decode only a window of a JPEG, optionally at 1/2, 1/4 or 1/8 scale.

A RandomResizedCrop keeps on average about half of the image, and libjpeg-turbo can leave the rest undone:
jpeg_crop_scanline limits the inverse DCT, upsampling and colour conversion to the iMCU columns that cover
the window, jpeg_skip_scanlines passes over the rows above it (entropy decoding only, which is sequential
in a baseline JPEG), and decoding stops after its last row. The pixels are the full decode's: the same
library, DCT method and upsampling, cut to the window (tests/test_data_window_decode.py checks it).

Only the stable ABI (abi3) and libjpeg's own API; libjpeg's errors end in a longjmp back here and come out
as a ValueError, never as the library's default exit(). Decoding stops after the window's last row, so damage
below it goes unseen: the window's pixels are still the file's. */

#define Py_LIMITED_API 0x030B0000
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <setjmp.h>
#include <stdio.h>
#include <string.h>
#include <jpeglib.h>

struct error_mgr {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
};

static void on_error(j_common_ptr cinfo) {
    struct error_mgr *err = (struct error_mgr *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

/* libjpeg's warnings (level -1: corrupt or cut-short entropy data, which it pads over) end the decode too,
   as simplejpeg's do, so both decoders refuse the same files; trace messages (level >= 0) are dropped. */
static void on_message(j_common_ptr cinfo, int level) {
    if (level < 0)
        on_error(cinfo);
}

static PyObject *decode_window(PyObject *self, PyObject *args) {
    Py_buffer data;
    int top, left, height, width, factor;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*iiiii", &data, &top, &left, &height, &width, &factor))
        return NULL;
    if (factor != 1 && factor != 2 && factor != 4 && factor != 8) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "factor must be 1, 2, 4 or 8");
        return NULL;
    }
    struct jpeg_decompress_struct cinfo;
    struct error_mgr err;
    PyObject *volatile out = NULL;
    JSAMPARRAY volatile row = NULL;
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = on_error;
    err.pub.emit_message = on_message;
    jpeg_create_decompress(&cinfo);
    if (setjmp(err.jump)) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        Py_XDECREF(out);
        PyErr_Format(PyExc_ValueError, "not a decodable JPEG (%s)", err.message);
        return NULL;
    }
    jpeg_mem_src(&cinfo, (const unsigned char *)data.buf, (unsigned long)data.len);
    jpeg_read_header(&cinfo, TRUE);
    if (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_NotImplementedError, "CMYK JPEG");
        return NULL;
    }
    cinfo.out_color_space = JCS_RGB;
    cinfo.scale_num = 1;
    cinfo.scale_denom = (unsigned int)factor;
    jpeg_start_decompress(&cinfo);
    /* In 64 bits: top + height must not wrap for a hostile pair of ints. */
    if (top < 0 || left < 0 || height < 1 || width < 1 || (long long)top + height > cinfo.output_height ||
        (long long)left + width > cinfo.output_width) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        PyErr_Format(PyExc_ValueError, "window %dx%d at (%d, %d) outside the %ux%u image", height, width, top,
                     left, cinfo.output_height, cinfo.output_width);
        return NULL;
    }
    /* crop_scanline widens the columns to iMCU boundaries (x0 comes back at or left of its input), and the
       chroma upsampling of its first and last column lacks the neighbour beyond them: one column of margin
       on the left and two on the right keep those columns out of the window. */
    JDIMENSION x0 = left > 0 ? (JDIMENSION)left - 1 : 0;
    JDIMENSION x1 = (JDIMENSION)(left + width + 2) < cinfo.output_width ? (JDIMENSION)(left + width + 2)
                                                                         : cinfo.output_width;
    JDIMENSION w0 = x1 - x0;
    if (w0 < cinfo.output_width)
        jpeg_crop_scanline(&cinfo, &x0, &w0);
    if (top > 0 && jpeg_skip_scanlines(&cinfo, (JDIMENSION)top) != (JDIMENSION)top)
        on_error((j_common_ptr)&cinfo);
    out = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)height * width * 3);
    if (out == NULL) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        return NULL;
    }
    row = (*cinfo.mem->alloc_sarray)((j_common_ptr)&cinfo, JPOOL_IMAGE, w0 * 3, 1);
    char *dst = PyByteArray_AsString(out);
    size_t skip = (size_t)(left - (int)x0) * 3, bytes = (size_t)width * 3;
    for (int y = 0; y < height; y++) {
        if (jpeg_read_scanlines(&cinfo, row, 1) != 1)
            on_error((j_common_ptr)&cinfo);
        memcpy(dst + y * bytes, row[0] + skip, bytes);
    }
    jpeg_abort_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    PyBuffer_Release(&data);
    return out;
}

static PyMethodDef methods[] = {
    {"decode_window", decode_window, METH_VARARGS,
     "decode_window(data, top, left, height, width, factor) -> bytearray of height x width x 3 RGB: the "
     "window of the JPEG decoded at 1/factor of its size (factor 1, 2, 4 or 8), in that image's pixels."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "deepspike_jpeg", NULL, -1, methods};

PyMODINIT_FUNC PyInit_deepspike_jpeg(void) { return PyModule_Create(&module); }
