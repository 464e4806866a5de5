// Extended attributes: <sys/xattr.h> is not in Swift's Glibc module. The declarations
// are the C library's own; nothing is wrapped.
#ifndef CABACKUP_FILE_METADATA_H
#define CABACKUP_FILE_METADATA_H
#include <sys/types.h>
#include <sys/xattr.h>
#endif
