"""Training machinery on megatron-core: DDP wrapping, forward/backward steps, optimizer."""
