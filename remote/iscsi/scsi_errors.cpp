#include "remote/iscsi/scsi_errors.hpp"

#include <cerrno>
#include <cstdio>
#include <iterator>
#include <iscsi/iscsi.h>
#include <iscsi/scsi-lowlevel.h>

namespace blockway::remote::iscsi {

ScsiOutcome scsi_outcome(int status, int sense_key, int ascq) noexcept {
  switch (status) {
    case SCSI_STATUS_GOOD:
    case SCSI_STATUS_CONDITION_MET:
      return {};
    case SCSI_STATUS_BUSY:
    case SCSI_STATUS_TASK_SET_FULL:
    case SCSI_STATUS_TASK_ABORTED:
      return {EAGAIN, true};
    case SCSI_STATUS_RESERVATION_CONFLICT:
      return {EBUSY, false};  // another initiator holds a reservation: not ours to break
    case SCSI_STATUS_CANCELLED:  // the session went away under the command
    case SCSI_STATUS_ERROR:      // iSCSI-level failure (reject, bad PDU): start a new session
      return {ECONNRESET, false};
    case SCSI_STATUS_TIMEOUT:
      return {ETIMEDOUT, false};
    case SCSI_STATUS_CHECK_CONDITION:
      break;
    default:
      return {EIO, false};
  }
  switch (sense_key) {
    case SCSI_SENSE_NO_SENSE:
    case SCSI_SENSE_RECOVERED_ERROR:
      return {};  // the command completed; the target only reports that it had to try harder
    case SCSI_SENSE_UNIT_ATTENTION:
      // Reset, power on, capacity or mode change, ...: reported once per
      // initiator, the command itself was not executed. A changed capacity
      // is caught by the size check on reconnect, not here.
      return {EAGAIN, true};
    case SCSI_SENSE_NOT_READY:
      // 04/01 "becoming ready" and 04/07 "operation in progress" pass; the
      // rest (no medium, stopped, needs an initialising command) do not.
      if (ascq == 0x0401 || ascq == 0x0407) return {EAGAIN, true};
      return {EIO, false};
    case SCSI_SENSE_MEDIUM_ERROR:
    case SCSI_SENSE_HARDWARE_ERROR:
    case SCSI_SENSE_MISCOMPARE:
      return {EIO, false};
    case SCSI_SENSE_ILLEGAL_REQUEST:
      if (ascq == SCSI_SENSE_ASCQ_INVALID_OPERATION_CODE) return {EOPNOTSUPP, false};
      return {EINVAL, false};
    case SCSI_SENSE_DATA_PROTECTION:
      if ((ascq & 0xff00) == 0x2700) return {EROFS, false};  // write protected, any flavour
      return {EPERM, false};                                 // access denied and the like
    case SCSI_SENSE_COMMAND_ABORTED:
      return {EAGAIN, true};  // aborted by the target (often transport trouble): once more
    default:
      return {EIO, false};
  }
}

bool scsi_command_refused(int status, int sense_key, int ascq) noexcept {
  return status == SCSI_STATUS_CHECK_CONDITION && sense_key == SCSI_SENSE_ILLEGAL_REQUEST &&
         (ascq == SCSI_SENSE_ASCQ_INVALID_OPERATION_CODE || ascq == SCSI_SENSE_ASCQ_INVALID_FIELD_IN_CDB);
}

namespace {

// libiscsi's scsi_sense_key_str() returns NULL for some keys; our own names.
const char* sense_key_name(int key) {
  static const char* const names[] = {"NO_SENSE",        "RECOVERED_ERROR", "NOT_READY",       "MEDIUM_ERROR",
                                      "HARDWARE_ERROR",  "ILLEGAL_REQUEST", "UNIT_ATTENTION",  "DATA_PROTECTION",
                                      "BLANK_CHECK",     "VENDOR_SPECIFIC", "COPY_ABORTED",    "ABORTED_COMMAND",
                                      "OBSOLETE",        "VOLUME_OVERFLOW", "MISCOMPARE"};
  return key >= 0 && key < static_cast<int>(std::size(names)) ? names[key] : "UNKNOWN";
}

}  // namespace

std::string describe_scsi_status(int status, int sense_key, int ascq) {
  char buf[160];
  switch (status) {
    case SCSI_STATUS_CHECK_CONDITION: {
      const char* ascq_name = scsi_sense_ascq_str(ascq);
      std::snprintf(buf, sizeof buf, "CHECK CONDITION: %s (0x%x) ascq 0x%04x%s%s%s", sense_key_name(sense_key),
                    static_cast<unsigned>(sense_key), static_cast<unsigned>(ascq), ascq_name ? " (" : "",
                    ascq_name ? ascq_name : "", ascq_name ? ")" : "");
      return buf;
    }
    case SCSI_STATUS_BUSY: return "BUSY";
    case SCSI_STATUS_TASK_SET_FULL: return "TASK SET FULL";
    case SCSI_STATUS_TASK_ABORTED: return "TASK ABORTED";
    case SCSI_STATUS_RESERVATION_CONFLICT: return "RESERVATION CONFLICT";
    case SCSI_STATUS_CANCELLED: return "cancelled (session lost)";
    case SCSI_STATUS_ERROR: return "iSCSI error";
    case SCSI_STATUS_TIMEOUT: return "timed out";
    default:
      std::snprintf(buf, sizeof buf, "SCSI status 0x%x", static_cast<unsigned>(status));
      return buf;
  }
}

}  // namespace blockway::remote::iscsi
