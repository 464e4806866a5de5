// libfuse 3's high-level API at version 3.1 (the interface `fuse_operations` has had
// since 3.0, with the flags argument of readdir and the config of init).
#define FUSE_USE_VERSION 31
#include <fuse3/fuse.h>
#include <fuse3/fuse_lowlevel.h>
