// The errno a FUSE reply carries for a device error. (spawn() and Guarded
// are exercised through a real mount in operations_test.cpp.)
#include "fuse/request.hpp"

#include "core/block_device.hpp"

#include <gtest/gtest.h>

#include <cerrno>

namespace blockway::fuse {
namespace {

TEST(FuseErrno, PassesWhatUsersCanActOnAndMapsTheRestToEio) {
  EXPECT_EQ(fuse_errno({}), 0);
  for (int e : {EIO, ENOSPC, EROFS, EINVAL, EFBIG, ENOMEM, EOPNOTSUPP, EDQUOT, EPERM, EACCES})
    EXPECT_EQ(fuse_errno(core::errno_code(e)), e);
  for (int e : {ETIMEDOUT, ECONNRESET, ENOTCONN, EPROTO, ESHUTDOWN})
    EXPECT_EQ(fuse_errno(core::errno_code(e)), EIO);
}

}  // namespace
}  // namespace blockway::fuse
