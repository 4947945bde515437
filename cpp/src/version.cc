// Library version, so the Python module and the C++ tests can check they link the same core.
#include "softtool/version.h"

namespace softtool {
const char* version() { return "0.1.0"; }
}  // namespace softtool
