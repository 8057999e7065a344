"""Running QEMU VMs under the node: definitions, QMP, the supervisor, a test guest."""
