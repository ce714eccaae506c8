"""TensorRT engines: optimization profiles from the I/O contract, builds, engine manifest, compatibility."""
