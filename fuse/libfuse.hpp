// The one place that picks libfuse's API version: files of fuse/ include
// this instead of <fuse3/fuse_lowlevel.h>. No state of its own.
#pragma once

#define FUSE_USE_VERSION 314
#include <fuse3/fuse_lowlevel.h>
