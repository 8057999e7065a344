/* dwcp._net: network hot paths (batched UDP I/O, link emulator). */
#include <stdint.h>

/* ABI version of this module; bump when a signature changes. */
int dwcp_net_abi(void);
