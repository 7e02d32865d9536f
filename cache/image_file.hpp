// Local image files of the cache and of clone overlays: their names and how
// they are made (sparse, of the image's exact size, durable before use).
//
// Start-up only; no threads.
#pragma once

#include <cstdint>
#include <string>

namespace blockway::cache {

// The file name an export's local image gets in its directory ("vm1.img";
// characters other than letters, digits, '-', '_', '.' become '_').
std::string image_file_name(const std::string& export_name);

// Replaces `path` with a new sparse file of `size` bytes (allocated when
// `preallocate`), synced. Throws std::runtime_error naming the file.
void create_image_file(const std::string& path, uint64_t size, bool preallocate);

}  // namespace blockway::cache
