"""HTTP and gRPC pose service over one worker pool with dynamic batching."""
