"""gradserve.server: a library serving the engine over gRPC (`create_server`); the
`gradserve` command that runs it is gradserve.cli."""
