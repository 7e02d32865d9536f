// The FUSE low-level operations: one file per export in the root directory,
// metadata answered from the inode table, data requests served by the
// export's device (through its BlockSizeLayer where it has one).
//
// Thread model: libfuse calls every operation on the reader loop that read
// the request (see request.hpp): metadata operations reply inline; reads,
// writes, flushes, fallocate and lseek start a coroutine (spawn()) that
// replies when the device answers, on whichever loop it ran. Shared state is
// the inode table (its own mutex) and per-file atomics (mtime, "wrote since
// the last flush"); ordering between writes of one file is the
// BlockSizeLayer's.
#pragma once

#include "fuse/libfuse.hpp"

namespace blockway::fuse {

// The table handed to fuse_session_new(); userdata is the Mount.
const fuse_lowlevel_ops& operations();

}  // namespace blockway::fuse
