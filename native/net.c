#include "net.h"

int dwcp_net_abi(void) { return 1; }
