// The headers are the point of this target (see include/); a C target needs one source.
#include "cabackup_file_metadata.h"
