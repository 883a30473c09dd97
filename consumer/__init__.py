"""The consumer: membership, owned partitions, per-key FIFO claim/handle/ack loop."""
