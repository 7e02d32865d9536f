// scsi_outcome(): SCSI status and sense data to errno and "retry".
#include "remote/iscsi/scsi_errors.hpp"

#include "core/remote_device.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <iscsi/iscsi.h>
#include <iscsi/scsi-lowlevel.h>

#include <cerrno>

namespace blockway::remote::iscsi {
namespace {

using ::testing::HasSubstr;

ScsiOutcome check(int key, int ascq) { return scsi_outcome(SCSI_STATUS_CHECK_CONDITION, key, ascq); }

bool connection_error(int err) { return core::is_connection_error({err, std::system_category()}); }

TEST(ScsiErrors, GoodIsSuccess) {
  EXPECT_EQ(scsi_outcome(SCSI_STATUS_GOOD, 0, 0).err, 0);
  EXPECT_FALSE(scsi_outcome(SCSI_STATUS_GOOD, 0, 0).retry);
  EXPECT_EQ(scsi_outcome(SCSI_STATUS_CONDITION_MET, 0, 0).err, 0);
  // A recovered error completed the command.
  EXPECT_EQ(check(SCSI_SENSE_RECOVERED_ERROR, 0x1701).err, 0);
}

TEST(ScsiErrors, UnitAttentionAndBusyAreRetried) {
  for (int ascq : {SCSI_SENSE_ASCQ_POWER_ON_OCCURED, SCSI_SENSE_ASCQ_BUS_RESET,
                   SCSI_SENSE_ASCQ_CAPACITY_DATA_HAS_CHANGED, SCSI_SENSE_ASCQ_NEXUS_LOSS}) {
    const auto o = check(SCSI_SENSE_UNIT_ATTENTION, ascq);
    EXPECT_TRUE(o.retry) << ascq;
    EXPECT_EQ(o.err, EAGAIN);
  }
  EXPECT_TRUE(scsi_outcome(SCSI_STATUS_BUSY, 0, 0).retry);
  EXPECT_TRUE(scsi_outcome(SCSI_STATUS_TASK_SET_FULL, 0, 0).retry);
  EXPECT_TRUE(scsi_outcome(SCSI_STATUS_TASK_ABORTED, 0, 0).retry);
  EXPECT_TRUE(check(SCSI_SENSE_COMMAND_ABORTED, 0).retry);
  EXPECT_TRUE(check(SCSI_SENSE_NOT_READY, 0x0401).retry);  // becoming ready
}

TEST(ScsiErrors, MediumAndNotReadyAreEio) {
  EXPECT_EQ(check(SCSI_SENSE_MEDIUM_ERROR, 0x1100).err, EIO);  // unrecovered read error
  EXPECT_FALSE(check(SCSI_SENSE_MEDIUM_ERROR, 0x1100).retry);
  EXPECT_EQ(check(SCSI_SENSE_HARDWARE_ERROR, SCSI_SENSE_ASCQ_INTERNAL_TARGET_FAILURE).err, EIO);
  EXPECT_EQ(check(SCSI_SENSE_NOT_READY, SCSI_SENSE_ASCQ_MEDIUM_NOT_PRESENT).err, EIO);
  EXPECT_EQ(check(SCSI_SENSE_NOT_READY, 0x0402).err, EIO);  // needs an initialising command
  EXPECT_FALSE(check(SCSI_SENSE_NOT_READY, 0x0402).retry);
  EXPECT_EQ(check(SCSI_SENSE_MISCOMPARE, 0x1d00).err, EIO);
  EXPECT_EQ(scsi_outcome(0x7e, 0, 0).err, EIO);  // unknown status
}

TEST(ScsiErrors, IllegalRequestIsEinvalOrUnsupported) {
  EXPECT_EQ(check(SCSI_SENSE_ILLEGAL_REQUEST, SCSI_SENSE_ASCQ_INVALID_FIELD_IN_CDB).err, EINVAL);
  EXPECT_EQ(check(SCSI_SENSE_ILLEGAL_REQUEST, SCSI_SENSE_ASCQ_LBA_OUT_OF_RANGE).err, EINVAL);
  EXPECT_EQ(check(SCSI_SENSE_ILLEGAL_REQUEST, SCSI_SENSE_ASCQ_LOGICAL_UNIT_NOT_SUPPORTED).err, EINVAL);
  EXPECT_EQ(check(SCSI_SENSE_ILLEGAL_REQUEST, SCSI_SENSE_ASCQ_INVALID_OPERATION_CODE).err, EOPNOTSUPP);
  EXPECT_FALSE(check(SCSI_SENSE_ILLEGAL_REQUEST, 0x2400).retry);
}

// What makes IscsiDevice::zero stop sending WRITE SAME and write zeroes.
TEST(ScsiErrors, RefusedCommandIsInvalidOpcodeOrCdbField) {
  const int cc = SCSI_STATUS_CHECK_CONDITION;
  EXPECT_TRUE(scsi_command_refused(cc, SCSI_SENSE_ILLEGAL_REQUEST, SCSI_SENSE_ASCQ_INVALID_OPERATION_CODE));
  EXPECT_TRUE(scsi_command_refused(cc, SCSI_SENSE_ILLEGAL_REQUEST, SCSI_SENSE_ASCQ_INVALID_FIELD_IN_CDB));
  // An LBA out of range or a missing LUN is a real failure, not a refusal.
  EXPECT_FALSE(scsi_command_refused(cc, SCSI_SENSE_ILLEGAL_REQUEST, SCSI_SENSE_ASCQ_LBA_OUT_OF_RANGE));
  EXPECT_FALSE(scsi_command_refused(cc, SCSI_SENSE_ILLEGAL_REQUEST, SCSI_SENSE_ASCQ_LOGICAL_UNIT_NOT_SUPPORTED));
  EXPECT_FALSE(scsi_command_refused(cc, SCSI_SENSE_ILLEGAL_REQUEST, SCSI_SENSE_ASCQ_INVALID_FIELD_IN_PARAMETER_LIST));
  // Other keys, and statuses other than CHECK CONDITION, never are.
  EXPECT_FALSE(scsi_command_refused(cc, SCSI_SENSE_MEDIUM_ERROR, SCSI_SENSE_ASCQ_INVALID_FIELD_IN_CDB));
  EXPECT_FALSE(scsi_command_refused(cc, SCSI_SENSE_DATA_PROTECTION, 0x2700));
  EXPECT_FALSE(scsi_command_refused(SCSI_STATUS_GOOD, SCSI_SENSE_ILLEGAL_REQUEST,
                                    SCSI_SENSE_ASCQ_INVALID_OPERATION_CODE));
  EXPECT_FALSE(scsi_command_refused(SCSI_STATUS_BUSY, 0, 0));
}

TEST(ScsiErrors, WriteProtectIsErofsAndOtherProtectionEperm) {
  EXPECT_EQ(check(SCSI_SENSE_DATA_PROTECTION, SCSI_SENSE_ASCQ_WRITE_PROTECTED).err, EROFS);
  EXPECT_EQ(check(SCSI_SENSE_DATA_PROTECTION, SCSI_SENSE_ASCQ_HARDWARE_WRITE_PROTECTED).err, EROFS);
  EXPECT_EQ(check(SCSI_SENSE_DATA_PROTECTION, SCSI_SENSE_ASCQ_SOFTWARE_WRITE_PROTECTED).err, EROFS);
  EXPECT_EQ(check(SCSI_SENSE_DATA_PROTECTION, 0x2002).err, EPERM);  // access denied
  EXPECT_EQ(scsi_outcome(SCSI_STATUS_RESERVATION_CONFLICT, 0, 0).err, EBUSY);
}

TEST(ScsiErrors, LostSessionIsAConnectionErrorSoRetryLayerReconnects) {
  EXPECT_TRUE(connection_error(scsi_outcome(SCSI_STATUS_CANCELLED, 0, 0).err));
  EXPECT_TRUE(connection_error(scsi_outcome(SCSI_STATUS_ERROR, 0, 0).err));
  EXPECT_TRUE(connection_error(scsi_outcome(SCSI_STATUS_TIMEOUT, 0, 0).err));
  // ...and nothing the target said about the medium is one.
  EXPECT_FALSE(connection_error(check(SCSI_SENSE_MEDIUM_ERROR, 0x1100).err));
  EXPECT_FALSE(connection_error(check(SCSI_SENSE_ILLEGAL_REQUEST, 0x2400).err));
  EXPECT_FALSE(scsi_outcome(SCSI_STATUS_CANCELLED, 0, 0).retry);
}

TEST(ScsiErrors, DescriptionsNameTheSense) {
  EXPECT_THAT(describe_scsi_status(SCSI_STATUS_CHECK_CONDITION, SCSI_SENSE_MEDIUM_ERROR, 0x1100),
              HasSubstr("MEDIUM_ERROR"));
  EXPECT_THAT(describe_scsi_status(SCSI_STATUS_CHECK_CONDITION, SCSI_SENSE_ILLEGAL_REQUEST, 0x2500),
              HasSubstr("0x2500"));
  EXPECT_EQ(describe_scsi_status(SCSI_STATUS_BUSY, 0, 0), "BUSY");
}

}  // namespace
}  // namespace blockway::remote::iscsi
