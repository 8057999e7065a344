"""Live migration of running QEMU VMs between dwcp nodes (issue 12)."""
