// SCSI status and sense data to errno, in one place.
//
// What the data path does with a finished SCSI command: success, an errno to
// return, or "retry the same command" (UNIT ATTENTION, BUSY, TASK SET FULL,
// ABORTED COMMAND, a LUN becoming ready), which IscsiDevice does a bounded
// number of times. A lost or cancelled session maps to a connection error
// (core::is_connection_error) so RetryLayer reconnects. Pure functions,
// no threads.
#pragma once

#include <string>

namespace blockway::remote::iscsi {

struct ScsiOutcome {
  int err = 0;         // 0 on success
  bool retry = false;  // transient: issue the same command again
};

// `status` is libiscsi's task status (SCSI_STATUS_*, including its
// CANCELLED/ERROR/TIMEOUT pseudo-statuses); sense_key and ascq are only
// looked at for CHECK CONDITION.
[[nodiscard]] ScsiOutcome scsi_outcome(int status, int sense_key, int ascq) noexcept;

// The LUN does not do this command at all, or not with these bits: ILLEGAL
// REQUEST with INVALID OPERATION CODE or INVALID FIELD IN CDB. For a command
// with a fallback (WRITE SAME without UNMAP: write the zeroes instead) this
// means "stop sending it", not "the request failed".
[[nodiscard]] bool scsi_command_refused(int status, int sense_key, int ascq) noexcept;

// "CHECK CONDITION: MEDIUM_ERROR (0x3) ascq 0x1100", for logs.
[[nodiscard]] std::string describe_scsi_status(int status, int sense_key, int ascq);

}  // namespace blockway::remote::iscsi
