"""gradserve.server: the gRPC service around the engine, and the `gradserve` command."""
