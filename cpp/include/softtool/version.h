// The version of softtool's C++ core.
#pragma once

namespace softtool {
const char* version();
}  // namespace softtool
