/* Paging devices on NBD servers (csrc/nbd.c): what the service engine calls
 * beyond pyhv.h (which cffi sees, and which knows no struct iovec). */
#ifndef PYHV_NBD_H
#define PYHV_NBD_H
#include <sys/uio.h>
#include "pyhv.h"
int pyhv_nbd_pwritev(struct pyhv_nbd *n, const struct iovec *iov, int cnt, uint64_t off);
#endif
